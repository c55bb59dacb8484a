"""A three-peer mesh on loopback: two peers serve models, a third streams requests to them.

Run: python examples/echo_mesh.py

The "models" are tiny deterministic functions (an echo that streams words back
and a word counter); they stand in for real models so the example needs no
weights.
"""

from __future__ import annotations

import time

import trio

from modelnet_p2p import Capability, InferenceRequest, NotFoundError, Peer


async def echo(request: InferenceRequest):
    """Stream the input back, one word per chunk, like a model emitting tokens."""
    for word in str(request.input).split():
        await trio.sleep(0.02)  # pretend to think
        yield word + " "
    request.usage["tokens"] = len(str(request.input).split())


def count_words(request: InferenceRequest) -> dict[str, int]:
    """A plain sync function: it runs in a worker thread, never blocking the peer."""
    counts: dict[str, int] = {}
    for word in str(request.input).lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


async def main() -> None:
    async with Peer() as alice, Peer() as bob, Peer() as carol:
        bob.serve(Capability(name="echo", task="text-generation", description="echoes words"), echo)
        carol.serve(Capability(name="count", task="classification"), count_words)
        print(f"bob   {bob.peer_id} serves 'echo'  at {bob.addrs[0]}")
        print(f"carol {carol.peer_id} serves 'count' at {carol.addrs[0]}")

        print("\nalice streams 'echo' from bob:")
        started = time.monotonic()
        stream = alice.infer(bob.addrs[0], "echo", "peer to peer models talk in tokens")
        async for chunk in stream:
            print(f"  +{(time.monotonic() - started) * 1000:6.1f} ms  {chunk!r}")
        print(f"  finished: {stream.info.finish_reason}, usage {stream.info.usage}")

        answer = await alice.call(carol.addrs[0], "count", "the cat saw the other cat")
        print(f"\nalice calls 'count' on carol: {answer.value} ({answer.latency * 1000:.1f} ms)")

        try:
            await alice.call(carol.addrs[0], "translate", "hello")
        except NotFoundError as exc:
            print(f"\nasking carol for 'translate' fails cleanly: {exc}")


if __name__ == "__main__":
    trio.run(main)
