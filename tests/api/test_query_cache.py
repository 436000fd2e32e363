"""The byte-bounded LRU the query caches share (app/api/query/cache.py)."""

from __future__ import annotations

from app.api.query.cache import ByteLRU


def test_byte_lru_evicts_least_recently_used_and_expires() -> None:
    lru: ByteLRU[str, int] = ByteLRU(100)
    lru.put("a", 1, 40, 1000)
    lru.put("b", 2, 40, 1000)
    assert lru.get("a", 0) == 1  # a is now the most recent
    lru.put("c", 3, 40, 1000)
    assert lru.get("b", 0) is None and lru.get("a", 0) == 1 and lru.bytes == 80
    assert lru.get("a", 1000) is None and lru.bytes == 40
    lru.put("huge", 4, 101, 1000)
    assert lru.get("huge", 0) is None


def test_byte_lru_pops_what_a_predicate_matches_and_frees_its_bytes() -> None:
    lru: ByteLRU[tuple[str, int], int] = ByteLRU(1000)
    for app, n in (("shop", 1), ("shop", 2), ("blog", 1)):
        lru.put((app, n), n, 100, 1000)
    assert lru.pop_where(lambda k: k[0] == "shop") == 2
    assert len(lru) == 1 and lru.bytes == 100 and lru.get(("blog", 1), 0) == 1
