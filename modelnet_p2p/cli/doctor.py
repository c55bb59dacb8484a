"""``modelnet doctor``: why this peer cannot see the mesh, or be seen by it, in plain sentences.

It gathers facts with a short-lived peer (the same configuration ``serve`` would use, but
it announces nothing and keeps no relay slot), then judges them. The judges are pure
functions of the facts (:func:`judge`), so each sentence and its fix can be tested alone.

Checks, in order:

- the key file: it exists and only its owner can read it;
- each listen address: its port is free, and it is bound once the peer runs;
- each bootstrap peer: reachable, the time to dial it, the protocols it offers (identify),
  and whether it is on the same network (the network name is part of every protocol id);
- reachability: whether others can dial this peer. A bootstrap node that offers dial-back
  (``specs/dialback.md``) is asked to connect back to the IP the peer's connection comes
  from, on its listen ports; without one, it is judged from the listen addresses and from
  the address each bootstrap peer sees it at (identify's observed address): an observed IP
  that is none of this peer's own means a NAT is in between;
- relay: whether a bootstrap peer grants a relay slot, and whether this peer needs one;
- clock: the skew against each relay, read from the reservation it grants (the relay's
  ``now + 3600 s``, the reservation lifetime of modelnet's relays); cards and records are
  valid only within 60 s of skew;
- the mesh: how many serving peers a browse finds.

Exit code 0 when no check failed; 1 otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import trio

from ..config import Config
from ..errors import ModelNetError
from ..p2p.addresses import expand_wildcard, is_circuit_addr, parse_multiaddr, publicly_dialable
from ..p2p.network import protocol_id
from ..p2p.probe import PeerIdentity, identify, port_taken
from ..p2p.relay import HOP_PROTOCOL_ID, RelayLink
from ..p2p.resolve import is_dns_addr, resolve_addr
from ..peer import Peer
from ..services.dialback import PROTOCOL_ID as DIALBACK_PROTOCOL_ID
from ..services.dialback import ask_dialback
from ..services.discovery import DHT_PROTOCOL_ID
from ..services.relay import DEFAULT_RESERVATION_TTL
from .common import run_async
from .options import PeerOptions, State, pass_state, peer_options

__all__ = ["BootstrapFacts", "Facts", "Finding", "doctor_command", "judge", "network_of"]

Status = Literal["ok", "warn", "fail"]

#: Seconds allowed to dial and identify each bootstrap peer, and to reserve a relay slot.
PROBE_TIMEOUT = 5.0
#: Seconds the browse of the mesh may take.
BROWSE_TIMEOUT = 8.0
#: Serving peers the browse counts at most.
BROWSE_LIMIT = 200
#: Clock skew (seconds) within which cards and records are accepted (specs/capability.md).
CARD_SKEW = 60.0
#: Skew (seconds) worth a warning: within the tolerance, but eating into it.
WARN_SKEW = 10.0
#: Dial times (ms) worth a warning.
SLOW_DIAL_MS = 2000.0
EXIT_OK, EXIT_PROBLEM = 0, 1


@dataclass
class Finding:
    """One sentence of the diagnosis: what was checked, how it went, and what to do."""

    check: str
    status: Status
    message: str
    fix: str | None = None


@dataclass
class BootstrapFacts:
    """What was learned of one bootstrap address."""

    addr: str
    parse_error: str | None = None
    dial_ms: float | None = None
    dial_error: str | None = None
    peer_id: str | None = None
    protocols: list[str] = field(default_factory=list)
    observed_addr: str | None = None
    agent: str | None = None
    relay_expires: float | None = None  # the relay's clock
    relay_asked_at: float | None = None  # our clock, the middle of the request
    relay_error: str | None = None
    resolved: list[str] = field(default_factory=list)  # the IP addresses of a /dns*/ address
    dialback: dict[str, Any] | None = None  # its answer to a dial-back request (services/dialback.py)
    dialback_error: str | None = None


@dataclass
class Facts:
    """Everything :func:`judge` needs; gathered by :func:`gather` (or written by a test)."""

    network: str
    key_file: str | None = None
    key_mode: int | None = None  # None: the file does not exist
    listen: list[str] = field(default_factory=list)
    taken: dict[str, str] = field(default_factory=dict)
    bound: list[str] = field(default_factory=list)
    reachability: str = "auto"
    bootstrap: list[BootstrapFacts] = field(default_factory=list)
    own_ips: list[str] = field(default_factory=list)
    serving_peers: int | None = None
    capabilities: int | None = None
    start_error: str | None = None


def network_of(protocol: str) -> str | None:
    """The network a modelnet protocol id belongs to (``local`` for the plain ids), else ``None``.

    ``/modelnet/kad/1.0.0`` is ``local``; ``/modelnet/testnet/kad/1.0.0`` is ``testnet``.
    """
    parts = protocol.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != "modelnet":
        return None
    return "local" if parts[3][:1].isdigit() else parts[2]


def _ip_of(addr: str) -> str | None:
    try:
        maddr = parse_multiaddr(addr)
    except ModelNetError:
        return None
    for proto in ("ip4", "ip6"):
        try:
            value = maddr.value_for_protocol(proto)
        except Exception:
            continue
        if value:
            return str(value)
    return None


def _port_of(addr: str) -> str | None:
    try:
        return str(parse_multiaddr(addr).value_for_protocol("tcp"))
    except Exception:
        return None


# -- the judges: facts in, sentences out (no I/O) ------------------------------------


def _judge_key(f: Facts) -> list[Finding]:
    if f.key_file is None:
        return [
            Finding(
                "key",
                "ok",
                "No key file is configured: this peer gets a new id each run (fine for a client).",
                "To keep one id (a server, a bootstrap node), give --identity peer.key.",
            )
        ]
    if f.key_mode is None:
        return [
            Finding(
                "key",
                "warn",
                f"The key file {f.key_file} does not exist yet; it is created (mode 0600) on the first run.",
                None,
            )
        ]
    if f.key_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [
            Finding(
                "key",
                "fail",
                f"The key file {f.key_file} has mode {f.key_mode:04o}: other users can read this peer's "
                "private key, so the peer refuses to start with it.",
                f"chmod 600 {f.key_file}",
            )
        ]
    return [Finding("key", "ok", f"The key file {f.key_file} is private (mode {f.key_mode:04o}).")]


def _judge_listen(f: Facts) -> list[Finding]:
    out = []
    for addr in f.listen:
        if addr in f.taken:
            port = _port_of(addr) or "?"
            out.append(
                Finding(
                    "listen",
                    "fail",
                    f"Cannot listen on {addr}: the port is taken by another process ({f.taken[addr]}).",
                    f"Stop the other process (see: ss -ltnp 'sport = :{port}'), or listen on another "
                    "port: --listen /ip4/0.0.0.0/tcp/<port>.",
                )
            )
    direct = [a for a in f.bound if not is_circuit_addr(a)]
    if not direct:
        if f.listen and not f.taken:
            out.append(
                Finding(
                    "listen",
                    "fail",
                    f"This peer is not listening: none of {', '.join(f.listen)} could be bound.",
                    "Give an address of this machine, e.g. --listen /ip4/0.0.0.0/tcp/4001.",
                )
            )
        elif not f.listen:
            out.append(
                Finding(
                    "listen",
                    "warn",
                    "This peer listens on no address: it can dial out, but nobody can dial it.",
                    "To serve, add --listen /ip4/0.0.0.0/tcp/4001 (or take part through a relay: "
                    "--reachability private).",
                )
            )
        return out
    out.append(Finding("listen", "ok", f"Listening on {', '.join(direct)}."))
    boot_ips = [ip for b in f.bootstrap if (ip := _ip_of(b.addr))]
    own = [ip for a in direct if (ip := _ip_of(a))]
    if boot_ips and own and all(_loopback(ip) for ip in own) and not all(_loopback(ip) for ip in boot_ips):
        out.append(
            Finding(
                "listen",
                "fail",
                "This peer listens on loopback only (127.0.0.1), so peers on other machines cannot dial it.",
                "Listen on all interfaces: --listen /ip4/0.0.0.0/tcp/4001 (--network testnet does).",
            )
        )
    return out


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _judge_bootstrap(f: Facts) -> list[Finding]:
    if not f.bootstrap:
        return [
            Finding(
                "bootstrap",
                "fail",
                "No bootstrap peer is configured: this peer knows nobody, so it sees no peers.",
                "Give --bootstrap /dns4/<host>/tcp/4001/p2p/<peer id> (or MODELNET_BOOTSTRAP, or "
                "--network testnet with a bootstrap list; see docs/testnet.md).",
            )
        ]
    out = []
    kad = protocol_id(DHT_PROTOCOL_ID, f.network)
    reached = 0
    for b in f.bootstrap:
        if b.parse_error:
            out.append(
                Finding(
                    "bootstrap",
                    "fail",
                    f"The bootstrap address {b.addr!r} is not valid: {b.parse_error}.",
                    "Write it as /ip4/<ip>/tcp/<port>/p2p/<id> or /dns4/<host>/tcp/<port>/p2p/<id>.",
                )
            )
            continue
        if b.dial_error is not None or b.dial_ms is None:
            out.append(
                Finding(
                    "bootstrap",
                    "fail",
                    f"The bootstrap peer {b.addr} could not be reached: {b.dial_error or 'no answer'}.",
                    "Check the address and port (is the bootstrap node running? `modelnet doctor` on it "
                    "says), that outbound TCP to that port is allowed by your firewall, and, in a private "
                    "mesh, that your swarm key is the mesh's.",
                )
            )
            continue
        reached += 1
        status: Status = "warn" if b.dial_ms > SLOW_DIAL_MS else "ok"
        speed = f"dialed in {b.dial_ms:.0f} ms"
        if b.resolved:
            speed = f"resolved to {', '.join(b.resolved)}; {speed}"
        out.append(
            Finding(
                "bootstrap",
                status,
                f"The bootstrap peer {b.addr} answered ({speed}"
                f"{', agent ' + b.agent if b.agent else ''}; {len(b.protocols)} protocols).",
                "A slow dial: the peer is far away or overloaded; add a closer bootstrap peer."
                if status == "warn"
                else None,
            )
        )
        networks = sorted({n for p in b.protocols if (n := network_of(p))})
        if kad in b.protocols:
            out.append(Finding("network", "ok", f"{b.addr} is on the same network ({f.network!r})."))
        elif networks:
            theirs = ", ".join(repr(n) for n in networks)
            out.append(
                Finding(
                    "network",
                    "fail",
                    f"{b.addr} is on network {theirs}, this peer on {f.network!r}: peers of different "
                    "networks speak different protocol ids and do not see each other.",
                    f"Join its network: --network {networks[0]} (or use a bootstrap peer of {f.network!r}).",
                )
            )
        elif b.protocols:
            out.append(
                Finding(
                    "network",
                    "fail",
                    f"{b.addr} is a libp2p peer but not a modelnet one (it offers no modelnet protocol).",
                    "Use the address of a modelnet bootstrap node (`modelnet bootstrap` prints it).",
                )
            )
        else:
            out.append(
                Finding(
                    "network",
                    "warn",
                    f"{b.addr} did not say which protocols it offers (identify failed).",
                    "Try again; if it persists the bootstrap node is overloaded.",
                )
            )
    if reached == 0 and len(f.bootstrap) > 1:
        out.append(
            Finding(
                "bootstrap",
                "fail",
                "No bootstrap peer could be reached, so this peer sees no peers.",
                "Fix one of the addresses above; one reachable bootstrap peer is enough.",
            )
        )
    return out


def _nat_hint(f: Facts) -> str | None:
    """The observed address that none of this peer's own IPs matches (a NAT in between), if any."""
    own = set(f.own_ips) | {ip for a in f.bound if (ip := _ip_of(a))}
    for b in f.bootstrap:
        seen = _ip_of(b.observed_addr) if b.observed_addr else None
        if seen and seen not in own and not _loopback(seen):
            return b.observed_addr
    return None


