"""Capability discovery over the DHT, with real peers on 127.0.0.1.

The big mesh spans two OS processes (:func:`modelnet_p2p.testing.open_worker` runs part
of it). Lookups are shown to go over the network: they are made from a fresh
peer, or from one whose local stores were cleared, and the tests check that
nothing was stored locally along the way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID

from modelnet_p2p import BadRequestError, Capability, CapabilityCard, ConfigError, Peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import KadKind, KadPeer, KadRequest, peer_id_bytes
from modelnet_p2p.proto.card import (
    encode_card,
    encode_envelope,
    open_card,
    seal,
    signing_input,
    task_key,
    value_key,
)
from modelnet_p2p.proto.framing import encode_varint
from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID, Discovery, Query
from modelnet_p2p.testing import open_peers, open_worker

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 20.0, interval: float = 0.1) -> T:
    """Call ``check`` until it returns something true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(interval)


def ids(cards: list[CapabilityCard]) -> set[str]:
    return {c.peer_id for c in cards}


async def answer(request: Any) -> str:
    return "ok"


def stores_are_empty(peer: Peer) -> bool:
    """True if the peer holds no provider record and no card of anyone else."""
    kad = peer.discovery.kad
    own = value_key(peer.peer_id).encode()
    return not kad.provider_keys() and all(k == own for k, _ in kad.local_values())


# -- the mesh over two processes -------------------------------------------------------

LLAMA_8B = {"name": "llama3", "task": "chat", "version": "8b", "family": "llama", "tags": ["fast", "en"]}
LLAMA_70B = {"name": "llama3", "task": "chat", "version": "70b", "family": "llama", "tags": ["en"]}
E5 = {"name": "e5", "task": "embedding", "tags": ["en"], "output_modalities": ["embedding"]}
MISTRAL = Capability(name="mistral", tasks=("chat", "summarization"), tags=("fast",))


@pytest.mark.timeout(200)
async def test_fresh_peer_finds_every_provider_set_in_a_mesh_of_two_processes() -> None:
    """21 peers (12 in a worker process, 9 here, one of them a DHT client), 3 of them
    serving overlapping capabilities; a fresh peer that knows one address finds
    each provider set completely, by task, by model and by tag."""
    with trio.fail_after(180):  # ~35 s on a quiet 2-core machine; generous under load
        async with open_worker(
            12, serve={4: [LLAMA_8B], 9: [LLAMA_70B, E5]}, max_seconds=120, startup_timeout=60
        ) as worker:
            p1, p2 = worker.peers[4]["id"], worker.peers[9]["id"]
            boot = [w["addrs"][0] for w in worker.peers]
            async with open_peers(8, bootstrap=[boot[0]]) as local:
                async with Peer(bootstrap=[boot[5]], dht_mode="client") as client:
                    assert client.discovery.mode == "client"
                    for p in [*local, client]:
                        await p.discovery.bootstrapped.wait()
                    local[3].serve(MISTRAL, answer)
                    p3 = local[3].peer_id
                    # Announce once everyone is up, so the records reach the whole mesh.
                    assert (await local[3].announce()) is not None
                    assert (await worker.request({"cmd": "announce"}))["announced"] == 2

                    async with Peer(listen=[], bootstrap=[boot[7]]) as fresh:
                        assert fresh.discovery.mode == "client"  # auto: no listen address
                        assert fresh.discovery.kad.routing_table_size() <= 1
                        expected = {
                            ("chat", None, None, ()): {p1, p2, p3},
                            ("summarization", None, None, ()): {p3},
                            ("embedding", None, None, ()): {p2},
                            (None, "llama3", None, ()): {p1, p2},
                            (None, "LLaMA3", "70B", ()): {p2},
                            (None, None, None, ("fast",)): {p1, p3},
                            (None, None, None, ("en",)): {p1, p2},
                            ("chat", None, None, ("fast", "en")): {p1},
                        }
                        for (task, model, version, tags), want in expected.items():

                            async def found(
                                task: Any = task,
                                model: Any = model,
                                version: Any = version,
                                tags: Any = tags,
                                want: set[str] = want,
                            ) -> set[str] | None:
                                cards = await fresh.discover(task, model=model, version=version, tags=tags)
                                assert len(cards) == len(ids(cards)), "a peer was listed twice"
                                got = ids(cards)
                                assert got <= want, f"{task} {model} {version} {tags}: extra {got - want}"
                                return got if got == want else None

                            await eventually(found)
                        # Everything came from the network: the fresh peer stored nothing.
                        assert stores_are_empty(fresh)
                        assert fresh.discovery.requests_sent > 0
                        cards = await fresh.discover("embedding")
                        # Capabilities are sorted by name: e5, then llama3.
                        assert cards[0].capabilities[0].output_modalities == ("embedding",)
                        assert cards[0].dial_addrs[0].endswith(p2)

                        # The cards are good enough to call the providers.
                        answer_ = await fresh.call(cards[0].dial_addrs[0], "e5", "hi", timeout=10)
                        assert answer_.text == "answer from e5"

                    # A member of the mesh with its stores cleared also finds the full set.
                    member = local[6]
                    member.discovery.kad.clear_local_stores()

                    async def member_finds() -> bool:
                        return ids(await member.discover("chat")) == {p1, p2, p3}

                    await eventually(member_finds)
                    # The client peer took part without breaking anything, and was
                    # kept out of the servers' routing tables.
                    async def client_finds() -> bool:
                        return ids(await client.discover(tags=["fast"])) == {p1, p3}

                    # Retried like the lookups above: under the parallel suite's load one lookup
                    # by this client-mode peer once found nothing within its 10 s.
                    await eventually(client_finds)
                    for p in local:
                        assert not p.discovery.kad.in_routing_table(client.peer_id)


