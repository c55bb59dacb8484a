"""``modelnet demo``: a whole mesh on this machine, narrated.

Starts a bootstrap peer and four model peers in this process (all on
127.0.0.1), then, as a client that knows only the bootstrap address:

1. discovers capabilities through the DHT;
2. streams a request, token by token, to a provider the mesh picks;
3. runs collaborative requests: a router picks the specialist, an ensemble
   votes (one provider is deliberately faulty), a pipeline hands a summary
   to a translator;
4. shows a failover: the provider answering a stream is stopped mid-answer,
   and the stream carries on elsewhere without a missing or repeated chunk.

The models are the small deterministic examples of
:mod:`modelnet_p2p.demo.models`, not AI models; the networking is real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from ..mesh.collab import Step, Trace, draft_verify, ensemble, pipeline, route
from ..peer import Peer
from .models import ALL, arithmetic

__all__ = ["run_demo"]

Say = Callable[[str], None]


def _faulty_arithmetic(request: Any) -> str:
    """The arithmetic example, off by one: a faulty model for the ensemble to outvote."""
    return str(int(float(arithmetic(request))) + 1)


_faulty_arithmetic.capability = arithmetic.capability  # type: ignore[attr-defined]

#: The demo lasts seconds, so its peers re-announce sooner and their cards expire sooner than
#: the configured defaults; neither matters for the result.
ANNOUNCE_INTERVAL = 30.0
CARD_TTL = 120.0

#: What each model peer serves.
LAYOUT: list[list[str]] = [
    ["echo", "topic-classifier", "arithmetic"],
    ["echo", "translate", "arithmetic"],
    ["echo", "summarize", "verify-arithmetic", "arithmetic"],
    ["echo", "arithmetic*"],  # * = the faulty one
]


async def _model_peer(names: list[str], boot: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        async with Peer(bootstrap=[boot], announce_interval=ANNOUNCE_INTERVAL, card_ttl=CARD_TTL) as peer:
            for name in names:
                if name.endswith("*"):
                    peer.serve(arithmetic.capability, _faulty_arithmetic)
                else:
                    handler = ALL[name]
                    peer.serve(handler.capability, handler)
            await peer.announce()
            task_status.started((peer, scope))
            await trio.sleep_forever()


def _provider(trace: Trace, capability: str) -> str | None:
    """The peer that answered ``capability`` somewhere in ``trace``."""
    if trace.capability == capability and trace.peer:
        return trace.peer
    for child in trace.children:
        found = _provider(child, capability)
        if found:
            return found
    return None


def _short(peer_id: str) -> str:
    return "…" + peer_id[-6:]


async def run_demo(say: Say = print, style: Callable[..., str] = lambda s, **_: s) -> None:
    """Run the demo, printing an account with ``say``. Everything is stopped on return."""
    t0 = trio.current_time()
    head: Callable[[str], str] = lambda s: style(s, bold=True)  # noqa: E731
    dim: Callable[[str], str] = lambda s: style(s, dim=True)  # noqa: E731

    async with Peer(announce_interval=ANNOUNCE_INTERVAL) as boot, trio.open_nursery() as nursery:
        boot_addr = boot.addrs[0]
        say(head("1. A local mesh"))
        say(f"   bootstrap peer {_short(boot.peer_id)} at {boot_addr}")
        peers: list[tuple[Peer, trio.CancelScope]] = []
        for names in LAYOUT:
            peers.append(await nursery.start(_model_peer, names, boot_addr))
        layout = list(zip(peers, LAYOUT, strict=True))
        faulty = next(p.peer_id for (p, _), names in layout if "arithmetic*" in names)
        for (p, _), names in layout:
            shown = ", ".join(n.replace("*", " (faulty)") for n in names)
            say(f"   model peer {_short(p.peer_id)} serves {shown}")

        async with Peer(bootstrap=[boot_addr]) as client:
            say(dim(f"   client {_short(client.peer_id)} knows only the bootstrap address\n"))

            # 2. discovery
            say(head("2. Discovery over the DHT"))
            started = trio.current_time()
            cards = await client.discover(task="text-generation", timeout=5)
            took = trio.current_time() - started
            say(f"   task=text-generation: {len(cards)} peers in {took * 1000:.0f} ms")
            math_cards = await client.discover(tags=["math"], timeout=5)
            for card in sorted(math_cards, key=lambda c: c.peer_id):
                caps = [c.name for c in card.capabilities if "math" in c.tags]
                offers = ", ".join(caps)
                say(f"   tag=math: {_short(card.peer_id)} offers {offers} (signed card, seq {card.seq})")
            say("")

            # 3. a streamed request
            say(head("3. A streamed request, routed by capability"))
            stream = client.infer(
                capability="echo", input="models on a mesh answer token by token", timeout=20, delay=0.04
            )
            started = trio.current_time()
            line = "   "
            first = 0.0
            async with stream:
                async for chunk in stream:
                    if line == "   ":
                        first = trio.current_time() - started
                    line += chunk
            say(line.rstrip())
            say(
                dim(
                    f"   answered by {_short(stream.info.peer)}: {stream.info.chunks} chunks, "
                    f"first after {first * 1000:.0f} ms, usage {stream.info.usage}\n"
                )
            )

            # 4. collaboration
            say(head("4. Collaborative requests"))
            question = "what is 12 times 7 plus 3"
            routed = await route(
                client,
                "topic-classifier",
                question,
                {
                    "math": "arithmetic",
                    "translation": Step("translate", {"to": "fr"}),
                    "summary": "summarize",
                },
                default="echo",
                timeout=20,
            )
            label = routed.trace.detail["label"]
            by = _provider(routed.trace, "arithmetic")
            note = f" ({_short(by)}{', the faulty provider' if by == faulty else ''})" if by else ""
            say(f"   router: {question!r} -> label {label!r} -> arithmetic answered {routed.output}{note}")
            checked = await draft_verify(
                client, "arithmetic", "verify-arithmetic", question, rounds=3, timeout=20
            )
            verdicts = [c.detail.get("verdict") for c in checked.trace.children if c.kind == "verify"]
            say(
                f"   draft and verify: {checked.output} after {len(verdicts)} round(s) "
                f"({', '.join(str(v) for v in verdicts)}; rejected drafts' providers are avoided)"
            )
            voted = await ensemble(client, "arithmetic", question, k=4, aggregate="majority", timeout=10)
            say(
                f"   ensemble of {voted.trace.detail['members']} arithmetic providers, majority vote "
                f"{voted.trace.detail['vote']}: {voted.output}"
            )
            text = "Peers find each other through the DHT. They gossip load. They stream tokens."
            piped = await pipeline(
                client,
                [Step("summarize", {"sentences": 2}), Step("translate", {"to": "fr"}, stream=True)],
                text,
                timeout=20,
            )
            say(f"   pipeline summarize -> translate(fr): {piped.output}")
            say(dim("   trace of the ensemble:"))
            for row in voted.trace.render().splitlines():
                say(dim("     " + row))
            say("")

            # 5. failover
            say(head("5. Failover mid-stream"))
            words = " ".join(f"t{i}" for i in range(24))
            stream = client.infer(capability="echo", input=words, timeout=30, delay=0.03)
            got: list[str] = []
            stopped = None
            async with stream:
                async for chunk in stream:
                    got.append(chunk)
                    if len(got) == 8 and stopped is None:
                        stopped = stream.info.peer
                        for p, scope in peers:
                            if p.peer_id == stopped:
                                scope.cancel()  # the provider goes away, mid-answer
                        say(f"   after 8 chunks, provider {_short(stopped)} is stopped")
            complete = got == [f"t{i} " for i in range(24)]
            tried = " -> ".join(f"{_short(a['peer'])} ({a['status']})" for a in stream.info.attempts)
            say(f"   received {len(got)} chunks, each once and in order: {complete}")
            say(dim(f"   providers tried: {tried}"))
            if not complete:
                raise RuntimeError("failover delivered a different answer")

        nursery.cancel_scope.cancel()
    say(f"\ndone in {trio.current_time() - t0:.1f} s; every peer has stopped.")
