"""A peer that cannot be dialed takes part through a relay on its bootstrap peer."""

from __future__ import annotations

from modelnet_p2p import Capability, Peer


async def test_private_peer_is_discovered_and_called_through_the_relay():
    async with Peer(relay_hop=True) as boot:
        addr = boot.addrs[0]
        async with (
            Peer(listen=[], bootstrap=[addr], reachability="private") as hidden,
            Peer(bootstrap=[addr]) as client,
        ):
            assert hidden.needs_relay and hidden.discovery.mode == "client"
            assert len(hidden.addrs) == 1 and "/p2p-circuit/p2p/" in hidden.addrs[0]

            async def secret(request):
                for word in ("only", "through", "the", "relay"):
                    yield word

            hidden.serve(Capability(name="secret", task="tool"), secret)
            card = await hidden.announce()
            assert card is not None and all("/p2p-circuit" in a for a in card.addrs)
            # discovery finds it, routing reaches it through the relay
            resp = await client.call(capability="secret", input=None, timeout=20)
            assert resp.chunks == ["only", "through", "the", "relay"]
            assert resp.peer == hidden.peer_id
            # the relayed address works as an explicit target too
            again = await client.call(hidden.addrs[0], "secret", None, timeout=20)
            assert again.chunks == resp.chunks
            assert boot.relay is not None and boot.relay.reservations >= 1