# -- bad and changed cards ------------------------------------------------------------


def forged_envelope(card: CapabilityCard, signer: Identity) -> bytes:
    body = encode_card(card)
    return encode_envelope(body, signer.sign(signing_input(body)))


def put_message(key: str, value: bytes) -> KadRequest:
    return KadRequest(KadKind.PUT_VALUE, key.encode(), value=value)


def put_pb(key: str, value: bytes) -> Message:
    msg = Message(type=Message.MessageType.PUT_VALUE, key=key.encode())
    msg.record.key = key.encode()
    msg.record.value = value
    return msg


async def raw_request(sender: Peer, receiver: Peer, msg: Message) -> None:
    """Send one hand-made protobuf DHT message, and read whatever comes back."""
    stream = await sender.host.new_stream(ID.from_base58(receiver.peer_id), [TProtocol(DHT_PROTOCOL_ID)])
    data = msg.SerializeToString()
    try:
        with trio.move_on_after(5):
            await stream.write(encode_varint(len(data)) + data)
            await stream.close()
            while await stream.read(65536):
                pass
    except Exception:
        pass
    finally:
        with trio.move_on_after(1):
            await stream.reset()


async def test_forged_expired_and_oversized_cards_are_rejected_by_remote_servers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelnet_p2p.services.discovery")
    with trio.fail_after(30):
        async with open_peers(3) as (server, attacker, victim):
            now = int(time.time() * 1000)
            vkey = value_key(victim.peer_id)
            victim_card = CapabilityCard(victim.peer_id, (), 1, now, now + 60_000, (Capability("x"),))
            expired = seal(
                CapabilityCard(attacker.peer_id, (), 1, now - 120_000, now - 60_000, (Capability("x"),)),
                attacker.identity,
            )
            oversized = (
                seal(
                    CapabilityCard(attacker.peer_id, (), 1, now, now + 60_000, (Capability("x"),)),
                    attacker.identity,
                ).envelope
                + b"\x00" * 20_000
            )
            own_card = seal(
                CapabilityCard(attacker.peer_id, (), 1, now, now + 60_000, (Capability("x"),)),
                attacker.identity,
            )
            attempts = {
                "forged": (vkey, forged_envelope(victim_card, attacker.identity)),
                "expired": (value_key(attacker.peer_id), expired.envelope),
                "oversized": (value_key(attacker.peer_id), oversized),
                "misfiled": (vkey, own_card.envelope),
                "garbage": (vkey, b"\x81\xa4card\xc4\x00"),
            }
            for name, (key, value) in attempts.items():
                reply = await attacker.discovery.request(server.peer_id, put_message(key, value))
                assert reply is None, f"{name} card was accepted"
                assert server.discovery.kad.local_value(key.encode()) is None, name
            reasons = [r.getMessage() for r in caplog.records if "rejected card" in r.getMessage()]
            for reason in ("does not match", "expired", "exceeds", "stored under the key of"):
                assert any(reason in r for r in reasons), (reason, reasons)
            # Values outside the card namespace are refused too (strict validation).
            for key in ("/junk/x", "no-namespace"):
                assert await attacker.discovery.request(server.peer_id, put_message(key, b"v")) is None, key
                assert server.discovery.kad.local_value(key.encode()) is None, key
            # The server survived all of it and still stores a good card.
            good = (value_key(attacker.peer_id), own_card.envelope)
            assert await attacker.discovery.request(server.peer_id, put_message(*good)) is not None
            assert server.discovery.kad.local_value(good[0].encode()) is not None


