"""TLCConfig: which activation sites to consider, how to calibrate, fine-tune and stop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..budget import BudgetArguments
from ..deprecation import renamed


@dataclass
class TLCConfig(BudgetArguments):
    """Settings of :func:`hf_collapse.tlc.compress`: the budget (:class:`~hf_collapse.budget.BudgetArguments`, checked
    by :class:`~hf_collapse.budget.Budget`) and how to calibrate, fine-tune and stop.

    Attributes:
        num_units: stop after collapsing this many sites (activation layers).
        max_metric_delta: stop before a step that would make the evaluation metric worse by more than this (an
            accuracy drop; a loss rise); that step is undone, so the returned model always honours the budget.
        max_metric_ratio: the same as a factor (>= 1) of the metric.
        flops_fraction: stop once the forward FLOPs are at most this fraction of the original's.
        sites: ``"auto"`` (every non-gated activation site the adapter knows) or a list of site names: the
            activation module paths in the model passed to ``compress``, e.g.
            ``"bert.encoder.layer.3.intermediate.intermediate_act_fn"`` for a ``BertForSequenceClassification``
            (the backbone-relative spelling of earlier versions, ``"encoder.layer.3..."``, is accepted too).
        calibration_batches: training batches used to measure statistics and rank candidates (several, not
            one: the reference code scores layers on a single batch).
        finetune_steps: optimizer steps of fine-tuning after each collapse (0: none; ``None``: the
            ``TrainingArguments`` as given, e.g. its epochs).
        fuse: fuse the linear maps that linearization makes adjacent (fc2∘fc1, Conv–BN, 1x1 conv pairs),
            choosing the fused or the thin form by FLOPs.
        candidates_per_step: apply the best k candidates together while their combined calibration loss stays
            at or below the current model's (1: the single best, always).
        target_layers, max_metric_drop: the names of ``num_units`` and ``max_metric_delta`` in earlier versions
            (deprecated: a ``FutureWarning``; they are moved to the new fields and left ``None``).

    Example::

        >>> config = TLCConfig(num_units=6, max_metric_delta=0.02, finetune_steps=50)
    """

    sites: str | Sequence[str] = "auto"
    calibration_batches: int = 8
    finetune_steps: int | None = 0
    fuse: bool = True
    candidates_per_step: int = 1
    target_layers: int | None = None
    max_metric_drop: float | None = None

    def __post_init__(self):
        for old, new in (("target_layers", "num_units"), ("max_metric_drop", "max_metric_delta")):
            value = getattr(self, old)
            if value is not None:
                renamed(old, new, "TLCConfig", stacklevel=4)
                if getattr(self, new) is not None and getattr(self, new) != value:
                    raise ValueError(f"TLCConfig: {new} and its old name {old} are given different values")
                setattr(self, new, value)
                setattr(self, old, None)
        super().__post_init__()
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0 or None, got {self.finetune_steps}")
        if self.candidates_per_step < 1:
            raise ValueError(f"candidates_per_step must be >= 1, got {self.candidates_per_step}")
