"""Joining and announcing in a 40-peer mesh spread over four worker processes (issue 11).

Four workers of 10 peers each (:mod:`modelnet_p2p.testing.worker`): the first worker's
peers bootstrap from its peer 0, and the peers of the three others, started together once
the first is up, from the first worker's peers in turn. Three peers, in three different
workers, serve a ``chat`` model from their start. Availability gossip is off: this is
about discovery, and 40 gossiping peers would keep both cores of a CI machine busy. Two
behaviours are checked:

1. a fresh peer whose first lookup starts as soon as the mesh is up (every worker's peers
   have joined) finds every provider, in that one lookup;
2. a provider started once the mesh has settled is found by an existing peer, in another
   process, within a few seconds of its ``serve()``.

The bounds are generous: the test checks behaviour, ``benchmarks/bench_scale.py``
measures time. The figures are printed (``pytest -rP`` shows them).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from modelnet_p2p.testing import open_worker, open_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PER_WORKER = 10
#: Local peer of each of workers 1, 2 and 3 that serves from its start.
PROVIDERS = {1: 3, 2: 7, 3: 5}
#: The late provider and the existing peer that looks it up: (worker, local peer).
LATE = (2, 4)
SEEKER = (1, 6)
#: Seconds the fresh peer's one lookup may take, and the late provider to be found.
#: Generous: a few seconds is the normal case, even on a busy machine.
FIRST_LOOKUP_LIMIT = 30.0
DISCOVERABLE_LIMIT = 20.0


def chat(name: str) -> dict[str, Any]:
    return {"name": name, "tasks": ["chat"]}


async def test_a_40_peer_mesh_finds_its_providers_at_once_and_a_late_one_within_seconds() -> None:
    with trio.fail_after(200):
        async with open_worker(PER_WORKER, gossip=False, max_seconds=180, startup_timeout=90) as first:
            boot = [p["addr"] for p in first.peers]
            specs = [{"peers": PER_WORKER, "serve": {PROVIDERS[w]: [chat(f"m40-{w}")]}} for w in (1, 2, 3)]
            async with open_workers(
                specs, bootstrap=boot, gossip=False, max_seconds=180, startup_timeout=90
            ) as others:
                workers = [first, *others]
                assert sum(len(w.peers) for w in workers) == 40
                providers = {workers[w].peers[i]["id"] for w, i in PROVIDERS.items()}

                # 1. Right after the mesh is up: a fresh peer (a DHT client that knows one
                # address, of a peer in the last worker) looks the task up once.
                fresh = await workers[0].request(
                    {
                        "cmd": "fresh",
                        "bootstrap": workers[3].peers[9]["addr"],
                        "task": "chat",
                        "expect": sorted(providers),
                        "timeout": FIRST_LOOKUP_LIMIT,
                    },
                    timeout=FIRST_LOOKUP_LIMIT + 60,
                )
                print(f"fresh peer's first lookup: {fresh}")
                assert "error" not in fresh, fresh
                assert fresh["found"] == len(providers), fresh
                assert fresh["all_s"] is not None and fresh["all_s"] < FIRST_LOOKUP_LIMIT, fresh

                # 2. Once the mesh has settled: a new provider, found by a peer elsewhere.
                w, i = LATE
                late_id = workers[w].peers[i]["id"]
                served = await workers[w].request({"cmd": "serve", "peer": i, "capability": chat("m40-late")})
                sw, si = SEEKER
                found = await workers[sw].request(
                    {
                        "cmd": "find",
                        "peer": si,
                        "model": "m40-late",
                        "id": late_id,
                        "timeout": DISCOVERABLE_LIMIT,
                    },
                    timeout=DISCOVERABLE_LIMIT + 30,
                )
                assert "error" not in found, found
                after = None if found["t"] is None else found["t"] - served["t"]
                print(f"serve() to discoverable: {after} s in {found['lookups']} lookups")
                assert after is not None, f"the late provider was not found within {DISCOVERABLE_LIMIT} s"
                assert after < DISCOVERABLE_LIMIT
