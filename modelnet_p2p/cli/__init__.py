"""The ``modelnet`` command line.

Every command is a thin face over the library: it builds a :class:`Peer` from
the merged configuration (flags > ``MODELNET_*`` > ``--config`` file > network
defaults > built-in defaults) and calls the same API a program would.

Errors are one line on stderr and a non-zero exit; ``-v`` shows details.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import click
import trio

from ..config import VERSION, Config, load_config
from ..errors import ConfigError, ModelNetError, exception_leaves
from ..proto.capability import Capability

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("modelnet_p2p.cli")


class State:
    """Options shared by every command."""

    def __init__(self, verbose: bool, config_file: str | None, network: str | None) -> None:
        self.verbose = verbose
        self.config_file = config_file
        self.network = network

    def config(self, **flags: Any) -> tuple[Config, dict[str, str]]:
        return load_config(self.config_file, flags={"network": self.network, **flags})


def _echo_err(message: str) -> None:
    click.echo(click.style("error: ", fg="red", bold=True) + message, err=True)


def run_async(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """Run a coroutine function under trio; Ctrl-C inside is handled by the commands."""
    return trio.run(fn, *args)


# -- the group -------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(VERSION, prog_name="modelnet")
@click.option("-v", "--verbose", is_flag=True, help="Show details and the networking stack's logs.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="MODELNET_CONFIG",
    help="TOML configuration file.",
)
@click.option("--network", default=None, help="Mesh to join: local (default), testnet, or a private name.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, config_file: str | None, network: str | None) -> None:
    """modelnet: connect AI models peer to peer.

    \b
    Configuration precedence: flags > MODELNET_* environment > --config file
    > network defaults > built-in defaults. See `modelnet config show`.

    \b
    Exit codes:
      0    success
      1    the operation failed (unreachable peer, remote error, bad key or config file)
      2    bad usage (unknown command or flag, malformed argument)
      130  interrupted (Ctrl-C)
    """
    ctx.obj = State(verbose, config_file, network)
    if verbose:
        from ..log import set_verbose

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        set_verbose(True)
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")


pass_state = click.pass_obj


def _peer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--reachability",
        type=click.Choice(["auto", "public", "private"]),
        help="Can others dial this peer? private: reserve a relay slot on the bootstrap peers.",
    )(fn)
    fn = click.option("--bootstrap", "-b", multiple=True, help="Bootstrap multiaddr (repeatable).")(fn)
    fn = click.option("--listen", "-l", multiple=True, help="Listen multiaddr (repeatable).")(fn)
    fn = click.option(
        "--identity", "-i", type=click.Path(dir_okay=False), help="Key file (created if missing)."
    )(fn)
    return fn


def _peer_flags(
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None = None,
) -> dict[str, Any]:
    return {
        "identity": identity,
        "listen": list(listen),
        "bootstrap": list(bootstrap),
        "reachability": reachability,
    }


def _make_peer(cfg: Config, **overrides: Any) -> Any:
    from ..peer import Peer

    kwargs = cfg.peer_kwargs()
    kwargs.update(overrides)
    return Peer(**kwargs)


def _env_secret(var: str | None, flag: str) -> str | None:
    """The value of the environment variable named by ``flag`` (secrets never go on the command line)."""
    if not var:
        return None
    import os

    value = os.environ.get(var, "")
    if not value:
        raise click.UsageError(f"{flag} {var}: that environment variable is not set or is empty")
    return value


# -- id / config -------------------------------------------------------------------


@cli.command("id")
@click.option(
    "--identity",
    "identity_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Key file; created (mode 0600) if missing. Default: the configured identity or modelnet.key.",
)
@pass_state
def id_command(state: State, identity_path: str | None) -> None:
    """Print this node's peer id, creating the identity file if needed."""
    from ..p2p.identity import Identity

    cfg, _ = state.config(identity=identity_path)
    ident = Identity.load_or_create(cfg.identity or "modelnet.key")
    click.echo(str(ident.peer_id))


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_peer_options
@pass_state
def config_show(
    state: State,
    as_json: bool,
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """Print the configuration after merging file, environment and flags, with each value's source."""
    cfg, sources = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    values = cfg.as_dict()
    if as_json:
        click.echo(json.dumps({"config": values, "sources": sources}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="modelnet configuration", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("source", style="dim")
    for key, value in values.items():
        shown = ", ".join(value) if isinstance(value, list) else ("" if value is None else str(value))
        table.add_row(key, shown or "-", sources[key])
    Console().print(table)


# -- serve -------------------------------------------------------------------------


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


def _capability_from_mapping(data: dict[str, Any], source: str) -> dict[str, Any]:
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
    import tomllib

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
        file_fields = _capability_from_mapping(section, target)
        target = section["handler"]
    elif config_file:
        try:
            section = tomllib.loads(Path(config_file).read_text()).get("serve", {})
        except (OSError, tomllib.TOMLDecodeError):
            section = {}
        file_fields = _capability_from_mapping(section, config_file)

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
            )
        fields_.update(file_fields)
        fields_.update({k: v for k, v in flags.items() if v not in (None, ())})
        if "name" not in fields_:
            fields_["name"] = getattr(handler, "__name__", "model")
        if "tags" in fields_:
            fields_["tags"] = tuple(fields_["tags"])
        out.append((Capability(**fields_), handler))
    return out


@cli.command("serve")
@click.argument("target")
@click.option("--capability", "-c", "cap_name", help="Capability name (default: from the handler).")
@click.option("--task", help="Task, e.g. text-generation, chat, embedding, classification.")
@click.option("--version", "cap_version", help="Model or handler version.")
@click.option("--description", help="One or two sentences for humans.")
@click.option("--tag", "tags", multiple=True, help="Discovery tag (repeatable).")
@click.option("--only", "only", multiple=True, help="With a dict of handlers: serve only these names.")
@click.option(
    "--drain-timeout", default=30.0, show_default=True, help="Seconds to let requests finish on Ctrl-C."
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
@_peer_options
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
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """Serve a model on the mesh until Ctrl-C, then drain gracefully.

    TARGET is module:attr or file.py:attr (a handler, or a dict of handlers), or a
    card file (TOML with capability fields and handler = "module:attr"), or an
    OpenAI-compatible server, openai+http://127.0.0.1:11434/v1 (one capability per
    model it lists; --model chooses).
    """
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    if target.startswith("openai+"):
        try:
            from ..openai.upstream import parse_upstream_target, serve_upstream
        except ImportError as exc:
            raise ConfigError(
                f"openai+ targets need: pip install 'modelnet_p2p[gateway]' ({exc.name} is missing)"
            ) from None

        if cap_name or task or cap_version or description or only:
            raise click.UsageError("with openai+http(s):// the models come from the server; use --model")
        base_url = parse_upstream_target(target)
        api_key = _env_secret(api_key_env, "--api-key-env")

        async def setup(peer: Any) -> list[Capability]:
            upstream = await serve_upstream(peer, base_url, models=models, api_key=api_key, tags=tags)
            return upstream.capabilities

        try:
            run_async(_serve, cfg, [], drain_timeout, as_json, watch_stdin, None, setup)
        except KeyboardInterrupt:
            pass
        return
    if models or api_key_env:
        raise click.UsageError("--model and --api-key-env go with an openai+http(s):// target")
    flags = {"name": cap_name, "task": task, "version": cap_version, "description": description, "tags": tags}
    served = resolve_serve_target(target, flags, state.config_file)
    if only:
        unknown = set(only) - {c.name for c, _ in served}
        if unknown:
            raise click.BadParameter(f"not in the target: {', '.join(sorted(unknown))}", param_hint="--only")
        served = [(c, h) for c, h in served if c.name in only]
    try:
        run_async(_serve, cfg, served, drain_timeout, as_json, watch_stdin)
    except KeyboardInterrupt:
        pass  # a signal that arrived while stopping: the peer has already stopped cleanly


def _emit(as_json: bool, event: str, text: str, **data: Any) -> None:
    if as_json:
        click.echo(json.dumps({"event": event, **data}), nl=True)
        sys.stdout.flush()
    else:
        click.echo(text)


async def _wait_for_stop(signals: Any, watch_stdin: bool) -> None:
    """Return on the first SIGINT/SIGTERM, or when stdin closes if ``watch_stdin``.

    ``modelnet mesh up`` starts its peers with a pipe on stdin, so they stop
    even if the parent is killed without a chance to signal them.
    """
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()

        async def on_stdin_eof() -> None:
            import os

            # Read fd 0 in trio itself: a worker thread blocked in sys.stdin would
            # abort the interpreter at exit.
            async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
                while await stdin.receive_some(4096):
                    pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        if watch_stdin:
            nursery.start_soon(on_stdin_eof)


async def _serve(
    cfg: Config,
    served: list[tuple[Capability, Any]],
    drain_timeout: float,
    as_json: bool,
    watch_stdin: bool = False,
    overrides: dict[str, Any] | None = None,
    setup: Callable[[Any], Awaitable[list[Capability]]] | None = None,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _make_peer(cfg, **(overrides or {})) as peer:
            for cap, handler in served:
                peer.serve(cap, handler)
            names = [c.name for c, _ in served]
            if setup is not None:  # e.g. an OpenAI-compatible upstream, served once it answers
                names += [c.name for c in await setup(peer)]
            _emit(
                as_json,
                "ready",
                f"serving {', '.join(names) or 'nothing'} as {peer.peer_id}\n"
                + "\n".join(f"  {a}" for a in peer.addrs),
                peer_id=peer.peer_id,
                addrs=peer.addrs,
                capabilities=names,
            )
            await _wait_for_stop(signals, watch_stdin)
            _emit(as_json, "draining", f"draining ({peer.inference.in_flight} requests in flight)")
            with trio.move_on_after(drain_timeout) as drain_scope:
                async with trio.open_nursery() as nursery:

                    async def second_signal() -> None:
                        async for _ in signals:  # a second Ctrl-C stops at once
                            drain_scope.cancel()

                    nursery.start_soon(second_signal)
                    await peer.drain(timeout=None)  # refuse new requests, announce "draining"
                    nursery.cancel_scope.cancel()
            _emit(as_json, "stopped", "stopped")


# -- bootstrap and local meshes -----------------------------------------------------


@cli.command("bootstrap")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option("--exit-on-stdin-eof", "watch_stdin", is_flag=True, hidden=True)
@_peer_options
@pass_state
def bootstrap_command(
    state: State,
    as_json: bool,
    watch_stdin: bool,
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """Run a bootstrap node: a DHT server and relay that serves no model. Quiet until stopped."""
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    try:
        run_async(_serve, cfg, [], 0.1, as_json, watch_stdin, {"relay_hop": True, "dht_mode": "server"})
    except KeyboardInterrupt:
        pass


#: Which example models each peer of `modelnet mesh up` serves: every peer serves
#: "echo" (so requests can be routed and fail over), plus one of the others in turn.
def mesh_assignment(n: int) -> list[list[str]]:
    from ..demo.models import ALL

    others = [name for name in ALL if name != "echo"]
    return [["echo", others[i % len(others)]] for i in range(n)]


class _Child:
    def __init__(self, proc: trio.Process, role: str) -> None:
        self.proc = proc
        self.role = role
        self.buffer = b""
        self.ready: dict[str, Any] = {}

    async def read_event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            data = await self.proc.stdout.receive_some(4096)
            if not data:
                raise ConfigError(f"{self.role} exited before it was ready (code {self.proc.poll()})")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]


async def _spawn(args: list[str], role: str, env_verbose: bool) -> _Child:
    import subprocess

    cmd = [sys.executable, "-m", "modelnet_p2p.cli", *(["-v"] if env_verbose else []), *args]
    proc = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, start_new_session=True
    )
    child = _Child(proc, role)
    with trio.fail_after(60):
        event = await child.read_event()
    if event.get("event") != "ready":
        raise ConfigError(f"{role} did not start: {event}")
    child.ready = event
    return child


async def _stop_children(children: list[_Child]) -> None:
    with trio.CancelScope(shield=True):
        for child in children:
            if child.proc.returncode is None:
                child.proc.send_signal(signal.SIGINT)
        with trio.move_on_after(15):
            for child in children:
                await child.proc.wait()
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()
            if child.proc.stdin is not None:
                await child.proc.stdin.aclose()
            if child.proc.stdout is not None:
                await child.proc.stdout.aclose()


@cli.group("mesh")
def mesh_group() -> None:
    """Run a local mesh of peers, each in its own process."""


@mesh_group.command("up")
@click.option("-n", "count", default=4, show_default=True, type=click.IntRange(1, 64), help="Model peers.")
@click.option("--json", "as_json", is_flag=True, help="Print the mesh as one JSON object.")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="Bootstrap node's TCP port (0: any).")
@pass_state
def mesh_up(state: State, count: int, as_json: bool, port: int) -> None:
    """Start a bootstrap node and N peers serving the example models, until Ctrl-C.

    Prints the bootstrap address to give other peers (--bootstrap). Ctrl-C stops
    every process; nothing is left running.
    """
    try:
        run_async(_mesh_up, state, count, as_json, port)
    except KeyboardInterrupt:
        pass


async def _mesh_up(state: State, count: int, as_json: bool, port: int) -> None:
    children: list[_Child] = []
    net = ["--network", state.network] if state.network else []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            boot = await _spawn(
                [
                    *net,
                    "bootstrap",
                    "--json",
                    "--exit-on-stdin-eof",
                    "--listen",
                    f"/ip4/127.0.0.1/tcp/{port}",
                ],
                "bootstrap node",
                state.verbose,
            )
            children.append(boot)
            boot_addr = boot.ready["addrs"][0]
            if not as_json:
                click.echo(f"bootstrap node  {boot_addr}")
            async with trio.open_nursery() as nursery:

                async def start_peer(i: int, models: list[str]) -> None:
                    target = "modelnet_p2p.demo_models:ALL"
                    child = await _spawn(
                        [
                            *net,
                            "serve",
                            target,
                            "--json",
                            "--exit-on-stdin-eof",
                            "--bootstrap",
                            boot_addr,
                            *[x for m in models for x in ("--only", m)],
                        ],
                        f"peer {i}",
                        state.verbose,
                    )
                    children.append(child)

                for i, models in enumerate(mesh_assignment(count)):
                    nursery.start_soon(start_peer, i, models)
            peers = [c.ready for c in children[1:]]
            if as_json:
                click.echo(json.dumps({"bootstrap": boot_addr, "peers": peers}))
            else:
                for p in peers:
                    click.echo(f"peer {p['peer_id'][-8:]}  serves {', '.join(p['capabilities'])}")
                click.echo(f"\n{count} peers up. Join with:  --bootstrap {boot_addr}\nCtrl-C stops the mesh.")
            sys.stdout.flush()
            async for _ in signals:
                break
        finally:
            if not as_json and children:
                click.echo("stopping the mesh...", err=True)
            await _stop_children(children)


# -- gateway -------------------------------------------------------------------------


@cli.command("gateway")
@click.option(
    "--listen",
    "http_listen",
    default="127.0.0.1:8080",
    show_default=True,
    help="HOST:PORT of the OpenAI-compatible HTTP API.",
)
@click.option(
    "--api-key-env",
    help="Environment variable holding the bearer token clients must send (required off loopback).",
)
@click.option("--no-auth", is_flag=True, help="Allow a non-loopback --listen without a bearer token.")
@click.option(
    "--timeout", "request_timeout", default=600.0, show_default=True, help="Seconds one request may take."
)
@click.option(
    "--routing",
    type=click.Choice(["mesh", "local"]),
    default="mesh",
    show_default=True,
    help="Who picks providers: the peer's routing, or the gateway's over discovered providers.",
)
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option("--exit-on-stdin-eof", "watch_stdin", is_flag=True, hidden=True)
@click.option("--p2p-listen", "listen", multiple=True, help="The peer's listen multiaddr (repeatable).")
@click.option("--bootstrap", "-b", multiple=True, help="Bootstrap multiaddr (repeatable).")
@click.option("--identity", "-i", type=click.Path(dir_okay=False), help="Key file (created if missing).")
@pass_state
def gateway_command(
    state: State,
    http_listen: str,
    api_key_env: str | None,
    no_auth: bool,
    request_timeout: float,
    routing: str,
    as_json: bool,
    watch_stdin: bool,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    identity: str | None,
) -> None:
    """Serve the OpenAI API (models, chat, completions, embeddings) backed by the mesh, until Ctrl-C.

    \b
    Also: GET /.well-known/agent-card.json, /healthz, /metrics (Prometheus).
    """
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap))
    if not cfg.bootstrap:
        raise click.UsageError("give --bootstrap ADDR (or MODELNET_BOOTSTRAP) so the gateway can find models")
    api_key = _env_secret(api_key_env, "--api-key-env")
    try:
        run_async(
            _gateway, cfg, http_listen, api_key, no_auth, request_timeout, routing, as_json, watch_stdin
        )
    except KeyboardInterrupt:
        pass


