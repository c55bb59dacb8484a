"""``modelnet demo``: the narrated local mesh (see :mod:`modelnet_p2p.demo.narrated`)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..demo.narrated import run_demo
from .common import run_async

__all__ = ["demo_command"]


@click.command("demo")
def demo_command() -> None:
    """Start a local mesh in this process and show discovery, streaming, failover and collaboration.

    Exits 0 and leaves nothing running.
    """
    color = sys.stdout.isatty()

    def style(text: str, **kw: Any) -> str:
        return click.style(text, **kw) if color else text

    run_async(run_demo, click.echo, style)
