"""Running a public test mesh: bootstrap lists (IP and DNS multiaddrs), ``--network testnet``
reading its list from a file or the environment, the hardened ``modelnet bootstrap``, and the
deployment files of ``examples/deploy/`` (systemd unit, Dockerfile).

Real peers on 127.0.0.1 (and ::1); DNS names are ``localhost`` or answered by a resolver the
test installs in trio, so no query leaves the machine.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio

from modelnet_p2p import ConfigError, Peer
from modelnet_p2p.config import load_config, network_bootstrap_var
from modelnet_p2p.p2p.addresses import parse_bootstrap_list
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.resolve import resolve_addr

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "examples" / "deploy"

ID1 = str(Identity.generate().peer_id)
ID2 = str(Identity.generate().peer_id)


# -- bootstrap lists ------------------------------------------------------------------------


def test_a_bootstrap_list_takes_ip_and_dns_multiaddrs_with_comments() -> None:
    text = f"""
    # the test mesh's bootstrap nodes
    /dns4/boot-1.example.org/tcp/4001/p2p/{ID1}   # Europe
    /dns6/boot-2.example.org/tcp/4001/p2p/{ID2}
    /ip4/203.0.113.7/tcp/4001/p2p/{ID1}, /ip6/2001:db8::7/tcp/4001/p2p/{ID2}
    /dns/boot-3.example.org/tcp/4001/p2p/{ID1}

    /dns4/boot-1.example.org/tcp/4001/p2p/{ID1}
    """
    assert parse_bootstrap_list(text) == [
        f"/dns4/boot-1.example.org/tcp/4001/p2p/{ID1}",
        f"/dns6/boot-2.example.org/tcp/4001/p2p/{ID2}",
        f"/ip4/203.0.113.7/tcp/4001/p2p/{ID1}",
        f"/ip6/2001:db8::7/tcp/4001/p2p/{ID2}",
        f"/dns/boot-3.example.org/tcp/4001/p2p/{ID1}",
    ]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("/ip4/203.0.113.7/tcp/4001", "/p2p/<peer id>"),
        (f"/ip4/203.0.113.7/udp/4001/quic/p2p/{ID1}", "/p2p/<peer id>"),
        ("/ip4/203.0.113.7/tcp/4001/p2p/notapeerid", "not a multiaddr"),
        (f"/dnsaddr/example.org/p2p/{ID1}", "/p2p/<peer id>"),
        ("boot.example.org:4001", "not a multiaddr"),
    ],
)
def test_a_bad_bootstrap_line_is_named_with_its_line_number(line: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bootstrap_list(f"# header\n{line}\n", "testnet.txt")
    assert "testnet.txt, line 2" in err.value.message and why in err.value.message


def test_network_testnet_reads_its_list_from_the_environment_or_a_file(tmp_path: Path) -> None:
    var = network_bootstrap_var("testnet")
    assert var == "MODELNET_TESTNET_BOOTSTRAP"
    listed = f"/dns4/boot-1.example.org/tcp/4001/p2p/{ID1},/ip4/203.0.113.7/tcp/4001/p2p/{ID2}"
    cfg, sources = load_config(env={var: listed}, flags={"network": "testnet"})
    assert cfg.bootstrap == listed.split(",") and sources["bootstrap"] == "network testnet"
    cfg, _ = load_config(env={var: listed}, flags={"network": "local"})
    assert cfg.bootstrap == []  # another network's list is not used
    listfile = tmp_path / "testnet.txt"
    listfile.write_text(f"# ours\n/dns6/boot-2.example.org/tcp/4001/p2p/{ID2}\n")
    cfg, sources = load_config(
        env={"MODELNET_BOOTSTRAP_FILE": str(listfile), var: listed}, flags={"network": "testnet"}
    )
    assert cfg.bootstrap == [f"/dns6/boot-2.example.org/tcp/4001/p2p/{ID2}"]
    assert sources["bootstrap"] == f"bootstrap list {listfile}"
    # an explicit --bootstrap wins over both
    flag = f"/ip4/198.51.100.1/tcp/4001/p2p/{ID1}"
    cfg, _ = load_config(
        env={"MODELNET_BOOTSTRAP_FILE": str(listfile)}, flags={"network": "testnet", "bootstrap": [flag]}
    )
    assert cfg.bootstrap == [flag]
    with pytest.raises(ConfigError, match="cannot read bootstrap list"):
        load_config(
            env={"MODELNET_BOOTSTRAP_FILE": str(tmp_path / "missing.txt")}, flags={"network": "testnet"}
        )


class _Resolver(trio.abc.HostnameResolver):
    """Answers ``names`` itself (no query leaves the machine); anything else is unknown."""

    def __init__(self, names: dict[str, tuple[int, str]]) -> None:
        self.names = names

    async def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        fam, ip = self.names[name]
        if family not in (0, fam):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        sockaddr = (ip, 0, 0, 0) if fam == socket.AF_INET6 else (ip, 0)
        return [(fam, socket.SOCK_STREAM, 6, "", sockaddr)]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


@pytest.mark.timeout(90)
async def test_peers_bootstrap_from_dns4_and_dns6_addresses() -> None:
    trio.socket.set_custom_hostname_resolver(
        _Resolver({"boot4.test": (socket.AF_INET, "127.0.0.1"), "boot6.test": (socket.AF_INET6, "::1")})
    )
    try:
        with trio.fail_after(60):
            async with (
                Peer(gossip=False) as boot4,
                Peer(listen=["/ip6/::1/tcp/0"], gossip=False) as boot6,
            ):
                port4 = multiaddr.Multiaddr(boot4.addrs[0]).value_for_protocol("tcp")
                port6 = multiaddr.Multiaddr(boot6.addrs[0]).value_for_protocol("tcp")
                dns4 = f"/dns4/boot4.test/tcp/{port4}/p2p/{boot4.peer_id}"
                dns6 = f"/dns6/boot6.test/tcp/{port6}/p2p/{boot6.peer_id}"
                assert [str(a) for a in await resolve_addr(multiaddr.Multiaddr(dns6))] == [
                    f"/ip6/::1/tcp/{port6}/p2p/{boot6.peer_id}"
                ]
                assert await resolve_addr(multiaddr.Multiaddr(f"/dns4/unknown.test/tcp/1/p2p/{ID1}")) == []
                async with Peer(
                    bootstrap=[dns4, dns6], require_bootstrap=True, gossip=False, reachability="public"
                ) as joiner:
                    assert joiner.dialer.is_connected(boot4.peer_id)
                    assert joiner.dialer.is_connected(boot6.peer_id)
    finally:
        trio.socket.set_custom_hostname_resolver(None)