async def test_discovery_skips_a_provider_whose_card_is_forged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelnet_p2p.services.discovery")
    with trio.fail_after(30):
        async with open_peers(4) as peers:
            honest, liar = peers[1], peers[2]
            honest.serve(Capability("good", task="chat"), answer)
            await honest.announce()
            # Every server lists the liar as a "chat" provider, and the only card of
            # the liar anywhere names the liar but was signed by another key.
            now = int(time.time() * 1000)
            fake = CapabilityCard(liar.peer_id, (), 1, now, now + 60_000, (Capability("evil", task="chat"),))
            envelope = forged_envelope(fake, Identity.generate())
            liar_info = KadPeer(liar.peer_id, tuple(liar.discovery.own_addrs()))
            for p in peers:
                p.discovery.kad.add_local_provider(task_key("chat"), liar_info)
                p.discovery.kad.store_value(value_key(liar.peer_id).encode(), envelope, time.time() + 3600)
            async with Peer(listen=[], bootstrap=[peers[0].addrs[0]]) as fresh:
                cards = await fresh.discover("chat")
                assert ids(cards) == {honest.peer_id}
                assert cards[0].capabilities[0].name == "good"
        assert any("signature does not match" in r.getMessage() for r in caplog.records)


async def test_an_updated_card_replaces_the_old_one_everywhere() -> None:
    with trio.fail_after(40):
        async with open_peers(6) as peers:
            p = peers[2]
            key = value_key(p.peer_id).encode()
            p.serve(Capability("alpha", task="chat", version="1"), answer)
            first = await p.announce()
            assert first is not None

            def holders(card: CapabilityCard) -> list[Peer]:
                out = []
                for q in peers:
                    record = q.discovery.kad.local_value(key)
                    if q is not p and record is not None and open_card(record).seq >= card.seq:
                        out.append(q)
                return out

            old_holders = await eventually(lambda: _now(holders(first)))
            assert len(old_holders) >= 3
            p.serve(Capability("alpha", task="chat", version="2"), answer)
            second = await p.announce()
            assert second is not None and second.seq > first.seq

            async def replaced() -> bool:
                return all(q in holders(second) for q in old_holders)

            await eventually(replaced)
            # Replaying the old card changes nothing, on the remote PUT path
            # (select(key, [existing, new])) and on the local put path (select(key, [new, old])).
            holder = old_holders[0]
            replay = put_message(key.decode(), first.envelope)
            assert await p.discovery.request(holder.peer_id, replay) is None
            assert holder in holders(second)
            with pytest.raises(ValueError):
                await holder.discovery.kad.put_value(key.decode(), first.envelope)
            assert holder in holders(second)
            async with Peer(listen=[], bootstrap=[peers[0].addrs[0]]) as fresh:
                cards = await fresh.discover(model="alpha")
                assert len(cards) == 1 and cards[0].seq >= second.seq
                assert cards[0].capabilities[0].version == "2"
                assert [c.peer_id for c in await fresh.discover(model="alpha", version="2")] == [p.peer_id]
                assert await fresh.discover(model="alpha", version="1") == []
            # unserve withdraws the capability: the new (empty) card replaces the old.
            p.unserve("alpha")
            third = await p.announce()
            assert third is not None and third.capabilities == ()
            await eventually(lambda: _now(all(q in holders(third) for q in old_holders)))


