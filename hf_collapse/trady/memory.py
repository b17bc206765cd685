"""Measured memory accounting of a training step: what is saved for backward, and by whom.

:func:`memory_report` runs one forward and backward pass under ``torch.autograd.graph.saved_tensors_hooks`` and
counts every tensor autograd keeps for backward (by storage, once, parameters excluded), split into:

* **weight-derivative part**: tensors saved only by the target layers (their inputs, kept to compute the weight
  gradients). This is what TraDy shrinks: a TraDy layer keeps only its selected input channels.
* **propagation part**: everything else the network keeps to propagate gradients down to the lowest trained
  layer (softmax outputs, norm statistics, activation-function inputs, dropout masks...). TraDy cannot shrink it,
  except by keeping the selection near the top of the network (``max_depth``): nothing is stored below the lowest
  layer that trains.

It also reports the weight-gradient elements, the FLOPs of the forward and backward passes (measured with
``torch.utils.flop_counter``), the analytic weight-derivative FLOPs, and, for a TraDy model, the paper's activation
sparsity, weight-derivative sparsity and weight-derivative FLOPs reduction (relative to updating every channel of
every target layer).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from .layer import TraDyLayer, channel_ops_for

__all__ = ["MemoryReport", "memory_report", "peak_memory_bytes"]


@dataclass
class MemoryReport:
    """What one training step of a model keeps for backward and computes, measured on one batch.

    Bytes are those saved for backward (parameters excluded, each storage once); elements are tensor elements.
    The sparsity / reduction fields are ``None`` for a model without TraDy layers.

    Example::

        >>> full = memory_report(base_model, batch)                                     # doctest: +SKIP
        >>> sparse = memory_report(trady_model, batch)                                  # doctest: +SKIP
        >>> sparse.method, round(sparse.saved_bytes_total / full.saved_bytes_total, 2)  # doctest: +SKIP
        ('trady', 0.61)
    """

    method: str
    batch_size: int
    saved_bytes_total: int
    saved_bytes_weight_derivative: int
    saved_bytes_propagation: int
    trainable_elements: int
    target_trainable_elements: int
    forward_flops: int
    backward_flops: int
    weight_derivative_flops: int
    dense_weight_derivative_flops: int
    activation_sparsity: Optional[float] = None
    weight_derivative_sparsity: Optional[float] = None
    weight_derivative_flops_reduction: Optional[float] = None
    lowest_trained_layer: Optional[str] = None
    target_layers: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gradient_bytes(self) -> int:
        """Bytes of the gradients of every trainable parameter (float32)."""
        return 4 * self.trainable_elements

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gradient_bytes"] = self.gradient_bytes
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self, reference: Optional["MemoryReport"] = None) -> str:
        """A two-column table (value, and ratio to ``reference`` when given, e.g. full fine-tuning's report)."""
        rows = [
            ("saved for backward, total (bytes)", self.saved_bytes_total, "saved_bytes_total"),
            ("  weight-derivative part (bytes)", self.saved_bytes_weight_derivative, "saved_bytes_weight_derivative"),
            ("  propagation part (bytes)", self.saved_bytes_propagation, "saved_bytes_propagation"),
            ("trainable / gradient elements", self.trainable_elements, "trainable_elements"),
            ("  in target layers", self.target_trainable_elements, "target_trainable_elements"),
            ("weight-derivative FLOPs", self.weight_derivative_flops, "weight_derivative_flops"),
            ("backward FLOPs (measured)", self.backward_flops, "backward_flops"),
        ]
        head = f"| {self.method} (batch {self.batch_size}) | value |" + (" vs reference |" if reference else "")
        lines = [head, "|---|---:|" + ("---:|" if reference else "")]
        for label, value, key in rows:
            line = f"| {label} | {value:,} |"
            if reference is not None:
                base = getattr(reference, key)
                line += f" {value / base:.3f} |" if base else " - |"
            lines.append(line)
        for label, value in (("activation sparsity", self.activation_sparsity),
                             ("weight-derivative sparsity", self.weight_derivative_sparsity),
                             ("weight-derivative FLOPs reduction", self.weight_derivative_flops_reduction)):
            if value is not None:
                lines.append(f"| {label} | {value:.4f} |" + (" |" if reference else ""))
        if self.lowest_trained_layer:
            lines.append(f"| lowest trained target layer | {self.lowest_trained_layer} |" + (" |" if reference else ""))
        return "\n".join(lines)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def _targets(model: nn.Module, target_modules: Optional[Iterable[str]]) -> dict[str, nn.Module]:
    trady = {n: m for n, m in model.named_modules() if isinstance(m, TraDyLayer)}
    if trady:
        return trady
    tuner_layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    if tuner_layers:
        return tuner_layers
    names = list(target_modules) if target_modules is not None else None
    chosen = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if names is not None and not any(name == t or name.endswith("." + t) for t in names):
            continue
        try:
            ops = channel_ops_for(module)
        except TypeError:
            ops = None
        if ops is not None:
            chosen[name] = module
    return chosen


def _storage(t: torch.Tensor) -> Optional[tuple[int, int]]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    return 0


def memory_report(model: nn.Module, batch: Mapping[str, Any], *, target_modules: Optional[Iterable[str]] = None,
                  loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, method: Optional[str] = None,
                  train_mode: bool = True) -> MemoryReport:
    """Measure what one training step of ``model`` on ``batch`` saves for backward, and its FLOPs.

    The target layers are the TraDy layers of a TraDy model, the peft tuner layers of another peft model (LoRA...),
    or else the Linear / Conv2d / Conv1D modules named by ``target_modules`` (exact names or suffixes; all of them
    when ``None``). The model's gradients are left as they were.

    Args:
        model: any ``nn.Module`` called as ``model(**batch)`` (a ``PeftModel``, a transformers model...).
        batch: the inputs, with labels unless ``loss_fn`` is given.
        target_modules: for a model without tuner layers, the layers whose weight-derivative part to count.
        loss_fn: ``loss_fn(outputs, batch) -> loss`` when the outputs carry no ``loss``.
        method: a label for the report (default: ``"trady"``, ``"peft"`` or ``"full"``).
        train_mode: measure in training mode (dropout on), as a training step would.

    Returns:
        A :class:`MemoryReport`.

    Example::

        >>> full = memory_report(base_model, batch, target_modules=["query", "key", "value", "dense"])  # doctest: +SKIP
        >>> sparse = memory_report(trady_model, batch)                                                  # doctest: +SKIP
        >>> print(sparse.to_markdown(reference=full))                                                  # doctest: +SKIP
    """
    model = _unwrap(model)
    targets = _targets(model, target_modules)
    is_trady = any(isinstance(m, TraDyLayer) for m in targets.values())
    if method is None:
        method = "trady" if is_trady else ("peft" if any(isinstance(m, BaseTunerLayer) for m in targets.values())
                                           else "full")
    parameter_storages = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        info = _storage(tensor)
        if info is not None:
            parameter_storages.add(info[0])

    active: list[str] = []
    saved: dict[int, list] = {}  # storage pointer -> [bytes, saved only inside target layers]
    layer_stats: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        info = _storage(tensor)
        if info is None or info[0] in parameter_storages or info[1] == 0:
            return tensor
        inside = bool(active)
        record = saved.get(info[0])
        if record is None:
            saved[info[0]] = [info[1], inside]
        else:
            record[0] = max(record[0], info[1])
            record[1] = record[1] and inside
        return tensor

    def make_hooks(name: str, module: nn.Module):
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        ops = channel_ops_for(base)

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            active.append(name)

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            active.pop()
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                return
            out_channels = output.shape[1] if ops.kind in ("conv2d", "depthwise") else output.shape[-1]
            out_positions = output.numel() // max(1, out_channels)
            full_weight = base.weight.numel()
            if isinstance(mod, TraDyLayer):
                adapter = mod.active_adapters[0] if mod.active_adapters else "default"
                index = mod.trady_selected.get(adapter)
                k = 0 if index is None or mod.disable_adapters or mod.merged else int(index.numel())
                trained = k * mod.weight_per_channel if torch.is_grad_enabled() and any(
                    p.requires_grad for p in mod._store.flat.values()) else 0
                trained_channels = k if trained else 0
            else:
                trained = sum(p.numel() for p in mod.parameters() if p.requires_grad)
                trained_channels = ops.in_channels if base.weight.requires_grad else 0
            stats = layer_stats.setdefault(name, {
                "name": name, "in_channels": ops.in_channels, "trained_channels": 0, "input_elements": 0,
                "stored_input_elements": 0, "weight_elements": full_weight, "trained_weight_elements": 0,
                "weight_derivative_flops": 0, "dense_weight_derivative_flops": 0})
            if name not in order:
                order.append(name)
            stats["trained_channels"] = trained_channels
            stats["input_elements"] += x.numel()
            stats["stored_input_elements"] += x.numel() * trained_channels // max(1, ops.in_channels)
            stats["trained_weight_elements"] = trained
            stats["weight_derivative_flops"] += 2 * out_positions * trained
            stats["dense_weight_derivative_flops"] += 2 * out_positions * full_weight

        return pre, post

    handles = []
    for name, module in targets.items():
        pre, post = make_hooks(name, module)
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    previous_grads = [p.grad for p in trainable]
    was_training = model.training
    try:
        model.train(train_mode)
        with FlopCounterMode(display=False) as forward_counter:
            with saved_tensors_hooks(pack, lambda tensor: tensor):
                outputs = model(**batch)
                loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("memory_report needs a loss: give a batch with labels or pass loss_fn(outputs, batch)")
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for p, grad in zip(trainable, previous_grads):
            p.grad = grad

    weight_derivative = sum(b for b, inside in saved.values() if inside)
    total = sum(b for b, _ in saved.values())
    layers = [layer_stats[n] for n in order]
    target_trainable = sum(s["trained_weight_elements"] for s in layers)
    trainable_elements = sum(p.numel() for p in trainable)
    if is_trady:
        flats = [p for m in targets.values() for p in m._store.flat.values() if p.requires_grad]
        seen = {id(p): p for p in flats}
        flat_elements = sum(p.numel() for p in seen.values())
        target_trainable = flat_elements  # the allocated slices get (dense) gradients
    report = MemoryReport(
        method=method,
        batch_size=_batch_size(batch),
        saved_bytes_total=int(total),
        saved_bytes_weight_derivative=int(weight_derivative),
        saved_bytes_propagation=int(total - weight_derivative),
        trainable_elements=int(trainable_elements),
        target_trainable_elements=int(target_trainable),
        forward_flops=int(forward_counter.get_total_flops()),
        backward_flops=int(backward_counter.get_total_flops()),
        weight_derivative_flops=int(sum(s["weight_derivative_flops"] for s in layers)),
        dense_weight_derivative_flops=int(sum(s["dense_weight_derivative_flops"] for s in layers)),
        lowest_trained_layer=next((s["name"] for s in layers if s["trained_channels"]), None),
        target_layers=len(layers),
        layers=layers,
    )
    if is_trady and layers:
        full_input = sum(s["input_elements"] for s in layers)
        stored_input = sum(s["stored_input_elements"] for s in layers)
        full_weight = sum(s["weight_elements"] for s in layers)
        trained_weight = sum(s["trained_weight_elements"] for s in layers)
        report.activation_sparsity = 1.0 - stored_input / full_input if full_input else None
        report.weight_derivative_sparsity = 1.0 - trained_weight / full_weight if full_weight else None
        dense = report.dense_weight_derivative_flops
        report.weight_derivative_flops_reduction = 1.0 - report.weight_derivative_flops / dense if dense else None
    return report


def peak_memory_bytes(step: Callable[[], Any], device: Optional[torch.device | str] = None) -> int:
    """Peak bytes allocated by ``step()`` above what was allocated when it started.

    On CUDA this is ``torch.cuda.max_memory_allocated``; on CPU it is the running sum of the allocation events the
    PyTorch profiler records (``profile_memory=True``), whose maximum is the peak.

    Example::

        >>> peak = peak_memory_bytes(lambda: model(**batch).loss.backward())   # doctest: +SKIP
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)
