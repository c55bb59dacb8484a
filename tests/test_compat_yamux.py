"""Canaries of ``modelnet_p2p.p2p._compat.yamux``: they fail once py-libp2p reports a remote
reset to a reader as ``StreamReset`` on its own (then the shim can go)."""

from __future__ import annotations

import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

from modelnet_p2p.p2p._compat.yamux import reset_by_remote
from modelnet_p2p.testing import open_peers

PROBE = TProtocol("/modelnet-test/reset-probe/1")


async def _ending(how: bytes) -> tuple[type[BaseException] | None, bool]:
    async with open_peers(2) as (a, b):

        async def handler(stream):
            await stream.read(16)
            if how == b"reset":
                await stream.reset()
            else:
                await stream.close()

        b.host.set_stream_handler(PROBE, handler)
        await a.connect(b.addrs[0])
        stream = await a.host.new_stream(b.identity.peer_id, [PROBE])
        await stream.write(how)
        raised: type[BaseException] | None = None
        with trio.fail_after(5):
            try:
                await stream.read(16)
            except Exception as exc:
                raised = type(exc)
        flag = reset_by_remote(stream)
        await stream.reset()
        return raised, flag


async def test_remote_reset_still_reads_as_end_of_stream():
    raised, flag = await _ending(b"reset")
    assert raised is StreamEOF  # the upstream bug: not StreamReset
    assert flag  # the shim tells it apart


async def test_remote_close_reads_as_end_of_stream_without_the_reset_flag():
    raised, flag = await _ending(b"close")
    assert raised is StreamEOF
    assert not flag
