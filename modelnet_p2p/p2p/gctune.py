"""Shorter garbage-collection pauses: the objects alive after start-up are left out of every
later full collection.

A peer's process holds about 200k long-lived objects once libp2p, trio, the crypto and the
peer's own services are imported and started. CPython's full collection walks all of them
each time, and under connection churn (hundreds of peers connecting, being closed and
redialing) full collections came every 2-3 s and stalled the event loop 120-380 ms each, up
to 800 ms (issue 12). :func:`freeze_startup` collects once and then moves every object alive
into the permanent generation (:func:`gc.freeze`), which collections never walk: they still
free what dies by reference counting, and what becomes cyclic garbage is kept until the
process ends (so only the first start-up of a process freezes; a process that starts and
stops many peers, such as a test run, keeps at most the first one's cycles).

The figures (``benchmarks/bench_hostile.py``) are in the commit that added this module.

It also raises the collection thresholds from CPython's defaults (700, 10, 10) to
:data:`THRESHOLDS`, unless the application has set its own: a peer allocates in bursts (a
``serve()`` in a 100-peer mesh takes in hundreds of DHT answers and dials dozens of peers),
and with the defaults a worker process of 20 peers ran 10-12 full collections of 130-380 ms
each in 95 s, several of them during the bursts, on top of 60-70 young collections over
5 ms. With :data:`THRESHOLDS`: 2 full collections and about 10 young ones over 5 ms in the
same run (issue 11). Objects that die by reference count are freed at once as before; only
cyclic garbage waits longer, at most about :data:`THRESHOLDS` ``[0]`` container objects
between young collections.
"""

from __future__ import annotations

import gc
import logging
import time

__all__ = ["DEFAULT_THRESHOLDS", "THRESHOLDS", "freeze_startup", "frozen_at_startup", "raised_thresholds"]

log = logging.getLogger(__name__)

_frozen: int | None = None

#: CPython's own collection thresholds.
DEFAULT_THRESHOLDS = (700, 10, 10)
#: The thresholds a peer's process runs with, unless the application set its own.
THRESHOLDS = (50_000, 20, 10)


def raised_thresholds(current: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The thresholds to set instead of ``current``: :data:`THRESHOLDS` if ``current`` are
    CPython's defaults, else ``None`` (the application chose its own; they stay)."""
    return THRESHOLDS if tuple(current) == DEFAULT_THRESHOLDS else None


def freeze_startup() -> int:
    """Collect, then freeze every object alive now, and raise the collection thresholds (once
    per process); the objects frozen.

    Later calls do nothing and return the first call's count. Does nothing (and returns 0)
    while automatic collection is disabled (:func:`gc.disable`): the application manages
    collections itself.
    """
    global _frozen
    if _frozen is not None:
        return _frozen
    if not gc.isenabled():
        return 0
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    _frozen = gc.get_freeze_count()
    raised = raised_thresholds(gc.get_threshold())
    if raised is not None:
        gc.set_threshold(*raised)
    log.debug(
        "froze %d start-up objects out of garbage collection (%.0f ms)",
        _frozen,
        (time.perf_counter() - started) * 1000,
    )
    return _frozen


def frozen_at_startup() -> int | None:
    """The objects :func:`freeze_startup` froze, or ``None`` if it has not run in this process."""
    return _frozen
