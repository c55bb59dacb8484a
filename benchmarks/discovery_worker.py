"""Run K modelnet peers on 127.0.0.1 in one process, for ``bench_discovery.py``'s meshes.

Usage::

    python benchmarks/discovery_worker.py --peers 10 [--bootstrap ADDR,ADDR...] \\
        [--serve '{"3": [{"name": "m", "task": "chat"}]}'] [--max-seconds 900]

Peer ``i`` bootstraps from the ``--bootstrap`` addresses in turn if any are given, else from
peer 0 of this process. ``--peers 0`` runs no peer (a memory baseline). Stdout gets one JSON
line per peer, ``{"peer": i, "id": ..., "addrs": [...]}``, then ``{"ready": true}``. Then,
one command per stdin line, each answered by one JSON line:

- ``announce``: every serving peer announces its card now: ``{"announced": n, "stored": m}``;
- ``stats``: ``{"rss_kib": ..., "peers": K, "requests": ...}``.

The worker leaves when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import Capability, Peer


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def answer(request: Any) -> str:
    return f"answer from {request.capability.name}"


async def commands(stream: trio.lowlevel.FdStream) -> Any:
    buf = b""
    while data := await stream.receive_some(4096):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().split()


async def main(args: argparse.Namespace) -> None:
    serve = {int(k): v for k, v in json.loads(args.serve).items()}
    bootstrap = [a for a in args.bootstrap.split(",") if a]
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(args.peers):
            boot = [bootstrap[i % len(bootstrap)]] if bootstrap else ([peers[0].addrs[0]] if i else [])
            peer = await stack.enter_async_context(Peer(bootstrap=boot))
            for cap in serve.get(i, []):
                peer.serve(Capability(**cap), answer)
            peers.append(peer)
            emit({"peer": i, "id": peer.peer_id, "addrs": peer.addrs})
        with trio.move_on_after(30):  # let every peer finish joining the DHT
            for peer in peers:
                await peer.discovery.bootstrapped.wait()
        emit({"ready": True})
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async for cmd in commands(stdin):
            if cmd == ["announce"]:
                serving = [p for i, p in enumerate(peers) if serve.get(i)]
                stored = 0

                async def announce(p: Peer) -> None:
                    nonlocal stored
                    result = await p.discovery.announce()
                    stored += result.value_stored if result else 0

                async with trio.open_nursery() as nursery:
                    for p in serving:
                        nursery.start_soon(announce, p)
                emit({"announced": len(serving), "stored": stored})
            elif cmd == ["stats"]:
                requests = sum(p.discovery.requests_sent for p in peers)
                emit({"rss_kib": rss_kib(), "peers": len(peers), "requests": requests})
            elif cmd:
                emit({"error": f"unknown command {' '.join(cmd)!r}"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--bootstrap", default="")
    parser.add_argument("--serve", default="{}", help="JSON: peer index -> list of Capability kwargs")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard limit on the run")
    ns = parser.parse_args()

    async def bounded() -> None:
        with trio.move_on_after(ns.max_seconds):
            await main(ns)

    trio.run(bounded)
