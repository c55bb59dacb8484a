"""Canaries for ``modelnet_p2p/p2p/_compat/kad.py``: stock py-libp2p Kademlia still has the bugs.

Each ``test_stock_*`` test runs py-libp2p's own ``libp2p.kad_dht`` and asserts the behaviour a
shim corrects. When one fails, upstream has changed: check whether the correction in
``p2p/_compat/kad.py`` is still needed, and drop it (and its canary) if not.

The ``test_ours_*`` tests check the corrections themselves where a failure would be silent:
above all, that no record of ours ever goes out on the public IPFS DHT's ``/ipfs/kad/1.0.0``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.pb import crypto_pb2
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht import common as kad_common
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.provider_store import (
    PROVIDER_RECORD_EXPIRATION_INTERVAL,
    ProviderStore,
)
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.utils import InvalidRecordType
from libp2p.tools.anyio_service import background_trio_service

from modelnet_p2p import Capability, Peer
from modelnet_p2p.p2p._compat.kad import KadHostView, MeshKadDHT, MeshProviderStore
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import InboundLimits, KadNode, PrivateProtocolError
from modelnet_p2p.proto.card import task_key
from modelnet_p2p.proto.framing import encode_varint
from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID

IPFS_KAD = "/ipfs/kad/1.0.0"
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def served(host: IHost) -> set[str]:
    return {str(p) for p in host.get_mux().get_protocols() if p}


def new_host() -> IHost:
    return build_host(Identity.generate())


def some_peer() -> tuple[ID, multiaddr.Multiaddr]:
    pid = Identity.generate().peer_id
    return pid, multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9")


@asynccontextmanager
async def listening(host: IHost) -> AsyncIterator[str]:
    """Run ``host`` on 127.0.0.1 and yield its dial address."""
    async with running_host(host, [LOOPBACK]):
        addr = next(str(a) for a in host.get_addrs() if "/tcp/" in str(a))
        if "/p2p/" not in addr:
            addr = f"{addr}/p2p/{host.get_id()}"
        yield addr


# -- the protocol id ------------------------------------------------------------------------


def test_stock_kad_dht_ignores_protocol_prefix() -> None:
    """Shim: KadHostView. ``protocol_prefix`` is stored, never used: the handler is /ipfs/kad."""
    host = new_host()
    KadDHT(host, DHTMode.SERVER, protocol_prefix=TProtocol("/modelnet"))
    assert IPFS_KAD in served(host)
    assert "/modelnet/kad/1.0.0" not in served(host)
    assert PROTOCOL_ID == IPFS_KAD


async def test_stock_routing_table_admits_only_peers_listing_ipfs_kad() -> None:
    """Shim: _PeerstoreView. The identify check re-imports the /ipfs/kad constant."""
    host = new_host()
    table = RoutingTable(host.get_id(), host)
    ours, addr = some_peer()
    host.get_peerstore().add_addrs(ours, [addr], 600)
    host.get_peerstore().add_protocols(ours, [DHT_PROTOCOL_ID])
    assert not await table.add_peer(ours)
    theirs, addr = some_peer()
    host.get_peerstore().add_addrs(theirs, [addr], 600)
    host.get_peerstore().add_protocols(theirs, [IPFS_KAD])
    assert await table.add_peer(theirs)


def test_ours_kad_node_refuses_the_ipfs_id_and_checks_its_handler() -> None:
    host = new_host()
    node = KadNode(host, DHT_PROTOCOL_ID, **_small())  # type: ignore[arg-type]
    with pytest.raises(PrivateProtocolError):
        node.check_protocols()  # not started: no handler for our id yet
    with pytest.raises(PrivateProtocolError):
        KadNode(host, IPFS_KAD, **_small())  # type: ignore[arg-type]


def _small() -> dict[str, object]:
    return {
        "server": True,
        "provider_ttl": 60,
        "max_providers_per_key": 8,
        "add_provider_rate": 8,
        "inbound": InboundLimits(max_streams=8),
        "max_values": 64,
        "max_value_bytes": 1 << 20,
        "identify_wait": 1,
        "max_response_size": 1 << 16,
        "max_closer": 20,
        "max_providers": 8,
    }


async def test_ours_startup_check_fails_loudly_if_anything_serves_ipfs_kad() -> None:
    """If the proxy ever stopped working, the peer would refuse to start, not leak records."""
    host = new_host()
    async with trio.open_nursery() as nursery:
        node = KadNode(host, DHT_PROTOCOL_ID, **_small())  # type: ignore[arg-type]

        async def refresh() -> None:
            pass

        await node.start(nursery, refresh)
        assert DHT_PROTOCOL_ID in served(host) and IPFS_KAD not in served(host)
        node.check_protocols()
        # Simulate upstream bypassing the view: a stock DHT registers /ipfs/kad on the host.
        KadDHT(host, DHTMode.SERVER)
        with pytest.raises(PrivateProtocolError, match=r"/ipfs/kad/1\.0\.0"):
            node.check_protocols()
        node.stop()
        nursery.cancel_scope.cancel()


async def test_ours_records_never_go_out_on_ipfs_kad() -> None:
    """A peer that speaks only /ipfs/kad/1.0.0 sits in the middle of a mesh and gets nothing.

    The spy runs a stock py-libp2p DHT server (as a peer of the public IPFS DHT would), is
    every modelnet peer's first bootstrap peer, and counts every stream opened to it on
    /ipfs/kad/1.0.0. The mesh joins, announces, refreshes and discovers: zero streams.
    """
    spy = new_host()
    inbound: list[str] = []
    stock = KadDHT(spy, DHTMode.SERVER)

    async def count(stream: INetStream) -> None:
        inbound.append(str(stream.muxed_conn.peer_id))
        await stock.handle_stream(stream)

    spy.set_stream_handler(PROTOCOL_ID, count)
    with trio.fail_after(60):
        async with listening(spy) as spy_addr, background_trio_service(stock):
            async with Peer(bootstrap=[spy_addr]) as a, Peer(bootstrap=[spy_addr, a.addrs[0]]) as b:
                async with Peer(listen=[], bootstrap=[spy_addr, b.addrs[0]]) as client:
                    b.serve(Capability("secret-model", task="chat"), _answer)
                    result = await b.discovery.announce()
                    assert result is not None and result.value_stored >= 1
                    await a.discovery.refresh()

                    async def found() -> bool:
                        return [c.peer_id for c in await client.discover("chat")] == [b.peer_id]

                    while not await found():
                        await trio.sleep(0.1)
                    for p in (a, b, client):
                        assert not p.discovery.kad.in_routing_table(str(spy.get_id()))
                    await trio.sleep(0.5)  # ADD_PROVIDER is fire-and-forget
            assert stock.provider_store.get_providers(task_key("chat")) == []
            assert stock.value_store.size() == 0
    assert inbound == [], f"streams on {IPFS_KAD} from {inbound}"


async def _answer(request: object) -> str:
    return "ok"


# -- stores --------------------------------------------------------------------------------


async def test_stock_find_providers_returns_early_from_the_local_store() -> None:
    """Shim: none needed beyond doing lookups ourselves (services/discovery/lookup.py)."""
    host = new_host()

    class NoNetwork:
        asked = 0

        async def find_closest_peers_network(self, key: bytes) -> list[ID]:
            NoNetwork.asked += 1
            return []

    store = ProviderStore(host, peer_routing=NoNetwork())
    pid, addr = some_peer()
    store.add_provider(b"k" * 34, PeerInfo(pid, [addr]))
    found = await store.find_providers(b"k" * 34, 20)
    assert [p.peer_id for p in found] == [pid]
    assert NoNetwork.asked == 0  # the network was never asked


def test_stock_provider_store_keeps_48_hours_and_20_per_key() -> None:
    """Shim: MeshProviderStore."""
    assert PROVIDER_RECORD_EXPIRATION_INTERVAL == 48 * 60 * 60
    store = ProviderStore(new_host())
    for _ in range(21):
        pid, addr = some_peer()
        store.add_provider(b"popular", PeerInfo(pid, [addr]))
    assert len(store.get_providers(b"popular")) == 20


def test_stock_value_store_put_marks_every_key_for_republish() -> None:
    """Shim: store_value."""
    dht = KadDHT(new_host(), DHTMode.SERVER)
    dht.value_store.put(b"/modelnet-card/x", b"v", validity=0.0)
    assert b"/modelnet-card/x" in dht.value_store.local_keys


def test_stock_value_store_keeps_50000_values_of_a_mib() -> None:
    """Shim: MeshValueStore (a total budget)."""
    assert kad_common.MAX_VALUE_STORE_SIZE == 50_000
    assert kad_common.MAX_RECORD_SIZE == 1 << 20
    assert kad_common.MAX_DHT_MESSAGE_SIZE == 4 << 20


def test_stock_strict_kad_dht_still_stores_pk_and_ipns_values() -> None:
    """Shim: drop_default_validators. Strict validation keeps py-libp2p's pk and ipns validators,
    and a /pk/ value may carry any unknown protobuf field (the red team stored 900 kB each)."""
    dht = KadDHT(new_host(), DHTMode.SERVER, strict_validation=True)
    assert dht.validator is not None
    ident = Identity.generate()
    pub = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=ident.key_pair.public_key.to_bytes())
    value = pub.SerializeToString() + bytes([(15 << 3) | 2]) + encode_varint(1000) + bytes(1000)
    key = "/pk/" + ID.from_pubkey(ident.key_pair.public_key).to_bytes().hex()
    dht.validator.validate(key, value)  # accepted: no exception
    ours = MeshKadDHT(
        KadHostView(new_host(), DHT_PROTOCOL_ID),
        True,
        deferred=None,  # type: ignore[arg-type]
        provider_ttl=60,
        max_providers_per_key=8,
        add_provider_rate=8,
        inbound=InboundLimits(),
        max_values=8,
        max_value_bytes=1 << 16,
        identify_wait=1,
        wall_clock=lambda: 1000.0,
    )
    assert ours.validator is not None
    with pytest.raises(InvalidRecordType):
        ours.validator.validate(key, value)


def test_ours_provider_store_answers_verified_first_and_evicts_refuted_first() -> None:
    store = MeshProviderStore(new_host(), None, ttl=60, max_per_key=3, wall_clock=lambda: clock[0])
    store.verifier = _never  # records from the network get verdicts only from the test
    a, b, c, d, e = (some_peer() for _ in range(5))
    for t, p in ((1.0, a), (2.0, b)):
        clock[0] = t
        store.add_provider(b"k", PeerInfo(p[0], [p[1]]))
    clock[0] = 3.0
    store.add_verified(b"k", PeerInfo(c[0], [c[1]]))

    def answered() -> list[ID]:
        return [p.peer_id for p in store.get_providers(b"k")]

    assert answered() == [c[0], b[0], a[0]]  # verified, then new unchecked ones, newest first
    clock[0] = 10.0
    assert answered() == [c[0]]  # unchecked records are answered while new only
    store.verdicts[b"k"].update({str(a[0]): None, str(b[0]): None})
    assert answered() == [c[0], b[0], a[0]]  # checked without a verdict: answered after
    store.verdicts[b"k"][str(b[0])] = False  # refuted: never answered, evicted first
    assert answered() == [c[0], a[0]]
    clock[0] = 11.0
    store.add_provider(b"k", PeerInfo(d[0], [d[1]]))
    assert set(store.providers[b"k"]) == {str(a[0]), str(c[0]), str(d[0])}
    # With no refuted record, the oldest unverified one goes; a verified one never.
    clock[0] = 12.0
    store.add_provider(b"k", PeerInfo(e[0], [e[1]]))
    assert set(store.providers[b"k"]) == {str(c[0]), str(d[0]), str(e[0])}


async def test_ours_provider_store_refuses_to_acknowledge_a_record_it_did_not_keep() -> None:
    """A full key whose records are all verified keeps no new one, and says so at once
    (the inbound guard then sends no echo); a kept record waits for its check."""
    store = MeshProviderStore(new_host(), None, ttl=60, max_per_key=1, wall_clock=lambda: 0.0)
    store.verifier = _never
    kept, late = some_peer(), some_peer()
    store.add_verified(b"k", PeerInfo(kept[0], [kept[1]]))
    store.add_provider(b"k", PeerInfo(late[0], [late[1]]))
    assert set(store.providers[b"k"]) == {str(kept[0])}
    with trio.fail_after(1):  # not the 30 s allowed: there is nothing to wait for
        assert await store.wait_checked(b"k", str(late[0]), 30) is False
    assert await store.wait_checked(b"k", str(kept[0]), 30) is True
    store.max_per_key = 2
    store.add_provider(b"k", PeerInfo(late[0], [late[1]]))  # kept now, not yet checked
    with trio.move_on_after(0.05) as waited:
        await store.wait_checked(b"k", str(late[0]), 30)
    assert waited.cancelled_caught


clock = [0.0]


async def _never(key: bytes, info: PeerInfo) -> bool | None:
    return None


# -- KadDHT ----------------------------------------------------------------------------------


def test_stock_kad_dht_private_limits_have_no_parameter() -> None:
    """Shim: MeshKadDHT sets _provider_rate_max and _inbound_limiter."""
    dht = KadDHT(new_host(), DHTMode.SERVER)
    assert dht._provider_rate_max == 10
    assert dht._provider_rate_window == 10.0
    assert dht._inbound_limiter.total_tokens == 12
    params = set(inspect.signature(KadDHT.__init__).parameters)
    assert not params & {"provider_rate_max", "max_inbound_streams", "inbound_limit"}


async def test_stock_refresh_runs_peer_routings_refresh() -> None:
    """Shim: MeshKadDHT.refresh_routing_table (py-libp2p's runs a lookup per bucket)."""
    dht = KadDHT(new_host(), DHTMode.SERVER)
    calls = []

    async def refresh() -> None:
        calls.append(1)

    dht.peer_routing.refresh_routing_table = refresh  # type: ignore[method-assign]
    await dht.refresh_routing_table()
    assert calls == [1]


async def test_stock_server_adds_every_inbound_sender_to_its_routing_table() -> None:
    """Shim: MeshKadDHT.add_peer. A client that serves no DHT still lands in the table."""
    server, client = new_host(), new_host()
    dht = KadDHT(server, DHTMode.SERVER)
    with trio.fail_after(20):
        async with listening(server) as addr, listening(client), background_trio_service(dht):
            await client.connect(_info(addr))
            with trio.move_on_after(5):  # identify gives the server the client's addresses
                while not _known_addrs(server, client.get_id()):
                    await trio.sleep(0.02)
            stream = await client.new_stream(server.get_id(), [PROTOCOL_ID])
            req = Message(type=Message.MessageType.FIND_NODE, key=client.get_id().to_bytes())
            data = req.SerializeToString()
            await stream.write(encode_varint(len(data)) + data)
            with trio.move_on_after(5):
                await stream.read(65536)
            await stream.close()
            assert IPFS_KAD not in served(client)  # the client does not serve the DHT
            assert dht.routing_table.peer_in_table(client.get_id())


async def test_stock_handler_stays_registered_after_the_dht_stops() -> None:
    """Shim: refuse_streams."""
    host = new_host()
    dht = KadDHT(host, DHTMode.SERVER)
    async with background_trio_service(dht):
        pass
    assert IPFS_KAD in served(host)


def _known_addrs(host: IHost, peer_id: ID) -> list[multiaddr.Multiaddr]:
    try:
        return list(host.get_peerstore().addrs(peer_id))
    except Exception:
        return []


def _info(addr: str) -> PeerInfo:
    return info_from_p2p_addr(multiaddr.Multiaddr(addr))


# -- a connection being closed -----------------------------------------------------------

ECHO = TProtocol("/modelnet-test/echo/1")


async def _closing_connection(client: IHost, server: IHost, nursery: trio.Nursery) -> None:
    """Connect ``client`` to ``server``, start closing the connection, and return while the
    closed connection is still registered in the client's swarm."""
    await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
    (conn,) = client.get_network().get_connections(server.get_id())
    nursery.start_soon(conn.close)
    while not conn.is_closed:
        await trio.sleep(0)
    assert client.get_network().get_connections(server.get_id()) == [conn]


async def _echo(stream: INetStream) -> None:
    try:
        await stream.write(await stream.read(64))
        await stream.close()
    except Exception:
        await stream.reset()


async def test_stock_new_stream_fails_while_a_connection_is_closing() -> None:
    """Shim: KadHostView.new_stream (wait_out_closing). A peer whose only connection is
    being closed (a dial cancelled half-way ends like this) looks unreachable: no redial."""
    server, client = new_host(), new_host()
    server.set_stream_handler(ECHO, _echo)
    with trio.fail_after(20):
        async with listening(server), listening(client), trio.open_nursery() as nursery:
            await _closing_connection(client, server, nursery)
            with pytest.raises(Exception, match="No valid connections"):
                await client.new_stream(server.get_id(), [ECHO])


async def test_ours_view_waits_for_the_closing_connection_and_dials_again() -> None:
    server, client = new_host(), new_host()
    server.set_stream_handler(ECHO, _echo)
    view = KadHostView(client, DHT_PROTOCOL_ID)
    with trio.fail_after(20):
        async with listening(server), listening(client), trio.open_nursery() as nursery:
            await _closing_connection(client, server, nursery)
            stream = await view.new_stream(server.get_id(), [ECHO])
            await stream.write(b"ping")
            assert await stream.read(64) == b"ping"
            await stream.close()
