"""Services: one module per protocol, each composed by :class:`modelnet_p2p.Peer`."""
