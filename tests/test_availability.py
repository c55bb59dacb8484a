"""Availability gossip between real peers on 127.0.0.1 (``specs/availability.md``).

The services are attached to :class:`modelnet_p2p.Peer` instances by hand, the
way the Peer will do it (host, identity, nursery, load from the inference
server). Peers run their DHT in client mode: gossip does not use it, and 20 DHT
servers in one process cost more CPU than the gossip under test.

The 20-peer test spans two worker processes (``tests/availability_worker.py``):
py-libp2p gossip saturates one core at about 15-20 peers that all publish every
2 s, and a saturated event loop measures the machine, not the protocol.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

from modelnet_p2p import ConfigError, Peer, UnavailableError
from modelnet_p2p.proto.availability import (
    TOPIC,
    AvailabilityRecord,
    encode_envelope,
    encode_record,
    seal,
    signing_input,
)
from modelnet_p2p.services.availability.service import (
    AvailabilityConfig,
    AvailabilityEntry,
    AvailabilityService,
    InferenceLoad,
    LoadSnapshot,
    State,
    mesh_view,
    start_availability,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from availability_worker import NO_GOSSIP, open_worker, random_links

#: One publish per second, TTL 3 s: keeps the small tests short.
FAST = AvailabilityConfig(publish_interval=1.0)


@dataclass
class Node:
    peer: Peer
    svc: AvailabilityService
    scope: trio.CancelScope

    @property
    def id(self) -> str:
        return self.peer.peer_id

    def kill(self) -> None:
        """Stop the peer abruptly: no ``leaving`` record, connections just close."""
        self.scope.cancel()


async def _run_node(
    config: AvailabilityConfig,
    caps: Sequence[Any],
    start_service: bool,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], dht_mode="client", **NO_GOSSIP) as peer:
            load = InferenceLoad(peer.inference, peer.limits.max_concurrency)
            peer.inference.on_request_done = load.on_request_done
            svc = AvailabilityService(
                peer.host, peer.identity, config, load_provider=load.snapshot, capabilities=caps
            )
            if start_service:
                await peer.nursery.start(svc.run)
            task_status.started(Node(peer, svc, scope))
            await trio.sleep_forever()


@asynccontextmanager
async def mesh(
    n: int,
    links: Sequence[tuple[int, int]] = (),
    config: AvailabilityConfig = FAST,
    caps: Sequence[Any] = (("echo", "1.0"),),
    start_service: bool = True,
) -> AsyncIterator[list[Node]]:
    """``n`` peers with availability services, connected along ``links``; all stop together."""
    async with trio.open_nursery() as nursery:
        nodes: list[Node] = [await nursery.start(_run_node, config, caps, start_service) for _ in range(n)]
        for a, b in links:
            await nodes[a].peer.connect(nodes[b].peer.addrs[0])
        yield nodes
        nursery.cancel_scope.cancel()


async def all_see(nodes: Sequence[Node], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        for a in nodes:
            for b in nodes:
                await a.svc.wait_for(b.id, timeout=timeout)


def count_tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(count_tasks(t) for n in task.child_nurseries for t in n.child_tasks)


def gossip_message(signer: KeyPair, from_id: ID, data: bytes, seqno: int) -> rpc_pb2.Message:
    """A pubsub message as py-libp2p builds it, signed by ``signer`` whoever it claims to be from."""
    msg = rpc_pb2.Message(
        data=data, topicIDs=[TOPIC], from_id=from_id.to_bytes(), seqno=seqno.to_bytes(8, "big")
    )
    msg.signature = signer.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = signer.public_key.serialize()
    return msg


def inject(sender: Node, to: Node, msg: rpc_pb2.Message) -> None:
    """Send ``msg`` from ``sender`` straight into its connection to ``to``, bypassing its own checks."""
    router = sender.svc.router
    assert router is not None
    router.send_rpc(to.peer.host.get_id(), rpc_pb2.RPC(publish=[msg]))


# -- the requirement tests ------------------------------------------------------------------


async def test_twenty_peers_see_a_new_provider_within_three_publish_periods():
    # The requirement is in publish periods. 4 s (not the default 2 s) halves the
    # gossip load and leaves room for a machine shared with other test runs;
    # benchmarks/bench_availability.py measures the default (t95 well under 1 s).
    interval = 4.0
    rng = random.Random(20)
    async with trio.open_nursery() as nursery:
        workers: list[Any] = []

        async def run_worker(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with open_worker(10, interval, max_seconds=120) as w:
                workers.append(w)
                task_status.started()
                await trio.sleep_forever()

        async with trio.open_nursery() as starting:
            for _ in range(2):
                starting.start_soon(nursery.start, run_worker)
        where = [(w, i) for w in workers for i in range(len(w.peers))]
        rng.shuffle(where)
        assert len(where) == 20
        plan: dict[int, list[list[Any]]] = {id(w): [] for w in workers}
        for a, b in random_links(list(range(20)), 3, rng):
            (wa, ia), (wb, ib) = where[a], where[b]
            plan[id(wa)].append([ia, wb.peers[ib]["addr"]])
        for w in workers:
            reply = await w.request({"cmd": "connect", "links": plan[id(w)]})
            assert reply["failed"] == 0
        await trio.sleep(2.0)  # let the meshes form

        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], dht_mode="client", **NO_GOSSIP) as provider:
            for w in workers:
                await w.request({"cmd": "watch", "id": provider.peer_id})
            started = time.monotonic()
            svc = await start_availability(
                provider.host,
                provider.identity,
                provider.nursery,
                AvailabilityConfig(publish_interval=interval),
                capabilities=[("llama3", "8b")],
            )
            for j in rng.sample(range(20), 3):
                w, i = where[j]
                await provider.connect(w.peers[i]["addr"])
            deadline = started + 3 * interval
            while time.monotonic() < deadline:
                if sum(len(w.seen(provider.peer_id)) for w in workers) == 20:
                    break
                await trio.sleep(0.05)
            assert svc.stats.published >= 1
            delays = sorted(t - started for w in workers for t in w.seen(provider.peer_id).values())
            assert len(delays) == 20, f"only {len(delays)} of 20 peers saw the provider: {delays}"
            assert delays[-1] <= 3 * interval
            for w in workers:
                stats = (await w.request({"cmd": "stats"}))["stats"]
                assert stats["restarts"] == 0
                assert stats["rejected"].get("malformed", 0) == 0
        nursery.cancel_scope.cancel()


async def test_silent_peer_is_evicted_after_its_ttl():
    async with mesh(3, links=[(1, 0), (2, 0), (2, 1)]) as (a, b, c):
        await all_see([a, b, c])
        changes = a.svc.subscribe()
        c.kill()  # no leave: it just goes silent
        killed = time.monotonic()
        ttl = FAST.effective_ttl
        with trio.fail_after(ttl + 5):
            async for change in changes:
                if change.peer_id == c.id and change.kind == "removed":
                    break
        assert change.reason == "expired"
        assert change.entry.state is State.READY
        assert time.monotonic() - killed <= ttl + 5
        assert c.id not in a.svc.table() and c.id not in b.svc.table()
        assert b.id in a.svc.table()  # the living stay


async def test_graceful_leave_is_seen_as_leaving_then_removed():
    async with mesh(2, links=[(1, 0)]) as (a, b):
        await all_see([a, b])
        changes = a.svc.subscribe()
        await b.svc.leave()
        entry = await a.svc.wait_for(b.id, lambda e: e is not None and e.state is State.LEAVING, timeout=5)
        assert entry is not None and not entry.accepting
        with trio.fail_after(10):
            async for change in changes:
                if change.peer_id == b.id and change.kind == "removed":
                    break
        assert change.reason == "left"
        published = b.svc.stats.published
        await trio.sleep(1.5)
        assert b.svc.stats.published == published  # silent after leave
        assert b.id not in a.svc.table()


async def test_draining_is_visible_and_in_flight_requests_finish():
    release = trio.Event()
    started = trio.Event()

    async def slow(request):
        started.set()
        await release.wait()
        return "done"

    async with mesh(2, links=[(1, 0)]) as (a, b):
        b.peer.serve("slow", slow)
        b.svc.set_capabilities(b.peer.capabilities)
        await a.svc.wait_for(b.id, lambda e: e is not None and e.record.serves("slow"), timeout=5)
        async with trio.open_nursery() as nursery:
            answers: list[str] = []

            async def first_call() -> None:
                answers.append((await a.peer.call(b.peer.addrs[0], "slow", "x", timeout=20)).text)

            nursery.start_soon(first_call)
            with trio.fail_after(5):
                await started.wait()
            # What the Peer will do on drain: refuse new requests, announce, wait.
            b.peer.inference.draining = True
            drained: list[bool] = []

            async def drain() -> None:
                drained.append(await b.svc.drain(timeout=20))

            nursery.start_soon(drain)
            entry = await a.svc.wait_for(
                b.id, lambda e: e is not None and e.state is State.DRAINING, timeout=5
            )
            assert entry is not None and entry.record.in_flight == 1 and not entry.accepting
            assert a.svc.providers("slow") == []
            with pytest.raises(UnavailableError):
                await a.peer.call(b.peer.addrs[0], "slow", "y", timeout=5)
            assert drained == []  # still waiting for the request in flight
            release.set()
        assert answers == ["done"] and drained == [True]
        entry = await a.svc.wait_for(b.id, lambda e: e is not None and e.record.in_flight == 0, timeout=5)
        assert entry is not None and entry.state is State.DRAINING


async def test_forged_and_replayed_records_are_rejected_and_not_forwarded():
    # x - b - c, m - b: everything from x or m reaches c only through b.
    async with mesh(4, links=[(1, 0), (2, 1), (3, 1)]) as (x, b, c, m):
        await all_see([x, b, c, m])
        old_record = x.svc.get(x.id)
        assert old_record is not None
        # One of x's real gossip messages, kept for an exact replay later.
        x_router = x.svc.router
        assert x_router is not None
        captured = next(
            msg
            for msg in list(x_router.mcache.msgs.values())
            if msg.from_id == x.peer.host.get_id().to_bytes()
        )
        await c.svc.wait_for(x.id, lambda e: e is not None and e.seq > old_record.seq, timeout=5)

        forged = AvailabilityRecord(
            peer_id=x.id,
            seq=x.svc.get(x.id).seq + 10_000_000,  # type: ignore[union-attr]
            state=State.DRAINING,
            capabilities=(("forged", "6.6.6"),),
        )
        body = encode_record(forged)
        signed_by_m = encode_envelope(body, m.peer.identity.sign(signing_input(body)))
        x_id, m_id = x.peer.host.get_id(), m.peer.host.get_id()
        x_keys = x.peer.identity.key_pair
        m_keys = m.peer.identity.key_pair
        seen_forged: list[AvailabilityEntry] = []
        watchers = [n.svc.subscribe() for n in (b, c)]

        async def watch(channel: Any) -> None:
            async for change in channel:
                if change.entry.record.serves("forged"):
                    seen_forged.append(change.entry)

        before_b, before_c = dict(b.svc.stats.rejected), dict(c.svc.stats.rejected)
        async with trio.open_nursery() as nursery:
            for ch in watchers:
                nursery.start_soon(watch, ch)
            seq = 1 << 62
            # 1. m publishes a record naming x (signed by m): origin mismatch.
            inject(m, b, gossip_message(m_keys, m_id, signed_by_m, seq))
            # 2. a gossip message from x carrying a record that m signed: bad record signature.
            inject(m, b, gossip_message(x_keys, x_id, signed_by_m, seq + 1))
            # 3. m claims to be x at the gossip layer: py-libp2p drops it before validation.
            inject(m, b, gossip_message(m_keys, x_id, seal(forged, x.peer.identity), seq + 2))
            # 4. x's old record in a fresh gossip message from x: stale.
            old = seal(old_record.record, x.peer.identity)
            inject(m, b, gossip_message(x_keys, x_id, old, seq + 3))
            # 5. the exact gossip message x sent earlier: a duplicate, dropped unseen.
            inject(m, b, captured)
            # 6. garbage: not even msgpack.
            inject(m, b, gossip_message(m_keys, m_id, b"\xc1not a record", seq + 4))
            with trio.fail_after(5):
                while sum(b.svc.stats.rejected.values()) - sum(before_b.values()) < 4:
                    await trio.sleep(0.05)
            await trio.sleep(1.5)  # time for anything forwarded to reach c
            nursery.cancel_scope.cancel()

        rejected_b = b.svc.stats.rejected
        for reason in ("origin_mismatch", "bad_signature", "stale", "malformed"):
            assert rejected_b[reason] == before_b.get(reason, 0) + 1, (reason, dict(rejected_b))
        assert dict(c.svc.stats.rejected) == before_c  # nothing was forwarded to c
        assert seen_forged == []
        for n in (b, c):
            entry = n.svc.get(x.id)
            assert entry is not None and entry.state is State.READY and not entry.record.serves("forged")
        # b and c still take x's genuine records, which keep coming.
        latest = x.svc.get(x.id).seq  # type: ignore[union-attr]
        await c.svc.wait_for(x.id, lambda e: e is not None and e.seq > latest, timeout=5)


async def test_malformed_gossip_message_does_not_stop_pubsub():
    """py-libp2p 0.8.1: a garbage ``key`` with an unextractable ``from`` raises in its
    signature check and stops the receiver's whole pubsub service, unless guarded."""
    async with mesh(2, links=[(1, 0)]) as (a, b):
        await all_see([a, b])
        bad = rpc_pb2.Message(
            data=b"x",
            topicIDs=[TOPIC],
            from_id=b"not-a-peer-id",
            seqno=b"\x00" * 8,
            signature=b"s" * 64,
            key=b"\x01\x02junk",
        )
        inject(a, b, bad)
        await trio.sleep(0.5)
        assert b.svc.running and b.svc.stats.pubsub_restarts == 0
        assert b.svc.pubsub is not None and b.svc.pubsub.manager.is_running
        latest = b.svc.get(a.id).seq  # type: ignore[union-attr]
        await b.svc.wait_for(a.id, lambda e: e is not None and e.seq > latest, timeout=5)


