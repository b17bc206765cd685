"""TraDyModel: the peft tuner of TraDy (``get_peft_model(model, TraDyConfig(...))``).

It wraps every target conv/linear in a :class:`~hf_collapse.trady.layer.TraDyLayer` and owns one flat trainable
parameter per adapter (``trady_flat``) whose slices are the deltas of the selected input channels. The flat
parameter keeps its size when channels are re-sampled, so the optimizer and DDP keep working; its size (the
*capacity*) is fixed by the budget at calibration.

Life cycle::

    model = get_peft_model(base, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))
    calibrate(model, batches)   # a priori: positions per layer (cost model), RGN ranking -> selected layers,
                                # flat parameter allocated, epoch-0 channels drawn
    trainer = Trainer(model, args, ..., callbacks=[TraDyCallback()])   # re-samples at every epoch
    trainer.train()
    model.save_pretrained("adapter")   # merged slices + current delta + selection: reload is exact

Adapter checkpoint: for every layer, the channels already merged into its base weight and their values
(``trady_merged_index`` / ``trady_merged_weight``), the current selection and its offset in the flat parameter
(``trady_selected`` / ``trady_offset``), and the flat parameter itself (``trady_flat``).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .config import DEFAULT_BUDGET_RATIO, TraDyConfig
from .layer import TraDyLayer, _FlatStore, channel_ops_for, supported_module_types
from .selection import (
    LayerCost,
    budget_elements,
    candidate_layers,
    draw_random_channels,
    draw_top_rgn_channels,
    flat_capacity,
    select_layers_by_rgn,
    selection_generator,
)

logger = logging.getLogger(__name__)

__all__ = ["TraDyModel", "calibrate", "default_target_modules", "find_trady_model", "reset_optimizer_state"]

_LAYER_ENTRIES = ("trady_selected", "trady_offset", "trady_merged_index", "trady_merged_weight")
_PEFT_PREFIX = "base_model.model."


@dataclass
class _AdapterState:
    """What a calibrated adapter needs to draw channels (not saved: rebuilt from the config)."""

    costs: list[LayerCost]  # every target layer, forward order
    pool: list[LayerCost]  # the layers the strategy draws from
    budget: float
    capacity: int
    index: Optional[int] = None  # epoch / re-sampling index of the current draw
    steps: int = 0  # optimizer steps counted by the hook
    last_version: int = -1
    warned_no_callback: bool = False
    history: list[tuple[int, dict[str, int]]] = field(default_factory=list)


def default_target_modules(model: nn.Module, modules_to_save: Optional[Iterable[str]] = None) -> list[str]:
    """Every module TraDy can target (Linear, dense or depthwise Conv2d, GPT-2 Conv1D), except the output embeddings
    (often tied to the input embeddings) and the ``modules_to_save`` (the task head), by full name.

    Example:
        >>> names = default_target_modules(bert_for_sequence_classification, ["classifier"])  # doctest: +SKIP
        >>> names[:2]                                                                          # doctest: +SKIP
        ['bert.encoder.layer.0.attention.self.query', 'bert.encoder.layer.0.attention.self.key']
    """
    output_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        try:
            output_embeddings = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output_embeddings = None
    skip = [m for m in (modules_to_save or [])]
    names = []
    for name, module in model.named_modules():
        if not name or module is output_embeddings:
            continue
        if any(f".{m}." in f".{name}." for m in skip):
            continue
        try:
            ops = channel_ops_for(module)
        except TypeError:
            continue  # a grouped conv TraDy cannot slice: not a default target
        if ops is not None:
            names.append(name)
    return names


def reset_optimizer_state(optimizer: Any, parameter: torch.Tensor) -> bool:
    """Forget the optimizer state (momentum, Adam moments and step) of ``parameter``; wrappers are unwrapped.

    Returns whether some state was dropped.

    Example::

        >>> reset_optimizer_state(trainer.optimizer, tuner.trady_flat["default"])   # doctest: +SKIP
        True
    """
    dropped, seen = False, set()
    current = optimizer
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "state", None)
        if isinstance(state, dict) and parameter in state:
            del state[parameter]
            dropped = True
        current = getattr(current, "optimizer", None)
    return dropped


def _optimizer_holds(optimizer: Any, parameter: torch.Tensor) -> bool:
    for group in getattr(optimizer, "param_groups", []):
        if any(p is parameter for p in group.get("params", [])):
            return True
    return False


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over DDP ranks (a no-op outside torch.distributed), so that every rank ranks and costs alike."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        reduced = values.to(device=device, dtype=torch.float64)
        dist.all_reduce(reduced)
        return reduced.to(values.device)
    return values.to(torch.float64)


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

    # ------------------------------------------------------------------------------------------- injection

    def _pre_injection_hook(self, model: nn.Module, config: TraDyConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "TraDy supports a single adapter per model (its flat parameter and the merged base weights are "
                f"per model); it already has {sorted(n for n in self.peft_config if n != adapter_name)}"
            )
        if "trady_flat" not in self._modules:
            self.trady_flat = nn.ParameterDict()
            self.__dict__["_store"] = _FlatStore(self.trady_flat)
            self.__dict__["_states"] = {}
            self.__dict__["_callback_attached"] = False
        if config.target_modules is None:
            names = default_target_modules(model, config.modules_to_save)
            if not names:
                raise ValueError(f"TraDy found no module to target in {type(model).__name__}; supported: "
                                 f"{supported_module_types()}")
            config.target_modules = names
        self._check_targets(model, config)

    @staticmethod
    def _check_targets(model: nn.Module, config: TraDyConfig) -> None:
        matched, unsupported = [], []
        for name, module in model.named_modules():
            if not name:
                continue
            found = check_target_module_exists(config, name)
            if not found or type(found).__name__ == "_ExcludedModule":
                continue
            try:
                ops = channel_ops_for(module)
            except TypeError as error:
                unsupported.append(f"{name} ({error})")
                continue
            if ops is None:
                unsupported.append(f"{name} ({type(module).__name__})")
            else:
                matched.append(name)
        if unsupported:
            raise TypeError(f"TraDy cannot target {', '.join(unsupported[:5])}"
                            f"{' ...' if len(unsupported) > 5 else ''}; supported: {supported_module_types()}. "
                            "Narrow target_modules (names, suffixes or a regex) to those layers.")
        if not matched:
            examples = default_target_modules(model, config.modules_to_save)[:4]
            raise ValueError(f"TraDy: no module matches target_modules={config.target_modules!r} "
                             f"(exclude_modules={config.exclude_modules!r}). Give module names or suffixes of "
                             f"{supported_module_types()}, e.g. {examples}, or None for all of them.")

    def _prepare_adapter_config(self, peft_config: TraDyConfig, model_config: dict) -> TraDyConfig:
        return peft_config  # target_modules are resolved in _pre_injection_hook, from the model itself

    def _create_and_replace(self, peft_config: TraDyConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        if isinstance(target, TraDyLayer):
            raise ValueError(f"{current_key} already carries a TraDy adapter: one TraDy adapter per model")
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key} already carries another peft adapter ({type(target).__name__}); "
                             "TraDy wraps plain layers only")
        new_module = TraDyLayer(target, adapter_name, self._store)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # As LoraModel does: BaseTuner's version copies `child.weight`, which a modules_to_save wrapper around a
        # head without a weight (RoBERTa's classification head, ResNet's Sequential) does not have at unload time.
        # A TraDy layer holds no tensor of its own, so there is nothing to move to the base layer's device.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: TraDyConfig, adapter_name: str) -> None:
        if config.is_calibrated:
            self._setup(adapter_name)
        self._register_step_hook()

    # ------------------------------------------------------------------------------------------- layers

    def trady_layers(self, adapter_name: Optional[str] = None) -> dict[str, TraDyLayer]:
        """The TraDy layers by name relative to the base model, in forward order once calibrated."""
        adapter_name = adapter_name or self._adapter()
        layers = {name: module for name, module in self.model.named_modules() if isinstance(module, TraDyLayer)
                  and adapter_name in module.trady_selected}
        positions = self.peft_config[adapter_name].layer_positions or {}
        ordered = {name: layers[name] for name in positions if name in layers}
        ordered.update({name: layer for name, layer in layers.items() if name not in ordered})
        return ordered

    def _adapter(self) -> str:
        active = self.active_adapter
        return active if isinstance(active, str) else active[0]

    # ------------------------------------------------------------------------------------------- calibration

    def calibrate(self, batches: Iterable[Any], loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                  num_batches: Optional[int] = None, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """The a priori step: measure every target layer's activation positions (the cost model) and, when the
        strategy needs it, the reweighted gradient norm of every channel; keep the top layers; allocate the flat
        parameter and draw the first channels. Stores ``layer_positions``, ``layer_rgn`` and ``selected_layers`` in
        the config. See :func:`calibrate`.
        """
        adapter_name = adapter_name or self._adapter()
        config: TraDyConfig = self.peft_config[adapter_name]
        layers = self.trady_layers(adapter_name)
        if config.selected_layers is not None:
            unknown = sorted(set(config.selected_layers) - set(layers))
            if unknown:
                raise ValueError(f"selected_layers names layers that are not TraDy layers of this model: {unknown[:5]}"
                                 f"; TraDy layers: {list(layers)[:5]} ...")
        need_rgn = config.selection == "det_rgn" or (config.selection != "full_random" and config.selected_layers is None)
        used, order, positions, missing, channel_rgn = self._measure(
            adapter_name, batches, need_rgn, loss_fn, int(num_batches or config.calibration_batches))
        config.layer_positions = {n: round(float(positions[n]), 4) for n in order}
        if need_rgn:
            for name, rgn in channel_rgn.items():
                layers[name].trady_rgn[adapter_name] = rgn
            config.layer_rgn = {n: float(channel_rgn[n].sum()) for n in order}
            if config.selected_layers is None:
                allowed = [n for n in candidate_layers(order, config.max_depth) if n not in missing]
                config.selected_layers = select_layers_by_rgn(config.layer_rgn, config.coverage, allowed)
        self._setup(adapter_name)
        state = self._states[adapter_name]
        return {
            "batches": used,
            "selected_layers": list(config.selected_layers or []),
            "pool_layers": [c.name for c in state.pool],
            "budget_elements": state.budget,
            "capacity": state.capacity,
        }

    def refresh_rgn(self, batches: Iterable[Any], loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                    num_batches: Optional[int] = None, adapter_name: Optional[str] = None) -> None:
        """Recompute the channel RGN on ``batches`` (full weight gradients of the target layers: outside the
        budget), keeping the cost model, the selected layers and the flat parameter. ``det_rgn`` uses it per epoch."""
        adapter_name = adapter_name or self._adapter()
        config: TraDyConfig = self.peft_config[adapter_name]
        layers = self.trady_layers(adapter_name)
        positions = config.layer_positions or {}
        _, _, _, _, channel_rgn = self._measure(adapter_name, batches, True, loss_fn,
                                                int(num_batches or config.calibration_batches), positions)
        for name, rgn in channel_rgn.items():
            layers[name].trady_rgn[adapter_name] = rgn

    def _measure(self, adapter_name: str, batches: Iterable[Any], need_rgn: bool,
                 loss_fn: Optional[Callable[[Any, Any], torch.Tensor]], num_batches: int,
                 fixed_positions: Optional[Mapping[str, float]] = None):
        """Run calibration batches: positions per sample of every layer (forward order) and, if ``need_rgn``, the
        per-channel RGN (summed over DDP ranks). Returns ``(batches used, order, positions, missing, channel_rgn)``."""
        layers = self.trady_layers(adapter_name)
        order: list[str] = []
        position_sum = {name: 0.0 for name in layers}
        position_count = {name: 0 for name in layers}
        handles = []

        def recorder(name: str, layer: TraDyLayer) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(x, torch.Tensor):
                    return
                if name not in order:
                    order.append(name)
                position_sum[name] += layer.ops.positions(x)
                position_count[name] += 1
            return hook

        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(recorder(name, layer), with_kwargs=True))
            layer.calibrating = True
        weights = [layer.get_base_layer().weight for layer in layers.values()]
        requires = {id(p): (p, p.requires_grad) for p in self.model.parameters()}
        was_training = self.model.training
        norm_sum = {name: torch.zeros(layer.in_channels, dtype=torch.float64) for name, layer in layers.items()}
        used = 0
        try:
            self.model.eval()  # no dropout: the ranking should not depend on the masks drawn
            if need_rgn:
                for p, _ in requires.values():
                    p.requires_grad_(False)
                for w in weights:
                    w.requires_grad_(True)
            device = weights[0].device
            for batch in batches:
                if used >= num_batches:
                    break
                batch = _to_device(batch, device)
                with torch.set_grad_enabled(need_rgn):
                    outputs = self.model(**batch) if isinstance(batch, Mapping) else self.model(batch)
                    if need_rgn:
                        loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
                        if loss is None:
                            raise ValueError("calibration needs a loss: give batches with labels (the model then "
                                             "returns outputs.loss) or pass loss_fn(outputs, batch)")
                        grads = torch.autograd.grad(loss, weights, allow_unused=True)
                        for (name, layer), grad in zip(layers.items(), grads):
                            if grad is not None:
                                norm_sum[name] += layer.ops.channel_norms(grad).double().cpu()
                used += 1
        finally:
            for handle in handles:
                handle.remove()
            for layer in layers.values():
                layer.calibrating = False
            for p, flag in requires.values():
                p.requires_grad_(flag)
            self.model.train(was_training)
        if used == 0:
            raise ValueError("calibrate received no batch")

        names = list(layers)
        stats = _all_reduce_sum(torch.tensor([[position_sum[n], position_count[n]] for n in names],
                                             dtype=torch.float64))
        missing = [n for n, (_, count) in zip(names, stats.tolist()) if count == 0]
        if missing:
            logger.warning("TraDy: %d target layer(s) never ran during calibration and cannot be selected: %s",
                           len(missing), missing[:5])
        positions = {n: (s / c if c else 1.0) for n, (s, c) in zip(names, stats.tolist())}
        if fixed_positions:
            positions.update({n: float(v) for n, v in fixed_positions.items() if n in positions})
        # Forward order, agreed over ranks: rank 0's order (every rank runs the same network).
        order = [n for n in order if n in positions] + [n for n in names if n not in order]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [order]
            dist.broadcast_object_list(shared, src=0)
            order = shared[0]
        channel_rgn: dict[str, torch.Tensor] = {}
        if need_rgn:
            world = _all_reduce_sum(torch.tensor([float(used)]))
            flat = _all_reduce_sum(torch.cat([norm_sum[n] for n in names]))
            offset = 0
            for name in names:
                layer = layers[name]
                norms = flat[offset:offset + layer.in_channels]
                offset += layer.in_channels
                cost = layer.weight_per_channel + positions[name]
                rgn = (norms / float(world[0]) / cost).float()
                if name in missing:
                    rgn.zero_()
                channel_rgn[name] = rgn.to(layer.get_base_layer().weight.device)
        return used, order, positions, missing, channel_rgn

    # ------------------------------------------------------------------------------------------- budget & draws

    def _setup(self, adapter_name: str) -> None:
        """Build the cost model from the config, allocate (or reuse) the flat parameter, draw the first channels."""
        config: TraDyConfig = self.peft_config[adapter_name]
        layers = self.trady_layers(adapter_name)
        positions = config.layer_positions or {}
        missing = [n for n in layers if n not in positions]
        if missing:
            raise ValueError(f"layer_positions lacks {len(missing)} TraDy layer(s) ({missing[:3]} ...): run "
                             "hf_collapse.trady.calibrate(model, batches)")
        order = [n for n in positions if n in layers]
        costs = [LayerCost(n, layers[n].in_channels, layers[n].weight_per_channel, float(positions[n])) for n in order]
        budget = budget_elements(costs, config.memory_budget, config.budget_ratio, DEFAULT_BUDGET_RATIO)
        candidates = candidate_layers(order, config.max_depth)
        if config.selection == "full_random":
            pool_names = candidates
        else:
            if config.selected_layers is None:
                raise ValueError(f"selection={config.selection!r} needs the a priori layer ranking: run "
                                 "hf_collapse.trady.calibrate(model, batches) or pass selected_layers")
            unknown = sorted(set(config.selected_layers) - set(layers))
            if unknown:
                raise ValueError(f"selected_layers names layers that are not TraDy layers of this model: {unknown[:5]}")
            pool_names = [n for n in candidates if n in set(config.selected_layers)]
            if not pool_names:
                raise ValueError(f"no selected layer lies within max_depth={config.max_depth} (the last "
                                 f"{config.max_depth} target layers); selected: {config.selected_layers[:5]}")
        by_name = {c.name: c for c in costs}
        pool = [by_name[n] for n in pool_names]
        cheapest = min(pool, key=lambda c: c.channel_cost)
        if budget < cheapest.channel_cost:
            raise ValueError(
                f"the memory budget ({budget:.0f} elements, {config.budget_description}) cannot hold a single channel: "
                f"the cheapest channel of the candidate layers ({cheapest.name}) costs {cheapest.channel_cost:.0f} "
                f"elements ({cheapest.weight_per_channel} weight-gradient + {cheapest.positions:.0f} activation per "
                "sample). Raise memory_budget or budget_ratio.")
        capacity = flat_capacity(pool, budget)
        first = next(iter(layers.values())).get_base_layer().weight
        requires_grad = not config.inference_mode
        existing = self.trady_flat[adapter_name] if adapter_name in self.trady_flat else None
        if existing is not None and existing.numel() == capacity:
            with torch.no_grad():
                existing.zero_()
            existing.requires_grad_(requires_grad)
        else:
            self.trady_flat[adapter_name] = nn.Parameter(
                torch.zeros(capacity, dtype=first.dtype, device=first.device), requires_grad=requires_grad)
        previous = self._states.get(adapter_name)
        self._states[adapter_name] = _AdapterState(costs=costs, pool=pool, budget=budget, capacity=capacity)
        if previous is not None:
            self._states[adapter_name].steps = previous.steps
            self._states[adapter_name].history = previous.history
        for layer in layers.values():
            layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
        self._assign(adapter_name, self._draw(adapter_name, 0))
        self._states[adapter_name].index = 0
        self._record(adapter_name, 0)

    def _draw(self, adapter_name: str, index: int) -> dict[str, list[int]]:
        config: TraDyConfig = self.peft_config[adapter_name]
        state = self._states[adapter_name]
        if config.selection == "det_rgn":
            layers = self.trady_layers(adapter_name)
            rgn = {c.name: layers[c.name].trady_rgn.get(adapter_name) for c in state.pool}
            return draw_top_rgn_channels(state.pool, rgn, state.budget, state.capacity)
        draw_index = 0 if config.selection == "static_topk_random" else index
        return draw_random_channels(state.pool, state.budget, state.capacity,
                                    selection_generator(config.seed, draw_index))

    def _assign(self, adapter_name: str, selection: Mapping[str, list[int]]) -> None:
        layers = self.trady_layers(adapter_name)
        offset = 0
        for cost in self._states[adapter_name].pool:
            channels = selection.get(cost.name, [])
            layers[cost.name].set_selection(adapter_name, torch.tensor(channels, dtype=torch.long), offset)
            offset += len(channels) * cost.weight_per_channel
        for name, layer in layers.items():
            if name not in selection:
                layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
        if offset > self.trady_flat[adapter_name].numel():  # pragma: no cover - the draws respect the capacity
            raise RuntimeError(f"TraDy selection needs {offset} elements, more than the capacity")

    def _record(self, adapter_name: str, index: int) -> None:
        counts = {n: len(c) for n, c in self.current_selection(adapter_name).items()}
        self._states[adapter_name].history.append((index, counts))

    def resample(self, index: int, optimizer: Any = None, adapter_name: Optional[str] = None) -> bool:
        """Draw the channels of epoch (or re-sampling step) ``index``.

        Before the new draw the current update is merged into the base weights and the flat parameter is zeroed;
        the optimizer state of the flat parameter (momentum, Adam moments) is reset, since its slices now belong
        to other channels. A draw identical to the current one changes nothing (``static_topk_random``).

        Returns:
            Whether the selection changed.
        """
        adapter_name = adapter_name or self._adapter()
        state = self._require_state(adapter_name)
        self.__dict__["_callback_attached"] = True  # something drives the re-sampling: no warning
        new = self._draw(adapter_name, index)
        if new == self.current_selection(adapter_name):
            state.index = index
            return False
        layers = self.trady_layers(adapter_name)
        flat = self.trady_flat[adapter_name]
        with torch.no_grad():
            for layer in layers.values():
                layer.merge_current(adapter_name)
            flat.zero_()
            if flat.grad is not None:
                flat.grad.zero_()
        self._assign(adapter_name, new)
        if optimizer is not None:
            reset_optimizer_state(optimizer, flat)
        state.index = index
        state.last_version = flat._version
        self._record(adapter_name, index)
        logger.info("TraDy: re-sampled %d channels in %d layers (index %d)",
                    sum(len(c) for c in new.values()), len(new), index)
        return True

    def _require_state(self, adapter_name: str) -> _AdapterState:
        if adapter_name not in self._states:
            raise RuntimeError("TraDy is not calibrated: call hf_collapse.trady.calibrate(model, batches) before "
                               "training (or load an adapter saved after calibration)")
        return self._states[adapter_name]

    def is_calibrated(self, adapter_name: Optional[str] = None) -> bool:
        """Whether the flat parameter is allocated and channels are drawn."""
        return (adapter_name or self._adapter()) in self._states

    def current_selection(self, adapter_name: Optional[str] = None) -> dict[str, list[int]]:
        """``{layer name: selected input channels}`` for the layers with at least one channel selected."""
        adapter_name = adapter_name or self._adapter()
        return {name: layer.selected_channels(adapter_name) for name, layer in self.trady_layers(adapter_name).items()
                if layer.trady_selected[adapter_name].numel()}

    def selection_history(self, adapter_name: Optional[str] = None) -> list[tuple[int, dict[str, int]]]:
        """``[(index, {layer: channels selected})]`` for every draw so far (the first is the calibration's)."""
        return list(self._require_state(adapter_name or self._adapter()).history)

    def budget_summary(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """The cost model's numbers for the current selection (elements, per sample)."""
        adapter_name = adapter_name or self._adapter()
        state = self._require_state(adapter_name)
        selection = self.current_selection(adapter_name)
        by_name = {c.name: c for c in state.costs}
        used_weight = sum(len(ch) * by_name[n].weight_per_channel for n, ch in selection.items())
        used_activation = sum(len(ch) * by_name[n].positions for n, ch in selection.items())
        full = sum(c.full_cost for c in state.costs)
        return {
            "budget_elements": state.budget,
            "used_elements": used_weight + used_activation,
            "used_weight_elements": used_weight,
            "used_activation_elements_per_sample": used_activation,
            "full_cost_elements": full,
            "capacity": state.capacity,
            "channels": sum(len(ch) for ch in selection.values()),
            "layers_with_channels": len(selection),
            "pool_layers": [c.name for c in state.pool],
            "index": state.index,
        }

    # ------------------------------------------------------------------------------------------- optimizer hook

    def _register_step_hook(self) -> None:
        if "_step_hook" in self.__dict__:
            return
        reference = weakref.ref(self)

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            tuner = reference()
            if tuner is not None:
                tuner._after_optimizer_step(optimizer)

        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(hook)
        self.__dict__["_step_hook"] = handle
        weakref.finalize(self, handle.remove)

    def _after_optimizer_step(self, optimizer: Any) -> None:
        for adapter_name, state in list(self._states.items()):
            flat = self.trady_flat[adapter_name] if adapter_name in self.trady_flat else None
            # One count per update of the flat parameter, even when a wrapper and its inner optimizer both fire.
            if flat is None or flat._version == state.last_version or not _optimizer_holds(optimizer, flat):
                continue
            state.last_version = flat._version
            state.steps += 1
            every = self.peft_config[adapter_name].resample_every_steps
            if every:
                if state.steps % int(every) == 0:
                    self.resample(state.steps // int(every), optimizer, adapter_name)
            elif not self._callback_attached and not state.warned_no_callback:
                state.warned_no_callback = True
                logger.warning("TraDy: no TraDyCallback is attached, so channels will not be re-sampled at epoch "
                               "boundaries. Add callbacks=[hf_collapse.trady.TraDyCallback()] to the Trainer, call "
                               "model.base_model.resample(epoch, optimizer) yourself, or set resample_every_steps.")

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
        self._states.pop(adapter_name, None)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: TraDyConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, TraDyLayer) or adapter_name not in module.trady_selected:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            weight = module.get_base_layer().weight.detach()
            to_return[f"{name}.trady_selected.{adapter_name}"] = module.trady_selected[adapter_name].cpu().clone()
            to_return[f"{name}.trady_offset.{adapter_name}"] = torch.tensor([module.trady_offset[adapter_name]])
            merged = module.trady_merged[adapter_name].nonzero().flatten().cpu()
            if merged.numel():
                to_return[f"{name}.trady_merged_index.{adapter_name}"] = merged.cpu().clone()
                to_return[f"{name}.trady_merged_weight.{adapter_name}"] = (
                    module.ops.read_slice(weight, merged.to(weight.device)).contiguous().clone())
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: TraDyConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layers = {name: module for name, module in model.named_modules() if isinstance(module, TraDyLayer)}
        entries: dict[str, dict[str, torch.Tensor]] = {}
        remaining = {}
        for key, value in state_dict.items():
            for entry in _LAYER_ENTRIES:
                if key.endswith("." + entry):
                    entries.setdefault(key[: -len(entry) - 1], {})[entry] = value
                    break
            else:
                remaining[key] = value
        if entries:
            for layer in layers.values():
                if adapter_name in layer.trady_selected:
                    layer.set_selection(adapter_name, torch.zeros(0, dtype=torch.long), 0)
        for module_key, values in entries.items():
            layer = layers.get(module_key) or layers.get(module_key.removeprefix(_PEFT_PREFIX))
            if layer is None:
                raise ValueError(f"the adapter checkpoint has TraDy entries for {module_key!r}, which is not a TraDy "
                                 "layer of this model: is it the base model the adapter was trained on?")
            weight = layer.get_base_layer().weight
            layer.trady_merged[adapter_name] = layer.trady_merged[adapter_name].to(weight.device)
            if "trady_merged_index" in values:
                index = values["trady_merged_index"].long().to(weight.device)
                with torch.no_grad():
                    layer.ops.write_slice(weight.data, index, values["trady_merged_weight"].to(weight.device))
                layer.trady_merged[adapter_name][index] = True
            if "trady_selected" in values:
                offset = int(values["trady_offset"].reshape(-1)[0]) if "trady_offset" in values else 0
                layer.set_selection(adapter_name, values["trady_selected"].long(), offset)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, remaining)


# ----------------------------------------------------------------------------------------------- helpers


def find_trady_model(model: nn.Module) -> TraDyModel:
    """The :class:`TraDyModel` inside ``model`` (a ``PeftModel``, a DDP/accelerate wrapper of one, or the tuner).

    Raises:
        ValueError: when ``model`` holds no TraDy adapter.

    Example::

        >>> tuner = find_trady_model(trainer.model_wrapped)        # doctest: +SKIP
        >>> tuner.current_selection()                              # doctest: +SKIP
    """
    seen = model
    while hasattr(seen, "module") and isinstance(seen.module, nn.Module) and not isinstance(seen, TraDyModel):
        seen = seen.module  # DDP and friends
    if isinstance(seen, TraDyModel):
        return seen
    base = getattr(seen, "base_model", None)
    if isinstance(base, TraDyModel):
        return base
    for module in seen.modules():
        if isinstance(module, TraDyModel):
            return module
    raise ValueError(f"{type(model).__name__} holds no TraDy adapter: create it with "
                     "peft.get_peft_model(model, hf_collapse.trady.TraDyConfig(...))")


def calibrate(model: nn.Module, batches: Iterable[Any], loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
              num_batches: Optional[int] = None) -> dict[str, Any]:
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

    Example::

        >>> peft_model = get_peft_model(model, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))  # doctest: +SKIP
        >>> calibrate(peft_model, DataLoader(train, batch_size=16, collate_fn=collator))         # doctest: +SKIP
        {'batches': 4, 'selected_layers': [...], ...}
    """
    return find_trady_model(model).calibrate(batches, loss_fn=loss_fn, num_batches=num_batches)
