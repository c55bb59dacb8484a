"""Point-to-point links with delay and loss, emulated in user space over TUN devices.

Used by ``test_wan.py`` where the kernel has no ``sch_netem`` (``tc qdisc add ... netem``
answers "Specified qdisc kind is unknown"). Each link is a pair of TUN devices: one moved into
a host's namespace, the other into the router's. This process copies every IP packet from one
end to the other after ``delay`` milliseconds (uniform in ``[delay - jitter, delay + jitter]``,
never reordering a direction's packets) and drops ``loss`` per cent of them, the way
``netem delay D J loss L`` would on each direction.

Run as ``python tests/wan_wire.py SPEC_JSON``; the JSON is a list of links::

    [{"name": "w1", "a_ns": "...", "a_if": "wan0", "b_ns": "", "b_if": "h1",
      "delay_ms": 60, "jitter_ms": 20, "loss_pct": 1.0}, ...]

An empty namespace name leaves that end in the namespace this process runs in. It prints
``{"ready": true}`` once every device is in its namespace, then runs until stdin
closes. Lines on stdin change a link: ``{"name": "w1", "loss_pct": 100}`` (cut it off) or any
of the fields above. Only packets are handled here; addresses and routes are set by the test.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MTU = 1500
#: Packets held per direction at most (a bound, like netem's default limit of 1000).
QUEUE_LIMIT = 1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Direction:
    def __init__(self, link: dict[str, Any], src: int, dst: int) -> None:
        self.link = link
        self.src = src
        self.dst = dst
        self.last_due = 0.0
        self.queued = 0


def main() -> None:
    links: list[dict[str, Any]] = json.loads(sys.argv[1])
    by_name = {link["name"]: link for link in links}
    directions: dict[int, Direction] = {}
    for link in links:
        # Unique temporary names in this (the test's) namespace, then moved and renamed.
        tmp_a, tmp_b = f"{link['name']}a", f"{link['name']}b"
        fa, fb = open_tun(tmp_a), open_tun(tmp_b)
        for tmp, ns, final in ((tmp_a, link["a_ns"], link["a_if"]), (tmp_b, link["b_ns"], link["b_if"])):
            if ns:
                ip("link", "set", tmp, "netns", ns)
                ip("-n", ns, "link", "set", tmp, "name", final, "mtu", str(MTU))
            else:  # this process's own namespace
                ip("link", "set", tmp, "name", final, "mtu", str(MTU))
        directions[fa] = Direction(link, fa, fb)
        directions[fb] = Direction(link, fb, fa)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()

    heap: list[tuple[float, int, int, bytes]] = []  # (due, seq, direction's source fd, packet)
    seq = 0
    stdin = sys.stdin.fileno()
    watch = [stdin, *directions]
    buffer = b""
    while True:
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else 1.0
        ready, _, _ = select.select(watch, [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == stdin:
                data = os.read(stdin, 4096)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if line.strip():
                        change = json.loads(line)
                        by_name[change.pop("name")].update(change)
                continue
            d = directions[fd]
            while True:
                try:
                    packet = os.read(fd, MTU + 64)
                except BlockingIOError:
                    break
                link = d.link
                if random.random() * 100 < float(link.get("loss_pct", 0)) or d.queued >= QUEUE_LIMIT:
                    continue
                jitter = float(link.get("jitter_ms", 0))
                delay = float(link.get("delay_ms", 0)) + random.uniform(-jitter, jitter)
                due = max(now + max(0.0, delay) / 1000, d.last_due)  # no reordering
                d.last_due = due
                d.queued += 1
                seq += 1
                heapq.heappush(heap, (due, seq, fd, packet))
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, fd, packet = heapq.heappop(heap)
            d = directions[fd]
            d.queued -= 1
            try:
                os.write(d.dst, packet)
            except OSError:
                pass  # the far end is down (link cut with `ip link set down`): dropped


if __name__ == "__main__":
    main()
