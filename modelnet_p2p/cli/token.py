"""``modelnet token``: capability tokens (``specs/token.md``), and ``serve``'s access flags.

Tokens are signed with a peer identity's key file (``-i``): the issuer's for ``issue`` and
``revoke``, the holder's (the token's audience) for ``delegate``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import trio

from ..errors import ConfigError, ProtocolError
from ..p2p.identity import Identity
from ..proto.token import (
    ANY,
    NONCE_SIZE,
    Caveats,
    TokenError,
    delegate_token,
    inspect_token,
    issue_token,
    open_revocations,
    seal_revocations,
)
from .options import PSK_HELP, PeerOptions, State, pass_state

__all__ = ["AccessFlags", "access_options", "parse_duration", "parse_rate", "token_group"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h``, ``7d`` -> seconds."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not found or float(found.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 10m, 1h or 7d")
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


def parse_rate(text: str) -> int:
    """``60/min``, ``1/s``, ``100/h`` -> requests per minute (at least 1)."""
    found = re.fullmatch(r"\s*([0-9]+)\s*/\s*(s|sec|m|min|h|hour)\s*", text)
    if not found:
        raise click.BadParameter(f"{text!r} is not a rate like 60/min, 2/s or 100/h", param_hint="--rate")
    per = {"s": 1 / 60, "sec": 1 / 60, "m": 1, "min": 1, "h": 60, "hour": 60}[found.group(2)]
    return max(1, round(int(found.group(1)) / per))


def _key(identity_path: str) -> tuple[Identity, bytes]:
    identity = Identity.load(identity_path)
    return identity, identity.key_pair.private_key.to_bytes()[:32]


def _audience(to: str) -> str:
    return ANY if to in ("any", ANY) else to


@dataclass(frozen=True)
class _Terms:
    """The options ``issue`` and ``delegate`` share: the signer's key file, the audience, the
    lifetime and the caveats of the new token (or block)."""

    identity: str
    to: str
    ttl: str
    rate: str | None
    tokens_per_day: int | None
    max_input: int | None

    def key(self) -> bytes:
        return _key(self.identity)[1]

    def fields(self) -> dict[str, Any]:
        """The keyword arguments of :func:`issue_token` and :func:`delegate_token` they set."""
        now = time.time()
        return {
            "audience": _audience(self.to),
            "not_before": now - 60,  # a minute of clock skew
            "expires": now + parse_duration(self.ttl),
            "caveats": Caveats(
                rate_per_minute=parse_rate(self.rate) if self.rate else None,
                tokens_per_day=self.tokens_per_day,
                max_input=self.max_input,
            ),
            "nonce": secrets.token_bytes(NONCE_SIZE),
        }


def _terms_options(fn: Any) -> Any:
    """Add the options of :class:`_Terms`; ``fn`` gets them as one ``terms`` argument."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        terms = _Terms(**{name: kwargs.pop(name) for name in _Terms.__dataclass_fields__})
        return fn(*args, terms=terms, **kwargs)

    command.__dict__["__click_params__"] = list(getattr(fn, "__click_params__", []))
    wrapped: Any = command
    for option in reversed(
        [
            click.option("--rate", help="Requests per minute, per second or per hour: 60/min, 2/s, 100/h."),
            click.option("--tokens-per-day", type=click.IntRange(0), help="Chunks (tokens) per UTC day."),
            click.option("--max-input", type=click.IntRange(0), help="Largest request input, in bytes."),
            click.option("--ttl", default="1h", show_default=True, help="Valid for: 30s, 10m, 1h, 7d."),
            click.option(
                "--to", "to", required=True, help="The peer id that may use it, or 'any' (bearer token)."
            ),
            click.option("--identity", "-i", "identity", required=True, type=click.Path(dir_okay=False)),
        ]
    ):
        wrapped = option(wrapped)
    return wrapped


@click.group("token")
def token_group() -> None:
    """Capability tokens: issue, delegate, inspect, revoke (specs/token.md)."""


