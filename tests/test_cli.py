"""The `modelnet` CLI, run as a subprocess as a user would."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
from pathlib import Path

import click
import pytest
from cli_util import MODELNET, background, clean_env, modelnet, one_line_error, read_event

from modelnet_p2p.cli import cli, main
from modelnet_p2p.cli.options import PeerOptions, peer_options
from modelnet_p2p.config import Config, load_config
from modelnet_p2p.errors import UnavailableError
from modelnet_p2p.log import set_verbose


def test_id_creates_then_reuses(tmp_path):
    first = modelnet("id", "--identity", "node.key", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = modelnet("id", "--identity", "node.key", cwd=tmp_path)
    assert again.stdout == first.stdout
    assert first.stdout.strip().startswith("12D3KooW")


def test_help_documents_exit_codes():
    out = modelnet("--help")
    assert out.returncode == 0
    assert "Exit codes" in out.stdout and "130" in out.stdout


def test_serve_and_ask_streams(tmp_path):
    with background("serve", "modelnet_p2p.demo_models:ALL", "--json", cwd=tmp_path) as server:
        ready = read_event(server)
        assert ready["event"] == "ready"
        assert "echo" in ready["capabilities"]
        addr = ready["addrs"][0]
        out = modelnet("ask", "echo", "one two three", "--peer", addr, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "one two three"
        assert "answered by " + ready["peer_id"] in out.stderr
        assert "3 tokens" in out.stderr
        js = modelnet(
            "ask", "translate", "hello world", "--peer", addr, "-p", "to=es", "--json", cwd=tmp_path
        )
        assert js.returncode == 0, js.stderr
        data = json.loads(js.stdout)
        assert data["text"].strip() == "hola mundo"
        assert data["peer"] == ready["peer_id"]
        # unknown capability: one line, exit 1
        bad = modelnet("ask", "nope", "x", "--peer", addr, cwd=tmp_path)
        assert "not served" in one_line_error(bad)
        assert bad.returncode == 1
        server.send_signal(signal.SIGINT)
        assert read_event(server)["event"] == "draining"
        assert read_event(server)["event"] == "stopped"
        assert server.wait(20) == 0


def test_serve_capability_fields_from_flags_and_card_file(tmp_path):
    card = tmp_path / "card.toml"
    card.write_text(
        '[capability]\nhandler = "modelnet_p2p.demo_models:echo"\nname = "parrot"\n'
        'description = "repeats"\ntags = ["birds"]\n'
    )
    with background("serve", str(card), "--json", cwd=tmp_path) as server:
        assert read_event(server)["capabilities"] == ["parrot"]
    with background(
        "serve", "modelnet_p2p.demo_models:echo", "-c", "copycat", "--json", cwd=tmp_path
    ) as server:
        assert read_event(server)["capabilities"] == ["copycat"]


def test_config_precedence(tmp_path):
    cfg = tmp_path / "modelnet.toml"
    cfg.write_text(
        'listen = ["/ip4/127.0.0.1/tcp/4100"]\n[limits]\nmax_concurrency = 5\nmax_concurrency_per_peer = 2\n'
    )
    env = clean_env(MODELNET_MAX_CONCURRENCY="7")
    out = modelnet(
        "--config", str(cfg), "config", "show", "--json", "--listen", "/ip4/127.0.0.1/tcp/4200", env=env
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["config"]["listen"] == ["/ip4/127.0.0.1/tcp/4200"]
    assert data["sources"]["listen"] == "flag"
    assert data["config"]["max_concurrency"] == 7
    assert data["sources"]["max_concurrency"] == "environment"
    assert data["config"]["max_concurrency_per_peer"] == 2
    assert data["sources"]["max_concurrency_per_peer"].startswith("file")
    assert data["sources"]["max_frame_size"] == "default"
    human = modelnet("--config", str(cfg), "config", "show", env=env)
    assert human.returncode == 0 and "max_concurrency" in human.stdout


def test_bad_inputs_are_one_line(tmp_path):
    # unknown flag: usage error, exit 2
    bad_flag = modelnet("ask", "--no-such-flag")
    assert bad_flag.returncode == 2
    assert "Traceback" not in bad_flag.stderr
    # malformed config file
    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [unclosed\n")
    assert "not valid TOML" in one_line_error(modelnet("--config", str(broken), "config", "show"))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    assert "unknown key" in one_line_error(modelnet("--config", str(unknown), "config", "show"))
    # bad value from the environment
    env = clean_env(MODELNET_MAX_CONCURRENCY="lots")
    assert "invalid value" in one_line_error(modelnet("config", "show", env=env))
    # malformed key file
    key = tmp_path / "bad.key"
    key.write_text("not a key")
    os.chmod(key, 0o600)
    assert "not a valid PEM" in one_line_error(modelnet("id", "--identity", str(key)))
    # unreachable bootstrap
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    out = modelnet("ask", "echo", "hi", "--bootstrap", dead, timeout=60)
    assert "no bootstrap peer reachable" in one_line_error(out)
    # malformed multiaddr
    assert "neither a multiaddr nor a peer id" in one_line_error(
        modelnet("ask", "echo", "hi", "--peer", "nowhere")
    )
    assert "invalid multiaddr" in one_line_error(modelnet("ask", "echo", "hi", "--peer", "/ip4/999"))
    # bad serve target
    assert "cannot import" in one_line_error(modelnet("serve", "no_such_module:handler"))
    # unknown network name
    assert "invalid network name" in one_line_error(modelnet("--network", "Bad Name", "config", "show"))


def test_mesh_up_and_clean_stop(tmp_path):
    proc = subprocess.Popen(
        [*MODELNET, "mesh", "up", "-n", "3", "--json"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        mesh = read_event(proc, timeout=90)
        assert mesh["bootstrap"].startswith("/ip4/127.0.0.1/tcp/")
        assert len(mesh["peers"]) == 3
        pids: list[int] = []
        addr = mesh["peers"][0]["addrs"][0]
        out = modelnet("ask", "echo", "through the mesh", "--peer", addr)
        assert out.returncode == 0 and out.stdout.strip() == "through the mesh"
        children = _children(proc.pid)
        assert len(children) == 4  # bootstrap node + 3 peers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0
        for pid in children + pids:
            assert not _alive(pid), f"process {pid} left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def test_discover_and_status_json(tmp_path):
    import json as _json

    with background("bootstrap", "--json", cwd=tmp_path) as boot:
        baddr = read_event(boot)["addrs"][0]
        with (
            background(
                "serve",
                "modelnet_p2p.demo_models:ALL",
                "--only",
                "echo",
                "--only",
                "arithmetic",
                "--json",
                "--bootstrap",
                baddr,
                cwd=tmp_path,
            ) as p1,
            background(
                "serve",
                "modelnet_p2p.demo_models:ALL",
                "--only",
                "echo",
                "--json",
                "--bootstrap",
                baddr,
                cwd=tmp_path,
            ) as p2,
        ):
            ids = {read_event(p1)["peer_id"], read_event(p2)["peer_id"]}
            out = modelnet("discover", "--model", "echo", "--bootstrap", baddr, "--json", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            data = _json.loads(out.stdout)
            assert {r["peer_id"] for r in data["capabilities"]} == ids
            out = modelnet("discover", "--tag", "math", "--bootstrap", baddr, "--json", cwd=tmp_path)
            rows = _json.loads(out.stdout)["capabilities"]
            assert {r["capability"] for r in rows} == {"arithmetic"}
            st = modelnet("status", "--bootstrap", baddr, "--json", "--wait", "4", cwd=tmp_path)
            assert st.returncode == 0, st.stderr
            view = _json.loads(st.stdout.splitlines()[0])
            by_id = {p["peer_id"]: p for p in view["peers"]}
            assert ids <= set(by_id)
            for pid in ids:
                assert by_id[pid]["state"] == "ready"
                assert "echo" in {c["name"] for c in by_id[pid]["capabilities"]}
                assert by_id[pid]["rtt_ms"] is not None
            # routed ask through the mesh
            ask = modelnet("ask", "echo", "routed by the mesh", "--bootstrap", baddr, "--json", cwd=tmp_path)
            assert ask.returncode == 0, ask.stderr
            assert _json.loads(ask.stdout)["peer"] in ids


# -- in process: the command tree, the shared options and the error policy ----------------

README = Path(__file__).resolve().parent.parent / "README.md"
PEER_COMMANDS = ["serve", "bootstrap", "ask", "discover", "doctor", "status", "run", "config show"]


def _command(path: str) -> click.Command:
    cmd: click.Command = cli
    for name in path.split():
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def _leaves(cmd: click.Command = cli) -> list[click.Command]:
    if isinstance(cmd, click.Group):
        return [leaf for sub in cmd.commands.values() for leaf in _leaves(sub)]
    return [cmd]


@pytest.fixture
def parsed(monkeypatch):
    """Run `main` in process with every command's body replaced by a recorder of its arguments."""
    calls: list[tuple[str, dict[str, object]]] = []
    for leaf in _leaves():

        def record(*, _name=leaf.name, **kwargs):
            calls.append((_name, kwargs))

        monkeypatch.setattr(leaf, "callback", record)
    return calls


