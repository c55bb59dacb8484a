"""Prometheus metrics of any peer, read from the peer's own counters at scrape time.

::

    registry = peer_registry(peer)          # a CollectorRegistry with a PeerCollector
    await peer.nursery.start(serve_metrics, registry, "127.0.0.1:9464")

or ``--metrics-listen HOST:PORT`` on ``modelnet serve``, ``bootstrap``, ``dashboard`` and
``gateway``. The series (all prefixed ``modelnet_``):

=============================================  =============================================
``inference_requests_total{capability,code}``  requests this peer served, by outcome (``ok``
                                               or the error code); counted when each ends
``inference_chunks_total{capability}``         chunks those requests sent
``inference_in_flight``                        requests being served now
``client_in_flight``                           requests this peer has sent, not yet answered
``discovery_lookups`` (summary)                capability lookups and their seconds
``discovery_requests_total``                   DHT requests sent
``gossip_records_accepted_total``              availability records accepted
``gossip_records_rejected_total{reason}``      ... and rejected, by reason
``gossip_known_peers``                         live entries in the availability table
``connections``                                open connections (``in_use``, ``protected``)
``connections_trimmed_total``                  connections the manager closed
``capabilities_served``                        capabilities this peer serves
=============================================  =============================================

Counting points: the collector reads :class:`~modelnet_p2p.p2p.connmgr.ConnStats`,
:class:`~modelnet_p2p.services.availability.table.TableStats`, the discovery service's
lookup counters and the router's in-flight figures when scraped; served requests are
counted by chaining the inference server's ``on_request_done`` callback (once per peer),
from the moment the peer's first registry (:func:`peer_registry`) is made.

The HTTP side is a small trio server (:func:`serve_metrics`) that answers ``GET /metrics``
and nothing else, so that a peer of the base install can be scraped (no starlette needed).
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from ..errors import ConfigError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..peer import Peer

__all__ = [
    "CONTENT_TYPE",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_HEAD",
    "PeerCollector",
    "RequestCounts",
    "peer_registry",
    "serve_metrics",
    "split_listen",
]

log = logging.getLogger(__name__)

#: The text exposition format that :func:`prometheus_client.generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Bytes of request line and headers read at most; a longer head gets 431.
MAX_REQUEST_HEAD = 8192
#: Scrapes served at once; more connections wait for a slot.
MAX_CONNECTIONS = 16
#: Seconds a client has to send its request head.
READ_TIMEOUT = 10.0
#: Distinct (capability, code) pairs counted; further pairs are counted under ``capability="other"``.
MAX_SERIES = 512


class RequestCounts:
    """Served requests and chunks by capability and outcome, fed by the inference server.

    :meth:`attach` chains itself before the server's existing ``on_request_done`` callback
    (the peer's load figures), so both keep working.
    """

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.chunks: Counter[str] = Counter()

    def on_request_done(
        self, capability: str, remote: str, seconds: float, chunks: int, error: str | None
    ) -> None:
        code = error or "ok"
        if (capability, code) not in self.requests and len(self.requests) >= MAX_SERIES:
            capability = "other"
        self.requests[(capability, code)] += 1
        if capability in self.chunks or len(self.chunks) < MAX_SERIES:
            self.chunks[capability] += chunks
        else:
            self.chunks["other"] += chunks

    def attach(self, server: Any) -> None:
        """Count ``server``'s requests (an :class:`~.services.inference.server.InferenceServer`)."""
        previous: Callable[[str, str, float, int, str | None], None] | None = server.on_request_done

        def done(capability: str, remote: str, seconds: float, chunks: int, error: str | None) -> None:
            self.on_request_done(capability, remote, seconds, chunks, error)
            if previous is not None:
                previous(capability, remote, seconds, chunks, error)

        server.on_request_done = done


#: The RequestCounts of each peer, so that two registries of one peer count once.
_COUNTS: weakref.WeakKeyDictionary[Any, RequestCounts] = weakref.WeakKeyDictionary()


def request_counts(peer: Peer) -> RequestCounts:
    """The :class:`RequestCounts` of ``peer``, attached to its inference server on first use."""
    counts = _COUNTS.get(peer.inference)
    if counts is None:
        counts = _COUNTS[peer.inference] = RequestCounts()
        counts.attach(peer.inference)
    return counts


class PeerCollector:
    """A Prometheus collector over one :class:`~modelnet_p2p.Peer` (see the module docstring)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.counts = request_counts(peer)

    def describe(self) -> Iterable[Metric]:
        return []  # no description up front: the registry would otherwise collect at register time

    def collect(self) -> Iterator[Metric]:
        peer = self.peer
        requests = CounterMetricFamily(
            "modelnet_inference_requests",
            "Requests this peer served, by outcome.",
            labels=["capability", "code"],
        )
        for (cap, code), n in sorted(self.counts.requests.items()):
            requests.add_metric([cap, code], n)
        yield requests
        chunks = CounterMetricFamily(
            "modelnet_inference_chunks",
            "Chunks sent by the requests this peer served.",
            labels=["capability"],
        )
        for cap, n in sorted(self.counts.chunks.items()):
            chunks.add_metric([cap], n)
        yield chunks
        yield GaugeMetricFamily(
            "modelnet_inference_in_flight", "Requests being served now.", value=peer.inference.in_flight
        )
        client = sum(int(s.get("in_flight", 0)) for s in peer.router.snapshot().values())
        yield GaugeMetricFamily(
            "modelnet_client_in_flight",
            "Requests this peer has sent and not yet seen answered.",
            value=client,
        )
        yield GaugeMetricFamily(
            "modelnet_capabilities_served", "Capabilities this peer serves.", value=len(peer.capabilities)
        )
        yield from self._discovery()
        yield from self._gossip()
        yield from self._connections()

    def _discovery(self) -> Iterator[Metric]:
        d = self.peer.discovery
        lookups = SummaryMetricFamily(
            "modelnet_discovery_lookups", "Capability lookups and the seconds they took.", labels=[]
        )
        lookups.add_metric([], count_value=d.lookups_done, sum_value=d.lookup_seconds)
        yield lookups
        try:
            sent = d.requests_sent
        except Exception:
            sent = 0
        yield CounterMetricFamily("modelnet_discovery_requests", "DHT requests sent.", value=sent)

    def _gossip(self) -> Iterator[Metric]:
        service = self.peer.availability
        accepted = CounterMetricFamily("modelnet_gossip_records_accepted", "Availability records accepted.")
        rejected = CounterMetricFamily(
            "modelnet_gossip_records_rejected", "Availability records rejected, by reason.", labels=["reason"]
        )
        known = 0
        if service is not None:
            stats = service.stats.table
            accepted.add_metric([], stats.accepted)
            for reason, n in sorted(stats.rejected.items()):
                rejected.add_metric([reason], n)
            known = len(service.table())
        else:
            accepted.add_metric([], 0)
        yield accepted
        yield rejected
        yield GaugeMetricFamily(
            "modelnet_gossip_known_peers", "Live entries in the availability table.", value=known
        )

    def _connections(self) -> Iterator[Metric]:
        s = self.peer.connmgr.stats()
        conns = GaugeMetricFamily("modelnet_connections", "Open connections.", labels=["kind"])
        conns.add_metric(["open"], s.connections)
        conns.add_metric(["in_use"], s.in_use)
        conns.add_metric(["protected"], s.protected)
        yield conns
        yield CounterMetricFamily(
            "modelnet_connections_trimmed", "Connections the connection manager closed.", value=s.trimmed
        )


def peer_registry(peer: Peer) -> CollectorRegistry:
    """A new registry holding a :class:`PeerCollector` of ``peer``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PeerCollector(peer))
    return registry


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); :class:`ConfigError` if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{listen!r} must be HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ConfigError(f"{listen!r} has no host")
    return host, int(port)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\nCache-Control: no-cache\r\n\r\n"
    )
    return head.encode() + body


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    buf = b""
    with trio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_REQUEST_HEAD:
                return None
            data = await stream.receive_some(4096)
            if not data:
                return b""
            buf += data
        return buf if buf.index(b"\r\n\r\n") <= MAX_REQUEST_HEAD else None
    return b""


