"""Hostile streams (issue 12): one connection must not run a peer out of memory or CPU.

Each attack runs against live peers on 127.0.0.1. Server-side victims run in a worker process
(its RSS and file descriptors are read from ``/proc`` via psutil); the attackers reach under
py-libp2p's yamux (``_write_frame``) to send what a conforming peer never would. Every test
also checks that a legitimate caller is served while, or right after, the attack runs. Bounds
are generous: the old code grew the victims by 50-400 MB here.
"""

from __future__ import annotations

import os
import struct
import subprocess
from typing import Any

import msgpack
import psutil
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT

from modelnet_p2p import Peer, UnavailableError
from modelnet_p2p.p2p._compat.yamux import reset_by_remote
from modelnet_p2p.proto.framing import FrameDecoder, encode_varint, pack_frame
from modelnet_p2p.proto.infer import Chunk, Credit, Request
from modelnet_p2p.services.inference.server import MAX_VIOLATIONS
from modelnet_p2p.testing import open_peers, open_worker

MiB = 1 << 20
ECHO = [{"name": "echo"}]


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Peak:
    """Samples a process's RSS every 50 ms while it runs (``async with``)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start, self.peak = pid, rss(pid), rss(pid)

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await trio.sleep(0.05)

    async def __aenter__(self) -> Peak:
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        nursery.start_soon(self._sample)
        self._nursery = nursery
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, rss(self.pid))
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)

    @property
    def growth(self) -> int:
        return self.peak - self.start


async def raw_data(stream: Any, data: bytes) -> None:
    """Send ``data`` on ``stream`` in 64 KiB yamux DATA frames, ignoring the receive window."""
    muxed = stream.muxed_stream
    for i in range(0, len(data), 65536):
        piece = data[i : i + 65536]
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, muxed.stream_id, len(piece))
        await muxed.conn._write_frame(header + piece)


def request(**kw: Any) -> bytes:
    return pack_frame(Request(request_id=os.urandom(16), capability="echo", **kw).to_wire())


async def open_infer(attacker: Peer, worker_peer: dict[str, Any]) -> Any:
    protocol = TProtocol(attacker.infer_protocol)
    return await attacker.host.new_stream(ID.from_base58(worker_peer["id"]), [protocol])


async def legit_call(caller: Peer, addr: str) -> str:
    return (await caller.call(addr, capability="echo", input="hi", timeout=20)).text


async def test_a_remote_that_overruns_the_yamux_window_is_cut_off() -> None:
    async with open_worker(1, link=False, gossip=False, stderr=subprocess.DEVNULL, serve={"*": ECHO}) as w:
        victim = w.proc.pid
        async with open_peers(2, gossip=False, bootstrap=[]) as (attacker, legit):
            await attacker.connect(w.peers[0]["addr"])
            assert await legit_call(legit, w.peers[0]["addr"])
            fds_before = fds(victim)
            async with Peak(victim) as peak:
                stream = await open_infer(attacker, w.peers[0])
                # A frame of 1,000,000 bytes announced, then 64 MiB that ignore the window.
                with trio.move_on_after(20):
                    try:
                        await raw_data(stream, encode_varint(1_000_000) + b"\x00" * (64 * MiB))
                    except Exception:
                        pass  # the victim went away: the point
                await trio.sleep(0.5)
                assert await legit_call(legit, w.peers[0]["addr"])  # another connection: served
            assert peak.growth < 24 * MiB, peak.growth / MiB
            assert stream.muxed_conn.is_closed  # the victim went away from the attacker's connection
            assert fds(victim) <= fds_before + 2


async def test_streams_rejected_at_the_length_prefix_hold_nothing() -> None:
    async with open_worker(1, link=False, gossip=False, stderr=subprocess.DEVNULL, serve={"*": ECHO}) as w:
        victim = w.proc.pid
        async with open_peers(4, gossip=False, bootstrap=[]) as (*attackers, legit):
            for attacker in attackers:
                await attacker.connect(w.peers[0]["addr"])
            fds_before = fds(victim)
            streams: list[Any] = []
            refused: list[Exception] = []
            ok: list[str] = []

            async def reject_me(attacker: Peer) -> None:
                with trio.move_on_after(5):  # the old code never freed the 256 stream slots
                    try:
                        stream = await open_infer(attacker, w.peers[0])
                    except Exception as exc:  # refused after 8 protocol errors: reset on arrival
                        refused.append(exc)
                        return
                    streams.append(stream)
                    # An oversized frame is refused at its prefix; the body keeps coming (within
                    # the yamux window: a conforming muxer, a hostile protocol peer), and the
                    # stream is kept open.
                    try:
                        await stream.write(encode_varint(64 * MiB) + b"\x01" * (250 * 1024))
                    except Exception:
                        pass

            async def waves(attacker: Peer) -> None:
                for _ in range(10):  # waves of 32 streams, each kept open
                    async with trio.open_nursery() as nursery:
                        for _ in range(32):
                            nursery.start_soon(reject_me, attacker)

            async with Peak(victim) as peak:
                async with trio.open_nursery() as nursery:
                    for attacker in attackers:
                        nursery.start_soon(waves, attacker)
                ok.append(await legit_call(legit, w.peers[0]["addr"]))
                await trio.sleep(2)  # the victim's linger: reset what is still open
            assert ok == ["answer from echo"]
            # The old code held 250 KiB per stream, 256 streams per connection, until the remote
            # ended them: +163 MiB peak here. Now nothing is held once a stream is refused, but
            # up to a window per stream arrives before it is (a burst of 96 streams is 24 MiB),
            # and the allocator keeps what 240 MB of traffic fragmented: +35-86 MiB measured.
            assert peak.growth < 120 * MiB, peak.growth / MiB
            # Every rejected stream was reset by the victim (the old code only closed them).
            assert sum(reset_by_remote(s) for s in streams) >= len(streams) - 2
            assert len(streams) + len(refused) == 960
            for s in streams:
                await s.reset()
            assert fds(victim) <= fds_before + 2


async def test_a_provider_that_floods_past_the_window_cannot_grow_its_client() -> None:
    async with open_worker(1, link=False, gossip=False, stderr=subprocess.DEVNULL, serve={"*": ECHO}) as w:
        victim = w.proc.pid  # the client this time: it calls the hostile provider
        async with open_peers(2, gossip=False, bootstrap=[], max_frame_size=MiB) as (hostile, honest):
            honest.serve("echo", lambda request: "honest answer")
            data = "z" * 60_000

            async def flood(stream: Any) -> None:
                try:
                    dec = FrameDecoder()
                    while not dec.feed(await stream.read(65536)):
                        pass
                    seq = 0
                    with trio.move_on_after(15):
                        while True:  # chunks in sequence, ignoring credit and the yamux window
                            batch = b"".join(pack_frame(Chunk(seq + i, data).to_wire()) for i in range(16))
                            seq += 16
                            await raw_data(stream, batch)
                except Exception:
                    pass

            hostile.host.set_stream_handler(TProtocol(hostile.infer_protocol), flood)
            fds_before = fds(victim)
            async with Peak(victim) as peak:
                call = {"cmd": "call", "target": hostile.addrs[0], "capability": "echo", "input": "x"}
                reply = await w.request({**call, "timeout": 15}, timeout=40)
            # The caller collects the answer and reads as fast as it comes, so the window holds;
            # the answer's size limit (32 MiB) stops it (the old code: +685 MB in 15 s).
            assert "error" in reply and "larger than" in reply["error"], reply
            assert peak.growth < 64 * MiB, peak.growth / MiB
            good = await w.request({**call, "target": honest.addrs[0]})
            assert good == {"text": "honest answer"}
            assert fds(victim) <= fds_before + 3


async def test_a_flooding_provider_fills_a_slow_consumer_only_up_to_the_window() -> None:
    me = psutil.Process().pid
    async with open_peers(2, gossip=False, bootstrap=[]) as (hostile, client):
        data = "z" * 60_000

        async def flood(stream: Any) -> None:
            try:
                dec = FrameDecoder()
                while not dec.feed(await stream.read(65536)):
                    pass
                with trio.move_on_after(10):
                    for seq in range(0, 10_000, 16):  # ignoring credit and the yamux window
                        batch = b"".join(pack_frame(Chunk(seq + i, data).to_wire()) for i in range(16))
                        await raw_data(stream, batch)
            except Exception:
                pass

        hostile.host.set_stream_handler(TProtocol(hostile.infer_protocol), flood)
        got: list[Any] = []
        async with Peak(me) as peak:
            answer = client.infer(hostile.addrs[0], "echo", "x", timeout=20)
            try:
                async for chunk in answer:
                    got.append(chunk)
                    await trio.sleep(3)  # a consumer that takes its time: nothing is read meanwhile
            except UnavailableError:
                pass  # the provider overran the window: its connection was closed
        assert len(got) <= 2
        assert peak.growth < 48 * MiB, peak.growth / MiB  # the old code: gigabytes (+1.8 GB seen)


def scalar_bomb(nbytes: int) -> bytes:
    """A request frame of about ``nbytes`` whose input is int8 values (2 bytes on the wire,
    about 36 decoded): few containers, many objects."""
    body = Request(request_id=os.urandom(16), capability="slow", input=[-100] * (nbytes // 2)).to_wire()
    return pack_frame(body)


async def test_msgpack_bombs_within_the_frame_limit_are_refused() -> None:
    me = psutil.Process().pid
    async with open_peers(3, gossip=False, bootstrap=[]) as (victim, attacker, legit):

        async def slow(request: Any) -> str:
            await trio.sleep(4)  # holds its request (and its decoded input) meanwhile
            return "done"

        victim.serve("slow", slow)
        victim.serve("echo", lambda request: "answer from echo")
        await attacker.connect(victim.addrs[0])
        bomb = scalar_bomb(MiB - 256)
        assert len(bomb) <= MiB + 3
        replies: list[Any] = []
        async with Peak(me) as peak:

            async def send_bomb() -> None:
                protocol = TProtocol(victim.infer_protocol)
                stream = await attacker.host.new_stream(victim.identity.peer_id, [protocol])
                await stream.write(bomb)
                dec = FrameDecoder()
                with trio.move_on_after(8):
                    try:
                        while not (got := dec.feed(await stream.read(65536))):
                            pass
                        replies.append(got[0])
                    except Exception:
                        replies.append(None)
                await stream.reset()

            async with trio.open_nursery() as nursery:
                # One bomb fewer than the protocol errors that ban a remote: the 8th would have
                # the attacker's later streams reset on arrival, as soon as the victim is quick
                # enough to answer 8 bombs before the rest arrive.
                for _ in range(MAX_VIOLATIONS - 1):
                    nursery.start_soon(send_bomb)
                await trio.sleep(0.5)
                assert (await legit.call(victim.addrs[0], capability="echo", input="x", timeout=10)).text
        assert len(replies) == MAX_VIOLATIONS - 1
        assert all(r is not None and r.get("code") == "protocol_error" for r in replies), replies[:2]
        assert peak.growth < 60 * MiB, peak.growth / MiB  # the old code: about 19 MB a bomb


async def test_control_frames_before_or_without_progress_are_cut_off() -> None:
    async with open_worker(1, link=False, gossip=False, stderr=subprocess.DEVNULL, serve={"*": ECHO}) as w:
        async with open_peers(2, gossip=False, bootstrap=[]) as (attacker, legit):
            await attacker.connect(w.peers[0]["addr"])
            # 1. A credit as the first frame: err at once, then the stream is reset.
            stream = await open_infer(attacker, w.peers[0])
            junk = pack_frame({"t": "credit", "b": 1, "junk": "j" * 4000})
            await stream.write(junk)
            dec = FrameDecoder()
            with trio.fail_after(5):
                while not (got := dec.feed(await stream.read(65536))):
                    pass
                assert got[0]["code"] == "protocol_error"
                while not reset_by_remote(stream):
                    await trio.sleep(0.05)
            await stream.reset()
            # 2. A kept stream fed credit frames that acknowledge nothing: cut off, not read forever.
            stream = await open_infer(attacker, w.peers[0])
            await stream.write(request(keep=True))
            dec = FrameDecoder()
            frames: list[dict[str, Any]] = []
            with trio.fail_after(10):
                while not any(f["t"] in ("end", "err") for f in frames):
                    frames += dec.feed(await stream.read(65536))
                sent = 0
                try:
                    for _ in range(2000):
                        await stream.write(pack_frame(Credit(0).to_wire()) * 10)
                        sent += 10
                        frames += dec.feed(await stream.read(65536)) if sent >= 200 else []
                        if frames[-1]["t"] == "err":
                            break
                except Exception:
                    pass
            assert frames[-1]["t"] == "err" and frames[-1]["code"] == "protocol_error", frames[-1]
            assert sent < 2000
            await stream.reset()
            assert await legit_call(legit, w.peers[0]["addr"])


async def test_nil_on_optional_request_keys_is_accepted_by_a_live_peer() -> None:
    async with open_peers(2, gossip=False, bootstrap=[]) as (server, client):
        server.serve("echo", lambda request: "ok")
        await client.connect(server.addrs[0])
        stream = await client.host.new_stream(server.identity.peer_id, [TProtocol(server.infer_protocol)])
        body = Request(request_id=b"n1", capability="echo").to_wire()
        body.update(keep=None, par=None, ttl=None, win=None)
        body["tc"] = {"tid": None, "sid": None, "hop": None, "via": None}
        raw = msgpack.packb(body, use_bin_type=True)
        await stream.write(encode_varint(len(raw)) + raw)
        dec = FrameDecoder()
        frames: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while not any(f["t"] in ("end", "err") for f in frames):
                frames += dec.feed(await stream.read(65536))
        assert [f["t"] for f in frames] == ["chunk", "end"], frames
        await stream.close()



async def test_a_peer_that_keeps_breaking_the_protocol_is_refused_for_a_while() -> None:
    async with open_worker(1, link=False, gossip=False, stderr=subprocess.DEVNULL, serve={"*": ECHO}) as w:
        victim = w.proc.pid
        async with open_peers(2, gossip=False, bootstrap=[]) as (attacker, legit):
            await attacker.connect(w.peers[0]["addr"])
            fds_before = fds(victim)
            async with Peak(victim) as peak:
                junk = pack_frame({"t": "credit", "b": 1, "j": [[] for _ in range(8000)]})
                for _ in range(8):  # MAX_VIOLATIONS protocol errors, each answered
                    stream = await open_infer(attacker, w.peers[0])
                    await stream.write(junk)
                    dec = FrameDecoder()
                    with trio.fail_after(5):
                        while not (got := dec.feed(await stream.read(65536))):
                            pass
                    assert got[0]["code"] == "protocol_error"
                    await stream.reset()
                # Now even a valid request from that peer is refused unread: the stream is reset
                # (often before the attacker has read multistream's answer) and nothing is sent.
                data = b""
                with trio.fail_after(5):
                    try:
                        stream = await open_infer(attacker, w.peers[0])
                        await stream.write(request())
                        data = await stream.read(65536)
                    except Exception:
                        pass
                assert not FrameDecoder().feed(data), data[:40]
                assert await legit_call(legit, w.peers[0]["addr"])  # another peer: served
            assert peak.growth < 24 * MiB, peak.growth / MiB
            assert fds(victim) <= fds_before + 2
