"""The embedded stack: Apache Kafka (single-node KRaft), dynalite (or moto's server) and Apache Cassandra.

Process managers for ``python -m app local``, the integration tests and the benchmarks, called from
synchronous orchestration, never from inside the event loop; each keeps its data where the caller says.
Reference: docs/operations/embedded-stack.md
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

from app.errors import ConfigError, RetriableError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = Path(__file__).resolve().parent / "conf"
KAFKA_LIB = ROOT / ".deps" / "kafka" / "lib"
CASSANDRA_LIB = ROOT / ".deps" / "cassandra" / "lib"
DYNALITE_CLI = ROOT / ".deps" / "dynalite" / "node_modules" / "dynalite" / "cli.js"
LOCAL_DATA_DIR = ROOT / "data"
"""``make run``'s state: Kafka's log, dynalite's LevelDB and the worker's RocksDB. ``make clean`` empties it."""

KAFKA_START_S = 90.0
"""JVM start, log recovery after an unclean stop, and the controller's election; seconds on an idle machine."""
CASSANDRA_START_S = 120.0
"""Measured 8 s on an idle 2-core machine (first start, empty data); commit log replay adds to it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_holder(port: int) -> str | None:
    """``pid 123 (java ...)`` of the process listening on ``port``, when this user may see it (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(cols[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {proc.name} ({cmd[:80]})"
        except OSError:
            continue
    return None


def require_free_port(port: int, what: str, variable: str) -> None:
    """ConfigError naming the port, its holder when knowable, and the variable that moves it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return
        except OSError:
            pass
    holder = port_holder(port)
    raise ConfigError(f"port {port} ({what}) is already in use" + (f" by {holder}" if holder else ""),
                      action=f"stop that process (an earlier `make run`?), or set {variable} to a free port")


def _wait_tcp(port: int, timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RetriableError(f"{what} exited with code {proc.returncode} during start",
                                 action="see its log; is the port free?")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RetriableError(f"{what} did not listen on port {port} within {timeout_s:.0f} s",
                         action="check the machine's load and the process log")


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = (shutil.which("java", path=os.path.join(home, "bin")) if home else None) or shutil.which("java")
    if java is None:
        raise ConfigError("java not found", action="install Java 17 (Debian openjdk-17-jre-headless)")
    return java


class _JavaService:
    """What the JVM parts share: a child process writing to a log, started when a line says so, stopped
    with SIGTERM (the part flushes) or killed with SIGKILL (tests of crashes)."""

    kind: ClassVar[str]
    log_name: ClassVar[str]
    """The part's log, relative to its data directory."""
    data_dir: Path
    port: int
    _proc: subprocess.Popen[bytes] | None
    _log: IO[bytes] | None
    stop_timeout_s: ClassVar[float] = 30.0

    @property
    def log_path(self) -> Path:
        return self.data_dir / self.log_name

    def _wait_for(self, marker: bytes, offset: int, timeout_s: float) -> None:
        """Until ``marker`` appears in the log after ``offset``, then until the port accepts connections."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RetriableError(f"{self.kind} exited with code {self._proc.returncode} during start: "
                                     f"{self._tail(offset)}", action=f"see {self.log_path}")
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                if marker in f.read():
                    _wait_tcp(self.port, 10, self._proc, self.kind)
                    return
            time.sleep(0.1)
        raise RetriableError(f"{self.kind} did not start within {timeout_s:.0f} s",
                             action=f"see {self.log_path}; check the machine's load")

    def _tail(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").strip().splitlines()
        errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("ERROR") or "Exception" in ln]
        return " | ".join((errors or lines)[-3:])[-600:]

    def stop(self) -> None:
        """Controlled shutdown (SIGTERM): the part flushes and closes its files."""
        _stop(self._proc, self.stop_timeout_s)
        self._closed()

    def kill(self) -> None:
        """SIGKILL, as a crashed machine's process would die; the data directory stays."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=30)
        self._closed()

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets and answers nothing, as a hung or cut-off node does (tests
        of outages); :meth:`thaw` resumes it."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def _closed(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True)
class Listener:
    """One client listener of the broker: ``name`` is also its security protocol unless ``protocol`` says."""

    name: str
    port: int
    protocol: str = ""

    @property
    def security_protocol(self) -> str:
        return self.protocol or self.name


@dataclass
class KafkaBroker(_JavaService):
    """Apache Kafka as one combined broker+controller (KRaft), on the jars ``make install`` put in ``.deps``.

    The storage directory is formatted once (``kafka.tools.StorageTool``) and reused: topics, offsets and
    data survive a restart, and a SIGKILL leaves what the broker acknowledged (``kill`` is for tests).
    ``listeners`` adds TLS/SASL listeners (``properties`` carries their key stores and JAAS settings);
    ``scram_users`` are created at format time, as SCRAM credentials must exist before the first start.
    """

    data_dir: Path
    port: int = 0
    controller_port: int = 0
    listeners: list[Listener] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    scram_users: dict[str, str] = field(default_factory=dict)
    heap_mb: int = 512
    lib_dir: Path = KAFKA_LIB
    kind: ClassVar[str] = "Apache Kafka"
    log_name: ClassVar[str] = "broker.log"
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.address}"


    @property
    def version(self) -> str:
        for jar in self.lib_dir.glob("kafka_2.13-*.jar"):
            m = re.fullmatch(r"kafka_2\.13-(.+)\.jar", jar.name)
            if m:
                return m.group(1)
        return "unknown"

    def _classpath(self) -> str:
        if not any(self.lib_dir.glob("kafka_2.13-*.jar")):
            raise ConfigError(f"Apache Kafka's jars are not in {self.lib_dir}",
                              action="run `make install` (resolves org.apache.kafka:kafka_2.13 from Maven Central)")
        return f"{self.lib_dir}/*"

    def _server_properties(self) -> Path:
        listeners = [Listener("PLAINTEXT", self.port), *self.listeners]
        protocol_map = [f"{lst.name}:{lst.security_protocol}" for lst in listeners] + ["CONTROLLER:PLAINTEXT"]
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": ",".join([f"{lst.name}://127.0.0.1:{lst.port}" for lst in listeners]
                                  + [f"CONTROLLER://127.0.0.1:{self.controller_port}"]),
            "advertised.listeners": ",".join(f"{lst.name}://127.0.0.1:{lst.port}" for lst in listeners),
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(protocol_map),
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            # A worker joining an empty group starts at once instead of waiting 3 s for others.
            "group.initial.rebalance.delay.ms": "0",
            # Faust's default session timeout is below the broker's 6 s minimum in dev and tests.
            "group.min.session.timeout.ms": "1000",
            # After a SIGKILL the controller waits for the dead incarnation's session to lapse before the
            # restarted broker may register: 9 s by default, 3 s here.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            **self.properties,
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _format(self, java: str, config: Path) -> None:
        """Format the storage once; a formatted directory keeps its cluster id and data."""
        if (self.data_dir / "logs" / "meta.properties").exists():
            return
        cluster_id = uuid.uuid4().hex[:22]
        cmd = [java, "-cp", self._classpath(), "kafka.tools.StorageTool", "format", "-t", cluster_id,
               "-c", str(config), "--ignore-formatted"]
        for user, password in self.scram_users.items():
            cmd += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise ConfigError(f"formatting Kafka's storage in {self.data_dir} failed: "
                              f"{(out.stderr or out.stdout).strip()[-500:]}",
                              action="remove the directory (make clean) or check its permissions")

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        java = _java()
        config = self._server_properties()
        self._format(java, config)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the broker's stdout for its lifetime
        start_offset = self.log_path.stat().st_size
        self._proc = subprocess.Popen(
            [java, f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", "-XX:+UseG1GC",
             "-XX:TieredStopAtLevel=1", "-Xshare:auto", "-Djava.awt.headless=true",
             f"-Dkafka.logs.dir={self.data_dir}",
             f"-Dlog4j2.configurationFile={CONF_DIR / 'kafka-log4j2.properties'}",
             "-cp", self._classpath(), "kafka.Kafka", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_started(start_offset)
        except BaseException:
            self.kill()  # a broker that did not come up must not outlive the caller
            raise
        log.info("Apache Kafka %s listening on %s (data in %s)", self.version, self.address, self.data_dir)
        return self.url

    def _wait_started(self, offset: int) -> None:
        self._wait_for(b"Kafka Server started", offset, KAFKA_START_S)


@dataclass
class CassandraServer(_JavaService):
    """Apache Cassandra 5.0 as one local node (``CassandraDaemon`` in the foreground), on the jars
    ``make install-cassandra`` put in ``.deps``, with its data, commit log and log under ``data_dir``.

    The node's ``cassandra.yaml`` is written from the template in ``conf/`` with this instance's ports, so
    tests run nodes next to each other. Ready when CQL answers on ``port``.
    """

    data_dir: Path
    port: int = 0
    storage_port: int = 0
    heap_mb: int = 1024
    lib_dir: Path = CASSANDRA_LIB
    kind: ClassVar[str] = "Apache Cassandra"
    log_name: ClassVar[str] = "log/system.log"
    stop_timeout_s: ClassVar[float] = 60.0
    """SIGTERM drains the node and flushes its memtables first."""
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.port = self.port or free_port()
        self.storage_port = self.storage_port or free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


    @property
    def version(self) -> str:
        for jar in self.lib_dir.glob("cassandra-all-*.jar"):
            m = re.fullmatch(r"cassandra-all-(.+)\.jar", jar.name)
            if m:
                return m.group(1)
        return "unknown"

    def _jamm(self) -> Path:
        jars = sorted(self.lib_dir.glob("jamm-*.jar"))
        if not any(self.lib_dir.glob("cassandra-all-*.jar")) or not jars:
            raise ConfigError(f"Apache Cassandra's jars are not in {self.lib_dir}",
                              action="run `make install-cassandra` (resolves org.apache.cassandra:cassandra-all "
                                     "from Maven Central)")
        return jars[-1]

    def _config(self) -> Path:
        text = (CONF_DIR / "cassandra.yaml").read_text()
        text = text.replace("native_transport_port: 9042", f"native_transport_port: {self.port}")
        text = text.replace("storage_port: 7000", f"storage_port: {self.storage_port}")
        text = text.replace('seeds: "127.0.0.1:7000"', f'seeds: "127.0.0.1:{self.storage_port}"')
        path = self.data_dir / "cassandra.yaml"
        path.write_text(text)
        return path

    def start(self) -> str:
        (self.data_dir / "log").mkdir(parents=True, exist_ok=True)
        java = _java()
        jamm = self._jamm()
        config = self._config()
        self.log_path.touch()
        start_offset = self.log_path.stat().st_size
        self._log = open(self.data_dir / "stdout.log", "ab")  # noqa: SIM115 - its stdout for its lifetime
        self._proc = subprocess.Popen(
            [java, f"-Xms{min(512, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", "-XX:+UseG1GC",
             f"-javaagent:{jamm}", f"@{CONF_DIR / 'cassandra-jvm17.args'}",
             "-Djava.net.preferIPv4Stack=true", "-Dcassandra-foreground=yes",
             f"-Dcassandra.config=file://{config}", f"-Dcassandra.storagedir={self.data_dir}",
             f"-Dcassandra.logdir={self.data_dir / 'log'}",
             f"-Dlogback.configurationFile={CONF_DIR / 'cassandra-logback.xml'}",
             "-Dcassandra.skip_wait_for_gossip_to_settle=0",
             "-cp", f"{CONF_DIR}:{self.lib_dir}/*", "org.apache.cassandra.service.CassandraDaemon"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_started(start_offset)
        except BaseException:
            self.kill()  # a node that did not come up must not outlive the caller
            raise
        log.info("Apache Cassandra %s serving CQL on %s (data in %s)", self.version, self.address, self.data_dir)
        return self.address

    def _wait_started(self, offset: int) -> None:
        self._wait_for(b"Startup complete", offset, CASSANDRA_START_S)


@dataclass
class DynamoServer:
    """A DynamoDB-compatible server: dynalite (default; LevelDB under ``data_dir``, in memory without it),
    or moto's server (``kind="moto"``, in memory), so emulator-specific behaviour shows in tests."""

    port: int = 0
    data_dir: Path | None = None
    kind: str = "dynalite"
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def version(self) -> str:
        if self.kind != "dynalite":
            return ""
        m = re.search(rb'"version"\s*:\s*"([^"]+)"', (DYNALITE_CLI.parent / "package.json").read_bytes())
        return m.group(1).decode() if m else "unknown"

    def _command(self) -> list[str]:
        if self.kind == "moto":
            moto = Path(sys.executable).parent / "moto_server"
            if not moto.exists():
                raise ConfigError("moto_server is not installed", action="run `make install`")
            return [str(moto), "-H", "127.0.0.1", "-p", str(self.port)]
        node = shutil.which("node")
        if node is None or not DYNALITE_CLI.is_file():
            raise ConfigError(f"dynalite is not installed (node={node}, {DYNALITE_CLI})",
                              action="run `make install` (Node.js 20 and npm package dynalite)")
        cmd = [node, str(DYNALITE_CLI), "--host", "127.0.0.1", "--port", str(self.port),
               "--createTableMs", "0", "--deleteTableMs", "0", "--updateTableMs", "0"]
        if self.data_dir is not None:
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            cmd += ["--path", str(Path(self.data_dir).resolve())]
        return cmd

    def start(self) -> str:
        self._proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL)
        _wait_tcp(self.port, 60, self._proc, self.kind)
        self._wait_http(30)
        log.info("%s listening on %s", self.kind, self.endpoint)
        return self.endpoint

    def _wait_http(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.endpoint, timeout=1):  # closed: it holds a socket
                    return
            except urllib.error.HTTPError as exc:
                exc.close()
                return  # any HTTP status means the server answers
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RetriableError(f"{self.kind} did not answer HTTP within {timeout_s:.0f} s",
                             action="check the machine's load")

    def stop(self) -> None:
        _stop(self._proc, timeout_s=10)
        self._proc = None
