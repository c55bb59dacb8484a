"""How long an announcer waits for the echo of an ``ADD_PROVIDER`` (``specs/capability.md``,
"Acknowledgements"), against a DHT server on 127.0.0.1 whose echo comes late or never.

The server is a real host speaking the mesh's DHT protocol: it stores the provider records
it is sent, answers ``GET_PROVIDERS`` from them, and echoes an ``ADD_PROVIDER`` after
``echo_delay`` seconds (``None``: never, as the libp2p Kademlia spec allows). The trio clock
is a mock one that jumps while every task waits, so the waits are exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import trio
import trio.testing
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from modelnet_p2p import Capability, Peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.proto.framing import encode_varint
from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID

Kind = Message.MessageType


class SlowEchoServer:
    """Stores provider records; echoes ``ADD_PROVIDER`` after ``echo_delay`` s, or never."""

    def __init__(self, echo_delay: float | None) -> None:
        self.echo_delay = echo_delay
        self.records: dict[bytes, dict[bytes, Message.Peer]] = {}
        #: Per ADD_PROVIDER stream: seconds from the message until the announcer ended the stream.
        self.held: list[float] = []
        self.checks = 0  # GET_PROVIDERS received

    async def handle(self, stream: INetStream) -> None:
        try:
            while True:
                msg = Message()
                msg.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 1 << 20))
                if msg.type == Kind.ADD_PROVIDER:
                    for p in msg.providerPeers:
                        self.records.setdefault(msg.key, {})[p.id] = p
                    await self._hold(stream, msg)
                    return
                answer = Message(type=msg.type, key=msg.key)
                if msg.type == Kind.GET_PROVIDERS:
                    self.checks += 1
                    answer.providerPeers.extend(self.records.get(msg.key, {}).values())
                elif msg.type == Kind.PUT_VALUE:
                    answer.record.CopyFrom(msg.record)
                data = answer.SerializeToString()
                await stream.write(encode_varint(len(data)) + data)
        except Exception:
            return  # the announcer closed or reset the stream

    async def _hold(self, stream: INetStream, msg: Message) -> None:
        t0 = trio.current_time()
        try:
            if self.echo_delay is not None:
                await trio.sleep(self.echo_delay)
                data = msg.SerializeToString()
                await stream.write(encode_varint(len(data)) + data)
            while await stream.read(1 << 16):
                pass
        except Exception:
            pass
        self.held.append(trio.current_time() - t0)


@asynccontextmanager
async def provider_beside(server: SlowEchoServer) -> AsyncIterator[Peer]:
    """A peer serving one capability whose only DHT contact is ``server``."""
    host = build_host(Identity.generate())
    host.set_stream_handler(TProtocol(DHT_PROTOCOL_ID), server.handle)
    async with running_host(host, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        addr = f"{host.get_addrs()[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{host.get_id()}"
        async with Peer(bootstrap=[addr], gossip=False, announce_interval=600.0, card_ttl=1800.0) as peer:
            await peer.discovery.bootstrapped.wait()
            assert peer.discovery.kad.in_routing_table(str(host.get_id()))
            peer.serve(Capability("slow-echo", task="chat"), _answer)
            yield peer


async def _answer(request: object) -> str:
    return "ok"


async def test_a_late_echo_acknowledges_without_a_second_request(mock_clock: trio.testing.MockClock) -> None:
    """A server that echoes 2 s after the record (later than the lookups' patience, as on a
    busy machine) acknowledges by that echo: no GET_PROVIDERS check follows. (The announcer
    used to stop waiting at its patience and ask the same server again for every record.)"""
    mock_clock.autojump_threshold = 0.05
    server = SlowEchoServer(echo_delay=2.0)
    async with provider_beside(server) as peer:
        result = await peer.discovery.announce()
        assert result is not None and result.confirmed, (result.acks, result.needed)
        assert server.records and server.checks == 0
        assert all(held >= 2.0 for held in server.held), server.held
        assert not peer.discovery.lookups.silent


async def test_a_server_that_never_echoes_is_checked_once_then_given_the_patience_only(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A server that stores records without an echo is waited for as long as any answer,
    then checked with GET_PROVIDERS; it is remembered, and the next announce waits for its
    echo for the patience only."""
    mock_clock.autojump_threshold = 0.05
    server = SlowEchoServer(echo_delay=None)
    async with provider_beside(server) as peer:
        lookups = peer.discovery.lookups
        first = await peer.discovery.announce()
        assert first is not None and first.confirmed, (first.acks, first.needed)
        assert server.checks >= len(first.acks) - 1  # every provider record was checked
        waited = list(server.held)
        assert waited and min(waited) >= lookups.rpc_timeout * 0.99, waited
        assert list(lookups.silent) == [str(server_id(peer, server))]
        server.held.clear()
        second = await peer.discovery.announce()
        assert second is not None and second.confirmed
        assert server.held and max(server.held) <= lookups.rtt.patience() + 0.01, server.held


def server_id(peer: Peer, server: SlowEchoServer) -> str:
    (pid,) = peer.discovery.kad.table_peers()
    return pid
