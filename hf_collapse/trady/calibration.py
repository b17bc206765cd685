"""Calibration: TraDy's a priori step (the cost model's measurements and the reweighted-gradient-norm ranking).

``calibrate(model, batches)`` runs a few batches once, before training: it measures every target layer's activation
positions per sample and, unless the layers are given, the RGN of every input channel, and keeps the top layers. The
functions here see the base model, the adapter's layers and its config, never the tuner; the tuner then hands the
result to its :class:`~hf_collapse.trady.sampling.ChannelSampler`, which sizes the trainable slices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import sum_across_ranks
from ..metrics import to_device
from .config import TraDyConfig
from .layer import TraDyLayer
from .selection import candidate_layers, select_layers_by_rgn
from .sharding import check_not_sharded
from .strategies import SELECTIONS

logger = logging.getLogger(__name__)

__all__ = ["calibrate_layers", "refresh_rgn"]


def calibrate_layers(
    model: nn.Module,
    layers: Mapping[str, TraDyLayer],
    config: TraDyConfig,
    adapter_name: str,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    num_batches: int | None = None,
) -> int:
    """The a priori step on ``model`` (the base model carrying ``layers``): measure every target layer's activation
    positions (the cost model) and, when the strategy needs it, the reweighted gradient norm of every channel; keep
    the top layers. Stores ``layer_positions``, ``layer_rgn`` and ``selected_layers`` in ``config`` and each layer's
    channel RGN in the layer. Returns the number of batches used. See :func:`hf_collapse.trady.calibrate`.
    """
    check_not_sharded(model, action="calibrate")
    if config.selected_layers is not None:
        unknown = sorted(set(config.selected_layers) - set(layers))
        if unknown:
            raise ValueError(
                f"selected_layers names layers that are not TraDy layers of this model: {unknown[:5]}"
                f"; TraDy layers: {list(layers)[:5]} ..."
            )
    strategy = SELECTIONS.get(config.selection)
    need_rgn = strategy.needs_channel_rgn or (strategy.ranks_layers and config.selected_layers is None)
    used, order, positions, missing, channel_rgn = _measure(
        model, layers, batches, need_rgn, loss_fn, int(num_batches or config.calibration_batches)
    )
    config.layer_positions = {n: round(float(positions[n]), 4) for n in order}
    if need_rgn:
        for name, rgn in channel_rgn.items():
            layers[name].trady_rgn[adapter_name] = rgn
        config.layer_rgn = {n: float(channel_rgn[n].sum()) for n in order}
        if config.selected_layers is None:
            allowed = [n for n in candidate_layers(order, config.max_depth) if n not in missing]
            config.selected_layers = select_layers_by_rgn(config.layer_rgn, config.coverage, allowed)
    return used


def refresh_rgn(
    model: nn.Module,
    layers: Mapping[str, TraDyLayer],
    config: TraDyConfig,
    adapter_name: str,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    num_batches: int | None = None,
) -> None:
    """Recompute the channel RGN on ``batches`` (full weight gradients of the target layers: outside the
    budget), keeping the cost model, the selected layers and the flat parameter. ``det_rgn`` uses it per epoch."""
    positions = config.layer_positions or {}
    _, _, _, _, channel_rgn = _measure(
        model, layers, batches, True, loss_fn, int(num_batches or config.calibration_batches), positions
    )
    for name, rgn in channel_rgn.items():
        layers[name].trady_rgn[adapter_name] = rgn


def _measure(
    model: nn.Module,
    layers: Mapping[str, TraDyLayer],
    batches: Iterable[Any],
    need_rgn: bool,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    num_batches: int,
    fixed_positions: Mapping[str, float] | None = None,
):
    """Run calibration batches: positions per sample of every layer (forward order) and, if ``need_rgn``, the
    per-channel RGN (summed over DDP ranks). Returns ``(batches used, order, positions, missing, channel_rgn)``."""
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
    requires = {id(p): (p, p.requires_grad) for p in model.parameters()}
    was_training = model.training
    norm_sum = {name: torch.zeros(layer.in_channels, dtype=torch.float64) for name, layer in layers.items()}
    used = 0
    try:
        model.eval()  # no dropout: the ranking should not depend on the masks drawn
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
                outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
                if need_rgn:
                    loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
                    if loss is None:
                        raise ValueError(
                            "calibration needs a loss: give batches with labels (the model then "
                            "returns outputs.loss) or pass loss_fn(outputs, batch)"
                        )
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
        model.train(was_training)
    if used == 0:
        raise ValueError("calibrate received no batch")

    names = list(layers)
    stats = sum_across_ranks(torch.tensor([[position_sum[n], position_count[n]] for n in names], dtype=torch.float64))
    missing = [n for n, (_, count) in zip(names, stats.tolist()) if count == 0]
    if missing:
        logger.warning(
            "TraDy: %d target layer(s) never ran during calibration and cannot be selected: %s",
            len(missing),
            missing[:5],
        )
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
            norms = flat[offset : offset + layer.in_channels]
            offset += layer.in_channels
            cost = layer.weight_per_channel + positions[name]
            rgn = (norms / float(world[0]) / cost).float()
            if name in missing:
                rgn.zero_()
            channel_rgn[name] = rgn.to(layer.get_base_layer().weight.device)
    return used, order, positions, missing, channel_rgn
