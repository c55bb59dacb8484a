"""``modelnet doctor``: against real peers on 127.0.0.1, and its judges on written facts.

Each broken setup must give a failing finding with a fix and a non-zero exit; a healthy
one exits 0.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_util import background, modelnet, read_event

from modelnet_p2p.cli.doctor import BootstrapFacts, Facts, judge, network_of
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.relay import HOP_PROTOCOL_ID
from modelnet_p2p.services.relay import DEFAULT_RESERVATION_TTL

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A bootstrap node of the local network; its address."""
    with background("bootstrap", "--json", cwd=tmp_path_factory.mktemp("boot")) as proc:
        yield read_event(proc)["addrs"][0]


def doctor(*args: str, cwd: Any) -> tuple[int, dict[str, Any]]:
    out = modelnet(*args, "--json", cwd=cwd, timeout=90)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def by_check(doc: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["check"] == check]


def failed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["status"] == "fail"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_healthy_setup_exits_0_and_sees_the_serving_peer(boot: str, tmp_path: Path) -> None:
    with background("serve", "modelnet_p2p.demo_models:ALL", "--only", "echo", "--json", "-b", boot) as p:
        read_event(p)
        code, doc = doctor("doctor", "-b", boot, cwd=tmp_path)
        assert code == 0, failed(doc)
        assert doc["ok"] is True
        [reach] = [f for f in by_check(doc, "bootstrap") if f["status"] == "ok"]
        assert "dialed in" in reach["message"]
        assert by_check(doc, "network")[0]["status"] == "ok"
        assert by_check(doc, "relay")[0]["status"] == "ok"  # the bootstrap node grants a slot
        assert by_check(doc, "clock")[0]["status"] == "ok"
        [reach] = by_check(doc, "reachability")
        assert reach["status"] == "ok" and "dialed it back at 127.0.0.1" in reach["message"]
        [mesh] = by_check(doc, "mesh")
        assert mesh["status"] == "ok" and "1 serving peers" in mesh["message"]
        [b] = doc["facts"]["bootstrap"]
        assert b["dial_ms"] is not None and HOP_PROTOCOL_ID in b["protocols"]
        # the human form says the same in sentences
        human = modelnet("doctor", "-b", boot, "--no-browse", cwd=tmp_path)
        assert human.returncode == 0 and "all is well" in human.stdout
        # a DNS name (localhost: no query leaves the machine) is resolved, then dialed
        named = boot.replace("/ip4/127.0.0.1/", "/dns4/localhost/")
        code, doc = doctor("doctor", "-b", named, "--no-browse", cwd=tmp_path)
        assert code == 0, failed(doc)
        assert doc["facts"]["bootstrap"][0]["resolved"] == [boot]


def test_a_bootstrap_peer_that_is_down(tmp_path: Path) -> None:
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id}"
    code, doc = doctor("doctor", "-b", dead, cwd=tmp_path)
    assert code == 1
    [f] = [f for f in by_check(doc, "bootstrap") if f["status"] == "fail"]
    assert dead in f["message"] and "could not be reached" in f["message"]
    assert "firewall" in f["fix"]


def test_no_bootstrap_peer_at_all(tmp_path: Path) -> None:
    code, doc = doctor("doctor", cwd=tmp_path)
    assert code == 1
    [f] = by_check(doc, "bootstrap")
    assert f["status"] == "fail" and "--bootstrap" in f["fix"]


