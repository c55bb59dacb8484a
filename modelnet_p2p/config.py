"""Configuration: one TOML file, ``MODELNET_*`` environment variables and command-line flags.

Precedence, highest first:

1. command-line flags;
2. environment variables (``MODELNET_LISTEN``, ``MODELNET_BOOTSTRAP``, ...);
3. the TOML file given with ``--config`` (or ``MODELNET_CONFIG``);
4. the defaults of the selected network (``--network``);
5. built-in defaults.

:func:`load_config` returns the merged :class:`Config` and, for each field,
which of these sources set it, so ``modelnet config show`` can say so.

Every default a peer has is written once, in :class:`PeerConfig`. ``Peer``
takes one (``Peer(config=PeerConfig(...), **overrides)``), :class:`Config`
(the command line's view: the settings a file, the environment or a flag may
set) takes its defaults from it, and the spec tables quote it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .p2p.addresses import (
    Reachability,
    needs_relay,
    parse_bootstrap_list,
    parse_multiaddr,
    read_bootstrap_file,
)
from .p2p.host import DEFAULT_DIAL_TIMEOUT
from .p2p.identity import Identity
from .p2p.network import NETWORKS, get_network
from .p2p.resources import ResourceLimits
from .proto.session import DEFAULT_WINDOW, Limits
from .proto.swarmkey import parse_swarm_key

__all__ = [
    "DEFAULT_LISTEN",
    "ENV_PREFIX",
    "PEER_SETTINGS",
    "VERSION",
    "Config",
    "DhtMode",
    "PeerConfig",
    "load_config",
    "network_bootstrap_var",
]

try:
    #: This package's version.
    VERSION: str = version("modelnet_p2p")
except PackageNotFoundError:  # running from a source tree without install
    VERSION = "0.0.0"

ENV_PREFIX = "MODELNET_"

#: How a peer takes part in the DHT (see ``PeerConfig.dht_mode``).
DhtMode = Literal["auto", "server", "client"]
#: Where a peer listens unless told otherwise: loopback, any free port.
DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)


@dataclass(frozen=True)
class PeerConfig:
    """Everything a :class:`~modelnet_p2p.Peer` can be told, with its defaults (written only here).

    Attributes:
        identity: a key file path (created if missing), an :class:`Identity`, or
            ``None`` for an ephemeral key (logged, since the peer id changes each run).
        listen: multiaddrs to listen on.
        bootstrap: multiaddrs (with ``/p2p/``) of peers to connect to at start.
        passphrase: for an encrypted key file.
        network: the mesh to join (see :mod:`modelnet_p2p.p2p.network`); peers of
            different networks do not understand each other's protocols.
        require_bootstrap: fail at start (``UnavailableError``) if no bootstrap peer answers.
        connect_timeout: seconds allowed to dial a peer.
        max_frame_size: largest frame accepted or sent, in bytes (at least 1024).
        max_concurrency: requests served at once, over all callers.
        max_concurrency_per_peer: requests served at once for one caller.
        max_request_time: longest a served request may run, in seconds.
        max_hops: longest pathway (nested calls) a served request may be part of.
        window: the flow-control window granted to providers, in bytes.
        dht_mode: ``"server"`` (answer DHT requests and store records),
            ``"client"`` (only ask), or ``"auto"``: server if the peer listens on
            an address, client if it has none (see ``specs/capability.md``).
        announce_interval: seconds between re-announces of the capability card.
        card_ttl: seconds a capability card stays valid after each announce.
        gossip: run availability gossip (``specs/availability.md``).
        publish_interval: seconds between availability records of a serving peer when
            nothing changes (a change publishes at once; a peer that serves nothing is silent).
        routing_policy: how requests without a target pick a provider:
            ``"p2c"``, ``"least-loaded"``, ``"lowest-latency"`` or a function
            (see :mod:`modelnet_p2p.mesh.routing`).
        request_timeout: seconds a request may take when its caller gives no timeout.
        stall_timeout: seconds a provider may send nothing mid-stream (after its first
            chunk) before it counts as failed: the request fails over and it is banned.
        pin_peers, allow_peers, block_peers: peer ids routing prefers, is limited to (if
            any are given) and never chooses (see :mod:`modelnet_p2p.mesh.reputation`).
        reputation: keep the providers' scores in a file beside the key file.
        share_reputation: gossip those scores and weigh the others' by their sharer's score
            here (``specs/reputation.md``; needs ``gossip``).
        reachability: ``"auto"``, ``"public"`` or ``"private"``: whether others
            can dial this peer. A private peer runs the DHT as a client,
            reserves a circuit relay slot on its bootstrap peers and announces
            the relayed address (``specs/network.md``).
        relay_hop: relay circuits for private peers (bootstrap nodes do).
        connections_low, connections_high: once more than ``connections_high``
            connections are open, idle unprotected ones are closed until
            ``connections_low`` are left (``specs/network.md``, "Connection management").
        connection_grace: seconds a new connection is safe from that trimming.
        connection_check_interval: seconds between two checks of the connection count.
        resource_limits: connections, request slots and relay reservations per remote peer,
            per IP address and in total (``specs/network.md``, "Resource limits").
        psk: a private mesh's swarm key: a ``/key/swarm/psk/1.0.0/`` file (path), its
            contents, or the 32 raw bytes; only peers with the same key can connect
            (``specs/network.md``, "Private networks").
        trust: peer ids whose capability tokens this peer accepts (``specs/token.md``).
        require_token: serve every public capability as ``access="token"``.
        revocations: signed revocation list files, re-read when they change.
        sign_receipts: sign a receipt for every answer, asked for or not (``specs/inference.md``).
    """

    identity: str | os.PathLike[str] | Identity | None = None
    listen: Sequence[str] = DEFAULT_LISTEN
    bootstrap: Sequence[str] = ()
    passphrase: bytes | None = None
    network: str = "local"
    require_bootstrap: bool = False
    connect_timeout: float = DEFAULT_DIAL_TIMEOUT
    # The inference server's limits are the protocol's (``specs/inference.md``, "Limits").
    max_frame_size: int = Limits.max_frame_size
    max_concurrency: int = Limits.max_concurrency
    max_concurrency_per_peer: int = Limits.max_concurrency_per_peer
    max_request_time: float = Limits.max_request_time
    max_hops: int = Limits.max_hops
    window: int = DEFAULT_WINDOW
    dht_mode: DhtMode = "auto"
    #: Less than half the card TTL, so one failed announce does not let a live card expire.
    announce_interval: float = 120.0
    #: Models come and go in minutes, not days (IPFS: 48 h provider records).
    card_ttl: float = 300.0
    gossip: bool = True
    publish_interval: float = 30.0
    routing_policy: str | Callable[..., Any] = "p2c"
    request_timeout: float = 300.0
    stall_timeout: float = 30.0
    pin_peers: Sequence[str] = ()
    allow_peers: Sequence[str] = ()
    block_peers: Sequence[str] = ()
    reputation: bool = True
    share_reputation: bool = False
    reachability: Reachability = "auto"
    relay_hop: bool = False
    #: GossipSub's mesh (D_hi = 12) and the providers in use fit well under the low mark.
    connections_low: int = 16
    connections_high: int = 32
    connection_grace: float = 30.0
    connection_check_interval: float = 15.0
    resource_limits: ResourceLimits = field(default_factory=ResourceLimits)
    psk: bytes | str | os.PathLike[str] | None = None
    trust: Sequence[str] = ()
    require_token: bool = False
    revocations: Sequence[str] = ()
    sign_receipts: bool = False

    def with_overrides(self, **overrides: Any) -> PeerConfig:
        """A copy with some settings replaced (``TypeError`` for an unknown name, as for a call)."""
        unknown = sorted(set(overrides) - PEER_SETTINGS)
        if unknown:
            raise TypeError(f"unexpected peer setting(s): {', '.join(unknown)}")
        return replace(self, **overrides)

    def load_identity(self) -> Identity:
        """The identity to run with: as given, loaded from (or created at) its path, or ephemeral."""
        if self.identity is None:
            return Identity.generate(ephemeral=True)
        if isinstance(self.identity, Identity):
            return self.identity
        return Identity.load_or_create(Path(self.identity), self.passphrase)

    def load_psk(self) -> bytes | None:
        """The 32-byte swarm key, read from its file if ``psk`` is a path (``ConfigError`` if bad)."""
        if self.psk is None or (isinstance(self.psk, bytes) and len(self.psk) == 32):
            return self.psk
        if isinstance(self.psk, bytes):
            return parse_swarm_key(self.psk)
        try:
            return parse_swarm_key(Path(self.psk).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read swarm key file {self.psk}: {exc.strerror}") from None

    def needs_relay(self) -> bool:
        """Whether this peer must reserve relay slots on its bootstrap peers (others cannot dial it).

        A peer with no listen address is a pure client in ``"auto"``: it only calls
        out, so nobody needs to reach it and it reserves no slot.
        """
        listen = [parse_multiaddr(a) for a in self.listen]
        if self.reachability == "auto" and not listen:
            return False
        bootstrap = [parse_multiaddr(a) for a in self.bootstrap]
        return needs_relay(self.reachability, listen, bootstrap)

    def server_limits(self) -> dict[str, Any]:
        """The settings of the inference server's ``Limits``."""
        names = ("max_frame_size", "max_concurrency", "max_concurrency_per_peer", "max_request_time")
        return {name: getattr(self, name) for name in (*names, "max_hops")}

    def connmgr_settings(self) -> dict[str, Any]:
        """The settings of the connection manager (:class:`~modelnet_p2p.p2p.connmgr.ConnManager`)."""
        return {
            "low": self.connections_low,
            "high": self.connections_high,
            "grace_period": self.connection_grace,
            "check_interval": self.connection_check_interval,
            "limits": self.resource_limits,
        }

    def check(self) -> None:
        """Raise :class:`ConfigError` for a value no peer can run with."""
        if self.max_frame_size < 1024:
            raise ConfigError("max_frame_size must be at least 1024 bytes")
        if self.max_concurrency < 1 or self.max_concurrency_per_peer < 1:
            raise ConfigError("concurrency limits must be at least 1")
        for name in ("connect_timeout", "announce_interval", "card_ttl", "publish_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not 0 < self.stall_timeout <= self.request_timeout:
            raise ConfigError("stall_timeout must be positive and at most request_timeout")
        if not 0 <= self.connections_low <= self.connections_high or self.connections_high < 1:
            raise ConfigError("connection watermarks need 0 <= connections_low <= connections_high >= 1")
        if self.connection_grace < 0 or self.connection_check_interval <= 0:
            raise ConfigError("connection_grace must be >= 0 and connection_check_interval positive")


#: The names :class:`PeerConfig` (and so ``Peer``) accepts.
PEER_SETTINGS = frozenset(f.name for f in fields(PeerConfig))

#: Fields that hold lists; in the environment they are comma-separated.
_LIST_FIELDS = {"listen", "bootstrap", "pin_peers", "allow_peers", "block_peers"}
#: TOML tables whose keys are flattened into the config (``[limits] max_concurrency = 8``).
_TABLES = {"limits", "logging", "discovery", "availability", "routing"}


@dataclass
class Config:
    """Everything a peer needs to start. See ``modelnet config show``."""

    network: str = PeerConfig.network
    identity: str | None = None
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_LISTEN))
    bootstrap: list[str] = field(default_factory=list)
    #: A bootstrap list file (docs/testnet.md); used unless bootstrap is given another way.
    bootstrap_file: str | None = None
    max_concurrency: int = PeerConfig.max_concurrency
    max_concurrency_per_peer: int = PeerConfig.max_concurrency_per_peer
    max_frame_size: int = PeerConfig.max_frame_size
    max_request_time: float = PeerConfig.max_request_time
    connect_timeout: float = PeerConfig.connect_timeout
    announce_interval: float = PeerConfig.announce_interval
    card_ttl: float = PeerConfig.card_ttl
    publish_interval: float = PeerConfig.publish_interval
    dht_mode: str = PeerConfig.dht_mode
    reachability: str = PeerConfig.reachability
    routing_policy: str = str(PeerConfig.routing_policy)
    request_timeout: float = PeerConfig.request_timeout
    stall_timeout: float = PeerConfig.stall_timeout
    pin_peers: list[str] = field(default_factory=list)
    allow_peers: list[str] = field(default_factory=list)
    block_peers: list[str] = field(default_factory=list)
    psk_file: str | None = None
    log_level: str = "warning"

    def peer_kwargs(self) -> dict[str, Any]:
        """Arguments for :class:`~modelnet_p2p.Peer` built from this configuration."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in PEER_SETTINGS}
        out["listen"], out["bootstrap"] = list(self.listen), list(self.bootstrap)
        if self.psk_file:
            out["psk"] = self.psk_file
        return out

    def peer_config(self) -> PeerConfig:
        """This configuration as a :class:`PeerConfig`."""
        return PeerConfig(**self.peer_kwargs())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if name in _LIST_FIELDS:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise TypeError
        if kind == "int":
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind in ("str", "str | None"):
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} has an invalid value {value!r}") from None
    return value


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TABLES and isinstance(value, dict):
            for sub, subvalue in value.items():
                name = "log_level" if (key, sub) == ("logging", "level") else sub
                if name not in _FIELD_TYPES:
                    raise ConfigError(f"config file {p}: unknown key [{key}] {sub}")
                out[name] = subvalue
        elif key in _FIELD_TYPES:
            out[key] = value
        elif key == "serve":
            continue  # read by `modelnet serve`
        else:
            raise ConfigError(f"config file {p}: unknown key {key!r}")
    return out


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELD_TYPES:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
    return out


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Merge the sources; return the config and, per field, the source that set it."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != () and v != []}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    file_values = _read_file(config_file) if config_file else {}
    env_values = _read_env(env)

    network_name = (
        flags.get("network") or env_values.get("network") or file_values.get("network") or Config.network
    )
    net = get_network(str(network_name))

    cfg = Config()
    sources = {name: "default" for name in _FIELD_TYPES}
    net_defaults = net.defaults()
    listed = network_bootstrap_var(net.name)  # MODELNET_TESTNET_BOOTSTRAP: the network's list
    if env.get(listed):
        net_defaults["bootstrap"] = parse_bootstrap_list(env[listed], listed)
    layers: list[tuple[str, dict[str, Any]]] = [
        (f"network {net.name}", net_defaults),
        (f"file {config_file}", file_values),
        ("environment", env_values),
        ("flag", dict(flags)),
    ]
    for source, values in layers:
        for name, value in values.items():
            if name not in _FIELD_TYPES:
                raise ConfigError(f"{source}: unknown setting {name!r}")
            setattr(cfg, name, _coerce(name, value, source))
            sources[name] = source
    cfg.network = net.name
    if cfg.bootstrap_file and sources["bootstrap"] in ("default", f"network {net.name}"):
        cfg.bootstrap = read_bootstrap_file(cfg.bootstrap_file)
        sources["bootstrap"] = f"bootstrap list {cfg.bootstrap_file}"
    _validate(cfg)
    return cfg, sources


def network_bootstrap_var(network: str) -> str:
    """The environment variable holding ``network``'s bootstrap list: ``MODELNET_TESTNET_BOOTSTRAP``."""
    return f"{ENV_PREFIX}{network.upper().replace('-', '_')}_BOOTSTRAP"


def _validate(cfg: Config) -> None:
    if cfg.network not in NETWORKS:
        raise ConfigError(f"unknown network {cfg.network!r} (known: {', '.join(sorted(NETWORKS))})")
    for name in ("max_concurrency", "max_concurrency_per_peer"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if cfg.max_frame_size < 1024:
        raise ConfigError("max_frame_size must be at least 1024 bytes")
    timeouts = ("request_timeout", "stall_timeout")
    for name in ("connect_timeout", "announce_interval", "card_ttl", "publish_interval", *timeouts):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    for name, allowed in (
        ("dht_mode", ("auto", "server", "client")),
        ("reachability", ("auto", "public", "private")),
        ("routing_policy", ("p2c", "least-loaded", "lowest-latency")),
    ):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, not {cfg.log_level!r}")
