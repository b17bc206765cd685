"""Measured memory of a training step, for any model: what is saved for backward and by whom, and the peak.

:func:`memory_report` runs one forward and backward pass under ``torch.autograd.graph.saved_tensors_hooks`` and
counts every tensor autograd keeps for backward (by storage, once, parameters excluded), split into:

* **weight-derivative part**: tensors saved only by the target layers (their inputs, kept to compute the weight
  gradients). This is what TraDy shrinks: a TraDy layer keeps only its selected input channels.
* **propagation part**: everything else the network keeps to propagate gradients down to the lowest trained
  layer (softmax outputs, norm statistics, activation-function inputs, dropout masks...). TraDy cannot shrink it,
  except by keeping the selection near the top of the network (``max_depth``): nothing is stored below the lowest
  layer that trains.

It also reports the weight-gradient elements, the FLOPs of the forward and backward passes (measured with
``torch.utils.flop_counter``), the analytic weight-derivative FLOPs, and, for a model whose adapter layers train a
subset of their input channels (TraDy), the paper's activation sparsity, weight-derivative sparsity and
weight-derivative FLOPs reduction (relative to updating every channel of every target layer).

:func:`step_memory` measures the *peak* memory of one whole training step (forward, backward and optimizer step)
and splits it into parameters, gradients, optimizer state and activations (everything else live at the peak). On
CUDA it reads the caching allocator's counters (``torch.cuda.max_memory_allocated``); on CPU it replays the
allocation and free events the PyTorch profiler records (``profile_memory=True``), whose running sum peaks where
the step does.

The profiler knows no particular method. A peft tuner layer that trains a subset of its input channels says so
through three methods (TraDy's layers have them): ``trained_input_channels()`` (how many channels train now),
``trained_weight_elements()`` (the weight elements they update) and ``trainable_slices()`` (the parameters that hold
those updates, possibly shared between layers), plus a ``profile_label`` attribute (``"trady"``). A module of the
model with a ``measuring()`` context manager is entered while the steps are measured (TraDy's tuner puts its step
counter back after it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from . import compat
from .architectures.base import unwrap_model

__all__ = ["MemoryReport", "PHASES", "StepMemory", "memory_report", "peak_memory_bytes", "step_memory"]


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
    activation_sparsity: float | None = None
    weight_derivative_sparsity: float | None = None
    weight_derivative_flops_reduction: float | None = None
    lowest_trained_layer: str | None = None
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

    def to_markdown(self, reference: MemoryReport | None = None) -> str:
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
        for label, value in (
            ("activation sparsity", self.activation_sparsity),
            ("weight-derivative sparsity", self.weight_derivative_sparsity),
            ("weight-derivative FLOPs reduction", self.weight_derivative_flops_reduction),
        ):
            if value is not None:
                lines.append(f"| {label} | {value:.4f} |" + (" |" if reference else ""))
        if self.lowest_trained_layer:
            lines.append(f"| lowest trained target layer | {self.lowest_trained_layer} |" + (" |" if reference else ""))
        return "\n".join(lines)


def _channels(module: nn.Module) -> tuple[int, bool] | None:
    """``(input channels, whether the output's channels are on axis 1)`` of a Linear, Conv2d or transformers' Conv1D;
    ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, False
    if isinstance(module, nn.Conv2d):
        return module.in_channels, True
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # GPT-2: (in, out)
        return int(module.weight.shape[0]), False
    return None


def _channel_sparse(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer that trains a subset of its input channels (see the module docstring)."""
    return callable(getattr(module, "trained_input_channels", None))


def _targets(model: nn.Module, target_modules: Iterable[str] | None) -> dict[str, nn.Module]:
    tuner_layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    sparse = {n: m for n, m in tuner_layers.items() if _channel_sparse(m)}
    if sparse or tuner_layers:
        return sparse or tuner_layers
    names = list(target_modules) if target_modules is not None else None
    chosen = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if names is not None and not any(name == t or name.endswith("." + t) for t in names):
            continue
        if _channels(module) is not None:
            chosen[name] = module
    return chosen


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Enter the ``measuring()`` context of every module that has one (a measurement must not move a run along)."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            measuring = getattr(type(module), "measuring", None)
            if callable(measuring):
                stack.enter_context(module.measuring())
        yield


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
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


def memory_report(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    target_modules: Iterable[str] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    method: str | None = None,
    train_mode: bool = True,
) -> MemoryReport:
    """Measure what one training step of ``model`` on ``batch`` saves for backward, and its FLOPs.

    The target layers are the channel-sparse adapter layers of a TraDy model, the peft tuner layers of another peft
    model (LoRA...), or else the Linear / Conv2d / Conv1D modules named by ``target_modules`` (exact names or
    suffixes; all of them when ``None``). The model's gradients are left as they were.

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
    model = unwrap_model(model, keep_peft=True)
    targets = _targets(model, target_modules)
    sparse = any(_channel_sparse(m) for m in targets.values())
    if method is None:
        labels = {getattr(m, "profile_label", "peft") for m in targets.values() if _channel_sparse(m)}
        method = (
            labels.pop()
            if len(labels) == 1
            else ("peft" if any(isinstance(m, BaseTunerLayer) for m in targets.values()) else "full")
        )
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
        in_channels, conv = _channels(base)

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            active.append(name)

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            active.pop()
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                return
            out_channels = output.shape[1] if conv else output.shape[-1]
            out_positions = output.numel() // max(1, out_channels)
            full_weight = base.weight.numel()
            if _channel_sparse(mod):
                trained_channels = int(mod.trained_input_channels()) if torch.is_grad_enabled() else 0
                trained = int(mod.trained_weight_elements()) if trained_channels else 0
            else:
                trained = sum(p.numel() for p in mod.parameters() if p.requires_grad)
                trained_channels = in_channels if base.weight.requires_grad else 0
            stats = layer_stats.setdefault(
                name,
                {
                    "name": name,
                    "in_channels": in_channels,
                    "trained_channels": 0,
                    "input_elements": 0,
                    "stored_input_elements": 0,
                    "weight_elements": full_weight,
                    "trained_weight_elements": 0,
                    "weight_derivative_flops": 0,
                    "dense_weight_derivative_flops": 0,
                },
            )
            if name not in order:
                order.append(name)
            stats["trained_channels"] = trained_channels
            stats["input_elements"] += x.numel()
            stats["stored_input_elements"] += x.numel() * trained_channels // max(1, in_channels)
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
    if sparse:  # the allocated slices get (dense) gradients, whether or not a channel fills them now
        slices = {id(p): p for m in targets.values() if _channel_sparse(m) for p in m.trainable_slices()}
        target_trainable = sum(p.numel() for p in slices.values())
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
    if sparse and layers:
        full_input = sum(s["input_elements"] for s in layers)
        stored_input = sum(s["stored_input_elements"] for s in layers)
        full_weight = sum(s["weight_elements"] for s in layers)
        trained_weight = sum(s["trained_weight_elements"] for s in layers)
        report.activation_sparsity = 1.0 - stored_input / full_input if full_input else None
        report.weight_derivative_sparsity = 1.0 - trained_weight / full_weight if full_weight else None
        dense = report.dense_weight_derivative_flops
        report.weight_derivative_flops_reduction = 1.0 - report.weight_derivative_flops / dense if dense else None
    return report


def peak_memory_bytes(step: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes allocated by ``step()`` above what was allocated when it started.

    On CUDA this is ``torch.cuda.max_memory_allocated``; on CPU it is the running sum of the allocation events the
    PyTorch profiler records (``profile_memory=True``), whose maximum is the peak.

    Example::

        >>> peak = peak_memory_bytes(lambda: model(**batch).loss.backward())   # doctest: +SKIP
    """
    clock = _PhaseClock(torch.device(device) if device is not None else torch.device("cpu"))
    with clock.running(), clock.phase("step"):
        step()
    return clock.peaks["step"]


# ----------------------------------------------------------------------------------------------- peak of one step

#: The phases of a training step, in order.
PHASES = ("forward", "backward", "optimizer")


@dataclass
class StepMemory:
    """The peak memory of one training step (forward + backward + optimizer step), measured, with its breakdown.

    All sizes are bytes. ``peak_bytes`` is what the step holds at its highest point: the parameters and the optimizer
    state (resident before the step), plus the most the step itself allocated at once. The parts:

    * ``parameter_bytes``: parameters and buffers (each storage once);
    * ``gradient_bytes``: the gradients the backward pass leaves (every trainable parameter's ``.grad``);
    * ``optimizer_state_bytes``: the optimizer's state after the step (Adam's two moments, momentum...);
    * ``activation_bytes``: the rest of the peak: activations saved for backward and temporaries. When the peak
      comes in the forward pass no gradient exists yet, so none is subtracted; when it comes later every gradient
      is counted as present (an upper bound on their share mid-backward).

    ``saved_for_backward_bytes`` is measured on its own (what autograd keeps for backward, each storage once,
    parameters excluded: :func:`memory_report`'s ``saved_bytes_total``), and ``phase_peak_bytes`` gives each phase's
    own peak on the same scale as ``peak_bytes``.

    Example::

        >>> full = step_memory(model, batch)                                          # doctest: +SKIP
        >>> sparse = step_memory(trady_model, batch)                                  # doctest: +SKIP
        >>> print(sparse.to_markdown(reference=full))                                 # doctest: +SKIP
    """

    method: str
    device: str
    batch_size: int
    optimizer: str
    peak_bytes: int
    parameter_bytes: int
    trainable_parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int
    saved_for_backward_bytes: int
    peak_phase: str
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    measured_with: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(
        self, reference: StepMemory | None = None, references: Mapping[str, StepMemory] | None = None
    ) -> str:
        """A table in MiB: this step, and other steps beside it (``references``, e.g. ``{"full": full_report}``;
        ``reference`` alone adds its ratio column)."""
        columns = {self.method: self}
        if references:
            columns.update(references)
        elif reference is not None:
            columns[reference.method if reference.method != self.method else "reference"] = reference
        rows = [
            ("peak of a training step", "peak_bytes"),
            ("  parameters", "parameter_bytes"),
            ("  gradients", "gradient_bytes"),
            ("  optimizer state", "optimizer_state_bytes"),
            ("  activations and temporaries", "activation_bytes"),
            ("saved for backward", "saved_for_backward_bytes"),
        ]
        ratio = reference is not None and not references
        head = "| MiB | " + " | ".join(columns) + " |" + (" ratio |" if ratio else "")
        lines = [head, "|---|" + "---:|" * len(columns) + ("---:|" if ratio else "")]
        for label, key in rows:
            values = [getattr(c, key) for c in columns.values()]
            line = f"| {label} | " + " | ".join(f"{v / 2**20:,.2f}" for v in values) + " |"
            if ratio:
                base = getattr(reference, key)
                line += f" {getattr(self, key) / base:.3f} |" if base else " - |"
            lines.append(line)
        lines.append(
            "| peak phase | " + " | ".join(c.peak_phase for c in columns.values()) + " |" + (" |" if ratio else "")
        )
        return "\n".join(lines)


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        info = _storage(tensor)
        if info is not None:
            seen[info[0]] = max(seen.get(info[0], 0), info[1])
    return sum(seen.values())


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    tensors = []
    for state in getattr(optimizer, "state", {}).values():
        if isinstance(state, Mapping):
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


class _PhaseClock:
    """Per-phase peaks of what the step allocated above its start: CUDA counters, or CPU profiler events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, int] = {}
        self._profile = None

    @contextlib.contextmanager
    def running(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            yield
        self._profile = prof
        self._cpu_peaks()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peaks[name] = int(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        with torch.profiler.record_function(f"hf_collapse::{name}"):
            yield

    def _cpu_peaks(self) -> None:
        events = compat.profiler_events(self._profile)
        spans = {}
        for event in events:
            name = event.name()
            if name.startswith("hf_collapse::"):
                spans[name.split("::", 1)[1]] = (event.start_ns(), event.start_ns() + event.duration_ns())
        memory = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        current = 0
        self.peaks.update({phase: 0 for phase in spans})
        for time_ns, nbytes in memory:
            current += nbytes
            for phase, (start, end) in spans.items():
                if start <= time_ns <= end:
                    self.peaks[phase] = max(self.peaks[phase], current)


def step_memory(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    optimizer_factory: Callable[[list[torch.nn.Parameter]], Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    method: str | None = None,
    warmup_steps: int = 1,
    train_mode: bool = True,
) -> StepMemory:
    """Measure the peak memory of one training step of ``model`` on ``batch``: forward, backward, optimizer step.

    The step is a steady-state one, as in the middle of a training run: ``warmup_steps`` steps first create the
    optimizer state, then the measured step starts with no gradients (``zero_grad(set_to_none=True)``, as the
    Trainer does) and the optimizer state in place. The optimizer is a fresh one over the trainable parameters
    (``optimizer_factory(params)``; default AdamW with learning rate 0, which allocates what any AdamW step does and
    leaves the weights as they are). The model's gradients (and a module's run state, through its ``measuring()``
    context: TraDy's step counter) are put back afterwards;
    a factory with a non-zero learning rate changes the weights. A model with nothing to train is measured on its
    forward pass alone (under ``torch.no_grad``: a frozen model's inference).

    Measured on the device of the model's parameters: on CUDA with ``torch.cuda.max_memory_allocated`` (per phase,
    after ``reset_peak_memory_stats``); on CPU from the allocation events of the PyTorch profiler, whose running sum
    gives the peak. Either way the peak is the step's own allocations above its start, plus the parameters and the
    optimizer state resident at its start.

    Args:
        model: any ``nn.Module`` called as ``model(**batch)`` (a ``PeftModel``, a transformers model...).
        batch: the inputs, on the model's device, with labels unless ``loss_fn`` is given.
        optimizer_factory: builds the optimizer from the trainable parameters.
        loss_fn: ``loss_fn(outputs, batch) -> loss`` when the outputs carry no ``loss``.
        method: a label (default: ``"trady"``, ``"peft"``, ``"full"`` or ``"frozen"``).
        warmup_steps: steps before the measured one (0: the measured step creates the optimizer state).
        train_mode: measure in training mode (dropout on).

    Returns:
        A :class:`StepMemory`.

    Example::

        >>> report = step_memory(trady_model, batch)                                  # doctest: +SKIP
        >>> report.peak_bytes, report.optimizer_state_bytes                           # doctest: +SKIP
    """
    model = unwrap_model(model, keep_peft=True)
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    device = parameters[0].device if parameters else torch.device("cpu")
    if method is None:
        labels = {getattr(m, "profile_label", "peft") for m in model.modules() if _channel_sparse(m)}
        if not trainable:
            method = "frozen"
        elif labels:
            method = labels.pop() if len(labels) == 1 else "peft"
        elif any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            method = "peft"
        else:
            method = "full"
    if optimizer_factory is None:

        def optimizer_factory(params):
            return torch.optim.AdamW(params, lr=0.0)

    optimizer = optimizer_factory(trainable) if trainable else None
    previous_grads = [p.grad for p in trainable]
    was_training = model.training
    saved: dict[int, int] = {}
    parameter_storages = {info[0] for t in [*parameters, *model.buffers()] if (info := _storage(t)) is not None}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        info = _storage(tensor)
        if info is not None and info[0] not in parameter_storages:
            saved[info[0]] = max(saved.get(info[0], 0), info[1])
        return tensor

    def loss_of(outputs: Any) -> torch.Tensor:
        loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError("step_memory needs a loss: give a batch with labels or pass loss_fn(outputs, batch)")
        return loss

    def run_step(clock: _PhaseClock | None = None) -> None:
        phase = clock.phase if clock is not None else (lambda name: contextlib.nullcontext())
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        if not trainable:
            with phase("forward"), torch.no_grad():
                model(**batch)
            return
        with phase("forward"), saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_of(model(**batch))
        with phase("backward"):
            loss.backward()
            del loss
        with phase("optimizer"):
            optimizer.step()

    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.train(train_mode)
        with _measuring(model), torch.random.fork_rng(devices=devices):
            for _ in range(max(0, int(warmup_steps))):
                run_step()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            saved.clear()
            state_bytes = _unique_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0
            clock = _PhaseClock(device)
            with clock.running():
                run_step(clock)
            gradient_bytes = _unique_bytes(p.grad for p in trainable if p.grad is not None)
            state_after = _unique_bytes(_optimizer_tensors(optimizer)) if optimizer is not None else 0
    finally:
        model.train(was_training)
        for p, grad in zip(trainable, previous_grads):
            p.grad = grad
    parameter_bytes = _unique_bytes([*parameters, *model.buffers()])
    resident = parameter_bytes + state_bytes
    phase_peaks = {name: resident + int(value) for name, value in clock.peaks.items()}
    peak_phase = max(phase_peaks, key=lambda name: phase_peaks[name]) if phase_peaks else "forward"
    peak = phase_peaks.get(peak_phase, resident)
    optimizer_state = max(state_bytes, state_after)
    present_gradients = 0 if peak_phase == "forward" else gradient_bytes
    activation = max(0, peak - parameter_bytes - optimizer_state - present_gradients)
    return StepMemory(
        method=method,
        device=str(device),
        batch_size=_batch_size(batch),
        optimizer=type(optimizer).__name__ if optimizer is not None else "none",
        peak_bytes=int(peak),
        parameter_bytes=int(parameter_bytes),
        trainable_parameter_bytes=int(_unique_bytes(trainable)),
        gradient_bytes=int(gradient_bytes),
        optimizer_state_bytes=int(optimizer_state),
        activation_bytes=int(activation),
        saved_for_backward_bytes=int(sum(saved.values())),
        peak_phase=peak_phase,
        phase_peak_bytes=phase_peaks,
        measured_with="torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler memory events",
    )
