"""Running a public test mesh: bootstrap lists (IP and DNS multiaddrs), ``--network testnet``
reading its list from a file or the environment, the hardened ``modelnet bootstrap``, and the
deployment files of ``examples/deploy/`` (systemd unit, Dockerfile).

Real peers on 127.0.0.1 (and ::1); DNS names are ``localhost`` or answered by a resolver the
test installs in trio, so no query leaves the machine. The container image is built only
where a docker daemon runs (the test says why it skips otherwise).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from cli_util import background, clean_env, modelnet, read_event

from modelnet_p2p import ConfigError, Peer
from modelnet_p2p.config import PEER_SETTINGS, load_config, network_bootstrap_var
from modelnet_p2p.p2p.addresses import parse_bootstrap_list
from modelnet_p2p.p2p.resolve import resolve_addr

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "examples" / "deploy"

#: Fixed peer ids (parameters must be the same in every pytest-xdist worker).
ID1 = "12D3KooWCQVqSHVJX2Mp8TgCigq7vg78kcDpVcRoMapSkLARByHX"
ID2 = "12D3KooWMMtidyu7NfuLb21SMFBe6drxciUUsWyZrvw15AYoYt5P"


# -- bootstrap lists ------------------------------------------------------------------------


def test_a_bootstrap_list_takes_ip_and_dns_multiaddrs_with_comments() -> None:
    text = f"""
    # the test mesh's bootstrap nodes
    /dns4/boot-1.example.org/tcp/4001/p2p/{ID1}   # Europe
    /dns6/boot-2.example.org/tcp/4001/p2p/{ID2}
    /ip4/203.0.113.7/tcp/4001/p2p/{ID1}, /ip6/2001:db8::7/tcp/4001/p2p/{ID2}
    /dns/boot-3.example.org/tcp/4001/p2p/{ID1}

    /dns4/boot-1.example.org/tcp/4001/p2p/{ID1}
    """
    assert parse_bootstrap_list(text) == [
        f"/dns4/boot-1.example.org/tcp/4001/p2p/{ID1}",
        f"/dns6/boot-2.example.org/tcp/4001/p2p/{ID2}",
        f"/ip4/203.0.113.7/tcp/4001/p2p/{ID1}",
        f"/ip6/2001:db8::7/tcp/4001/p2p/{ID2}",
        f"/dns/boot-3.example.org/tcp/4001/p2p/{ID1}",
    ]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("/ip4/203.0.113.7/tcp/4001", "/p2p/<peer id>"),
        (f"/ip4/203.0.113.7/udp/4001/quic/p2p/{ID1}", "/p2p/<peer id>"),
        ("/ip4/203.0.113.7/tcp/4001/p2p/notapeerid", "not a multiaddr"),
        (f"/dnsaddr/example.org/p2p/{ID1}", "/p2p/<peer id>"),
        ("boot.example.org:4001", "not a multiaddr"),
    ],
)
def test_a_bad_bootstrap_line_is_named_with_its_line_number(line: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bootstrap_list(f"# header\n{line}\n", "testnet.txt")
    assert "testnet.txt, line 2" in err.value.message and why in err.value.message


def test_network_testnet_reads_its_list_from_the_environment_or_a_file(tmp_path: Path) -> None:
    var = network_bootstrap_var("testnet")
    assert var == "MODELNET_TESTNET_BOOTSTRAP"
    listed = f"/dns4/boot-1.example.org/tcp/4001/p2p/{ID1},/ip4/203.0.113.7/tcp/4001/p2p/{ID2}"
    cfg, sources = load_config(env={var: listed}, flags={"network": "testnet"})
    assert cfg.bootstrap == listed.split(",") and sources["bootstrap"] == "network testnet"
    cfg, _ = load_config(env={var: listed}, flags={"network": "local"})
    assert cfg.bootstrap == []  # another network's list is not used
    listfile = tmp_path / "testnet.txt"
    listfile.write_text(f"# ours\n/dns6/boot-2.example.org/tcp/4001/p2p/{ID2}\n")
    cfg, sources = load_config(
        env={"MODELNET_BOOTSTRAP_FILE": str(listfile), var: listed}, flags={"network": "testnet"}
    )
    assert cfg.bootstrap == [f"/dns6/boot-2.example.org/tcp/4001/p2p/{ID2}"]
    assert sources["bootstrap"] == f"bootstrap list {listfile}"
    # an explicit --bootstrap wins over both
    flag = f"/ip4/198.51.100.1/tcp/4001/p2p/{ID1}"
    cfg, _ = load_config(
        env={"MODELNET_BOOTSTRAP_FILE": str(listfile)}, flags={"network": "testnet", "bootstrap": [flag]}
    )
    assert cfg.bootstrap == [flag]
    with pytest.raises(ConfigError, match="cannot read bootstrap list"):
        load_config(
            env={"MODELNET_BOOTSTRAP_FILE": str(tmp_path / "missing.txt")}, flags={"network": "testnet"}
        )


class _Resolver(trio.abc.HostnameResolver):
    """Answers ``names`` itself (no query leaves the machine); anything else is unknown."""

    def __init__(self, names: dict[str, tuple[int, str]]) -> None:
        self.names = names

    async def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        fam, ip = self.names[name]
        if family not in (0, fam):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        sockaddr = (ip, 0, 0, 0) if fam == socket.AF_INET6 else (ip, 0)
        return [(fam, socket.SOCK_STREAM, 6, "", sockaddr)]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


@pytest.mark.timeout(90)
async def test_peers_bootstrap_from_dns4_and_dns6_addresses() -> None:
    trio.socket.set_custom_hostname_resolver(
        _Resolver({"boot4.test": (socket.AF_INET, "127.0.0.1"), "boot6.test": (socket.AF_INET6, "::1")})
    )
    try:
        with trio.fail_after(60):
            async with (
                Peer(gossip=False) as boot4,
                Peer(listen=["/ip6/::1/tcp/0"], gossip=False) as boot6,
            ):
                port4 = multiaddr.Multiaddr(boot4.addrs[0]).value_for_protocol("tcp")
                port6 = multiaddr.Multiaddr(boot6.addrs[0]).value_for_protocol("tcp")
                dns4 = f"/dns4/boot4.test/tcp/{port4}/p2p/{boot4.peer_id}"
                dns6 = f"/dns6/boot6.test/tcp/{port6}/p2p/{boot6.peer_id}"
                assert [str(a) for a in await resolve_addr(multiaddr.Multiaddr(dns6))] == [
                    f"/ip6/::1/tcp/{port6}/p2p/{boot6.peer_id}"
                ]
                assert await resolve_addr(multiaddr.Multiaddr(f"/dns4/unknown.test/tcp/1/p2p/{ID1}")) == []
                async with Peer(
                    bootstrap=[dns4, dns6], require_bootstrap=True, gossip=False, reachability="public"
                ) as joiner:
                    assert joiner.dialer.is_connected(boot4.peer_id)
                    assert joiner.dialer.is_connected(boot6.peer_id)
    finally:
        trio.socket.set_custom_hostname_resolver(None)


# -- the hardened bootstrap node and the deployment files -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unit_command() -> list[str]:
    """The unit's ExecStart, without the program (``modelnet``) itself."""
    [line] = [
        ln
        for ln in (DEPLOY / "modelnet-bootstrap.service").read_text().splitlines()
        if ln.startswith("ExecStart=")
    ]
    argv = line.removeprefix("ExecStart=").split()
    assert argv[0].endswith("/modelnet")
    return argv[1:]


