"""``migration finish`` (app/migration/cli.py) repeats the token copy before reads move to the new store alone:
a revocation whose tombstone reached only the old store must hold after the finish. DynamoDB on moto; the
state read and published on Kafka replaced by a list."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from app.clock import SystemClock
from app.migration import cli
from app.migration.state import MigrationError, MigrationState
from app.migration.tables import FollowingTokens
from app.settings import Settings
from app.storage.dynamodb import DynamoTokens
from app.storage.tokens import TokenStore, digest
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)


async def test_finish_copies_a_tombstone_only_the_old_store_holds_before_publishing(
        aws: None, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    uid = uuid.uuid4().hex[:8]
    settings = Settings.of(dynamodb_endpoint="", create_table=True, table_name=f"old-{uid}")
    old, new = f"dynamodb:old-{uid}", f"dynamodb:new-{uid}"
    cut = MigrationState("cutover", old, new, shadow_pct=100, cutover_pct=100, version=7, both_since_ms=1)
    at = {spec: settings.replace(table_name=spec.partition(":")[2]) for spec in (old, new)}
    raw = {spec: DynamoTokens(s.storage, s.dynamodb) for spec, s in at.items()}
    for t in raw.values():
        await t.start()
    try:
        # A token copied at `migration start`, then revoked where only the old store took the tombstone.
        tok, info = await TokenStore(settings.web, table=raw[old]).create("shop", "read")
        await raw[new].put_token(digest(tok), info)
        assert await TokenStore(settings.web, table=raw[old]).revoke(info.id)
        live, _ = await TokenStore(settings.web, table=raw[old]).create("blog", "read")  # created before the copy
        got = await raw[new].get_token(digest(tok))
        assert got is not None and not got.revoked_s  # the new store missed the revocation

        published: list[tuple[MigrationState, Any]] = []

        async def read_state(_: Settings) -> MigrationState:
            return cut

        async def publish(_: Settings, state: MigrationState) -> None:
            # what the new store holds at the moment reads move there
            published.append((state, await raw[new].get_token(digest(tok))))

        monkeypatch.setattr(cli, "read_state", read_state)
        monkeypatch.setattr(cli, "publish", publish)
        assert await cli.finish(settings, force=True) == 0

        [(state, at_publish)] = published
        assert state.phase == "single" and state.source == new and state.version == 8
        assert at_publish is not None and at_publish.revoked_s > 0  # the tombstone, before the publish
        after = TokenStore(settings.web, table=FollowingTokens(settings, lambda: state))  # single(new store)
        try:
            assert await after.verify(tok, "read") is None
            assert (await after.verify(live, "read")) is not None  # live tokens are copied too
        finally:
            await after.stop()
    finally:
        for t in raw.values():
            await t.stop()


async def test_a_refused_finish_copies_and_publishes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def read_state(_: Settings) -> MigrationState:
        return MigrationState("cutover", "dynamodb:a", "dynamodb:b", shadow_pct=100, cutover_pct=100, version=3,
                              both_since_ms=SystemClock().now_ms())

    async def copy(*_: Any, **__: Any) -> int:
        calls.append("copy")
        return 0

    async def publish(*_: Any) -> None:
        calls.append("publish")

    monkeypatch.setattr(cli, "read_state", read_state)
    monkeypatch.setattr(cli, "copy_tokens_patiently", copy)
    monkeypatch.setattr(cli, "publish", publish)
    with pytest.raises(MigrationError, match="ages out at"):  # the retention has not passed: refused first
        await cli.finish(Settings(), force=False)
    assert calls == []
