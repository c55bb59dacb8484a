"""The OpenAI edges of the mesh.

* :mod:`.conventions`: how OpenAI-style capabilities look on the mesh (tasks, params, chunks).
* :mod:`.translate`: OpenAI request bodies to mesh requests and mesh answers to OpenAI
  answers and stream chunks (pure functions).
* :mod:`.errors`: :class:`~.errors.GatewayError`, OpenAI's error JSON, and the HTTP answer
  for each mesh error (pure).
* :mod:`.catalog`: the models the gateway serves, from capability cards.
* :mod:`.metrics`: the gateway's counters in the Prometheus text format.
* :mod:`.calls`: the gateway's requests into the mesh (through the mesh's one client).
* :mod:`.sse`: streamed answers as server-sent events.
* :mod:`.settings`: :class:`~.settings.GatewayConfig`, every default of the gateway.
* :mod:`.keys`: the gateway's API keys, each with its mesh token and rate limit (pure).
* :mod:`.app`: the gateway itself, ``modelnet gateway`` (starlette on hypercorn).
* :mod:`.upstream`: an OpenAI-compatible server served on the mesh,
  ``modelnet serve openai+http://...``.

Nothing is imported here, so that the upstream adapter does not need the gateway's HTTP server
packages; import from the modules. ``from openai import OpenAI`` inside this package still
means the official client: every import here is absolute or explicitly relative.
"""
