"""A multi-host mesh in Linux network namespaces (issue 5).

Real ``modelnet`` processes, each in its own network namespace (see
``netns_util.py`` for the topology): a bootstrap host, three peer hosts on a
bridge with their own addresses, and a hidden host whose only link goes to the
bootstrap host, which does not forward, so it can only be reached through the
bootstrap node's circuit relay. Every peer joins through the one bootstrap
address. The checks:

1. discovery from one host finds all four serving peers, the hidden one with a
   relayed (``/p2p-circuit``) address;
2. calls from one host reach every other host, the hidden one through the relay,
   both at the address discovery gave and routed by capability alone;
3. the hidden host cannot be reached directly (a raw TCP connect fails);
4. when a host's link is cut, an observer notices within the availability TTL.

Skipped, with the reason, where network namespaces cannot be created; never
passed without running.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from netns_util import (
    MODELNET,
    CommandLog,
    NetnsUnavailable,
    Proc,
    Topology,
    clean_env,
    diagnosed,
    in_ns,
    stop_all,
    tcp_connect,
    topology,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

BOOT_PORT = 4001
TARGET = "modelnet_p2p.demo_models:ALL"
#: Besides "echo", which every peer host serves, each serves one model of its own.
PEER_MODELS = {1: "translate", 2: "arithmetic", 3: "topic-classifier"}
HIDDEN_MODEL = "summarize"
#: The mesh's hosts refresh availability every 2 s (netns_util.clean_env) and records live 3
#: refresh periods (each carries its TTL).
DEFAULT_TTL = 6.0
#: Allowed on top of the TTL: the table's sweep (0.5 s), and the age of a `status --watch` view
#: when printed (its table is read before a discovery lookup of up to 5 s) plus one refresh.
TTL_SLACK = 14.0
LIVE_STATES = {"joining", "ready", "draining"}


@dataclass
class Mesh(CommandLog):
    topo: Topology
    cwd: Any
    procs: list[Proc] = field(default_factory=list)
    ready: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The last complete ``discover`` from p1, rows by peer id.
    discovered: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def boot_id(self) -> str:
        return str(self.ready["boot"]["peer_id"])

    @property
    def boot_addr(self) -> str:
        """The one bootstrap address every peer is given."""
        return f"/ip4/{self.topo.boot_ip}/tcp/{BOOT_PORT}/p2p/{self.boot_id}"

    def peer_id(self, name: str) -> str:
        return str(self.ready[name]["peer_id"])

    def start(self, name: str, ns: str, *args: str) -> Proc:
        proc = Proc(name, ns, args, cwd=self.cwd)
        self.procs.append(proc)
        return proc

    def processes(self) -> list[Proc]:
        return self.procs


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    cwd = tmp_path_factory.mktemp("netns")
    with contextlib.ExitStack() as stack:
        try:
            topo = stack.enter_context(topology(peers=len(PEER_MODELS)))
        except NetnsUnavailable as exc:
            pytest.skip(f"network namespaces not permitted: {exc}")
        m = Mesh(topo, cwd)
        stack.callback(stop_all, m.procs)  # before the namespaces go
        try:
            _start(m)
        except BaseException:
            print(m.diagnostics())
            raise
        yield m


def _start(m: Mesh) -> None:
    """Start the bootstrap node and the four serving peers; wait until each is ready."""
    topo = m.topo
    boot = m.start(
        "boot",
        topo.boot_ns,
        "bootstrap",
        "--json",
        "--exit-on-stdin-eof",
        "--listen",
        f"/ip4/{topo.boot_ip}/tcp/{BOOT_PORT}",
        "--listen",
        f"/ip4/{topo.boot_hidden_ip}/tcp/{BOOT_PORT}",
    )
    m.ready["boot"] = boot.event(timeout=30)
    for i, model in PEER_MODELS.items():
        m.start(
            f"p{i}",
            topo.peer_ns(i),
            "serve",
            TARGET,
            "--only",
            "echo",
            "--only",
            model,
            "--json",
            "--exit-on-stdin-eof",
            "--listen",
            f"/ip4/{topo.peer_ip(i)}/tcp/0",
            "--bootstrap",
            m.boot_addr,
        )
    # The same bootstrap address as everyone (a host behind NAT dials the public one):
    # it is a local address of the bootstrap host, so no forwarding is needed to reach it.
    m.start(
        "hidden",
        topo.hidden_ns,
        "serve",
        TARGET,
        "--only",
        HIDDEN_MODEL,
        "--json",
        "--exit-on-stdin-eof",
        "--reachability",
        "private",
        "--listen",
        f"/ip4/{topo.hidden_ip}/tcp/0",
        "--bootstrap",
        m.boot_addr,
    )
    for proc in m.procs[1:]:
        event = proc.event(timeout=45)
        assert event.get("event") == "ready", f"{proc.name}: {event}"
        m.ready[proc.name] = event
    circuits = [a for a in m.ready["hidden"]["addrs"] if "/p2p-circuit/" in a]
    assert circuits, f"the hidden host holds no relay slot: {m.ready['hidden']}"


def discover_all(mesh: Mesh, want: set[str], deadline_s: float = 40) -> dict[str, list[dict[str, Any]]]:
    """Run ``modelnet discover`` from host p1 until it finds every peer in ``want``; rows by peer."""
    if want <= set(mesh.discovered):
        return mesh.discovered
    deadline = time.monotonic() + deadline_s
    while True:
        data = mesh.run_json(
            mesh.topo.peer_ns(1), "discover", "--tag", "example", "--bootstrap", mesh.boot_addr, "--json"
        )
        rows: dict[str, list[dict[str, Any]]] = {}
        for row in data["capabilities"]:
            rows.setdefault(row["peer_id"], []).append(row)
        if want <= set(rows):
            mesh.discovered = rows
        if want <= set(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


@diagnosed
def test_peers_discover_each_other_through_the_bootstrap_alone(mesh: Mesh) -> None:
    names = [*(f"p{i}" for i in PEER_MODELS), "hidden"]
    want = {mesh.peer_id(n): n for n in names}
    rows = discover_all(mesh, set(want))
    missing = [want[p] for p in want if p not in rows]
    assert not missing, f"not discovered from p1: {missing}; found {sorted(rows)}"
    assert mesh.boot_id not in rows  # the bootstrap node serves no model
    for i, model in PEER_MODELS.items():
        found = rows[mesh.peer_id(f"p{i}")]
        assert {r["capability"] for r in found} == {"echo", model}
        assert any(a.startswith(f"/ip4/{mesh.topo.peer_ip(i)}/tcp/") for a in found[0]["addrs"])
    hidden = rows[mesh.peer_id("hidden")]
    assert {r["capability"] for r in hidden} == {HIDDEN_MODEL}
    relayed = f"/p2p/{mesh.boot_id}/p2p-circuit/p2p/{mesh.peer_id('hidden')}"
    assert any(a.endswith(relayed) for a in hidden[0]["addrs"]), hidden[0]["addrs"]


@diagnosed
def test_hidden_host_is_not_directly_reachable(mesh: Mesh) -> None:
    hidden = next(a for a in mesh.ready["hidden"]["addrs"] if a.startswith(f"/ip4/{mesh.topo.hidden_ip}/"))
    port = int(hidden.split("/")[4])
    # It listens: the bootstrap host, its only neighbour, connects ...
    ok, why, _ = tcp_connect(mesh.topo.boot_ns, mesh.topo.hidden_ip, port)
    assert ok, f"the bootstrap host cannot reach the hidden host's listener: {why}"
    # ... but a peer host cannot, although its default route points at the bootstrap host.
    # And the hidden host reaches only the bootstrap host. All attempts at once.
    p1_port = int(mesh.ready["p1"]["addrs"][0].split("/")[4])
    attempts = {f"p{i}": (mesh.topo.peer_ns(i), mesh.topo.hidden_ip, port) for i in PEER_MODELS}
    attempts["hidden"] = (mesh.topo.hidden_ns, mesh.topo.peer_ip(1), p1_port)
    with ThreadPoolExecutor(len(attempts)) as pool:
        futures = {name: pool.submit(tcp_connect, *args, timeout=2) for name, args in attempts.items()}
        results = {name: f.result() for name, f in futures.items()}
    for name, (ok, why, took) in results.items():
        _, host, port_ = attempts[name]
        mesh.notes.append(f"{name} -> {host}:{port_}: {why} ({took:.1f} s)")
        assert not ok, f"{name} connected directly to {host}:{port_}"
        assert took < 10, f"the connect attempt from {name} took {took:.1f} s"


@diagnosed
def test_calls_reach_every_host(mesh: Mesh) -> None:
    """From p1: each peer host's own model, routed by capability; the hidden host at its relayed address."""
    rows = discover_all(mesh, {mesh.peer_id("hidden")})
    hidden_rows = rows.get(mesh.peer_id("hidden"))
    assert hidden_rows, "the hidden host was not discovered"
    circuit = next(a for a in hidden_rows[0]["addrs"] if "/p2p-circuit/" in a)
    asks: dict[str, tuple[list[str], Callable[[dict[str, Any]], bool], str]] = {
        "translate": (
            ["translate", "hello world", "-p", "to=es"],
            lambda d: d["text"] == "hola mundo ",
            "p1",
        ),
        "arithmetic": (["arithmetic", "2 plus 3"], lambda d: d["text"] == "5", "p2"),
        "topic-classifier": (
            ["topic-classifier", "translate this to french"],
            lambda d: d["chunks"][0]["label"] == "translation",
            "p3",
        ),
        "summarize": (
            ["summarize", "First sentence. Second.", "--peer", circuit],
            lambda d: d["text"] == "First sentence. ",
            "hidden",
        ),
    }
    ns = mesh.topo.peer_ns(1)
    procs = {
        name: subprocess.Popen(
            in_ns(ns, *MODELNET, "ask", *args, "--bootstrap", mesh.boot_addr, "--json"),
            cwd=mesh.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for name, (args, _, _) in asks.items()
    }
    started = time.monotonic()
    outcomes = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        mesh.notes.append(
            f"$ modelnet ask {' '.join(asks[name][0])}  [in {ns}, exit {proc.returncode}, "
            f"done after {time.monotonic() - started:.1f} s]\n{out}{err}"
        )
        outcomes[name] = (proc.returncode, out, err)
    for name, (_, check, host) in asks.items():
        code, out, err = outcomes[name]
        assert code == 0, f"ask {name} failed: {err.strip()}"
        answer = json.loads(out)
        assert check(answer), f"ask {name}: unexpected answer {answer}"
        assert answer["peer"] == mesh.peer_id(host), f"ask {name} answered by {answer['peer']}, not {host}"
    print("\n".join(n.partition("\n")[0] for n in mesh.notes if n.startswith("$ modelnet ask")))  # -rP
    # Every host serves echo; any of them may answer.
    echo = mesh.run_json(ns, "ask", "echo", "one two three", "--bootstrap", mesh.boot_addr, "--json")
    assert echo["text"] == "one two three "
    assert echo["peer"] in {mesh.peer_id(f"p{i}") for i in PEER_MODELS}


@diagnosed
def test_routed_call_reaches_the_relayed_host(mesh: Mesh) -> None:
    """``ask summarize`` given only the bootstrap address: the mesh finds and dials the hidden host."""
    discover_all(mesh, {mesh.peer_id("hidden")})  # its card is in the DHT by now
    answer = mesh.run_json(
        mesh.topo.peer_ns(1),
        "ask",
        HIDDEN_MODEL,
        "First sentence. Second.",
        "--bootstrap",
        mesh.boot_addr,
        "--json",
        "--timeout",
        "20",
    )
    assert answer["peer"] == mesh.peer_id("hidden")
    assert answer["text"] == "First sentence. "


# -- link cut ------------------------------------------------------------------


def live_peers(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of a ``modelnet status --json`` view that gossip shows alive, by peer id.

    A peer known only from its capability card (no live availability entry) has
    state ``unknown``; a peer whose entry expired is not listed at all.
    """
    return {
        row["peer_id"]: row
        for row in view["peers"]
        if row.get("state") in LIVE_STATES and row.get("availability") is not None
    }


class StatusWatch:
    """``modelnet status --watch --json`` running on one host: a JSON view every refresh."""

    def __init__(self, mesh: Mesh, ns: str) -> None:
        # Only the state matters here: no pings (a ping of a cut-off peer waits for its timeout).
        self.proc = mesh.start(
            "status-watch",
            ns,
            "status",
            "--watch",
            "--json",
            "--no-ping",
            "--interval",
            "0.5",
            "--bootstrap",
            mesh.boot_addr,
        )

    def views(self, deadline: float) -> Iterator[tuple[float, dict[str, Any]]]:
        """(time printed, view) until ``deadline`` (``time.monotonic()``)."""
        for view in self.proc.events_until(deadline):
            yield time.monotonic(), view
        if self.proc.proc.poll() is not None:
            raise AssertionError(f"modelnet status --watch exited\n{self.proc.logs()}")


@diagnosed
def test_cut_link_is_noticed_within_the_ttl(mesh: Mesh) -> None:
    watch = StatusWatch(mesh, mesh.topo.peer_ns(1))
    p3 = mesh.peer_id("p3")
    others = {mesh.peer_id("p1"), mesh.peer_id("p2")}
    # First every peer host is seen alive, p3 included (else its absence would prove nothing).
    ttl = DEFAULT_TTL
    seen: dict[str, dict[str, Any]] = {}
    for _, view in watch.views(time.monotonic() + 30):
        seen = live_peers(view)
        if {p3, *others} <= set(seen):
            ttl = seen[p3]["availability"]["ttl_s"]
            break
    else:
        pytest.fail(f"the observer never saw p1, p2 and p3 alive; last saw {sorted(seen)}")

    mesh.topo.cut(3)
    cut_at = time.monotonic()
    limit = ttl + TTL_SLACK
    gone_after = None
    for at, view in watch.views(cut_at + limit + 5):
        seen = live_peers(view)
        row = next((r for r in view["peers"] if r["peer_id"] == p3), None)
        mesh.notes.append(
            f"view {at - cut_at:+.1f} s after the cut: p3 "
            + (f"state {row.get('state')}, age {row.get('age_s')} s" if row else "absent")
        )
        if p3 not in seen:
            gone_after = at - cut_at
            break
    mesh.notes.append(f"p3 cut off; noticed after {gone_after} s (TTL {ttl} s, limit {limit} s)")
    print("\n".join(n for n in mesh.notes if n.startswith(("view", "p3 cut"))))  # shown with -rP
    assert gone_after is not None, f"p3 still shown alive {limit + 5:.0f} s after its link was cut"
    assert gone_after <= limit, f"p3's loss noticed after {gone_after:.1f} s (TTL {ttl} s)"
    # The others, still connected, stay alive in the same view.
    assert others <= set(seen), f"live peers after the cut: {sorted(seen)}"
