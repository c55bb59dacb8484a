"""Run a circuit relay (hop) in its own process, for tests that restart the relay.

::

    python tests/relay_worker.py --identity relay.key --listen /ip4/127.0.0.1/tcp/4001 [--ttl 3600]

Prints one JSON line, ``{"addr": "<listen addr>/p2p/<id>"}``, once the relay
serves, then runs until stdin closes or it is killed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p.log import quiet_libp2p
from modelnet_p2p.p2p.addresses import parse_multiaddr
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.services.relay import RelayService


async def main(args: argparse.Namespace) -> None:
    quiet_libp2p()
    host = build_host(Identity.load(args.identity))
    async with running_host(host, [parse_multiaddr(args.listen)]), trio.open_nursery() as nursery:
        relay = RelayService(host, hop=True, reservation_ttl=args.ttl)
        await relay.start(nursery)
        sys.stdout.write(json.dumps({"addr": str(host.get_addrs()[0])}) + "\n")
        sys.stdout.flush()
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        relay.stop()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--identity", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--ttl", type=int, default=3600)
    trio.run(main, parser.parse_args())
