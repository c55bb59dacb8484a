"""Joining the mesh from plain synchronous code, with no event loop in sight.

Run: python examples/sync_script.py

ThreadedPeer runs the peer on its own thread; its methods block.
"""

from __future__ import annotations

from modelnet_p2p import InferenceRequest
from modelnet_p2p.threaded import ThreadedPeer


def reverse_words(request: InferenceRequest):
    """A sync generator handler: each yielded item is streamed as a chunk."""
    yield from reversed(str(request.input).split())


def main() -> None:
    with ThreadedPeer() as server, ThreadedPeer() as client:
        server.serve("reverse", reverse_words)
        print(f"server {server.peer_id} serves 'reverse'")
        for chunk in client.infer(server.addrs[0], "reverse", "one two three four"):
            print("chunk:", chunk)
        answer = client.call(server.addrs[0], "reverse", "a b c")
        print("collected:", answer.chunks, "from", answer.peer)


if __name__ == "__main__":
    main()
