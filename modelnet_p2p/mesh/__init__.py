"""The mesh: many peers seen as one pool of capabilities.

- :mod:`.routing`: the :class:`~.routing.Router` (power of two choices, least loaded or
  lowest latency; bans with a doubling backoff), pure bookkeeping;
- :mod:`.providers`: the candidates for a capability, capability cards joined with
  availability gossip;
- :mod:`.client`: the one :class:`~.client.MeshClient` that chooses, calls, fails over
  and replays, shared by the peer, the gateway and the collaboration patterns;
- :mod:`.context`: ``request.mesh``, nested calls that carry a request's deadline,
  cancellation and trace;
- :mod:`.collab`: pipelines, ensembles, routers, draft-verify and workflows.

Nothing here imports libp2p or the :class:`~modelnet_p2p.Peer`: the peer hands these
parts small interfaces (a connector, a stream pool, lookup callables).
"""
