"""Private meshes across implementations: a js-libp2p peer (tests/interop_js, TCP + Noise + yamux
+ @libp2p/pnet) and a modelnet peer connect and ping each other with the same swarm key, in both
directions, and cannot with a wrong key or none. Everything on 127.0.0.1.

Needs node (20 or newer) and ``npm ci`` in tests/interop_js (``.ci/run`` does it). Without them
the tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cli_util import read_event

from modelnet_p2p import Peer
from modelnet_p2p.errors import ModelNetError
from modelnet_p2p.proto.swarmkey import format_swarm_key, new_swarm_key

JS = Path(__file__).resolve().parent / "interop_js"
NODE = shutil.which("node")


def need_js() -> str:
    missing = None
    if NODE is None:
        missing = "node is not installed"
    elif not (JS / "node_modules" / "libp2p").is_dir():
        missing = "tests/interop_js has no node_modules (run: cd tests/interop_js && npm ci)"
    if missing is None:
        assert NODE is not None
        return NODE
    if os.environ.get("CI") == "true":
        pytest.fail(f"the js-libp2p interop test must run under CI: {missing}")
    pytest.skip(missing)


def key_file(tmp_path: Path, name: str, key: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(format_swarm_key(key or new_swarm_key()))
    return path


@contextmanager
def js_peer(*args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Run tests/interop_js/peer.mjs with ``args``; its process and its ``ready`` event."""
    proc = subprocess.Popen(
        [need_js(), str(JS / "peer.mjs"), *args],
        cwd=JS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = read_event(proc, timeout=60)
        assert ready["event"] == "ready", ready
        yield proc, ready
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the peer stops when stdin closes
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def js_pings(target: str, *args: str) -> tuple[str, dict[str, Any]]:
    """Start a js peer that pings ``target`` once; its peer id and its ``ping`` event."""
    with js_peer("--dial", target, *args) as (proc, ready):
        while True:
            event = read_event(proc, timeout=60)
            if event["event"] == "ping":
                return ready["peer_id"], event


async def py_connects(peer: Peer, addr: str) -> str | None:
    """The peer id ``peer`` reaches at ``addr``, or ``None`` if the connection fails."""
    with trio.fail_after(60):  # a keyless dial may wait for the protector's nonce timeout
        try:
            return await peer.connect(addr)
        except ModelNetError:
            return None


async def test_same_key_connects_and_pings_both_ways(tmp_path: Path) -> None:
    need_js()
    key = key_file(tmp_path, "swarm.key")
    with js_peer("--psk", str(key)) as (_, js):
        async with Peer(psk=key) as py:
            # modelnet dials js-libp2p: pnet, Noise and yamux agree, and ping runs on top
            assert await py_connects(py, js["addrs"][0]) == js["peer_id"]
            rtt = await py.dialer.ping(js["peer_id"], timeout=10)
            assert rtt is not None
            # js-libp2p dials modelnet
            _, event = await trio.to_thread.run_sync(partial(js_pings, py.addrs[0], "--psk", str(key)))
            assert event["ok"], event


async def test_wrong_key_and_no_key_fail_both_ways(tmp_path: Path) -> None:
    need_js()
    key, wrong = key_file(tmp_path, "swarm.key"), key_file(tmp_path, "wrong.key")
    with js_peer("--psk", str(key)) as (_, js):
        async with Peer(psk=wrong) as py_wrong, Peer() as py_plain, Peer(psk=key) as py:
            # modelnet dials js: a wrong key or none does not connect
            assert await py_connects(py_wrong, js["addrs"][0]) is None
            assert await py_connects(py_plain, js["addrs"][0]) is None
            for p in (py_wrong, py_plain):
                assert not p.dialer.is_connected(js["peer_id"])
            # js dials modelnet with a wrong key, and with none
            for args in (["--psk", str(wrong)], []):
                js_id, event = await trio.to_thread.run_sync(partial(js_pings, py.addrs[0], *args))
                assert not event["ok"], (args, event)
                assert not py.dialer.is_connected(js_id)
            # the control: the same key still works after the failures
            assert await py_connects(py, js["addrs"][0]) == js["peer_id"]
