"""What the commands share at run time: the trio entry, the peer, events, secrets and stopping."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click
import trio

from ..config import Config
from ..errors import ConfigError
from ..peer import Peer

__all__ = ["emit", "env_secret", "gateway_extra_missing", "make_peer", "run_async", "wait_for_stop"]


def run_async(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """Run a coroutine function under trio; Ctrl-C inside is handled by the commands."""
    return trio.run(fn, *args)


def make_peer(cfg: Config, **overrides: Any) -> Peer:
    """A :class:`Peer` built from the merged configuration, with per-command ``overrides``."""
    return Peer(config=cfg.peer_config(), **overrides)


def gateway_extra_missing(needs: str, exc: ImportError) -> ConfigError:
    """The error for a missing package of the ``gateway`` extra: ``needs`` says what wanted it."""
    return ConfigError(f"{needs}: pip install 'modelnet_p2p[gateway]' ({exc.name} is missing)")


def env_secret(var: str | None, flag: str) -> str | None:
    """The value of the environment variable named by ``flag`` (secrets never go on the command line)."""
    if not var:
        return None
    value = os.environ.get(var, "")
    if not value:
        raise click.UsageError(f"{flag} {var}: that environment variable is not set or is empty")
    return value


def emit(as_json: bool, event: str, text: str, **data: Any) -> None:
    """One event: a JSON line with ``--json``, else ``text``."""
    if as_json:
        click.echo(json.dumps({"event": event, **data}), nl=True)
        sys.stdout.flush()
    else:
        click.echo(text)


async def wait_for_stop(signals: Any, watch_stdin: bool) -> None:
    """Return on the first SIGINT/SIGTERM, or when stdin closes if ``watch_stdin``.

    ``modelnet mesh up`` starts its peers with a pipe on stdin, so they stop
    even if the parent is killed without a chance to signal them.
    """
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()

        async def on_stdin_eof() -> None:
            # Read fd 0 in trio itself: a worker thread blocked in sys.stdin would
            # abort the interpreter at exit.
            async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
                while await stdin.receive_some(4096):
                    pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        if watch_stdin:
            nursery.start_soon(on_stdin_eof)