def test_a_port_that_is_taken(boot: str, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        addr = f"/ip4/127.0.0.1/tcp/{port}"
        code, doc = doctor("doctor", "-b", boot, "-l", addr, "--no-browse", cwd=tmp_path)
    assert code == 1
    [f] = failed(doc)
    assert f["check"] == "listen" and "taken" in f["message"] and str(port) in f["fix"]


def test_a_key_file_other_users_can_read(boot: str, tmp_path: Path) -> None:
    key = tmp_path / "peer.key"
    Identity.generate().save(key)
    os.chmod(key, 0o644)
    code, doc = doctor("doctor", "-b", boot, "-i", str(key), "--no-browse", cwd=tmp_path)
    assert code == 1
    [f] = failed(doc)
    assert f["check"] == "key" and "0644" in f["message"] and f["fix"] == f"chmod 600 {key}"
    os.chmod(key, 0o600)
    code, doc = doctor("doctor", "-b", boot, "-i", str(key), "--no-browse", cwd=tmp_path)
    assert code == 0, failed(doc)


def test_a_bootstrap_peer_of_another_network(tmp_path: Path) -> None:
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"  # a bootstrap node off local needs a fixed port and key
    other = ("--network", "other-mesh", "bootstrap", "-i", "other.key", "-l", listen, "--json")
    with background(*other, cwd=tmp_path) as proc:
        addr = read_event(proc)["addrs"][0]
        code, doc = doctor("doctor", "-b", addr, "--no-browse", cwd=tmp_path)
    assert code == 1
    [f] = failed(doc)
    assert f["check"] == "network" and "'other-mesh'" in f["message"]
    assert "--network other-mesh" in f["fix"]


# -- the judges, on written facts ---------------------------------------------------------


def test_network_of_protocol_ids() -> None:
    assert network_of("/modelnet/kad/1.0.0") == "local"
    assert network_of("/modelnet/testnet/kad/1.0.0") == "testnet"
    assert network_of("/ipfs/id/1.0.0") is None


def _reached(addr: str, **kw: Any) -> BootstrapFacts:
    return BootstrapFacts(
        addr, dial_ms=40.0, peer_id="x", protocols=["/modelnet/kad/1.0.0", HOP_PROTOCOL_ID], **kw
    )


def _facts(**kw: Any) -> Facts:
    base: dict[str, Any] = {"network": "local", "listen": ["/ip4/0.0.0.0/tcp/4001"]}
    base.update(kw)
    return Facts(**base)


def _skewed(seconds: float) -> Facts:
    """Facts where the relay's clock is ``seconds`` ahead of ours."""
    now = 1_800_000_000.0
    expires = now + DEFAULT_RESERVATION_TTL + seconds
    return _facts(
        bootstrap=[_reached("/ip4/203.0.113.1/tcp/4001", relay_expires=expires, relay_asked_at=now)]
    )


def test_clock_skew_is_read_from_the_relays_reservation() -> None:
    assert [f.status for f in judge(_skewed(2)) if f.check == "clock"] == ["ok"]
    [f] = [f for f in judge(_skewed(120)) if f.check == "clock"]
    assert f.status == "fail" and "120 s behind" in f.message and "set-ntp" in (f.fix or "")
    [f] = [f for f in judge(_skewed(-30)) if f.check == "clock"]
    assert f.status == "warn" and "30 s ahead of" in f.message


def test_behind_nat_without_a_relay_slot_fails_and_with_one_passes() -> None:
    boot = f"/ip4/203.0.113.1/tcp/4001/p2p/{Identity.generate().peer_id}"
    lan = [f"/ip4/192.168.1.20/tcp/4001/p2p/{Identity.generate().peer_id}"]
    seen = "/ip4/198.51.100.7/tcp/53122"
    refused = _reached(
        boot, observed_addr=seen, relay_error="relay x refused the reservation: RESOURCE_LIMIT_EXCEEDED"
    )
    f = _facts(bound=lan, own_ips=["192.168.1.20"], bootstrap=[refused])
    reach = [x for x in judge(f) if x.check == "reachability"]
    assert (
        reach[0].status == "warn"
        and seen in reach[0].message
        and "forward TCP port 4001" in (reach[0].fix or "")
    )
    relay = [x for x in judge(f) if x.check == "relay"]
    assert relay[0].status == "fail" and "RESOURCE_LIMIT_EXCEEDED" in relay[0].message
    granted = _reached(
        boot, observed_addr=seen, relay_expires=1.0, relay_asked_at=1.0 - DEFAULT_RESERVATION_TTL
    )
    f = _facts(bound=lan, own_ips=["192.168.1.20"], bootstrap=[granted])
    assert [x.status for x in judge(f) if x.check == "relay"] == ["ok"]


def test_listening_on_loopback_only_with_a_remote_bootstrap_peer() -> None:
    me = Identity.generate().peer_id
    remote = _reached(f"/ip4/203.0.113.1/tcp/4001/p2p/{Identity.generate().peer_id}")
    f = _facts(
        listen=["/ip4/127.0.0.1/tcp/0"], bound=[f"/ip4/127.0.0.1/tcp/4001/p2p/{me}"], bootstrap=[remote]
    )
    bad = [x for x in judge(f) if x.check == "listen" and x.status == "fail"]
    assert bad and "0.0.0.0" in (bad[0].fix or "")


# -- dial-back (services/dialback.py) ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_bootstrap_node_dials_back_only_the_asker_and_only_so_often() -> None:
    import trio

    from modelnet_p2p import Peer
    from modelnet_p2p.cli.bootstrap import serve_dialback
    from modelnet_p2p.proto.framing import FrameDecoder, pack_frame
    from modelnet_p2p.services.dialback import MAX_PORTS, PROTOCOL_ID, ask_dialback

    with trio.fail_after(50):
        async with Peer(gossip=False) as server, Peer(gossip=False) as asker, Peer(gossip=False) as greedy:
            dialback = serve_dialback(server)
            for p in (asker, greedy):
                await p.connect(server.addrs[0])

            def opener(p: Peer) -> Any:
                return lambda: p.dialer.open_stream(server.peer_id, PROTOCOL_ID)

            own = int(asker.addrs[0].split("/tcp/")[1].split("/")[0])
            closed = free_port()
            answer = await ask_dialback(opener(asker), [own, closed])
            assert answer == {"ip": "127.0.0.1", "results": {str(own): "ok", str(closed): "refused"}}
            assert await ask_dialback(opener(asker), [own]) == {"error": "too-soon"}
            # ask_dialback sends at most MAX_PORTS; a peer sending more is refused
            stream = await greedy.dialer.open_stream(server.peer_id, PROTOCOL_ID)
            await stream.write(pack_frame({"ports": list(range(1000, 1001 + MAX_PORTS))}))
            decoder, frames = FrameDecoder(), []
            while not frames:
                frames = decoder.feed(await stream.read(1024))
            await stream.close()
            assert frames == [{"error": "bad-request"}]
            assert (dialback.answered, dialback.refused) == (1, 2)


def test_a_failed_dial_back_means_a_relay_is_needed() -> None:
    boot = f"/ip4/203.0.113.1/tcp/4001/p2p/{Identity.generate().peer_id}"
    me = [f"/ip4/192.168.1.20/tcp/4001/p2p/{Identity.generate().peer_id}"]
    dialback = {"ip": "198.51.100.7", "results": {"4001": "timeout"}}
    f = _facts(bound=me, bootstrap=[_reached(boot, dialback=dialback, relay_error="refused")])
    [reach] = [x for x in judge(f) if x.check == "reachability"]
    assert reach.status == "warn" and "198.51.100.7, TCP port 4001 (timeout)" in reach.message
    assert [x.status for x in judge(f) if x.check == "relay"] == ["fail"]
    ok = {"ip": "198.51.100.7", "results": {"4001": "ok"}}
    f = _facts(bound=me, bootstrap=[_reached(boot, dialback=ok, relay_error="refused")])
    [reach] = [x for x in judge(f) if x.check == "reachability"]
    assert reach.status == "ok" and "dialed it back" in reach.message
    assert [x.status for x in judge(f) if x.check == "relay"] == ["ok"]
