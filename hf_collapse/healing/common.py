"""What every healing method shares: checking the student against its teacher, and calibration batches."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures.base import adapter_for, unwrap_model
from ..surgery import collapse_record, find_blocks

__all__ = ["RemovedSpan", "calibration_batches", "check_teacher", "removed_spans"]


def check_teacher(student: nn.Module, teacher: nn.Module) -> str:
    """The family of ``student`` and ``teacher``; ``ValueError`` when they differ or the teacher is no model."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch model (the uncollapsed one), got {type(teacher).__name__}")
    student_family = adapter_for(student).family
    teacher_family = adapter_for(teacher).family
    if student_family != teacher_family:
        raise ValueError(
            f"the teacher is a {teacher_family!r} model ({type(unwrap_model(teacher)).__name__}) but the "
            f"student is a {student_family!r} model ({type(unwrap_model(student)).__name__}): heal with "
            f"the uncollapsed model the student was collapsed from"
        )
    return student_family


@dataclass(frozen=True)
class RemovedSpan:
    """Consecutive teacher blocks that the student lacks.

    Attributes:
        stage: the stage of the span.
        teacher_blocks: names (in the teacher) of the removed blocks, in forward order.
        preceding: name (in the student) of the kept block right before the span, ``None`` at the stage start.
        teacher_preceding: the same block's name in the teacher.
    """

    stage: int
    teacher_blocks: tuple[str, ...]
    preceding: str | None
    teacher_preceding: str | None


def removed_spans(student: nn.Module, teacher: nn.Module) -> list[RemovedSpan]:
    """The spans of teacher blocks removed from ``student``, read from the students's ``hf_collapse`` record.

    The teacher may itself carry a record: its edits must then be the first edits of the student's.

    Raises:
        ValueError: when the student was not collapsed from this teacher, or holds edits other than block
            removals (sub-layer removals, TLC linearizations) after the teacher's.
    """
    check_teacher(student, teacher)
    student_edits = (collapse_record(student) or {}).get("edits", [])
    teacher_edits = (collapse_record(teacher) or {}).get("edits", [])
    if student_edits[: len(teacher_edits)] != teacher_edits:
        raise ValueError(
            "the student's hf_collapse record does not start with the teacher's edits: the student was "
            "not collapsed from this teacher"
        )
    edits = student_edits[len(teacher_edits) :]
    if not edits:
        raise ValueError(
            "the student has no blocks removed relative to the teacher (its hf_collapse record holds no "
            "further edit): there is no removed span to replace"
        )
    other = sorted({e["op"] for e in edits if e["op"] != "remove_blocks"})
    if other:
        raise ValueError(
            f"linear replacement stands in for removed spans of whole blocks; the student also holds "
            f"{', '.join(other)} edits, which it cannot replace"
        )
    teacher_blocks = find_blocks(teacher)
    # Blocks are renumbered after each removal: a recorded name is a position in the model of that moment.
    position = {b.local_name: (b.stage, b.index) for b in teacher_blocks}
    surviving: dict[int, list[int]] = {}
    by_position: dict[tuple[int, int], Any] = {}
    for block in teacher_blocks:
        surviving.setdefault(block.stage, []).append(block.index)
        by_position[(block.stage, block.index)] = block
    for edit in edits:
        drop: dict[int, set[int]] = {}
        for name in edit["blocks"]:
            if name not in position:
                raise ValueError(f"the student's record removes {name!r}, which the teacher does not have")
            stage, index = position[name]
            drop.setdefault(stage, set()).add(index)
        for stage, indices in drop.items():
            if max(indices) >= len(surviving[stage]):
                raise ValueError(f"the student's record removes {edit['blocks']}, which the teacher does not have")
            surviving[stage] = [t for i, t in enumerate(surviving[stage]) if i not in indices]
    student_blocks = find_blocks(student)
    student_by_position = {(b.stage, b.index): b for b in student_blocks}
    for stage, kept in surviving.items():
        if sum(1 for b in student_blocks if b.stage == stage) != len(kept):
            raise ValueError(
                f"stage {stage} of the student has a different number of blocks than the teacher minus "
                f"the recorded removals: the student was not collapsed from this teacher"
            )
    spans = []
    for stage, kept in sorted(surviving.items()):
        kept_set = set(kept)
        all_indices = sorted(i for s, i in by_position if s == stage)
        run: list[int] = []
        for index in all_indices + [None]:
            if index is not None and index not in kept_set:
                run.append(index)
                continue
            if run:
                before = run[0] - 1
                student_before = kept.index(before) if before in kept_set else None
                spans.append(
                    RemovedSpan(
                        stage=stage,
                        teacher_blocks=tuple(by_position[(stage, i)].name for i in run),
                        preceding=None if student_before is None else student_by_position[(stage, student_before)].name,
                        teacher_preceding=None if student_before is None else by_position[(stage, before)].name,
                    )
                )
                run = []
    return spans


def _forward_keys(model: nn.Module) -> set[str] | None:
    parameters = inspect.signature(unwrap_model(model).forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def calibration_batches(
    model: nn.Module, dataset: Iterable[Any], data_collator=None, batch_size: int = 8, num_batches: int = 4
) -> list[dict[str, torch.Tensor]]:
    """The first ``num_batches`` batches of ``dataset`` (collated, keys the model's forward does not take dropped).

    ``dataset`` is a ``datasets.Dataset`` / sequence of examples (batched with ``data_collator``, by default
    transformers' ``default_data_collator``), or an iterable of ready batches (mappings of tensors).
    """
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    if num_batches < 1:
        raise ValueError(f"calibration_batches must be at least 1, got {num_batches}")
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError("the training dataset is empty: calibration needs a few batches")
    if (
        isinstance(first, dict)
        and all(isinstance(v, torch.Tensor) for v in first.values())
        and any(v.dim() >= 2 for v in first.values())
        and not hasattr(dataset, "column_names")
        and data_collator is None
    ):
        loader: Iterable[Any] = dataset  # already batches
    else:
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=data_collator or default_data_collator
        )
    keys = _forward_keys(model)
    batches = []
    for batch in loader:
        batches.append({k: v for k, v in dict(batch).items() if keys is None or k in keys})
        if len(batches) >= num_batches:
            break
    return batches
