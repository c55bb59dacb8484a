"""The options every command shares, declared once, and how flags become a :class:`Config`.

The group's own options (``-v``, ``--config``, ``--network``) live in :class:`State`;
the peer options (``--identity``, ``--listen``, ``--bootstrap``, ``--reachability``)
are one decorator, :func:`peer_options`, that hands the command a single
:class:`PeerOptions`. No default is written here: an option left out is ``None``
(or empty) and the value comes from :func:`~modelnet_p2p.config.load_config`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from ..config import Config, load_config

__all__ = [
    "IDENTITY_HELP",
    "PeerOptions",
    "State",
    "identity_option",
    "pass_state",
    "peer_options",
    "require_bootstrap",
]

F = TypeVar("F", bound=Callable[..., Any])

IDENTITY_HELP = "Key file (created if missing)."
LISTEN_HELP = "Listen multiaddr (repeatable)."
BOOTSTRAP_HELP = "Bootstrap multiaddr (repeatable)."
REACHABILITY_HELP = "Can others dial this peer? private: reserve a relay slot on the bootstrap peers."
REACHABILITY_CHOICES = ("auto", "public", "private")
PSK_HELP = "Swarm key file of a private mesh (`modelnet psk new`): only peers with the same key connect."


@dataclass(frozen=True)
class PeerOptions:
    """The peer flags of one command line; ``None`` or empty means "not given"."""

    identity: str | None = None
    listen: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    reachability: str | None = None
    psk_file: str | None = None

    def config_flags(self) -> dict[str, Any]:
        """These flags as :func:`load_config` ``flags`` (only the ones given take effect)."""
        return {
            "identity": self.identity,
            "listen": list(self.listen),
            "bootstrap": list(self.bootstrap),
            "reachability": self.reachability,
            **({"psk_file": self.psk_file} if self.psk_file else {}),
        }


class State:
    """The group's options, shared by every command (``ctx.obj``)."""

    def __init__(self, verbose: bool, config_file: str | None, network: str | None) -> None:
        self.verbose = verbose
        self.config_file = config_file
        self.network = network

    def config(self, peer: PeerOptions | None = None, **flags: Any) -> tuple[Config, dict[str, str]]:
        """The merged configuration: ``peer`` and ``flags`` > environment > file > network > defaults."""
        merged: dict[str, Any] = {"network": self.network}
        if peer is not None:
            merged.update(peer.config_flags())
        merged.update(flags)
        return load_config(self.config_file, flags=merged)


pass_state = click.pass_obj


def identity_option(*decls: str, dest: str = "identity", help: str = IDENTITY_HELP) -> Callable[[F], F]:
    """The ``--identity`` option (``decls`` default to ``--identity -i``); unset, the config decides."""
    return click.option(*(decls or ("--identity", "-i")), dest, type=click.Path(dir_okay=False), help=help)


def peer_options(
    *,
    listen: tuple[str, ...] = ("--listen", "-l"),
    listen_help: str = LISTEN_HELP,
    reachability: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the peer options to a command; it receives them as one ``peer: PeerOptions`` argument.

    ``listen`` and ``listen_help`` name and describe the listen flag (the gateway's
    ``--listen`` is its HTTP address, so its peer listens with ``--p2p-listen``);
    ``reachability=False`` leaves that flag out.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            peer = PeerOptions(
                identity=kwargs.pop("identity"),
                listen=tuple(kwargs.pop("listen")),
                bootstrap=tuple(kwargs.pop("bootstrap")),
                reachability=kwargs.pop("reachability", None),
                psk_file=kwargs.pop("psk_file"),
            )
            return fn(*args, peer=peer, **kwargs)

        # click reads the declared options from this attribute; keep fn's own list untouched
        command.__dict__["__click_params__"] = list(getattr(fn, "__click_params__", []))
        decorators: list[Callable[[Any], Any]] = [
            identity_option(),
            click.option(*listen, "listen", multiple=True, help=listen_help),
            click.option("--bootstrap", "-b", multiple=True, help=BOOTSTRAP_HELP),
            click.option("--psk-file", "psk_file", type=click.Path(dir_okay=False), help=PSK_HELP),
        ]
        if reachability:
            decorators.append(
                click.option(
                    "--reachability", type=click.Choice(REACHABILITY_CHOICES), help=REACHABILITY_HELP
                )
            )
        wrapped: Callable[..., Any] = command
        for option in reversed(decorators):  # listed in the order --help shows them
            wrapped = option(wrapped)
        return wrapped

    return decorate


def require_bootstrap(cfg: Config, why: str = "to reach the mesh") -> None:
    """A usage error unless the configuration names a bootstrap peer."""
    if not cfg.bootstrap:
        raise click.UsageError(f"give --bootstrap ADDR (or MODELNET_BOOTSTRAP) {why}")
