"""Workaround of a py-libp2p 0.8.1 yamux bug: a remote reset reads as an ordinary end of stream.

Upstream behaviour corrected: when the remote sends RST, yamux marks the stream
``reset_received`` and then finalizes it, removing its buffer; the next ``read()`` finds the
buffer gone and raises ``StreamEOF`` ("Stream was removed during read") instead of
``StreamReset``. A protocol that must tell a clean close from a reset (``specs/inference.md``:
a kept stream may be resent on only after a clean end of stream) cannot, from the exception
alone.

:func:`reset_by_remote` reads the flag yamux keeps (a public attribute of its stream), so a
caller that got ``StreamEOF`` can ask whether it was really a reset. Canaries in
``tests/test_compat_yamux.py`` fail once ``read()`` raises ``StreamReset`` by itself.
"""

from __future__ import annotations

from typing import Any

__all__ = ["reset_by_remote"]


def reset_by_remote(stream: Any) -> bool:
    """Whether the remote reset ``stream`` (a libp2p net stream), even if a read said EOF."""
    muxed = getattr(stream, "muxed_stream", None)
    return bool(getattr(muxed, "reset_received", False))
