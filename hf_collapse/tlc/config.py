"""TLCConfig: which activation sites to consider, how to calibrate, fine-tune and stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class TLCConfig:
    """Settings of :func:`hf_collapse.tlc.compress`.

    Attributes:
        sites: ``"auto"`` (every non-gated activation site the adapter knows) or a list of site names: the
            activation module paths in the model passed to ``compress``, e.g.
            ``"bert.encoder.layer.3.intermediate.intermediate_act_fn"`` for a ``BertForSequenceClassification``
            (the backbone-relative spelling of earlier versions, ``"encoder.layer.3..."``, is accepted too).
        calibration_batches: training batches used to measure statistics and rank candidates (several, not
            one: the reference code scores layers on a single batch).
        target_layers: stop after collapsing this many sites.
        max_metric_drop: stop before a step that would lower the evaluation metric by more than this; that
            step is undone, so the returned model always honours the budget.
        finetune_steps: optimizer steps of fine-tuning after each collapse (0: none; ``None``: the
            ``TrainingArguments`` as given, e.g. its epochs).
        fuse: fuse the linear maps that linearization makes adjacent (fc2∘fc1, Conv–BN, 1x1 conv pairs),
            choosing the fused or the thin form by FLOPs.
        candidates_per_step: apply the best k candidates together while their combined calibration loss stays
            at or below the current model's (1: the single best, always).

    Example::

        >>> config = TLCConfig(target_layers=6, max_metric_drop=0.02, finetune_steps=50)
    """

    sites: str | Sequence[str] = "auto"
    calibration_batches: int = 8
    target_layers: int | None = None
    max_metric_drop: float | None = None
    finetune_steps: int | None = 0
    fuse: bool = True
    candidates_per_step: int = 1

    def __post_init__(self):
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.target_layers is not None and self.target_layers < 1:
            raise ValueError(f"target_layers must be >= 1, got {self.target_layers}")
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise ValueError(f"max_metric_drop must be >= 0, got {self.max_metric_drop}")
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0 or None, got {self.finetune_steps}")
        if self.candidates_per_step < 1:
            raise ValueError(f"candidates_per_step must be >= 1, got {self.candidates_per_step}")
