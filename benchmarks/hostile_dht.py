"""DHT attacks for ``bench_hostile.py`` (issue 12: "The DHT starves and fills up", "The DHT
under poisoning", and the per-peer request limits).

- ``dht-idle-streams``: 8 identities open 16 DHT streams each and never write; a stream the
  victim resets is opened again a second later.
- ``dht-tarpit-providers``: fresh identities tell the victim they provide the capability's
  keys at the address of a tarpit (a TCP listener that accepts and never answers).
- ``dht-junk-values``: ``PUT_VALUE`` of 900 kB values in namespaces other than the card's
  (``/pk/`` values that py-libp2p's own validator accepts, and made-up namespaces).
- ``dht-request-flood``: one identity sends ``GET_PROVIDERS`` and ``FIND_NODE`` as fast as
  it can on 4 streams, opening new ones as the victim resets them.

Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hostile_common import Attack, Target, attacker_host

from modelnet_p2p.testing.tarpit import tarpit

log = logging.getLogger("bench_hostile.dht")

#: Fake provider identities one tarpit attack uses at most. py-libp2p 0.8.1's swarm keeps
#: the inbound-connection slot of every accepted connection until it stops (about 256
#: slots), so each identity costs the victim one slot for good; other attacks need some.
TARPIT_IDENTITIES = 100


def _kad() -> Any:
    from libp2p.custom_types import TProtocol

    from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID

    return TProtocol(DHT_PROTOCOL_ID)


def _frame(data: bytes) -> bytes:
    from modelnet_p2p.proto.framing import encode_varint

    return encode_varint(len(data)) + data


async def _open(host: Any, target: Target) -> Any:
    from libp2p.peer.id import ID

    with trio.fail_after(5):
        return await host.new_stream(ID.from_base58(target.peer_id), [_kad()])


async def _reset(stream: Any) -> None:
    with trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:
            pass


@asynccontextmanager
async def idle_streams(target: Target) -> AsyncIterator[None]:
    async def hold_one(host: Any) -> None:
        while True:
            try:
                stream = await _open(host, target)
            except Exception:
                await trio.sleep(1.0)
                continue
            try:
                await stream.read(1)  # returns or raises once the victim closes or resets it
            except Exception:
                pass
            await _reset(stream)
            await trio.sleep(1.0)  # holding streams, not flooding them (a flood is another attack)

    async def identity() -> None:
        async with attacker_host(target) as host:
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(hold_one, host)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(identity)
        await trio.sleep(1.0)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tarpit_providers(target: Target) -> AsyncIterator[None]:
    from modelnet_p2p.p2p.kad import KadKind, KadPeer, KadRequest, encode_request
    from modelnet_p2p.proto.card import model_key, task_key

    keys = [model_key(target.capability), task_key("chat")]

    async def one(pit: str) -> None:
        try:
            async with attacker_host(target) as host:
                me = KadPeer(str(host.get_id()), (pit,))
                for key in keys:
                    stream = await _open(host, target)
                    try:
                        await stream.write(
                            _frame(encode_request(KadRequest(KadKind.ADD_PROVIDER, key, provider=me)))
                        )
                        with trio.move_on_after(3):
                            await stream.read(1024)
                    finally:
                        await _reset(stream)
        except Exception as exc:
            log.debug("a fake provider failed: %r", exc)

    async def flood(pit: str) -> None:
        limiter = trio.CapacityLimiter(4)

        async def limited() -> None:
            async with limiter:
                await one(pit)

        async with trio.open_nursery() as nursery:
            for _ in range(TARPIT_IDENTITIES):
                nursery.start_soon(limited)

    async with tarpit() as pit, trio.open_nursery() as nursery:
        nursery.start_soon(flood, pit)
        await trio.sleep(1.0)
        yield
        nursery.cancel_scope.cancel()


def _pk_value(size: int) -> tuple[bytes, bytes]:
    from libp2p.crypto.pb import crypto_pb2
    from libp2p.peer.id import ID

    from modelnet_p2p.p2p.identity import Identity
    from modelnet_p2p.proto.framing import encode_varint

    public = Identity.generate().key_pair.public_key
    pub = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public.to_bytes())
    value = pub.SerializeToString() + bytes([(15 << 3) | 2]) + encode_varint(size) + bytes(size)
    return ("/pk/" + ID.from_pubkey(public).to_bytes().hex()).encode(), value


@asynccontextmanager
async def junk_values(target: Target) -> AsyncIterator[None]:
    from libp2p.kad_dht.pb.kademlia_pb2 import Message

    async def put(host: Any, key: bytes, value: bytes) -> None:
        msg = Message(type=Message.MessageType.PUT_VALUE, key=key)
        msg.record.key = key
        msg.record.value = value
        try:
            stream = await _open(host, target)
        except Exception:
            await trio.sleep(0.1)
            return
        try:
            await stream.write(_frame(msg.SerializeToString()))
            with trio.move_on_after(2):
                await stream.read(1024)
        except Exception:
            pass
        finally:
            await _reset(stream)

    async def loop() -> None:
        i = 0
        async with attacker_host(target) as host:
            while True:
                await put(host, *_pk_value(900_000))
                await put(host, f"/junk{i}/x".encode(), bytes(900_000))
                i += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        await trio.sleep(1.0)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def request_flood(target: Target) -> AsyncIterator[None]:
    from modelnet_p2p.p2p.kad import KadKind, KadRequest, encode_request, peer_id_bytes
    from modelnet_p2p.proto.card import model_key

    requests = [
        _frame(encode_request(KadRequest(KadKind.GET_PROVIDERS, model_key(target.capability)))),
        _frame(encode_request(KadRequest(KadKind.FIND_NODE, peer_id_bytes(target.peer_id)))),
    ]

    async def worker(host: Any) -> None:
        while True:
            try:
                stream = await _open(host, target)
            except Exception:
                await trio.sleep(0.05)
                continue
            try:
                while True:
                    for data in requests:
                        await stream.write(data)
                        with trio.fail_after(5):
                            await stream.read(65536)
            except Exception:
                pass
            finally:
                await _reset(stream)

    async def identity() -> None:
        async with attacker_host(target) as host, trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker, host)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(identity)
        await trio.sleep(1.0)
        yield
        nursery.cancel_scope.cancel()


ATTACKS: dict[str, Attack] = {
    "dht-idle-streams": idle_streams,
    "dht-tarpit-providers": tarpit_providers,
    "dht-junk-values": junk_values,
    "dht-request-flood": request_flood,
}
