"""What a model can do: the :class:`Capability` a peer serves under a name.

A capability is also what a peer announces in its signed capability card
(``specs/capability.md``); the card fields are all optional here, and the
limits they must respect on the wire live in :mod:`modelnet_p2p.proto.card`.

Names, tasks, tags and versions are compared after :func:`normalize`, and a
capability is looked up by :func:`capability_key` (its normalized name)
everywhere: by the inference server, by discovery and by ``serve()``'s check
that two capabilities do not collide. ``Echo`` and ``echo`` are the same
capability.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import ConfigError
from .limits import MAX_CAPABILITY_LEN

__all__ = [
    "ACCESS_POLICIES",
    "AMOUNT_PATTERN",
    "KNOWN_MODALITIES",
    "KNOWN_TASKS",
    "WHITE_SPACE",
    "Capability",
    "CostHint",
    "capability_key",
    "normalize",
]

#: Task names with an agreed meaning. Any other non-empty text is allowed as a free-form task.
KNOWN_TASKS = frozenset(
    {
        "text-generation",
        "chat",
        "embedding",
        "classification",
        "translation",
        "summarization",
        "tool",
    }
)

#: Input/output modalities with an agreed meaning; other short tokens (or MIME types) are allowed.
KNOWN_MODALITIES = frozenset({"text", "image", "audio", "video", "json", "embedding", "file"})

_DEFAULT_TASK = "text-generation"
#: Who may call a capability (``Capability.access``).
ACCESS_POLICIES = ("public", "token", "allowlist")

#: The Unicode ``White_Space`` property (PropList.txt, unchanged since Unicode
#: 6.3): the 25 code points :func:`normalize` strips from both ends. Written
#: out so that the set does not follow Python's ``str.isspace``, which also
#: counts U+001C-U+001F and may change with the Unicode version.
WHITE_SPACE = "".join(
    chr(c)
    for c in (
        *range(0x0009, 0x000E),
        0x0020,
        0x0085,
        0x00A0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    )
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
#: The grammar of :attr:`CostHint.amount` (ASCII only): ``0`` or up to 18
#: digits without a leading zero, optionally ``.`` and 1-18 digits.
AMOUNT_PATTERN = re.compile(r"(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,18})?")


def _nfkc(text: str) -> str:
    return unicodedata.ucd_3_2_0.normalize("NFKC", text)


def normalize(text: str) -> str:
    """How names, tasks, tags and versions are compared and hashed (``specs/capability.md``).

    ``strip(NFKC(ascii_lower(NFKC(text))))``, where NFKC uses the Unicode
    3.2.0 database (as stringprep, RFC 3454, does; code points unassigned in
    3.2.0 pass through unchanged), ``ascii_lower`` maps only ``A``-``Z`` to
    ``a``-``z`` (as DNS compares names, RFC 4343), and ``strip`` removes the
    :data:`WHITE_SPACE` code points from both ends. The result is the same on
    every Python version, and ``normalize(normalize(s)) == normalize(s)``.
    """
    return _nfkc(_nfkc(text).translate(_ASCII_LOWER)).strip(WHITE_SPACE)


def capability_key(name: str) -> str:
    """The form a capability name is matched by: :func:`normalize` of it.

    The inference server looks capabilities up by this key, discovery derives
    the model's DHT key from it, and ``serve()`` refuses a second capability
    with the same key.
    """
    return normalize(name)


@dataclass(frozen=True)
class CostHint:
    """What a capability roughly costs, for routing decisions; not a contract.

    Attributes:
        amount: a non-negative decimal number, kept as text so that it is
            exact and encodes the same way in every language (``"0.002"``).
        currency: ``"USD"``, ``"EUR"``, ``"credits"``, ...
        per: the unit priced, e.g. ``"1k tokens"``, ``"request"``, ``"second"``.
    """

    amount: str
    currency: str = "USD"
    per: str = "1k tokens"

    def __post_init__(self) -> None:
        amount: Any = self.amount
        if isinstance(amount, bool) or not isinstance(amount, str | int | float):
            raise ConfigError("cost amount must be a decimal number or its text")
        if isinstance(amount, float) and not math.isfinite(amount):
            raise ConfigError("cost amount must be finite")
        if isinstance(amount, str):
            text = amount
        else:
            try:
                text = format(Decimal(repr(amount)), "f")
            except InvalidOperation:
                raise ConfigError(f"cost amount {amount!r} is not a decimal number") from None
            if "." in text:
                text = text.rstrip("0").rstrip(".")
        if AMOUNT_PATTERN.fullmatch(text) is None:
            raise ConfigError(
                f"cost amount {text[:40]!r} must be a non-negative decimal number in ASCII digits "
                "(0 or 1-18 digits without a leading zero, then optionally '.' and 1-18 digits)"
            )
        object.__setattr__(self, "amount", text)
        for name in ("currency", "per"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"cost {name} must be non-empty text")


def _schema(value: Any, what: str) -> Mapping[str, Any] | None:
    """A JSON schema given as a mapping or as JSON text; kept as a mapping."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a JSON object (a mapping)")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} cannot be written as JSON: {exc}") from None
    return value


