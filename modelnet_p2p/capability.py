"""What a model can do: the :class:`Capability` a peer serves under a name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .wire.infer import MAX_CAPABILITY_LEN

__all__ = ["KNOWN_TASKS", "Capability"]

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


@dataclass(frozen=True)
class Capability:
    """A named thing a peer can do.

    Attributes:
        name: the name callers ask for, e.g. ``"echo"`` or ``"llama3-8b-chat"``.
        task: what kind of work it is (see :data:`KNOWN_TASKS`; free-form allowed).
        version: the version of the model or handler behind the name.
        description: one or two sentences for humans.
        tags: free-form labels used for discovery.
        idempotent: the same request always gives the same answer, so a failed
            stream may be replayed on another provider.
        max_concurrency: at most this many requests at once for this capability
            (``None``: only the peer's global limits apply).
        extra: further card fields; discovery defines them.
    """

    name: str
    task: str = "text-generation"
    version: str = "1.0"
    description: str = ""
    tags: tuple[str, ...] = ()
    idempotent: bool = False
    max_concurrency: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("capability name must be non-empty text")
        if len(self.name.encode()) > MAX_CAPABILITY_LEN:
            raise ConfigError(f"capability name is longer than {MAX_CAPABILITY_LEN} bytes")
        if not isinstance(self.task, str) or not self.task:
            raise ConfigError("capability task must be non-empty text")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1")
        if isinstance(self.tags, list):
            object.__setattr__(self, "tags", tuple(self.tags))