async def test_services_started_after_connecting_reach_each_other():
    # Connected before pubsub runs, and started a second apart: py-libp2p alone
    # would leave the first one without a stream to the second.
    async with mesh(3, links=[(1, 0), (2, 1)], start_service=False) as nodes:
        for node in nodes:
            await node.peer.nursery.start(node.svc.run)
            await trio.sleep(0.5)
        await all_see(nodes, timeout=10)


# -- publishing rules -------------------------------------------------------------------------


async def test_rate_limit_and_prompt_publication_of_significant_changes():
    slow = AvailabilityConfig(publish_interval=10.0)  # periodic records are far apart
    load = {"in_flight": 0}
    async with mesh(2, links=[(1, 0)], config=slow) as (a, b):
        await all_see([a, b])
        b.svc.load_provider = lambda: LoadSnapshot(load["in_flight"], 0, 4)
        await trio.sleep(1.1)
        # A burst of state changes: at most one record per second goes out.
        before = b.svc.stats.published
        t0 = time.monotonic()
        for state in [State.DRAINING, State.READY] * 5:
            b.svc.set_state(state)
            await trio.sleep(0.1)
        await trio.sleep(1.2)
        elapsed = time.monotonic() - t0
        assert b.svc.stats.published - before <= elapsed / slow.min_publish_gap + 1
        # Reaching capacity is published at once, not after the 10 s period.
        load["in_flight"] = 4
        entry = await a.svc.wait_for(b.id, lambda e: e is not None and e.at_capacity, timeout=3)
        assert entry is not None and not entry.accepting and entry.utilization == 1.0
        # Capabilities too.
        b.svc.set_capabilities([("echo", "1.0"), ("embed", "3")])
        await a.svc.wait_for(b.id, lambda e: e is not None and e.record.serves("embed", "3"), timeout=3)


