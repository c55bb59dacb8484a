"""The examples run as a user would run them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )


def test_echo_mesh():
    out = run_example("echo_mesh.py")
    assert out.returncode == 0, out.stderr
    assert "'peer '" in out.stdout and "'tokens '" in out.stdout
    assert "finished: stop, usage {'tokens': 7}" in out.stdout
    assert "{'the': 2, 'cat': 2" in out.stdout
    assert "not_found" in out.stdout
    assert "Traceback" not in out.stderr


def test_sync_script():
    out = run_example("sync_script.py")
    assert out.returncode == 0, out.stderr
    assert "chunk: four" in out.stdout
    assert "collected: ['c', 'b', 'a']" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_asyncio_server():
    out = run_example("asyncio_server.py", "--selftest", "--port", str(_free_port()))
    assert out.returncode == 0, out.stderr
    assert "over HTTP: HELLO! MESH!" in out.stdout
    assert "over the mesh: HELLO! MESH!" in out.stdout
