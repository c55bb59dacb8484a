"""Workarounds of py-libp2p 0.8.1 bugs: the only code that reaches into libp2p's internals.

Only this package touches an underscore attribute of a libp2p object, subclasses a libp2p
class or proxies one (``tests/test_layers.py`` checks it). Each module's docstring names the
upstream behaviour every shim corrects, and ``tests/test_compat_<module>.py`` holds canaries
that fail once upstream changes that behaviour; then the shim can go.

:mod:`.host` (the host and swarm; canaries in ``tests/test_compat_host.py``)
    - ``check_port_free``: the TCP listener binds with ``SO_REUSEPORT``, so a second host on a
      taken port "succeeds" and the kernel splits connections between the two.
    - ``close_connections``: leaving ``host.run()`` closes connections unshielded (sockets leak)
      and ``host.close()`` closes them one by one, 0.2 s each. (``running_host`` also always
      calls ``host.close()``: leaving ``host.run()`` keeps the TCP listener open.)
    - ``disable_auto_connector``: the auto-connector dials every peer in the peerstore whatever
      the watermarks say.
    - ``guard_handler``: an exception escaping a stream handler stops the whole host.
    - ``retire_stream_handler``: removing a handler races multistream-select (``KeyError``).

:mod:`.relay` (circuit relay v2; canaries in ``tests/test_compat_relay.py``)
    ``CircuitRelay`` (a ``CircuitV2Protocol``) and ``relay_limits``:
    - concurrent circuits to one peer are filed under its peer id and close each other;
    - the per-peer circuit limit is checked before an await and counted after it;
    - RESERVE trusts the peer id named in the message;
    - reservations of disconnected peers keep their slots until they expire;
    - a data limit of 0 lets nothing pass;
    - stopping the service removes its handlers (the race above) and closes circuits unshielded.

:mod:`.kad` (Kademlia; canaries in ``tests/test_compat_kad.py``)
    ``KadHostView`` (``protocol_prefix`` ignored: always ``/ipfs/kad/1.0.0``),
    ``MeshProviderStore``, ``MeshKadDHT``, ``store_value``, ``refuse_streams``.

:mod:`.yamux` (the stream muxer; canaries in ``tests/test_compat_yamux.py``)
    - ``reset_by_remote``: a remote reset reads as ``StreamEOF``, not ``StreamReset``.
    - ``LeanYamux``, ``run_keepalive``, ``start_keepalive``: every connection runs its own RTT
      ping loop and stale-stream sweeper; one task per host does their work instead, pinging
      only silent connections.
    - ``use_muxer_classes``: the yamux class configured in ``muxer_opt`` is ignored.
    - ``LeanYamux`` also enforces the receive window (upstream buffers past it and only logs)
      and drops unread data of reset streams; ``discard_incoming``: a stream closed locally
      keeps buffering what arrives until the remote ends it.
    - ``LeanYamux`` and ``FastLock`` for bulk: writes joined per window, go-yamux's window
      updates with a 2 MiB window, locks that do not yield when free, the Noise fast path.

:mod:`.netstream` (the swarm's streams; canaries in ``tests/test_compat_netstream.py``)
    ``LeanNetStream``, ``install``: ``NetStream`` takes a ``trio.Lock`` (a trip through the
    scheduler even when free) at every read and write.

:mod:`.noise` (the Noise transport's reads and writes; canaries in ``tests/test_compat_noise.py``)
    ``NoiseFastPath``, ``install``: a 64 KiB yamux frame goes out as two Noise messages with a
    raw write each, and every read costs several system calls and copies.

:mod:`.pnet` (the private-network protector; canaries in ``tests/test_compat_pnet.py``)
    ``PnetConn``, ``protect``, ``install``, ``protect_outbound``: upstream's pnet uses Salsa20
    with an 8-byte nonce (no other implementation speaks it), reads the nonce with one short
    read, and leaves outbound relayed connections unprotected.

:mod:`.pubsub` (GossipSub; canaries in ``tests/test_compat_pubsub.py``)
    ``BufferedReads``, ``GuardedPubsub``, ``LeanGossipSub``, ``build_router``,
    ``build_pubsub``, ``announce_subscription``, ``trim_delivery_log``,
    ``registered_pubsub_protocols`` and the helpers beside them.

:mod:`.notifees` (the swarm's notifee fan-out; canaries in ``tests/test_compat_notifees.py``)
    ``install``: every stream opened or closed costs a task per notifee (six here), though
    every notifee's stream methods are trivial; they are called inline instead.
:mod:`.taskparent` (the service manager; canaries in ``tests/test_compat_taskparent.py``)
    ``install``: every task a manager starts (two per new connection, in the swarm) walks all
    the manager's tasks to find its parent; an index per manager finds it instead.
"""
