"""p2p/_compat."""