def _readme_commands() -> list[list[str]]:
    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].replace("[", "").replace("]", "")
        if line.strip().startswith("modelnet "):
            out.append(shlex.split(line)[1:])
    return out


def test_every_documented_command_parses(parsed):
    commands = _readme_commands()
    assert len(commands) >= 10
    for argv in commands:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0, argv
    assert {name for name, _ in parsed} >= {"demo", "up", "serve", "discover", "ask", "status", "run"}


def test_peer_options_are_one_group(parsed):
    for path in PEER_COMMANDS:
        opts = {o for p in _command(path).params for o in p.opts}
        assert {"--identity", "-i", "--listen", "-l", "--bootstrap", "-b", "--reachability"} <= opts, path
    gateway = {o for p in _command("gateway").params for o in p.opts}
    assert {"--p2p-listen", "--bootstrap", "--identity"} <= gateway and "--reachability" not in gateway
    seen: list[PeerOptions] = []

    @click.command()
    @peer_options()
    def probe(peer: PeerOptions) -> None:
        seen.append(peer)

    probe.main(
        ["-i", "k.key", "-l", "L1", "-l", "L2", "-b", "B", "--reachability", "private"], standalone_mode=False
    )
    probe.main([], standalone_mode=False)
    assert seen == [PeerOptions("k.key", ("L1", "L2"), ("B",), "private"), PeerOptions()]
    assert seen[0].config_flags() == {
        "identity": "k.key",
        "listen": ["L1", "L2"],
        "bootstrap": ["B"],
        "reachability": "private",
    }
    assert load_config(env={}, flags=PeerOptions().config_flags())[1] == load_config(env={})[1]


