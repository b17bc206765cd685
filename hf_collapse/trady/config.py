"""TraDyConfig: the settings of a TraDy adapter, a ``peft.PeftConfig``.

The config also stores what the a priori step measured (:func:`hf_collapse.trady.calibrate`): the layer ranking
(``layer_rgn``), the layers kept (``selected_layers``) and the activation positions per sample of every target layer
(``layer_positions``, which the cost model needs). Saved with the adapter in ``adapter_config.json``, it is reusable
across tasks for the same architecture: pass ``selected_layers`` (and ``layer_positions``) back and the ranking is
not computed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..deprecation import renamed
from .strategies import SELECTIONS

__all__ = ["SELECTIONS", "TraDyConfig"]

#: The budget used when none of ``budget_elements``, ``budget_bytes`` and ``budget_ratio`` is given.
DEFAULT_BUDGET_RATIO = 0.05


@dataclass
class TraDyConfig(PeftConfig):
    """Configuration of a TraDy adapter (Quélennec et al., 2025): fine-tuning under a hard memory budget.

    The unit of selection is an *input channel* of a target conv/linear weight: updating it needs only that
    channel's input activation (saved for backward) and gives only that slice of the weight gradient.
    Its cost, in elements, is the slice's weight-gradient size (``C_out·kh·kw`` for a conv, ``C_out`` for a
    linear) plus its activation per sample (``H·W`` for a conv, tokens for a linear).

    Selection strategies (``selection``):

    * ``"trady"`` (the paper's): the layers are ranked once, a priori, by their reweighted gradient norm (RGN) and
      the top ones covering ``coverage`` of the total are kept; at every epoch (or every ``resample_every_steps``)
      channels are drawn uniformly at random from the pooled channels of those layers until the budget is full.
    * ``"static_topk_random"``: the same layers, channels drawn at random once and kept for the whole training.
    * ``"full_random"``: no layer selection: channels drawn at random from every target layer at every epoch.
    * ``"det_rgn"``: the channels of highest RGN (deterministic); refreshed at every epoch by
      :class:`~hf_collapse.trady.TraDyCallback` when it is given calibration batches (the refresh computes full
      weight gradients: a baseline, outside the budget).
    * ``"rgn_weighted"``: MeDyate-style: the RGN-ranked layers, channels re-drawn at every epoch with probability
      proportional to their calibrated RGN (at budgets of 0.5-1%, 10-15 points of accuracy on MiniLM and 2.5% of
      held-out loss on SmolLM2 ahead of uniform draws).
    * ``"static_rgn_weighted"``: the same importance-weighted draw, made once and kept.
    * ``"static_top_rgn"`` (default): the channels of highest calibrated RGN, chosen once and kept (``det_rgn``
      without its re-measurement, so within the budget). The default because it is what the measurements back
      (``benchmarks/experiments/trady_regimes.json`` and ``trady_llm_regimes.json``, docs/trady.md "Where
      re-sampling pays"): on MiniLM at 0.5% 13 points of validation accuracy ahead of ``"rgn_weighted"`` on dialog
      topics, within 1.6 points either way at 5%; on SmolLM2 at 1% the lowest held-out loss of every selection,
      below LoRA r=8's.

    The strategies are a registry (:data:`~hf_collapse.trady.SELECTIONS`): a new one is one class and one
    registration.

    Learning rate: sparse channel updates move few weights. At a 5% budget they need about ten times the learning
    rate of full fine-tuning (measured on MiniLM / dialog topics with AdamW: 5e-5 gave 0.61 accuracy, 5e-4 gave
    0.75, full fine-tuning 0.78). The paper trains with SGD without momentum (``optim="sgd"``): optimizer state of
    re-sampled channels is reset at every re-sampling, so momentum would restart each epoch anyway.

    Args:
        target_modules: module names (exact or suffix) or a regex of the layers to consider. ``None``: every
            ``nn.Linear``, ``nn.Conv2d`` (dense or depthwise) and GPT-2 ``Conv1D`` except the output embeddings
            and the ``modules_to_save`` (the task head).
        exclude_modules: names or a regex of modules never to target.
        budget_elements: the budget in elements (weight-gradient plus activation elements per sample).
        budget_bytes: the same budget in bytes: ``budget_elements`` times the element size of the target layers'
            weights (4 in float32, 2 in bfloat16), i.e. the bytes of the selected channels' weight gradients plus
            their saved input activations *per sample*. It bounds what TraDy adds to a training step, not the whole
            step (parameters, optimizer state and the activations other layers keep to propagate gradients are
            outside it): measure the whole step with :func:`~hf_collapse.trady.step_memory`.
        budget_ratio: the budget as a fraction of the cost of updating every channel of every target layer
            (default 0.05 when neither ``budget_elements`` nor ``budget_bytes`` is given). Give at most one of
            ``budget_elements``, ``budget_bytes`` and ``budget_ratio``.
        peak_bytes: a budget on the **whole training step**: the measured peak of one step (forward, backward, AdamW
            step: :func:`~hf_collapse.trady.step_memory`) on the calibration batch's shape stays under it. Calibration
            then chooses the channel budget, the depth and gradient checkpointing (:mod:`~hf_collapse.trady.planning`;
            a channel budget given too is the most it may take) and records the plan in ``peak_plan``; it refuses,
            saying the smallest peak it can reach, when no plan fits.
        selection: a registered strategy: ``"trady"``, ``"static_topk_random"``, ``"full_random"``, ``"det_rgn"``,
            ``"rgn_weighted"``, ``"static_rgn_weighted"``, ``"static_top_rgn"`` (default).
        coverage: fraction of the cumulative RGN that the kept layers must cover (0.97 in the paper).
        max_depth: only the last ``max_depth`` target layers (in forward order) may be selected. Backpropagation
            stops at the lowest selected layer, so this bounds the *total* memory saved for backward, not only the
            weight-derivative part. ``None``: no restriction.
        calibration_batches: batches used by :func:`~hf_collapse.trady.calibrate` for the RGN ranking.
        resample_every_steps: re-sample every this many optimizer steps (counted by an optimizer hook, no
            callback needed) instead of at every epoch.
        seed: the draws are seeded by ``(seed, epoch)``, so every DDP rank draws the same channels.
        selected_layers: the layers kept by the a priori ranking (filled by ``calibrate``; pass it back to reuse).
        layer_rgn: every target layer's RGN, in forward order (filled by ``calibrate``).
        layer_positions: activation positions per sample of every target layer (tokens, or ``H·W``), in forward
            order (filled by ``calibrate``; the cost model needs it).
        peak_plan: what ``peak_bytes`` bought (filled by ``calibrate``: channel budget, depth, checkpointing, the
            measured peak and every plan tried; :class:`~hf_collapse.trady.planning.PeakPlan`).
        modules_to_save: modules trained in full and saved with the adapter (the task head). With
            ``task_type="SEQ_CLS"`` peft adds ``classifier``/``score`` itself.
        memory_budget: the name of ``budget_elements`` in earlier versions (deprecated: a ``FutureWarning``; adapter
            configs saved with it still load).

    Example::

        >>> from peft import get_peft_model
        >>> from hf_collapse.trady import TraDyConfig, calibrate
        >>> config = TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05)
        >>> model = get_peft_model(base_model, config)          # doctest: +SKIP
        >>> calibrate(model, batches)                           # doctest: +SKIP
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (exact or suffix) or a regex of the layers to consider; None: every Linear, Conv2d "
            "(dense or depthwise) and GPT-2 Conv1D except output embeddings and modules_to_save."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules never to target."}
    )
    budget_elements: int | None = field(
        default=None, metadata={"help": "Budget in elements: weight-gradient plus activation elements per sample."}
    )
    budget_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Budget in bytes: weight-gradient plus activation bytes per sample (budget_elements times "
            "the target weights' element size)."
        },
    )
    budget_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Budget as a fraction of the cost of updating every channel of every target layer "
            f"(default {DEFAULT_BUDGET_RATIO})."
        },
    )
    peak_bytes: int | None = field(
        default=None,
        metadata={
            "help": "Budget on the measured peak of one whole training step, in bytes: calibration chooses the channel "
            "budget, the depth and gradient checkpointing to stay under it."
        },
    )
    selection: str = field(
        default="static_top_rgn", metadata={"help": f"Channel selection strategy, one of {', '.join(SELECTIONS)}."}
    )
    coverage: float = field(
        default=0.97, metadata={"help": "Fraction of the cumulative reweighted gradient norm the kept layers cover."}
    )
    max_depth: int | None = field(
        default=None, metadata={"help": "Only the last max_depth target layers (forward order) may be selected."}
    )
    calibration_batches: int = field(default=4, metadata={"help": "Batches used for the a priori RGN ranking."})
    resample_every_steps: int | None = field(
        default=None, metadata={"help": "Re-sample every this many optimizer steps instead of every epoch."}
    )
    seed: int = field(default=0, metadata={"help": "Channel draws are seeded by (seed, epoch)."})
    selected_layers: list[str] | None = field(
        default=None, metadata={"help": "Layers kept by the a priori ranking (filled by calibrate)."}
    )
    layer_rgn: dict[str, float] | None = field(
        default=None, metadata={"help": "RGN of every target layer (filled by calibrate)."}
    )
    layer_positions: dict[str, float] | None = field(
        default=None, metadata={"help": "Activation positions per sample of every target layer (filled by calibrate)."}
    )
    peak_plan: dict | None = field(
        default=None, metadata={"help": "What peak_bytes bought and the peak measured (filled by calibrate)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (the task head)."}
    )
    bias: str = field(default="none", metadata={"help": "Only 'none': biases stay frozen."})
    memory_budget: int | None = field(
        default=None, metadata={"help": "Deprecated name of budget_elements (configs saved with it still load)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Registered by hf_collapse.trady on import (see hf_collapse/trady/__init__.py).
        self.peft_type = "TRADY"
        from peft.utils import PeftType

        if "TRADY" in PeftType.__members__:
            self.peft_type = PeftType.TRADY
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.memory_budget is not None:
            renamed("memory_budget", "budget_elements", "TraDyConfig", stacklevel=4)
            if self.budget_elements is not None and self.budget_elements != self.memory_budget:
                raise ValueError(
                    "TraDyConfig: budget_elements and its old name memory_budget are given different values"
                )
            self.budget_elements, self.memory_budget = self.memory_budget, None
        SELECTIONS.get(self.selection)  # refuses an unknown strategy, naming the registered ones
        given = [
            name for name in ("budget_elements", "budget_bytes", "budget_ratio") if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"give one budget: budget_elements (elements), budget_bytes (bytes) or budget_ratio "
                f"(fraction), not {' and '.join(given)}"
            )
        if self.peak_bytes is not None and (isinstance(self.peak_bytes, bool) or int(self.peak_bytes) <= 0):
            raise ValueError(f"peak_bytes must be a positive number of bytes, got {self.peak_bytes!r}")
        if self.budget_bytes is not None and (isinstance(self.budget_bytes, bool) or int(self.budget_bytes) <= 0):
            raise ValueError(f"budget_bytes must be a positive number of bytes, got {self.budget_bytes!r}")
        if self.budget_elements is not None and (
            isinstance(self.budget_elements, bool) or int(self.budget_elements) <= 0
        ):
            raise ValueError(f"budget_elements must be a positive number of elements, got {self.budget_elements!r}")
        if self.budget_ratio is not None and not 0.0 < float(self.budget_ratio) <= 1.0:
            raise ValueError(f"budget_ratio must be in (0, 1], got {self.budget_ratio!r}")
        if not 0.0 < float(self.coverage) <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage!r}")
        if self.max_depth is not None and int(self.max_depth) < 1:
            raise ValueError(f"max_depth must be a positive number of layers or None, got {self.max_depth!r}")
        if int(self.calibration_batches) < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches!r}")
        if self.resample_every_steps is not None and int(self.resample_every_steps) < 1:
            raise ValueError(f"resample_every_steps must be >= 1 or None, got {self.resample_every_steps!r}")
        if self.bias != "none":
            raise ValueError(f"TraDy keeps biases frozen: bias must be 'none', got {self.bias!r}")

    @property
    def budget_description(self) -> str:
        """The budget as written by the user, e.g. ``"0.05 of the cost of every channel"``, ``"120000 elements"`` or
        ``"480000 bytes"``."""
        if self.peak_plan:
            return (
                f"a peak of {int(self.peak_plan['peak_bytes'])} bytes per training step (channel budget "
                f"{self.peak_plan['budget_elements']:.0f} elements)"
            )
        if self.budget_elements is not None:
            return f"{int(self.budget_elements)} elements"
        if self.budget_bytes is not None:
            return f"{int(self.budget_bytes)} bytes"
        ratio = DEFAULT_BUDGET_RATIO if self.budget_ratio is None else float(self.budget_ratio)
        return f"{ratio:.4g} of the cost of every channel"

    @property
    def has_channel_budget(self) -> bool:
        """Whether a channel budget was given (``budget_elements``, ``budget_bytes`` or ``budget_ratio``)."""
        return any(v is not None for v in (self.budget_elements, self.budget_bytes, self.budget_ratio))

    @property
    def is_calibrated(self) -> bool:
        """Whether the cost model's measurements are present (``layer_positions``)."""
        return bool(self.layer_positions)
