"""``modelnet serve`` and ``modelnet bootstrap``: run a peer until Ctrl-C, then drain."""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import trio

from ..config import Config
from ..errors import ConfigError
from ..peer import Peer
from ..proto.capability import Capability
from .bootstrap import bootstrap_overrides, start_bootstrap_services
from .common import emit, env_secret, gateway_extra_missing, make_peer, run_async, wait_for_stop
from .dashboard import metrics_option, start_metrics
from .options import PeerOptions, State, pass_state, peer_options
from .token import AccessFlags, access_options

__all__ = ["bootstrap_command", "resolve_serve_target", "serve_command", "serve_until_stopped"]

#: Seconds ``serve`` lets requests finish after Ctrl-C (a second Ctrl-C stops at once).
DRAIN_TIMEOUT = 30.0
#: A bootstrap node serves nothing, so it has nothing to drain.
BOOTSTRAP_DRAIN_TIMEOUT = 0.1


# -- serve targets -------------------------------------------------------------------


def _import_target(target: str) -> Any:
    """``module:attr`` or ``path/to/file.py:attr`` → the object."""
    if ":" not in target:
        raise ConfigError(f"target {target!r} must look like module:attr or file.py:attr")
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.exists():
                raise ConfigError(f"file {path} does not exist")
            spec = importlib.util.spec_from_file_location(f"_modelnet_target_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look modules up here
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


_CARD_FIELDS = {"name", "task", "version", "description", "tags", "idempotent", "max_concurrency"}
_CARD_FIELDS |= {"access", "allow"}  # who may call (services/access.py)


def _capability_from_mapping(data: dict[str, Any]) -> dict[str, Any]:
    unknown = set(data) - _CARD_FIELDS - {"handler"}
    out = {k: v for k, v in data.items() if k in _CARD_FIELDS}
    if "tags" in out:
        out["tags"] = tuple(out["tags"])
    for key in unknown:
        out.setdefault("extra", {})[key] = data[key]
    return out


def resolve_serve_target(
    target: str, flags: dict[str, Any], config_file: str | None
) -> list[tuple[Capability, Any]]:
    """Turn ``modelnet serve`` arguments into (capability, handler) pairs.

    Capability fields come, highest first, from flags, then the card file or the
    ``[serve]`` table of the config file, then a ``capability`` attribute on the handler.
    """
    file_fields: dict[str, Any] = {}
    if target.endswith(".toml"):
        try:
            card = tomllib.loads(Path(target).read_text())
        except FileNotFoundError:
            raise ConfigError(f"card file {target} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"card file {target} is not valid TOML: {exc}") from None
        section = card.get("capability", card)
        if "handler" not in section:
            raise ConfigError(f"card file {target} has no 'handler = \"module:attr\"'")
        file_fields = _capability_from_mapping(section)
        target = section["handler"]
    elif config_file:
        try:
            section = tomllib.loads(Path(config_file).read_text()).get("serve", {})
        except (OSError, tomllib.TOMLDecodeError):
            section = {}
        file_fields = _capability_from_mapping(section)

    obj = _import_target(target)
    handlers: list[tuple[Any, Any]]
    if isinstance(obj, dict):
        handlers = [(getattr(h, "capability", None) or Capability(name=str(k)), h) for k, h in obj.items()]
        if flags.get("name") and len(handlers) > 1:
            raise ConfigError("--capability names one capability; the target serves several")
    elif callable(obj):
        handlers = [(getattr(obj, "capability", None), obj)]
    else:
        raise ConfigError(f"target {target!r} is neither a handler nor a dict of handlers")

    out: list[tuple[Capability, Any]] = []
    for base, handler in handlers:
        fields_: dict[str, Any] = {}
        if isinstance(base, Capability):
            fields_.update(
                name=base.name,
                task=base.task,
                version=base.version,
                description=base.description,
                tags=base.tags,
                idempotent=base.idempotent,
                max_concurrency=base.max_concurrency,
                access=base.access,
                allow=base.allow,
            )
        fields_.update(file_fields)
        fields_.update({k: v for k, v in flags.items() if v not in (None, ())})
        if "name" not in fields_:
            fields_["name"] = getattr(handler, "__name__", "model")
        if "tags" in fields_:
            fields_["tags"] = tuple(fields_["tags"])
        out.append((Capability(**fields_), handler))
    return out


# -- serving -------------------------------------------------------------------------


async def serve_until_stopped(
    cfg: Config,
    served: list[tuple[Capability, Any]],
    drain_timeout: float,
    as_json: bool,
    watch_stdin: bool = False,
    overrides: dict[str, Any] | None = None,
    setup: Callable[[Peer], Awaitable[list[Capability]]] | None = None,
    metrics_listen: str | None = None,
) -> None:
    """Serve ``served`` until a signal (or stdin EOF), then drain; print ready/draining/stopped."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with make_peer(cfg, **(overrides or {})) as peer:
            await start_metrics(peer, metrics_listen, as_json)
            for cap, handler in served:
                peer.serve(cap, handler)
            names = [c.name for c, _ in served]
            if setup is not None:  # e.g. an OpenAI-compatible upstream, served once it answers
                names += [c.name for c in await setup(peer)]
            emit(
                as_json,
                "ready",
                f"serving {', '.join(names) or 'nothing'} as {peer.peer_id}\n"
                + "\n".join(f"  {a}" for a in peer.addrs),
                peer_id=peer.peer_id,
                addrs=peer.addrs,
                capabilities=names,
            )
            await wait_for_stop(signals, watch_stdin)
            emit(as_json, "draining", f"draining ({peer.inference.in_flight} requests in flight)")
            with trio.move_on_after(drain_timeout) as drain_scope:
                async with trio.open_nursery() as nursery:

                    async def second_signal() -> None:
                        async for _ in signals:  # a second Ctrl-C stops at once
                            drain_scope.cancel()

                    nursery.start_soon(second_signal)
                    await peer.drain(timeout=None)  # refuse new requests, announce "draining"
                    nursery.cancel_scope.cancel()
            emit(as_json, "stopped", "stopped")


def _serve_upstream(
    cfg: Config,
    target: str,
    models: tuple[str, ...],
    api_key_env: str | None,
    tags: tuple[str, ...],
    drain_timeout: float,
    as_json: bool,
    watch_stdin: bool,
    metrics_listen: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    try:
        from ..openai.upstream import parse_upstream_target, serve_upstream
    except ImportError as exc:
        raise gateway_extra_missing("openai+ targets need", exc) from None

    base_url = parse_upstream_target(target)
    api_key = env_secret(api_key_env, "--api-key-env")

    async def setup(peer: Peer) -> list[Capability]:
        upstream = await serve_upstream(peer, base_url, models=models, api_key=api_key, tags=tags)
        return list(upstream.capabilities)

    run_async(
        serve_until_stopped, cfg, [], drain_timeout, as_json, watch_stdin, overrides, setup, metrics_listen
    )


@click.command("serve")
@click.argument("target")
@click.option("--capability", "-c", "cap_name", help="Capability name (default: from the handler).")
@click.option("--task", help="Task, e.g. text-generation, chat, embedding, classification.")
@click.option("--version", "cap_version", help="Model or handler version.")
@click.option("--description", help="One or two sentences for humans.")
@click.option("--tag", "tags", multiple=True, help="Discovery tag (repeatable).")
@click.option("--only", "only", multiple=True, help="With a dict of handlers: serve only these names.")
@click.option(
    "--drain-timeout",
    default=DRAIN_TIMEOUT,
    show_default=True,
    help="Seconds to let requests finish on Ctrl-C.",
)
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option("--exit-on-stdin-eof", "watch_stdin", is_flag=True, hidden=True)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="With openai+http(s)://: serve only this upstream model, NAME or NAME=TASK (repeatable).",
)
@click.option(
    "--api-key-env", help="With openai+http(s)://: environment variable holding the upstream's API key."
)
@click.option(
    "--sign-receipts",
    is_flag=True,
    help="Sign a receipt for every answer, asked for or not (specs/inference.md, Signed receipts).",
)
@access_options
@metrics_option
@peer_options()
@pass_state
def serve_command(
    state: State,
    target: str,
    cap_name: str | None,
    task: str | None,
    cap_version: str | None,
    description: str | None,
    tags: tuple[str, ...],
    only: tuple[str, ...],
    drain_timeout: float,
    as_json: bool,
    watch_stdin: bool,
    models: tuple[str, ...],
    api_key_env: str | None,
    sign_receipts: bool,
    metrics_listen: str | None,
    peer: PeerOptions,
    access: AccessFlags,
) -> None:
    """Serve a model on the mesh until Ctrl-C, then drain gracefully.

    TARGET is module:attr or file.py:attr (a handler, or a dict of handlers), or a
    card file (TOML with capability fields and handler = "module:attr"), or an
    OpenAI-compatible server, openai+http://127.0.0.1:11434/v1 (one capability per
    model it lists; --model chooses).
    """
    cfg, _ = state.config(peer)
    overrides = {**access.peer_overrides(), **({"sign_receipts": True} if sign_receipts else {})}
    if target.startswith("openai+"):
        if cap_name or task or cap_version or description or only:
            raise click.UsageError("with openai+http(s):// the models come from the server; use --model")
        try:
            _serve_upstream(
                cfg, target, models, api_key_env, tags, drain_timeout, as_json, watch_stdin, metrics_listen,
                overrides,
            )  # fmt: skip
        except KeyboardInterrupt:
            pass
        return
    if models or api_key_env:
        raise click.UsageError("--model and --api-key-env go with an openai+http(s):// target")
    flags = {"name": cap_name, "task": task, "version": cap_version, "description": description, "tags": tags}
    flags.update(access.capability_flags())
    served = resolve_serve_target(target, flags, state.config_file)
    if only:
        unknown = set(only) - {c.name for c, _ in served}
        if unknown:
            raise click.BadParameter(f"not in the target: {', '.join(sorted(unknown))}", param_hint="--only")
        served = [(c, h) for c, h in served if c.name in only]
    try:
        run_async(
            serve_until_stopped,
            cfg,
            served,
            drain_timeout,
            as_json,
            watch_stdin,
            overrides,
            None,
            metrics_listen,
        )
    except KeyboardInterrupt:
        pass  # a signal that arrived while stopping: the peer has already stopped cleanly


@click.command("bootstrap")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option("--exit-on-stdin-eof", "watch_stdin", is_flag=True, hidden=True)
@metrics_option
@peer_options()
@pass_state
def bootstrap_command(
    state: State, as_json: bool, watch_stdin: bool, metrics_listen: str | None, peer: PeerOptions
) -> None:
    """Run a bootstrap node: a DHT server and relay that serves no model. Quiet until stopped.

    Off the local network it is hardened for the public internet: a fixed identity and port,
    no announces, relay and connection limits per peer and per IP (docs/testnet.md).
    """
    cfg, _ = state.config(peer)
    overrides = bootstrap_overrides(cfg)
    try:
        run_async(
            serve_until_stopped, cfg, [], BOOTSTRAP_DRAIN_TIMEOUT, as_json, watch_stdin, overrides,
            start_bootstrap_services, metrics_listen,
        )  # fmt: skip
    except KeyboardInterrupt:
        pass