@token_group.command("issue")
@click.option(
    "--capability", "-c", "capabilities", multiple=True, required=True, help="Name or prefix*, repeatable."
)
@_terms_options
def token_issue(capabilities: tuple[str, ...], terms: _Terms) -> None:
    """Print a new token signed with the issuer's key (-i)."""
    key = terms.key()
    try:
        token = issue_token(key, capabilities=list(capabilities), **terms.fields())
    except (ValueError, ProtocolError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(token)


@token_group.command("delegate")
@click.argument("token")
@click.option("--capability", "-c", "capabilities", multiple=True, help="Narrow to these names or prefixes*.")
@_terms_options
def token_delegate(token: str, capabilities: tuple[str, ...], terms: _Terms) -> None:
    """Print a narrower token for another peer, signed with the holder's key (-i)."""
    key = terms.key()
    try:
        out = delegate_token(token.strip(), key, capabilities=list(capabilities) or None, **terms.fields())
    except TokenError as exc:
        raise ConfigError(f"cannot delegate this token: {exc}") from None
    except (ValueError, ProtocolError) as exc:
        raise ConfigError(str(exc)) from None
    click.echo(out)


@token_group.command("inspect")
@click.argument("token")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def token_inspect(token: str, as_json: bool) -> None:
    """Show a token's blocks (Datalog), signers and revocation ids, and whether it is signed by its issuer."""
    try:
        info = inspect_token(token.strip())
    except TokenError as exc:
        raise ConfigError(f"not a token: {exc}") from None
    data: dict[str, Any] = {
        "issuer": info.issuer,
        "signature_valid": info.signature_valid,
        "blocks": [
            {"source": src, "signed_by": key, "revocation_id": rid}
            for src, key, rid in zip(info.blocks, info.external_keys, info.revocation_ids, strict=False)
        ],
    }
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"issuer: {info.issuer}  signature: {'valid' if info.signature_valid else 'INVALID'}")
    for i, block in enumerate(data["blocks"]):
        signer = f" (third-party, {block['signed_by']})" if block["signed_by"] else ""
        click.echo(f"\n-- block {i}{signer}, revocation id {block['revocation_id'][:16]}...")
        click.echo(block["source"].rstrip())


@token_group.command("revoke")
@click.argument("tokens", nargs=-1, required=True)
@click.option("--identity", "-i", "identity", required=True, type=click.Path(dir_okay=False), help="Issuer.")
@click.option(
    "--output", "-o", required=True, type=click.Path(dir_okay=False), help="Revocation list file (updated)."
)
@click.option(
    "--publish",
    "publish",
    multiple=True,
    help="Multiaddr of a peer to publish the list to, by gossip on the issuer's topic (repeatable).",
)
@click.option("--psk-file", "psk_file", type=click.Path(dir_okay=False), help=PSK_HELP)
@pass_state
def token_revoke(
    state: State,
    tokens: tuple[str, ...],
    identity: str,
    output: str,
    publish: tuple[str, ...],
    psk_file: str | None,
) -> None:
    """Add TOKENS (every block of each) to the issuer's signed revocation list file.

    A peer serving with --revocations FILE re-reads it when it changes (every 5 s) and
    publishes it to the providers that trust the issuer (gossip; they also poll it).
    --publish ADDR publishes it now through the peers at ADDR, from a short-lived peer.
    """
    issuer, _ = _key(identity)
    path = Path(output)
    ids: set[str] = set()
    seq = 0
    if path.exists():
        try:
            old = open_revocations(path.read_bytes(), {str(issuer.peer_id)})
        except (OSError, ProtocolError) as exc:
            raise ConfigError(f"{output}: not a revocation list of this issuer ({exc})") from None
        ids, seq = set(old.ids), old.seq + 1
    for token in tokens:
        try:
            ids.update(inspect_token(token.strip()).revocation_ids)
        except TokenError as exc:
            raise ConfigError(f"not a token: {exc}") from None
    data = seal_revocations(issuer, ids, seq=seq, issued=int(time.time()))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see half a file
    click.echo(f"{output}: {len(ids)} revoked ids, seq {seq}", err=True)
    if publish:
        flags = PeerOptions(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=publish, psk_file=psk_file)
        cfg, _ = state.config(flags)
        reached = trio.run(_publish, cfg, str(issuer.peer_id), data)
        if not reached:
            raise ConfigError(
                "no peer at --publish subscribes to the issuer's revocations (do they --trust it?)"
            )
        click.echo(f"published to {reached} peer(s) subscribed to the issuer's revocations", err=True)


