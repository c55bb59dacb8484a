"""``modelnet serve --sign-receipts`` (PeerConfig.sign_receipts): every answer carries a signed
receipt in its end frame, asked for or not; and the receipt errors at the package root."""

from __future__ import annotations

from typing import Any

import trio

from modelnet_p2p import Peer
from modelnet_p2p.proto.framing import FrameDecoder, pack_frame
from modelnet_p2p.proto.infer import Request
from modelnet_p2p.proto.receipt import verify_receipt


async def end_frame(client: Peer, addr: str, text: str) -> dict[str, Any]:
    """Ask ``echo`` without asking for a receipt, on a raw stream; the end frame."""
    stream = await client.dialer.open_stream(addr, client.infer_protocol)
    try:
        await stream.write(pack_frame(Request(b"\x05" * 16, "echo", text).to_wire()))
        decoder = FrameDecoder()
        with trio.fail_after(20):
            while True:
                for frame in decoder.feed(await stream.read(65536)):
                    if frame.get("t") in ("end", "err"):
                        return frame
    finally:
        await stream.reset()


async def test_serve_sign_receipts_flag(tmp_path: Any) -> None:
    from cli_util import background, read_event

    for flags, signed in (([], False), (["--sign-receipts"], True)):
        with background("serve", "modelnet_p2p.demo_models:ALL", "--json", *flags, cwd=tmp_path) as server:
            ready = read_event(server)
            async with Peer() as client:
                end = await end_frame(client, ready["addrs"][0], "one two")
            assert end["t"] == "end"
            assert ("rcpt" in end) is signed
            if signed:
                receipt = verify_receipt(end["rcpt"], provider=ready["peer_id"], input="one two")
                assert receipt.capability == "echo" and receipt.caller == client.peer_id
            server.terminate()
            server.wait(20)


def test_receipt_errors_at_the_package_root() -> None:
    import modelnet_p2p
    from modelnet_p2p.mesh.client import ReplayMismatchError
    from modelnet_p2p.proto.receipt import Receipt, ReceiptError

    assert modelnet_p2p.ReceiptError is ReceiptError and "ReceiptError" in modelnet_p2p.__all__
    assert modelnet_p2p.ReplayMismatchError is ReplayMismatchError
    assert modelnet_p2p.Receipt is Receipt
    assert issubclass(ReceiptError, modelnet_p2p.ProtocolError)
