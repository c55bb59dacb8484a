"""Peer ids and multiaddrs between their text and binary forms, with bounded caches.

A DHT answer lists up to k peers with their addresses, and every one of them is converted
several times: from the wire's bytes to text (the lookup's candidates), from text back to
py-libp2p objects (the peerstore, distances, dials). py-libp2p does each conversion in pure
Python: a base58 peer id costs about 13 µs to decode, a text multiaddr about 10 µs to parse,
so an answer of 20 peers cost about 0.7 ms of CPU to take in (issue 11: a ``serve()`` in a
200-peer mesh handles hundreds of answers). The same few hundred peers come back in answer
after answer, so the conversions are cached.

Bounded: each cache holds at most :data:`CACHE_SIZE` entries (least recently used out
first), and an input longer than :data:`MAX_CACHED_LEN` is converted without the cache, so
answers full of made-up peers can neither grow the caches nor fill them with large entries.
The objects handed out are shared: callers must not change them (py-libp2p's ``ID`` and
``Multiaddr`` have no mutating methods).
"""

from __future__ import annotations

from functools import lru_cache

import multiaddr
from libp2p.peer.id import ID

__all__ = [
    "CACHE_SIZE",
    "MAX_CACHED_LEN",
    "addr_bytes",
    "addr_text",
    "cache_info",
    "id_bytes",
    "id_text",
    "parse_addr",
    "parse_id",
]

#: Entries per cache, at most.
CACHE_SIZE = 4096
#: Longest input (characters or bytes) that is cached; longer ones are converted each time.
MAX_CACHED_LEN = 256


@lru_cache(maxsize=CACHE_SIZE)
def _parse_id(text: str) -> ID:
    return ID.from_base58(text)


@lru_cache(maxsize=CACHE_SIZE)
def _id_text(raw: bytes) -> str:
    return str(ID(raw))


@lru_cache(maxsize=CACHE_SIZE)
def _parse_addr(text: str) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(text)


@lru_cache(maxsize=CACHE_SIZE)
def _addr_text(raw: bytes) -> str:
    return str(multiaddr.Multiaddr(raw))


def parse_id(text: str) -> ID:
    """The ``ID`` of a base58 peer id (raises as ``ID.from_base58`` does)."""
    return _parse_id(text) if len(text) <= MAX_CACHED_LEN else ID.from_base58(text)


def id_bytes(text: str) -> bytes:
    """The binary form of a base58 peer id."""
    return parse_id(text).to_bytes()


def id_text(raw: bytes) -> str:
    """The base58 text of a binary peer id."""
    return _id_text(raw) if len(raw) <= MAX_CACHED_LEN else str(ID(raw))


def parse_addr(text: str) -> multiaddr.Multiaddr:
    """The ``Multiaddr`` of a text address (raises as ``Multiaddr`` does)."""
    return _parse_addr(text) if len(text) <= MAX_CACHED_LEN else multiaddr.Multiaddr(text)


def addr_text(raw: bytes) -> str:
    """The text form of a binary multiaddr (raises as ``Multiaddr`` does for a bad one)."""
    return _addr_text(raw) if len(raw) <= MAX_CACHED_LEN else str(multiaddr.Multiaddr(raw))


def addr_bytes(text: str) -> bytes:
    """The binary form of a text multiaddr."""
    return bytes(parse_addr(text).to_bytes())


def cache_info() -> dict[str, tuple[int, int, int]]:
    """Per cache: ``(entries, hits, misses)``."""
    caches = {"parse_id": _parse_id, "id_text": _id_text, "parse_addr": _parse_addr, "addr_text": _addr_text}
    infos = {name: c.cache_info() for name, c in caches.items()}
    return {name: (i.currsize, i.hits, i.misses) for name, i in infos.items()}
