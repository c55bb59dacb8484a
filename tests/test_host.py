"""The secure host: Noise and yamux only, bound addresses checked, clean close."""

from __future__ import annotations

import gc
import socket

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from modelnet_p2p import ConfigError, Peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.testing import open_peers


async def test_plaintext_dialer_is_refused():
    async with open_peers(1) as (target,):
        target.serve("echo", lambda r: r.input)
        kp = create_new_key_pair()
        plain = new_host(
            key_pair=kp,
            sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)},
            muxer_opt={TProtocol(YAMUX_ID): Yamux},
        )
        async with plain.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with pytest.raises(Exception) as info:
                with trio.fail_after(10):
                    await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(target.addrs[0])))
            assert not isinstance(info.value, trio.TooSlowError)
            assert not plain.get_network().get_connections(target.identity.peer_id)
        await plain.close()


async def test_only_noise_and_yamux_are_offered():
    async with open_peers(2) as (a, b):
        await a.connect(b.addrs[0])
        upgrader = a.host.get_network().upgrader
        assert list(upgrader.security_multistream.transports) == ["/noise"]
        assert list(upgrader.muxer_multistream.transports) == ["/yamux/1.0.0"]


async def test_listen_failure_is_loud():
    async with open_peers(1) as (a,):
        taken = a.addrs[0].split("/p2p/")[0]
        with pytest.raises(ConfigError, match="in use"):
            async with Peer(listen=[taken]):
                pass
        with pytest.raises(ConfigError, match="could not listen"):
            async with Peer(listen=["/ip4/192.0.2.1/tcp/0"]):  # not a local address
                pass


async def test_bad_listen_address():
    with pytest.raises(ConfigError, match="invalid multiaddr"):
        Peer(listen=["not-a-multiaddr"])


async def test_addrs_end_with_peer_id():
    async with open_peers(1) as (a,):
        assert a.addrs
        for addr in a.addrs:
            assert addr.startswith("/ip4/127.0.0.1/tcp/")
            assert addr.endswith("/p2p/" + a.peer_id)


async def test_start_stop_cycles_leak_no_fds(fd_count):
    async def cycle():
        async with open_peers(2) as (a, b):
            b.serve("echo", lambda r: r.input)
            assert (await a.call(b.addrs[0], "echo", "x")).value == "x"

    await cycle()  # warm up imports, thread pools and caches
    gc.collect()
    before = fd_count()
    for _ in range(20):
        await cycle()
    gc.collect()
    after = fd_count()
    assert after <= before, f"fds went from {before} to {after} over 20 start/stop cycles"


async def test_stopped_peer_no_longer_accepts():
    async with open_peers(1) as (a,):
        addr = a.addrs[0]
    host, port = addr.split("/")[2], int(addr.split("/")[4])
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)


async def test_a_failed_dial_is_not_retried():
    """``build_host`` passes ``RetryConfig(max_retries=0)``: py-libp2p would retry after 0.1, 0.2, 0.4 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = Identity.generate().peer_id
    loopback = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with running_host(build_host(Identity.generate()), loopback) as h:
        start = trio.current_time()
        with pytest.raises(SwarmException):
            await h.connect(PeerInfo(gone, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
        took = trio.current_time() - start
    assert took < 0.5, f"a refused dial took {took:.2f} s"