async def test_change_notifications_and_mesh_view():
    async with mesh(2, links=[], caps=[("echo", "1.0"), ("chat", "2")]) as (a, b):
        changes = a.svc.subscribe()
        await b.peer.connect(a.peer.addrs[0])
        with trio.fail_after(5):
            async for change in changes:
                if change.peer_id == b.id:
                    break
        assert change.kind == "added" and change.previous is None and change.state_changed
        table = a.svc.table()
        assert set(table) == {a.id, b.id} and table[a.id].local and not table[b.id].local
        assert table[b.id].age < 3

        class Card:
            def __init__(self, name: str, version: str) -> None:
                self.name, self.version = name, version

        stranger = "12D3KooWGzh3bDfqNwHPQ6VxMg4KmtATSSRmnfoqxhv7Btd3zMCj"
        cards = {
            b.id: [Card("echo", "1.0"), {"name": "translate", "version": "1"}],
            stranger: {"name": "old", "version": "0"},
        }
        rows = {r.peer_id: r for r in a.svc.mesh_view(cards)}
        assert set(rows) == {a.id, b.id, stranger}
        caps = {c.name: c for c in rows[b.id].capabilities}
        assert caps["echo"].available and isinstance(caps["echo"].card, Card)
        assert caps["chat"].available and caps["chat"].card is None and caps["chat"].version == "2"
        assert not caps["translate"].available and caps["translate"].card == {
            "name": "translate",
            "version": "1",
        }
        assert rows[stranger].state == "unknown" and rows[stranger].availability is None
        assert rows[b.id].to_dict()["state"] == "ready"
        assert mesh_view({}, {}) == []
        await changes.aclose()


