"""What a hostile webhook target cannot do (app/notify/webhook.py, app/notify/notifier.py): reach a non-public
address through an IPv4-embedding IPv6 form or a non-web port, make a worker hold an unbounded (or
decompressed) answer, or get its URL -- often itself a credential -- into the logs.

The bodies are served by real aiohttp servers on loopback, allowed with an allowlist as in production."""

from __future__ import annotations

import ipaddress
import logging
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.test_utils import TestServer

from app.local.embedded import free_port
from app.notify import webhook
from app.notify.delivery import FAILED, WEBHOOK, Delivery, DeliveryFailed
from app.notify.notifier import Notifier
from app.notify.webhook import (
    MAX_RESPONSE_BYTES,
    ForbiddenTarget,
    PublicOnlyResolver,
    WebhookSender,
    check_address,
    embedded_ipv4,
    is_public,
)
from app.ops.stats import Counters
from app.settings import Settings

SECRET = "whsec_0123456789abcdef"
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]
BIG = 50 * 2**20  # 50 MiB: what the receiver offers, never what we read


def teredo(server: str, client: str) -> str:
    """A Teredo address (2001::/32, server IPv4, flags/port, client IPv4 inverted) for ``client``."""
    s, c = int(ipaddress.IPv4Address(server)), int(ipaddress.IPv4Address(client))
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (s << 64) | (0x8000_0000 << 32) | (~c & 0xFFFFFFFF)))


# --- the address guard ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, public", [
    # public
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("2606:4700::1111", True),
    ("2a00:1450:4001:82a::200e", True),
    ("64:ff9b::808:808", True),          # NAT64 of 8.8.8.8
    ("2002:808:808::1", True),           # 6to4 of 8.8.8.8
    ("::ffff:8.8.8.8", True),
    (teredo("8.8.4.4", "8.8.8.8"), True),
    # IPv4 ranges that are not public
    ("0.0.0.0", False), ("0.1.2.3", False), ("10.0.0.1", False), ("100.64.0.1", False),
    ("127.0.0.1", False), ("169.254.169.254", False), ("172.16.0.1", False), ("172.31.255.255", False),
    ("192.0.0.170", False), ("192.0.2.1", False), ("192.168.1.1", False), ("198.18.0.1", False),
    ("198.19.255.255", False), ("198.51.100.7", False), ("203.0.113.9", False), ("224.0.0.1", False),
    ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False),
    # IPv6 ranges that are not public
    ("::", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("fd12:3456::1", False),
    ("ff02::1", False), ("2001:db8::1", False), ("100::1", False), ("fec0::1", False), ("4000::1", False),
    ("64:ff9b:1::a00:1", False),         # local-use NAT64
    # IPv6 forms embedding a non-public IPv4 address (Python 3.11's is_global calls the first four global)
    ("64:ff9b::a9fe:a9fe", False),       # NAT64 of 169.254.169.254
    ("64:ff9b::a00:1", False),           # NAT64 of 10.0.0.1
    ("2002:a9fe:a9fe::1", False),        # 6to4 of 169.254.169.254
    ("::a9fe:a9fe", False),              # IPv4-compatible 169.254.169.254
    ("::ffff:10.0.0.1", False),          # IPv4-mapped
    ("::ffff:127.0.0.1", False),
    (teredo("8.8.4.4", "10.0.0.1"), False),
    (teredo("10.0.0.1", "8.8.8.8"), False),  # a private Teredo server
])
def test_only_public_addresses_pass_the_guard(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public
    if public:
        check_address(address, [], 443)
    else:
        with pytest.raises(ForbiddenTarget, match="not a public address"):
            check_address(address, [], 443)


def test_embedded_ipv4_forms() -> None:
    def emb(a: str) -> list[str] | None:
        got = embedded_ipv4(ipaddress.IPv6Address(a))
        return None if got is None else [str(v4) for v4 in got]

    assert emb("64:ff9b::a9fe:a9fe") == ["169.254.169.254"]
    assert emb("2002:a9fe:a9fe::1") == ["169.254.169.254"]
    assert emb("::ffff:10.0.0.1") == emb("::10.0.0.1") == ["10.0.0.1"]
    assert emb(teredo("65.54.227.120", "10.0.0.1")) == ["65.54.227.120", "10.0.0.1"]
    # The RFC 4380 example: server 65.54.227.120, client 192.0.2.45 (port 40000).
    assert emb("2001:0:4136:e378:8000:63bf:3fff:fdd2") == ["65.54.227.120", "192.0.2.45"]
    assert emb("2606:4700::1111") is None


def test_allowed_networks_and_ports() -> None:
    check_address("8.8.8.8", [], 80)
    check_address("2606:4700::1111", [], 443)
    for port in (22, 8080, 6379, 9):
        with pytest.raises(ForbiddenTarget, match="ports 80 and 443"):
            check_address("8.8.8.8", [], port)
    # An operator's allowlist opens its networks, on every port (the loopback receivers of the tests).
    check_address("127.0.0.1", LOOPBACK, 9)
    check_address("::ffff:127.0.0.1", LOOPBACK, 9)
    check_address("8.8.8.8", [ipaddress.ip_network("8.8.8.8/32")], 8080)
    with pytest.raises(ForbiddenTarget):
        check_address("10.0.0.1", LOOPBACK, 80)


class FakeResolver:
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host=a, port=port, family=0, proto=0, flags=0)
                for a in self.addresses]

    async def close(self) -> None:
        return None


