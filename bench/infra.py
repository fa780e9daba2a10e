"""The services one bench run owns: a PostgreSQL database of its own, a leased Redis database,
the fake Messages API, `triage serve` and `triage worker` processes (and the anchor's bare
Celery workers). Everything runs out of the measuring process, so no thread of a server steals
the GIL from the clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import create_engine, text

from triage.config import PROJECT_ROOT
from triage.embedded import free_port

PG_ADMIN_URL = os.environ.get(
    "TRIAGE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_ADMIN_URL = os.environ.get("TRIAGE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Base64 of 32 bytes: a Standard Webhooks secret for the generic source.
WEBHOOK_SECRET = "whsec_dHJpYWdlLWJlbmNoLXNlY3JldC0wMTIzNDU2Nzg5YWI="
# Redis database indexes tried for the lease, 14 first; the test suite leases from 1 upwards.
LEASE_ORDER = (14, 13, 12, 11, 10, 15)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc (Linux); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def server_cpu_seconds(pid: int) -> float:
    """CPU time of a forking server (the PostgreSQL postmaster): its own, its children's that
    have exited (which the kernel adds to the parent once it reaps them) and its live
    children's. A connection's backend that comes and goes within a scenario counts too."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / _TICKS
    children = [c for c in with_children(pid) if c != pid]
    return own + sum(cpu_seconds(c) for c in children)


@contextmanager
def queue_aside(redis_url: str, queue: str) -> Iterator[None]:
    """Keep the messages waiting on `queue` out of the workers' reach meanwhile (the
    broker's list, renamed and back). First waits for publishing to end: triage's API
    batching thread sends the last accepted tickets a moment after their 202s."""
    client = redis.Redis.from_url(redis_url)
    aside = f"bench.aside.{queue}"
    wait_until(_steady(lambda: client.llen(queue)), 30, f"{queue} no longer growing")
    moved = bool(client.exists(queue))
    if moved:
        client.rename(queue, aside)
    try:
        yield
    finally:
        if moved and not client.renamenx(aside, queue):
            # Published meanwhile: the older messages go back to the consuming end
            # (workers pop from the right), in their order.
            while client.lmove(aside, queue, "LEFT", "RIGHT") is not None:
                pass
        client.close()


def _steady(read: Callable[[], Any], seconds: float = 0.6) -> Callable[[], bool]:
    """A condition for `wait_until`: `read()` has returned the same value for `seconds`."""
    seen: Any = object()
    since = time.monotonic()

    def check() -> bool:
        nonlocal seen, since
        value = read()
        if value != seen:
            seen, since = value, time.monotonic()
            return False
        return time.monotonic() - since >= seconds

    return check