def _texts(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{what} must be a sequence of text") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"each of {what} must be non-empty text")
    return items


@dataclass(frozen=True)
class Capability:
    """A named thing a peer can do.

    Attributes:
        name: the name callers ask for, e.g. ``"echo"`` or ``"llama3-8b-chat"``.
            Discovery calls it the *model* name.
        task: the primary task (see :data:`KNOWN_TASKS`; free-form allowed).
            Left empty, it is the first of ``tasks``, else ``"text-generation"``.
        version: the version of the model or handler behind the name.
        description: one or two sentences for humans.
        tags: free-form labels used for discovery.
        idempotent: the same request always gives the same answer, so a failed
            stream may be replayed on another provider.
        max_concurrency: at most this many requests at once for this capability
            (``None``: only the peer's global limits apply).
        extra: further fields that travel nowhere; fields of a received card that
            this version does not know land here.
        tasks: every task, the primary first (filled in from ``task`` if empty).
        family: the model family, e.g. ``"llama3"``.
        input_modalities: what requests carry, e.g. ``("text", "image")``
            (see :data:`KNOWN_MODALITIES`; empty: not stated).
        output_modalities: what answers carry.
        input_schema: a JSON schema of the request input (mapping or JSON text).
        params_schema: a JSON schema of the request parameters.
        context_length: the model's context window, in tokens.
        languages: BCP 47 language tags, e.g. ``("en", "fr")``.
        license: an SPDX license id or short license name.
        cost: an optional :class:`CostHint`.
        access: who may call it: ``"public"``, ``"token"`` (a capability token,
            ``specs/token.md``) or ``"allowlist"`` (the peer ids in ``allow``). Cards
            announce it; ``allow`` itself travels nowhere.
        allow: the peer ids an ``"allowlist"`` capability admits.
    """

    name: str
    task: str = ""
    version: str = "1.0"
    description: str = ""
    tags: tuple[str, ...] = ()
    idempotent: bool = False
    max_concurrency: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    tasks: tuple[str, ...] = ()
    family: str = ""
    input_modalities: tuple[str, ...] = ()
    output_modalities: tuple[str, ...] = ()
    input_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    params_schema: Mapping[str, Any] | None = field(default=None, hash=False)
    context_length: int | None = None
    languages: tuple[str, ...] = ()
    license: str = ""
    cost: CostHint | None = None
    access: str = "public"
    allow: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not capability_key(self.name):
            raise ConfigError("capability name must be text that is not empty or only white space")
        if len(self.name.encode()) > MAX_CAPABILITY_LEN:
            raise ConfigError(f"capability name is longer than {MAX_CAPABILITY_LEN} bytes")
        if not isinstance(self.task, str):
            raise ConfigError("capability task must be text")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1")
        if self.context_length is not None and (
            isinstance(self.context_length, bool)
            or not isinstance(self.context_length, int)
            or self.context_length < 1
        ):
            raise ConfigError("context_length must be a positive integer")
        for name in ("version", "description", "family", "license"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"capability {name} must be text")
        tasks = _texts(self.tasks, "tasks")
        primary = self.task or (tasks[0] if tasks else _DEFAULT_TASK)
        object.__setattr__(self, "task", primary)
        object.__setattr__(self, "tasks", tuple(dict.fromkeys((primary, *tasks))))
        for name in ("tags", "input_modalities", "output_modalities", "languages"):
            object.__setattr__(self, name, _texts(getattr(self, name), name))
        object.__setattr__(self, "input_schema", _schema(self.input_schema, "input_schema"))
        object.__setattr__(self, "params_schema", _schema(self.params_schema, "params_schema"))
        if isinstance(self.cost, Mapping):
            object.__setattr__(self, "cost", CostHint(**self.cost))
        elif self.cost is not None and not isinstance(self.cost, CostHint):
            raise ConfigError("cost must be a CostHint (or a mapping of its fields)")
        if self.access not in ACCESS_POLICIES:
            raise ConfigError(f"access must be one of {', '.join(ACCESS_POLICIES)}, not {self.access!r}")
        object.__setattr__(self, "allow", frozenset(_texts(self.allow, "allow")))