async def _now(value: T) -> T:
    return value


async def test_a_provider_that_leaves_disappears_after_its_ttl() -> None:
    with trio.fail_after(40):
        async with open_peers(5) as peers:
            async with Peer(bootstrap=[peers[0].addrs[0]], card_ttl=3.0, announce_interval=1.0) as provider:
                provider.serve(Capability("short-lived", task="chat"), answer)
                pid = provider.peer_id
                first = await provider.announce()
                assert first is not None
                async with Peer(listen=[], bootstrap=[peers[1].addrs[0]]) as fresh:
                    await eventually(lambda: _found(fresh, pid))

                    # Re-announced before it expires: still found after the first card expired.
                    async def renewed() -> bool:
                        cards = await fresh.discover("chat")
                        past = int(time.time() * 1000) > first.expires_at
                        return past and ids(cards) == {pid} and cards[0].seq > first.seq

                    await eventually(renewed)
            # The provider is gone; its records stay in the DHT until they expire.
            async with Peer(listen=[], bootstrap=[peers[1].addrs[0]]) as fresh:

                async def gone() -> bool:
                    return pid not in ids(await fresh.discover("chat", timeout=5))

                await eventually(gone, timeout=20)
            for q in peers:
                record = q.discovery.kad.local_value(value_key(pid).encode())
                assert record is None or open_card(record).expired(int(time.time() * 1000))


async def _found(peer: Peer, pid: str) -> bool:
    return pid in ids(await peer.discover("chat"))


# -- protocol, modes, robustness ---------------------------------------------------


async def test_the_dht_speaks_its_own_protocol_id() -> None:
    with trio.fail_after(20):
        async with open_peers(2) as (a, b), Peer(network="testnet", bootstrap=[a.addrs[0]]) as t:
            protocols = {str(p) for p in a.host.get_mux().get_protocols() if p}
            assert DHT_PROTOCOL_ID in protocols
            assert "/ipfs/kad/1.0.0" not in protocols
            assert t.discovery.protocol == "/modelnet/testnet/kad/1.0.0"
            b_id = ID.from_base58(b.peer_id)
            with pytest.raises(Exception, match="stream"):
                await a.host.new_stream(b_id, [TProtocol("/ipfs/kad/1.0.0")])
            # Peers of another network are not DHT peers of ours.
            assert not a.discovery.kad.in_routing_table(t.peer_id)
            # A stopped DHT answers nothing (py-libp2p would leave its handler serving).
            req = KadRequest(KadKind.FIND_NODE, peer_id_bytes(b.peer_id))
            assert await a.discovery.request(b.peer_id, req) is not None
            b.discovery.stop()
            assert await a.discovery.request(b.peer_id, req) is None


async def test_dht_mode_is_automatic_and_can_be_overridden() -> None:
    with trio.fail_after(20):
        async with open_peers(2) as (a, b):
            assert a.discovery.mode == "server"
            async with Peer(listen=[], bootstrap=[a.addrs[0]]) as auto_client:
                assert auto_client.discovery.mode == "client"
                # A peer nobody can dial has nothing to announce.
                auto_client.serve("x", answer)
                assert await auto_client.announce() is None
            async with Peer(bootstrap=[a.addrs[0]], dht_mode="client") as client:
                assert client.discovery.mode == "client"
                # A client can still announce: servers store its records.
                client.serve(Capability("from-client", task="tool"), answer)
                assert await client.announce() is not None
                cards = await eventually(lambda: b.discover("tool"))
                assert ids(cards) == {client.peer_id}
            async with Peer(listen=[], dht_mode="server") as forced:
                assert forced.discovery.mode == "server"
        with pytest.raises(ConfigError):
            Peer(dht_mode="sometimes")  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            Peer(card_ttl=10, announce_interval=20)


