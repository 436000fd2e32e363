"""Every line kind the drain parser reads, with every field growable: what a tenant can send to make a parse
slow. Shared by the property test (tests/ingest/test_linear_parsing.py) and the benchmark
(tests/bench/bench_parse.py).

Each template has ``@`` where a field's value goes; a filler grows it to any size. The fillers are the shapes
that make backtracking patterns go quadratic: long digit runs (``\\d+\\.?\\d*``), long key-like runs with no
``=``, repeated ``k="`` with no closing quote, repeated separators.
"""

from __future__ import annotations

from collections.abc import Callable

TS = b"2023-11-14T22:13:20.123456+00:00"


def _syslog(app: bytes, proc: bytes, text: bytes, pri: bytes = b"158") -> bytes:
    return b"<" + pri + b">1 " + TS + b" host " + app + b" " + proc + b" - " + text


ROUTER = (b"at=info method=GET path=\"/p\" host=h.example.com request_id=r fwd=\"1.2.3.4\" dyno=web.1 "
          b"connect=1ms service=20ms status=200 bytes=415 protocol=https")
ROUTER_ERROR = (b"sock=client at=error code=H12 desc=\"Request timeout\" method=GET path=\"/\" host=h request_id=r "
                b"fwd=\"1.2.3.4\" dyno= connect= service= status=503 bytes= protocol=https")
RUNTIME = (b"source=web.1 dyno=heroku.1.d97d0ea7 sample#memory_total=21.00MB sample#memory_rss=21.22MB "
           b"sample#memory_swap=0.00MB sample#memory_quota=512.00MB sample#load_avg_1m=2.46")
ADDON = (b"source=DATABASE addon=postgresql-1 sample#current_transaction=1873 sample#db_size=4.5MB "
         b"sample#memory-total=15.05kB sample#read-iops=0.5")
L2MET = b"count#orders=1 measure#db.query=12.5ms sample#queue.depth=3 source=us-east"


def _fields(text: bytes) -> list[tuple[str, bytes]]:
    """Templates with one field's value replaced by ``@``: every ``k=v`` value, and the key of each."""
    out = []
    parts = text.split(b" ")
    for i, part in enumerate(parts):
        key, eq, value = part.partition(b"=")
        if not eq:
            continue
        name = key.decode()
        for label, repl in ((f"{name} value", key + b"=@"), (f"{name} key", b"@=" + value)):
            out.append((label, b" ".join([*parts[:i], repl, *parts[i + 1:]])))
    out.append(("trailing text", text + b" @"))
    return out


def templates() -> list[tuple[str, str, bytes]]:
    """(family, field, whole syslog line with ``@``) for every family and field."""
    out: list[tuple[str, str, bytes]] = []
    for family, app, proc, text in (
            ("router", b"heroku", b"router", ROUTER),
            ("router error", b"heroku", b"router", ROUTER_ERROR),
            ("runtime", b"heroku", b"web.1", RUNTIME),
            ("add-on", b"app", b"heroku-postgres", ADDON),
            ("l2met", b"app", b"web.1", L2MET)):
        out += [(family, field, _syslog(app, proc, t)) for field, t in _fields(text)]
        out.append((family, "process id", _syslog(app, b"@", text)))
    for family, text in (("dyno event", b"State changed from up to @"), ("dyno event", b"Error R14 @"),
                         ("dyno event", b"Process exited with status @")):
        out.append((family, "text", _syslog(b"heroku", b"web.1", text)))
        out.append((family, "process id", _syslog(b"heroku", b"@", text)))
    for text in (b"Release v@ created by user dev@example.com", b"Deploy @ by user dev@example.com",
                 b"Scaled to @ by user ops@example.com", b"Scaled to web@1:Standard-1X @"):
        out.append(("api event", "text", _syslog(b"app", b"api", text)))
    out.append(("syslog header", "hostname", b"<158>1 " + TS + b" @ heroku router - " + ROUTER))
    return out


FILLERS: dict[str, Callable[[int], bytes]] = {
    "digits": lambda n: b"1" * (n - 1) + b"!",
    "digits.dots": lambda n: (b"1." * (n // 2))[:n],
    "letters": lambda n: b"a" * n,
    "k=": lambda n: (b"a=" * (n // 2))[:n],
    "k=\"": lambda n: (b"a=\"" * (n // 3 + 1))[:n],
    "quotes": lambda n: b"\"" * n,
    "hashes": lambda n: (b"count#" * (n // 6 + 1))[:n],
    "web@1": lambda n: (b"web@1," * (n // 6 + 1))[:n],
    "escapes": lambda n: (b"\\\"" * (n // 2 + 1))[:n],
}


def line(template: bytes, filler: str, size: int) -> bytes:
    return template.replace(b"@", FILLERS[filler](size), 1)
