"""Token verification under abuse (security review M1) and revocation across a store migration (M8):
app/storage/tokens.py TokenStore, app/migration/tables.py FollowingTokens, the DynamoDB token table on moto."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from app.clock import ManualClock
from app.errors import StoreUnavailable
from app.migration.state import MigrationState
from app.migration.tables import FollowingTokens
from app.settings import Settings
from app.storage import tokens as tokens_module
from app.storage.dynamodb import DynamoTokens
from app.storage.protocol import TokenInfo
from app.storage.tokens import NEGATIVE_CACHE_ENTRIES, TokenStore, digest
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)

NOW_MS = 1_800_000_000_000


class CountingTable:
    """An in-memory TokenTable that counts reads (revoked_s kept on a live put, as the protocol says)."""

    def __init__(self) -> None:
        self.items: dict[str, TokenInfo] = {}
        self.reads: list[str] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ping(self) -> None: ...

    async def put_token(self, key: str, info: TokenInfo) -> None:
        old = self.items.get(key)
        self.items[key] = replace(info, revoked_s=info.revoked_s or (old.revoked_s if old else 0))

    async def get_token(self, key: str) -> TokenInfo | None:
        self.reads.append(key)
        return self.items.get(key)

    async def all_tokens(self) -> list[tuple[str, TokenInfo]]:
        return list(self.items.items())

    async def delete_token(self, key: str) -> None:
        self.items.pop(key, None)


def well_formed(kind: str = "drain") -> str:
    return f"mk_{kind}_{secrets.token_urlsafe(32)}"


@pytest.fixture
def table() -> CountingTable:
    return CountingTable()


@pytest.fixture
def store(table: CountingTable) -> TokenStore:
    return TokenStore(Settings().web, table=table, clock=ManualClock(NOW_MS))


# --- M1: junk and floods --------------------------------------------------------------------------------


async def test_junk_never_reaches_the_table(store: TokenStore, table: CountingTable) -> None:
    good, _ = await store.create("shop", "drain")
    body = good[len("mk_drain_"):]
    junk = ["", "x", "Bearer", "d.8b3c5e6f-1a2b-4c3d-9e8f-0a1b2c3d4e5f", good + "A", good[:-1], good + "\n",
            good.replace("mk_drain_", "mk_admin_"), good.replace("mk_", "MK_"), "mk_drain_" + body[:-1] + "=",
            "mk_drain_" + body[:-1] + "é", "mk_drain_" + body[:-1] + "/", " " + good, "x" * 100_000,
            good.replace("mk_drain_", "mk_read_")]  # another kind than asked: refused before a read too
    for token in junk:
        assert await store.verify(token, "drain") is None, token[:60]
    assert await store.verify(None, "drain") is None
    assert await store.verify(good, "read") is None  # a drain token asked for as a read token
    assert table.reads == []
    assert await store.verify(good, "drain") is not None and len(table.reads) == 1


async def test_a_flood_of_random_well_formed_tokens_does_not_evict_a_good_one(store: TokenStore,
                                                                               table: CountingTable) -> None:
    good, info = await store.create("shop", "drain")
    assert await store.verify(good, "drain") == info
    assert len(table.reads) == 1
    for _ in range(100_000):
        assert await store.verify(well_formed(), "drain") is None
    assert len(table.reads) == 100_001  # one read per unknown token: the store pays, the cache is bounded
    assert len(store._refused) == NEGATIVE_CACHE_ENTRIES
    assert await store.verify(good, "drain") == info
    assert len(table.reads) == 100_001  # still cached: no read for the good token


async def test_refused_tokens_are_cached_briefly_and_live_ones_for_the_ttl(store: TokenStore,
                                                                           table: CountingTable) -> None:
    clock = store.clock
    assert isinstance(clock, ManualClock)
    unknown = well_formed("read")
    for _ in range(3):
        assert await store.verify(unknown, "read") is None
    assert len(table.reads) == 1
    clock.advance(tokens_module.NEGATIVE_TTL_MS + 1)
    assert await store.verify(unknown, "read") is None and len(table.reads) == 2
    good, _ = await store.create("shop", "read")
    for _ in range(3):
        assert await store.verify(good, "read", "shop") is not None
    assert await store.verify(good, "read", "other") is None
    assert len(table.reads) == 3
    clock.advance(tokens_module.POSITIVE_TTL_MS + 1)
    assert await store.verify(good, "read") is not None and len(table.reads) == 4


async def test_the_live_cache_is_a_bounded_lru(store: TokenStore, table: CountingTable,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "CACHE_ENTRIES", 3)
    made = [(await store.create("shop", "write"))[0] for _ in range(4)]
    for tok in made[:3]:
        await store.verify(tok, "write")
    await store.verify(made[0], "write")  # used again: now the most recent
    await store.verify(made[3], "write")  # evicts made[1], the least recently used
    assert len(store._live) == 3 and digest(made[1]) not in store._live and digest(made[0]) in store._live
    reads = len(table.reads)
    await store.verify(made[0], "write")
    assert len(table.reads) == reads


async def test_revoked_token_stops_at_once_here_and_stays_listed_as_gone(store: TokenStore,
                                                                         table: CountingTable) -> None:
    tok, info = await store.create("shop", "read")
    assert await store.verify(tok, "read") is not None
    assert await store.revoke(info.id)
    assert await store.verify(tok, "read") is None
    stored = table.items[digest(tok)]
    assert stored.revoked_s == NOW_MS // 1000  # a tombstone, not a deletion
    assert await store.list("shop") == []
    assert await store.revoke(info.id)  # again: still found (completes a half-failed revocation)
    assert table.items[digest(tok)].revoked_s == NOW_MS // 1000  # the first revocation time is kept
    assert not await store.revoke("000000000000")


# --- M8: revocation across a store migration (two moto DynamoDB tables) ---------------------------------


Stores = tuple[Callable[[str], FollowingTokens], dict[str, DynamoTokens], dict[str, MigrationState]]


@pytest.fixture
async def stores(aws: None) -> AsyncIterator[Stores]:  # noqa: F811
    uid = uuid.uuid4().hex[:8]
    settings = Settings.of(dynamodb_endpoint="", create_table=True, table_name=f"a-{uid}")
    a, b = f"dynamodb:a-{uid}", f"dynamodb:b-{uid}"
    states = {"single_a": MigrationState("single", a), "dual": MigrationState("dual_write", a, b),
              "single_b": MigrationState("single", b, a)}
    at = {spec: settings.replace(table_name=spec.partition(":")[2]) for spec in (a, b)}
    raw = {spec: DynamoTokens(s.storage, s.dynamodb) for spec, s in at.items()}
    for t in raw.values():
        await t.start()
    made: list[FollowingTokens] = []

    def following(phase: str) -> FollowingTokens:
        f = FollowingTokens(settings, lambda: states[phase])
        made.append(f)
        return f

    yield following, {"a": raw[a], "b": raw[b]}, states
    for f in made:
        await f.stop()
    for t in raw.values():
        await t.stop()


async def test_revoke_writes_a_tombstone_to_every_store_of_the_migration(stores: Stores) -> None:
    following, raw, _ = stores
    dual = TokenStore(Settings().web, table=following("dual"))
    await dual.start()
    tok, info = await dual.create("shop", "drain")
    assert (await raw["a"].get_token(digest(tok))) == info == (await raw["b"].get_token(digest(tok)))
    assert await dual.revoke(info.id)
    for t in raw.values():
        got = await t.get_token(digest(tok))
        assert got is not None and got.revoked_s > 0 and got.app == "shop"
    for phase in ("single_a", "dual", "single_b"):  # before, during and after the move
        fresh = TokenStore(Settings().web, table=following(phase))
        assert await fresh.verify(tok, "drain") is None, phase
        assert await fresh.list() == []


async def test_a_tombstone_in_either_store_wins_over_the_live_copy_in_the_other(stores: Stores) -> None:
    following, raw, _ = stores
    # Revoked by a process still in single(A), after `migration start` had copied the live token to B:
    single = TokenStore(Settings().web, table=following("single_a"))
    tok, info = await single.create("shop", "read")
    await raw["b"].put_token(digest(tok), info)  # the copy
    assert await single.revoke(info.id)
    assert (await raw["b"].get_token(digest(tok))) == info  # B missed it
    assert await TokenStore(Settings().web, table=following("dual")).verify(tok, "read") is None
    # The other way round: only the target holds the tombstone (a revocation that failed half-way).
    tok2, info2 = await TokenStore(Settings().web, table=following("dual")).create("shop", "read")
    await raw["b"].put_token(digest(tok2), replace(info2, revoked_s=123))
    assert await TokenStore(Settings().web, table=following("dual")).verify(tok2, "read") is None
    # Revoking again during the migration completes it in every store, so single(B) agrees after finish.
    assert await TokenStore(Settings().web, table=following("dual")).revoke(info.id)
    assert await TokenStore(Settings().web, table=following("single_b")).verify(tok, "read") is None


async def test_a_copy_of_a_live_token_never_undoes_a_tombstone(stores: Stores) -> None:
    """What `migration copy-tokens` does (put_token of the source's rows): a revocation stays."""
    _, raw, _ = stores
    info = TokenInfo("aaaaaaaaaaaa", "shop", "drain", 1_700_000_000)
    await raw["b"].put_token("a" * 64, replace(info, revoked_s=1_700_000_100))
    await raw["b"].put_token("a" * 64, info)
    assert await raw["b"].get_token("a" * 64) == replace(info, revoked_s=1_700_000_100)
    assert await raw["b"].all_tokens() == [("a" * 64, replace(info, revoked_s=1_700_000_100))]
    await raw["b"].put_token("b" * 64, info)  # a live token is still written and overwritten as before
    await raw["b"].put_token("b" * 64, replace(info, app="blog"))
    assert await raw["b"].get_token("b" * 64) == replace(info, app="blog")


async def test_revoke_finds_a_token_only_the_target_holds(stores: Stores) -> None:
    following, raw, _ = stores
    info = TokenInfo(digest("t")[:12], "shop", "write", 1)
    await raw["b"].put_token(digest("t"), info)
    assert await TokenStore(Settings().web, table=following("dual")).revoke(info.id)
    got = await raw["b"].get_token(digest("t"))
    assert got is not None and got.revoked_s > 0


async def test_an_unreachable_target_does_not_stop_verification(stores: Stores,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    following, _raw, states = stores
    f = following("dual")
    tok, info = await TokenStore(Settings().web, table=f).create("shop", "drain")
    target = await f.table(states["dual"].target)

    async def down(key: str) -> Any:
        raise StoreUnavailable("GetItem failed: could not connect", action="check the endpoint")

    monkeypatch.setattr(target, "get_token", down)
    assert await TokenStore(Settings().web, table=f).verify(tok, "drain") == info
    assert "revocations not consulted" in caplog.text


async def test_a_client_guessing_tokens_costs_the_store_nothing_past_its_budget() -> None:
    from app.errors import RetriableError
    from app.storage.tokens import CLIENT

    table = CountingTable()
    clock = ManualClock(1_000)
    from app.ops.stats import Counters

    counters = Counters()
    store = TokenStore(Settings.of(auth_failures_per_s=1.0, auth_failures_burst=5).web, table=table, clock=clock,
                       counters=counters)
    known, _ = await store.create("shop", "drain")
    new, _ = await store.create("blog", "drain")
    shared = CLIENT.set("198.51.100.7")  # a guesser, and Logplex's drains of other apps, behind one address
    try:
        assert await store.verify(known, "drain") is not None  # seen live once
        reads = len(table.reads)
        for _ in range(5):
            assert await store.verify("mk_drain_" + secrets.token_urlsafe(32), "drain") is None
        for _ in range(95):
            with pytest.raises(RetriableError):  # 503 with Retry-After: a sender retries, none drops data
                await store.verify("mk_drain_" + secrets.token_urlsafe(32), "drain")
        assert len(table.reads) - reads == 5  # the burst; the other 95 guesses read nothing
        assert store.failures.refused == counters.values["auth_lookups_refused"] == 95
        clock.advance(60_000)  # the known token's cache entry expired: it is read again, budget or not
        assert await store.verify(known, "drain") is not None
        for _ in range(5):  # the bucket refilled meanwhile (to its burst): the guesser spends it again
            assert await store.verify("mk_drain_" + secrets.token_urlsafe(32), "drain") is None
        with pytest.raises(RetriableError):  # a token never seen live waits until the guessing stops
            await store.verify(new, "drain")
    finally:
        CLIENT.reset(shared)
    other = CLIENT.set("203.0.113.9")  # another address is not held to the guesser's budget
    try:
        assert await store.verify(new, "drain") is not None
    finally:
        CLIENT.reset(other)


def test_the_client_address_behind_proxies() -> None:
    from aiohttp.test_utils import make_mocked_request

    from app.storage.tokens import client_address

    r = make_mocked_request("GET", "/", headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7, 10.0.0.2"})
    assert client_address(r, 1) == "10.0.0.2"  # the one our ingress appended
    assert client_address(r, 2) == "198.51.100.7"
    assert client_address(r, 0) == r.remote  # no proxy trusted: the TCP peer; the header is the client's claim
