"""``modelnet psk``: swarm keys for private meshes (``specs/network.md``, "Private networks")."""

from __future__ import annotations

import os

import click

from ..errors import ConfigError
from ..proto.swarmkey import format_swarm_key, new_swarm_key

__all__ = ["psk_group"]


@click.group("psk")
def psk_group() -> None:
    """Swarm keys: only peers started with the same --psk-file can connect to each other."""


@psk_group.command("new")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write the key to this new file (mode 0600)."
)
def psk_new(output: str | None) -> None:
    """Make a new random swarm key (/key/swarm/psk/1.0.0/ format); print it unless -o is given."""
    data = format_swarm_key(new_swarm_key())
    if output is None:
        click.echo(data.decode(), nl=False)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{output} exists; not overwriting a swarm key") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {output}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(data)
    click.echo(f"wrote a new swarm key to {output}", err=True)
