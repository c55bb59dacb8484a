"""``python -m modelnet_p2p.cli``: the same as the ``modelnet`` command."""

from . import main

main()
