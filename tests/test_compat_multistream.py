"""Canary and checks for ``modelnet_p2p/p2p/_compat/multistream.py``: proposing one protocol
without waiting for the multistream-select echoes.

``test_stock_*`` run py-libp2p's own client and server and assert what the shim works around:
the client waits for the header's echo before it proposes the protocol (when that fails,
upstream pipelines the proposal itself; check whether the shim is still needed), and the
server answers a proposal it does not speak, followed by data, with ``na`` and a reset whose
arrival makes the ``na`` unreadable (when that fails, the shim's reading of the answer kept
through the reset may no longer be needed). The other tests run real hosts on 127.0.0.1: the
request goes out with the proposal, a refusal is a typed error even when the reset came
before the first read, a stream the server took and reset at once is not a refusal, and a
DHT server that does not speak our protocol counts as one to which no stream opened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.utils.varint import encode_delim

from modelnet_p2p import Peer
from modelnet_p2p.p2p._compat.multistream import (
    MULTISTREAM,
    ProtocolRefused,
    open_optimistic,
    unread_at_reset,
)
from modelnet_p2p.p2p._compat.yamux import reset_by_remote
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import KadKind, KadRequest

ECHO = TProtocol("/modelnet-test/echo/1.0.0")
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
#: A length-prefixed message, as a DHT request is: a server reading proposals finds no line.
REQUEST = b"\x05hello"


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


@asynccontextmanager
async def _connected() -> AsyncIterator[tuple[IHost, IHost]]:
    """Two running hosts, the client connected to the server (30 s at most for the test)."""
    server, client = await _two_hosts()
    with trio.fail_after(30):
        async with running_host(server, [LOOPBACK]), running_host(client, [LOOPBACK]):
            await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(_addr(server))))
            yield server, client


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
    async with _connected() as (server, client):
        stream = await open_optimistic(client, server.get_id(), ECHO)
        await stream.write(b"hello")
        with pytest.raises(ProtocolRefused, match="refused"):
            await stream.read(5)
        await stream.reset()


async def _until_reset(stream: INetStream) -> None:
    # The reset has arrived and been handled once nothing in the process can run any more.
    while not reset_by_remote(stream):
        await trio.testing.wait_all_tasks_blocked()


async def test_stock_server_resets_after_its_na_and_the_reset_makes_the_na_unreadable() -> None:
    async with _connected() as (server, client):
        stream = await client.get_network().new_stream(server.get_id())
        await stream.write(encode_delim(MULTISTREAM.encode()) + encode_delim(str(ECHO).encode()))
        await stream.write(REQUEST)  # read by the server as the next proposal
        await _until_reset(stream)
        with pytest.raises(StreamError):
            await stream.read(64)  # the echo and the na came before the reset: lost
        await stream.reset()


async def test_a_refusal_whose_reset_came_before_the_first_read_is_still_a_refusal() -> None:
    async with _connected() as (server, client):
        stream = await open_optimistic(client, server.get_id(), ECHO)
        await stream.write(REQUEST)
        await _until_reset(stream)
        assert unread_at_reset(stream) == encode_delim(MULTISTREAM.encode()) + encode_delim(b"na")
        with pytest.raises(ProtocolRefused, match="refused: 'na'"):
            await stream.read(5)
        await stream.reset()


async def test_a_stream_the_server_took_and_reset_at_once_is_not_a_refusal() -> None:
    server, client = await _two_hosts()

    async def busy(stream: INetStream) -> None:
        await stream.reset()  # as a DHT server over its limits does

    server.set_stream_handler(ECHO, busy)
    with trio.fail_after(30):
        async with running_host(server, [LOOPBACK]), running_host(client, [LOOPBACK]):
            await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(_addr(server))))
            stream = await open_optimistic(client, server.get_id(), ECHO)
            await stream.write(REQUEST)
            await _until_reset(stream)
            with pytest.raises(Exception) as failed:
                await stream.read(5)
            assert not isinstance(failed.value, ProtocolRefused)
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