def _judge_reach(f: Facts) -> tuple[list[Finding], bool]:
    """The reachability findings, and whether this peer needs a relay."""
    direct = [a for a in f.bound if not is_circuit_addr(a)]
    boots = [b.addr for b in f.bootstrap if not b.parse_error]
    if f.reachability == "private":
        return [
            Finding(
                "reachability", "ok", "Reachability is set to private: this peer is reached through a relay."
            )
        ], True
    if not direct:
        return [
            Finding(
                "reachability",
                "warn",
                "Nobody can dial this peer directly (it listens on no address).",
                "Fine for a client; to serve, listen on an address or use a relay (--reachability private).",
            )
        ], True
    dialed = _judge_dialback(f)
    if dialed is not None:
        return dialed
    try:
        dialable = publicly_dialable(direct, boots)
    except ModelNetError:
        dialable = False
    nat = _nat_hint(f)
    if f.reachability == "public":
        if nat or not dialable:
            why = f"the bootstrap peers see it at {nat}" if nat else "its addresses are private"
            return [
                Finding(
                    "reachability",
                    "warn",
                    f"Reachability is set to public, but {why}: others may fail to dial it.",
                    "Forward the listen port on your router, or drop --reachability public (auto relays).",
                )
            ], False
        return [Finding("reachability", "ok", "This peer is dialable (reachability set to public).")], False
    if nat:
        port = _port_of(direct[0]) or "<port>"
        return [
            Finding(
                "reachability",
                "warn",
                f"The bootstrap peers see this peer at {nat}, an address it does not listen on: it is behind "
                "NAT, and others cannot dial it directly. It takes part through a relay.",
                f"To be dialable, forward TCP port {port} on your router to this machine, then run with "
                "--reachability public.",
            )
        ], True
    if not dialable:
        return [
            Finding(
                "reachability",
                "warn",
                "This peer has only private addresses and joins through public bootstrap peers: it is "
                "taken to be behind NAT, and takes part through a relay.",
                "If the port is forwarded (or the machine has a public IP not on an interface), run with "
                "--reachability public.",
            )
        ], True
    return [
        Finding("reachability", "ok", "This peer is dialable from the mesh it joins (direct addresses).")
    ], False


