"""Serve test capabilities from a modelnet peer in its own process, for inference tests that
need the server's event loop apart from the client's (a handler that blocks its loop).

::

    python tests/infer_worker.py

Prints one JSON line, ``{"addr": "<listen addr>/p2p/<id>"}``, once it serves, then runs
until stdin closes. Capabilities:

- ``stall-after-first``: yields ``"first"``, then blocks its whole event loop for
  ``params["block"]`` seconds (``time.sleep``, no await), then yields ``"second"``;
- ``ok``: returns ``"ok"``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import Capability, Peer


async def stall_after_first(request: Any) -> AsyncIterator[str]:
    yield "first"
    time.sleep(float(request.params.get("block", 0.5)))  # blocks the loop: no writer runs
    yield "second"


async def ok(request: Any) -> str:
    return "ok"


async def main() -> None:
    async with Peer(listen=["/ip4/127.0.0.1/tcp/0"]) as peer:
        peer.serve(Capability("stall-after-first"), stall_after_first)
        peer.serve(Capability("ok"), ok)
        sys.stdout.write(json.dumps({"addr": peer.addrs[0]}) + "\n")
        sys.stdout.flush()
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


if __name__ == "__main__":
    trio.run(main)
