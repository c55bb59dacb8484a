"""Wire formats, as sans-I/O code: bytes in, messages out. Nothing here touches a socket."""