async def test_discover_iter_limit_and_bad_queries() -> None:
    with trio.fail_after(30):
        async with open_peers(5) as peers:
            for i in (1, 2, 3):
                peers[i].serve(Capability(f"m{i}", task="classification", tags=("t",)), answer)
                await peers[i].announce()
            want = {peers[i].peer_id for i in (1, 2, 3)}
            async with Peer(listen=[], bootstrap=[peers[4].addrs[0]]) as fresh:
                await eventually(lambda: _all(fresh, want))
                seen = []
                async for card in fresh.discover_iter(tags="t"):
                    seen.append(card.peer_id)
                assert set(seen) == want and len(seen) == 3
                assert len(await fresh.discover("classification", limit=2)) == 2
                async for _card in fresh.discover_iter("classification"):
                    break  # leaving early stops the search
                assert await fresh.discover("nothing-serves-this") == []
                assert ids(await fresh.discover()) == want  # no criteria: a browse (test_browse.py)
                for bad in ({"version": "1"}, {"task": "x", "limit": 0}):
                    with pytest.raises(BadRequestError):
                        await fresh.discover(**bad)
            # A peer finds its own card too.
            assert peers[1].peer_id in ids(await peers[1].discover(model="m1"))
            # find_providers: call targets for a capability name, this peer left out.
            targets = await peers[0].find_providers("m2")
            assert targets == [f"{peers[2].discovery.own_addrs()[0]}/p2p/{peers[2].peer_id}"]
            assert (await peers[0].call(targets[0], "m2", "hi", timeout=10)).text == "ok"
            assert await peers[1].find_providers("m1") == []


async def _all(peer: Peer, want: set[str]) -> bool:
    return ids(await peer.discover("classification")) == want


async def test_serve_refuses_a_capability_that_cannot_be_announced() -> None:
    async with Peer() as p:
        with pytest.raises(ConfigError):
            p.serve(Capability("many-tags", tags=tuple(f"t{i}" for i in range(40))), answer)
        with pytest.raises(ConfigError):
            p.serve(Capability("long-desc", description="x" * 5000), answer)
        assert p.capabilities == []


async def test_garbage_on_the_dht_protocol_never_crashes_a_peer() -> None:
    with trio.fail_after(30):
        async with open_peers(2) as (a, b):
            b_id = ID.from_base58(b.peer_id)
            proto = TProtocol(DHT_PROTOCOL_ID)
            for junk in (b"\xff" * 12, b"\x05hello", b"\x80\x80\x80\x80\x04" + b"x" * 100, b""):
                stream = await a.host.new_stream(b_id, [proto])
                await stream.write(junk)
                await stream.close()
            bad = [
                Message(type=Message.MessageType.GET_PROVIDERS, key=b""),
                Message(type=Message.MessageType.GET_VALUE, key=b"x" * 500),
                Message(type=Message.MessageType.ADD_PROVIDER, key=b"k" * 100),
                put_pb("/modelnet-card/not-a-peer", b"\x00"),
                Message(type=Message.MessageType.PUT_VALUE, key=b"\xff\xfe"),
            ]
            for msg in bad:
                await raw_request(a, b, msg)
            # b still serves and answers.
            b.serve(Capability("still-here", task="chat"), answer)
            await b.announce()
            assert ids(await eventually(lambda: a.discover("chat"))) == {b.peer_id}


async def test_peers_with_discovery_leak_nothing(fd_count: Callable[[], int]) -> None:
    async with Peer() as root:
        root.serve(Capability("r", task="chat"), answer)

        async def cycle() -> None:
            async with Peer(bootstrap=[root.addrs[0]]) as p:
                p.serve(Capability("c", task="chat"), answer)
                await p.announce()
                await p.discover("chat")

        await cycle()
        before = fd_count()
        for _ in range(8):
            await cycle()
        await trio.sleep(0.2)
        assert fd_count() <= before + 2


# -- one Discovery on its own host: injected clocks ------------------------------------------

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


