"""What a healing method is (:class:`HealingMethod`) and the registry of them (:data:`HEALING`).

A healing method recovers what a removal cost. It declares what it needs (the uncollapsed teacher, training
arguments) and what it can heal (a removal of whole blocks only, or of sub-layers too), and heals a copy of the
student (:meth:`HealingMethod.run`). A new one is one file with one subclass and one registration:
``HEALING.register(MyHealing())``; :func:`hf_collapse.heal`, ``hf-collapse prune --heal`` and
``hf-collapse lacoot --heal`` then offer it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..registry import Registry

__all__ = ["HEALING", "HealingMethod"]


class HealingMethod:
    """A way to heal a collapsed model.

    Attributes:
        name: what ``method=`` (and ``--heal``) names it by.
        description: a few words for ``--help`` and errors.
        trains: whether it trains (it then needs ``transformers.TrainingArguments``).
        whole_blocks_only: whether it heals only removals of whole blocks (a sub-layer removal is refused before any
            work).
        learning_rate: the learning rate the jobs give it unless told otherwise (``None``: the job's own default).
    """

    name: str = ""
    description: str = ""
    trains: bool = True
    whole_blocks_only: bool = False
    learning_rate: float | None = None

    def needs_teacher(self, options: Mapping[str, Any]) -> bool:
        """Whether, with these options, it needs the uncollapsed teacher model."""
        return True

    def run(self, student: nn.Module, teacher: nn.Module | None, train_dataset, args, **options: Any) -> nn.Module:
        """Heal ``student`` (a copy :func:`hf_collapse.heal` made: change it in place) and return the healed model,
        a plain model of the student's class."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


#: The methods of :func:`hf_collapse.heal`.
HEALING: Registry[HealingMethod] = Registry(
    "healing method", how="add one with hf_collapse.healing.HEALING.register(<a HealingMethod>)"
)
