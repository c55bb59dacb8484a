"""Logging policy: modelnet_p2p logs through :mod:`logging`; py-libp2p is silenced unless verbose.

py-libp2p 0.8.1 gives its ``libp2p`` logger a stderr handler of its own that does
not propagate, and logs WARNINGs for ordinary DHT traffic and a multi-line ERROR
for every failed stream. A library must not print that into its users' terminals,
so importing modelnet_p2p raises that logger's threshold. :func:`set_verbose`
restores it for debugging.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_libp2p", "set_verbose"]

_NOISY = ("libp2p", "multiaddr", "async_service", "aioquic", "zeroconf")


def quiet_libp2p() -> None:
    """Hide the networking stack's log records below CRITICAL."""
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def set_verbose(verbose: bool = True) -> None:
    """Show (``True``) or hide (``False``) the networking stack's own log records."""
    if not verbose:
        quiet_libp2p()
        return
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG)
