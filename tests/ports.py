"""Free TCP ports for servers a test starts (a Ray head, moto's S3 server, a gloo rendezvous).

A port taken with ``bind(("127.0.0.1", 0))`` and closed again comes from the kernel's ephemeral
range, so any process that binds port 0 before our server starts can be handed the same number --
Ray's own gRPC servers and Prometheus exporters bind port 0 while a head starts. CI lost a run that
way: the head's runtime-env agent port went to a Prometheus exporter, and every ``ray job submit``
was answered "HTTP 405 ... use OPTIONS or GET". Ports are therefore drawn at random from *below*
the ephemeral range, where the kernel never hands out a port of its own accord, and each is checked
free on every address (``bind(("", p))`` without SO_REUSEADDR fails if anything holds p).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000                         # above the well-known ports Ray and friends use by default


def ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768                   # Linux's default


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports, currently free on every address, outside the ephemeral range."""
    high = ephemeral_low()
    if high - LOWEST < 1000:
        raise RuntimeError(f"ephemeral port range starts at {high}: no room below it for test servers")
    draw = random.SystemRandom()       # independent of any test's seeded `random`
    ports: list[int] = []
    for _ in range(200 * n):
        p = draw.randrange(LOWEST, high)
        if p not in ports and _is_free(p):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free ports in [{LOWEST}, {high})")


def free_port() -> int:
    return free_ports(1)[0]
