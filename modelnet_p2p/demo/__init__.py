"""The narrated demo (:mod:`.narrated`, ``modelnet demo``) and its example models (:mod:`.models`)."""
