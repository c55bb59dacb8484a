"""Workaround of py-libp2p 0.8.1's notifee fan-out: a nursery and a task per notifee for every
stream opened and closed.

Upstream behaviour corrected (the canaries in ``tests/test_compat_notifees.py`` fail once
upstream changes it):

- **Every stream event costs a task per notifee.** ``Swarm._notify`` opens a nursery and
  spawns one task for each registered notifee, for each event, and waits for them all. A
  host here has six notifees (the swarm's tag store, identify, pubsub, the connection
  manager and two disconnect callbacks), and a connection that carries one DHT request
  sees about 17 stream events (``opened_stream`` and ``closed_stream``, both ends, for the
  DHT, identify and pubsub streams) beside 4 connection events: traced with a trio
  instrument, 71 of the 91 tasks spawned per such connection were these. Every notifee's
  stream methods are trivial (none awaits anything but a checkpoint), so the tasks buy
  nothing.

:func:`install` makes one swarm call its notifees' ``opened_stream`` and ``closed_stream``
in turn, in the calling task, each in its own ``try`` (a notifee that raises is logged and
the others still run, as upstream isolates them). ``connected``, ``disconnected`` and the
listen events keep upstream's fan-out: identify's ``connected`` may wait up to 5 s for the
connection to start, and the others must not wait behind it. It is per swarm (an attribute
of that instance), idempotent, and changes nothing on the wire.
"""

from __future__ import annotations

import logging
import types
from typing import Any

__all__ = ["INLINE_EVENTS", "install", "installed"]

log = logging.getLogger(__name__)

#: The notifee methods called in the calling task, one notifee after another.
INLINE_EVENTS = frozenset({"opened_stream", "closed_stream"})


async def _notify(self: Any, method: str, *args: Any) -> None:
    if method not in INLINE_EVENTS:
        await type(self)._notify(self, method, *args)
        return
    for notifee in list(self.notifees):
        try:
            await getattr(notifee, method)(self, *args)
        except Exception:
            log.warning("notifee %s.%s raised", type(notifee).__name__, method, exc_info=True)


def installed(swarm: Any) -> bool:
    """Whether ``swarm`` calls its notifees' stream events inline."""
    bound = swarm.__dict__.get("_notify")
    return isinstance(bound, types.MethodType) and bound.__func__ is _notify


def install(swarm: Any) -> bool:
    """Have ``swarm`` call its notifees' stream events inline (idempotent); ``False`` (nothing
    changed) if the swarm has no ``_notify`` fan-out with a ``notifees`` list."""
    if installed(swarm):
        return True
    if not callable(getattr(type(swarm), "_notify", None)) or not isinstance(
        getattr(swarm, "notifees", None), list
    ):
        log.info("the swarm fans out notifee events elsewhere: stream events keep their tasks")
        return False
    swarm._notify = types.MethodType(_notify, swarm)
    return True