def _judge_dialback(f: Facts) -> tuple[list[Finding], bool] | None:
    """The reachability finding from the bootstrap nodes' dial-backs, if any answered."""
    tried = [
        (b, b.dialback) for b in f.bootstrap if b.dialback and isinstance(b.dialback.get("results"), dict)
    ]
    if not tried:
        return None
    reached = [(b.addr, d["ip"], port) for b, d in tried for port, r in d["results"].items() if r == "ok"]
    if reached:
        addr, ip, port = reached[0]
        return [
            Finding(
                "reachability",
                "ok",
                f"This peer is dialable from outside: {addr} dialed it back at {ip}, TCP port {port}.",
            )
        ], False
    b, d = tried[0]
    port, result = next(iter(d["results"].items()))
    return [
        Finding(
            "reachability",
            "warn",
            f"{b.addr} could not dial this peer back at {d['ip']}, TCP port {port} ({result}): a NAT or a "
            "firewall is in the way, so others cannot dial it directly. It takes part through a relay.",
            f"To be dialable, allow inbound TCP port {port} in your firewall, or forward it on your "
            "router to this machine, then run with --reachability public.",
        )
    ], True


def _judge_relay(f: Facts, needs_relay: bool) -> list[Finding]:
    reached = [b for b in f.bootstrap if b.dial_ms is not None and b.dial_error is None]
    relays = [b for b in reached if HOP_PROTOCOL_ID in b.protocols]
    held = [b for b in relays if b.relay_expires is not None]
    if held:
        where = ", ".join(b.addr for b in held)
        need = "this peer needs one" if needs_relay else "not needed now: this peer is dialable"
        return [Finding("relay", "ok", f"A relay slot is granted by {where} ({need}).")]
    if not needs_relay:
        return [Finding("relay", "ok", "No relay slot held; none is needed (this peer is dialable).")]
    if not reached:
        return [Finding("relay", "fail", "No relay slot: no bootstrap peer could be reached.", None)]
    why = "; ".join(f"{b.addr}: {b.relay_error}" for b in relays if b.relay_error) or "none of them relays"
    return [
        Finding(
            "relay",
            "fail",
            f"This peer needs a relay slot and holds none ({why}): others cannot reach it.",
            "Bootstrap from a node that relays (`modelnet bootstrap` does), or make this peer dialable "
            "(forward its port and use --reachability public).",
        )
    ]