@asynccontextmanager
async def lone_discovery(**kwargs: Any) -> AsyncIterator[Discovery]:
    """A Discovery serving one chat capability on a host of its own (nobody to announce to)."""
    identity = Identity.generate()
    caps = [Capability("x", task="chat")]
    discovery = Discovery(identity, lambda: list(caps), **kwargs)
    host = build_host(identity)
    async with running_host(host, [LOOPBACK]), trio.open_nursery() as nursery:
        await discovery.start(host, nursery)
        try:
            yield discovery
        finally:
            discovery.stop()
            nursery.cancel_scope.cancel()


async def test_records_expire_on_the_injected_wall_clock() -> None:
    now = [time.time()]
    async with lone_discovery(card_ttl=10.0, announce_interval=5.0, wall_clock=lambda: now[0]) as d:
        result = await d.announce()  # alone: stored here only
        assert result is not None and result.value_stored == 0 and result.provider_sends == 0
        assert result.card.issued_at == int(now[0] * 1000)
        assert result.card.expires_at == result.card.issued_at + 10_000
        vkey = value_key(d.peer_id).encode()
        assert d.kad.local_value(vkey) == result.card.envelope
        assert [p.peer_id for p in d.kad.local_providers(task_key("chat"))] == [d.peer_id]
        now[0] += 9.9
        assert d.expire_records() == 0 and d.kad.local_value(vkey) is not None
        now[0] += 0.2
        assert d.expire_records() == 1
        assert d.kad.local_value(vkey) is None
        assert d.kad.local_providers(task_key("chat")) == []


async def test_a_lone_peer_retries_its_announce_with_backoff(mock_clock: trio.testing.MockClock) -> None:
    """Nobody stored the card: retried after 1, 2, 4, ... s, then every announce_interval."""
    mock_clock.autojump_threshold = 0.02
    async with lone_discovery(card_ttl=300.0, announce_interval=120.0) as d:
        await d.bootstrap([])  # starts the announcer
        t0 = trio.current_time()
        d.changed()
        # Announces at t0 + 0.05, then 1, 2, 4, 8, 16, 32, 64 s apart (each + 0.05 to settle),
        # then every 120 s.
        for at, count in [(0.5, 1), (1.5, 2), (3.5, 3), (16.0, 5), (130.0, 8), (250.0, 9), (370.0, 10)]:
            await trio.sleep_until(t0 + at)
            assert d.announces == count, (at, d.announces)


def test_names_are_matched_case_insensitively() -> None:
    assert Query(model="LLaMA3").key()[1] == Query(model=" llama3").key()[1]
    assert Query(model="LLaMA3", version="70B").key() == Query(model="llama3", version="70b").key()
    assert Query(task="Chat").key()[0] == "task:chat"
    d = Discovery(Identity.generate(), list)
    d.check_capabilities([Capability("echo"), Capability("other")])
    with pytest.raises(ConfigError, match="same name"):
        d.check_capabilities([Capability("Echo"), Capability("echo")])


async def test_a_first_announce_of_every_record_restarts_the_full_announce_interval(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A peer that begins serving 10 s after it started places every record then: its next
    full announce is an interval (12 s) after that one, not 12 s after the peer started
    (where it used to repeat all that work 2 s later)."""
    mock_clock.autojump_threshold = 0.1  # the DHT traffic between the two hosts runs first
    async with open_peers(2, card_ttl=30.0, announce_interval=12.0, gossip=False) as (server, provider):
        t0 = trio.current_time()
        await trio.sleep(10.0)
        provider.serve(Capability("late", task="chat"), answer)
        with trio.fail_after(20):
            while provider.discovery.announces < 1:
                await trio.sleep(0.1)
        first = provider.discovery.last_announce
        assert first is not None and first.confirmed
        await trio.sleep_until(t0 + 20.0)  # past the old full announce at t0 + 12
        assert provider.discovery.announces == 1
        await trio.sleep_until(t0 + 23.0)  # an interval after the first announce
        assert provider.discovery.announces == 2
        assert provider.peer_id in {p.peer_id for p in server.discovery.kad.local_providers(task_key("chat"))}
