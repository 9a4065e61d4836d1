"""Real servers for integration tests, started once per session on 127.0.0.1.

Each server fixture follows one pattern: use ``$DYN_TEST_<NAME>_URL`` if set (e.g. the CI
starts the servers itself), else start the binary from PATH on free ports in a temp dir and stop
it at session end, else skip. :class:`ServerProcess` and :func:`free_port` are the shared
helpers for that.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

START_TIMEOUT = 20.0
_LISTENING = re.compile(rb"Listening for client connections on (\S+):(\d+)")


def free_ports(count: int) -> list[int]:
    """``count`` distinct, currently free TCP ports on 127.0.0.1 (for servers that cannot bind
    port 0 themselves). Racy by nature (another process may take one before the server binds);
    fine for tests.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))  # all held at once, so they differ
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class ServerProcess:
    """A server subprocess with its log file; :meth:`start` returns once ``ready()`` is true.

    ``url`` is what clients connect to; ``ready`` defaults to ``GET {url}{health_path}`` == 200.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        url: str,
        health_path: str = "/health",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.url = url
        self.ready = http_ok(url + health_path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        # The server gives no readiness signal we could block on: poll its health check.
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate (then kill) the process and reap it. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL and reap (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


# -- etcd -------------------------------------------------------------------------------------


def etcd_server(data_dir: Path) -> ServerProcess:
    """An unstarted single-node etcd on free 127.0.0.1 ports, keeping its data in ``data_dir``.

    It can be stopped and started again on the same ports and data (a restart).
    """
    client_port, peer_port = free_ports(2)
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        "etcd",
        "--name", "test",
        "--data-dir", str(data_dir / "data"),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"test={peer_url}",
        "--logger", "zap",
        "--log-level", "warn",
        # Faster than the defaults (100/1000 ms): quicker start and restart, and leases may
        # be as short as 1 s (etcd's minimum TTL is 1.5 x the election timeout).
        "--heartbeat-interval", "50",
        "--election-timeout", "500",
    ]  # fmt: skip
    return ServerProcess("etcd", argv, data_dir / "etcd.log", url=client_url)


def _need_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not on PATH (and DYN_TEST_ETCD_URL is not set)")


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Client URL of an etcd v3 server shared by the session (``$DYN_TEST_ETCD_URL`` or own).

    Tests sharing it must use their own key prefixes.
    """
    if url := os.environ.get("DYN_TEST_ETCD_URL"):
        yield url
        return
    _need_etcd()
    server = etcd_server(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[ServerProcess]:
    """A started etcd of this test's own, for tests that stop or restart the server."""
    _need_etcd()
    server = etcd_server(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- NATS -------------------------------------------------------------------------------------

class NatsServer:
    """A nats-server subprocess. ``start`` returns once the server logged that it is ready.

    The first start takes a random port (``-p -1``, so no free-port race) read from the log;
    a restart reuses it.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        port = str(self.port) if self.port is not None else "-1"
        argv = ["nats-server", "-a", "127.0.0.1", "-p", port]
        # Unbuffered: a buffered reader could hold the ready line while select() sees nothing.
        self.proc = proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0
        )
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        ready = False
        with selectors.DefaultSelector() as sel, open(self.log_path, "ab") as log:
            sel.register(proc.stderr, selectors.EVENT_READ)
            # The server announces readiness on stderr: block on its output, not on a timer.
            while not ready:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise RuntimeError(f"nats-server not ready after {timeout}s: {self.log()}")
                line = proc.stderr.readline()
                if not line:
                    self.stop()
                    raise RuntimeError(f"nats-server exited ({proc.returncode}): {self.log()}")
                log.write(line)
                log.flush()
                if m := _LISTENING.search(line):
                    self.port = int(m.group(2))
                ready = b"Server is ready" in line
        assert self.port is not None

        def drain() -> None:  # keep reading so the server never blocks on a full pipe
            with open(self.log_path, "ab") as log:
                for line in proc.stderr:  # type: ignore[union-attr]
                    log.write(line)

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def stop(self) -> None:
        """Terminate (then kill) the server, reap it and close its pipe. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._drain is not None:
            self._drain.join(5)
            self._drain = None
        if proc.stderr is not None:
            proc.stderr.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"


def need_nats() -> None:
    if shutil.which("nats-server") is None:
        pytest.skip("nats-server is not on PATH (and DYN_TEST_NATS_URL is not set)")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a NATS server shared by the session (``$DYN_TEST_NATS_URL`` or own).

    Tests sharing it must use their own subjects.
    """
    if url := os.environ.get("DYN_TEST_NATS_URL"):
        yield url
        return
    need_nats()
    server = NatsServer(tmp_path_factory.mktemp("nats") / "nats.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()




@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A started nats-server of this test's own, for tests that stop or restart it."""
    need_nats()
    server = NatsServer(tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
