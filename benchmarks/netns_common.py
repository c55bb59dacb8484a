"""Network namespaces for benchmarks: host namespaces around one router, with delay.

A star of ``hosts`` namespaces, each linked to one router namespace::

    <tag>-h1 [wan0 10.81.1.2] ── delay ──┐
    <tag>-h2 [wan0 10.81.2.2] ── delay ──┤  <tag>-rt (forwards; 10.81.K.1 on link K)
    ...                                  │
    <tag>-hM [wan0 10.81.M.2] ── delay ──┘

Every packet a host sends towards the router waits ``delay_ms`` (nothing is added on the way
back), so a packet from one host to another takes ``delay_ms`` one way and a round trip
between two hosts takes ``2 * delay_ms``. Within one namespace (e.g. two peers of the same
worker) there is no delay.

The delay is that of ``tc qdisc add dev wan0 root netem delay <delay_ms>ms`` on each host's
link, but the kernels this project runs on may have no ``sch_netem``, so each link is a pair
of TUN devices (``wan0`` in the host, ``lK`` in the router) served by :func:`wire`, a small
user-space forwarder running in the router namespace (``python netns_common.py wire ...``).
Addresses, routes and forwarding are the kernel's own. Nothing is created in the caller's
namespace, and only 10.81.0.0/16 is used.

Every namespace is named ``mnbn<pid>-<role>`` after the process that made it, so a run that
was killed leaves names that the next run recognises and deletes (:func:`remove_stale`).

This repeats, in a smaller form, what ``tests/netns_util.py`` does for the tests (benchmarks do
not import from ``tests/``); the two can be merged later.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

IP = "ip"
PREFIX = "mnbn"
SUBNET = "10.81"
HOST_IF = "wan0"
#: Packets one direction of one link may hold while they wait (netem's default limit is 1000).
QUEUE_LIMIT = 4000
#: Seconds the forwarder gets to create its devices.
WIRE_START_LIMIT = 20.0

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


class NetnsUnavailable(Exception):
    """Network namespaces (or TUN devices) cannot be used here; the message says why."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise ``RuntimeError`` with its stderr if it fails and ``check``."""
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=15)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()} ({done.returncode})")
    return done


def in_ns(ns: str, cmd: Sequence[str]) -> list[str]:
    """``cmd`` run inside namespace ``ns`` (``ip netns exec`` executes it in place: same pid)."""
    return [IP, "netns", "exec", ns, *cmd]


def namespaces() -> list[str]:
    """The names of every network namespace of the machine."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(ns: str) -> str | None:
    """Kill what still runs in ``ns`` (TERM, then KILL), delete it; an error text, or None."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(map(_alive, pids)):
            time.sleep(0.05)
    done = ip("netns", "del", ns, check=False)
    if done.returncode != 0 and ns in namespaces():
        return f"cannot delete {ns}: {done.stderr.strip()}"
    return None


