"""Ports picked for servers that another process binds later (`make run`'s Redis, test stacks)."""

from __future__ import annotations

import socket

from triage import embedded
from triage.embedded import free_port


def test_a_port_comes_from_below_the_ephemeral_range_and_can_be_bound():
    low = embedded._ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert embedded._PORTS_FROM <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    held = []
    try:
        # Hold most of a narrowed range: the picker must step around the held ports.
        for port in range(embedded._PORTS_FROM, embedded._PORTS_FROM + 150):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        taken = {s.getsockname()[1] for s in held}
        monkeypatch.setattr(embedded, "_ephemeral_low", lambda: embedded._PORTS_FROM + 160)
        picked = {free_port() for _ in range(30)}
        assert not picked & taken
        assert all(p < embedded._PORTS_FROM + 160 for p in picked)
    finally:
        for sock in held:
            sock.close()