def _docker_command() -> list[str]:
    """The image's CMD (its ENTRYPOINT is ``modelnet``)."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["modelnet"]' in text
    [line] = [ln for ln in text.splitlines() if ln.startswith("CMD ")]
    return list(json.loads(line.removeprefix("CMD ")))


def _localise(argv: list[str], state: Path, port: int) -> list[str]:
    """``argv`` with its state directory moved to ``state`` and port 4001 to ``port``.

    It still listens on the wildcard address (the public profile applies only beyond
    loopback); the test dials it on 127.0.0.1."""
    return [arg.replace("/var/lib/modelnet", str(state)).replace("/tcp/4001", f"/tcp/{port}") for arg in argv]


def test_the_example_bootstrap_list_parses() -> None:
    assert len(parse_bootstrap_list((DEPLOY / "testnet.bootstrap").read_text())) == 3


def test_a_public_bootstrap_node_needs_a_fixed_identity_and_port(tmp_path: Path) -> None:
    out = modelnet("--network", "testnet", "bootstrap", "--listen", "/ip4/0.0.0.0/tcp/4001", cwd=tmp_path)
    assert out.returncode == 2 and "fixed identity" in out.stderr
    out = modelnet(
        "--network", "testnet", "bootstrap", "-i", "b.key", "--listen", "/ip4/0.0.0.0/tcp/0", cwd=tmp_path
    )
    assert out.returncode == 2 and "fixed port" in out.stderr
    assert not (tmp_path / "b.key").exists()


def test_the_public_profile_sets_relay_and_connection_limits() -> None:
    from modelnet_p2p.cli.bootstrap import PUBLIC_CONNECTIONS, PUBLIC_LIMITS, bootstrap_overrides

    cfg, _ = load_config(
        env={}, flags={"network": "testnet", "identity": "b.key", "listen": ["/ip4/0.0.0.0/tcp/4001"]}
    )
    over = bootstrap_overrides(cfg)
    assert over["relay_hop"] and over["dht_mode"] == "server" and over["reachability"] == "public"
    assert (over["connections_low"], over["connections_high"]) == PUBLIC_CONNECTIONS
    if "resource_limits" not in PEER_SETTINGS:
        pytest.skip("this tree has no per-peer and per-IP resource limits (PeerConfig.resource_limits)")
    limits = over["resource_limits"]
    for name, value in PUBLIC_LIMITS.items():
        assert getattr(limits, name) == value
    Peer(**over)  # a Peer takes them all
    plain = {"relay_hop": True, "dht_mode": "server"}
    local, _ = load_config(env={}, flags={"network": "local"})
    assert bootstrap_overrides(local) == plain
    # on loopback only (modelnet mesh up), a mesh on one machine: no key or fixed port needed
    loop, _ = load_config(env={}, flags={"network": "testnet", "listen": ["/ip4/127.0.0.1/tcp/0"]})
    assert bootstrap_overrides(loop) == plain


@pytest.mark.timeout(180)
@pytest.mark.parametrize("source", ["systemd", "docker"])
def test_the_deployed_command_runs_a_healthy_bootstrap_node(source: str, tmp_path: Path) -> None:
    """The unit's ExecStart and the image's CMD, run as they are (on loopback, in a temporary
    state directory): a bootstrap node with a key of mode 0600 and a peer id that survives a
    restart, which announces nothing, serves Prometheus metrics where the deployment says, and
    which doctor finds healthy."""
    argv = _localise(_unit_command() if source == "systemd" else _docker_command(), tmp_path, free_port())
    metrics = free_port()
    env = clean_env(MODELNET_METRICS_LISTEN=f"127.0.0.1:{metrics}")
    with background(*argv, cwd=tmp_path, env=env) as node:
        events = [read_event(node)]
        while events[-1]["event"] != "ready":
            events.append(read_event(node))
        ready = events[-1]
        assert any(e["event"] == "metrics" for e in events)  # --metrics-listen, from the environment
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as page:
            assert b"modelnet_" in page.read()
        [wild] = [a for a in ready["addrs"] if a.startswith("/ip4/")]
        addr = wild.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/")
        assert ready["capabilities"] == []
        key = tmp_path / "bootstrap.key"
        assert key.stat().st_mode & 0o777 == 0o600
        out = modelnet("--network", "testnet", "doctor", "-b", addr, "--json", cwd=tmp_path, timeout=90)
        doc = json.loads(out.stdout)
        assert out.returncode == 0, [f for f in doc["findings"] if f["status"] != "ok"]
        assert doc["facts"]["serving_peers"] == 0  # the node announces nothing
        assert any(f["check"] == "relay" and "granted" in f["message"] for f in doc["findings"])
    with background(*argv, cwd=tmp_path, env=env) as node:
        again = read_event(node)
        while again["event"] != "ready":
            again = read_event(node)
        assert again["peer_id"] == ready["peer_id"]  # a fixed identity


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    program = shutil.which("modelnet") or str(Path(sys.executable).with_name("modelnet"))
    unit = tmp_path / "modelnet-bootstrap.service"
    unit.write_text(
        (DEPLOY / "modelnet-bootstrap.service").read_text().replace("/usr/local/bin/modelnet", program)
    )
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out


def _docker_unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    try:
        out = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker version failed: {exc}"
    if out.returncode != 0:
        return "the docker daemon is not running: " + (out.stderr.strip().splitlines() or ["no answer"])[-1]
    return None


@pytest.mark.timeout(1800)
def test_the_container_image_builds() -> None:
    why = _docker_unavailable()
    if why is not None:
        pytest.skip(why)
    tag = "modelnet-bootstrap:test"
    build = subprocess.run(
        ["docker", "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(REPO)],
        capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run(
        ["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "modelnet" in run.stdout, run
    user = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Config.User}}", tag], capture_output=True, text=True
    )
    assert user.stdout.strip() == "modelnet"
