"""The stdin command loop of the test worker processes (``mesh_worker.py``, ``availability_worker.py``).

A worker prints JSON lines to stdout (:func:`emit`) and reads one command per stdin line.
:func:`serve_commands` runs a handler for each line until stdin closes or SIGTERM arrives;
:func:`run_bounded` runs a worker's ``main`` with a hard limit on its run time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

#: Handles one command line; may start tasks in the nursery, which lives until the loop ends.
Handler = Callable[[str, trio.Nursery], Awaitable[None]]


def emit(obj: dict[str, Any]) -> None:
    """Write ``obj`` to stdout as one JSON line."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def read_lines(stream: trio.abc.ReceiveStream, chunk: int = 65536) -> AsyncIterator[str]:
    """The lines of ``stream``, stripped, until it ends."""
    buf = b""
    while True:
        data = await stream.receive_some(chunk)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


async def serve_commands(handle: Handler) -> None:
    """Call ``handle(line, nursery)`` for every non-empty stdin line, until stdin closes or SIGTERM."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            async for line in read_lines(stdin):
                if line:
                    await handle(line, nursery)
            nursery.cancel_scope.cancel()


def run_bounded(main: Callable[[], Awaitable[None]], max_seconds: float) -> None:
    """``trio.run(main)``, cancelled after ``max_seconds``."""

    async def bounded() -> None:
        with trio.move_on_after(max_seconds):
            await main()

    trio.run(bounded)
