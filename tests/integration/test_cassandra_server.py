"""The embedded Apache Cassandra node (app/local/embedded.py): it starts from the jars Maven Central gave
``make install-test``, serves CQL (spoken here in the native protocol v4, no driver), keeps its data across
a restart, and refuses to start without its jars. The store backend on it is issue 12's."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.local.embedded import CassandraServer

pytestmark = pytest.mark.integration

OPTIONS, STARTUP, READY, QUERY, RESULT, SUPPORTED, ERROR = 0x05, 0x01, 0x02, 0x07, 0x08, 0x06, 0x00


def _frame(stream: int, opcode: int, body: bytes) -> bytes:
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body


def _string(s: str) -> bytes:
    return struct.pack(">H", len(s)) + s.encode()


def _long_string(s: str) -> bytes:
    return struct.pack(">i", len(s)) + s.encode()


def _read(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 9:
        head += sock.recv(9 - len(head))
    version, _, _, opcode, length = struct.unpack(">BBhBi", head)
    assert version == 0x84, version
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return opcode, body


def cql(port: int, statement: str) -> bytes:
    """OPTIONS, STARTUP, then one QUERY at consistency ONE; returns the RESULT body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_frame(1, OPTIONS, b""))
        opcode, body = _read(sock)
        assert opcode == SUPPORTED and b"CQL_VERSION" in body
        sock.sendall(_frame(2, STARTUP, struct.pack(">H", 1) + _string("CQL_VERSION") + _string("3.0.0")))
        assert _read(sock)[0] == READY
        sock.sendall(_frame(3, QUERY, _long_string(statement) + struct.pack(">HB", 0x0001, 0)))
        opcode, body = _read(sock)
        assert opcode == RESULT, body
        return body


def test_the_node_serves_cql_and_keeps_its_data_across_a_restart(tmp_path: Path) -> None:
    node = CassandraServer(data_dir=tmp_path / "cassandra")
    node.start()
    try:
        assert node.version.startswith("5.0.")
        assert node.version.encode() in cql(node.port, "SELECT release_version FROM system.local")
        cql(node.port, "CREATE KEYSPACE k WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
        cql(node.port, "CREATE TABLE k.t (pk text, ts bigint, d blob, PRIMARY KEY (pk, ts))")
        cql(node.port, "INSERT INTO k.t (pk, ts, d) VALUES ('shop#web#60', 1764000000, 0xcafe)")
        node.stop()
        node.start()
        assert b"\xca\xfe" in cql(node.port, "SELECT d FROM k.t WHERE pk = 'shop#web#60'")
    finally:
        node.stop()


def test_without_its_jars_it_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make install-cassandra"):
        CassandraServer(data_dir=tmp_path, lib_dir=tmp_path / "nothing").start()
