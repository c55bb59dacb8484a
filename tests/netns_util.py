"""Linux network namespaces for the multi-host tests: the topology of ``test_netns.py``, and
what ``test_wan.py``'s own topology shares with it (namespaces made and removed, processes,
commands run and noted, diagnostics on failure).

A small, self-contained topology; nothing is created in the root namespace
(every link is made with ``ip -n NS``), and only addresses in 10.77.0.0/16 are
used::

    ns-p1 [v 10.77.0.11] ──┐
    ns-p2 [v 10.77.0.12] ──┤  ns-br: br0 (a bridge)
    ns-p3 [v 10.77.0.13] ──┤
    ns-boot [v 10.77.0.1] ─┘
    ns-boot [h 10.77.1.1] ──── [v 10.77.1.2] ns-hidden

ns-boot does not forward (``net.ipv4.ip_forward=0``), so although every host has
a default route through ns-boot, ns-hidden can reach only ns-boot's own
addresses, and nobody can reach ns-hidden except ns-boot.

Processes run with ``ip netns exec NS ...`` in their own session, with a
reader thread per output pipe, so every wait has a real timeout and a chatty
stderr never blocks a child.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import pytest

IP = "ip"
PREFIX = "mnnt"  # every namespace of this module is named mnnt<pid>-<role>
MODELNET = [sys.executable, "-m", "modelnet_p2p.cli"]
SUBNET = "10.77.0"
HIDDEN_SUBNET = "10.77.1"


class NetnsUnavailable(Exception):
    """Network namespaces cannot be created here (the reason is the message)."""


def ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def in_ns(ns: str, *cmd: str) -> list[str]:
    return [IP, "netns", "exec", ns, *cmd]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _delete_ns(ns: str) -> list[str]:
    """Kill what still runs in ``ns`` (all started by this module), then delete it."""
    problems = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)
    # Deleting a namespace destroys its interfaces, and with them their veth peers.
    result = ip("netns", "del", ns, check=False)
    if result.returncode != 0 and ns in list_namespaces():
        problems.append(f"cannot delete {ns}: {result.stderr.strip()}")
    return problems


def delete_namespaces(created: list[str]) -> list[str]:
    """Delete the namespaces in ``created``, the last first, and empty it; return what could not be."""
    problems: list[str] = []
    for ns in reversed(created):
        try:
            problems += _delete_ns(ns)
        except Exception as exc:  # keep deleting the others
            problems.append(f"{ns}: {exc}")
    created.clear()
    return problems


def add_first_namespace(ns: str) -> None:
    """Create the first namespace of a topology; raise :class:`NetnsUnavailable` if not permitted."""
    if not sys.platform.startswith("linux"):
        raise NetnsUnavailable(f"network namespaces need Linux, this is {sys.platform}")
    try:
        first = subprocess.run([IP, "netns", "add", ns], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise NetnsUnavailable("the 'ip' command (iproute2) is not installed")
    if first.returncode != 0:
        raise NetnsUnavailable(first.stderr.strip() or f"ip netns add exited {first.returncode}")


def list_namespaces() -> list[str]:
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def remove_stale_namespaces() -> None:
    """Delete namespaces this module left behind in runs whose process is gone (SIGKILL, power loss)."""
    for ns in list_namespaces():
        if not ns.startswith(PREFIX):
            continue
        pid_text = ns[len(PREFIX) :].partition("-")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            _delete_ns(ns)


@dataclass
class Topology:
    """The namespaces, links and addresses of one test run."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    peers: int = 3
    created: list[str] = field(default_factory=list)

    # -- names and addresses ----------------------------------------------------

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    @property
    def bridge_ns(self) -> str:
        return self.ns("br")

    @property
    def boot_ns(self) -> str:
        return self.ns("boot")

    @property
    def hidden_ns(self) -> str:
        return self.ns("hidden")

    def peer_ns(self, i: int) -> str:
        """Namespace of peer host ``i`` (1-based)."""
        return self.ns(f"p{i}")

    boot_ip = f"{SUBNET}.1"
    boot_hidden_ip = f"{HIDDEN_SUBNET}.1"
    hidden_ip = f"{HIDDEN_SUBNET}.2"

    @staticmethod
    def peer_ip(i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    #: The interface of every bridged host (each lives in its own namespace).
    LAN_IF = "lan0"

    # -- life cycle --------------------------------------------------------------

    def up(self) -> None:
        """Create everything; raise :class:`NetnsUnavailable` if namespaces are not permitted."""
        add_first_namespace(self.bridge_ns)
        self.created.append(self.bridge_ns)
        hosts = [self.boot_ns, *(self.peer_ns(i) for i in range(1, self.peers + 1)), self.hidden_ns]
        for ns in hosts:
            ip("netns", "add", ns)
            self.created.append(ns)
        for ns in [self.bridge_ns, *hosts]:
            ip("-n", ns, "link", "set", "lo", "up")

        br = self.bridge_ns
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "link", "set", "br0", "up")
        lan = [(self.boot_ns, self.boot_ip, "pboot")] + [
            (self.peer_ns(i), self.peer_ip(i), f"pp{i}") for i in range(1, self.peers + 1)
        ]
        for ns, addr, port in lan:
            # Created inside the bridge namespace, one end then moved into the host's.
            ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", self.LAN_IF, "netns", ns)
            ip("-n", br, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.LAN_IF)
            ip("-n", ns, "link", "set", self.LAN_IF, "up")
        for i in range(1, self.peers + 1):
            ip("-n", self.peer_ns(i), "route", "add", "default", "via", self.boot_ip)

        # The hidden host's only link goes to the bootstrap host.
        ip("-n", self.boot_ns, "link", "add", "hid0", "type", "veth", "peer", "name", "up0",
           "netns", self.hidden_ns)  # fmt: skip
        ip("-n", self.boot_ns, "addr", "add", f"{self.boot_hidden_ip}/24", "dev", "hid0")
        ip("-n", self.boot_ns, "link", "set", "hid0", "up")
        ip("-n", self.hidden_ns, "addr", "add", f"{self.hidden_ip}/24", "dev", "up0")
        ip("-n", self.hidden_ns, "link", "set", "up0", "up")
        ip("-n", self.hidden_ns, "route", "add", "default", "via", self.boot_hidden_ip)
        # No forwarding in the bootstrap host: it is the only host that can reach ns-hidden.
        subprocess.run(
            in_ns(self.boot_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv4.conf.all.forwarding=0"),
            check=True,
            capture_output=True,
            timeout=10,
        )
        forwarding = subprocess.run(
            in_ns(self.boot_ns, "cat", "/proc/sys/net/ipv4/ip_forward"),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if forwarding != "0":
            raise RuntimeError(f"could not turn forwarding off in {self.boot_ns}: {forwarding!r}")

    def down(self) -> list[str]:
        """Delete every namespace (and so every link and the bridge); return what could not be."""
        return delete_namespaces(self.created)

    def cut(self, i: int) -> None:
        """Take peer host ``i``'s only link down (its process keeps running, now cut off)."""
        ip("-n", self.peer_ns(i), "link", "set", self.LAN_IF, "down")


class Namespaces(Protocol):
    """A topology of namespaces: each named ``<tag>-<role>``."""

    tag: str

    def up(self) -> None: ...

    def down(self) -> list[str]: ...


N = TypeVar("N", bound=Namespaces)


@contextlib.contextmanager
def built(topo: N) -> Iterator[N]:
    """Create ``topo``; always remove it, even when creating it half failed."""
    have_ip = shutil.which(IP) is not None  # without it, topo.up() says why (NetnsUnavailable)
    if have_ip:
        remove_stale_namespaces()
    failed = False
    try:
        topo.up()
        yield topo
    except BaseException:
        failed = True
        raise
    finally:
        problems = topo.down()
        listed = list_namespaces() if have_ip else []
        left = [ns for ns in listed if ns.startswith(topo.tag + "-")]
        if problems or left:
            message = f"namespaces left behind: {left} {problems}"
            if not failed:
                raise RuntimeError(message)
            print(message)  # do not hide the error already on its way


def topology(peers: int = 3) -> contextlib.AbstractContextManager[Topology]:
    """The topology of the module docstring with ``peers`` peer hosts (see :func:`built`)."""
    return built(Topology(peers=peers))


# -- processes ------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELNET_")}
    env["PYTHONUNBUFFERED"] = "1"
    # A 2 s availability refresh (TTL 6 s) instead of the 30 s default: the link-cut test
    # waits for a TTL to pass.
    env["MODELNET_PUBLISH_INTERVAL"] = "2"
    env.update(extra)
    return env


class Proc:
    """A long-running ``modelnet`` process inside a namespace."""

    def __init__(
        self, name: str, ns: str, args: Sequence[str], cwd: Any = None, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.ns = ns
        self.args = list(args)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            in_ns(ns, *MODELNET, *args),
            cwd=cwd,
            env=clean_env() if env is None else env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout_log: list[str] = []
        self.stderr_log: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, pipe: Any, is_stdout: bool) -> None:
        try:
            for line in pipe:
                if is_stdout:
                    self.stdout_log.append(line)
                    self.lines.put(line)
                else:
                    self.stderr_log.append(line)
        except (OSError, ValueError):
            pass
        finally:
            if is_stdout:
                self.lines.put(None)

    def event(self, timeout: float) -> dict[str, Any]:
        """The next JSON object the process prints on stdout (one per line)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no JSON event within {timeout:.0f} s\n{self.logs()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.lines.put(None)  # stay at end of file for later calls
                raise AssertionError(
                    f"{self.name}: exited (code {self.proc.poll()}) before the next event\n{self.logs()}"
                )
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)  # type: ignore[no-any-return]
                except json.JSONDecodeError:
                    continue

    def events_until(self, deadline: float) -> Iterator[dict[str, Any]]:
        """JSON objects as they are printed, until ``deadline`` (``time.monotonic()``) or the end."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return
            if line is None:
                self.lines.put(None)
                return
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    yield json.loads(line)

    def logs(self, tail: int = 60) -> str:
        err = "".join(self.stderr_log[-tail:])
        out = "".join(self.stdout_log[-tail:])
        return (
            f"--- {self.name} in {self.ns} (pid {self.proc.pid}, code {self.proc.poll()}): "
            f"modelnet {' '.join(self.args)}\n"
            f"stdout (last {tail} lines):\n{out}stderr (last {tail} lines):\n{err}"
        )

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def stop_all(procs: Sequence[Proc], grace: float = 5.0) -> None:
    """Stop every process: close stdin and SIGINT at once, SIGKILL whatever is left after ``grace``."""
    for p in procs:
        p.close_stdin()
        p.signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.proc.poll() is None:
            p.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(5)
        for t in p._threads:
            t.join(2)
        for f in (p.proc.stdout, p.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def run_in(ns: str, *args: str, timeout: float = 30, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    """Run ``modelnet ARGS`` to completion inside ``ns``."""
    return subprocess.run(
        in_ns(ns, *MODELNET, *args),
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class CommandLog:
    """What the meshes of the namespace tests share: ``modelnet`` commands run in a namespace
    with their outcome noted, and the notes and every process's output printed when a test
    fails (:func:`diagnosed`). A subclass gives ``cwd``, ``notes`` and :meth:`processes`."""

    cwd: Any
    notes: list[str]
    #: Seconds a command may take unless told.
    run_timeout: ClassVar[float] = 45

    def namespace(self, where: str) -> str:
        """The namespace of the host named ``where`` (here, ``where`` is the namespace)."""
        return where

    def processes(self) -> Iterable[Proc]:
        raise NotImplementedError

    def run(self, where: str, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """``modelnet ARGS`` in host ``where``; the outcome is kept for the diagnostics."""
        timeout = self.run_timeout if timeout is None else timeout
        started = time.monotonic()
        try:
            result = run_in(self.namespace(where), *args, timeout=timeout, cwd=self.cwd)
        except subprocess.TimeoutExpired as exc:
            self.notes.append(f"$ modelnet {' '.join(args)}  [in {where}]: timed out after {timeout} s")
            raise AssertionError(f"modelnet {' '.join(args)} in {where} timed out after {timeout} s") from exc
        self.notes.append(
            f"$ modelnet {' '.join(args)}  [in {where}, {time.monotonic() - started:.1f} s, "
            f"exit {result.returncode}]\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
        return result

    def run_json(self, where: str, *args: str, timeout: float | None = None) -> dict[str, Any]:
        """:meth:`run`, which must succeed and print one JSON object."""
        result = self.run(where, *args, timeout=timeout)
        assert result.returncode == 0, (
            f"modelnet {' '.join(args)} in {where} failed: {result.stderr.strip()[-2000:]}"
        )
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def diagnostics(self) -> str:
        parts = ["=== commands ===", *self.notes[-30:], "=== processes ==="]
        parts += [p.logs() for p in self.processes()]
        return "\n".join(parts)


def diagnosed(test: Callable[..., None]) -> Callable[..., None]:
    """On failure, print the mesh's diagnostics (every process's output and the commands run;
    pytest shows them). The test takes the mesh (a :class:`CommandLog`) first."""

    @functools.wraps(test)
    def wrapper(mesh: CommandLog, *args: Any, **kwargs: Any) -> None:
        try:
            test(mesh, *args, **kwargs)
        except BaseException as exc:
            if not isinstance(exc, pytest.skip.Exception):
                print(mesh.diagnostics())
            raise

    return wrapper


def tcp_connect(ns: str, host: str, port: int, timeout: float = 2.0) -> tuple[bool, str, float]:
    """Try a raw TCP connection from inside ``ns``: (connected, error text, seconds taken)."""
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print(f'{type(exc).__name__}: {exc}')\n"
    )
    started = time.monotonic()
    out = subprocess.run(
        in_ns(ns, sys.executable, "-c", code), capture_output=True, text=True, timeout=timeout + 10
    )
    took = time.monotonic() - started
    text = (out.stdout + out.stderr).strip()
    return text == "connected", text, took