async def test_the_resolver_drops_non_public_answers_and_checks_the_port() -> None:
    r = PublicOnlyResolver([])
    await r.close()
    r._inner = FakeResolver("64:ff9b::a9fe:a9fe", "93.184.215.14")  # type: ignore[assignment]
    assert [a["host"] for a in await r.resolve("hooks.example.com", 443)] == ["93.184.215.14"]
    with pytest.raises(ForbiddenTarget, match="ports 80 and 443"):
        await r.resolve("hooks.example.com", 8080)
    r._inner = FakeResolver("2002:a9fe:a9fe::1", "::a9fe:a9fe")  # type: ignore[assignment]
    with pytest.raises(ForbiddenTarget, match="not a public address"):
        await r.resolve("hooks.example.com", 443)


@pytest.mark.parametrize("url, why", [
    ("http://[64:ff9b::a9fe:a9fe]/latest/meta-data", "not a public address"),
    ("http://[::ffff:10.0.0.1]/hook", "not a public address"),
    ("http://8.8.8.8:6379/hook", "ports 80 and 443"),
])
async def test_a_literal_target_is_refused_before_connecting(url: str, why: str) -> None:
    sender = WebhookSender(timeout_s=1.0, allowed_networks=[])
    try:
        with pytest.raises(DeliveryFailed, match=why):
            await sender.send(Delivery("x/webhook/0", "x", WEBHOOK, url, "{}", secret=SECRET))
    finally:
        await sender.stop()


# --- bounded answers ------------------------------------------------------------------------------------------

class Hostile:
    """Answers 200 with a body chosen to exhaust memory; counts what it managed to send."""

    def __init__(self) -> None:
        self.sent = 0
        bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
        zeros = bytes(2**20)
        self.bomb = b"".join([*(bomb.compress(zeros) for _ in range(BIG // len(zeros))), bomb.flush()])

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = BIG
        await resp.prepare(request)
        chunk = b"x" * 65536  # generated lazily: one chunk, written again and again
        try:
            while self.sent < BIG:
                await resp.write(chunk)
                self.sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client went away, as it should
        return resp

    async def gzip_bomb(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=self.bomb, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[Hostile, str]]:
    h = Hostile()
    app = web.Application()
    app.router.add_post("/stream", h.stream)
    app.router.add_post("/bomb", h.gzip_bomb)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield h, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.mark.parametrize("path", ["/stream", "/bomb"])
async def test_an_unbounded_answer_is_not_read(hostile: tuple[Hostile, str], path: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    h, base = hostile
    assert len(h.bomb) < BIG // 500 and zlib.decompressobj(31).decompress(h.bomb, 1024) == bytes(1024)
    drained: list[bytes] = []
    real_drain = webhook._drain

    async def spy(resp: Any, limit: int = MAX_RESPONSE_BYTES) -> bytes:
        head = await real_drain(resp, limit)
        drained.append(head)
        return head

    monkeypatch.setattr(webhook, "_drain", spy)
    sender = WebhookSender(timeout_s=10.0, allowed_networks=LOOPBACK)
    await sender.start()
    assert sender._session is not None and sender._session.auto_decompress is False
    tracemalloc.start()
    try:
        await sender.send(Delivery("x/webhook/0", "x", WEBHOOK, f"{base}{path}", "{}", secret=SECRET))  # 200
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await sender.stop()
    assert peak < 8 * 2**20, f"peak {peak} bytes while delivering"
    assert [len(head) for head in drained] == [MAX_RESPONSE_BYTES]
    if path == "/stream":
        assert h.sent < BIG  # the connection was closed, not drained
    else:
        assert drained[0] == h.bomb[:MAX_RESPONSE_BYTES]  # the compressed bytes: nothing was inflated


async def test_a_short_answer_is_read_to_its_end_and_the_connection_reused() -> None:
    peers: list[Any] = []

    async def ok(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))  # the client's port: its connection
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/ok", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    sender = WebhookSender(timeout_s=5.0, allowed_networks=LOOPBACK)
    try:
        for i in range(2):
            await sender.send(Delivery(f"x/webhook/{i}", "x", WEBHOOK, str(server.make_url("/ok")), "{}"))
    finally:
        await sender.stop()
        await server.close()
    assert len(peers) == 2 and peers[0] == peers[1]


# --- no webhook URL in logs -----------------------------------------------------------------------------------

@pytest.fixture
async def refusing() -> AsyncIterator[str]:
    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=410)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gone)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.mark.parametrize("kind", ["refused", "unreachable", "forbidden"])
async def test_failures_log_only_the_targets_origin(refusing: str, kind: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = "/services/T0001/B0002/s3cr3tPathPart?token=s3cr3tQuery"
    base = {"refused": refusing, "unreachable": f"http://127.0.0.1:{free_port()}",
            "forbidden": "http://10.1.2.3:8080"}[kind]
    n = Notifier(Settings.of(notify_timeout_s=2.0, notify_backoff_base_ms=10, notify_backoff_max_ms=20,
                          notify_max_attempts=2, webhook_allowed_networks="127.0.0.0/8").alerting, Counters())
    done: dict[str, Any] = {}
    caplog.set_level(logging.DEBUG)
    n.submit(Delivery("x/webhook/0", "x", WEBHOOK, base + path, "{}", secret=SECRET),
             lambda d, r: done.setdefault(d.id, r))
    await n.join()
    await n.stop()
    result = done["x/webhook/0"]
    assert result.state == FAILED and base in result.error
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("app."))  # not the receiver's
    assert base in logged
    for text in (logged, result.error):
        assert "s3cr3t" not in text and "/services" not in text
