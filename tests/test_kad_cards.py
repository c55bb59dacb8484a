"""Cards beside provider records (``specs/capability.md``): the codec, and live peers on 127.0.0.1.

An ``ADD_PROVIDER`` carries the provider's card, so a server checks the record without
asking the provider; a ``GET_PROVIDERS`` answer carries the cards the server holds, so a
discoverer does not fetch them. A server can withhold a card, not forge one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.kad_dht.pb.kademlia_pb2 import Message

from modelnet_p2p import Capability, Peer, ProtocolError
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.proto.card import MAX_CARD_SIZE, CapabilityCard, model_key, seal
from modelnet_p2p.proto.kadcards import (
    ANSWER_CARD_BYTES,
    ANSWER_CARDS,
    CARDS_FIELD,
    append_cards,
    cards_in,
    fit_cards,
)
from modelnet_p2p.services.discovery.announce import AnnounceResult
from modelnet_p2p.testing import open_peers

VECTORS = Path(__file__).parent.parent / "specs" / "vectors" / "kad-cards.json"


async def answer(request: object) -> str:
    return "ok"


# -- the codec --------------------------------------------------------------------------------


def _message(key: bytes, providers: int) -> bytes:
    msg = Message(type=Message.MessageType.GET_PROVIDERS, key=key)
    for i in range(providers):
        peer = msg.providerPeers.add()
        peer.id = bytes([i]) * 34
        peer.addrs.append(b"\x04\x7f\x00\x00\x01\x06\x10\x00")
    return bytes(msg.SerializeToString())


@given(
    key=st.binary(max_size=80),
    providers=st.integers(0, 5),
    cards=st.lists(st.binary(max_size=300), max_size=6),
)
def test_appended_cards_read_back_in_order_and_leave_the_known_fields_alone(
    key: bytes, providers: int, cards: list[bytes]
) -> None:
    plain = _message(key, providers)
    extended = append_cards(plain, cards)
    assert list(cards_in(extended, limit=len(cards) + 1)) == cards
    stock, ours = Message(), Message()
    stock.ParseFromString(plain)
    ours.ParseFromString(extended)  # a parser without the extension skips field 100
    ours.DiscardUnknownFields()
    assert ours == stock
    assert cards_in(plain) == []


def test_cards_in_bounds_what_it_reads() -> None:
    cards = [bytes([i]) * 10 for i in range(30)]
    assert len(cards_in(append_cards(b"", cards))) == ANSWER_CARDS
    assert cards_in(append_cards(b"", [b"x" * (MAX_CARD_SIZE + 1), b"ok"])) == [b"ok"]


def test_fit_cards_caps_count_and_bytes() -> None:
    big = [b"c" * 10_000 for _ in range(10)]
    fitted = fit_cards(big)
    assert len(fitted) == ANSWER_CARD_BYTES // 10_000
    assert len(fit_cards([b"c"] * 50)) == ANSWER_CARDS
    assert fit_cards([b"x" * (MAX_CARD_SIZE + 1), b"small"]) == [b"small"]


@pytest.mark.parametrize(
    "bad",
    [
        bytes([CARDS_FIELD << 3 & 0x7F | 0x80, CARDS_FIELD >> 4]) + b"\x05ab",  # ends inside the card
        b"\x08",  # ends inside a varint field
        bytes([0xA0, 0x06, 0x01]),  # field 100 as a varint
        b"\x0b",  # a group (wire type 3)
        b"\x02\x00",  # field number 0
    ],
)
def test_malformed_messages_are_protocol_errors(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        cards_in(bad)


def test_spec_vectors() -> None:
    data = json.loads(VECTORS.read_text())
    for vector in data["vectors"]:
        message = bytes.fromhex(vector["message"])
        cards = [bytes.fromhex(c) for c in vector["cards"]]
        assert append_cards(message, cards).hex() == vector["extended"], vector["name"]
        assert list(cards_in(bytes.fromhex(vector["extended"]))) == cards
        parsed = Message()
        parsed.ParseFromString(bytes.fromhex(vector["extended"]))
        assert len(parsed.providerPeers) == vector["providers"]


# -- live peers -------------------------------------------------------------------------------


async def test_a_record_is_checked_by_its_carried_card_and_a_discoverer_gets_it_beside_the_record() -> None:
    with trio.fail_after(60):
        async with open_peers(3) as (server, provider, finder):
            check = server.discovery.provider_check
            assert check is not None
            provider.serve(Capability("carried", task="chat"), answer)
            await provider.announce()
            result = provider.discovery.last_announce
            assert result is not None and result.confirmed
            assert check.offers_kept >= 1 and check.offers_rejected == 0
            assert check.fetches == 0  # the record was verified by the card it carried
            key = model_key("carried")
            assert server.discovery.kad.provider_counts(key)[0] >= 1  # verified
            lookups = finder.discovery.lookups
            cards = await finder.discover(model="carried")
            assert [c.peer_id for c in cards] == [provider.peer_id]
            assert lookups.cards_carried >= 1 and lookups.card_fetches == 0


async def test_a_forged_or_foreign_carried_card_is_ignored_and_the_provider_asked() -> None:
    with trio.fail_after(60):
        async with open_peers(3) as (server, provider, finder):
            provider.serve(Capability("honest", task="chat"), answer)
            assert await provider.announce() is not None
            # The server turns hostile (the finder is left with it and the provider, which
            # answers with its own card): beside the provider's record it puts a card that
            # names the provider but lists another model, signed by someone else, and a
            # tampered copy of the provider's own card.
            stranger = Identity.generate()
            now = int(time.time() * 1000)
            other = seal(
                CapabilityCard(
                    str(stranger.peer_id), (), 1, now, now + 60_000, (Capability("honest", task="chat"),)
                ),
                stranger,
            )
            own = provider.discovery.card
            assert own is not None
            tampered = bytearray(own.envelope)
            tampered[-1] ^= 1
            kad = server.discovery.kad
            kad.carry_cards(lambda *_: None, lambda pids: [other.envelope, bytes(tampered)])
            lookups = finder.discovery.lookups
            cards = await finder.discover(model="honest")
            assert [c.peer_id for c in cards] == [provider.peer_id]
            assert cards[0].envelope == own.envelope  # the provider's own card, from itself
            assert lookups.cards_refused >= 2  # the server's two were refused


async def test_an_offered_card_that_is_not_the_providers_is_rejected() -> None:
    with trio.fail_after(60):
        async with open_peers(2) as (server, _other):
            check = server.discovery.provider_check
            assert check is not None
            stranger, victim = Identity.generate(), Identity.generate()
            now = int(time.time() * 1000)
            card = seal(CapabilityCard(str(stranger.peer_id), (), 1, now, now + 60_000, ()), stranger)
            check.offer(b"k", str(victim.peer_id), card.envelope)  # another peer's card
            check.offer(b"k", str(stranger.peer_id), card.envelope[:-1])  # broken
            assert check.offers_rejected == 2 and check.offers_kept == 0
            assert check.cards_for([str(stranger.peer_id), str(victim.peer_id)]) == []
            check.offer(b"k", str(stranger.peer_id), card.envelope)
            assert check.cards_for([str(victim.peer_id), str(stranger.peer_id)]) == [card.envelope]


async def test_an_announce_after_a_change_is_partial_unless_the_addresses_changed() -> None:
    """Provider records carry the provider's addresses: after an address change every record
    is placed again; after any other change only the new ones (``specs/capability.md``)."""

    async def next_announce(peer: Peer, seq: int) -> AnnounceResult:
        with trio.fail_after(30):
            while (r := peer.discovery.last_announce) is None or r.card.seq <= seq:
                await trio.sleep(0.05)
        return r

    async with open_peers(3) as (_server, provider, _other):
        provider.serve(Capability("first", task="chat"), answer)
        await provider.announce()
        full = provider.discovery.last_announce
        assert full is not None and full.confirmed
        provider.serve(Capability("second", task="chat"), answer)
        partial = await next_announce(provider, full.card.seq)
        # model:second and model-version:second@1.0 only (task:chat and the index are held)
        assert partial.provider_keys == 2, partial.acks
        relay = Identity.generate().peer_id
        provider.discovery.set_extra_addrs([f"/ip4/127.0.0.1/tcp/9/p2p/{relay}/p2p-circuit"])
        moved = await next_announce(provider, partial.card.seq)
        assert any("/p2p-circuit" in a for a in moved.card.addrs)
        assert moved.provider_keys == full.provider_keys + 2  # every record again
