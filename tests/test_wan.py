"""A simulated WAN in Linux network namespaces (issue 14).

Twelve namespaces around a router namespace; real ``modelnet`` processes in each::

    boot   [10.78.1.2]  ─ 20 ms ─┐
    pub1   [10.78.2.2]  ─ 25 ms ─┤
    pub2   [10.78.3.2]  ─ 30 ms ─┤
    pub3   [10.78.4.2]  ─ 35 ms ─┤   rt (forwards; 10.78.K.1 on link K)
    pub4   [10.78.5.2]  ─ 40 ms ─┤
    fresh  [10.78.6.2]  ─ 20 ms ─┤
    natgw  [10.78.7.2]  ─ 30 ms ─┘
      ├─ nat1 [192.168.71.2]   (veths, no delay; natgw masquerades them behind 10.78.7.2
      ├─ nat2 [192.168.72.2]    and drops every connection that starts outside: they can
      └─ nat3 [192.168.73.2]    dial out only, and are reached through boot's relay)

Each WAN link (``─ D ms ─``) delays every packet by D ms (±2 ms) in each direction and drops
0.5 % of them, so a path between two hosts through the router has 40 to 80 ms of one-way delay
and about 1 % loss, the figures of ``tc netem delay 60ms loss 1%``. The kernel of the
machines this project's CI runs on has no ``sch_netem``, so the links are pairs of TUN
devices served by ``wan_wire.py`` (a user-space netem in the router namespace); the
namespaces, routes, forwarding and the NAT (nftables masquerade) are the kernel's own.

Checks, from the ``fresh`` host (nothing runs there but these commands):

1. discovery: a browse finds every serving peer, the NATed ones at relayed addresses only;
2. availability: every serving peer's gossip record arrives (``status``), with round-trip
   times that are printed against the emulated delay;
3. a streamed request to a NATed provider, routed by capability (through the relay);
4. a pipeline across three namespaces: summarize on nat1 (relayed), translate on pub1;
5. failover: the provider that answered is cut off (100 % loss on its link) and the same
   request is answered by the other provider;
6. ``modelnet doctor`` in each NATed namespace: behind NAT (dial-back fails), needs a relay,
   and holds a relay slot.

Latency figures are printed (``-s`` or ``-rP``) and written to ``wan_latency.txt`` in the
test's tmp dir. No check depends on timing beyond generous bounds. Skipped, with the reason,
where namespaces, the TUN device or ``nft`` are not available, except under ``CI=true``,
where it fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from netns_util import (
    IP,
    PREFIX,
    CommandLog,
    NetnsUnavailable,
    Proc,
    add_first_namespace,
    built,
    clean_env,
    delete_namespaces,
    diagnosed,
    in_ns,
    ip,
    stop_all,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

IN_CI = os.environ.get("CI", "").lower() == "true"
WIRE = str(Path(__file__).resolve().parent / "wan_wire.py")
CLIENT = str(Path(__file__).resolve().parent / "wan_client.py")
TARGET = "modelnet_p2p.demo_models:ALL"
BOOT_PORT = 4001
#: Public hosts on the WAN: name -> (link number K, one-way link delay in ms, models served).
PUBLIC: dict[str, tuple[int, float, list[str]]] = {
    "pub1": (2, 25, ["translate"]),
    "pub2": (3, 30, ["echo"]),
    "pub3": (4, 35, ["arithmetic"]),
    "pub4": (5, 40, ["arithmetic"]),
}
BOOT_LINK, BOOT_DELAY = 1, 20.0
FRESH_LINK, FRESH_DELAY = 6, 20.0
NATGW_LINK, NATGW_DELAY = 7, 30.0
#: Hosts behind the NAT: name -> (index j, models served); each on 192.168.7j.0/24.
NATED: dict[str, tuple[int, list[str]]] = {
    "nat1": (1, ["summarize"]),
    "nat2": (2, ["topic-classifier"]),
    "nat3": (3, ["verify-arithmetic"]),
}
JITTER_MS = 2.0
LOSS_PCT = 0.5  # per link and direction: about 1 % on a path through the router
LIVE_STATES = {"joining", "ready", "draining"}
#: The serving peers re-announce their cards every 20 s instead of 120 s: a DHT server that
#: refuted a relayed provider's record (its card fetch over the relayed WAN path was judged a
#: tarpit) checks it again at the next announce, within the browse's deadline.
ANNOUNCE_INTERVAL = "20"
#: WAN_TEST_VERBOSE=1: the serving peers log at debug level (shown on failure).
VERBOSE = ["-v"] if os.environ.get("WAN_TEST_VERBOSE") == "1" else []


def wan_ip(k: int) -> str:
    return f"10.78.{k}.2"


def nat_ip(j: int) -> str:
    return f"192.168.7{j}.2"


# -- the topology ------------------------------------------------------------------


class Wire:
    """The ``wan_wire.py`` process in the router namespace: every WAN link's delay and loss."""

    def __init__(self, ns: str, links: list[dict[str, Any]]) -> None:
        self.links = {link["name"]: link for link in links}
        self.proc = subprocess.Popen(
            in_ns(ns, sys.executable, WIRE, json.dumps(links)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout or []], daemon=True).start()
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            line = ""
        if '"ready"' not in line:
            self.stop()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise NetnsUnavailable(f"the emulated WAN links did not come up: {err.strip()[-500:]}")

    def set(self, name: str, **change: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"name": name, **change}) + "\n")
        self.proc.stdin.flush()
        self.links[name].update(change)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Client:
    """``wan_client.py`` in a namespace: a long-lived peer making requests on command."""

    def __init__(self, ns: str, listen: str, bootstrap: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            in_ns(ns, sys.executable, CLIENT, "--listen", listen, "--bootstrap", bootstrap),
            cwd=cwd,
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(
            target=lambda: [self.lines.put(x) for x in self.proc.stdout or []], daemon=True
        ).start()
        threading.Thread(
            target=lambda: [self.stderr.append(x) for x in self.proc.stderr or []], daemon=True
        ).start()
        self.peer_id = str(self._next(60)["peer_id"])

    def _next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith("{"):
                return json.loads(line)  # type: ignore[no-any-return]
        raise AssertionError(f"wan_client: no answer within {timeout} s\n{''.join(self.stderr[-40:])}")

    def calls(
        self, capability: str, input: str, n: int = 1, target: str | None = None, timeout: float = 30
    ) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        cmd = {"cmd": "calls", "capability": capability, "input": input, "n": n, "target": target}
        cmd["timeout"] = timeout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return list(self._next(60 + 35 * n)["calls"])

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(5)


@dataclass
class Wan:
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-w")
    created: list[str] = field(default_factory=list)
    wire: Wire | None = None
    #: One-way delay (ms) of each host's WAN link; NATed hosts use natgw's.
    delay: dict[str, float] = field(default_factory=dict)
    link_of: dict[str, str] = field(default_factory=dict)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def path_delay_ms(self, a: str, b: str) -> float:
        """The emulated one-way delay between hosts ``a`` and ``b`` (through the router)."""
        return self.delay[a] + self.delay[b]

    def up(self) -> None:
        if not sys.platform.startswith("linux"):
            raise NetnsUnavailable(f"network namespaces need Linux, this is {sys.platform}")
        if shutil.which(IP) is None:
            raise NetnsUnavailable("the 'ip' command (iproute2) is not installed")
        if shutil.which("nft") is None:
            raise NetnsUnavailable("the 'nft' command (nftables) is not installed: apt-get install nftables")
        if not os.path.exists("/dev/net/tun"):
            raise NetnsUnavailable("/dev/net/tun is missing (the emulated WAN links are TUN devices)")
        add_first_namespace(self.ns("rt"))
        self.created.append(self.ns("rt"))
        wan_hosts = {"boot": (BOOT_LINK, BOOT_DELAY), "fresh": (FRESH_LINK, FRESH_DELAY)}
        wan_hosts.update({name: (k, d) for name, (k, d, _) in PUBLIC.items()})
        wan_hosts["natgw"] = (NATGW_LINK, NATGW_DELAY)
        for name in [*wan_hosts, *NATED]:
            ip("netns", "add", self.ns(name))
            self.created.append(self.ns(name))
        for ns in self.created:
            ip("-n", ns, "link", "set", "lo", "up")
        self._sysctl("rt", "net.ipv4.ip_forward=1")
        self._sysctl("natgw", "net.ipv4.ip_forward=1")

        links = []
        for name, (k, delay) in wan_hosts.items():
            link = f"w{k}"
            self.delay[name] = delay
            self.link_of[name] = link
            links.append(
                {
                    "name": link,
                    "a_ns": self.ns(name),
                    "a_if": "wan0",
                    "b_ns": "",
                    "b_if": f"h{k}",
                    "delay_ms": delay,
                    "jitter_ms": JITTER_MS,
                    "loss_pct": LOSS_PCT,
                }
            )
        self.wire = Wire(self.ns("rt"), links)
        for name, (k, _) in wan_hosts.items():
            ns = self.ns(name)
            ip("-n", ns, "addr", "add", f"{wan_ip(k)}/24", "dev", "wan0")
            ip("-n", ns, "link", "set", "wan0", "up")
            ip("-n", ns, "route", "add", "default", "dev", "wan0")
            ip("-n", self.ns("rt"), "addr", "add", f"10.78.{k}.1/24", "dev", f"h{k}")
            ip("-n", self.ns("rt"), "link", "set", f"h{k}", "up")

        gw = self.ns("natgw")
        for name, (j, _) in NATED.items():
            self.delay[name] = NATGW_DELAY
            self.link_of[name] = self.link_of["natgw"]
            ip(
                "-n",
                gw,
                "link",
                "add",
                f"lan{j}",
                "type",
                "veth",
                "peer",
                "name",
                "lan0",
                "netns",
                self.ns(name),
            )
            ip("-n", gw, "addr", "add", f"192.168.7{j}.1/24", "dev", f"lan{j}")
            ip("-n", gw, "link", "set", f"lan{j}", "up")
            ip("-n", self.ns(name), "addr", "add", f"{nat_ip(j)}/24", "dev", "lan0")
            ip("-n", self.ns(name), "link", "set", "lan0", "up")
            ip("-n", self.ns(name), "route", "add", "default", "via", f"192.168.7{j}.1")
        rules = (
            "table ip wan_nat {\n"
            '  chain masq { type nat hook postrouting priority srcnat; oifname "wan0" masquerade; }\n'
            "  chain inbound { type filter hook forward priority filter; policy accept;\n"
            '    iifname "wan0" ct state != { established, related } drop; }\n'
            "}\n"
        )
        done = subprocess.run(
            in_ns(gw, "nft", "-f", "-"), input=rules, capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise RuntimeError(f"nft failed in {gw}: {done.stderr.strip()}")

    def _sysctl(self, role: str, setting: str) -> None:
        subprocess.run(
            in_ns(self.ns(role), "sysctl", "-qw", setting), check=True, capture_output=True, timeout=10
        )

    def cut(self, host: str) -> None:
        """Cut ``host`` off: every packet on its WAN link is dropped (its processes keep running)."""
        assert self.wire is not None
        self.wire.set(self.link_of[host], loss_pct=100)

    def down(self) -> list[str]:
        if self.wire is not None:
            self.wire.stop()
        return delete_namespaces(self.created)


def wan() -> contextlib.AbstractContextManager[Wan]:
    """Create the WAN; always remove every namespace (and with them every link), even on failure."""
    return built(Wan())


# -- the mesh ----------------------------------------------------------------------


@dataclass
class Mesh(CommandLog):
    wan: Wan
    cwd: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    ready: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    browsed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)

    def client(self) -> Client:
        """The long-lived client peer in the fresh namespace (started on first use)."""
        if not self.clients:
            listen = f"/ip4/{wan_ip(FRESH_LINK)}/tcp/0"
            self.clients.append(Client(self.wan.ns("fresh"), listen, self.boot_addr, self.cwd))
        return self.clients[0]

    @property
    def boot_addr(self) -> str:
        return f"/ip4/{wan_ip(BOOT_LINK)}/tcp/{BOOT_PORT}/p2p/{self.ready['boot']['peer_id']}"

    def peer_id(self, name: str) -> str:
        return str(self.ready[name]["peer_id"])

    @property
    def serving(self) -> list[str]:
        return [*PUBLIC, *NATED]

    run_timeout = 60.0

    def namespace(self, where: str) -> str:
        return self.wan.ns(where)

    def figure(self, line: str) -> None:
        self.figures.append(line)
        print(line)
        with open(self.cwd / "wan_latency.txt", "a") as f:
            f.write(line + "\n")

    def processes(self) -> Iterable[Proc]:
        return self.procs.values()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    cwd = tmp_path_factory.mktemp("wan")
    with contextlib.ExitStack() as stack:
        try:
            topo = stack.enter_context(wan())
        except NetnsUnavailable as exc:
            if IN_CI:
                pytest.fail(f"CI=true but the simulated WAN cannot be built: {exc}")
            pytest.skip(f"the simulated WAN cannot be built here: {exc}")
        m = Mesh(topo, cwd)
        stack.callback(lambda: stop_all(list(m.procs.values())))  # before the namespaces go
        stack.callback(lambda: [c.stop() for c in m.clients])
        try:
            _start(m)
        except BaseException:
            print(m.diagnostics())
            raise
        yield m
        print(f"latency figures (also in {cwd / 'wan_latency.txt'}):\n" + "\n".join(m.figures))


def _serve_args(models: list[str]) -> list[str]:
    out = [*VERBOSE, "serve", TARGET]
    for model in models:
        out += ["--only", model]
    return [*out, "--json", "--exit-on-stdin-eof"]


def _start(m: Mesh) -> None:
    w = m.wan
    m.procs["boot"] = Proc(
        "boot",
        w.ns("boot"),
        [
            "bootstrap",
            "--json",
            "--exit-on-stdin-eof",
            "--listen",
            f"/ip4/{wan_ip(BOOT_LINK)}/tcp/{BOOT_PORT}",
        ],
        cwd=m.cwd,
    )
    m.ready["boot"] = m.procs["boot"].event(timeout=60)
    serve_env = clean_env(MODELNET_ANNOUNCE_INTERVAL=ANNOUNCE_INTERVAL)
    for name, (k, _, models) in PUBLIC.items():
        args = [*_serve_args(models), "--listen", f"/ip4/{wan_ip(k)}/tcp/0", "--bootstrap", m.boot_addr]
        m.procs[name] = Proc(name, w.ns(name), args, cwd=m.cwd, env=serve_env)
    for name, (j, models) in NATED.items():
        args = [
            *_serve_args(models),
            "--reachability",
            "private",
            "--listen",
            f"/ip4/{nat_ip(j)}/tcp/0",
            "--bootstrap",
            m.boot_addr,
        ]
        m.procs[name] = Proc(name, w.ns(name), args, cwd=m.cwd, env=serve_env)
    for name in m.serving:
        event = m.procs[name].event(timeout=90)
        assert event.get("event") == "ready", f"{name}: {event}"
        m.ready[name] = event
    for name in NATED:
        circuits = [a for a in m.ready[name]["addrs"] if "/p2p-circuit/" in a]
        assert circuits, f"{name} holds no relay slot: {m.ready[name]}"


def browse(mesh: Mesh, want: set[str], deadline_s: float = 60) -> dict[str, list[dict[str, Any]]]:
    """``modelnet discover --json`` (no filter: every capability) from the fresh host, rows by peer id."""
    if want <= set(mesh.browsed):
        return mesh.browsed
    deadline = time.monotonic() + deadline_s
    rows: dict[str, list[dict[str, Any]]] = {}
    while True:
        data = mesh.run_json("fresh", "discover", "--json", "--timeout", "15", "--bootstrap", mesh.boot_addr)
        rows = {}
        for row in data["capabilities"]:
            rows.setdefault(row["peer_id"], []).append(row)
        if want <= set(rows):
            mesh.browsed = rows
        else:
            names = {mesh.peer_id(n): n for n in mesh.serving}
            mesh.notes.append(f"browse missed {sorted(names.get(p, p) for p in want - set(rows))}")
        if want <= set(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


# -- the checks --------------------------------------------------------------------


@diagnosed
def test_wan_links_delay_and_nat_blocks_inbound(mesh: Mesh) -> None:
    """The emulation itself: a TCP connect across the WAN takes one emulated round trip, and the
    NATed hosts dial out but cannot be dialed."""
    w = mesh.wan
    pub1_port = int(mesh.ready["pub1"]["addrs"][0].split("/")[4])
    nat1_addr = next(a for a in mesh.ready["nat1"]["addrs"] if a.startswith(f"/ip4/{nat_ip(1)}/"))
    nat1_port = int(nat1_addr.split("/")[4])
    code = (
        "import socket, sys, time\n"
        "host, port = sys.argv[1], int(sys.argv[2])\n"
        "best = None\n"
        "for _ in range(5):\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "    except OSError as exc:\n"
        "        print(f'{type(exc).__name__}: {exc}'); sys.exit(0)\n"
        "    took = time.monotonic() - t\n"
        "    best = took if best is None else min(best, took)\n"
        "print(f'connected {best * 1000:.1f}')\n"
    )

    def connect(host: str, to_ip: str, port: int) -> str:
        out = subprocess.run(
            in_ns(w.ns(host), sys.executable, "-c", code, to_ip, str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return (out.stdout + out.stderr).strip()

    attempts = {
        "fresh->pub1": ("fresh", wan_ip(PUBLIC["pub1"][0]), pub1_port),
        "nat1->pub1": ("nat1", wan_ip(PUBLIC["pub1"][0]), pub1_port),
        "fresh->natgw:nat1's port": ("fresh", wan_ip(NATGW_LINK), nat1_port),
        "fresh->nat1": ("fresh", nat_ip(1), nat1_port),
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        results = dict(zip(attempts, pool.map(lambda a: connect(*a), attempts.values()), strict=True))
    mesh.notes += [f"{k}: {v}" for k, v in results.items()]
    assert results["fresh->pub1"].startswith("connected"), results
    assert results["nat1->pub1"].startswith("connected"), results  # it dials out through the NAT
    assert not results["fresh->natgw:nat1's port"].startswith("connected"), results
    assert not results["fresh->nat1"].startswith("connected"), results
    for label, src, dst in (("fresh->pub1", "fresh", "pub1"), ("nat1->pub1", "nat1", "pub1")):
        took = float(results[label].split()[1])
        rtt = 2 * w.path_delay_ms(src, dst)
        mesh.figure(f"TCP connect {label}: best of 5 {took:.1f} ms; emulated RTT {rtt:.0f} ms (loaded)")
        assert took >= rtt * 0.8, f"{label} connected in {took:.1f} ms, under the emulated {rtt:.0f} ms RTT"


@diagnosed
def test_discovery_from_a_fresh_peer(mesh: Mesh) -> None:
    want = {mesh.peer_id(n): n for n in mesh.serving}
    started = time.monotonic()
    rows = browse(mesh, set(want))
    mesh.figure(
        f"browse from fresh found all {len(want)} serving peers after {time.monotonic() - started:.1f} s"
    )
    missing = [want[p] for p in want if p not in rows]
    assert not missing, f"not discovered from the fresh host: {missing}; found {sorted(rows)}"
    assert mesh.peer_id("boot") not in rows
    for name in mesh.serving:
        found = rows[mesh.peer_id(name)]
        models = PUBLIC[name][2] if name in PUBLIC else NATED[name][1]
        assert {r["capability"] for r in found} == set(models), (name, found)
        addrs = found[0]["addrs"]
        if name in NATED:
            relayed = f"/p2p/{mesh.peer_id('boot')}/p2p-circuit/p2p/{mesh.peer_id(name)}"
            assert addrs and all(a.endswith(relayed) for a in addrs), (name, addrs)
        else:
            assert any(a.startswith(f"/ip4/{wan_ip(PUBLIC[name][0])}/tcp/") for a in addrs), (name, addrs)


@diagnosed
def test_availability_records_arrive(mesh: Mesh) -> None:
    """From the fresh host, ``discover --sort latency`` follows every capability it finds, dials
    their providers (the NATed ones through the relay) and joins the gossip it hears with the
    cards: every serving peer's availability record must arrive. Its pings are the RTT figures."""
    want = {mesh.peer_id(n): n for n in mesh.serving}
    deadline = time.monotonic() + 75
    heard: dict[str, dict[str, Any]] = {}
    rounds = 0
    while True:
        rounds += 1
        data = mesh.run_json(
            "fresh",
            "discover",
            "--json",
            "--sort",
            "latency",
            "--timeout",
            "15",
            "--bootstrap",
            mesh.boot_addr,
        )
        rows = {r["peer_id"]: r for r in data["capabilities"]}
        for pid, row in rows.items():
            if row.get("state") in LIVE_STATES:
                heard.setdefault(pid, row)
        mesh.notes.append(f"availability round {rounds}: heard {sorted(want[p] for p in heard if p in want)}")
        if set(want) <= set(heard) or time.monotonic() > deadline:
            break
    missing = [want[p] for p in want if p not in heard]
    assert not missing, f"no availability record from {missing} in {rounds} discover runs"
    mesh.figure(
        f"availability of all {len(want)} serving peers heard by fresh within {rounds} discover run(s)"
    )
    for pid, name in want.items():
        rtt = heard[pid].get("latency_ms")
        via, emulated = path_from_fresh(mesh, name, rtt)
        shown = "-" if rtt is None else f"{rtt:.0f} ms"
        mesh.figure(f"ping fresh->{name} ({via}): {shown}; emulated RTT {emulated:.0f} ms (loaded)")
        if rtt is not None:
            assert rtt >= emulated * 0.8, f"{name}: a {rtt} ms ping under the emulated {emulated:.0f} ms RTT"


def path_from_fresh(mesh: Mesh, name: str, measured_ms: float | None) -> tuple[str, float]:
    """The path from fresh to ``name`` that a round trip of ``measured_ms`` took, and its
    emulated RTT in ms. To a NATed peer, fresh uses any connection it has: the relayed one
    it dials, or one that the NATed peer opened out to it through natgw (a DHT or gossip
    exchange can open one at any time; CI saw 102-110 ms requests to nat2, whose relayed
    RTT is 180 ms and direct one 100 ms). Both are honest paths, each with its own RTT."""
    direct = 2 * mesh.wan.path_delay_ms("fresh", name)
    if name not in NATED:
        return "direct", direct
    relayed = 2 * (mesh.wan.path_delay_ms("fresh", "boot") + mesh.wan.path_delay_ms("boot", name))
    if measured_ms is not None and measured_ms < relayed * 0.8:
        return f"over a connection {name} opened out through natgw", direct
    return "relayed via boot", relayed


@diagnosed
def test_streamed_request_to_a_nated_provider(mesh: Mesh) -> None:
    """Routed by capability alone: the mesh finds nat1's card and dials it through the relay."""
    browse(mesh, {mesh.peer_id("nat1")})
    text = "First sentence. Second sentence. Third one."
    answer = mesh.run_json(
        "fresh",
        "ask",
        "summarize",
        text,
        "-p",
        "sentences=2",
        "--json",
        "--timeout",
        "40",
        "--bootstrap",
        mesh.boot_addr,
        timeout=70,
    )
    assert answer["peer"] == mesh.peer_id("nat1")
    assert answer["text"] == "First sentence. Second sentence. "
    assert len(answer["chunks"]) >= 2, f"not streamed: {answer['chunks']}"
    relayed_rtt = 2 * (mesh.wan.path_delay_ms("fresh", "boot") + mesh.wan.path_delay_ms("boot", "nat1"))
    mesh.figure(
        f"ask summarize fresh->nat1 (relayed, {len(answer['chunks'])} chunks): "
        f"{answer['latency_s'] * 1000:.0f} ms including discovery and dials; "
        f"emulated RTT fresh->boot->nat1 {relayed_rtt:.0f} ms (loaded)"
    )


def _trace_peers(node: Any) -> list[str]:
    """Every peer id named in a workflow trace tree."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "peer" and isinstance(value, str):
                out.append(value)
            else:
                out += _trace_peers(value)
    elif isinstance(node, list):
        for item in node:
            out += _trace_peers(item)
    return out


@diagnosed
def test_pipeline_across_three_namespaces(mesh: Mesh) -> None:
    """From the fresh host: summarize on nat1 (through the relay), then translate on pub1."""
    browse(mesh, {mesh.peer_id("nat1"), mesh.peer_id("pub1")})
    flow = mesh.cwd / "wan-pipeline.toml"
    flow.write_text(
        "[workflow]\n"
        'name = "wan-pipeline"\n'
        'input = "Hello world. The cat is good. The dog is good too."\n'
        "timeout = 60\n\n"
        "[workflow.pipeline]\n"
        "steps = [\n"
        '  { capability = "summarize", params = { sentences = 2 } },\n'
        '  { capability = "translate", params = { to = "fr" }, stream = true, group = "sentence" },\n'
        "]\n"
    )
    started = time.monotonic()
    out = mesh.run_json("fresh", "run", str(flow), "--json", "--bootstrap", mesh.boot_addr, timeout=90)
    took = time.monotonic() - started
    mesh.notes.append(f"pipeline: {json.dumps(out)[:3000]}")
    peers = set(_trace_peers(out.get("trace")))
    assert mesh.peer_id("nat1") in peers and mesh.peer_id("pub1") in peers, f"trace peers {peers}: {out}"
    answer = json.dumps(out.get("answer", out.get("output", out)))
    assert "bonjour" in answer.lower() or "monde" in answer.lower(), f"not translated: {answer[:500]}"
    mesh.figure(
        f"pipeline summarize(nat1, relayed) -> translate(pub1) from fresh: {took:.1f} s wall, "
        "including process start, discovery and dials (loaded)"
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@diagnosed
def test_request_latency_on_warm_connections(mesh: Mesh) -> None:
    """A long-lived client in fresh: requests to pub2 (direct) and nat2 (relayed, or over a
    connection nat2 opened out) once connected."""
    client = mesh.client()
    browse(mesh, {mesh.peer_id("pub2"), mesh.peer_id("nat2")})
    targets = {
        "pub2": (next(iter(mesh.browsed[mesh.peer_id("pub2")]))["addrs"][0], "echo", "one two three"),
        "nat2": (
            next(iter(mesh.browsed[mesh.peer_id("nat2")]))["addrs"][0],
            "topic-classifier",
            "translate this to french",
        ),
    }
    for name, (addr, capability, text) in targets.items():
        client.calls(capability, text, n=2, target=addr)  # connect and warm up
        done = client.calls(capability, text, n=10, target=addr)
        failed = [c for c in done if "error" in c]
        assert not failed, f"requests to {name} failed: {failed}"
        assert all(c["peer"] == mesh.peer_id(name) for c in done)
        times = [c["ms"] for c in done]
        via, emulated = path_from_fresh(mesh, name, min(times))
        mesh.figure(
            f"warm request fresh->{name} ({via}, {capability}, new stream each): "
            f"p50 {_median(times):.0f} ms, "
            f"min {min(times):.0f}, max {max(times):.0f} over {len(times)}; emulated RTT {emulated:.0f} ms "
            f"({_median(times) / emulated:.2f}x) (loaded)"
        )
        assert min(times) >= emulated * 0.8, (
            f"{name}: a request in {min(times):.0f} ms, under one emulated RTT"
        )


def _cut_a_provider(mesh: Mesh) -> tuple[str, str]:
    """Route arithmetic (pub3, pub4) from the long-lived client, then cut off the provider that
    answered last (100 % loss on its link). Once per run: (victim, survivor)."""
    if "victim" in mesh.ready:
        return mesh.ready["victim"]["name"], mesh.ready["survivor"]["name"]
    client = mesh.client()
    browse(mesh, {mesh.peer_id("pub3"), mesh.peer_id("pub4")})
    by_id = {mesh.peer_id("pub3"): "pub3", mesh.peer_id("pub4"): "pub4"}
    warm = client.calls("arithmetic", "2 plus 3", n=6)
    assert all(c.get("text") == "5" for c in warm), warm
    victim = by_id[warm[-1]["peer"]]
    survivor = ({"pub3", "pub4"} - {victim}).pop()
    answered = sum(c["peer"] == warm[-1]["peer"] for c in warm)
    mesh.wan.cut(victim)
    mesh.ready["victim"], mesh.ready["survivor"] = {"name": victim}, {"name": survivor}
    mesh.ready["cut"] = {"at": time.monotonic()}
    mesh.figure(f"failover: {victim} cut off after answering {answered} of 6 routed requests")
    return victim, survivor


@diagnosed
def test_first_request_after_the_cut_fails_over(mesh: Mesh) -> None:
    victim, survivor = _cut_a_provider(mesh)
    assert victim != survivor
    started = time.monotonic()
    first = mesh.client().calls("arithmetic", "2 plus 3", n=1, timeout=20)[0]
    mesh.ready["first_after_cut"] = first
    tried = [(a.get("status"), a.get("ms")) for a in first.get("attempts", [])]
    outcome = first.get("error") or f"answered by {by_name(mesh, first)}"
    mesh.figure(
        f"failover: first request after the cut: {outcome} "
        f"in {time.monotonic() - started:.1f} s; attempts (status, ms): {tried} (loaded)"
    )
    assert first.get("peer") == mesh.peer_id(survivor), first


def by_name(mesh: Mesh, call: dict[str, Any]) -> str:
    names = {mesh.peer_id(n): n for n in mesh.serving}
    return names.get(str(call.get("peer")), str(call.get("peer")))


@diagnosed
def test_requests_go_to_the_other_provider_once_one_is_cut_off(mesh: Mesh) -> None:
    """After the cut (and the failed first request, see above), routed requests are answered
    by the provider that is still reachable: the cut-off one is banned, not retried."""
    victim, survivor = _cut_a_provider(mesh)
    client = mesh.client()
    if "first_after_cut" not in mesh.ready:  # the request of the test above
        mesh.ready["first_after_cut"] = client.calls("arithmetic", "2 plus 3", n=1, timeout=20)[0]
    after = client.calls("arithmetic", "2 plus 3", n=3)
    mesh.notes.append(f"after the cut: {after}")
    assert all(c.get("text") == "5" for c in after), f"requests after {victim} was cut: {after}"
    assert all(c["peer"] == mesh.peer_id(survivor) for c in after), after
    took = time.monotonic() - mesh.ready["cut"]["at"]
    times = ", ".join(f"{c['ms']:.0f}" for c in after)
    mesh.figure(
        f"failover: then 3 requests answered by {survivor} in {times} ms "
        f"({took:.1f} s after the cut) (loaded)"
    )


@diagnosed
def test_doctor_reports_nated_peers_private_with_a_relay(mesh: Mesh) -> None:
    """``modelnet doctor --json`` in each NATed namespace: dial-back fails (NAT), a relay slot is granted."""

    def doctor(name: str) -> tuple[int, str, str]:
        j = NATED[name][0]
        result = mesh.run(
            name,
            "doctor",
            "--json",
            "--no-browse",
            "--listen",
            f"/ip4/{nat_ip(j)}/tcp/0",
            "--bootstrap",
            mesh.boot_addr,
            timeout=90,
        )
        return result.returncode, result.stdout, result.stderr

    with ThreadPoolExecutor(len(NATED)) as pool:
        results = dict(zip(NATED, pool.map(doctor, NATED), strict=True))
    for name, (code, out, err) in results.items():
        assert out.strip().startswith("{"), f"doctor in {name} printed no JSON (exit {code}): {err[-2000:]}"
        doc = json.loads(out)
        findings = {f["check"]: f for f in doc["findings"]}
        reach, relay = findings.get("reachability"), findings.get("relay")
        assert reach is not None and relay is not None, f"{name}: {doc['findings']}"
        # Private: the bootstrap node could not dial it back at the NAT's public address.
        assert reach["status"] == "warn", f"{name}: {reach}"
        assert "NAT" in reach["message"] and "relay" in reach["message"], f"{name}: {reach}"
        assert wan_ip(NATGW_LINK) in reach["message"], f"{name}: not judged at the NAT's address: {reach}"
        # ... and a relay slot is held, which this peer needs.
        assert relay["status"] == "ok" and "needs one" in relay["message"], f"{name}: {relay}"
        boot = next(b for b in doc["facts"]["bootstrap"] if b.get("dial_ms") is not None)
        mesh.figure(
            f"doctor in {name}: dial to boot {boot['dial_ms']:.0f} ms (emulated RTT "
            f"{2 * mesh.wan.path_delay_ms(name, 'boot'):.0f} ms; a dial is TCP + Noise + yamux, several "
            f"round trips) (loaded); exit {code}"
        )
        assert code == 0, f"doctor in {name} found a problem: {doc['findings']}"
