"""DNS multiaddrs (``/dns/``, ``/dns4/``, ``/dns6/``) resolved to IP multiaddrs before dialing.

py-libp2p 0.8.1's TCP transport dials IP addresses only: a bootstrap address such as
``/dns4/boot.example.org/tcp/4001/p2p/<id>`` fails with "no addresses established a
successful connection". Bootstrap lists name hosts, not IPs (an IP changes when a node
moves), so a peer resolves them at start with the system resolver: ``/dns4/`` to IPv4
addresses, ``/dns6/`` to IPv6, ``/dns/`` to both. Everything after the host part
(``/tcp/<port>/p2p/<id>``) is kept.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import multiaddr
import trio

__all__ = ["DNS_PROTOCOLS", "MAX_RESOLVED", "RESOLVE_TIMEOUT", "is_dns_addr", "resolve_addr", "resolve_addrs"]

log = logging.getLogger(__name__)

#: The multiaddr protocols that name a host instead of an IP (``dnsaddr`` needs TXT records; not
#: supported).
DNS_PROTOCOLS = {"dns": socket.AF_UNSPEC, "dns4": socket.AF_INET, "dns6": socket.AF_INET6}
#: Seconds one name may take to resolve.
RESOLVE_TIMEOUT = 5.0
#: IP addresses kept per name (a name with hundreds of records is not a bootstrap peer).
MAX_RESOLVED = 8


def is_dns_addr(addr: multiaddr.Multiaddr) -> bool:
    """Whether ``addr`` starts with a DNS name (``/dns/``, ``/dns4/`` or ``/dns6/``)."""
    protocols = list(addr.protocols())
    return bool(protocols) and protocols[0].name in DNS_PROTOCOLS


async def resolve_addr(
    addr: multiaddr.Multiaddr, *, timeout: float = RESOLVE_TIMEOUT
) -> list[multiaddr.Multiaddr]:
    """``addr`` with its DNS name replaced by each IP it resolves to (``[addr]`` if it names an IP).

    Returns ``[]`` if the name does not resolve within ``timeout`` seconds (logged).
    """
    if not is_dns_addr(addr):
        return [addr]
    first = next(iter(addr.protocols())).name
    host = str(addr.value_for_protocol(first))
    rest = str(addr).split("/", 3)[3] if str(addr).count("/") >= 3 else ""
    family = DNS_PROTOCOLS[first]
    infos: list[tuple[object, ...]] = []
    with trio.move_on_after(timeout):
        try:
            infos = list(await trio.socket.getaddrinfo(host, None, family, socket.SOCK_STREAM))
        except OSError as exc:
            log.warning("cannot resolve %s in %s: %s", host, addr, exc)
            return []
    out: list[multiaddr.Multiaddr] = []
    for info in infos:
        fam, sockaddr = info[0], info[4]
        ip = str(sockaddr[0]) if isinstance(sockaddr, tuple) else ""
        proto = "ip6" if fam == socket.AF_INET6 else "ip4"
        text = f"/{proto}/{ip}/{rest}" if rest else f"/{proto}/{ip}"
        try:
            maddr = multiaddr.Multiaddr(text)
        except Exception:
            continue
        if maddr not in out:
            out.append(maddr)
        if len(out) >= MAX_RESOLVED:
            break
    if not out:
        log.warning("%s resolved to no address", addr)
    return out


async def resolve_addrs(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Every address of ``addrs`` resolved (:func:`resolve_addr`), in order, without duplicates.

    A name that does not resolve is kept as it is, so that the dial fails with its own message.
    """
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        for resolved in await resolve_addr(addr) or [addr]:
            if resolved not in out:
                out.append(resolved)
    return out
