"""The multi-peer worker's commands (modelnet_p2p.testing.worker), over a real worker process."""

from __future__ import annotations

import sys

import trio

from modelnet_p2p.testing import open_worker


async def test_serve_find_fresh_watch_and_stats() -> None:
    with trio.fail_after(150):
        async with open_worker(4, max_seconds=140, startup_timeout=60) as w:
            ids = [p["id"] for p in w.peers]
            stats = (await w.request({"cmd": "stats"}))["stats"]
            assert len(stats["conns"]) == 4 and all(c >= 1 for c in stats["conns"])
            assert stats["tcp"] and all(
                sent >= 0 and received >= 0 for sent, received in stats["tcp"].values()
            )

            served = await w.request(
                {"cmd": "serve", "peer": 2, "capability": {"name": "late", "task": "chat"}}
            )
            assert served["serving"] == "late" and isinstance(served["t"], float)
            found = await w.request(
                {"cmd": "find", "peer": 1, "model": "late", "id": ids[2], "timeout": 30}, timeout=60
            )
            assert found["t"] is not None and found["t"] >= served["t"] and found["lookups"] >= 1
            assert 0 <= found["lookup_s"] <= found["t"] - served["t"] + 1, found
            placed = await w.request({"cmd": "placed", "peer": 2, "timeout": 30}, timeout=60)
            assert placed["t"] is not None and placed["t"] >= served["t"] and placed["rounds"] >= 1
            assert placed["acks"].get("model:late", 0) >= 1, placed
            # one time per acknowledgement, in order, each within the announce
            times = placed["ack_times"]["model:late"]
            assert len(times) == placed["acks"]["model:late"] and times == sorted(times), placed
            assert 0 <= times[-1] <= placed["t"] - served["t"] + 1, placed

            fresh = await w.request(
                {
                    "cmd": "fresh",
                    "bootstrap": w.peers[0]["addr"],
                    "task": "chat",
                    "expect": [ids[2]],
                    "timeout": 30,
                },
                timeout=90,
            )
            assert fresh["found"] == 1 and fresh["all_s"] is not None and fresh["done_s"] >= fresh["all_s"]

            watching = await w.request({"cmd": "watch", "id": ids[3], "capability": "late2"})
            assert watching["watching"] == ids[3]
            assert not w.seen(ids[3])  # peer 3 does not serve late2 yet
            await w.request({"cmd": "serve", "peer": 3, "capability": {"name": "late2"}})
            await w.wait_seen(ids[3], 4, timeout=60)  # every local peer, peer 3 itself included

            # following as routing does: a lookup of the providers (peer 3 serves late2 now)
            looked = await w.request(
                {"cmd": "watch", "id": ids[2], "capability": "late", "lookup": True}, timeout=60
            )
            assert looked["following"] == 4
            await w.wait_seen(ids[2], 4, timeout=60)


async def test_open_worker_runs_a_given_command() -> None:
    cmd = [sys.executable, "-m", "modelnet_p2p.testing.worker", "--peers", "1", "--max-seconds", "60"]
    with trio.fail_after(90):
        async with open_worker(5, command=cmd, startup_timeout=60) as w:
            assert len(w.peers) == 1  # the command's --peers, not open_worker's
            assert (await w.request({"cmd": "stats"}))["stats"]["peers"] == 1