# -- lifecycle ---------------------------------------------------------------------------------


async def test_start_stop_leaves_nothing_behind(fd_count):
    async with mesh(2, links=[(1, 0)], start_service=False) as (a, b):
        host = a.peer.host
        network = host.get_network()

        def snapshot() -> tuple[int, int, int]:
            return (len(getattr(network, "notifees", [])), threading.active_count(), fd_count())

        def no_more_than(before: tuple[int, ...]) -> bool:
            # Other tests' connections may still be closing: nothing may *grow*.
            now = snapshot()
            return now[0] == before[0] and all(n <= b for n, b in zip(now[1:], before[1:], strict=True))

        def meshsub_handlers() -> list[str]:
            return [str(p) for p in host.get_mux().get_protocols() if "meshsub" in str(p)]

        # 1. Alone (b runs no pubsub): every task the service started ends with it.
        await trio.sleep(0.5)  # let the peers' own start-up tasks finish
        tasks, base = count_tasks(trio.lowlevel.current_root_task()), snapshot()
        for _ in range(3):
            async with trio.open_nursery() as nursery:
                svc = await start_availability(host, a.peer.identity, nursery, FAST)
                await svc.wait_for(a.id, timeout=5)  # its own record
                nursery.cancel_scope.cancel()
            assert not svc.running and meshsub_handlers() == []
            await trio.sleep(0.1)
            assert count_tasks(trio.lowlevel.current_root_task()) <= tasks
            assert no_more_than(base), (snapshot(), base)

        # 2. With a neighbour that keeps running: each restart meshes again, and
        #    nothing (threads, notifees, descriptors) accumulates.
        await b.peer.nursery.start(b.svc.run)
        await trio.sleep(0.2)
        base = snapshot()
        last = 0
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                svc = await start_availability(host, a.peer.identity, nursery, FAST)
                await svc.wait_for(b.id, timeout=10)
                entry = await b.svc.wait_for(
                    a.id, lambda e, last=last: e is not None and e.seq > last, timeout=10
                )
                last = entry.seq if entry is not None else last
                nursery.cancel_scope.cancel()
            assert meshsub_handlers() == []
            await trio.sleep(0.1)
            assert no_more_than(base), (snapshot(), base)
        await trio.sleep(1.5)  # b notices the reset streams when it next writes
        assert b.svc.pubsub is not None and a.peer.host.get_id() not in b.svc.pubsub.peers


async def test_run_twice_is_refused_and_config_is_checked():
    with pytest.raises(ConfigError):
        AvailabilityConfig(min_publish_gap=0.5)
    with pytest.raises(ConfigError):
        AvailabilityConfig(publish_interval=2.0, ttl=1.5)
    with pytest.raises(ConfigError):
        AvailabilityConfig(degree=3, degree_low=4)
    assert AvailabilityConfig(publish_interval=4).effective_ttl == 12
    async with mesh(1) as (a,):
        with pytest.raises(RuntimeError):
            await a.svc.run()
        with pytest.raises(ConfigError):
            a.svc.set_capabilities([("x", "1"), ("x", "2")])
        with pytest.raises(ConfigError):
            a.svc.set_capabilities([(f"{i:03d}" + "n" * 250, "v" * 60) for i in range(20)])
        other = Peer(dht_mode="client", **NO_GOSSIP)
        with pytest.raises(ConfigError):
            AvailabilityService(a.peer.host, other.identity)
        # A second pubsub on the same host is refused, not left to fight the first.
        with pytest.raises(ConfigError, match="one AvailabilityService per host"):
            await start_availability(a.peer.host, a.peer.identity, a.peer.nursery)
        assert a.svc.running
