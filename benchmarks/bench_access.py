"""Access-control benchmark (issue 13): what tokens and private meshes cost, beside the same work without.

Usage::

    python benchmarks/bench_access.py [--quick]

In one run, on 127.0.0.1, both peers in this process:

1. Verifying a capability token (``proto/token.verify_token``), a root token and a
   once-delegated one, in microseconds, beside a plain one-chunk request.
2. One-chunk requests to a ``token`` capability (the provider's verify cache warm, so the
   figure is what a caller with one token pays per request) beside the same requests to
   a public capability, alternating: median and p90 latency and their ratio.
3. The same, with the cache off (every request verified in full).
4. Bulk throughput of one stream (64 KiB writes) between two hosts of a private mesh
   (the pnet protector: XSalsa20 under Noise) beside two plain hosts.
5. Signed receipts (``proto/receipt.py``): sealing and verifying one (pure, microseconds)
   beside a plain request, and one-chunk requests that ask for a receipt (signed by the
   provider, checked by the caller) beside the same requests without, alternating.

Goals (issue 13): a token check costs at most 25% of a plain request (cached), a full
verification at most 2 ms, and the protector keeps at least half of the plain throughput;
(this file's own goal) a signed and checked request costs at most 1.25x a plain one.
Nothing here asserts: it prints numbers and exits 0.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from typing import Any

import trio

HOST = "127.0.0.1"
BULK_CHUNK = 64 * 1024


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_verify(n: int) -> dict[str, float]:
    """Microseconds per verify_token of a root and a delegated token (pure function)."""
    from modelnet_p2p import Identity
    from modelnet_p2p.proto.token import Caveats, delegate_token, issue_token, verify_token

    issuer, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()

    def key(i: Identity) -> bytes:
        return i.key_pair.private_key.to_bytes()[:32]

    now = time.time()
    root = issue_token(
        key(issuer), audience=str(alice.peer_id), capabilities=["echo"], not_before=now - 60,
        expires=now + 3600, caveats=Caveats(rate_per_minute=10**6), nonce=secrets.token_bytes(16),
    )  # fmt: skip
    child = delegate_token(
        root, key(alice), audience=str(bob.peer_id), not_before=now - 60, expires=now + 600,
        nonce=secrets.token_bytes(16),
    )  # fmt: skip
    out = {}
    for label, token, caller in (("root", root, alice), ("delegated", child, bob)):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            verify_token(
                token,
                trusted={str(issuer.peer_id)},
                remote_peer=str(caller.peer_id),
                capability="echo",
                now=now,
            )
            times.append((time.perf_counter() - t0) * 1e6)
        out[label] = statistics.median(times)
    return out


async def bench_requests(n: int) -> dict[str, dict[str, float]]:
    """Per-request latency (ms) to public vs token capabilities, alternating, cache on and off."""
    from modelnet_p2p import Capability, Identity, Peer
    from modelnet_p2p.proto.token import Caveats, issue_token
    from modelnet_p2p.services import access as access_module
    from modelnet_p2p.services.access import using_token

    issuer = Identity.generate()

    async def echo(request: Any) -> Any:
        yield "ok"

    results: dict[str, dict[str, float]] = {}
    overrides: dict[str, Any] = {}
    try:  # a per-caller request rate, where the admission has one, would refuse this loop
        from modelnet_p2p.p2p.resources import ResourceLimits  # type: ignore[import-not-found,unused-ignore]

        overrides["resource_limits"] = ResourceLimits(request_rate=0)
    except ImportError:
        pass
    async with Peer(trust=[str(issuer.peer_id)], **overrides) as server, Peer() as client:
        server.serve(Capability(name="open", task="tool"), echo)
        server.serve(Capability(name="closed", task="tool", access="token"), echo)
        target = server.addrs[0]
        now = time.time()
        token = issue_token(
            issuer.key_pair.private_key.to_bytes()[:32], audience=client.peer_id, capabilities=["closed"],
            not_before=now - 60, expires=now + 3600, caveats=Caveats(rate_per_minute=10**6),
            nonce=secrets.token_bytes(16),
        )  # fmt: skip

        async def one(name: str) -> float:
            t0 = time.perf_counter()
            resp = await client.call(target, name, "x", timeout=20)
            assert resp.chunks == ["ok"]
            return (time.perf_counter() - t0) * 1000

        with using_token(token):
            for _ in range(20):  # warm up: connections, kept streams, the cache
                await one("open")
                await one("closed")
            for label, ttl in (("cached", access_module.CACHE_TTL), ("uncached", 0.0)):
                access_module.CACHE_TTL = ttl
                plain, tok = [], []
                for _ in range(n):
                    plain.append(await one("open"))
                    tok.append(await one("closed"))
                results[label] = {
                    "plain_p50": statistics.median(plain),
                    "plain_p90": _percentile(plain, 0.9),
                    "token_p50": statistics.median(tok),
                    "token_p90": _percentile(tok, 0.9),
                }
            access_module.CACHE_TTL = 10.0
    return results


def bench_receipt_pure(n: int) -> dict[str, float]:
    """Microseconds to seal and to verify the receipt of a one-chunk answer (digests included)."""
    from modelnet_p2p import Identity
    from modelnet_p2p.proto.infer import Request
    from modelnet_p2p.proto.receipt import ChunkChain, signed_receipt, verify_receipt

    provider, caller = Identity.generate(), Identity.generate()
    req = Request(os.urandom(16), "echo", "x")
    seal, check = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        chain = ChunkChain(req.input)
        chain.add("ok")
        data = signed_receipt(provider, chain, req, "stop", {}, str(caller.peer_id), 1, 2)["receipt"]
        t1 = time.perf_counter()
        mine = ChunkChain(req.input)
        mine.add("ok")
        verify_receipt(data, provider=str(provider.peer_id), request_id=req.request_id, chain=mine)
        t2 = time.perf_counter()
        seal.append((t1 - t0) * 1e6)
        check.append((t2 - t1) * 1e6)
    return {"seal": statistics.median(seal), "verify": statistics.median(check)}


async def bench_receipt_requests(n: int) -> dict[str, float]:
    """Per-request latency (ms): one-chunk requests with a receipt vs without, alternating."""
    from modelnet_p2p import Capability, Peer

    async def echo(request: Any) -> Any:
        yield "ok"

    overrides: dict[str, Any] = {}
    try:
        from modelnet_p2p.p2p.resources import ResourceLimits  # type: ignore[import-not-found,unused-ignore]

        overrides["resource_limits"] = ResourceLimits(request_rate=0)
    except ImportError:
        pass
    async with Peer(**overrides) as server, Peer() as client:
        server.serve(Capability(name="open", task="tool"), echo)
        target = server.addrs[0]

        async def one(receipt: bool) -> float:
            t0 = time.perf_counter()
            resp = await client.call(target, "open", "x", timeout=20, receipt=receipt)
            assert resp.chunks == ["ok"] and (resp.receipt is not None) is receipt
            return (time.perf_counter() - t0) * 1000

        for _ in range(20):
            await one(False)
            await one(True)
        plain, signed = [], []
        for _ in range(n):
            plain.append(await one(False))
            signed.append(await one(True))
    return {
        "plain_p50": statistics.median(plain),
        "plain_p90": _percentile(plain, 0.9),
        "receipt_p50": statistics.median(signed),
        "receipt_p90": _percentile(signed, 0.9),
    }


async def bench_psk(total: int, rounds: int) -> dict[str, float]:
    """MB/s of one stream, 64 KiB writes, between two hosts, plain and with a swarm key (medians)."""
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.peer.peerinfo import PeerInfo

    from modelnet_p2p import Identity
    from modelnet_p2p.p2p.host import build_host, listen_addrs, running_host

    proto = TProtocol("/modelnet-bench/sink/1")
    out: dict[str, float] = {}

    async def run(psk: bytes | None) -> tuple[float, float]:
        a = build_host(Identity.generate(ephemeral=True), psk=psk)
        b = build_host(Identity.generate(ephemeral=True), psk=psk)
        got = trio.Event()
        received = 0

        async def sink(stream: Any) -> None:
            nonlocal received
            try:
                while True:
                    received += len(await stream.read(1 << 20))
                    if received >= total:
                        got.set()
            except StreamEOF:
                await stream.close()
            except Exception:
                await stream.reset()

        listen = [multiaddr.Multiaddr(f"/ip4/{HOST}/tcp/0")]
        async with running_host(a, listen), running_host(b, listen):
            b.set_stream_handler(proto, sink)
            await a.connect(PeerInfo(b.get_id(), listen_addrs(b)))
            stream = await a.new_stream(b.get_id(), [proto])
            payload = os.urandom(BULK_CHUNK)
            t0, cpu0 = time.perf_counter(), time.process_time()
            sent = 0
            while sent < total:
                await stream.write(payload)
                sent += len(payload)
            with trio.fail_after(120):
                await got.wait()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            await stream.close()
        return total / elapsed / 1e6, cpu / (total / 1e6) * 1000

    plain, protected, plain_cpu, protected_cpu = [], [], [], []
    for _ in range(rounds):  # alternating, so that load from other work hits both alike
        rate, cpu = await run(None)
        plain.append(rate)
        plain_cpu.append(cpu)
        rate, cpu = await run(os.urandom(32))
        protected.append(rate)
        protected_cpu.append(cpu)
    out["plain"], out["psk"] = statistics.median(plain), statistics.median(protected)
    out["plain_cpu"], out["psk_cpu"] = statistics.median(plain_cpu), statistics.median(protected_cpu)
    out["plain_min"], out["plain_max"] = min(plain), max(plain)
    out["psk_min"], out["psk_max"] = min(protected), max(protected)
    return out


async def _main(quick: bool) -> None:
    n_verify = 200 if quick else 1000
    n_req = 100 if quick else 400
    bulk = (16 if quick else 32) << 20
    print(f"modelnet_p2p access benchmark{' (--quick)' if quick else ''}, pid {os.getpid()}")
    print("  every peer and host in this process, on 127.0.0.1; the machine may be loaded by other work")
    verify = bench_verify(n_verify)
    req = await bench_requests(n_req)
    psk = await bench_psk(bulk, 5 if quick else 9)
    rcpt_pure = bench_receipt_pure(n_verify)
    rcpt = await bench_receipt_requests(n_req)
    plain_ms = req["cached"]["plain_p50"]
    print()
    print(f"{'measure':58} {'figure':>12} {'baseline':>12} {'ratio':>7}")
    print("-" * 92)
    for label, us in verify.items():
        name = f"verify_token, {label} token (us, median)"
        print(f"{name:58} {us:12.0f} {plain_ms * 1000:12.0f} {us / (plain_ms * 1000):7.2f}")
    for label, r in req.items():
        for q in ("p50", "p90"):
            name = f"request to a token capability, cache {'on' if label == 'cached' else 'off'} (ms, {q})"
            fig, base = r[f"token_{q}"], r[f"plain_{q}"]
            print(f"{name:58} {fig:12.3f} {base:12.3f} {fig / base:7.2f}")
    base = psk["plain"]
    name = "one stream, private mesh (pnet), MB/s"
    print(f"{name:58} {psk['psk']:12.1f} {base:12.1f} {psk['psk'] / base:7.2f}")
    name = "one stream, private mesh (pnet), CPU ms per MB (both ends)"
    print(
        f"{name:58} {psk['psk_cpu']:12.2f} {psk['plain_cpu']:12.2f} {psk['psk_cpu'] / psk['plain_cpu']:7.2f}"
    )
    for label, us in rcpt_pure.items():
        name = f"{'seal' if label == 'seal' else 'verify'} a receipt, one-chunk answer (us, median)"
        print(f"{name:58} {us:12.0f} {plain_ms * 1000:12.0f} {us / (plain_ms * 1000):7.2f}")
    for q in ("p50", "p90"):
        name = f"request with a signed, checked receipt (ms, {q})"
        fig, without = rcpt[f"receipt_{q}"], rcpt[f"plain_{q}"]
        print(f"{name:58} {fig:12.3f} {without:12.3f} {fig / without:7.2f}")
    print("-" * 92)
    print("baselines: a plain public request's median (verify rows), the same requests to a public")
    print("capability alternating with them (request rows), two plain hosts alternating with two")
    print(
        f"private-mesh hosts (MB/s row, medians; plain {psk['plain_min']:.0f}-{psk['plain_max']:.0f}, "
        f"pnet {psk['psk_min']:.0f}-{psk['psk_max']:.0f} MB/s)."
    )
    print("receipt rows: a plain request's median (seal/verify), the same requests without a receipt,")
    print("alternating with them (request rows).")
    cached = req["cached"]["token_p50"] / req["cached"]["plain_p50"]
    full = max(verify.values())
    print()
    verdict = "met" if cached <= 1.25 else "missed"
    print(f"goal: cached token check <= 1.25x a plain request: {verdict} ({cached:.2f}x)")
    print(f"goal: full verification <= 2 ms: {'met' if full <= 2000 else 'missed'} ({full:.0f} us)")
    ratio = psk["psk"] / base
    print(f"goal: pnet keeps >= 0.5x plain throughput: {'met' if ratio >= 0.5 else 'missed'} ({ratio:.2f}x)")
    signed = rcpt["receipt_p50"] / rcpt["plain_p50"]
    verdict = "met" if signed <= 1.25 else "missed"
    print(f"goal: a request with a receipt <= 1.25x a plain one (p50): {verdict} ({signed:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="less work, about 30 s")
    args = parser.parse_args()
    trio.run(_main, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