async def _gateway(
    cfg: Config,
    http_listen: str,
    api_key: str | None,
    no_auth: bool,
    request_timeout: float,
    routing: str,
    as_json: bool,
    watch_stdin: bool,
) -> None:
    from functools import partial

    try:
        from ..openai.app import serve_gateway
    except ImportError as exc:
        raise ConfigError(
            f"the gateway needs: pip install 'modelnet_p2p[gateway]' ({exc.name} is missing)"
        ) from None

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _make_peer(cfg, require_bootstrap=True) as peer:
            binds = await peer.nursery.start(
                partial(
                    serve_gateway,
                    peer,
                    http_listen,
                    api_key,
                    allow_no_auth=no_auth,
                    request_timeout=request_timeout,
                    routing=routing,
                )
            )
            url = binds[0] if binds else f"http://{http_listen}"
            _emit(
                as_json,
                "ready",
                f"OpenAI-compatible gateway on {url}/v1 (peer {peer.peer_id})",
                url=url,
                peer_id=peer.peer_id,
                addrs=peer.addrs,
            )
            await _wait_for_stop(signals, watch_stdin)
            _emit(as_json, "stopped", "stopped")


# -- ask ---------------------------------------------------------------------------


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs; values are JSON if they parse as JSON, else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@cli.command("ask")
@click.argument("capability")
@click.argument("prompt")
@click.option("--param", "-p", "params", multiple=True, help="Request parameter key=value (repeatable).")
@click.option(
    "--peer", "target", help="Ask this provider (multiaddr with /p2p/); default: let the mesh choose."
)
@click.option(
    "--timeout", default=60.0, show_default=True, help="Deadline for the whole request, in seconds."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming."
)
@_peer_options
@pass_state
def ask_command(
    state: State,
    capability: str,
    prompt: str,
    params: tuple[str, ...],
    target: str | None,
    timeout: float,
    as_json: bool,
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """Ask CAPABILITY about PROMPT; stream the answer as it arrives."""
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    if not target and not cfg.bootstrap:
        raise click.UsageError("give --peer ADDR, or --bootstrap ADDR to let the mesh choose")
    run_async(_ask, cfg, capability, prompt, parse_params(params), target, timeout, as_json)


async def _ask(
    cfg: Config,
    capability: str,
    prompt: str,
    params: dict[str, Any],
    target: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("joining the mesh..."):  # shown only on a terminal
        peer = await _make_peer(cfg, require_bootstrap=bool(cfg.bootstrap)).__aenter__()
    try:
        await _ask_with(peer, capability, prompt, params, target, timeout, as_json)
    finally:
        await peer.__aexit__(None, None, None)


async def _ask_with(
    peer: Any,
    capability: str,
    prompt: str,
    params: dict[str, Any],
    target: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    started = time.monotonic()
    chunks: list[Any] = []
    stream = peer.infer(target, capability, prompt, timeout=timeout, **params)
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
            if not as_json:
                click.echo(
                    chunk if isinstance(chunk, str) else json.dumps(chunk), nl=not isinstance(chunk, str)
                )
    elapsed = time.monotonic() - started
    info = stream.info
    if as_json:
        text = "".join(c for c in chunks if isinstance(c, str))
        click.echo(
            json.dumps(
                {
                    "capability": capability,
                    "peer": info.peer,
                    "chunks": chunks,
                    "text": text,
                    "finish_reason": info.finish_reason,
                    "usage": info.usage,
                    "latency_s": round(elapsed, 4),
                    "trace": {"attempts": info.attempts},
                }
            )
        )
    else:
        if chunks and isinstance(chunks[-1], str):
            click.echo()
        if len(info.attempts) > 1:
            for attempt in info.attempts:
                line = f"  tried …{attempt['peer'][-8:]}: {attempt['status']}"
                if attempt.get("error"):
                    line += f" ({attempt['error']})"
                click.echo(click.style(line, dim=True), err=True)
        tokens = info.usage.get("tokens", len(chunks))
        click.echo(
            click.style(
                f"— answered by {info.peer} in {elapsed * 1000:.0f} ms, {tokens} tokens, "
                f"finish: {info.finish_reason}",
                dim=True,
            ),
            err=True,
        )


# -- discover and status -----------------------------------------------------------


def _card_rows(
    cards: list[Any], availability: dict[str, Any], query: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    rows = []
    for card in sorted(cards, key=lambda c: c.peer_id):
        entry = availability.get(card.peer_id)
        for cap in card.matching(**query) if query else card.capabilities:
            rows.append(
                {
                    "peer_id": card.peer_id,
                    "capability": cap.name,
                    "version": cap.version,
                    "tasks": list(cap.tasks) if getattr(cap, "tasks", None) else [cap.task],
                    "tags": list(cap.tags),
                    "description": cap.description,
                    "addrs": card.dial_addrs,
                    "expires_at_ms": card.expires_at,
                    "state": entry.to_dict()["state"] if entry is not None else None,
                    "in_flight": entry.to_dict().get("in_flight") if entry is not None else None,
                }
            )
    return rows


@cli.command("discover")
@click.option("--task", help="Only capabilities with this task.")
@click.option("--model", help="Only capabilities with this name.")
@click.option("--version", "model_version", help="With --model: only this version.")
@click.option(
    "--tag", "tags", multiple=True, help="Only capabilities with this tag (repeatable: all must match)."
)
@click.option("--limit", type=click.IntRange(1), help="Stop after this many peers.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to search.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_peer_options
@pass_state
def discover_command(
    state: State,
    task: str | None,
    model: str | None,
    model_version: str | None,
    tags: tuple[str, ...],
    limit: int | None,
    timeout: float,
    as_json: bool,
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """Find models in the mesh: a table of verified capability cards, with their availability."""
    if not (task or model or tags):
        raise click.UsageError("give at least one of --task, --model or --tag")
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    if not cfg.bootstrap:
        raise click.UsageError("give --bootstrap ADDR (or MODELNET_BOOTSTRAP) to reach the mesh")
    run_async(_discover, cfg, task, model, model_version, tags, limit, timeout, as_json)


async def _discover(
    cfg: Config,
    task: str | None,
    model: str | None,
    version: str | None,
    tags: tuple[str, ...],
    limit: int | None,
    timeout: float,
    as_json: bool,
) -> None:
    async with _make_peer(cfg, require_bootstrap=True) as peer:
        if as_json:
            cards = await peer.discover(
                task, model=model, version=version, tags=tags, limit=limit, timeout=timeout
            )
        else:
            from rich.console import Console

            console = Console(stderr=True)
            with console.status("looking up the DHT..."):
                cards = await peer.discover(
                    task, model=model, version=version, tags=tags, limit=limit, timeout=timeout
                )
        availability = peer.availability_table() if hasattr(peer, "availability_table") else {}
    rows = _card_rows(cards, availability, {"task": task, "model": model, "version": version, "tags": tags})
    if as_json:
        click.echo(json.dumps({"peers": len(cards), "capabilities": rows}, indent=2))
        return
    if not rows:
        click.echo("no matching capability found")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(cards)} peers, {len(rows)} capabilities")
    for col in ("peer", "capability", "version", "tasks", "tags", "state"):
        table.add_column(col, no_wrap=col in ("peer", "capability"))
    table.add_column("description", max_width=40, overflow="ellipsis", no_wrap=True)
    for r in rows:
        table.add_row(
            "…" + r["peer_id"][-8:],
            r["capability"],
            r["version"],
            ", ".join(r["tasks"]),
            ", ".join(r["tags"]),
            r["state"] or "-",
            r["description"],
        )
    Console().print(table)


async def _status_rows(peer: Any, ping: bool) -> list[dict[str, Any]]:
    rows = []
    for row in await peer.mesh_view(timeout=5.0):
        if row.peer_id == peer.peer_id:
            continue
        d = row.to_dict()
        a = d.get("availability") or {}
        d.update(
            {
                "in_flight": a.get("in_flight"),
                "max_concurrency": a.get("max_concurrency"),
                "latency_ms": a.get("latency_ms"),
                "tokens_per_s": a.get("tokens_per_s"),
                "age_s": a.get("age_s"),
                "rtt_ms": (await peer.ping(row.peer_id, timeout=2.0)) if ping else None,
            }
        )
        rows.append(d)
    return rows


def _status_table(rows: list[dict[str, Any]], me: str) -> Any:
    from rich.table import Table

    table = Table(title=f"mesh seen from …{me[-8:]}: {len(rows)} peers")
    for col in ("peer", "state", "capabilities", "load", "latency", "tok/s", "rtt", "age"):
        table.add_column(col, no_wrap=col != "capabilities")
    for r in rows:
        load = f"{r['in_flight']}/{r['max_concurrency']}" if r["in_flight"] is not None else "-"
        table.add_row(
            "…" + r["peer_id"][-8:],
            r["state"],
            ", ".join(c["name"] for c in r["capabilities"]) or "-",
            load,
            f"{r['latency_ms']:.0f} ms" if r["latency_ms"] else "-",
            f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-",
            f"{r['rtt_ms']:.1f} ms" if r["rtt_ms"] is not None else "-",
            f"{r['age_s']:.1f} s" if r["age_s"] is not None else "-",
        )
    return table


@cli.command("status")
@click.option("--watch", is_flag=True, help="Refresh live until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
@click.option(
    "--wait", default=3.0, show_default=True, help="Seconds to listen to gossip before the first view."
)
@click.option("--no-ping", is_flag=True, help="Do not measure round-trip times.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON line per view).")
@_peer_options
@pass_state
def status_command(
    state: State,
    watch: bool,
    interval: float,
    wait: float,
    no_ping: bool,
    as_json: bool,
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """The mesh as this peer sees it: peers, capabilities, state, load and round-trip time."""
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    if not cfg.bootstrap:
        raise click.UsageError("give --bootstrap ADDR (or MODELNET_BOOTSTRAP) to reach the mesh")
    try:
        run_async(_status, cfg, watch, interval, wait, not no_ping, as_json)
    except KeyboardInterrupt:
        pass


async def _status(cfg: Config, watch: bool, interval: float, wait: float, ping: bool, as_json: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _make_peer(cfg, require_bootstrap=True) as peer, trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            if as_json:
                await trio.sleep(wait)
                while True:
                    rows = await _status_rows(peer, ping)
                    click.echo(json.dumps({"peer_id": peer.peer_id, "time": time.time(), "peers": rows}))
                    sys.stdout.flush()
                    if not watch:
                        break
                    await trio.sleep(interval)
            else:
                with console.status("listening to the mesh..."):
                    await trio.sleep(wait)
                    rows = await _status_rows(peer, ping)
                if not watch:
                    console.print(_status_table(rows, peer.peer_id))
                else:
                    with Live(_status_table(rows, peer.peer_id), console=console, auto_refresh=False) as live:
                        while True:
                            await trio.sleep(interval)
                            rows = await _status_rows(peer, ping)
                            live.update(_status_table(rows, peer.peer_id), refresh=True)
            nursery.cancel_scope.cancel()


# -- demo -------------------------------------------------------------------------


@cli.command("demo")
def demo_command() -> None:
    """Start a local mesh in this process and show discovery, streaming, failover and collaboration.

    Exits 0 and leaves nothing running.
    """
    from ..demo.narrated import run_demo

    color = sys.stdout.isatty()

    def style(text: str, **kw: Any) -> str:
        return click.style(text, **kw) if color else text

    def say(text: str) -> None:
        click.echo(text)

    run_async(run_demo, say, style)


# -- collaborative requests -------------------------------------------------------


@cli.command("run")
@click.argument("workflow_file", type=click.Path(dir_okay=False))
@click.option("--input", "input_text", help="Input for the workflow (default: the file's input).")
@click.option("--timeout", type=float, help="Deadline for the whole workflow (default: the file's, or 60 s).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer and the trace tree as JSON.")
@_peer_options
@pass_state
def run_command(
    state: State,
    workflow_file: str,
    input_text: str | None,
    timeout: float | None,
    as_json: bool,
    identity: str | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    reachability: str | None,
) -> None:
    """Run a workflow file (pipelines, ensembles, routers, draft-and-verify; see specs/workflow.md)."""
    from ..mesh.collab import load_workflow

    try:
        text = Path(workflow_file).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read workflow {workflow_file}: {exc.strerror}") from None
    workflow = load_workflow(text)
    cfg, _ = state.config(**_peer_flags(identity, listen, bootstrap, reachability))
    if not cfg.bootstrap:
        raise click.UsageError(
            "give --bootstrap ADDR (or MODELNET_BOOTSTRAP) so the workflow can find models"
        )
    run_async(_run_workflow, cfg, workflow, input_text, timeout, as_json)


async def _run_workflow(
    cfg: Config, workflow: dict[str, Any], input_text: str | None, timeout: float | None, as_json: bool
) -> None:
    from ..mesh.collab import run_workflow

    async with _make_peer(cfg, require_bootstrap=True) as peer:
        result = await run_workflow(peer, workflow, input_text, timeout=timeout)
    if as_json:
        click.echo(json.dumps({"output": result.output, "trace": result.trace.to_json()}, default=repr))
        return
    click.echo(result.text)
    click.echo(click.style(result.trace.render(), dim=True), err=True)


# -- entry point -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning library errors into one line on stderr."""
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="modelnet", standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_ERROR)
    except ModelNetError as exc:
        _echo_err(exc.message)
        if verbose:
            raise
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BaseExceptionGroup as group:
        leaf = _single_modelnet_error(group)
        if leaf is None or verbose:
            raise
        _echo_err(leaf.message)
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_OK)


def _single_modelnet_error(group: BaseExceptionGroup[Any]) -> ModelNetError | None:
    found = exception_leaves(group)
    errors = [e for e in found if isinstance(e, ModelNetError)]
    return errors[0] if errors else None


if __name__ == "__main__":
    main()
