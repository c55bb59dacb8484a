"""Canaries for ``modelnet_p2p/p2p/_compat/kad_inbound.py``: the DHT server's inbound guard.

``test_stock_*`` tests run py-libp2p's own ``KadDHT`` and assert the behaviour the guard
corrects or relies on; when one fails, upstream has changed. ``test_ours_*`` check the
guard where a failure would be silent.
"""

from __future__ import annotations

import inspect

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from modelnet_p2p.p2p._compat.kad_inbound import TokenBuckets
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.proto.framing import encode_varint
from modelnet_p2p.proto.kadcards import append_cards

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


def new_host() -> IHost:
    return build_host(Identity.generate())


def test_stock_handle_stream_resets_past_12_with_no_read_timeout() -> None:
    """Shim: InboundGuard. The cap is a private limiter of 12; reads have no deadline."""
    dht = KadDHT(new_host(), DHTMode.SERVER)
    assert dht._inbound_limiter.total_tokens == 12
    source = inspect.getsource(KadDHT._do_handle_stream)
    assert "read_varint_prefixed_bytes_limited" in source
    assert "fail_after" not in source and "move_on_after" not in source


def test_ours_token_buckets_refill_per_peer() -> None:
    now = [0.0]
    buckets = TokenBuckets(2.0, 3.0, lambda: now[0])
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # another peer has its own bucket
    now[0] = 0.5  # one token back
    assert buckets.take("a") and not buckets.take("a")


def test_stock_handler_writes_an_answers_length_prefix_and_body_apart() -> None:
    """Shim: GuardedStream.write holds a GET_PROVIDERS answer until it is whole, to add the
    providers' cards; upstream writes the prefix, then the body."""
    source = inspect.getsource(KadDHT._do_handle_stream)
    assert "await stream.write(varint.encode(len(response_bytes)))" in source
    assert "await stream.write(response_bytes)" in source


async def test_stock_server_stores_an_add_provider_that_carries_a_card() -> None:
    """Cards beside provider records: a server without the extension skips field 100 and
    stores the record as usual (and echoes it)."""
    server, client = new_host(), new_host()
    dht = KadDHT(server, DHTMode.SERVER)
    key = bytes.fromhex("1220") + bytes(32)
    with trio.fail_after(20):
        async with running_host(server, [LOOPBACK]), running_host(client, [LOOPBACK]):
            async with background_trio_service(dht):
                addr = next(str(a) for a in server.get_addrs() if "/tcp/" in str(a))
                if "/p2p/" not in addr:
                    addr = f"{addr}/p2p/{server.get_id()}"
                await client.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                msg = Message(type=Message.MessageType.ADD_PROVIDER, key=key)
                peer = msg.providerPeers.add()
                peer.id = client.get_id().to_bytes()
                peer.addrs.append(client.get_addrs()[0].to_bytes())
                data = append_cards(msg.SerializeToString(), [b"\x82" + b"card" * 100])
                stream = await client.new_stream(server.get_id(), [PROTOCOL_ID])
                await stream.write(encode_varint(len(data)) + data)
                with trio.move_on_after(5):
                    echo = await stream.read(65536)
                await stream.close()
                assert echo  # the echo of the ADD_PROVIDER
                stored = dht.provider_store.get_providers(key)
                assert [p.peer_id for p in stored] == [client.get_id()]