def test_defaults_come_from_config(tmp_path):
    out = modelnet("config", "show", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    expected, sources = load_config(env={})
    assert data["config"] == expected.as_dict()
    assert data["sources"] == sources
    assert data["config"]["announce_interval"] == Config().announce_interval == 120.0
    flagged = modelnet(
        "config",
        "show",
        "--json",
        "-i",
        "k.key",
        "-l",
        "/ip4/127.0.0.1/tcp/1",
        "-b",
        "B",
        "--reachability",
        "private",
        cwd=tmp_path,
    )
    srcs = json.loads(flagged.stdout)["sources"]
    assert [srcs[k] for k in ("identity", "listen", "bootstrap", "reachability")] == ["flag"] * 4


def test_unexpected_errors_are_one_line(parsed, monkeypatch, capsys):
    def boom(**kwargs):
        raise RuntimeError("the disk is on fire\nsecond line")

    monkeypatch.setattr(_command("demo"), "callback", boom)
    with pytest.raises(SystemExit) as done:
        main(["demo"])
    assert done.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["error: RuntimeError: the disk is on fire (run with -v for details)"]
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    try:
        with pytest.raises(RuntimeError):
            main(["-v", "demo"])  # -v: the line, then the traceback
    finally:
        set_verbose(False)
    assert "the disk is on fire" in capsys.readouterr().err

    def grouped(**kwargs):
        raise ExceptionGroup("tasks", [ValueError("noise"), UnavailableError("no provider answered")])

    monkeypatch.setattr(_command("demo"), "callback", grouped)
    with pytest.raises(SystemExit) as done:
        main(["demo"])
    assert done.value.code == 1
    assert capsys.readouterr().err.strip() == "error: no provider answered"

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_command("demo"), "callback", interrupted)
    with pytest.raises(SystemExit) as done:
        main(["demo"])
    assert done.value.code == 130
