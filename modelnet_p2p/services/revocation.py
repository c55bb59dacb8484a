"""Revocation lists, distributed: gossip per issuer, and polling (``specs/token.md``, "Revocation").

An issuer's revocation list is a signed, versioned envelope
(:func:`~modelnet_p2p.proto.token.seal_revocations`). This service moves lists between peers:

- **Holding.** Every list a peer reads from its ``--revocations`` files, hears on gossip or
  gets from a poll is kept if it is well formed and signed by the issuer it names, and only
  if its ``seq`` is newer than the list of that issuer held already (an older or replayed
  list changes nothing; a different list with the same ``seq`` is ignored). Lists of trusted
  issuers are applied to the peer's :class:`~modelnet_p2p.services.access.AccessControl`
  at once (its cache of verified tokens is emptied), so a revoked token is refused from the
  next request on. At most :data:`MAX_HELD` issuers are held.
- **Gossip.** One topic per issuer, ``/modelnet/revocations/1/<issuer peer id>`` (inside the
  network's topics). A peer joins the topic of every issuer it trusts and of every list it
  holds from a file. The topic's validator is the holding rule above: a newer or the same
  list is accepted (and forwarded), a forged, malformed, older or conflicting one is
  rejected (and goes no further). A peer publishes the lists of its files when they change
  (checked every :data:`RELOAD_INTERVAL` s) and again every :data:`REPUBLISH_INTERVAL` s;
  lists over :data:`MAX_GOSSIP_LIST` bytes are not gossiped (polling carries them).
- **Polling.** ``/modelnet/revocations/1.0.0``: the asker sends one frame
  ``{"iss": issuer peer id, "seq": the seq it holds}`` (``seq`` left out if it holds none) and
  the answerer one frame, ``{"rev": <the envelope>}`` if it holds a newer list of that issuer,
  else ``{}``, and closes. Any holder answers (lists are self-authenticating). A peer polls
  each trusted issuer it is connected to once connected (checked every :data:`RELOAD_INTERVAL`
  s), then every :data:`POLL_INTERVAL` s (and at once when :meth:`RevocationService.poke` is
  called), so lists dropped by gossip still arrive.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from ..errors import ModelNetError, ProtocolError
from ..p2p.stream import Stream, close_quietly, remote_peer, reset_quietly
from ..proto.framing import pack_frame
from ..proto.token import REVOCATION_FORMAT, RevocationList, peek_revocations
from .access import AccessControl
from .messages import read_message

__all__ = [
    "MAX_GOSSIP_LIST",
    "MAX_HELD",
    "POLL_INTERVAL",
    "PROTOCOL_ID",
    "RELOAD_INTERVAL",
    "REPUBLISH_INTERVAL",
    "TOPIC_PREFIX",
    "RevocationService",
    "poll_revocations",
    "revocation_topic",
]

log = logging.getLogger(__name__)

#: The polling protocol on the ``local`` network (others insert their name, ``specs/network.md``).
PROTOCOL_ID = "/modelnet/revocations/1.0.0"
#: The gossip topic of an issuer is this prefix and its peer id (inside the network's topics).
TOPIC_PREFIX = "/modelnet/revocations/1/"
#: Seconds between two checks of the revocation files for changes (a change is published then).
RELOAD_INTERVAL = 5.0
#: Seconds between two publications of an unchanged list (gossip drops messages under load).
REPUBLISH_INTERVAL = 60.0
#: Seconds between two polls of each trusted, connected issuer.
POLL_INTERVAL = 30.0
#: Seconds one poll may take (open, ask, read the answer).
POLL_TIMEOUT = 10.0
#: Largest list gossiped, in bytes (about 480 ids); bigger lists travel only by polling.
MAX_GOSSIP_LIST = 64 * 1024
#: Issuers whose lists one peer holds (trusted ones and those of its files).
MAX_HELD = 256
#: Largest poll request, in bytes (a peer id and a seq).
MAX_REQUEST = 256
#: Largest poll answer, in bytes: a list envelope and the frame's map.
MAX_ANSWER = REVOCATION_FORMAT.max_size + 64
#: Polls answered at once (over all askers); more are reset.
MAX_CONCURRENT_ANSWERS = 16


def revocation_topic(issuer: str, network_topic: Callable[[str], str] = lambda t: t) -> str:
    """The gossip topic of ``issuer``'s lists (``network_topic`` applies the network's prefix)."""
    return network_topic(TOPIC_PREFIX + issuer)


class GossipMessageLike(Protocol):
    @property
    def data(self) -> bytes: ...


class GossipLike(Protocol):
    """The part of :class:`~modelnet_p2p.p2p.pubsub.Gossip` used here."""

    def join(self, topic: str, validator: Callable[[Any], bool]) -> None: ...

    async def publish(self, topics: str, data: bytes) -> None: ...


#: Opens a poll stream to a peer id (the peer's dialer for :data:`PROTOCOL_ID`).
OpenStream = Callable[[str], Awaitable[Stream]]


async def _read_frame(stream: Stream, limit: int, timeout: float) -> dict[str, Any]:
    return await read_message(stream, max_size=limit, max_objects=8, timeout=timeout)


async def poll_revocations(
    open_stream: Callable[[], Awaitable[Stream]],
    issuer: str,
    seq: int | None,
    *,
    timeout: float = POLL_TIMEOUT,
) -> bytes | None:
    """Ask the peer behind ``open_stream()`` for a list of ``issuer`` newer than ``seq``: the
    envelope (not yet checked), or ``None`` if it has none. Raises :class:`ProtocolError` for a
    malformed answer, :class:`trio.TooSlowError` past ``timeout``."""
    ask: dict[str, Any] = {"iss": issuer}
    if seq is not None:
        ask["seq"] = seq
    with trio.fail_after(timeout):
        stream = await open_stream()
        try:
            await stream.write(pack_frame(ask, MAX_REQUEST))
            answer = await _read_frame(stream, MAX_ANSWER, timeout)
        finally:
            await close_quietly(stream)
    data = answer.get("rev")
    if data is None:
        return None
    if not isinstance(data, bytes):
        raise ProtocolError("a revocation answer's rev must be bytes")
    return data


class RevocationService:
    """Holds, applies, gossips, serves and polls revocation lists (see the module docstring).

    Args:
        access: the peer's access control (lists of its trusted issuers are applied to it).
        files: revocation list files to read, publish and serve (``--revocations``).
        network_topic: the network's topic rule (``p2p.network.topic`` with the network bound).
    """

    def __init__(
        self,
        access: AccessControl,
        files: Sequence[str | os.PathLike[str]] = (),
        *,
        network_topic: Callable[[str], str] = lambda t: t,
    ) -> None:
        self.access = access
        self.files = [Path(p) for p in files]
        self.network_topic = network_topic
        self.poll_interval = POLL_INTERVAL
        #: Whether to poll the trusted issuers (gossip alone otherwise).
        self.polling = True
        self.reload_interval = RELOAD_INTERVAL
        self.republish_interval = REPUBLISH_INTERVAL
        #: issuer -> (the list, its envelope): the newest of each issuer seen and checked.
        self.held: dict[str, tuple[RevocationList, bytes]] = {}
        #: Counters: lists taken (by source), refused (by why), polls answered, publications.
        self.stats: dict[str, int] = {}
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._from_files: set[str] = set()
        self._published: dict[str, int] = {}
        self._gossip: GossipLike | None = None
        self._joined: set[str] = set()
        self._connected: set[str] = set()
        self._wake = trio.Event()
        self._answering = 0
        #: Rounds of the loop run so far (re-read, publish, poll).
        self.rounds = 0

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # -- holding -------------------------------------------------------------------------------

    def offer(self, data: bytes, source: str, issuer: str | None = None) -> bool | None:
        """Take a list in if it is valid (for ``issuer``, if given) and newer than the one held:
        ``True`` taken, ``None`` the same list as held, ``False`` refused (forged, malformed,
        another issuer's, older, a different list with the same seq, or too many issuers)."""
        try:
            rl = peek_revocations(bytes(data))
        except (ProtocolError, ValueError) as exc:
            self._count("refused_invalid")
            log.debug("revocation list from %s refused: %s", source, exc)
            return False
        if issuer is not None and rl.issuer != issuer:
            self._count("refused_issuer")
            return False
        held = self.held.get(rl.issuer)
        if held is not None and rl.seq <= held[0].seq:
            if rl.seq == held[0].seq and held[1] == bytes(data):
                return None
            self._count("refused_stale")
            return False
        if held is None and len(self.held) >= MAX_HELD:
            self._count("refused_full")
            return False
        self.held[rl.issuer] = (rl, bytes(data))
        self._count(f"taken_{source}")
        if rl.issuer in self.access.trusted:
            try:
                self.access.add_revocations(bytes(data))
            except ProtocolError as exc:  # cannot happen for a peeked list of a trusted issuer
                log.warning("revocation list of %s not applied: %s", rl.issuer, exc)
        log.info("revocation list of %s, seq %d (%d ids) from %s", rl.issuer, rl.seq, len(rl.ids), source)
        return True

    def seq_of(self, issuer: str) -> int | None:
        held = self.held.get(issuer)
        return None if held is None else held[0].seq

    def reload(self) -> list[str]:
        """Read the files that changed; the issuers whose list is new."""
        changed: list[str] = []
        for path in self.files:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if self._stamps.get(path) == stamp:
                    continue
                self._stamps[path] = stamp
                if st.st_size > REVOCATION_FORMAT.max_size:
                    log.warning("revocation list %s is over %d bytes", path, REVOCATION_FORMAT.max_size)
                    continue
                data = path.read_bytes()
            except FileNotFoundError:
                log.debug("revocation list %s does not exist (yet)", path)
                continue
            except OSError as exc:
                log.warning("revocation list %s not read: %s", path, exc)
                continue
            if self.offer(data, "file"):
                rl = peek_revocations(data)
                self._from_files.add(rl.issuer)
                changed.append(rl.issuer)
        return changed

    # -- gossip ----------------------------------------------------------------------------------

    def _validator(self, issuer: str) -> Callable[[GossipMessageLike], bool]:
        def validate(msg: GossipMessageLike) -> bool:
            data = bytes(msg.data)
            if len(data) > MAX_GOSSIP_LIST:
                self._count("refused_size")
                return False
            return self.offer(data, "gossip", issuer) is not False

        return validate

    def _join(self, issuer: str) -> None:
        if self._gossip is not None and issuer not in self._joined:
            self._joined.add(issuer)
            self._gossip.join(revocation_topic(issuer, self.network_topic), self._validator(issuer))

    async def publish(self, issuer: str, *, join: bool = True) -> bool:
        """Publish the held list of ``issuer`` on its topic (if small enough); whether it was.
        ``join=False`` publishes without joining the topic (to the neighbours that have: a
        short-lived publisher, whose mesh of a just joined topic would still be empty)."""
        held = self.held.get(issuer)
        if self._gossip is None or held is None or len(held[1]) > MAX_GOSSIP_LIST:
            return False
        if join:
            self._join(issuer)
        try:
            await self._gossip.publish(revocation_topic(issuer, self.network_topic), held[1])
        except ModelNetError as exc:
            log.debug("publishing the revocation list of %s failed: %s", issuer, exc)
            return False
        self._published[issuer] = held[0].seq
        self._count("published")
        return True

    # -- polling ---------------------------------------------------------------------------------

    async def handle_stream(self, stream: Stream) -> None:
        """Answer one poll (the stream handler of :data:`PROTOCOL_ID`)."""
        if self._answering >= MAX_CONCURRENT_ANSWERS:
            await reset_quietly(stream)
            return
        self._answering += 1
        try:
            ask = await _read_frame(stream, MAX_REQUEST, POLL_TIMEOUT)
            issuer, seq = ask.get("iss"), ask.get("seq")
            if not isinstance(issuer, str) or not (seq is None or (isinstance(seq, int) and seq >= 0)):
                raise ProtocolError("a revocation poll is {iss: text, seq: uint}")
            held = self.held.get(issuer)
            answer: dict[str, Any] = {}
            if held is not None and (seq is None or held[0].seq > seq):
                answer["rev"] = held[1]
            self._count("answered")
            await close_quietly(stream, data=pack_frame(answer, MAX_ANSWER))
        except Exception as exc:  # never take the host down
            log.debug("revocation poll from %s failed: %r", remote_peer(stream), exc)
            await reset_quietly(stream)
        finally:
            self._answering -= 1

    async def poll(self, issuer: str, open_stream: OpenStream) -> bool:
        """Ask ``issuer`` for a newer list of its own; whether one was taken."""
        try:
            data = await poll_revocations(lambda: open_stream(issuer), issuer, self.seq_of(issuer))
        except (ModelNetError, trio.TooSlowError, OSError) as exc:
            log.debug("polling %s for revocations failed: %r", issuer, exc)
            return False
        except Exception as exc:  # libp2p errors: the issuer is away
            log.debug("polling %s for revocations failed: %r", issuer, exc)
            return False
        return data is not None and bool(self.offer(data, "poll", issuer))

    def poke(self) -> None:
        """Poll and re-read now instead of at the next interval."""
        self._wake.set()

    # -- running ---------------------------------------------------------------------------------

    async def run(
        self,
        gossip: GossipLike | None,
        open_stream: OpenStream | None,
        is_connected: Callable[[str], bool] = lambda peer: True,
    ) -> None:
        """Join the topics, then re-read, publish and poll until cancelled (in the peer's nursery)."""
        self._gossip = gossip
        for issuer in sorted(self.access.trusted):
            self._join(issuer)
        next_publish = next_poll = -math.inf
        while True:
            now = trio.current_time()
            for issuer in self.reload():
                self._join(issuer)
                await self.publish(issuer)
            if now >= next_publish:
                next_publish = now + self.republish_interval
                for issuer in sorted(self._from_files):
                    await self.publish(issuer)
            if open_stream is not None and self.polling:
                due = now >= next_poll
                if due:
                    next_poll = now + self.poll_interval
                for issuer in sorted(self.access.trusted):
                    if issuer in self._from_files or not is_connected(issuer):
                        self._connected.discard(issuer)
                    elif due or issuer not in self._connected:  # every interval, and when it connects
                        self._connected.add(issuer)
                        await self.poll(issuer, open_stream)
            for issuer in sorted(self.access.trusted):  # trusted after the start (Peer.trust)
                self._join(issuer)
                held = self.held.get(issuer)
                if held is not None and self.access.revocation_seq(issuer) != held[0].seq:
                    self.access.add_revocations(held[1])
            wait = self.reload_interval
            if open_stream is not None and self.polling:
                wait = min(wait, max(0.0, next_poll - trio.current_time()))
            with trio.move_on_after(wait):
                await self._wake.wait()
                next_poll = -math.inf  # poked: poll now
            self._wake = trio.Event()
            self.rounds += 1

    def describe(self) -> dict[str, Any]:
        """What is held, for logs and ``status``."""
        return {
            "held": {i: {"seq": rl.seq, "ids": len(rl.ids)} for i, (rl, _) in sorted(self.held.items())},
            **self.stats,
        }
