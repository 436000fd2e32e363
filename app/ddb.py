"""A small DynamoDB table owned by one long-lived client: the base of tokens and drain-frame dedup.

Same client configuration and credentials rules as the metrics store (app/store.py).
"""

from __future__ import annotations

import logging
from typing import Any

import aioboto3

from app.errors import ConfigError, PipelineError
from app.settings import Settings
from app.store import classify_error, client_config, client_credentials

log = logging.getLogger(__name__)


class DynamoTable:
    """Creates its table (``pk`` string hash key; optional TTL attribute) when settings allow."""

    ttl_attribute: str | None = None

    def __init__(self, settings: Settings, table: str) -> None:
        self.settings = settings
        self.table = table
        self._client: Any = None
        self._ctx: Any = None
        self._setup_pending = False

    async def start(self) -> None:
        if self._client is not None:
            return
        self._ctx = aioboto3.Session().client(
            "dynamodb", region_name=self.settings.aws_region, endpoint_url=self.settings.dynamodb_endpoint or None,
            config=client_config(self.settings), **client_credentials(self.settings))
        self._client = await self._ctx.__aenter__()
        if self.settings.create_table:
            try:
                await self._setup()
            except PipelineError as exc:
                if not exc.retriable:
                    raise
                # DynamoDB unreachable at start: keep running and report not-ready; ping() retries.
                log.warning("%s: table setup deferred, DynamoDB unavailable: %s", self.table, exc)
                self._setup_pending = True

    async def _setup(self) -> None:
        try:
            await self._ensure_table()
        except PipelineError:
            raise
        except Exception as exc:
            raise self.error(exc, "CreateTable") from exc
        self._setup_pending = False

    async def stop(self) -> None:
        if self._ctx is not None:
            await self._ctx.__aexit__(None, None, None)
        self._client = self._ctx = None

    async def ping(self) -> None:
        """Readiness: the table answers (and was set up, if that had to wait for DynamoDB)."""
        if self._setup_pending:
            await self._setup()
        try:
            await self.client.describe_table(TableName=self.table)
        except Exception as exc:
            raise self.error(exc, "DescribeTable") from exc

    @property
    def client(self) -> Any:
        if self._client is None:
            raise ConfigError(f"{type(self).__name__} used before start()", action="await start() at startup")
        return self._client

    def error(self, exc: BaseException, operation: str) -> PipelineError:
        return classify_error(exc, operation=operation, table=self.table, settings=self.settings)

    async def _ensure_table(self) -> None:
        c = self._client
        try:
            await c.describe_table(TableName=self.table)
            return
        except c.exceptions.ResourceNotFoundException:
            pass
        try:
            await c.create_table(TableName=self.table, BillingMode="PAY_PER_REQUEST",
                                 KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                                 AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}])
        except c.exceptions.ResourceInUseException:
            pass  # created concurrently by another process
        await c.get_waiter("table_exists").wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        if self.ttl_attribute:
            try:
                await c.update_time_to_live(TableName=self.table, TimeToLiveSpecification={
                    "Enabled": True, "AttributeName": self.ttl_attribute})
            except c.exceptions.ClientError:
                pass  # already enabled, or an emulator without TTL: reads filter expired items anyway
