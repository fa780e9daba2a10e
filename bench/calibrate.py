"""How fast this machine is at the two things triage's rates depend on, measured before the
scenarios: running Python, and waking another process (every broker, database and HTTP round
trip does, and so does every GIL handoff between threads). Between two sessions on
2026-11-28 the bare anchor's CPU per ticket doubled while a Python loop got faster
(bench/RESULTS.md, session 21), so a run's absolute rates (3a's ideal, the rate scenario 5
runs at) compare only between runs whose figures here are alike."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

# As `python3 -c "for i in range(10_000_000): pass"`, the loop of earlier notes: at module
# level, where the loop variable is a global (slower than a function's local).
LOOP = compile("for i in range(10_000_000): pass", "<calibrate>", "exec")
# Round trips per trial, and trials: the median trial is reported, since trials a minute apart
# on one machine differed by up to four times.
WAKE_ROUND_TRIPS = 1_000
PING_ROUND_TRIPS = 1_000
TRIALS = 5


def python_loop_seconds() -> float:
    """CPU seconds for ten million iterations of an empty Python loop."""
    began = time.process_time()
    exec(LOOP, {})  # a constant loop, compiled above
    return time.process_time() - began


def wake_round_trip_us() -> tuple[float, float]:
    """A byte to a child process through a pipe and a byte back: this process's CPU and the
    wall time per round trip, in microseconds. Both sides block between bytes, so each round
    trip is two wake-ups of a sleeping process."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: echo every byte, then leave without running the parent's cleanup
        try:
            for _ in range(WAKE_ROUND_TRIPS):
                os.read(to_child_r, 1)
                os.write(to_parent_w, b"y")
        finally:
            os._exit(0)
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(WAKE_ROUND_TRIPS):
            os.write(to_child_w, b"x")
            os.read(to_parent_r, 1)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        os.waitpid(pid, 0)
        for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
            os.close(fd)
    return cpu * 1e6 / WAKE_ROUND_TRIPS, wall * 1e6 / WAKE_ROUND_TRIPS


def redis_ping_us(redis_url: str) -> tuple[float, float]:
    """PING to the broker over a bare socket (no client library): CPU and wall time per round
    trip, in microseconds. What a broker or database round trip costs before any Python."""
    parsed = urlparse(redis_url)
    with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(PING_ROUND_TRIPS):
            sock.sendall(b"PING\r\n")
            if not sock.recv(64).startswith(b"+PONG"):
                raise RuntimeError("the broker did not answer PING with PONG")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu * 1e6 / PING_ROUND_TRIPS, wall * 1e6 / PING_ROUND_TRIPS


def _median_trial(trial: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """The trial with the median CPU time."""
    trials = sorted(trial() for _ in range(TRIALS))
    return trials[len(trials) // 2]


def machine_speed(redis_url: str) -> dict[str, Any]:
    wake_cpu, wake_wall = _median_trial(wake_round_trip_us)
    ping_cpu, ping_wall = _median_trial(lambda: redis_ping_us(redis_url))
    return {
        "python_loop_seconds": round(python_loop_seconds(), 3),
        "wake_round_trip_cpu_us": round(wake_cpu, 1),
        "wake_round_trip_wall_us": round(wake_wall, 1),
        "redis_ping_cpu_us": round(ping_cpu, 1),
        "redis_ping_wall_us": round(ping_wall, 1),
    }
