"""TraDyModel: the peft tuner of TraDy (``get_peft_model(model, TraDyConfig(...))``).

It wraps every target conv/linear in a :class:`~hf_collapse.trady.layer.TraDyLayer` and owns one flat trainable
parameter per adapter (``trady_flat``) whose slices are the deltas of the selected input channels. The flat
parameter keeps its size when channels are re-sampled, so the optimizer and DDP keep working; its size (the
*capacity*) is fixed by the budget at calibration.

Life cycle::

    model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))   # flat parameter: empty
    calibrate(model, batches)   # a priori: positions per layer (cost model), RGN ranking -> selected layers,
                                # flat parameter sized (in place), epoch-0 channels drawn
    trainer = Trainer(model, args, ..., callbacks=[TraDyCallback()])   # re-samples at every epoch, checkpoints the
    trainer.train()                                                    # run state (and calibrates, if not done)
    model.save_pretrained("adapter")   # merged slices + current delta + selection: reload is exact

The tuner is one class with one state object (:class:`~hf_collapse.trady.state.TraDyState`, ``tuner.trady_state``) that
holds, once the adapter is calibrated, its :class:`~hf_collapse.trady.sampling.ChannelSampler` (``tuner.sampler()``:
budget, capacity, draws, re-sampling, run state), as peft's AdaLoRA tuner owns its ``RankAllocator``. The tuner's own
methods (``resample``, ``current_selection``, ``budget_summary``, ...) are the public names of the sampler's. Around it:
:mod:`~hf_collapse.trady.injection` (which layers are wrapped), :mod:`~hf_collapse.trady.calibration` (the a priori
measurements and ranking, over the base model and the layers) and :mod:`~hf_collapse.trady.state_dict` (the adapter
checkpoint). None of them imports the tuner. A Trainer drives it through :class:`~hf_collapse.trady.TraDyCallback`,
which transformers' callbacks give the model and the optimizer: the tuner never looks for the Trainer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .. import compat
from ..distributed import from_main_process
from ..metrics import to_device
from ..profiling import step_memory
from . import calibration
from .config import TraDyConfig
from .injection import check_targets, default_target_modules
from .layer import TraDyLayer
from .planning import PeakPlan, depth_choices, plan_for_peak
from .sampling import NOT_CALIBRATED_MESSAGE, ChannelSampler, channel_budget, layer_costs
from .selection import candidate_layers, select_layers_by_rgn
from .sharding import check_not_sharded
from .state import FlatStore, TraDyState
from .state_dict import add_layer_entries, load_layer_entries

logger = logging.getLogger(__name__)

__all__ = ["TraDyModel", "calibrate", "find_trady_model"]


class TraDyModel(BaseTuner):
    """The TraDy tuner: created by ``peft.get_peft_model(model, TraDyConfig(...))``, not directly.

    Only one TraDy adapter per model is supported (the flat parameter, the merged base weights and the draws are
    per model).

    Example::

        >>> from peft import get_peft_model
        >>> from hf_collapse.trady import TraDyConfig, calibrate
        >>> peft_model = get_peft_model(model, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))  # doctest: +SKIP
        >>> calibrate(peft_model, batches)                                                          # doctest: +SKIP
        >>> peft_model.base_model.current_selection()                                               # doctest: +SKIP
        {'bert.encoder.layer.5.output.dense': [3, 17, ...], ...}
    """

    prefix: str = "trady_"
    tuner_layer_cls = TraDyLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    # ------------------------------------------------------------------------------------------- peft's injection hooks

    def _pre_injection_hook(self, model: nn.Module, config: TraDyConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "TraDy supports a single adapter per model (its flat parameter and the merged base weights are "
                f"per model); it already has {sorted(n for n in self.peft_config if n != adapter_name)}"
            )
        if getattr(self, "trady_state", None) is None:
            self.trady_flat = nn.ParameterDict()
            self.trady_state = TraDyState(store=FlatStore(self.trady_flat))
        if config.target_modules is None:
            names = default_target_modules(model, config.modules_to_save)
            if not names:
                from .layer import supported_module_types

                raise ValueError(
                    f"TraDy found no module to target in {type(model).__name__}; supported: {supported_module_types()}"
                )
            config.target_modules = names
        check_targets(model, config)

    def _prepare_adapter_config(self, peft_config: TraDyConfig, model_config: dict) -> TraDyConfig:
        return peft_config  # target_modules are resolved in _pre_injection_hook, from the model itself

    def _create_and_replace(
        self,
        peft_config: TraDyConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, TraDyLayer):
            raise ValueError(f"{current_key} already carries a TraDy adapter: one TraDy adapter per model")
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key} already carries another peft adapter ({type(target).__name__}); "
                "TraDy wraps plain layers only"
            )
        new_module = TraDyLayer(target, adapter_name, self.trady_state.store)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # As LoraModel does: BaseTuner's version copies `child.weight`, which a modules_to_save wrapper around a
        # head without a weight (RoBERTa's classification head, ResNet's Sequential) does not have at unload time.
        # A TraDy layer holds no tensor of its own, so there is nothing to move to the base layer's device.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: TraDyConfig, adapter_name: str) -> None:
        if adapter_name not in self.trady_flat:
            # An empty placeholder: an optimizer built before calibration (the Trainer builds it before
            # on_train_begin) holds this very Parameter, which calibration resizes in place.
            first = next(iter(self.trady_layers(adapter_name).values())).get_base_layer().weight
            self.trady_flat[adapter_name] = nn.Parameter(
                torch.zeros(0, dtype=first.dtype, device=first.device), requires_grad=not config.inference_mode
            )
        if config.is_calibrated:
            self._start_sampler(adapter_name)
        self._register_step_hook()

    # ------------------------------------------------------------------------------------------ peft's state dict hooks

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: TraDyConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        add_layer_entries(model, adapter_name, to_return)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: TraDyConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remaining = load_layer_entries(model, adapter_name, state_dict)
        tuner = next((m for m in model.modules() if isinstance(m, cls)), None)
        if tuner is not None:
            tuner._size_placeholder(adapter_name, remaining)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, remaining)

    def _size_placeholder(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Loading a checkpoint into an adapter not calibrated yet (a Trainer resuming a run its callback calibrated):
        give the placeholder flat parameter the saved size, in place, before the optimizer is built; the calibration
        itself comes back with the run state (:meth:`restore_run_state`)."""
        saved = next((v for k, v in state_dict.items() if k.endswith("trady_flat")), None)
        if saved is None or adapter_name not in self.trady_flat or self.is_calibrated(adapter_name):
            return
        if self.trady_flat[adapter_name].numel() != saved.numel():
            compat.resize_parameter_(self.trady_flat[adapter_name], saved.numel())

    # ------------------------------------------------------------------------------------------- training forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward. The first training forward (train mode, gradients on) refuses sharded
        parameters, and an adapter that nothing calibrated (no :func:`calibrate`, no :class:`TraDyCallback`)."""
        if self.training and torch.is_grad_enabled() and not self.trady_state.driven:
            adapter_name = self.active_adapter_name()
            if not self.peft_config[adapter_name].inference_mode:
                if not self.trady_state.sharding_checked:
                    check_not_sharded(self.model, action="train")
                    self.trady_state.sharding_checked = True
                if not self.is_calibrated(adapter_name):
                    raise RuntimeError(NOT_CALIBRATED_MESSAGE)
        return super().forward(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- calibration, draws

    def calibrate(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        num_batches: int | None = None,
        adapter_name: str | None = None,
    ) -> dict[str, Any]:
        """The a priori step (:func:`hf_collapse.trady.calibrate`): measure and rank, plan for ``peak_bytes`` when the
        config has one, then start the sampler (size the flat parameter, draw the first channels)."""
        adapter_name = adapter_name or self.active_adapter_name()
        config = self.peft_config[adapter_name]
        batches = list(itertools.islice(iter(batches), int(num_batches or config.calibration_batches)))
        used = calibration.calibrate_layers(
            self.model, self.trady_layers(adapter_name), config, adapter_name, batches, loss_fn, num_batches
        )
        config.peak_plan = None
        if config.peak_bytes is not None:
            self._plan_peak(adapter_name, batches[0], loss_fn)
        sampler = self._start_sampler(adapter_name)
        summary = {
            "batches": used,
            "selected_layers": list(config.selected_layers or []),
            "pool_layers": [c.name for c in sampler.pool],
            "budget_elements": sampler.budget,
            "capacity": sampler.capacity,
        }
        if config.peak_plan:
            summary["peak_plan"] = config.peak_plan
        return summary

    def _plan_peak(self, adapter_name: str, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> None:
        """Choose the channel budget, the depth and gradient checkpointing so that one training step's measured peak
        on ``batch`` stays under ``config.peak_bytes`` (:mod:`~hf_collapse.trady.planning`); the plan goes into
        ``config.peak_plan``.

        Raises:
            hf_collapse.trady.planning.PeakBudgetError: when no plan fits (the config is left without a plan).
        """
        config = self.peft_config[adapter_name]
        costs = layer_costs(config, self.trady_layers(adapter_name))
        order = [c.name for c in costs]
        flat = self.trady_flat[adapter_name]
        cap = (
            channel_budget(config, costs, flat.element_size())
            if config.has_channel_budget
            else sum(c.full_cost for c in costs)
        )
        ranked = None if config.selected_layers is None else list(config.selected_layers)
        base = self.model
        was_checkpointing = bool(getattr(base, "is_gradient_checkpointing", False))
        can_checkpoint = bool(getattr(base, "supports_gradient_checkpointing", False))
        settings = (True,) if was_checkpointing else ((False, True) if can_checkpoint else (False,))
        device = flat.device
        batch = to_device(batch, device)

        def selected_within(depth: int | None) -> list[str] | None:
            if ranked is None or depth is None:
                return ranked
            allowed = candidate_layers(order, depth)
            kept = [n for n in ranked if n in set(allowed)]
            if kept or not config.layer_rgn:
                return kept
            return select_layers_by_rgn(config.layer_rgn, config.coverage, allowed)  # the ranking within the depth

        def measure(budget: float, depth: int | None, checkpointing: bool) -> int:
            config.peak_plan = {"budget_elements": budget, "max_depth": depth, "gradient_checkpointing": checkpointing}
            config.selected_layers = selected_within(depth)
            self._set_checkpointing(checkpointing)
            self.trady_state.samplers.pop(adapter_name, None)
            try:
                sampler = self._start_sampler(adapter_name)
            except ValueError:  # e.g. no ranked layer within this depth: this plan cannot be built
                return 2**62
            sampler.assign_deepest()  # the worst draw of the plan, not whichever came first
            return step_memory(self, batch, loss_fn=loss_fn).peak_bytes

        try:
            plan: PeakPlan = plan_for_peak(
                int(config.peak_bytes),
                measure,
                min_elements=max(c.channel_cost for c in costs),
                cap_elements=cap,
                depths=depth_choices(min(len(order), config.max_depth or len(order))),
                depth_cost=lambda depth: sum(
                    c.full_cost for c in costs if c.name in set(candidate_layers(order, depth or config.max_depth))
                ),
                checkpointing=settings,
            )
        except ValueError:
            config.peak_plan, config.selected_layers = None, ranked
            self.trady_state.samplers.pop(adapter_name, None)
            self._set_checkpointing(was_checkpointing)
            raise
        self.trady_state.samplers.pop(adapter_name, None)
        # Under DDP every rank must train the same plan (its size is the flat parameter's): rank 0's, whose batch
        # shape may differ from the others' by padding.
        config.peak_plan = from_main_process(plan.to_dict())
        plan = PeakPlan.from_dict(config.peak_plan)
        config.selected_layers = selected_within(plan.max_depth)
        self._set_checkpointing(plan.gradient_checkpointing)
        logger.info("TraDy: %s", plan.describe())

    def _set_checkpointing(self, on: bool) -> None:
        """Turn the base model's gradient checkpointing on (non-reentrant: TraDy's slices need no input gradients, so
        the backward still stops at the lowest selected layer) or off, when the model supports it and it is not so
        already."""
        base = self.model
        if getattr(base, "supports_gradient_checkpointing", False) and bool(base.is_gradient_checkpointing) != on:
            compat.set_activation_checkpointing(base, on)

    def refresh_rgn(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        num_batches: int | None = None,
        adapter_name: str | None = None,
    ) -> None:
        """Recompute the channel RGN on ``batches`` (full weight gradients of the target layers: outside the
        budget), keeping the cost model, the selected layers and the flat parameter. ``det_rgn`` uses it per epoch."""
        adapter_name = adapter_name or self.active_adapter_name()
        calibration.refresh_rgn(
            self.model,
            self.trady_layers(adapter_name),
            self.peft_config[adapter_name],
            adapter_name,
            batches,
            loss_fn,
            num_batches,
        )

    def _start_sampler(self, adapter_name: str, loaded: bool = False) -> ChannelSampler:
        """Build the adapter's sampler from its calibrated config; size the flat parameter and draw the first channels,
        or (``loaded``) keep the flat parameter and the selection a checkpoint gave. Steps counted and the draw history
        carry over from an earlier sampler of the same adapter. The flat parameter exists from injection on
        (:meth:`_post_injection_hook`)."""
        sampler = ChannelSampler(
            self.peft_config[adapter_name],
            self.trady_layers(adapter_name),
            self.trady_flat[adapter_name],
            adapter_name,
            self.model,
        )
        plan = self.peft_config[adapter_name].peak_plan
        if plan and plan.get("gradient_checkpointing"):
            self._set_checkpointing(True)  # the plan's measured peak needs it (a reloaded or resumed adapter too)
        previous = self.trady_state.samplers.get(adapter_name)
        if previous is not None:
            sampler.steps, sampler.history = previous.steps, previous.history
        self.trady_state.samplers[adapter_name] = sampler
        if loaded:
            sampler.adopt()
        else:
            sampler.start()
        return sampler

    def sampler(self, adapter_name: str | None = None) -> ChannelSampler:
        """The adapter's :class:`~hf_collapse.trady.sampling.ChannelSampler` (cost model, pool, budget, capacity,
        draws).

        Raises:
            RuntimeError: before calibration (there is nothing to sample from yet).
        """
        adapter_name = adapter_name or self.active_adapter_name()
        if adapter_name not in self.trady_state.samplers:
            raise RuntimeError(NOT_CALIBRATED_MESSAGE)
        return self.trady_state.samplers[adapter_name]

    def resample(self, index: int, optimizer: Any = None, adapter_name: str | None = None) -> bool:
        """Draw the channels of epoch (or re-sampling step) ``index``: the current update is merged into the base
        weights, the flat parameter zeroed and its optimizer state reset. Returns whether the selection changed."""
        sampler = self.sampler(adapter_name)
        self.trady_state.driven = True  # something drives the re-sampling: no warning
        return sampler.resample(index, optimizer)

    def is_calibrated(self, adapter_name: str | None = None) -> bool:
        """Whether the flat parameter is allocated and channels are drawn."""
        return (adapter_name or self.active_adapter_name()) in self.trady_state.samplers

    def draw_index(self, adapter_name: str | None = None) -> int | None:
        """The epoch (or re-sampling step) whose channels are selected now; ``None`` before the first draw."""
        sampler = self.trady_state.samplers.get(adapter_name or self.active_adapter_name())
        return None if sampler is None else sampler.index

    def current_selection(self, adapter_name: str | None = None) -> dict[str, list[int]]:
        """``{layer name: selected input channels}`` for the layers with at least one channel selected."""
        return self.sampler(adapter_name).current_selection()

    def selection_history(self, adapter_name: str | None = None) -> list[tuple[int, dict[str, int]]]:
        """``[(index, {layer: channels selected})]`` for every draw so far (the first is the calibration's)."""
        return list(self.sampler(adapter_name).history)

    def budget_summary(self, adapter_name: str | None = None) -> dict[str, Any]:
        """The cost model's numbers for the current selection (elements, per sample; ``*_bytes``: the same in bytes
        of the target weights' dtype)."""
        return self.sampler(adapter_name).budget_summary()

    def export_run_state(self, adapter_name: str | None = None) -> dict[str, Any] | None:
        """What shapes the rest of a run and is neither in the adapter checkpoint nor derivable from the step (the
        calibration, the draw index, the optimizer steps counted); ``None`` before calibration."""
        sampler = self.trady_state.samplers.get(adapter_name or self.active_adapter_name())
        return None if sampler is None else sampler.export_run_state()

    def restore_run_state(self, saved: dict[str, Any], adapter_name: str | None = None) -> None:
        """Continue a run from :meth:`export_run_state`'s record, after its adapter checkpoint was loaded (flat
        parameter, selection and merged channels): the calibration is taken from the record, not measured again."""
        adapter_name = adapter_name or self.active_adapter_name()
        ChannelSampler.restore_calibration(self.peft_config[adapter_name], saved)
        sampler = self._start_sampler(adapter_name, loaded=True)
        sampler.restore_counters(saved)
        logger.info("TraDy: resumed at draw %s after %d optimizer steps", sampler.index, sampler.steps)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Steps run inside (:func:`hf_collapse.profiling.step_memory`) do not move the run along: the optimizer-step
        counter (and the re-sampling it may trigger) is put back as it was, and no warning is given."""
        with contextlib.ExitStack() as stack:
            for sampler in self.trady_state.samplers.values():
                stack.enter_context(sampler.paused())
            yield

    def _register_step_hook(self) -> None:
        """Count the optimizer steps that update a flat parameter (``resample_every_steps`` re-samples from there): one
        hook on every torch optimizer's step, removed when the tuner is garbage-collected."""
        if self.trady_state.step_hook is not None:
            return
        reference = weakref.ref(self)

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            live = reference()
            if live is not None:
                for sampler in list(live.trady_state.samplers.values()):
                    sampler.after_optimizer_step(optimizer, driven=live.trady_state.driven)

        handle = compat.register_optimizer_step_post_hook(hook)
        self.trady_state.step_hook = handle
        weakref.finalize(self, handle.remove)

    # ------------------------------------------------------------------------------------------- layers

    def active_adapter_name(self) -> str:
        """The name of the active adapter (TraDy has one)."""
        active = self.active_adapter
        return active if isinstance(active, str) else active[0]

    def trady_layers(self, adapter_name: str | None = None) -> dict[str, TraDyLayer]:
        """The TraDy layers by name relative to the base model, in forward order once calibrated."""
        adapter_name = adapter_name or self.active_adapter_name()
        layers = {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, TraDyLayer) and adapter_name in module.trady_selected
        }
        positions = self.peft_config[adapter_name].layer_positions or {}
        ordered = {name: layers[name] for name in positions if name in layers}
        ordered.update({name: layer for name, layer in layers.items() if name not in ordered})
        return ordered

    # ------------------------------------------------------------------------------------------- giving the base back

    def merged_channel_count(self, adapter_name: str | None = None) -> int:
        """How many input channels hold updates merged into the base weights by earlier re-samplings (or loaded
        from a checkpoint that had them): while it is not zero the original base model cannot be given back."""
        adapter_name = adapter_name or self.active_adapter_name()
        return sum(int(layer.trady_merged[adapter_name].sum()) for layer in self.trady_layers(adapter_name).values())

    def _refuse_if_base_changed(self, action: str) -> None:
        merged = self.merged_channel_count()
        if merged:
            name = self.active_adapter_name()
            layers = sum(1 for layer in self.trady_layers().values() if layer.trady_merged[name].any())
            raise RuntimeError(
                f"TraDy cannot {action}: the updates of earlier re-samplings ({merged} input channels in {layers} "
                "layers) were merged into the base weights, so the original model no longer exists in this one. "
                "Use merge_and_unload() for the fine-tuned model, or load the base model again for the original."
            )

    def disable_adapter_layers(self) -> None:
        """Run the base model without the adapter (``with peft_model.disable_adapter():``).

        Raises:
            RuntimeError: when earlier re-samplings merged updates into the base weights: the original model
                cannot be given back exactly, so nothing is disabled.
        """
        self._refuse_if_base_changed("disable the adapter and give back the original model")
        super().disable_adapter_layers()

    def unload(self) -> nn.Module:
        """The base model without the TraDy layers, exactly as it was given to ``get_peft_model``.

        Raises:
            RuntimeError: when earlier re-samplings merged updates into the base weights (nothing is unloaded).
        """
        self._refuse_if_base_changed("unload and give back the original model")
        for layer in self.trady_layers().values():
            if layer.merged:
                layer.unmerge()  # exact: the merge kept the original slices
        return super().unload()

    # ------------------------------------------------------------------------------------------- peft plumbing

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, parameter in self.trady_flat.items():
            parameter.requires_grad_(name in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.trady_flat:
            del self.trady_flat[adapter_name]
        self.trady_state.samplers.pop(adapter_name, None)


def find_trady_model(model: nn.Module) -> TraDyModel:
    """The :class:`TraDyModel` inside ``model`` (a ``PeftModel``, a DDP/accelerate wrapper of one, or the tuner).

    Raises:
        ValueError: when ``model`` holds no TraDy adapter.

    Example::

        >>> tuner = find_trady_model(trainer.model_wrapped)        # doctest: +SKIP
        >>> tuner.current_selection()                              # doctest: +SKIP
    """
    from ..architectures.base import unwrap_model

    found = unwrap_model(model, keep_peft=True)
    if isinstance(found, TraDyModel):
        return found
    base = getattr(found, "base_model", None)
    if isinstance(base, TraDyModel):
        return base
    for module in found.modules():
        if isinstance(module, TraDyModel):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no TraDy adapter: create it with "
        "peft.get_peft_model(model, hf_collapse.trady.TraDyConfig(...))"
    )


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    num_batches: int | None = None,
) -> dict[str, Any]:
    """TraDy's a priori step, to run once before training (and before the optimizer is created).

    On ``num_batches`` (default ``config.calibration_batches``) batches it measures the activation positions per
    sample of every target layer (tokens or ``H·W``: the cost model) and, unless the config already holds
    ``selected_layers`` (reuse across tasks), the reweighted gradient norm ``RGN_c = ‖∂L/∂W_c‖ / cost_c`` of every
    input channel, from full weight gradients of the target layers (one-off, outside the budget). The top layers
    covering ``coverage`` of the total RGN are kept (within ``max_depth``). Then the flat parameter is allocated and
    the first channels are drawn. Under DDP the measurements are summed over ranks, so every rank agrees.

    Args:
        model: a ``PeftModel`` with a TraDy adapter (or its tuner).
        batches: an iterable of model inputs (dicts, e.g. a ``DataLoader``), with labels unless ``loss_fn`` is given.
        loss_fn: ``loss_fn(outputs, batch) -> loss`` when the outputs carry no ``loss``.
        num_batches: how many batches to use.

    Returns:
        A summary: batches used, selected layers, the layers drawn from, the budget (elements) and the capacity.

    Raises:
        ValueError: no loss, no batch, a budget too small for one channel, unknown ``selected_layers``.
        hf_collapse.trady.sharding.ShardedTrainingError: under FSDP / DeepSpeed ZeRO / DTensor parameters (TraDy
            supports one device and DDP).

    Example::

        >>> peft_model = get_peft_model(model, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))  # doctest: +SKIP
        >>> calibrate(peft_model, DataLoader(train, batch_size=16, collate_fn=collator))         # doctest: +SKIP
        {'batches': 4, 'selected_layers': [...], ...}
    """
    return find_trady_model(model).calibrate(batches, loss_fn=loss_fn, num_batches=num_batches)