async def _handle(
    registry: CollectorRegistry, limiter: trio.CapacityLimiter, stream: trio.SocketStream
) -> None:
    async with stream:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(1):
                await stream.send_all(_response("503 Service Unavailable", b"too many scrapes at once\n"))
            return
        try:
            head = await _read_head(stream)
            if head is None:
                await stream.send_all(
                    _response("431 Request Header Fields Too Large", b"request head too large\n")
                )
                return
            if not head:
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                answer = _response("405 Method Not Allowed", b"only GET\n")
            elif path != "/metrics":
                answer = _response("404 Not Found", b"see /metrics\n")
            else:
                body = generate_latest(registry)
                answer = _response("200 OK", b"" if method == "HEAD" else body, CONTENT_TYPE)
            await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a scrape must never stop the peer
            log.exception("metrics request failed")
        finally:
            limiter.release()


async def serve_metrics(
    registry: CollectorRegistry,
    listen: str,
    *,
    task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` from ``registry`` on ``listen`` (``HOST:PORT``; port 0 picks one).

    ``task_status.started`` gets the bound URLs (``["http://127.0.0.1:9464/metrics"]``).
    Runs until cancelled; start it in the peer's nursery.
    """
    host, port = split_listen(listen)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot listen for metrics on {listen}: {exc.strerror or exc}") from None
    urls = []
    for listener in listeners:
        addr = listener.socket.getsockname()
        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        urls.append(f"http://{shown}:{addr[1]}/metrics")
    log.info("metrics on %s", ", ".join(urls))
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, partial(_handle, registry, limiter), listeners))
        task_status.started(urls)
