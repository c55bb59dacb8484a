"""The ``modelnet`` command line.

Every command is a thin face over the library: it builds a :class:`~modelnet_p2p.Peer`
from the merged configuration (flags > ``MODELNET_*`` > ``--config`` file > network
defaults > built-in defaults, see :mod:`modelnet_p2p.config`) and calls the same API a
program would. One module per command group; the options they share are declared once
in :mod:`.options`.

Errors are one line on stderr and a non-zero exit; ``-v`` shows details.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

import click

from ..config import VERSION
from ..errors import ModelNetError, exception_leaves
from ..log import set_verbose
from .ask import ask_command, parse_params
from .config import config_group, id_command
from .dashboard import dashboard_command
from .demo import demo_command
from .discover import discover_command
from .doctor import doctor_command
from .gateway import gateway_command
from .mesh import mesh_assignment, mesh_group
from .options import State
from .psk import psk_group
from .run import run_command
from .serve import bootstrap_command, resolve_serve_target, serve_command
from .status import status_command
from .token import token_group
from .verify import verify_command

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "cli",
    "main",
    "mesh_assignment",
    "parse_params",
    "resolve_serve_target",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(VERSION, prog_name="modelnet")
@click.option("-v", "--verbose", is_flag=True, help="Show details and the networking stack's logs.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="MODELNET_CONFIG",
    help="TOML configuration file.",
)
@click.option("--network", default=None, help="Mesh to join: local (default), testnet, or a private name.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, config_file: str | None, network: str | None) -> None:
    """modelnet: connect AI models peer to peer.

    \b
    Configuration precedence: flags > MODELNET_* environment > --config file
    > network defaults > built-in defaults. See `modelnet config show`.

    \b
    Exit codes:
      0    success
      1    the operation failed (unreachable peer, remote error, bad key or config file)
      2    bad usage (unknown command or flag, malformed argument)
      130  interrupted (Ctrl-C)
    """
    ctx.obj = State(verbose, config_file, network)
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        set_verbose(True)
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")


for _command in (
    id_command,
    config_group,
    serve_command,
    bootstrap_command,
    mesh_group,
    gateway_command,
    ask_command,
    discover_command,
    doctor_command,
    status_command,
    dashboard_command,
    demo_command,
    run_command,
    psk_group,
    token_group,
    verify_command,
):
    cli.add_command(_command)


def _echo_err(message: str) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)


def _most_telling(group: BaseExceptionGroup[Any]) -> BaseException:
    """The leaf of ``group`` to report: a library error first, then Ctrl-C, then the first leaf."""
    leaves = exception_leaves(group)
    for kind in (ModelNetError, KeyboardInterrupt):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if leaves else group


def _fail(exc: BaseException, verbose: bool, group: BaseExceptionGroup[Any] | None = None) -> NoReturn:
    """Exit for ``exc``: one line on stderr and the exit code; ``-v`` adds the traceback."""
    if isinstance(exc, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(exc, ModelNetError):
        _echo_err(exc.message)
    else:  # not one of ours: say what it was; -v shows where
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if verbose else " (run with -v for details)"
        _echo_err(f"{type(exc).__name__}{': ' + detail if detail else ''}{hint}")
    if verbose:
        raise group or exc
    sys.exit(EXIT_ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line on stderr and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    try:
        cli.main(args=args, prog_name="modelnet", standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_ERROR)
    except BaseExceptionGroup as group:
        _fail(_most_telling(group), verbose, group)
    except (Exception, KeyboardInterrupt) as exc:
        _fail(exc, verbose)
    sys.exit(EXIT_OK)


if __name__ == "__main__":
    main()
