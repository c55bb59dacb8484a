"""Workaround of py-libp2p 0.8.1's service manager: a walk over every task it runs, each time
it starts one.

Upstream behaviour corrected (the canaries in ``tests/test_compat_taskparent.py`` fail once
upstream changes it):

- **Starting a task costs a walk over all the manager's tasks.** ``TrioManager.run_task``
  finds the new task's parent with ``_find_parent_task``, which iterates, with recursive
  generators, over every task of the manager's hierarchy until one's trio task is the
  caller's. The swarm starts two tasks for each new connection (the muxer's and the
  connection's) from its own manager, which holds two or more tasks per open connection, so
  each new connection costs time in proportion to the connections already open: with 260
  Sybils redialing (the hostile benchmark's ``idle-connections``), this walk was 8 % of the
  victim's CPU, and the same walk runs for every connection a peer of a large mesh opens.

:func:`install` gives each manager an index from trio task to the task it runs, filled as
the manager starts a task (``_run_and_manage_task``, in the task's own trio task) and
emptied as it ends; ``_find_parent_task`` looks the caller up there. A task is in the index
from its start to its end, as it is in the hierarchy that the walk searched (from the
moment its trio task is known until it is discarded), so the parent found is the same. It is
process-wide (``TrioManager`` is one class for every service), idempotent, and reverted by
:func:`uninstall`.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.tools.anyio_service.trio_manager import TrioManager

__all__ = ["install", "installed", "uninstall"]

log = logging.getLogger(__name__)

_ORIGINAL_FIND = TrioManager._find_parent_task
_ORIGINAL_RUN = TrioManager._run_and_manage_task
#: The attribute of a manager that holds its index.
_INDEX = "_modelnet_task_index"


def _index(manager: Any) -> dict[trio.lowlevel.Task, Any]:
    index: dict[trio.lowlevel.Task, Any] | None = manager.__dict__.get(_INDEX)
    if index is None:
        index = manager.__dict__[_INDEX] = {}
    return index


async def _run_and_manage_task(self: Any, task: Any) -> None:
    me = trio.lowlevel.current_task()
    index = _index(self)
    index[me] = task
    try:
        await _ORIGINAL_RUN(self, task)
    finally:
        if index.get(me) is task:
            del index[me]


def _find_parent_task(self: Any, trio_task: trio.lowlevel.Task) -> Any:
    index: dict[trio.lowlevel.Task, Any] | None = self.__dict__.get(_INDEX)
    task = index.get(trio_task) if index is not None else None
    if task is None or not getattr(task, "has_trio_task", False) or task.trio_task is not trio_task:
        return None  # not one of this manager's running tasks: a new root task, as upstream
    return task


def installed() -> bool:
    """Whether managers look a new task's parent up in their index."""
    return TrioManager._find_parent_task is _find_parent_task


def install() -> bool:
    """Have every ``TrioManager`` find a new task's parent in its index (idempotent);
    ``False`` (nothing changed) if py-libp2p's manager lacks the methods this replaces."""
    if installed():
        return True
    current = (TrioManager._find_parent_task, TrioManager._run_and_manage_task)
    if current != (_ORIGINAL_FIND, _ORIGINAL_RUN):
        log.info("py-libp2p's service manager changed: a new task's parent is still found by a walk")
        return False
    TrioManager._find_parent_task = _find_parent_task  # type: ignore[method-assign]
    TrioManager._run_and_manage_task = _run_and_manage_task  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """Undo :func:`install` (managers running meanwhile keep their index, unused)."""
    if installed():
        TrioManager._find_parent_task = _ORIGINAL_FIND  # type: ignore[method-assign]
        TrioManager._run_and_manage_task = _ORIGINAL_RUN  # type: ignore[method-assign]
