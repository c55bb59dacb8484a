"""Configuration: one TOML file, ``MODELNET_*`` environment variables and command-line flags.

Precedence, highest first:

1. command-line flags;
2. environment variables (``MODELNET_LISTEN``, ``MODELNET_BOOTSTRAP``, ...);
3. the TOML file given with ``--config`` (or ``MODELNET_CONFIG``);
4. the defaults of the selected network (``--network``);
5. built-in defaults.

:func:`load_config` returns the merged :class:`Config` and, for each field,
which of these sources set it, so ``modelnet config show`` can say so.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .p2p.network import NETWORKS, get_network

__all__ = ["ENV_PREFIX", "VERSION", "Config", "load_config"]

try:
    #: This package's version.
    VERSION: str = version("modelnet_p2p")
except PackageNotFoundError:  # running from a source tree without install
    VERSION = "0.0.0"

ENV_PREFIX = "MODELNET_"

#: Fields that hold lists; in the environment they are comma-separated.
_LIST_FIELDS = {"listen", "bootstrap"}
#: TOML tables whose keys are flattened into the config (``[limits] max_concurrency = 8``).
_TABLES = {"limits", "logging", "discovery", "availability", "routing"}


@dataclass
class Config:
    """Everything a peer needs to start. See ``modelnet config show``."""

    network: str = "local"
    identity: str | None = None
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    max_concurrency: int = 128
    max_concurrency_per_peer: int = 64
    max_frame_size: int = 1 << 20
    max_request_time: float = 600.0
    connect_timeout: float = 10.0
    announce_interval: float = 120.0
    card_ttl: float = 300.0
    publish_interval: float = 2.0
    dht_mode: str = "auto"
    reachability: str = "auto"
    routing_policy: str = "p2c"
    log_level: str = "warning"

    def peer_kwargs(self) -> dict[str, Any]:
        """Arguments for :class:`~modelnet_p2p.Peer` built from this configuration."""
        return {
            "identity": self.identity,
            "listen": list(self.listen),
            "bootstrap": list(self.bootstrap),
            "max_concurrency": self.max_concurrency,
            "max_concurrency_per_peer": self.max_concurrency_per_peer,
            "max_frame_size": self.max_frame_size,
            "max_request_time": self.max_request_time,
            "connect_timeout": self.connect_timeout,
            "network": self.network,
            "announce_interval": self.announce_interval,
            "card_ttl": self.card_ttl,
            "dht_mode": self.dht_mode,
            "reachability": self.reachability,
            "routing_policy": self.routing_policy,
        }

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

    network_name = flags.get("network") or env_values.get("network") or file_values.get(
        "network"
    ) or Config.network
    net = get_network(str(network_name))

    cfg = Config()
    sources = {name: "default" for name in _FIELD_TYPES}
    layers: list[tuple[str, dict[str, Any]]] = [
        (f"network {net.name}", net.defaults()),
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
    _validate(cfg)
    return cfg, sources


def _validate(cfg: Config) -> None:
    if cfg.network not in NETWORKS:
        raise ConfigError(f"unknown network {cfg.network!r} (known: {', '.join(sorted(NETWORKS))})")
    for name in ("max_concurrency", "max_concurrency_per_peer"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if cfg.max_frame_size < 1024:
        raise ConfigError("max_frame_size must be at least 1024 bytes")
    for name in ("connect_timeout", "announce_interval", "card_ttl", "publish_interval"):
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
