"""Layer 1, sans-I/O: the wire formats of ``specs/`` as pure functions and state machines.

Nothing here does I/O, reads a clock (time is a parameter) or imports trio or
libp2p, so every codec can be tested, fuzzed and reimplemented from the specs
alone. Bad input raises :class:`~modelnet_p2p.errors.ProtocolError`.

* :mod:`.packing`: bounded msgpack decoding and the canonical encoder;
  :mod:`.limits`: the wire limits several specs share.
* :mod:`.peerid`: Ed25519 peer ids (base58btc, binary form, signatures).
* :mod:`.envelope`: the signed envelope of cards and availability records.
* :mod:`.capability`, :mod:`.card`, :mod:`.card_keys`: capabilities, signed
  capability cards and their DHT keys (``specs/capability.md``).
* :mod:`.availability`: availability records (``specs/availability.md``).
* :mod:`.framing`, :mod:`.infer`, :mod:`.session`: frames, messages and the
  client and server session state machines of the inference protocol
  (``specs/inference.md``).

Import from the submodules; this package re-exports nothing.
"""
