"""The cached peer-id and multiaddr conversions of ``p2p/ids.py``: pure functions, bounded."""

from __future__ import annotations

import multiaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st
from libp2p.peer.id import ID

from modelnet_p2p.p2p import ids


@given(st.binary(min_size=1, max_size=300))
def test_an_id_goes_to_text_and_back_unchanged(raw: bytes) -> None:
    text = ids.id_text(raw)
    assert text == str(ID(raw))
    assert ids.id_bytes(text) == raw
    assert ids.parse_id(text) == ID(raw)


@given(st.integers(0, 2**32 - 1), st.integers(0, 65535))
def test_an_address_goes_to_bytes_and_back_unchanged(ip: int, port: int) -> None:
    text = f"/ip4/{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}/tcp/{port}"
    raw = ids.addr_bytes(text)
    assert raw == multiaddr.Multiaddr(text).to_bytes()
    assert ids.addr_text(raw) == text
    assert ids.parse_addr(text) == multiaddr.Multiaddr(text)


def test_bad_input_raises_every_time_and_is_not_cached() -> None:
    before = ids.cache_info()
    for _ in range(3):
        with pytest.raises(ValueError):
            ids.parse_addr("/ip4/not-an-ip/tcp/1")
        with pytest.raises(ValueError):
            ids.parse_id("0OIl")  # not base58
    after = ids.cache_info()
    assert after["parse_addr"][0] == before["parse_addr"][0]
    assert after["parse_id"][0] == before["parse_id"][0]


def test_the_caches_stay_bounded_and_skip_long_inputs() -> None:
    for i in range(ids.CACHE_SIZE + 500):
        ids.id_text(i.to_bytes(8, "big"))
    assert ids.cache_info()["id_text"][0] == ids.CACHE_SIZE
    long_raw = b"\x01" * (ids.MAX_CACHED_LEN + 1)
    before = ids.cache_info()["id_text"]
    assert ids.id_text(long_raw) == str(ID(long_raw))
    assert ids.cache_info()["id_text"] == before  # the cache was not asked
