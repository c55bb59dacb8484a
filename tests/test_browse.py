"""Browsing the mesh: ``peer.discover()`` and ``modelnet discover`` with no criteria.

Real peers on 127.0.0.1. Each browse is made from a fresh peer, so the providers it
gets come over the network (a fresh peer's own stores are empty).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from cli_util import background, clean_env, modelnet, read_event

from modelnet_p2p import Capability, Peer
from modelnet_p2p.cli.discover import sort_rows
from modelnet_p2p.proto.card import card_keys
from modelnet_p2p.services.discovery import index, service
from modelnet_p2p.services.discovery.index import INDEX_KEY, INDEX_LABEL, announced_keys
from modelnet_p2p.services.discovery.query import Query

PEER_OPTS: dict[str, Any] = {"gossip": False}


async def answer(request: Any) -> str:
    return "ok"


@asynccontextmanager
async def servers(n: int) -> AsyncIterator[list[Peer]]:
    """``n`` DHT servers serving nothing, peers 1.. bootstrapping from peer 0."""
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for _ in range(n):
            boot = [peers[0].addrs[0]] if peers else []
            peers.append(await stack.enter_async_context(Peer(bootstrap=boot, **PEER_OPTS)))
        for p in peers:
            await p.discovery.bootstrapped.wait()
        yield peers


@asynccontextmanager
async def providers(
    boot: str, caps: list[Capability], modes: tuple[str, ...] = (), indexed: bool = True
) -> AsyncIterator[list[Peer]]:
    """One peer per capability, each serving it and announced (acknowledged) before the next;
    ``modes[i]``: peer i's DHT mode (default auto: a server). ``indexed``: the browse index
    acknowledges each (False: the index is full, and the card keys acknowledge instead)."""
    async with AsyncExitStack() as stack:
        peers = []
        for i, cap in enumerate(caps):
            mode = modes[i] if i < len(modes) else "auto"
            p = await stack.enter_async_context(Peer(bootstrap=[boot], dht_mode=mode, **PEER_OPTS))
            await p.discovery.bootstrapped.wait()
            p.serve(cap, answer)
            result = await p.discovery.announce()
            assert result is not None, "announce gave no result"
            if indexed:
                assert result.acks[INDEX_LABEL] >= 1, result.acks
            else:  # the servers keep no more providers of a full key, so none acknowledges
                assert result.acks[INDEX_LABEL] == 0, result.acks
                assert min(n for label, n in result.acks.items() if label != INDEX_LABEL) >= 1, result.acks
            peers.append(p)
        yield peers


def test_the_index_key_is_announced_with_every_non_empty_card() -> None:
    caps = [Capability(name="m", tasks=("chat",))]
    assert announced_keys(caps) == [*card_keys(caps), (INDEX_LABEL, INDEX_KEY)]
    assert announced_keys([]) == []
    assert INDEX_KEY[:2] == b"\x12\x20" and len(INDEX_KEY) == 34  # a sha2-256 multihash
    assert index.is_browse(Query()) and not index.is_browse(Query(task="chat"))


@pytest.mark.timeout(120)
async def test_discover_with_no_criteria_lists_every_capability_of_the_mesh() -> None:
    caps = [
        Capability(name="chat-a", tasks=("chat",)),
        Capability(name="embed-b", tasks=("embedding",)),
        Capability(name="tagged-c", tasks=("rerank",), tags=("fr",)),
    ]
    with trio.fail_after(100):
        async with servers(4) as mesh, providers(mesh[1].addrs[0], caps) as serving:
            want = {p.peer_id for p in serving}
            async with Peer(listen=[], bootstrap=[mesh[2].addrs[0]], **PEER_OPTS) as fresh:
                cards = await fresh.discover(timeout=30)
                assert {c.peer_id for c in cards} == want
                assert len(cards) == 3
                assert {c.name for card in cards for c in card.capabilities} == {
                    "chat-a",
                    "embed-b",
                    "tagged-c",
                }
                # streamed: the first card arrives before the search ends, and limit stops it
                got = []
                async for card in fresh.discover_iter(limit=2, timeout=30):
                    got.append(card.peer_id)
                assert len(got) == 2 and set(got) <= want
            # a peer that stops serving everything leaves the browse
            serving[0].unserve("chat-a")
            await serving[0].discovery.announce()
            async with Peer(listen=[], bootstrap=[mesh[3].addrs[0]], **PEER_OPTS) as fresh:
                cards = await fresh.discover(timeout=30)
                assert {c.peer_id for c in cards} == want - {serving[0].peer_id}


@pytest.mark.timeout(120)
async def test_a_full_index_is_completed_from_the_task_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers keep 2 providers per key here (256 in production). The first two providers
    fill the index; the next two (DHT clients: they store nothing themselves) are left out
    of it, and a browse finds them through the task keys of the cards the index gave."""
    monkeypatch.setattr(service, "MAX_PROVIDERS_PER_KEY", 2)
    monkeypatch.setattr(index, "FULL_AT", 2)
    first = [
        Capability(name="p1", tasks=("chat", "embedding")),
        Capability(name="p2", tasks=("chat", "rerank")),
    ]
    late = [Capability(name="p3", tasks=("embedding",)), Capability(name="p4", tasks=("rerank",))]
    with trio.fail_after(100):
        async with servers(4) as mesh, providers(mesh[1].addrs[0], first) as early:
            first_two = {p.peer_id for p in early}
            holders = [*mesh, *early]

            async def listed(holder: Peer) -> set[str]:
                asker = mesh[0] if holder is not mesh[0] else mesh[1]
                resp = await asker.discovery.request(holder.peer_id, _providers_of(INDEX_KEY))
                return {p.peer_id for p in resp.providers} if resp is not None else set()

            # every server's index holds the first two (an announce needs 5 acknowledgements
            # of the 6 servers, so re-announce until the sixth has them too)
            while any([await listed(h) != first_two for h in holders]):
                for p in early:
                    await p.discovery.announce()
                await trio.sleep(0.2)
            async with providers(mesh[1].addrs[0], late, ("client", "client"), indexed=False) as later:
                for h in holders:
                    assert await listed(h) == first_two  # full: the late ones are left out
                everyone = first_two | {p.peer_id for p in later}
                async with Peer(listen=[], bootstrap=[mesh[3].addrs[0]], **PEER_OPTS) as fresh:
                    cards = await fresh.discover(timeout=40)
                    assert {c.peer_id for c in cards} == everyone
                monkeypatch.setattr(index, "FULL_AT", 3)  # the index looks complete: no task walk
                async with Peer(listen=[], bootstrap=[mesh[3].addrs[0]], **PEER_OPTS) as fresh:
                    cards = await fresh.discover(timeout=40)
                    assert {c.peer_id for c in cards} == first_two


