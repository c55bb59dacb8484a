"""A long-lived client peer for ``test_wan.py``: requests on warm connections, on command.

::

    python tests/wan_client.py --listen ADDR --bootstrap ADDR

Prints ``{"ready": true, "peer_id": ...}`` once started, then reads one JSON command a line
from stdin and answers each with one JSON line:

- ``{"cmd": "calls", "capability": C, "input": X, "n": N, "target": ADDR_OR_NULL}``: N
  requests one after the other (routed when ``target`` is null); for each, the answering
  peer, the latency in ms and the attempts (``Response.attempts``), or the error.

It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import ModelNetError, Peer


async def calls(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    out = []
    for _ in range(int(cmd.get("n", 1))):
        started = time.monotonic()
        try:
            r = await peer.call(
                cmd.get("target"), cmd["capability"], cmd["input"], timeout=cmd.get("timeout", 30)
            )
            out.append(
                {
                    "peer": r.peer,
                    "text": r.text,
                    "ms": (time.monotonic() - started) * 1000,
                    "attempts": r.attempts,
                }
            )
        except ModelNetError as exc:
            out.append({"error": f"{type(exc).__name__}: {exc}", "ms": (time.monotonic() - started) * 1000})
    return {"calls": out}


async def main(args: argparse.Namespace) -> None:
    async with Peer(listen=[args.listen], bootstrap=[args.bootstrap]) as peer:
        print(json.dumps({"ready": True, "peer_id": peer.peer_id}), flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            if line.strip():
                print(json.dumps(await calls(peer, json.loads(line))), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--bootstrap", required=True)
    trio.run(main, parser.parse_args())
