"""Canaries of ``modelnet_p2p.p2p._compat.taskparent``: they fail once py-libp2p's service
manager stops walking all its tasks to find a new task's parent (then the shim can go); and
tests that the index finds the parent the walk finds."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.tools.anyio_service import Service, background_trio_service
from libp2p.tools.anyio_service.trio_tasks import FunctionTask

from modelnet_p2p.p2p._compat import taskparent
from modelnet_p2p.p2p.host import build_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.testing import open_peers

TASKS = 50


class _Sleepers(Service):
    """A service running ``TASKS`` idle tasks, and one that records what the lookups say."""

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.found: dict[str, Any] = {}
        #: The parent of the task ``_probe`` starts (found through the child's own task).
        self.child_parent: Any = None

    async def run(self) -> None:
        for _ in range(TASKS):
            self.manager.run_task(trio.sleep_forever)
        self.manager.run_task(self._probe)
        await self.manager.wait_finished()

    async def _probe(self) -> None:
        me = trio.lowlevel.current_task()
        manager: Any = self.manager
        self.found["walk"] = taskparent._ORIGINAL_FIND(manager, me)
        self.found["index"] = taskparent._find_parent_task(manager, me)
        self.manager.run_task(self._child)
        self.ready.set()
        await trio.sleep_forever()

    async def _child(self) -> None:
        manager: Any = self.manager
        self.child_parent = manager._find_parent_task(trio.lowlevel.current_task()).parent
        await trio.sleep_forever()


def _count_walk(monkeypatch: Any) -> list[int]:
    visited = [0]
    original = FunctionTask.iterate_tasks.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, *tasks: Any) -> Any:
        for task in original(cls, *tasks):
            visited[0] += 1
            yield task

    monkeypatch.setattr(FunctionTask, "iterate_tasks", classmethod(counting))
    return visited


async def test_stock_walks_every_task_to_find_a_parent(monkeypatch: Any) -> None:
    service = _Sleepers()
    async with background_trio_service(service) as manager:
        await service.ready.wait()
        visited = _count_walk(monkeypatch)
        # A caller that is none of the manager's tasks: the walk visits every one of them.
        assert taskparent._ORIGINAL_FIND(manager, trio.lowlevel.current_task()) is None
        assert visited[0] >= TASKS
        manager.cancel()


async def test_the_index_finds_the_parent_the_walk_finds(monkeypatch: Any) -> None:
    build_host(Identity.generate())  # building a host installs the shim
    assert taskparent.installed()
    service = _Sleepers()
    async with background_trio_service(service) as manager:
        await service.ready.wait()
        with trio.fail_after(5):
            while service.child_parent is None:
                await trio.sleep(0)
        probe = service.found["walk"]
        assert probe is not None and service.found["index"] is probe
        assert service.child_parent is probe  # the child's parent: the task that started it
        visited = _count_walk(monkeypatch)
        assert manager._find_parent_task(trio.lowlevel.current_task()) is None  # type: ignore[attr-defined]
        assert visited[0] == 0  # no walk
        manager.cancel()
    assert not manager.__dict__.get(taskparent._INDEX)  # every task left the index as it ended


async def test_peers_connect_and_stop_cleanly_with_the_index() -> None:
    async with open_peers(3) as peers:
        a, b, c = peers
        await b.connect(a.addrs[0])
        await c.connect(a.addrs[0])
        swarm: Any = a.host.get_network()
        assert len(swarm.get_connections()) >= 2
        index = swarm.manager.__dict__.get(taskparent._INDEX)
        assert index  # the swarm's tasks (two per connection) are in it
