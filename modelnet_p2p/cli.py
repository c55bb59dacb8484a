"""The ``modelnet`` command line."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import ModelNetError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelnet")
@click.option("-v", "--verbose", is_flag=True, help="Show details and the networking stack's logs.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """modelnet: connect AI models peer to peer.

    \b
    Exit codes:
      0  success
      1  the operation failed (unreachable peer, bad key file, remote error)
      2  bad usage (unknown flag, malformed argument)
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    if verbose:
        import logging

        from .log import set_verbose

        logging.basicConfig(level=logging.DEBUG)
        set_verbose(True)


@cli.command("id")
@click.option(
    "--identity",
    "identity_path",
    default="modelnet.key",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Key file; created (mode 0600) if missing.",
)
def id_command(identity_path: str) -> None:
    """Print this node's peer id, creating the identity file if needed."""
    from .identity import Identity

    ident = Identity.load_or_create(identity_path)
    click.echo(str(ident.peer_id))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning library errors into one line on stderr."""
    try:
        cli.main(args=argv, prog_name="modelnet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_ERROR)
    except ModelNetError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(EXIT_OK)


if __name__ == "__main__":
    main()
