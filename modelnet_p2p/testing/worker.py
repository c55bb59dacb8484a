"""A process that runs K peers on 127.0.0.1, driven by JSON lines on stdin and stdout.

One Python process runs out of CPU long before a large mesh does (py-libp2p gossip saturates a
core at about 15-20 peers that all publish every 2 s), so meshes of tens or hundreds of peers
are spread over several of these processes. The parent side, :func:`~modelnet_p2p.testing.open_worker`,
starts them and speaks the protocol below; run one by hand with::

    python -m modelnet_p2p.testing.worker --peers 10 --dht-mode client --unlinked \\
        --serve '{"*": [{"name": "echo"}], "3": [{"name": "llama3", "tasks": ["chat"]}]}'

Options: ``--peers K`` (0 runs none: a memory baseline); ``--bootstrap ADDR,ADDR...`` (peer ``i``
bootstraps from address ``i mod n``; without it peer ``i > 0`` bootstraps from peer 0 of this
process, and with ``--unlinked`` no peer bootstraps at all: use ``connect``); ``--dht-mode``
(``auto``, ``server`` or ``client``); ``--no-gossip`` (no availability gossip);
``--publish-interval S``; ``--card-ttl S``; ``--listen ADDR`` (each peer's listen multiaddr,
default ``/ip4/127.0.0.1/tcp/0``); ``--announce-interval S``; ``--serve JSON`` (peer
index, or ``"*"`` for every peer, to a list of :class:`~modelnet_p2p.Capability` keyword
arguments; each served capability answers ``"answer from <name>"``); ``--max-seconds S`` (a
hard limit on the run).

Stdout, one JSON object per line:

- at start, one line per peer, ``{"peer": i, "id": ..., "addr": ..., "addrs": [...]}`` (``addr``
  is the first of ``addrs``, with ``/p2p/<id>``), then ``{"ready": true}`` once every peer has
  joined the DHT (at most 30 s);
- exactly one reply per command, in command order: an object without an ``"event"`` key, with
  an ``"error"`` key if the command failed;
- events, at any time: ``{"event": "seen", "seen": ID, "peer": i, "t": T}`` when ``ID`` first
  enters the availability table of local peer ``i`` (after ``watch``). ``T`` is
  ``time.monotonic()``, one clock for every process of a Linux machine.

Commands, one JSON object per stdin line (``"peer": i`` picks a local peer, default 0):

- ``{"cmd": "connect", "links": [[i, addr], ...]}``: peer ``i`` dials ``addr``, all at once;
  ``{"connected": n, "failed": m}``.
- ``{"cmd": "watch", "id": ID, "capability": name}``: ``{"watching": ID, "following": n}``, then
  a ``seen`` event per local peer. With ``capability`` (optional) each local peer first follows
  that capability's availability records (``n``: how many did), and ``seen`` waits for a
  record of ``ID`` that lists the capability. With ``"lookup": true`` as well, each local peer
  follows as routing does: it looks the capability's providers up (``Peer.providers``, which
  follows and connects to providers if no neighbour shares the topic), all at once, each for
  at most 20 s; the reply comes when they are done.
- ``{"cmd": "serve", "peer": i, "capability": {...}}``: ``{"serving": name, "t": T}`` (``T``:
  ``time.monotonic()`` just before the peer started serving).
- ``{"cmd": "placed", "peer": i, "timeout": S}``: once the announce that peer ``i``'s last
  ``serve`` started has ended (at most ``S`` seconds), ``{"t": T or null, "rounds": n,
  "acks": {label: n}, "ack_times": {label: [s, ...]}}`` (``T``: when it ended; null: not within
  ``S``; ``ack_times``: seconds from the announce's start to each acknowledgement).
- ``{"cmd": "find", "peer": i, "model": name, "id": ID, "timeout": S}``: peer ``i`` looks up
  ``model`` again and again (a new lookup every ``FIND_PAUSE`` s, at most ``FIND_IN_FLIGHT`` at
  once) until ``ID``'s card is among the results; ``{"t": T or null, "lookups": n, "lookup_s": L
  or null}`` (``T``: when the card arrived; ``L``: how long the lookup that found it had run;
  null: not within ``S``).
- ``{"cmd": "fresh", "bootstrap": ADDR, "task": ..., "model": ..., "expect": [ID, ...],
  "timeout": S}``: a new peer (DHT client, no listen address) starts in this process with
  ``ADDR`` as its only bootstrap, looks up the task (or model) once and stops; ``{"start_s":
  seconds to start, "all_s": seconds from the lookup's start until every ``expect`` card
  arrived (null: not all), "done_s": until the lookup ended, "found": how many of ``expect``}``.
- ``{"cmd": "announce"}``: every peer that serves something announces its card now;
  ``{"announced": n, "stored": m}`` (``m``: DHT peers that stored a card).
- ``{"cmd": "discover", "peer": i, "task": ..., "model": ..., "version": ..., "tags": [...],
  "timeout": S}``: ``{"cards": [{"id": ..., "addrs": [...], "capabilities": [names]}]}``.
- ``{"cmd": "call", "peer": i, "target": ADDR or null, "capability": name, "input": text,
  "timeout": S}``: ``{"text": ...}`` (``target`` null: routed over discovery and gossip).
- ``{"cmd": "stop", "peer": i}``: peer ``i`` leaves the mesh; ``{"stopped": i}``.
- ``{"cmd": "topic", "capability": name, "id": ID}``: per running peer, ``subs`` (neighbours
  subscribed to the capability's topic), ``mesh`` (its GossipSub mesh for the topic) and
  ``linked`` (whether it is connected to ``ID``): ``{"topic": [{"peer": i, ...}, ...]}``.
- ``{"cmd": "stats"}``: ``{"stats": {...}}``: ``peers`` still running, ``cpu`` (CPU seconds of
  this process), ``wall`` (``time.monotonic()``), ``rss_kib``, ``requests`` (DHT requests sent),
  and summed over the peers' gossip: ``bytes_sent``, ``published``, ``published_bytes``,
  ``validated``, ``accepted``, ``rejected`` (by reason), ``restarts``, ``min_mesh`` (the
  smallest GossipSub mesh among them), ``conns``: per running peer, the number of peers it
  has a connection to, and ``tcp``: per TCP socket of this process (by inode), its bytes sent
  (acknowledged) and received, from the kernel (``TCP_INFO``), whatever wrote them.

The worker exits with status 0 when stdin closes or on SIGTERM, after stopping every peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from ..config import PeerConfig
from ..errors import ModelNetError
from ..peer import Peer
from ..proto.capability import Capability
from ..services.inference.handlers import InferenceRequest
from .cluster import read_lines

__all__ = ["main", "rss_kib", "run"]

#: Seconds the worker waits for its peers to join the DHT before it reports ``ready``.
JOIN_LIMIT = 30.0
#: Seconds one lookup of ``find`` may take, the pause between the starts of two lookups, and
#: the most lookups in flight at once (they overlap, so that the time found is not rounded up
#: to the end of a lookup that started before the record was placed). The pause is the
#: measure's resolution: the time found is late by up to one pause (it was 0.25 s; a goal of
#: 1 s at p95 needs finer).
FIND_LOOKUP_LIMIT = 5.0
FIND_PAUSE = 0.1
FIND_IN_FLIGHT = 6
#: Seconds each peer's provider lookup of ``watch`` with ``lookup`` may take.
WATCH_LOOKUP_LIMIT = 20.0


def emit(obj: dict[str, Any]) -> None:
    """Write ``obj`` to stdout as one JSON line."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    """This process's resident memory in KiB (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