#: Seconds ``token revoke --publish`` waits for a neighbour subscribed to the issuer's topic.
PUBLISH_WAIT = 10.0


async def _publish(cfg: Any, issuer: str, data: bytes) -> int:
    """Publish ``data`` on ``issuer``'s topic from a short-lived peer: how many neighbours had joined it."""
    from ..p2p.network import topic
    from ..services.revocation import revocation_topic
    from .common import make_peer

    async with make_peer(cfg, gossip=True) as peer:
        gossip = peer.availability.gossip if peer.availability is not None else None
        if gossip is None:
            return 0
        where = revocation_topic(issuer, lambda t: topic(t, peer.network))
        with trio.move_on_after(PUBLISH_WAIT):
            while not gossip.subscribers(where):
                await trio.sleep(0.1)
        reached = len(gossip.subscribers(where))
        if reached:
            await gossip.publish(where, data)
            await gossip.flush(5.0)
        return reached


# -- serve's access flags ---------------------------------------------------------------


@dataclass(frozen=True)
class AccessFlags:
    """``modelnet serve``'s access flags."""

    access: str | None = None
    allow: tuple[str, ...] = ()
    require_token: bool = False
    trust: tuple[str, ...] = ()
    revocations: tuple[str, ...] = ()

    def capability_flags(self) -> dict[str, Any]:
        """Capability fields (only those given)."""
        out: dict[str, Any] = {}
        if self.allow:
            out["access"], out["allow"] = "allowlist", frozenset(self.allow)
        if self.access:
            out["access"] = self.access
        return out

    def peer_overrides(self) -> dict[str, Any]:
        """Peer settings (only those given)."""
        out: dict[str, Any] = {}
        if self.require_token:
            out["require_token"] = True
        if self.trust:
            out["trust"] = self.trust
        if self.revocations:
            out["revocations"] = self.revocations
        return out


def access_options(fn: Any) -> Any:
    """Add ``--access``, ``--allow``, ``--require-token``, ``--trust``, ``--revocations``."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        flags = AccessFlags(
            access=kwargs.pop("access_policy"),
            allow=tuple(kwargs.pop("allow")),
            require_token=kwargs.pop("require_token"),
            trust=tuple(kwargs.pop("trust")),
            revocations=tuple(kwargs.pop("revocations")),
        )
        if (flags.require_token or flags.access == "token") and not flags.trust:
            raise click.UsageError("tokens need --trust ISSUER_PEER_ID (whose tokens to accept)")
        return fn(*args, access=flags, **kwargs)

    command.__dict__["__click_params__"] = list(getattr(fn, "__click_params__", []))
    options = [
        click.option(
            "--access",
            "access_policy",
            type=click.Choice(["public", "token", "allowlist"]),
            help="Who may call: public (default), token, allowlist.",
        ),
        click.option(
            "--allow", multiple=True, help="Peer id admitted (repeatable); implies --access allowlist."
        ),
        click.option("--require-token", is_flag=True, help="Every capability needs a capability token."),
        click.option("--trust", multiple=True, help="Issuer peer id whose tokens are accepted (repeatable)."),
        click.option(
            "--revocations",
            multiple=True,
            type=click.Path(dir_okay=False),
            help="Signed revocation list file (`modelnet token revoke`), re-read when it changes.",
        ),
    ]
    wrapped: Any = command
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped
