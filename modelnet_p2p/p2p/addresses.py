"""Multiaddrs as a modelnet peer reads them: parsing, relayed addresses, and how far an address reaches.

Pure address logic, no I/O (the exceptions: a wildcard listen address is expanded to the
machine's interface addresses, and a bootstrap list may be read from a file). See
``specs/network.md`` ("Peers that cannot be dialed").

A relayed (circuit) address names a relay and a target behind it::

    <relay transport addr>/p2p/<relay id>/p2p-circuit/p2p/<target id>
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import multiaddr
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr.protocols import P_P2P

from ..errors import ConfigError

__all__ = [
    "BOOTSTRAP_HOST_PROTOCOLS",
    "MAX_BOOTSTRAP_ADDRS",
    "Reachability",
    "circuit_addr",
    "expand_wildcard",
    "is_circuit_addr",
    "needs_relay",
    "parse_bootstrap_list",
    "parse_circuit_addr",
    "parse_multiaddr",
    "parse_peer_addr",
    "publicly_dialable",
    "read_bootstrap_file",
]

Reachability = Literal["auto", "public", "private"]


def parse_multiaddr(addr: str | multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """Parse a multiaddr, raising :class:`ConfigError` with the offending text on failure."""
    if isinstance(addr, multiaddr.Multiaddr):
        return addr
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise ConfigError(f"invalid multiaddr {addr!r}: {exc}") from None


def parse_peer_addr(addr: str | multiaddr.Multiaddr, what: str = "relay") -> tuple[str, PeerInfo]:
    """A direct address with ``/p2p/<id>``: its normalised text and peer info (transport part only).

    Raises :class:`ConfigError` if ``addr`` is relayed, has no peer id or an invalid one;
    ``what`` names the address in the message.
    """
    maddr = parse_multiaddr(addr)
    if is_circuit_addr(maddr):
        raise ConfigError(f"{what} address {addr} is itself a relayed address")
    peer = maddr.get_peer_id()
    if not peer:
        raise ConfigError(f"{what} address {addr} has no /p2p/<peer id> part")
    try:
        peer_id = ID.from_base58(str(peer))
    except Exception:
        raise ConfigError(f"{what} address {addr} has an invalid peer id") from None
    transport = maddr.decapsulate_code(P_P2P)
    addrs = [transport] if str(transport) not in ("", "/") else []
    return str(maddr), PeerInfo(peer_id, addrs)


def circuit_addr(relay_addr: str | multiaddr.Multiaddr, target: str | ID) -> str:
    """The address of ``target`` behind the relay at ``relay_addr`` (which has ``/p2p/``)."""
    relay, _ = parse_peer_addr(relay_addr)
    return f"{relay}/p2p-circuit/p2p/{target}"


def is_circuit_addr(addr: str | multiaddr.Multiaddr) -> bool:
    """Whether ``addr`` is a relayed (``/p2p-circuit``) address; ``False`` if it is not a multiaddr."""
    try:
        maddr = addr if isinstance(addr, multiaddr.Multiaddr) else multiaddr.Multiaddr(addr)
        return any(p.name == "p2p-circuit" for p in maddr.protocols())
    except Exception:
        return False


def parse_circuit_addr(addr: str | multiaddr.Multiaddr) -> tuple[str, str]:
    """Split ``<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<target id>`` into (relay addr, target id).

    Raises :class:`ConfigError` if ``addr`` is not such an address.
    """
    text = str(parse_multiaddr(addr))
    relay, sep, tail = text.partition("/p2p-circuit")
    target = tail.removeprefix("/p2p/")
    if not sep or not relay or "/p2p-circuit" in tail or target == tail or "/" in target:
        raise ConfigError(
            f"{addr} is not a relayed address (<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>)"
        )
    try:
        ID.from_base58(target)
    except Exception:
        raise ConfigError(f"relayed address {addr} has an invalid target peer id") from None
    parse_peer_addr(relay)  # checks the relay part
    return relay, target


# -- reachability ---------------------------------------------------------------------

_LOOPBACK, _PRIVATE, _PUBLIC = 0, 1, 2


def _scope(addr: multiaddr.Multiaddr) -> int | None:
    """How far an address reaches: this machine, a private network, or the internet."""
    names = {p.name for p in addr.protocols()}
    if "p2p-circuit" in names:
        return None
    for proto in ("ip4", "ip6"):
        if proto in names:
            ip = ipaddress.ip_address(addr.value_for_protocol(proto))
            if ip.is_loopback:
                return _LOOPBACK
            return _PUBLIC if ip.is_global else _PRIVATE
    if names & {"dns", "dns4", "dns6", "dnsaddr"}:
        return _PUBLIC
    return None


def expand_wildcard(addr: multiaddr.Multiaddr) -> list[multiaddr.Multiaddr]:
    """A wildcard (``0.0.0.0``, ``::``) stands for the machine's interface addresses."""
    for proto in ("ip4", "ip6"):
        try:
            ip = addr.value_for_protocol(proto)
        except Exception:
            continue
        if ip in ("0.0.0.0", "::"):
            try:
                return list(expand_wildcard_address(addr))
            except Exception:
                return [addr]
    return [addr]


def _scopes(addrs: Iterable[str | multiaddr.Multiaddr]) -> list[int]:
    out = []
    for a in addrs:
        for expanded in expand_wildcard(parse_multiaddr(a)):
            scope = _scope(expanded)
            if scope is not None:
                out.append(scope)
    return out


def publicly_dialable(
    listen_addrs: Iterable[str | multiaddr.Multiaddr],
    bootstrap: Iterable[str | multiaddr.Multiaddr] = (),
) -> bool:
    """Whether the peers of the mesh can presumably dial a peer listening on ``listen_addrs``.

    The rule, kept simple on purpose (no dial-back test):

    1. No listen address (relayed ones do not count): ``False``.
    2. Each address reaches as far as its IP: loopback (this machine), private
       (RFC 1918, CGNAT, link-local, ULA ...) or public (a globally routable IP,
       or a DNS name). A wildcard (``0.0.0.0``, ``::``) counts as the
       machine's interface addresses.
    3. The peer is dialable if its widest address reaches at least as far as
       the widest bootstrap address: a loopback or LAN mesh (or no bootstrap
       peers at all) can dial private addresses; a peer with only private
       addresses joining through public bootstrap peers is taken to be behind
       NAT, and ``False`` is returned.

    A peer behind a port-forwarding NAT, or on a cloud machine whose public IP is
    not on an interface, is misjudged as not dialable; it still works (through a
    relay), and ``reachability="public"`` says otherwise.
    """
    own = _scopes(listen_addrs)
    if not own:
        return False
    return max(own) >= max(_scopes(bootstrap), default=_LOOPBACK)


def needs_relay(
    reachability: Reachability,
    listen_addrs: Iterable[str | multiaddr.Multiaddr],
    bootstrap: Iterable[str | multiaddr.Multiaddr] = (),
) -> bool:
    """Whether a peer should reserve slots on its bootstrap relays.

    ``"private"``: always; ``"public"``: never; ``"auto"``: if it is not
    :func:`publicly_dialable` from the mesh it joins.
    """
    if reachability == "private":
        return True
    if reachability == "public":
        return False
    if reachability != "auto":
        raise ConfigError(f"reachability must be 'auto', 'public' or 'private', not {reachability!r}")
    return not publicly_dialable(listen_addrs, bootstrap)


# -- bootstrap lists ---------------------------------------------------------------------

#: What a bootstrap address may start with: an IP, or a DNS name resolved at start
#: (:mod:`.resolve`; ``/dns4/`` gives IPv4 addresses, ``/dns6/`` IPv6, ``/dns/`` both).
BOOTSTRAP_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
#: Addresses one bootstrap list may hold (a peer dials each at start).
MAX_BOOTSTRAP_ADDRS = 64


def parse_bootstrap_list(text: str, source: str = "bootstrap list") -> list[str]:
    """The addresses of a bootstrap list, in order and without duplicates (``docs/testnet.md``).

    One address per line, or several separated by commas or spaces; ``#`` starts a
    comment; blank lines are ignored. Each address is
    ``/<ip4|ip6|dns|dns4|dns6>/<host>/tcp/<port>/p2p/<peer id>``. Raises
    :class:`ConfigError` naming ``source`` and the line for anything else.
    """
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for item in line.split("#", 1)[0].replace(",", " ").split():
            where = f"{source}, line {lineno}"
            try:
                maddr = multiaddr.Multiaddr(item)
            except Exception:
                raise ConfigError(f"{where}: {item!r} is not a multiaddr") from None
            names = [p.name for p in maddr.protocols()]
            if len(names) != 3 or names[0] not in BOOTSTRAP_HOST_PROTOCOLS or names[1:] != ["tcp", "p2p"]:
                raise ConfigError(
                    f"{where}: {item} is not /<ip4|ip6|dns4|dns6|dns>/<host>/tcp/<port>/p2p/<peer id>"
                )
            parse_peer_addr(maddr, f"{where}: bootstrap")  # checks the peer id
            if str(maddr) not in out:
                out.append(str(maddr))
    if len(out) > MAX_BOOTSTRAP_ADDRS:
        raise ConfigError(f"{source}: {len(out)} addresses; at most {MAX_BOOTSTRAP_ADDRS}")
    return out


def read_bootstrap_file(path: str | os.PathLike[str]) -> list[str]:
    """The addresses of the bootstrap list file at ``path`` (:func:`parse_bootstrap_list`)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read bootstrap list {path}: {exc.strerror}") from None
    return parse_bootstrap_list(text, f"bootstrap list {path}")
