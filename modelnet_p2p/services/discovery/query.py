"""What a discovery looks for, and the one provider key it looks up (see ``specs/capability.md``).

Names, tasks, versions and tags are compared case-insensitively, after
:func:`~modelnet_p2p.proto.card.normalize`, both in the provider key and in the card check,
so ``Query(model="LLaMA3")`` finds the cards that list ``llama3``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...proto.capability import capability_key
from ...proto.card import CapabilityCard, model_key, model_version_key, normalize, tag_key, task_key

__all__ = ["Query"]


@dataclass(frozen=True)
class Query:
    """What :meth:`Discovery.find` looks for; every given criterion must match one capability."""

    task: str | None = None
    model: str | None = None
    version: str | None = None
    tags: tuple[str, ...] = ()

    def key(self) -> tuple[str, bytes]:
        """``(label, key)``: the provider key of the most specific criterion given."""
        if self.model is not None and self.version is not None:
            label = f"model-version:{capability_key(self.model)}@{normalize(self.version)}"
            return label, model_version_key(self.model, self.version)
        if self.model is not None:
            return f"model:{capability_key(self.model)}", model_key(self.model)
        if self.task is not None:
            return f"task:{normalize(self.task)}", task_key(self.task)
        if self.tags:
            return f"tag:{normalize(self.tags[0])}", tag_key(self.tags[0])
        raise ValueError("give at least one of task, model or tags")

    def matches(self, card: CapabilityCard) -> bool:
        """Whether one capability of ``card`` meets every criterion."""
        return bool(card.matching(task=self.task, model=self.model, version=self.version, tags=self.tags))
