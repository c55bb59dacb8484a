"""Canary and checks for ``modelnet_p2p/p2p/_compat/multistream.py``: proposing one protocol
without waiting for the multistream-select echoes.

``test_stock_*`` runs py-libp2p's own client and asserts what the shim works around: it waits
for the header's echo before it proposes the protocol. When it fails, upstream pipelines the
proposal itself; check whether the shim is still needed. The other tests run real hosts on
127.0.0.1: the request goes out with the proposal, a refusal is a typed error, and a DHT
server that does not speak our protocol counts as one to which no stream opened.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.multiselect_client import MultiselectClient

from modelnet_p2p import Peer
from modelnet_p2p.p2p._compat.multistream import MULTISTREAM, ProtocolRefused, open_optimistic
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import KadKind, KadRequest

ECHO = TProtocol("/modelnet-test/echo/1.0.0")
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


class SilentCommunicator:
    """Records what the client writes; never answers."""

    def __init__(self) -> None:
        self.written: list[str] = []

    async def write(self, msg_str: str) -> None:
        self.written.append(msg_str)

    async def read(self) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_stock_client_waits_for_the_header_echo_before_proposing() -> None:
    comm = SilentCommunicator()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(MultiselectClient().select_one_of, [ECHO], comm, 30)
        await trio.testing.wait_all_tasks_blocked()
        assert comm.written == [MULTISTREAM]  # the proposal waits for an answer: a round trip
        nursery.cancel_scope.cancel()


async def _two_hosts() -> tuple[IHost, IHost]:
    return build_host(Identity.generate()), build_host(Identity.generate())


def _addr(host: IHost) -> str:
    addr = next(str(a) for a in host.get_addrs() if "/tcp/" in str(a))
    return addr if "/p2p/" in addr else f"{addr}/p2p/{host.get_id()}"


async def test_the_request_goes_out_with_the_proposal_and_the_answer_comes_back() -> None:
    server, client = await _two_hosts()
    got: list[bytes] = []

    async def echo(stream: INetStream) -> None:
        data = await stream.read(5)
        got.append(data)
        await stream.write(data.upper())
        await stream.close()

    server.set_stream_handler(ECHO, echo)
    with trio.fail_after(30):
        async with running_host(server, [LOOPBACK]), running_host(client, [LOOPBACK]):
            await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(_addr(server))))
            stream = await open_optimistic(client, server.get_id(), ECHO)
            await stream.write(b"hello")  # before any answer: no round trip first
            assert await stream.read(5) == b"HELLO"
            assert got == [b"hello"]
            assert stream.get_protocol() == ECHO
            await stream.close()


async def test_a_protocol_the_server_does_not_speak_is_a_typed_error_at_the_first_read() -> None:
    server, client = await _two_hosts()
    with trio.fail_after(30):
        async with running_host(server, [LOOPBACK]), running_host(client, [LOOPBACK]):
            await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(_addr(server))))
            stream = await open_optimistic(client, server.get_id(), ECHO)
            await stream.write(b"hello")
            with pytest.raises(ProtocolRefused, match="refused"):
                await stream.read(5)
            await stream.reset()


async def test_a_dht_request_to_a_peer_without_our_dht_reports_no_stream_opened() -> None:
    server = build_host(Identity.generate())  # no DHT handler at all
    with trio.fail_after(30):
        async with running_host(server, [LOOPBACK]), Peer(bootstrap=[]) as client:
            await client.connect(_addr(server))
            kad = client.discovery.kad
            before = kad.requests
            outcome = await kad.exchange(str(server.get_id()), KadRequest(KadKind.FIND_NODE, b"k" * 32), 10)
            assert kad.requests == before + 1
            assert outcome.answer is None
            assert not outcome.opened  # a peer to drop, not a slow one
            assert not outcome.timed_out