def skew_of(b: BootstrapFacts) -> float | None:
    """Seconds the relay's clock is ahead of ours (negative: behind), from its reservation."""
    if b.relay_expires is None or b.relay_asked_at is None:
        return None
    return b.relay_expires - DEFAULT_RESERVATION_TTL - b.relay_asked_at


def _judge_clock(f: Facts) -> list[Finding]:
    skews = [(b.addr, s) for b in f.bootstrap if (s := skew_of(b)) is not None]
    if not skews:
        return [
            Finding(
                "clock",
                "warn",
                "The clock could not be compared with any peer (no relay reservation was granted).",
                "Make sure time sync is on: timedatectl set-ntp true (or run chrony/ntpd).",
            )
        ]
    addr, worst = max(skews, key=lambda s: abs(s[1]))
    side = "behind" if worst > 0 else "ahead of"
    text = f"This machine's clock is {abs(worst):.0f} s {side} the clock of {addr}"
    fix = "Turn on time sync: timedatectl set-ntp true (or run chrony/ntpd), on this machine or theirs."
    if abs(worst) > CARD_SKEW:
        return [
            Finding(
                "clock",
                "fail",
                f"{text}: cards and records are valid only within {CARD_SKEW:.0f} s of skew, so peers reject "
                "each other's cards and this peer sees fewer peers than there are.",
                fix,
            )
        ]
    if abs(worst) > WARN_SKEW:
        return [Finding("clock", "warn", f"{text} (within the {CARD_SKEW:.0f} s tolerance).", fix)]
    return [Finding("clock", "ok", f"Clocks agree within {max(abs(s) for _, s in skews):.0f} s.")]


