"""``modelnet mesh up``: a bootstrap node and N peers serving the example models, one process each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import click
import trio

from ..demo.models import ALL
from ..errors import ConfigError
from .common import run_async
from .options import PSK_HELP, State, pass_state

__all__ = ["mesh_assignment", "mesh_group"]

#: The ``serve`` target every peer of the mesh starts from.
MESH_TARGET = "modelnet_p2p.demo_models:ALL"
#: Seconds a child process may take to print its "ready" event.
START_TIMEOUT = 60.0
#: Seconds the children get to stop after SIGINT before they are killed.
STOP_TIMEOUT = 15.0


def mesh_assignment(n: int) -> list[list[str]]:
    """Which example models each of ``n`` peers serves.

    Every peer serves "echo" (so requests can be routed and fail over), plus one of
    the others in turn.
    """
    others = [name for name in ALL if name != "echo"]
    return [["echo", others[i % len(others)]] for i in range(n)]


class _Child:
    def __init__(self, proc: trio.Process, role: str) -> None:
        self.proc = proc
        self.role = role
        self.buffer = b""
        self.ready: dict[str, Any] = {}

    async def read_event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            data = await self.proc.stdout.receive_some(4096)
            if not data:
                raise ConfigError(f"{self.role} exited before it was ready (code {self.proc.poll()})")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]


async def _spawn(args: list[str], role: str, verbose: bool) -> _Child:
    cmd = [sys.executable, "-m", "modelnet_p2p.cli", *(["-v"] if verbose else []), *args]
    proc = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, start_new_session=True
    )
    child = _Child(proc, role)
    with trio.fail_after(START_TIMEOUT):
        event = await child.read_event()
    if event.get("event") != "ready":
        raise ConfigError(f"{role} did not start: {event}")
    child.ready = event
    return child


async def _stop_children(children: list[_Child]) -> None:
    with trio.CancelScope(shield=True):
        for child in children:
            if child.proc.returncode is None:
                child.proc.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_TIMEOUT):
            for child in children:
                await child.proc.wait()
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()
            if child.proc.stdin is not None:
                await child.proc.stdin.aclose()
            if child.proc.stdout is not None:
                await child.proc.stdout.aclose()


@click.group("mesh")
def mesh_group() -> None:
    """Run a local mesh of peers, each in its own process."""


@mesh_group.command("up")
@click.option("-n", "count", default=4, show_default=True, type=click.IntRange(1, 64), help="Model peers.")
@click.option("--json", "as_json", is_flag=True, help="Print the mesh as one JSON object.")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="Bootstrap node's TCP port (0: any).")
@click.option("--psk-file", type=click.Path(dir_okay=False, exists=True), help=PSK_HELP)
@pass_state
def mesh_up(state: State, count: int, as_json: bool, port: int, psk_file: str | None) -> None:
    """Start a bootstrap node and N peers serving the example models, until Ctrl-C.

    Prints the bootstrap address to give other peers (--bootstrap). Ctrl-C stops
    every process; nothing is left running.
    """
    try:
        run_async(_mesh_up, state, count, as_json, port, psk_file)
    except KeyboardInterrupt:
        pass


async def _mesh_up(state: State, count: int, as_json: bool, port: int, psk_file: str | None) -> None:
    children: list[_Child] = []
    net = ["--network", state.network] if state.network else []
    psk = ["--psk-file", os.path.abspath(psk_file)] if psk_file else []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            boot = await _spawn(
                [
                    *net,
                    "bootstrap",
                    "--json",
                    "--exit-on-stdin-eof",
                    "--listen",
                    f"/ip4/127.0.0.1/tcp/{port}",
                    *psk,
                ],
                "bootstrap node",
                state.verbose,
            )
            children.append(boot)
            boot_addr = boot.ready["addrs"][0]
            if not as_json:
                click.echo(f"bootstrap node  {boot_addr}")
            async with trio.open_nursery() as nursery:

                async def start_peer(i: int, models: list[str]) -> None:
                    only = [x for m in models for x in ("--only", m)]
                    child = await _spawn(
                        [
                            *net,
                            "serve",
                            MESH_TARGET,
                            "--json",
                            "--exit-on-stdin-eof",
                            "--bootstrap",
                            boot_addr,
                            *only,
                            *psk,
                        ],
                        f"peer {i}",
                        state.verbose,
                    )
                    children.append(child)

                for i, models in enumerate(mesh_assignment(count)):
                    nursery.start_soon(start_peer, i, models)
            peers = [c.ready for c in children[1:]]
            if as_json:
                click.echo(json.dumps({"bootstrap": boot_addr, "peers": peers}))
            else:
                for p in peers:
                    click.echo(f"peer {p['peer_id'][-8:]}  serves {', '.join(p['capabilities'])}")
                click.echo(f"\n{count} peers up. Join with:  --bootstrap {boot_addr}\nCtrl-C stops the mesh.")
            sys.stdout.flush()
            async for _ in signals:
                break
        finally:
            if not as_json and children:
                click.echo("stopping the mesh...", err=True)
            await _stop_children(children)
