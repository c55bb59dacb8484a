"""Run K modelnet peers on 127.0.0.1 in this process, for meshes that span processes.

Used by ``tests/test_discovery.py`` and ``benchmarks/bench_discovery.py``::

    python tests/mesh_worker.py --peers 10 --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3... \\
        --serve '{"3": [{"name": "llama3", "task": "chat", "tags": ["fast"]}]}'

Peer ``i`` bootstraps from one of the ``--bootstrap`` addresses (comma-separated,
taken in turn) if given, else from peer 0 of this process. ``--peers 0`` runs
no peer at all (a memory baseline). Stdout gets one JSON line per peer (``{"peer": i, "id": ..., "addrs":
[...]}``), then ``{"ready": true}``. Commands, one per stdin line, each
answered by one JSON line:

- ``announce``: every serving peer announces its card now; ``{"announced": n, "stored": m}``.
- ``stats``: ``{"rss_kib": ..., "peers": K, "requests": ...}``.
- ``stop I``: peer I leaves the mesh; ``{"stopped": I}``.

The worker exits cleanly when stdin closes or on SIGTERM (the loop of ``worker_loop.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker_loop import emit, run_bounded, serve_commands

from modelnet_p2p import Capability, Peer


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def answer(request: Any) -> str:
    return f"answer from {request.capability.name}"


async def main(args: argparse.Namespace) -> None:
    serve: dict[int, list[dict[str, Any]]] = {int(k): v for k, v in json.loads(args.serve).items()}
    async with AsyncExitStack() as stack:
        peers: dict[int, Peer] = {}
        stacks: dict[int, AsyncExitStack] = {}
        bootstrap = [a for a in args.bootstrap.split(",") if a]
        for i in range(args.peers):
            boot = [bootstrap[i % len(bootstrap)]] if bootstrap else ([peers[0].addrs[0]] if i else [])
            peer = Peer(
                listen=["/ip4/127.0.0.1/tcp/0"],
                bootstrap=boot,
                card_ttl=args.card_ttl,
                announce_interval=args.announce_interval,
            )
            own = AsyncExitStack()
            await own.enter_async_context(peer)
            stack.push_async_exit(own)
            peers[i], stacks[i] = peer, own
            for cap in serve.get(i, []):
                peer.serve(Capability(**cap), answer)
            emit({"peer": i, "id": peer.peer_id, "addrs": peer.addrs})
        with trio.move_on_after(30):  # let every peer finish joining the DHT
            for peer in peers.values():
                await peer.discovery.bootstrapped.wait()
        emit({"ready": True})

        async def handle(line: str, _: trio.Nursery) -> None:
            cmd = line.split()
            if cmd == ["announce"]:
                serving = [p for i, p in peers.items() if serve.get(i)]
                stored = [0]

                async def announce(p: Peer, stored: list[int] = stored) -> None:
                    result = await p.discovery.announce()
                    stored[0] += result.value_stored if result else 0

                async with trio.open_nursery() as announcing:
                    for p in serving:
                        announcing.start_soon(announce, p)
                emit({"announced": len(serving), "stored": stored[0]})
            elif cmd == ["stats"]:
                requests = sum(p.discovery.requests_sent for p in peers.values())
                emit({"rss_kib": rss_kib(), "peers": len(peers), "requests": requests})
            elif len(cmd) == 2 and cmd[0] == "stop" and int(cmd[1]) in peers:
                i = int(cmd[1])
                await stacks.pop(i).aclose()
                peers.pop(i)
                emit({"stopped": i})
            else:
                emit({"error": f"unknown command {line!r}"})

        await serve_commands(handle)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--bootstrap", default="")
    parser.add_argument("--serve", default="{}", help="JSON: peer index -> list of Capability kwargs")
    parser.add_argument("--card-ttl", type=float, default=300.0)
    parser.add_argument("--announce-interval", type=float, default=120.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard limit on the run")
    ns = parser.parse_args()
    run_bounded(lambda: main(ns), ns.max_seconds)