#: Offsets of ``tcpi_bytes_acked`` and ``tcpi_bytes_received`` in Linux's ``struct tcp_info``.
_TCPI_BYTES = struct.Struct("=QQ")
_TCPI_BYTES_AT = 120


def tcp_bytes() -> dict[str, list[int]]:
    """Socket inode -> ``[bytes sent and acknowledged, bytes received]`` of each TCP socket of
    this process (Linux ``TCP_INFO``; empty elsewhere)."""
    out: dict[str, list[int]] = {}
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            if not link.startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            continue
        if len(info) >= _TCPI_BYTES_AT + _TCPI_BYTES.size:
            out[link[8:-1]] = list(_TCPI_BYTES.unpack_from(info, _TCPI_BYTES_AT))
    return out


async def answer(request: InferenceRequest) -> str:
    return f"answer from {request.capability.name}"


class Node:
    """The peers of this process and the command handlers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.serve: dict[str, list[dict[str, Any]]] = json.loads(args.serve)
        self.peers: dict[int, Peer] = {}
        #: Per running peer: set it to stop the peer, then wait for the second event.
        self.stops: dict[int, tuple[trio.Event, trio.Event]] = {}
        #: Per peer that served (``serve``): when its announce ended, and the event set then.
        self.placed: dict[int, tuple[trio.Event, list[float]]] = {}

    def peer(self, cmd: dict[str, Any]) -> Peer:
        return self.peers[int(cmd.get("peer", 0))]

    async def run_peer(self, i: int, peer: Peer, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run ``peer`` until its stop event is set (each peer in its own task, so any may stop first)."""
        stop, stopped = self.stops[i] = trio.Event(), trio.Event()
        try:
            async with peer:
                task_status.started()
                await stop.wait()
        finally:
            self.peers.pop(i, None)
            stopped.set()

    async def start(self, nursery: trio.Nursery) -> None:
        args = self.args
        bootstrap = [a for a in args.bootstrap.split(",") if a]
        for i in range(args.peers):
            if args.unlinked:
                boot: list[str] = []
            elif bootstrap:
                boot = [bootstrap[i % len(bootstrap)]]
            else:
                boot = [self.peers[0].addrs[0]] if i else []
            peer = Peer(
                listen=[args.listen],
                bootstrap=boot,
                dht_mode=args.dht_mode,
                gossip=args.gossip,
                publish_interval=args.publish_interval,
                card_ttl=args.card_ttl,
                announce_interval=args.announce_interval,
            )
            await nursery.start(self.run_peer, i, peer)
            self.peers[i] = peer
            for cap in [*self.serve.get("*", []), *self.serve.get(str(i), [])]:
                peer.serve(Capability(**cap), answer)
            emit({"peer": i, "id": peer.peer_id, "addr": peer.addrs[0], "addrs": peer.addrs})
        with trio.move_on_after(JOIN_LIMIT):
            for peer in self.peers.values():
                await peer.discovery.bootstrapped.wait()
        emit({"ready": True})

    async def handle(self, line: str, tasks: trio.Nursery) -> None:
        try:
            cmd = json.loads(line)
            kind = cmd.get("cmd") if isinstance(cmd, dict) else None
            method = getattr(self, f"cmd_{kind}", None) if isinstance(kind, str) else None
            if method is None:
                emit({"error": f"unknown command {line!r}"})
                return
            emit(await method(cmd, tasks))
        except (ModelNetError, ValueError, KeyError, TypeError, trio.TooSlowError) as exc:
            emit({"error": f"{type(exc).__name__}: {exc}"})

    async def cmd_connect(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        outcomes: list[bool] = []

        async def dial(i: int, addr: str) -> None:
            try:
                await self.peers[i].connect(addr)
                outcomes.append(True)
            except Exception:
                outcomes.append(False)

        async with trio.open_nursery() as dialing:
            for i, addr in cmd["links"]:
                dialing.start_soon(dial, int(i), addr)
        return {"connected": outcomes.count(True), "failed": outcomes.count(False)}

    async def cmd_watch(self, cmd: dict[str, Any], tasks: trio.Nursery) -> dict[str, Any]:
        pid, name = str(cmd["id"]), cmd.get("capability")

        def serves(entry: Any) -> bool:  # with a capability: the record must list it
            return entry is not None and (name is None or any(c[0] == name for c in entry.capabilities))

        async def watch(i: int, peer: Peer) -> None:
            if peer.availability is not None:
                await peer.availability.wait_for(pid, serves, timeout=math.inf)
                emit({"event": "seen", "seen": pid, "peer": i, "t": time.monotonic()})

        if not self.args.gossip:
            return {"error": "this worker runs without gossip"}
        following = 0
        if name is not None and cmd.get("lookup"):

            async def look_up(peer: Peer) -> None:
                nonlocal following
                with trio.move_on_after(WATCH_LOOKUP_LIMIT):
                    try:
                        await peer.providers(str(name))
                        following += 1
                    except ModelNetError:
                        pass

            async with trio.open_nursery() as looking:
                for peer in self.peers.values():
                    looking.start_soon(look_up, peer)
        elif name is not None:
            for peer in self.peers.values():
                service = peer.availability
                if service is not None:
                    service.follow(str(name))
                    following += 1
        for i, peer in self.peers.items():
            tasks.start_soon(watch, i, peer)
        return {"watching": pid, "following": following}

    async def cmd_serve(self, cmd: dict[str, Any], tasks: trio.Nursery) -> dict[str, Any]:
        t = time.monotonic()
        peer = self.peer(cmd)
        cap = peer.serve(Capability(**cmd["capability"]), answer)
        ended: tuple[trio.Event, list[float]] = (trio.Event(), [])
        self.placed[int(cmd.get("peer", 0))] = ended

        async def placed() -> None:
            await peer.discovery.announced()
            ended[1].append(time.monotonic())
            ended[0].set()

        tasks.start_soon(placed)
        return {"serving": cap.name, "t": t}

    async def cmd_placed(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        peer = self.peer(cmd)
        event, when = self.placed[int(cmd.get("peer", 0))]
        with trio.move_on_after(float(cmd.get("timeout", 10.0))):
            await event.wait()
        last = peer.discovery.last_announce
        return {
            "t": when[0] if when else None,
            "rounds": last.rounds if last else 0,
            "acks": dict(last.acks) if last else {},
            "ack_times": dict(last.ack_times) if last else {},
        }

    async def cmd_find(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        peer, pid, model = self.peer(cmd), str(cmd["id"]), str(cmd["model"])
        lookups = 0
        found: list[tuple[float, float]] = []  # (when the card arrived, when its lookup began)
        limiter = trio.CapacityLimiter(FIND_IN_FLIGHT)

        async def one(ready: trio.Event) -> None:
            async with limiter:
                ready.set()
                began = time.monotonic()
                async for card in peer.discover_iter(model=model, timeout=FIND_LOOKUP_LIMIT):
                    if card.peer_id == pid:
                        found.append((time.monotonic(), began))
                        looking.cancel_scope.cancel()

        with trio.move_on_after(float(cmd.get("timeout", 10.0))):
            async with trio.open_nursery() as looking:
                while True:
                    lookups += 1
                    ready = trio.Event()
                    looking.start_soon(one, ready)
                    await ready.wait()  # at most FIND_IN_FLIGHT lookups at once
                    await trio.sleep(FIND_PAUSE)
        if not found:
            return {"t": None, "lookups": lookups, "lookup_s": None}
        arrived, began = found[0]
        return {"t": arrived, "lookups": lookups, "lookup_s": arrived - began}

    async def cmd_fresh(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        expect, timeout = set(cmd.get("expect", ())), float(cmd.get("timeout", 10.0))
        found: set[str] = set()
        all_s: float | None = None
        t0 = time.monotonic()
        with trio.fail_after(timeout + JOIN_LIMIT):
            async with Peer(listen=[], bootstrap=[str(cmd["bootstrap"])], dht_mode="client") as peer:
                t1 = time.monotonic()
                with trio.move_on_after(timeout):
                    async for card in peer.discover_iter(
                        cmd.get("task"), model=cmd.get("model"), timeout=timeout
                    ):
                        found.add(card.peer_id)
                        if all_s is None and expect <= found:
                            all_s = time.monotonic() - t1
                            break
                done_s = time.monotonic() - t1
        return {"start_s": t1 - t0, "all_s": all_s, "done_s": done_s, "found": len(found & expect)}

    async def cmd_announce(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        serving = [p for p in self.peers.values() if p.capabilities]
        stored = 0

        async def announce(p: Peer) -> None:
            nonlocal stored
            result = await p.discovery.announce()
            stored += result.value_stored if result else 0

        async with trio.open_nursery() as announcing:
            for p in serving:
                announcing.start_soon(announce, p)
        return {"announced": len(serving), "stored": stored}

    async def cmd_discover(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        cards = await self.peer(cmd).discover(
            cmd.get("task"),
            model=cmd.get("model"),
            version=cmd.get("version"),
            tags=cmd.get("tags", ()),
            timeout=float(cmd.get("timeout", 10.0)),
        )
        return {
            "cards": [
                {"id": c.peer_id, "addrs": list(c.addrs), "capabilities": [x.name for x in c.capabilities]}
                for c in cards
            ]
        }

    async def cmd_call(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        result = await self.peer(cmd).call(
            cmd.get("target"), cmd["capability"], cmd.get("input"), timeout=float(cmd.get("timeout", 30.0))
        )
        return {"text": result.text}

    async def cmd_stop(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        i = int(cmd.get("peer", 0))
        stop, stopped = self.stops.pop(i)
        stop.set()
        await stopped.wait()
        return {"stopped": i}

    async def cmd_topic(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        name, pid = str(cmd["capability"]), str(cmd.get("id", ""))
        rows = []
        for i, p in self.peers.items():
            service = p.availability
            if service is None:
                continue
            t = service.topic(name)
            rows.append({
                "peer": i,
                "subs": len(service.gossip.subscribers(t)),
                "mesh": service.gossip.mesh_size(t),
                "linked": any(str(c) == pid for c in p.host.get_connected_peers()),
            })
        return {"topic": rows}

    async def cmd_stats(self, cmd: dict[str, Any], _: trio.Nursery) -> dict[str, Any]:
        services = [p.availability for p in self.peers.values() if p.availability is not None]
        rejected: dict[str, int] = {}
        for s in services:
            for k, v in s.stats.rejected.items():
                rejected[k] = rejected.get(k, 0) + v
        return {
            "stats": {
                "peers": len(self.peers),
                "cpu": time.process_time(),
                "wall": time.monotonic(),
                "rss_kib": rss_kib(),
                "requests": sum(p.discovery.requests_sent for p in self.peers.values()),
                "bytes_sent": sum(s.bytes_sent for s in services),
                "published": sum(s.stats.published for s in services),
                "published_bytes": sum(s.stats.published_bytes for s in services),
                "validated": sum(s.stats.validated for s in services),
                "accepted": sum(s.stats.accepted for s in services),
                "rejected": rejected,
                "restarts": sum(s.stats.pubsub_restarts for s in services),
                "min_mesh": min((s.mesh_size() for s in services), default=0),
                "conns": [len(p.host.get_connected_peers()) for p in self.peers.values()],
                "tcp": tcp_bytes(),
            }
        }


async def main(args: argparse.Namespace) -> None:
    """Run the peers and answer commands until stdin closes or SIGTERM arrives."""
    node = Node(args)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            async with trio.open_nursery() as peers:
                await node.start(peers)
                async for line in read_lines(stdin):
                    if line:
                        await node.handle(line, nursery)
                for stop, _ in node.stops.values():
                    stop.set()  # each peer leaves in its own task
            nursery.cancel_scope.cancel()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modelnet_p2p.testing.worker", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--bootstrap", default="", help="comma-separated multiaddrs")
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", help="each peer's listen multiaddr")
    parser.add_argument("--unlinked", action="store_true", help="no bootstrap at all; use 'connect'")
    parser.add_argument("--dht-mode", choices=["auto", "server", "client"], default=PeerConfig.dht_mode)
    parser.add_argument("--gossip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--publish-interval", "--interval", type=float, default=PeerConfig.publish_interval)
    parser.add_argument("--card-ttl", type=float, default=PeerConfig.card_ttl)
    parser.add_argument("--announce-interval", type=float, default=PeerConfig.announce_interval)
    parser.add_argument("--serve", default="{}", help='JSON: peer index or "*" -> Capability kwargs')
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard limit on the run")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and run :func:`main` for at most ``--max-seconds``."""
    args = parse_args(argv)

    async def bounded() -> None:
        with trio.move_on_after(args.max_seconds):
            await main(args)

    trio.run(bounded)


if __name__ == "__main__":
    run()