def _providers_of(key: bytes) -> Any:
    from modelnet_p2p.p2p.kad import KadKind, KadRequest

    return KadRequest(KadKind.GET_PROVIDERS, key)


def test_sort_rows_by_load_and_latency() -> None:
    rows = [
        {
            "peer_id": "a",
            "state": "ready",
            "in_flight": 3,
            "queue": 0,
            "max_concurrency": 4,
            "latency_ms": 9.0,
        },
        {
            "peer_id": "b",
            "state": "ready",
            "in_flight": 0,
            "queue": 0,
            "max_concurrency": 4,
            "latency_ms": None,
        },
        {
            "peer_id": "c",
            "state": "draining",
            "in_flight": 0,
            "queue": 0,
            "max_concurrency": 4,
            "latency_ms": 1.0,
        },
        {
            "peer_id": "d",
            "state": None,
            "in_flight": None,
            "queue": None,
            "max_concurrency": None,
            "latency_ms": 2.0,
        },
    ]
    assert [r["peer_id"] for r in sort_rows(rows, "load")] == ["b", "a", "c", "d"]
    assert [r["peer_id"] for r in sort_rows(rows, "latency")] == ["c", "d", "a", "b"]


@pytest.mark.timeout(120)
def test_modelnet_discover_with_no_filter_browses_streams_and_sorts(tmp_path: Any) -> None:
    with background("bootstrap", "--json", cwd=tmp_path) as boot:
        baddr = read_event(boot)["addrs"][0]
        serve = ("serve", "modelnet_p2p.demo_models:ALL", "--json", "--bootstrap", baddr)
        with (
            background(*serve, "--only", "echo", "--only", "arithmetic", cwd=tmp_path) as p1,
            background(*serve, "--only", "echo", cwd=tmp_path) as p2,
        ):
            ids = {read_event(p1)["peer_id"], read_event(p2)["peer_id"]}
            out = modelnet("discover", "--bootstrap", baddr, "--json", "--timeout", "20", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            rows = json.loads(out.stdout)["capabilities"]
            assert {r["peer_id"] for r in rows} == ids
            assert {r["capability"] for r in rows} == {"echo", "arithmetic"}
            # streamed: one JSON line per capability as it is verified, then a summary
            out = modelnet("discover", "-b", baddr, "--json", "--stream", "--limit", "1", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            events = [json.loads(line) for line in out.stdout.splitlines()]
            assert events[-1] == {"event": "done", "peers": 1, "capabilities": len(events) - 1}
            assert all(e["event"] == "capability" and e["peer_id"] in ids for e in events[:-1])
            # joined with availability, ordered by load; and by measured latency
            out = modelnet(
                "discover", "-b", baddr, "--task", "text-generation", "--sort", "load", "--json", cwd=tmp_path
            )
            assert out.returncode == 0, out.stderr
            rows = json.loads(out.stdout)["capabilities"]
            assert {r["peer_id"] for r in rows} == ids
            assert all(r["state"] == "ready" and r["max_concurrency"] >= 1 for r in rows), rows
            out = modelnet("discover", "-b", baddr, "--sort", "latency", "--json", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            rows = json.loads(out.stdout)["capabilities"]
            assert all(r["latency_ms"] is not None for r in rows), rows
            human = modelnet(
                "discover", "-b", baddr, "--sort", "latency", cwd=tmp_path, env=clean_env(COLUMNS="200")
            )
            assert human.returncode == 0 and "latency" in human.stdout and "ms" in human.stdout
