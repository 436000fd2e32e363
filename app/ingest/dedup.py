"""Logplex frame deduplication that survives restarts and is shared by every ingest process.

Logplex retries a frame with the same ``Logplex-Frame-Id`` on anything but 2xx. A frame must be counted
once: the first delivery claims the id with a conditional write (``pending``, with a lease); only after
Kafka acknowledged every record is it marked ``done``. A retry of a done frame is answered 2xx without
producing; a retry while the first attempt is still in flight gets 503 (Logplex retries again later); a
claim whose producer died is taken over once its lease expires. Entries live ``dedup_window_s``
(DynamoDB TTL, and reads ignore expired entries, as TTL deletion is lazy).

Left open: a process that dies after Kafka's ack but before marking ``done`` lets the retry produce the
frame again once the lease expires (seconds-wide window, documented in the README).
"""

from __future__ import annotations

import enum

from app.clock import Clock, SystemClock
from app.settings import Settings
from app.storage.dynamodb import DynamoTable


class Claim(enum.Enum):
    NEW = "new"  # produce it
    DONE = "done"  # already delivered: answer 2xx, produce nothing
    BUSY = "busy"  # another attempt is in flight: answer 503


class FrameDedup(DynamoTable):
    ttl_attribute = "expires_at"

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        super().__init__(settings, f"{settings.table_name}-frames")
        self.clock = clock or SystemClock()

    async def claim(self, app: str, frame_id: str) -> Claim:
        now_ms = self.clock.now_ms()
        key = {"S": f"{app}#{frame_id}"}
        try:
            await self.client.put_item(
                TableName=self.table,
                Item={"pk": key, "st": {"S": "pending"},
                      "lease_ms": {"N": str(now_ms + int(self.settings.dedup_lease_s * 1000))},
                      "expires_at": {"N": str(now_ms // 1000 + int(self.settings.dedup_window_s))}},
                ConditionExpression="attribute_not_exists(pk) OR expires_at < :now_s "
                                    "OR (st = :pending AND lease_ms < :now_ms)",
                ExpressionAttributeValues={":now_s": {"N": str(now_ms // 1000)}, ":now_ms": {"N": str(now_ms)},
                                           ":pending": {"S": "pending"}})
            return Claim.NEW
        except self.client.exceptions.ConditionalCheckFailedException:
            pass
        except Exception as exc:
            raise self.error(exc, "PutItem") from exc
        try:
            item = (await self.client.get_item(TableName=self.table, Key={"pk": key},
                                               ConsistentRead=True)).get("Item")
        except Exception as exc:
            raise self.error(exc, "GetItem") from exc
        if item is not None and item["st"]["S"] == "done":
            return Claim.DONE
        return Claim.BUSY

    async def complete(self, app: str, frame_id: str) -> None:
        now_s = self.clock.now_ms() // 1000
        try:
            await self.client.update_item(
                TableName=self.table, Key={"pk": {"S": f"{app}#{frame_id}"}},
                UpdateExpression="SET st = :done, expires_at = :exp",
                ExpressionAttributeValues={":done": {"S": "done"},
                                           ":exp": {"N": str(now_s + int(self.settings.dedup_window_s))}})
        except Exception as exc:
            raise self.error(exc, "UpdateItem") from exc

    async def release(self, app: str, frame_id: str) -> None:
        """Give the claim up after a failed delivery, so Logplex's retry is not answered BUSY."""
        try:
            await self.client.delete_item(
                TableName=self.table, Key={"pk": {"S": f"{app}#{frame_id}"}},
                ConditionExpression="st = :pending", ExpressionAttributeValues={":pending": {"S": "pending"}})
        except self.client.exceptions.ConditionalCheckFailedException:
            pass
        except Exception as exc:
            raise self.error(exc, "DeleteItem") from exc