@dataclass
class FakeWatch:
    """What a drain saw of the fake Messages API and the workers, one `look` at a time: when
    the first call came, the calls in flight, each worker's peak memory."""

    first_call: float | None = None
    in_flight: list[int] = field(default_factory=list)
    rss: dict[int, float] = field(default_factory=dict)

    def look(self, fake: FakeApi, pids: list[int]) -> None:
        stats = fake.stats()
        if self.first_call is None and stats["calls"] > 0:
            self.first_call = time.time()
        if stats["in_flight"]:
            self.in_flight.append(int(stats["in_flight"]))
        for pid in pids:
            self.rss[pid] = max(self.rss.get(pid, 0.0), rss_mib(pid))

    def mean_in_flight(self) -> float:
        """Over the looks while the queue was still full: the ramp-down at the end (the
        last fifth of the looks) is not steady state."""
        steady = self.in_flight[: max(1, int(len(self.in_flight) * 0.8))]
        return round(sum(steady) / len(steady), 1) if steady else 0.0


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop(). On a shared, noisy
    machine this is steadier than wall-clock rates: other work does not inflate it. `totals`
    are groups measured by a running total instead (a forking server)."""

    def __init__(
        self,
        pids: Callable[[], dict[str, list[int]]],
        totals: dict[str, Callable[[], float]] | None = None,
    ) -> None:
        self._pids = pids
        self._totals = totals or {}
        self._before: dict[int, float] = {}
        self._totals_before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {p: cpu_seconds(p) for ps in self._pids().values() for p in ps}
        self._totals_before = {group: total() for group, total in self._totals.items()}

    def stop(self) -> dict[str, float]:
        used = {
            group: sum(cpu_seconds(p) - self._before.get(p, 0.0) for p in ps)
            for group, ps in self._pids().items()
        }
        for group, total in self._totals.items():
            used[group] = total() - self._totals_before[group]
        return {group: round(seconds, 2) for group, seconds in used.items()}


class BenchDatabase:
    """A PostgreSQL database created, migrated and dropped by this run."""

    def __init__(self, admin_url: str = PG_ADMIN_URL) -> None:
        self.name = f"triage_bench_{uuid.uuid4().hex[:10]}"
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"

    def __enter__(self) -> BenchDatabase:
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        from triage.db.migrate import upgrade

        upgrade(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()


class RedisLease:
    """One numbered Redis database for this run, held through the same lock keys the test
    suite uses (`triage:test-lease:<db>` in db 0), flushed on entry and exit."""

    TTL = 3600

    def __init__(self, admin_url: str = REDIS_ADMIN_URL) -> None:
        self._admin = redis.Redis.from_url(admin_url)
        self._base = admin_url.rsplit("/", 1)[0]
        self._key: str | None = None
        self.url = ""

    def __enter__(self) -> RedisLease:
        for db in LEASE_ORDER:
            key = f"triage:test-lease:{db}"
            if self._admin.set(key, f"bench:{os.getpid()}", nx=True, ex=self.TTL):
                self._key, self.url = key, f"{self._base}/{db}"
                redis.Redis.from_url(self.url).flushdb()
                return self
        raise RuntimeError(f"no free Redis database among {LEASE_ORDER} (triage:test-lease:*)")

    def __exit__(self, *exc: object) -> None:
        if self._key:
            redis.Redis.from_url(self.url).flushdb()
            self._admin.delete(self._key)
        self._admin.close()


class Proc:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.metrics_port: int | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"triage-bench-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_log(self, marker: bytes, timeout: float = 60) -> None:
        try:
            wait_until(
                lambda: marker in self.log_path.read_bytes() or not self.alive(),
                timeout,
                f"{self.name}: {marker.decode()}",
            )
        except TimeoutError:
            self.stop()
            raise
        if not self.alive():
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class FakeApi:
    """tests.fakeanthropic in its own process, steered over its /_control routes."""

    def __init__(self, env: dict[str, str]) -> None:
        args = [sys.executable, "-m", "tests.fakeanthropic", "--port", "0", "--no-record"]
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=PROJECT_ROOT
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().decode().strip()
        if not self.base_url.startswith("http"):
            self.stop()
            raise RuntimeError("the fake Messages API did not start")
        self._http = httpx.Client(base_url=self.base_url, timeout=10)

    def set_latency(self, latency: float | tuple[float, float]) -> None:
        value: Any = list(latency) if isinstance(latency, tuple) else latency
        self._http.post("/_control/latency", json={"latency": value}).raise_for_status()

    def reset(self) -> None:
        self._http.post("/_control/reset", json={}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._http.get("/_control/stats").json()
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def triage_env(db_url: str, redis_url: str, fake_url: str, **overrides: str) -> dict[str, str]:
    """Environment for triage processes: loopback services, the fake API, bench secrets."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIAGE_", "ANTHROPIC_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        TRIAGE_WEBHOOK_SECRET_GENERIC=WEBHOOK_SECRET,
        TRIAGE_BACKEND="anthropic",
        ANTHROPIC_API_KEY="sk-bench",
        ANTHROPIC_BASE_URL=fake_url,
        TRIAGE_API_TIMEOUT_SECONDS="30",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def with_children(pid: int) -> list[int]:
    """A process and its descendants (uvicorn --workers forks its workers), from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return found


def start_serve(env: dict[str, str], workers: int = 1) -> tuple[Proc, str]:
    port = free_port()
    args = [sys.executable, "-m", "triage.cli.main", "serve", "--port", str(port)]
    args += ["--workers", str(workers)]
    proc = Proc("serve", args, env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if not proc.alive():
            raise RuntimeError(f"triage serve exited:\n{proc.log_tail()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "triage serve /healthz", every=0.2)
    return proc, url


def start_triage_workers(env: dict[str, str], processes: int, concurrency: int) -> list[Proc]:
    """The fleet; each worker serves its Prometheus metrics on its own port
    (`Proc.metrics_port`)."""
    args = [sys.executable, "-m", "triage.cli.main", "worker", "-c", str(concurrency)]
    workers = []
    for i in range(processes):
        port = free_port()
        worker = Proc(f"worker{i}", args, {**env, "TRIAGE_WORKER_METRICS_PORT": str(port)})
        worker.metrics_port = port
        workers.append(worker)
    try:
        for worker in workers:
            worker.wait_log(b" ready.", timeout=90)
    except BaseException:
        # The ones that did start would go on consuming the bench's queues after it exits.
        stop_all(workers)
        raise
    return workers


def stop_all(procs: list[Proc]) -> None:
    for proc in procs:
        if proc.alive():
            proc.proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.stop()


def machine() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "load_average_at_start": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


def dump_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
