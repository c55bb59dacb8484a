"""Availability costs in proportion to interest (``specs/availability.md``, "Interest").

Real peers on 127.0.0.1: a peer that serves nothing publishes nothing; a peer receives the
records of a capability only once it follows it (routing follows what it looks up), and then
connects to that capability's providers if no neighbour shares the topic; every distinct record
costs one signature check, however many copies arrive.
"""

from __future__ import annotations

import trio

from modelnet_p2p import Capability, Peer
from modelnet_p2p.proto.availability import topic_for
from modelnet_p2p.services.availability import AvailabilityConfig, start_availability
from modelnet_p2p.testing import open_peers

A = [("a", "1")]


async def echo(request):
    return f"echo {request.input}"


async def wait_until(predicate, timeout: float = 10.0, step: float = 0.05) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


async def test_only_serving_peers_publish_and_only_followers_receive():
    # 0 is everyone's bootstrap (a DHT server); 1 serves; 2 is a caller; 3 a bystander.
    async with open_peers(4) as (boot, provider, caller, bystander):
        provider.serve(Capability(name="echo", task="chat"), echo)
        await provider.announce()
        assert provider.availability is not None
        await provider.availability.wait_for(provider.peer_id, timeout=5)  # its own record
        # The caller looks echo up: it follows echo (and connects to the provider if no
        # neighbour shares the topic), and the provider's record reaches it.
        await caller.providers("echo", refresh=True)
        assert caller.availability is not None
        assert caller.availability.following() == {topic_for("echo")}
        entry = await caller.availability.wait_for(provider.peer_id, timeout=10)
        assert entry is not None and entry.record.serves("echo")
        assert caller.dialer.is_connected(provider.peer_id)
        # A state change reaches the follower at once (not after the 30 s refresh).
        provider.availability.set_state("draining")
        await caller.availability.wait_for(
            provider.peer_id, lambda e: e is not None and str(e.state) == "draining", timeout=5
        )
        # Nobody else published anything; the bystander and the bootstrap saw nothing.
        for idle in (boot, caller, bystander):
            assert idle.availability is not None
            assert idle.availability.stats.published == 0, idle
        for idle in (boot, bystander):
            assert idle.availability is not None
            assert idle.availability.table() == {}
            assert idle.availability.stats.validated == 0
            assert idle.availability.following() == frozenset()
        # Back to ready, and routing takes the provider again.
        provider.availability.set_state("ready")
        await caller.availability.wait_for(
            provider.peer_id, lambda e: e is not None and str(e.state) == "ready", timeout=5
        )
        assert (await caller.call(capability="echo", input="hi", timeout=20)).text == "echo hi"


async def test_interest_connects_to_providers_when_no_neighbour_shares_the_topic():
    async with open_peers(1) as (provider,), open_peers(1) as (caller,):
        provider.serve(Capability(name="echo"), echo)
        card = await provider.announce()
        assert card is not None and caller.availability is not None
        assert not caller.dialer.is_connected(provider.peer_id)
        caller.interest.note("echo", [card])
        assert caller.availability.following() == {topic_for("echo")}
        entry = await caller.availability.wait_for(provider.peer_id, timeout=10)
        assert entry is not None and caller.dialer.is_connected(provider.peer_id)


async def test_a_record_is_verified_once_however_many_copies_arrive():
    # A triangle: each record reaches each peer along two paths.
    async with open_peers(3, gossip=False) as peers:
        await peers[1].connect(peers[2].addrs[0])
        config = AvailabilityConfig(publish_interval=1.0)
        services = [
            await start_availability(p.host, p.identity, p.nursery, config, capabilities=[("echo", "1")])
            for p in peers
        ]
        await wait_until(lambda: all(len(s.table()) == 3 for s in services))
        await wait_until(lambda: all(s.stats.accepted >= 12 for s in services), timeout=20)
        for s in services:
            table = s.stats.table
            assert not table.rejected, table
            # Duplicates are dropped by message id before validation: one check per record.
            assert table.verified == table.validated == table.accepted


async def test_a_followed_capability_is_left_when_idle():
    config = AvailabilityConfig(publish_interval=1.0, follow_idle=0.5)
    async with Peer(gossip=False) as peer:
        svc = await start_availability(
            peer.host, peer.identity, peer.nursery, config, capabilities=[("a", "1")]
        )
        svc.follow("b")
        assert svc.following() == {topic_for("a"), topic_for("b")}
        await wait_until(lambda: svc.following() == {topic_for("a")}, timeout=5)
        # A served capability is never left, and unfollowing it is a no-op.
        svc.unfollow("a")
        assert svc.following() == {topic_for("a")}
        # At most max_topics topics: the least recently used followed one goes first.
        small = AvailabilityConfig(publish_interval=1.0, max_topics=2)
        async with Peer(gossip=False) as other:
            svc2 = await start_availability(
                other.host, other.identity, other.nursery, small, capabilities=[("a", "1")]
            )
            svc2.follow("b")
            svc2.follow("c")
            assert svc2.following() == {topic_for("a"), topic_for("c")}


async def test_a_new_subscriber_is_greeted_with_the_last_record_alone():
    # A follower that subscribes after the provider's last record left the message cache
    # gets that record sent to it alone: no new record goes to the other followers.
    # (py-libp2p would replay a cached one itself; the greeting goes out either way.)
    async with open_peers(3) as (provider, early, late):
        await late.connect(provider.addrs[0])
        provider.serve(Capability(name="echo"), echo)
        svc, first = provider.availability, early.availability
        assert svc is not None and first is not None and late.availability is not None
        first.follow("echo")
        await first.wait_for(provider.peer_id, timeout=10)
        published, validated = svc.stats.published, first.stats.validated
        router = svc.gossip.libp2p_router
        await wait_until(lambda: not router.mcache.window(topic_for("echo")), timeout=20)
        late.availability.follow("echo")
        entry = await late.availability.wait_for(provider.peer_id, timeout=10)
        assert entry is not None and entry.record.serves("echo")
        assert svc.gossip.stats.greetings >= 1
        assert svc.stats.published == published  # no record went out to everyone
        assert first.stats.validated == validated  # the early follower saw nothing new


async def test_a_new_provider_meets_the_others_only_after_its_announce():
    """``serve()`` starts the announce that makes the provider discoverable, and the lookup
    of the capability's other providers (to link their gossip) waits for its end: the two
    used to run at once and compete for a busy peer's CPU."""
    async with open_peers(3) as (_boot, other, provider):
        other.serve(Capability(name="echo", task="chat"), echo)
        await other.announce()
        events: list[str] = []
        announce, discover = provider.discovery.announce, provider.discover

        async def announcing(**kw):
            events.append("announce")
            try:
                return await announce(**kw)
            finally:
                events.append("announced")

        async def discovering(*args, **kw):
            events.append("discover")
            return await discover(*args, **kw)

        provider.discovery.announce = announcing  # type: ignore[method-assign]
        provider.discover = discovering  # type: ignore[method-assign]
        provider.serve(Capability(name="echo", task="chat"), echo)
        await wait_until(lambda: "discover" in events, timeout=30)
        assert events.index("announced") < events.index("discover"), events
        # and the meeting still links the two providers' gossip
        await wait_until(lambda: provider.dialer.is_connected(other.peer_id), timeout=30)