def _judge_mesh(f: Facts) -> list[Finding]:
    if f.serving_peers is None:
        return []
    if f.serving_peers == 0:
        return [
            Finding(
                "mesh",
                "warn",
                "A browse of the mesh found no peer serving anything.",
                "If the checks above pass, the mesh is empty (or its providers are unreachable): "
                "serve something with `modelnet serve`, then `modelnet discover`.",
            )
        ]
    return [
        Finding(
            "mesh",
            "ok",
            f"A browse of the mesh found {f.serving_peers} serving peers ({f.capabilities} capabilities); "
            "`modelnet discover` lists them.",
        )
    ]


def judge(f: Facts) -> list[Finding]:
    """Every finding for ``f``, in the order of the checks."""
    out = _judge_key(f) + _judge_listen(f)
    if f.start_error:
        out.append(Finding("peer", "fail", f"The peer could not start: {f.start_error}.", None))
        return out
    out += _judge_bootstrap(f)
    reach, needs_relay = _judge_reach(f)
    return out + reach + _judge_relay(f, needs_relay) + _judge_clock(f) + _judge_mesh(f)


# -- gathering the facts (I/O) ----------------------------------------------------------


def _key_facts(identity: Any) -> tuple[str | None, int | None]:
    if identity is None or not isinstance(identity, str | os.PathLike):
        return None, None
    path = Path(identity)
    try:
        return str(path), stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return str(path), None
    except OSError:
        return str(path), None


async def _probe_bootstrap(peer: Peer, b: BootstrapFacts) -> None:
    maddr = parse_multiaddr(b.addr)
    candidates = [str(a) for a in await resolve_addr(maddr, timeout=PROBE_TIMEOUT)]
    if is_dns_addr(maddr):
        b.resolved = candidates
        if not candidates:
            b.dial_error = "its host name does not resolve (check the spelling, and your DNS)"
            return
    dial_addr = candidates[0] if candidates else b.addr
    t0 = trio.current_time()
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            b.peer_id = await peer.connect(dial_addr)
    except trio.TooSlowError:
        b.dial_error = f"no answer within {PROBE_TIMEOUT:.0f} s"
        return
    except ModelNetError as exc:
        b.dial_error = exc.message
        return
    except Exception as exc:  # what libp2p raises for a bad address or a handshake
        b.dial_error = f"{type(exc).__name__}: {exc}"
        return
    b.dial_ms = (trio.current_time() - t0) * 1000
    ident: PeerIdentity | None = await identify(peer.host, b.peer_id, timeout=PROBE_TIMEOUT)
    if ident is not None:
        b.protocols = list(ident.protocols)
        b.observed_addr = ident.observed_addr
        b.agent = ident.agent_version or None
    dialback = protocol_id(DIALBACK_PROTOCOL_ID, peer.network)
    ports = sorted({int(p) for a in peer.addrs if not is_circuit_addr(a) and (p := _port_of(a)) and p != "0"})
    if dialback in b.protocols and ports and b.peer_id is not None:
        pid = b.peer_id
        try:
            b.dialback = dict(await ask_dialback(lambda: peer.dialer.open_stream(pid, dialback), ports))
        except (ModelNetError, trio.TooSlowError) as exc:
            b.dialback_error = getattr(exc, "message", None) or "no answer"
        if b.dialback is not None and "error" in b.dialback:
            b.dialback_error, b.dialback = str(b.dialback["error"]), None
    if HOP_PROTOCOL_ID in b.protocols:
        before = time.time()
        try:
            b.relay_expires = await RelayLink(peer.host, dial_addr).reserve(PROBE_TIMEOUT)
            b.relay_asked_at = (before + time.time()) / 2
        except ModelNetError as exc:
            b.relay_error = exc.message
        except Exception as exc:
            b.relay_error = f"{type(exc).__name__}: {exc}"