def remove_stale() -> list[str]:
    """Delete the namespaces of this module whose creating process is gone; their names."""
    removed = []
    for ns in namespaces():
        pid = ns[len(PREFIX) :].partition("-")[0]
        if ns.startswith(PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            delete_namespace(ns)
            removed.append(ns)
    return removed


@dataclass
class Star:
    """``hosts`` host namespaces around a router namespace (see the module docstring)."""

    hosts: int
    delay_ms: float
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    created: list[str] = field(default_factory=list)
    wire_proc: subprocess.Popen[str] | None = None

    @property
    def router(self) -> str:
        return f"{self.tag}-rt"

    def host(self, k: int) -> str:
        """The namespace of host ``k`` (1-based)."""
        return f"{self.tag}-h{k}"

    @staticmethod
    def addr(k: int) -> str:
        """Host ``k``'s address."""
        return f"{SUBNET}.{k}.2"

    def up(self) -> None:
        if not sys.platform.startswith("linux"):
            raise NetnsUnavailable(f"network namespaces need Linux, this is {sys.platform}")
        if not os.path.exists("/dev/net/tun"):
            raise NetnsUnavailable("no /dev/net/tun")
        try:
            first = subprocess.run([IP, "netns", "add", self.router], capture_output=True, text=True)
        except FileNotFoundError:
            raise NetnsUnavailable("the 'ip' command (iproute2) is not installed") from None
        if first.returncode != 0:
            raise NetnsUnavailable(first.stderr.strip() or f"ip netns add: {first.returncode}")
        self.created.append(self.router)
        for k in range(1, self.hosts + 1):
            ip("netns", "add", self.host(k))
            self.created.append(self.host(k))
        for ns in self.created:
            ip("-n", ns, "link", "set", "lo", "up")
            # IPv4 only: no router solicitations or neighbour discovery on the links.
            sysctl = [
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
            subprocess.run(in_ns(ns, sysctl), check=True, timeout=15)
        subprocess.run(in_ns(self.router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]), check=True, timeout=15)
        cmd = [sys.executable, os.path.abspath(__file__), "wire", str(self.delay_ms / 1000)]
        cmd += [self.host(k) for k in range(1, self.hosts + 1)]
        self.wire_proc = subprocess.Popen(
            in_ns(self.router, cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        ready = self.wire_request(WIRE_START_LIMIT, send=False)
        if not ready.get("ready"):
            raise RuntimeError(f"the forwarder did not start: {ready}")
        for k in range(1, self.hosts + 1):
            ns, net = self.host(k), f"{SUBNET}.{k}"
            ip("-n", self.router, "addr", "add", f"{net}.1/24", "dev", f"l{k}")
            ip("-n", self.router, "link", "set", f"l{k}", "up")
            ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", HOST_IF)
            ip("-n", ns, "link", "set", HOST_IF, "up")
            ip("-n", ns, "route", "add", "default", "via", f"{net}.1")

    def wire_request(self, timeout: float = 10.0, send: bool = True) -> dict[str, Any]:
        """The forwarder's counters (``packets``, ``dropped``, ``cpu_s``): one line each way."""
        proc = self.wire_proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            return {}
        if send:
            proc.stdin.write("stats\n")
            proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        return json.loads(line) if line.strip() else {"error": f"no answer (exit {proc.poll()})"}

    def rtt_ms(self, a: int, b: int, samples: int = 5) -> list[float]:
        """TCP round trips of one byte from host ``a`` to an echo on host ``b``, in ms."""
        echo = (
            "import socket\n"
            f"s = socket.create_server(({self.addr(b)!r}, 0))\n"
            "print(s.getsockname()[1], flush=True)\n"
            "c, _ = s.accept()\n"
            "while data := c.recv(64):\n"
            "    c.sendall(data)\n"
        )
        ping = (
            "import socket, sys, time\n"
            f"c = socket.create_connection(({self.addr(b)!r}, int(sys.argv[1])), timeout=5)\n"
            "c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
            f"for _ in range({samples}):\n"
            "    t = time.monotonic()\n"
            "    c.sendall(b'x')\n"
            "    c.recv(64)\n"
            "    print((time.monotonic() - t) * 1000)\n"
        )
        server = subprocess.Popen(
            in_ns(self.host(b), [sys.executable, "-c", echo]), stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = server.stdout.readline().strip()
            done = subprocess.run(
                in_ns(self.host(a), [sys.executable, "-c", ping, port]),
                capture_output=True,
                text=True,
                timeout=30,
            )
            return [float(x) for x in done.stdout.split()]
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()

    def down(self) -> list[str]:
        """Stop the forwarder and delete every namespace; what could not be done."""
        problems = []
        proc, self.wire_proc = self.wire_proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in reversed(self.created):
            if (problem := delete_namespace(ns)) is not None:
                problems.append(problem)
        self.created.clear()
        left = [ns for ns in namespaces() if ns.startswith(self.tag + "-")]
        return problems + ([f"left behind: {left}"] if left else [])


@contextlib.contextmanager
def star(hosts: int, delay_ms: float) -> Iterator[Star]:
    """Create a :class:`Star`; remove it on the way out, also after an error or Ctrl-C."""
    remove_stale()
    topo = Star(hosts, delay_ms)
    try:
        topo.up()
        yield topo
    finally:
        for problem in topo.down():
            print(f"netns cleanup: {problem}", file=sys.stderr)


# -- the forwarder (runs in the router namespace) ------------------------------------------------


def open_tun(name: str) -> int:
    """A non-blocking fd of a new TUN device ``name`` (raw IP packets, no packet info)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def wire(delay_s: float, hosts: Sequence[str]) -> None:
    """Link host namespace ``hosts[K-1]`` to this one through TUN devices ``wan0`` there and ``lK``
    here; hold each packet from a host ``delay_s`` before passing it on. Print ``{"ready": true}``,
    then the counters for each line read from stdin; exit when stdin closes."""
    out_of: dict[int, tuple[int, float]] = {}  # fd read -> (fd written, delay)
    for k, ns in enumerate(hosts, 1):
        here, there = open_tun(f"l{k}"), open_tun(f"h{k}")
        subprocess.run([IP, "link", "set", f"h{k}", "netns", ns], check=True, timeout=15)
        subprocess.run([IP, "-n", ns, "link", "set", f"h{k}", "name", HOST_IF], check=True, timeout=15)
        out_of[there] = (here, delay_s)
        out_of[here] = (there, 0.0)
    poll = select.epoll()
    for fd in out_of:
        poll.register(fd, select.EPOLLIN)
    poll.register(sys.stdin.fileno(), select.EPOLLIN)
    waiting: list[tuple[float, int, int, bytes]] = []  # (due, seq, fd, packet): a heap
    queued = dict.fromkeys(out_of, 0)
    counts = {"packets": 0, "dropped": 0}
    seq = 0

    def send(fd: int, packet: bytes) -> None:
        try:
            os.write(fd, packet)
            counts["packets"] += 1
        except OSError:  # the device's queue is full, or it is going away
            counts["dropped"] += 1

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    while True:
        timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else -1.0
        for fd, _ in poll.poll(timeout):
            if fd == sys.stdin.fileno():
                if not os.read(fd, 4096):
                    return
                say({**counts, "queued": len(waiting), "cpu_s": round(time.process_time(), 2)})
                continue
            target, delay = out_of[fd]
            for _ in range(256):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not delay:
                    send(target, packet)
                elif queued[target] >= QUEUE_LIMIT:
                    counts["dropped"] += 1
                else:
                    seq += 1
                    queued[target] += 1
                    heapq.heappush(waiting, (time.monotonic() + delay, seq, target, packet))
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            _, _, target, packet = heapq.heappop(waiting)
            queued[target] -= 1
            send(target, packet)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "wire":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        wire(float(sys.argv[2]), sys.argv[3:])
