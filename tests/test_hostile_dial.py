"""A caller whose connection to a busy peer was closed must be able to dial it again soon.

py-libp2p's swarm refuses every dial of a peer for 60 s once all its addresses failed once
(its negative cache). In the hostile benchmark (relay reservations), a caller's connection
to the victim went away, its one redial failed, and then every call failed at once for the
rest of the window: 2,194 of 2,466 failed calls said "negative cache". The dialer backs off
on its own instead (``p2p/dialer.py``, ``DIAL_BACKOFF``: 0.25 s, doubling, at most 30 s).
"""

from __future__ import annotations

import socket

import pytest
import trio

from modelnet_p2p import Capability, Peer
from modelnet_p2p.errors import UnavailableError
from modelnet_p2p.p2p.identity import Identity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def echo(request: object) -> str:
    return "pong"


async def test_a_peer_that_failed_one_dial_is_dialed_again_within_seconds() -> None:
    port = free_port()
    identity = Identity.generate()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{identity.peer_id}"
    with trio.fail_after(60):
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], gossip=False) as caller:
            with pytest.raises(UnavailableError):
                await caller.connect(addr)  # nobody listens there yet
            async with Peer(identity=identity, listen=[f"/ip4/127.0.0.1/tcp/{port}"], gossip=False) as target:
                target.serve(Capability("ping", task="chat"), echo)
                errors: list[str] = []
                # Well within py-libp2p's 60 s block, and far longer than the dialer's backoff.
                with trio.move_on_after(20):
                    while True:
                        try:
                            await caller.connect(addr)
                            break
                        except UnavailableError as exc:
                            errors.append(exc.message)
                            await trio.sleep(0.2)
                assert caller.dialer.is_connected(target.peer_id), errors[-3:]
                assert (await caller.call(addr, "ping", "ping", timeout=10)).value == "pong"
                assert not any("negative cache" in e for e in errors), errors[-3:]


async def test_repeated_failures_back_off_longer() -> None:
    """The backoff doubles with each failure in a row: a dead peer is not redialed at every call."""
    port = free_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
    with trio.fail_after(60):
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], gossip=False) as caller:
            messages = []
            for _ in range(20):
                with pytest.raises(UnavailableError) as info:
                    await caller.connect(addr)
                messages.append(info.value.message)
            dialed = [m for m in messages if "dials in a row failed" not in m]
            # 20 quick attempts: the first dials, the rest (all within the first backoffs) do not.
            assert 1 <= len(dialed) <= 4, messages
