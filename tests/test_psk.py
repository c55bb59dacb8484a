"""Private meshes: peers with the same swarm key connect; a wrong key or none cannot (real hosts)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
from cli_util import background, modelnet, one_line_error, read_event

from modelnet_p2p import Capability, Peer
from modelnet_p2p.errors import ConfigError, ModelNetError
from modelnet_p2p.proto.swarmkey import format_swarm_key, new_swarm_key, parse_swarm_key


def key_file(tmp_path: Path, name: str, key: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(format_swarm_key(key or new_swarm_key()))
    return path


def test_swarm_key_file_format() -> None:
    key = bytes(range(32))
    text = format_swarm_key(key)
    assert text == b"/key/swarm/psk/1.0.0/\n/base16/\n" + key.hex().encode() + b"\n"
    assert parse_swarm_key(text) == key
    assert parse_swarm_key(text.replace(b"\n", b"\r\n")) == key
    assert parse_swarm_key(b"/key/swarm/psk/1.0.0/\n/base64/\n" + base64.b64encode(key)) == key
    assert parse_swarm_key(b"/key/swarm/psk/1.0.0/\n/bin/\n" + key) == key
    for bad in (
        b"",
        b"/key/swarm/psk/2.0.0/\n/base16/\n" + key.hex().encode(),
        b"/key/swarm/psk/1.0.0/\n/base58/\n" + key.hex().encode(),
        b"/key/swarm/psk/1.0.0/\n/base16/\n" + key.hex().encode()[:-2],
        b"/key/swarm/psk/1.0.0/\n/base16/\nzz" + key.hex().encode()[2:],
        b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"0" * 5000,
    ):
        with pytest.raises(ConfigError):
            parse_swarm_key(bad)


def echo_peer(peer: Peer) -> None:
    async def echo(request):  # type: ignore[no-untyped-def]
        yield request.input

    peer.serve(Capability(name="echo", task="tool"), echo)


async def test_right_key_connects_and_calls(tmp_path: Path) -> None:
    path = key_file(tmp_path, "swarm.key")
    async with Peer(psk=path) as server:
        echo_peer(server)
        async with Peer(psk=str(path)) as client:  # a path as str, too
            assert await client.connect(server.addrs[0]) == server.peer_id
            resp = await client.call(server.addrs[0], "echo", "private", timeout=20)
            assert resp.chunks == ["private"]
        async with Peer(psk=path.read_bytes()) as client:  # the file's contents
            assert (await client.call(server.addrs[0], "echo", "again", timeout=20)).chunks == ["again"]


async def test_wrong_key_and_no_key_cannot_connect(tmp_path: Path) -> None:
    """Each attempt fails in both directions, and neither side keeps a connection."""
    key = new_swarm_key()
    async with (
        Peer(psk=key_file(tmp_path, "a.key", key)) as a,
        Peer(psk=key) as a2,  # raw bytes work as well
        Peer(psk=key_file(tmp_path, "b.key")) as wrong,
        Peer() as plain,
    ):
        assert await a2.connect(a.addrs[0]) == a.peer_id  # the same key, as a control
        failures: list[str] = []

        async def attempt(dialer: Peer, target: Peer, label: str) -> None:
            with trio.fail_after(60):  # a keyless dial waits for the nonce timeout (10 s)
                try:
                    await dialer.connect(target.addrs[0])
                except ModelNetError:
                    failures.append(label)

        async with trio.open_nursery() as nursery:
            for dialer, target, label in (
                (wrong, a, "wrong->a"),
                (a, wrong, "a->wrong"),
                (plain, a, "plain->a"),
                (a, plain, "a->plain"),
            ):
                nursery.start_soon(attempt, dialer, target, label)
        assert sorted(failures) == sorted(["wrong->a", "a->wrong", "plain->a", "a->plain"])
        for x, y in ((a, wrong), (a, plain)):
            assert not x.dialer.is_connected(y.peer_id)
            assert not y.dialer.is_connected(x.peer_id)


async def test_keyless_client_sees_no_multistream(tmp_path: Path) -> None:
    """What a PSK peer sends a stranger is not libp2p in clear (nor anything it can decrypt)."""
    async with Peer(psk=key_file(tmp_path, "swarm.key")) as server:
        host, port = server.addrs[0].split("/")[2], int(server.addrs[0].split("/")[4])
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"\x13/multistream/1.0.0\n\x07/noise\n" + os.urandom(40))
            got = b""
            with trio.move_on_after(3):
                try:
                    while len(got) < 4096:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        got += data
                except trio.BrokenResourceError:
                    pass  # the peer reset the connection: also a refusal
        assert b"multistream" not in got and b"noise" not in got


async def test_relay_between_two_psk_peers(tmp_path: Path) -> None:
    path = key_file(tmp_path, "swarm.key")
    async with Peer(relay_hop=True, psk=path) as boot:
        addr = boot.addrs[0]
        async with (
            Peer(listen=[], bootstrap=[addr], reachability="private", psk=path) as hidden,
            Peer(bootstrap=[addr], psk=path) as client,
        ):
            assert len(hidden.addrs) == 1 and "/p2p-circuit/p2p/" in hidden.addrs[0]
            echo_peer(hidden)
            resp = await client.call(hidden.addrs[0], "echo", "through the relay", timeout=20)
            assert resp.chunks == ["through the relay"] and resp.peer == hidden.peer_id
            assert boot.relay is not None and boot.relay.reservations >= 1
        # a peer without the key reaches neither the relay nor, through it, the hidden peer
        async with Peer() as outsider:
            with pytest.raises(ModelNetError):
                with trio.fail_after(60):
                    await outsider.connect(addr)


async def test_bad_key_file_fails_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match="swarm key"):
        async with Peer(psk=bad):
            pass
    with pytest.raises(ConfigError, match="cannot read"):
        async with Peer(psk=tmp_path / "missing.key"):
            pass


def test_cli_psk_new(tmp_path: Path) -> None:
    out = modelnet("psk", "new")
    assert out.returncode == 0, out.stderr
    assert len(parse_swarm_key(out.stdout.encode())) == 32
    again = modelnet("psk", "new")
    assert again.stdout != out.stdout
    written = modelnet("psk", "new", "-o", "swarm.key", cwd=tmp_path)
    assert written.returncode == 0, written.stderr and written.stdout == ""
    path = tmp_path / "swarm.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(parse_swarm_key(path.read_bytes())) == 32
    assert "exists" in one_line_error(modelnet("psk", "new", "-o", "swarm.key", cwd=tmp_path))


def test_cli_serve_and_ask_with_psk_file(tmp_path: Path) -> None:
    key_file(tmp_path, "swarm.key")
    key_file(tmp_path, "other.key")
    with background(
        "serve", "modelnet_p2p.demo_models:echo", "--json", "--psk-file", "swarm.key", cwd=tmp_path
    ) as server:
        addr = read_event(server)["addrs"][0]
        ok = modelnet("ask", "echo", "psst", "--peer", addr, "--psk-file", "swarm.key", cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "psst"
        for extra in (["--psk-file", "other.key"], []):
            bad = modelnet("ask", "echo", "psst", "--peer", addr, *extra, cwd=tmp_path)
            assert bad.returncode == 1 and bad.stdout == "", bad.stderr


def test_every_peer_command_takes_psk_file() -> None:
    from modelnet_p2p.cli import cli

    for path in ("serve", "bootstrap", "ask", "discover", "status", "run", "gateway", "mesh up"):
        command: Any = cli
        for part in path.split():
            command = command.commands[part]
        assert "--psk-file" in {o for p in command.params for o in p.opts}, path
