"""The one msgpack codec of modelnet_p2p: bounded decoding and canonical encoding.

Every byte a remote sends is decoded here, so the limits live here:

* :data:`MAX_DEPTH`: how deeply maps and arrays may nest. The root map is at
  depth 1, a value inside it at depth 2, and so on. msgpack-python's C decoder
  stops at 1024 on its own, which is deeper than any Python code that walks the
  result can safely recurse; JSON parsers pick similar bounds (Go's
  ``encoding/json`` 10,000, Rust's serde_json 128, Python's ``json`` the
  interpreter's recursion limit of about 1,000). 32 is far more than any
  message in ``specs/`` needs (the deepest is 4) and leaves room for request
  ``params``.
* :data:`MAX_CONTAINERS`: how many maps and arrays one decoded object may hold.
  A byte limit does not bound objects: an empty array is one byte on the wire
  but about 80 bytes decoded (74x measured); capping containers bounds that
  amplification (65,536 containers cost at most about 5 MiB).
* ``max_objects`` (frames pass :data:`~modelnet_p2p.proto.limits.MAX_FRAME_OBJECTS`):
  how many values one decoded object may hold in all, scalars included. Scalars
  amplify too (a two-character string is 3 bytes on the wire and about 64
  decoded, an int8 2 and 36), so a 1 MiB frame of them decodes to about 20 MiB.
  Every value but the root sits in a map or an array, so the hooks that count
  containers also count their entries, at no extra cost; msgpack's own
  ``max_array_len``/``max_map_len`` stop a single container before it is built.

Canonical msgpack (cards, availability records, receipts, tokens) means: map
keys are text, sorted by their UTF-8 bytes, without duplicates; integers,
text, bytes and arrays in their shortest forms; no nil, no extension types;
and floats only where the caller allows them (as float64). A canonical
decoder re-encodes what it decoded and rejects input that differs, so every
value has exactly one encoding.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import msgpack as _msgpack
from msgpack import Timestamp as _Timestamp

from ..errors import ProtocolError
from .limits import MAX_CONTAINERS, MAX_DEPTH

__all__ = [
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "canonical_packb",
    "check_depth",
    "packb",
    "packer",
    "unpack_canonical",
    "unpackb",
]


#: Largest body :func:`unpackb` decodes without its counting hooks (see there): 1.9 us a chunk
#: frame with them, 0.3 us without.
_SMALL_BODY = 4096


#: Every byte value but those that may start a map or an array (fixmap 0x80-0x8f, fixarray
#: 0x90-0x9f, array 16/32 0xdc/0xdd, map 16/32 0xde/0xdf), for ``bytes.translate`` to drop.
_NOT_CONTAINER_HEAD = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))


class _TooMany(Exception):
    pass


class _ExtType(Exception):
    pass


class _TooDeep(Exception):
    pass


def _no_ext(code: int, data: bytes) -> Any:
    raise _ExtType(code)


def packb(obj: Any) -> bytes:
    """Encode with ``bin`` for bytes and ``str`` for text (the form every spec here uses)."""
    return cast(bytes, _msgpack.packb(obj, use_bin_type=True))


def packer() -> Callable[[Any], bytes]:
    """A reusable encoder giving what :func:`packb` gives (``packb`` makes one per call, 0.3 us
    of a 0.4 us text chunk). Not thread-safe: one per user, such as a session."""
    pack: Callable[[Any], bytes] = _msgpack.Packer(use_bin_type=True).pack
    return pack


def check_depth(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`ProtocolError` if maps and arrays in ``obj`` nest deeper than ``max_depth``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(f"msgpack nesting deeper than {max_depth}")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))


def unpackb(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = MAX_DEPTH,
    max_containers: int = MAX_CONTAINERS,
    max_objects: int | None = None,
    allow_ext: bool = False,
    what: str = "msgpack value",
) -> Any:
    """Decode one msgpack value within the limits, or raise :class:`ProtocolError`.

    Text is decoded as UTF-8 (invalid UTF-8 is an error), bytes as ``bytes``,
    arrays as lists. Map keys may be of any hashable type here; callers that
    need text keys check them. Extension types (timestamps, type -1,
    included) are refused unless ``allow_ext``. Trailing bytes after the
    value are an error. With ``max_objects``, the value may hold at most that
    many values in all (the root, every container, every key and every item).
    """
    limit = max_objects if max_objects is not None else 2**62
    if len(data) <= min(_SMALL_BODY, limit, max_containers) and not allow_ext:
        # Small values (answer chunks, credit, most requests): every value takes a byte at
        # least, so the counts cannot exceed the length; depth is checked on the result and
        # timestamps (extension type -1, decoded without ext_hook) need a 0xff byte.
        small = bytes(data)
        if b"\xff" not in small:
            try:
                obj = _msgpack.unpackb(small, raw=False, strict_map_key=False, ext_hook=_no_ext)
            except _ExtType as exc:
                raise ProtocolError(f"{what} holds a msgpack extension type ({exc.args[0]})") from None
            except Exception as exc:  # ExtraData, ValueError, UnicodeDecodeError, ...
                raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})") from None
            # Each level of nesting takes a map or array header byte, so a body with at most
            # max_depth bytes that could be one nests no deeper (a batch of text chunks has 2):
            # the walk over the result is only for the rest.
            if len(small) > max_depth and len(small.translate(None, _NOT_CONTAINER_HEAD)) > max_depth:
                check_depth(obj, max_depth)
            return obj
    count = 0
    objects = 1
    native: dict[str, int] = {}
    if max_objects is not None:
        native = {"max_array_len": max_objects, "max_map_len": max_objects // 2}
    # Heights of the containers decoded so far that hold containers (a leaf's is 1), by id:
    # msgpack builds bottom-up, so each hook sees its children's heights, and the depth limit
    # is checked as the value is built, in the one pass over the items that also looks for
    # timestamps (no second walk over the result).
    heights: dict[int, int] = {}

    def height(items: Any) -> int:
        types = set(map(type, items))
        if _Timestamp in types and not allow_ext:
            # msgpack-python decodes extension type -1 (timestamps) itself, without
            # calling ext_hook, so the hooks look for what it made.
            raise _ExtType(-1)
        if list not in types and dict not in types:
            return 1
        h = 0
        for v in items:
            if type(v) is list or type(v) is dict:
                hv = heights.pop(id(v), 1)
                if hv > h:
                    h = hv
        if h >= max_depth:
            raise _TooDeep
        return h + 1

    def counted_list(value: list[Any]) -> Any:
        nonlocal count, objects
        count += 1
        objects += len(value)
        if count > max_containers or objects > limit:
            raise _TooMany
        if value and (h := height(value)) > 1:
            heights[id(value)] = h
        return value

    def counted_map(value: dict[Any, Any]) -> Any:
        nonlocal count, objects
        count += 1
        objects += 2 * len(value)
        if count > max_containers or objects > limit:
            raise _TooMany
        if value:
            if not allow_ext and _Timestamp in set(map(type, value)):
                raise _ExtType(-1)
            if (h := height(value.values())) > 1:
                heights[id(value)] = h
        return value

    try:
        obj = _msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            use_list=True,
            list_hook=counted_list,
            object_hook=counted_map,
            ext_hook=_msgpack.ExtType if allow_ext else _no_ext,
            **native,
        )
        if not allow_ext and type(obj) is _Timestamp:
            raise _ExtType(-1)
    except _TooDeep:
        raise ProtocolError(f"msgpack nesting deeper than {max_depth}") from None
    except _TooMany:
        if objects > limit:
            raise ProtocolError(f"{what} holds more than {limit} values") from None
        raise ProtocolError(f"{what} holds more than {max_containers} maps and arrays") from None
    except _ExtType as exc:
        raise ProtocolError(f"{what} holds a msgpack extension type ({exc.args[0]})") from None
    except ValueError as exc:
        if "exceeds max_" in str(exc):  # msgpack's own max_array_len / max_map_len
            raise ProtocolError(f"{what} holds more than {limit} values") from None
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})") from None
    except Exception as exc:  # msgpack raises ExtraData, ValueError, UnicodeDecodeError, ...
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})") from None
    return obj


def _canonical(obj: Any, allow_float: bool) -> Any:
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise ProtocolError("map keys must be text")
        return {k: _canonical(obj[k], allow_float) for k in sorted(obj, key=lambda k: k.encode())}
    if isinstance(obj, list | tuple):
        return [_canonical(v, allow_float) for v in obj]
    if isinstance(obj, bool | str | bytes):
        return obj
    if isinstance(obj, int):
        if not -(2**63) <= obj < 2**64:
            raise ProtocolError("integer out of the msgpack range")
        return obj
    if isinstance(obj, float) and allow_float:
        return obj
    raise ProtocolError(f"a {type(obj).__name__} cannot appear in a canonical value")


def canonical_packb(obj: Any, *, allow_float: bool = False) -> bytes:
    """Canonical msgpack of ``obj``: sorted text keys, shortest forms, no nil or extension types.

    Floats are refused unless ``allow_float`` (then they are encoded as float64).
    """
    return cast(bytes, _msgpack.packb(_canonical(obj, allow_float), use_bin_type=True))


def unpack_canonical(
    data: bytes,
    what: str,
    *,
    allow_float: bool = False,
    max_depth: int = MAX_DEPTH,
) -> dict[str, Any]:
    """Decode a canonical msgpack map, or raise :class:`ProtocolError` naming ``what``.

    Rejects anything but a map, non-text keys, nil, extension types, floats
    (unless ``allow_float``), nesting deeper than ``max_depth``, and any
    encoding other than the canonical one (duplicate keys, unsorted keys,
    non-shortest forms, ``str`` used for bytes).
    """
    obj = unpackb(data, max_depth=max_depth, what=what)
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a map")
    try:
        again = canonical_packb(obj, allow_float=allow_float)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc.message}") from None
    if again != data:
        raise ProtocolError(f"{what} is not canonically encoded")
    return obj
