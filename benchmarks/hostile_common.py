"""Shared parts of the hostile-peer benchmark (``bench_hostile.py``) and its attack modules.

An attack module ``benchmarks/hostile_<name>.py`` defines ``ATTACKS``: a dict from attack
name to an async context manager factory taking a :class:`Target`. While the ``async
with`` body runs, the attack goes on against the target; it stops cleanly on exit.
Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio

__all__ = [
    "Attack",
    "Target",
    "attacker_host",
    "cpu_seconds",
    "open_fds",
    "percentile",
    "rss_bytes",
]

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Target:
    """The victim of an attack.

    ``addr``: its full multiaddr, ending in ``/p2p/<id>``; ``peer_id``: its id;
    ``capability``: a capability it serves (an echo that streams 8 chunks); ``pid``: its
    process id (for RSS sampling); ``bootstrap``: the same as ``addr`` (the victim is also
    the bootstrap peer, a DHT server and a relay).
    """

    addr: str
    peer_id: str
    capability: str
    pid: int
    bootstrap: str


#: An attack: while the ``async with`` body runs, the attack is going on against the target.
Attack = Callable[[Target], AbstractAsyncContextManager[None]]


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid``, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def open_fds(pid: int) -> int:
    """Open file descriptors of process ``pid`` (0 if they cannot be counted)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by the nearest-rank method; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@asynccontextmanager
async def attacker_host(target: Target) -> AsyncIterator[object]:
    """A bare libp2p host with a fresh identity, connected to ``target`` (a ``libp2p`` IHost)."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from modelnet_p2p.p2p.host import build_host, running_host
    from modelnet_p2p.p2p.identity import Identity

    host = build_host(Identity.generate())
    async with running_host(host, []):
        with trio.fail_after(10):
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(target.addr)))
        yield host