async def gather(cfg: Config, *, browse: bool = True) -> Facts:
    """Start a short-lived peer as configured and learn what :func:`judge` needs."""
    pc = cfg.peer_config()
    f = Facts(network=pc.network, listen=[str(a) for a in pc.listen], reachability=str(pc.reachability))
    f.key_file, f.key_mode = _key_facts(pc.identity)
    for addr in f.listen:
        why = port_taken(addr)
        if why is not None:
            f.taken[addr] = why
    for addr in pc.bootstrap:
        b = BootstrapFacts(str(addr))
        try:
            parse_multiaddr(b.addr)
        except ModelNetError as exc:
            b.parse_error = exc.message
        f.bootstrap.append(b)
    for addr in f.listen:
        try:
            f.own_ips += [ip for a in expand_wildcard(parse_multiaddr(addr)) if (ip := _ip_of(str(a)))]
        except ModelNetError:
            pass
    # The probe peer: an ephemeral key (the real one may be unusable: that is a finding),
    # the free listen addresses, no gossip, no relay reservation of its own, bootstrap by hand.
    listen = [a for a in f.listen if a not in f.taken]
    try:
        peer = Peer(
            config=pc, identity=None, listen=listen, bootstrap=[], gossip=False, reachability="public",
            require_bootstrap=False,
        )  # fmt: skip
        async with peer:
            f.bound = list(peer.addrs)
            probes = [b for b in f.bootstrap if b.parse_error is None]
            async with trio.open_nursery() as nursery:
                for b in probes:
                    nursery.start_soon(_probe_bootstrap, peer, b)
            connected = [b.addr for b in probes if b.peer_id is not None]
            if connected:
                await peer.discovery.bootstrap([b.peer_id for b in probes if b.peer_id is not None])
                if browse:
                    cards = await peer.discover(limit=BROWSE_LIMIT, timeout=BROWSE_TIMEOUT)
                    others = [c for c in cards if c.peer_id != peer.peer_id]
                    f.serving_peers = len(others)
                    f.capabilities = sum(len(c.capabilities) for c in others)
    except ModelNetError as exc:
        f.start_error = exc.message
    return f


# -- the command -------------------------------------------------------------------------

_MARK = {"ok": ("✓", "green"), "warn": ("!", "yellow"), "fail": ("✗", "red")}


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-browse", is_flag=True, help="Skip the browse of the mesh (faster).")
@peer_options()
@pass_state
def doctor_command(state: State, as_json: bool, no_browse: bool, peer: PeerOptions) -> None:
    """Explain why this peer can't see the mesh or be seen, with a fix for each problem.

    \b
    Checks the key file, the listen addresses, each bootstrap peer (reachable, dial time,
    protocols, network name), reachability from outside and the relay slot, the clock skew
    against the peers, and what a browse of the mesh finds. Exit code 0 when no check fails.
    """
    cfg, _ = state.config(peer)
    facts = run_async(_gather, cfg, not no_browse)
    findings = judge(facts)
    ok = not any(x.status == "fail" for x in findings)
    if as_json:
        doc = {"ok": ok, "findings": [asdict(x) for x in findings], "facts": asdict(facts)}
        click.echo(json.dumps(doc, indent=2))
    else:
        for x in findings:
            mark, color = _MARK[x.status]
            click.echo(click.style(mark, fg=color, bold=True) + f" [{x.check}] {x.message}")
            if x.fix and x.status != "ok":
                click.echo(f"    fix: {x.fix}")
        problems = sum(x.status == "fail" for x in findings)
        click.echo("all is well" if ok else f"{problems} problem{'s' if problems != 1 else ''} found")
    sys.exit(EXIT_OK if ok else EXIT_PROBLEM)


async def _gather(cfg: Config, browse: bool) -> Facts:
    return await gather(cfg, browse=browse)
