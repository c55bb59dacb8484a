"""Garbage-collection pauses under connection churn (issue 12): a peer's start-up objects are
frozen out of later full collections (``p2p/gctune.py``).

Under the hostile benchmark's churn attacks a full collection walked about 200k long-lived
objects and stalled the event loop 120-800 ms. Once a peer has started, what was alive then
sits in the permanent generation, which collections skip.
"""

from __future__ import annotations

import gc

import trio

from modelnet_p2p import Peer
from modelnet_p2p.p2p import gctune


async def test_start_up_objects_are_frozen_once_a_peer_has_started() -> None:
    with trio.fail_after(60):
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], gossip=False):
            frozen = gctune.frozen_at_startup()
            assert frozen is not None and frozen > 10_000  # libp2p, trio and the peer: ~100k
            assert gc.get_freeze_count() > frozen // 2  # frozen objects still die by reference count
        # A second peer in the same process freezes nothing more (its cycles stay collectable).
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], gossip=False):
            assert gctune.frozen_at_startup() == frozen
            assert gctune.freeze_startup() == frozen


def test_nothing_is_frozen_while_the_application_disabled_collection() -> None:
    if gctune.frozen_at_startup() is not None:
        return  # frozen already in this process (another test started a peer first)
    gc.disable()
    try:
        assert gctune.freeze_startup() == 0
        assert gctune.frozen_at_startup() is None
    finally:
        gc.enable()


def test_a_peer_raises_the_default_thresholds_and_keeps_the_applications_own() -> None:
    assert gctune.raised_thresholds(gctune.DEFAULT_THRESHOLDS) == gctune.THRESHOLDS
    assert gctune.raised_thresholds((1000, 5, 5)) is None  # the application's own choice
    assert gctune.raised_thresholds(gctune.THRESHOLDS) is None
    assert gctune.THRESHOLDS[0] > gctune.DEFAULT_THRESHOLDS[0]


async def test_after_a_peer_started_the_process_runs_with_raised_thresholds() -> None:
    with trio.fail_after(60):
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], gossip=False):
            if gctune.frozen_at_startup():  # this process froze (collection was enabled)
                assert gc.get_threshold() != gctune.DEFAULT_THRESHOLDS
