"""Baseline worker for bench_scale: K stock py-libp2p peers (Kademlia + GossipSub), JSON lines.

It never imports modelnet_p2p: the peers are built from py-libp2p's public API only
(``new_host`` with Noise and yamux, ``KadDHT`` with ``provide()``/``find_providers()``,
``GossipSub`` + ``Pubsub`` with ``subscribe()``/``publish()``). Every peer subscribes to one
availability topic, as a naive availability design would; a serving peer provides its key in
the DHT and publishes a small record on the topic every ``--publish-interval`` seconds
(2 s: modelnet's interval before issue 11). It speaks the line protocol of
``modelnet_p2p.testing.worker`` closely enough for ``modelnet_p2p.testing.Worker``::

    python benchmarks/stock_mesh_worker.py --peers 10 [--bootstrap ADDR,ADDR...] [--listen ADDR]

Peer ``i`` bootstraps from ``--bootstrap`` address ``i mod n`` (without it, peer ``i > 0``
from this process's peer 0), adds the peers it is connected to to its routing table (as
py-libp2p's Kademlia example does) and runs the DHT in server mode. Stdout: one
``{"peer": i, "id": ..., "addr": ..., "addrs": [...]}`` line per peer, then ``{"ready": true}``;
then one reply per command, and ``{"event": "seen", "seen": ID, "peer": i, "t": T}`` events
(``T``: ``time.monotonic()``). Commands (``"peer": i`` picks a local peer, default 0):

- ``{"cmd": "serve", "peer": i, "key": K}``: provide ``K`` and start publishing;
  ``{"serving": K, "t": T}`` (``T``: just before).
- ``{"cmd": "watch", "id": ID}``: each local peer emits ``seen`` when it first receives a
  record published by ``ID``; ``{"watching": ID}``.
- ``{"cmd": "find", "peer": i, "key": K, "id": ID, "timeout": S}``: ``find_providers(K)``
  again and again (a new one every 0.25 s, at most 4 at once) until ``ID`` is among them;
  ``{"t": T or null, "lookups": n}``.
- ``{"cmd": "fresh", "bootstrap": ADDR, "key": K, "expect": [ID...], "timeout": S}``: a new
  peer (DHT client) bootstraps from ``ADDR`` and calls ``find_providers(K)`` once;
  ``{"start_s", "all_s" (null: not every one of ``expect``), "done_s", "found"}``.
- ``{"cmd": "stats"}``: ``{"stats": {"peers", "cpu", "wall", "rss_kib", "conns" (per peer,
  peers it is connected to), "tcp" (per TCP socket: bytes sent and acknowledged, received),
  "published", "received", "modelnet_imported"}}``.

It exits with status 0 when stdin closes or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

TOPIC = "stock-availability"
#: Seconds a peer waits for each bootstrap connection.
CONNECT_LIMIT = 10.0


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tcp_bytes() -> dict[str, list[int]]:
    """Socket inode -> [bytes sent and acknowledged, received] per TCP socket (Linux TCP_INFO:
    ``tcpi_bytes_acked`` and ``tcpi_bytes_received`` at offset 120), as the modelnet worker."""
    out: dict[str, list[int]] = {}
    for fd in os.listdir("/proc/self/fd"):
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
        if len(info) >= 136:
            out[link[8:-1]] = list(struct.unpack_from("=QQ", info, 120))
    return out


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    while data := await stream.receive_some(65536):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


class StockPeer:
    """One host with GossipSub (subscribed to :data:`TOPIC`) and a Kademlia DHT."""

    def __init__(self, node: Node, index: int, mode: DHTMode, listen: bool) -> None:
        self.node, self.index, self.mode, self.listen = node, index, mode, listen
        key_pair = create_new_key_pair()
        noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        self.host: IHost = new_host(
            key_pair=key_pair,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
        )
        self.pubsub = Pubsub(self.host, self.gossipsub)
        self.dht: KadDHT | None = None
        self.stop = trio.Event()
        self.stopped = trio.Event()
        self.seen: set[str] = set()
        self.published = self.received = 0

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        suffix = f"/p2p/{self.peer_id}"
        return [s if s.endswith(suffix) else s + suffix for s in map(str, self.host.get_addrs())]

    async def run(self, boot: Sequence[str], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listen = [multiaddr.Multiaddr(self.node.args.listen)] if self.listen else []
        try:
            async with self.host.run(listen_addrs=listen), trio.open_nursery() as nursery:
                async with background_trio_service(self.pubsub), background_trio_service(self.gossipsub):
                    await self.pubsub.wait_until_ready()
                    for addr in boot:
                        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
                        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
                        with trio.move_on_after(CONNECT_LIMIT):
                            try:
                                await self.host.connect(info)
                            except Exception as exc:
                                logging.getLogger(__name__).info("bootstrap %s failed: %r", addr, exc)
                    self.dht = KadDHT(self.host, self.mode)
                    for pid in self.host.get_connected_peers():
                        await self.dht.routing_table.add_peer(pid)
                    subscription = await self.pubsub.subscribe(TOPIC)
                    async with background_trio_service(self.dht):
                        nursery.start_soon(self.read, subscription)
                        task_status.started()
                        await self.stop.wait()
                nursery.cancel_scope.cancel()
        except Exception as exc:
            if not self.stop.is_set():
                raise
            # py-libp2p's pubsub may still schedule a stream handler into its closed nursery
            logging.getLogger(__name__).info("peer %d failed while stopping: %r", self.index, exc)
        finally:
            self.stopped.set()

    async def read(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            self.received += 1
            origin = ID(msg.from_id).to_base58()
            if origin in self.node.watched and origin not in self.seen:
                self.seen.add(origin)
                emit({"event": "seen", "seen": origin, "peer": self.index, "t": time.monotonic()})

    async def serve(self, key: str, interval: float) -> None:
        assert self.dht is not None
        seq = 0

        async def publish_forever() -> None:
            nonlocal seq
            while True:
                seq += 1
                record = {"id": self.peer_id, "state": "ready", "load": 0, "seq": seq, "keys": [key]}
                try:
                    await self.pubsub.publish(TOPIC, json.dumps(record).encode())
                    self.published += 1
                except Exception as exc:
                    logging.getLogger(__name__).info("publish failed: %r", exc)
                await trio.sleep(interval)

        self.node.nursery.start_soon(publish_forever)
        self.node.nursery.start_soon(self.dht.provide, key)


class Node:
    def __init__(self, args: argparse.Namespace, nursery: trio.Nursery) -> None:
        self.args = args
        self.nursery = nursery
        self.peers: dict[int, StockPeer] = {}
        self.watched: set[str] = set()

    async def start(self, peers: trio.Nursery) -> None:
        bootstrap = [a for a in self.args.bootstrap.split(",") if a]
        for i in range(self.args.peers):
            if bootstrap:
                boot = [bootstrap[i % len(bootstrap)]]
            else:
                boot = [self.peers[0].addrs[0]] if i else []
            peer = StockPeer(self, i, DHTMode.SERVER, listen=True)
            await peers.start(peer.run, boot)
            self.peers[i] = peer
            emit({"peer": i, "id": peer.peer_id, "addr": peer.addrs[0], "addrs": peer.addrs})
        emit({"ready": True})

    async def handle(self, line: str) -> None:
        try:
            cmd = json.loads(line)
            method = getattr(self, f"cmd_{cmd.get('cmd')}", None)
            if method is None:
                emit({"error": f"unknown command {line!r}"})
                return
            emit(await method(cmd))
        except Exception as exc:  # one bad command must not stop the worker
            emit({"error": f"{type(exc).__name__}: {exc}"})

    async def cmd_serve(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        await self.peers[int(cmd.get("peer", 0))].serve(str(cmd["key"]), self.args.publish_interval)
        return {"serving": cmd["key"], "t": t}

    async def cmd_watch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.watched.add(str(cmd["id"]))
        return {"watching": cmd["id"]}

    async def cmd_find(self, cmd: dict[str, Any]) -> dict[str, Any]:
        dht = self.peers[int(cmd.get("peer", 0))].dht
        assert dht is not None
        pid, key, lookups = str(cmd["id"]), str(cmd["key"]), 0
        found: list[float] = []
        limiter = trio.CapacityLimiter(4)

        async def one(ready: trio.Event) -> None:
            async with limiter:
                ready.set()
                providers = await dht.find_providers(key)
                if pid in {p.peer_id.to_base58() for p in providers}:
                    found.append(time.monotonic())
                    looking.cancel_scope.cancel()

        with trio.move_on_after(float(cmd.get("timeout", 10.0))):
            async with trio.open_nursery() as looking:  # as modelnet's worker: overlapping lookups
                while True:
                    lookups += 1
                    ready = trio.Event()
                    looking.start_soon(one, ready)
                    await ready.wait()
                    await trio.sleep(0.25)
        return {"t": found[0] if found else None, "lookups": lookups}

    async def cmd_fresh(self, cmd: dict[str, Any]) -> dict[str, Any]:
        expect, timeout = set(cmd.get("expect", ())), float(cmd.get("timeout", 10.0))
        peer = StockPeer(self, -1, DHTMode.CLIENT, listen=False)
        found: set[str] = set()
        all_s: float | None = None
        t0 = time.monotonic()
        with trio.fail_after(timeout + 30):
            async with trio.open_nursery() as nursery:
                await nursery.start(peer.run, [str(cmd["bootstrap"])])
                t1 = time.monotonic()
                assert peer.dht is not None
                with trio.move_on_after(timeout):
                    providers = await peer.dht.find_providers(str(cmd["key"]))
                    found = {p.peer_id.to_base58() for p in providers}
                done_s = time.monotonic() - t1
                if expect <= found:
                    all_s = done_s
                peer.stop.set()
        return {"start_s": t1 - t0, "all_s": all_s, "done_s": done_s, "found": len(found & expect)}

    async def cmd_stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        peers = list(self.peers.values())
        return {
            "stats": {
                "peers": len(peers),
                "cpu": time.process_time(),
                "wall": time.monotonic(),
                "rss_kib": rss_kib(),
                "conns": [len(p.host.get_connected_peers()) for p in peers],
                "tcp": tcp_bytes(),
                "published": sum(p.published for p in peers),
                "received": sum(p.received for p in peers),
                "modelnet_imported": any(m.startswith("modelnet_p2p") for m in sys.modules),
            }
        }


async def main(args: argparse.Namespace) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            node = Node(args, nursery)
            async with trio.open_nursery() as peers:
                await node.start(peers)
                async for line in read_lines(stdin):
                    if line:
                        await node.handle(line)
                for peer in node.peers.values():
                    peer.stop.set()
            nursery.cancel_scope.cancel()


def run(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--bootstrap", default="")
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", help="each peer's listen multiaddr")
    parser.add_argument("--publish-interval", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    # py-libp2p logs WARNINGs for normal DHT traffic; they would also count as written bytes.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

    async def bounded() -> None:
        with trio.move_on_after(args.max_seconds):
            await main(args)

    trio.run(bounded)


if __name__ == "__main__":
    run()
