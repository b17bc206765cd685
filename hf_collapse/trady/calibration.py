"""Calibration: TraDy's a priori step (the cost model's measurements and the reweighted-gradient-norm ranking).

``calibrate(model, batches)`` runs a few batches once, before training: it measures every target layer's activation
positions per sample and, unless the layers are given, the RGN of every input channel; it keeps the top layers and
allocates the trainable slices (see :mod:`hf_collapse.trady.sampling`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import sum_across_ranks
from ..metrics import to_device
from .config import TraDyConfig
from .layer import TraDyLayer
from .selection import candidate_layers, select_layers_by_rgn
from .sharding import check_not_sharded

logger = logging.getLogger(__name__)

__all__ = ["CalibrationMixin", "NOT_CALIBRATED_MESSAGE", "calibrate"]

NOT_CALIBRATED_MESSAGE = (
    "TraDy is not calibrated: call hf_collapse.trady.calibrate(model, batches) before training (it measures the cost "
    "model, ranks the layers and sizes the trainable channel slices), or train with a transformers.Trainer, which "
    "calibrates the adapter on the first batches of its training data")



class CalibrationMixin:
    """The calibration methods of :class:`~hf_collapse.trady.TraDyModel`."""

    def calibrate(self, batches: Iterable[Any], loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                  num_batches: Optional[int] = None, adapter_name: Optional[str] = None) -> dict[str, Any]:
        """The a priori step: measure every target layer's activation positions (the cost model) and, when the
        strategy needs it, the reweighted gradient norm of every channel; keep the top layers; allocate the flat
        parameter and draw the first channels. Stores ``layer_positions``, ``layer_rgn`` and ``selected_layers`` in
        the config. See :func:`calibrate`.
        """
        adapter_name = adapter_name or self._adapter()
        check_not_sharded(self.model, action="calibrate")
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
                batch = to_device(batch, device)
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
        stats = sum_across_ranks(torch.tensor([[position_sum[n], position_count[n]] for n in names],
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
            world = sum_across_ranks(torch.tensor([float(used)], dtype=torch.float64))
            flat = sum_across_ranks(torch.cat([norm_sum[n] for n in names]))
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
        hf_collapse.trady.sharding.ShardedTrainingError: under FSDP / DeepSpeed ZeRO / DTensor parameters (TraDy
            supports one device and DDP).

    Example::

        >>> peft_model = get_peft_model(model, TraDyConfig(task_type="SEQ_CLS", budget_ratio=0.05))  # doctest: +SKIP
        >>> calibrate(peft_model, DataLoader(train, batch_size=16, collate_fn=collator))         # doctest: +SKIP
        {'batches': 4, 'selected_layers': [...], ...}
    """
    from .model import find_trady_model

    return find_trady_model(model).calibrate(batches, loss_fn=loss_fn, num_batches=num_batches)
