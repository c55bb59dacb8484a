"""Identity key files and the `modelnet id` command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from modelnet_p2p import Identity, IdentityError, Peer
from modelnet_p2p.p2p.identity import verify_signature
from modelnet_p2p.proto import peerid


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "peer.key"
    ident = Identity.generate()
    ident.save(path)
    assert (os.stat(path).st_mode & 0o777) == 0o600
    again = Identity.load(path)
    assert again.peer_id == ident.peer_id
    assert str(ident.peer_id).startswith("12D3KooW")


def test_passphrase(tmp_path):
    path = tmp_path / "enc.key"
    ident = Identity.generate()
    ident.save(path, passphrase=b"hunter2")
    assert b"ENCRYPTED" in path.read_bytes()
    with pytest.raises(IdentityError, match="passphrase is needed"):
        Identity.load(path)
    with pytest.raises(IdentityError, match="passphrase is wrong"):
        Identity.load(path, passphrase=b"wrong")
    assert Identity.load(path, passphrase=b"hunter2").peer_id == ident.peer_id


def test_refuses_readable_by_others(tmp_path):
    path = tmp_path / "open.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="accessible by other users"):
        Identity.load(path)


def test_malformed_and_missing(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(IdentityError, match="not a valid PEM"):
        Identity.load(bad)
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "missing.key")


def test_refuses_non_ed25519(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        Identity.load(path)


def test_never_overwrites(tmp_path):
    path = tmp_path / "peer.key"
    Identity.generate().save(path)
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path)


def test_load_or_create_is_stable(tmp_path):
    path = tmp_path / "sub" / "peer.key"
    first = Identity.load_or_create(path)
    second = Identity.load_or_create(path)
    assert first.peer_id == second.peer_id


def test_signatures():
    ident = Identity.generate()
    sig = ident.sign(b"payload")
    assert verify_signature(ident.peer_id, b"payload", sig)
    assert verify_signature(str(ident.peer_id), b"payload", sig)
    assert not verify_signature(ident.peer_id, b"other", sig)
    assert not verify_signature(Identity.generate().peer_id, b"payload", sig)
    assert not verify_signature("garbage", b"payload", sig)
    assert verify_signature(ident.peer_id.to_bytes(), b"payload", sig)
    assert not verify_signature(ident.peer_id, b"payload", sig[:32])


def test_peer_id_is_derived_without_libp2p_too():
    # The libp2p-free codec in proto/ and the libp2p host agree on the peer id.
    ident = Identity.generate()
    raw = peerid.peer_id_from_public_key(ident.public_key_bytes)
    assert raw == ident.peer_id.to_bytes()
    assert peerid.peer_id_text(raw) == str(ident.peer_id)
    sig = ident.sign(b"x")
    assert peerid.verify_signature(str(ident.peer_id), b"x", sig)


async def test_peer_uses_key_file(tmp_path):
    path = tmp_path / "peer.key"
    async with Peer(identity=path) as p1:
        first = p1.peer_id
    async with Peer(identity=str(path)) as p2:
        assert p2.peer_id == first
        assert not p2.identity.ephemeral


async def test_peer_without_identity_is_ephemeral(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="modelnet_p2p"):
        async with Peer() as p:
            assert p.identity.ephemeral
    assert any("ephemeral" in r.getMessage() for r in caplog.records)


def _modelnet(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "modelnet_p2p.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_id_creates_then_reuses(tmp_path):
    out1 = _modelnet("id", "--identity", "node.key", cwd=tmp_path)
    assert out1.returncode == 0, out1.stderr
    pid = out1.stdout.strip()
    assert pid.startswith("12D3KooW")
    assert (os.stat(tmp_path / "node.key").st_mode & 0o777) == 0o600
    out2 = _modelnet("id", "--identity", "node.key", cwd=tmp_path)
    assert out2.stdout.strip() == pid


def test_cli_id_bad_key_is_one_line(tmp_path):
    (tmp_path / "bad.key").write_text("junk")
    os.chmod(tmp_path / "bad.key", 0o600)
    out = _modelnet("id", "--identity", "bad.key", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "Traceback" not in out.stderr
    assert "not a valid PEM" in out.stderr


def test_cli_version_and_bad_flag(tmp_path):
    out = _modelnet("--version", cwd=tmp_path)
    assert out.returncode == 0 and "modelnet" in out.stdout
    bad = _modelnet("--no-such-flag", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
