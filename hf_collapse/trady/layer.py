"""TraDy tuner layers: a frozen base conv/linear plus a trainable delta on a few of its input channels.

The update of the selected input channels lives in a slice-shaped delta (``(C_out, k)`` for a linear,
``(C_out, k, kh, kw)`` for a conv, ``(k, C_out)`` for GPT-2's transposed ``Conv1D``, ``(k·m, 1, kh, kw)`` for a
depthwise conv with multiplier ``m``). The deltas of all layers are views into one flat parameter held by
:class:`~hf_collapse.trady.TraDyModel`, so the parameter the optimizer and DDP see keeps its shape when the
channels are re-sampled.

The forward runs :class:`ChannelSliceFunction`, a custom autograd function that saves **only the selected input
channels** of the activation for backward and computes **only their weight gradient** (plus the input gradient,
when the input needs one). Everything else the layer needs in backward is a weight, which is stored anyway.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import compat
from .state import FlatStore

__all__ = ["ChannelSliceFunction", "TraDyLayer", "channel_ops_for", "supported_module_types"]


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def supported_module_types() -> str:
    """What TraDy can target, for error messages.

    Example::

        >>> print(supported_module_types())
        torch.nn.Linear, torch.nn.Conv2d (groups=1 or depthwise, zero padding) and transformers' Conv1D (GPT-2)
    """
    return "torch.nn.Linear, torch.nn.Conv2d (groups=1 or depthwise, zero padding) and transformers' Conv1D (GPT-2)"


# ----------------------------------------------------------------------------------------------- channel ops


class _ChannelOps:
    """How one family of layers maps an input channel to a weight slice, and computes with a slice."""

    kind = "base"

    def __init__(self, module: nn.Module):
        self.module = module

    # -- shapes and the cost model
    in_channels: int
    out_channels: int

    @property
    def weight_per_channel(self) -> int:
        """Weight-gradient elements of one input channel's slice."""
        raise NotImplementedError

    def slice_shape(self, k: int) -> tuple[int, ...]:
        raise NotImplementedError

    def positions(self, x: torch.Tensor) -> float:
        """Activation elements per sample of one input channel (tokens, or H·W)."""
        raise NotImplementedError

    # -- slices of the base weight: input channels index axis `channel_dim` (through `_weight_index`)
    channel_dim = 1

    def _weight_index(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def read_slice(self, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return weight.index_select(self.channel_dim, self._weight_index(index))

    def write_slice(self, weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        weight.index_copy_(self.channel_dim, self._weight_index(index), values.to(weight.dtype))

    def add_slice(self, weight: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> None:
        weight.index_add_(self.channel_dim, self._weight_index(index), delta.to(weight.dtype))

    def effective_weight(self, weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A new tensor: ``weight`` with ``delta`` added on the selected slice (the same arithmetic as a merge)."""
        return weight.index_add(self.channel_dim, self._weight_index(index), delta.to(weight.dtype))

    def channel_norms(self, weight_grad: torch.Tensor) -> torch.Tensor:
        """``‖∂L/∂W_c‖`` for every input channel ``c`` of a full weight gradient."""
        raise NotImplementedError

    # -- compute
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def select_input(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def input_grad(self, grad: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def delta_grad(
        self, grad: torch.Tensor, x_sel: torch.Tensor, delta_shape: torch.Size, index: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _LinearOps(_ChannelOps):
    kind = "linear"

    def __init__(self, module: nn.Linear):
        super().__init__(module)
        self.out_channels, self.in_channels = module.weight.shape

    @property
    def weight_per_channel(self) -> int:
        return self.out_channels

    def slice_shape(self, k: int) -> tuple[int, ...]:
        return (self.out_channels, k)

    def positions(self, x: torch.Tensor) -> float:
        return x.numel() / max(1, x.shape[0] * self.in_channels) if x.dim() > 1 else 1.0

    def channel_norms(self, weight_grad):
        return weight_grad.float().norm(dim=0)

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def select_input(self, x, index):
        return x.index_select(-1, index)

    def input_grad(self, grad, weight, x_shape):
        return grad.matmul(weight.to(grad.dtype)).reshape(x_shape)

    def delta_grad(self, grad, x_sel, delta_shape, index):
        g = grad.reshape(-1, grad.shape[-1])
        xs = x_sel.reshape(-1, x_sel.shape[-1]).to(g.dtype)  # under autocast the two may differ
        return g.t().mm(xs)

    def bias_grad(self, grad):
        return grad.reshape(-1, grad.shape[-1]).sum(0)


class _TransposedOps(_LinearOps):
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""

    kind = "conv1d"
    channel_dim = 0

    def __init__(self, module: nn.Module):
        _ChannelOps.__init__(self, module)
        self.in_channels, self.out_channels = module.weight.shape

    def slice_shape(self, k):
        return (k, self.out_channels)

    def channel_norms(self, weight_grad):
        return weight_grad.float().norm(dim=1)

    def forward(self, x, weight, bias):
        # The same arithmetic as Conv1D.forward, so that a merged model gives identical outputs.
        size_out = x.size()[:-1] + (self.out_channels,)
        return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)

    def input_grad(self, grad, weight, x_shape):
        return grad.reshape(-1, grad.shape[-1]).mm(weight.to(grad.dtype).t()).reshape(x_shape)

    def delta_grad(self, grad, x_sel, delta_shape, index):
        g = grad.reshape(-1, grad.shape[-1])
        xs = x_sel.reshape(-1, x_sel.shape[-1]).to(g.dtype)
        return xs.t().mm(g)


class _ConvOps(_ChannelOps):
    """A dense ``nn.Conv2d`` (``groups=1``)."""

    kind = "conv2d"

    def __init__(self, module: nn.Conv2d):
        super().__init__(module)
        self.out_channels, self.in_channels = module.out_channels, module.in_channels
        self.kernel_elements = int(math.prod(module.kernel_size))

    @property
    def weight_per_channel(self) -> int:
        return self.out_channels * self.kernel_elements

    def slice_shape(self, k):
        return (self.out_channels, k, *self.module.kernel_size)

    def positions(self, x):
        return float(math.prod(x.shape[2:]))

    def channel_norms(self, weight_grad):
        return weight_grad.float().transpose(0, 1).reshape(self.in_channels, -1).norm(dim=1)

    def forward(self, x, weight, bias):
        return compat.conv2d_forward(self.module, x, weight, bias)

    def select_input(self, x, index):
        return x.index_select(1, index)

    def _geometry(self):
        m = self.module
        return m.stride, m.padding, m.dilation

    def input_grad(self, grad, weight, x_shape):
        stride, padding, dilation = self._geometry()
        return torch.nn.grad.conv2d_input(
            x_shape, weight.to(grad.dtype), grad, stride, padding, dilation, self.module.groups
        )

    def delta_grad(self, grad, x_sel, delta_shape, index):
        stride, padding, dilation = self._geometry()
        return torch.nn.grad.conv2d_weight(x_sel.to(grad.dtype), delta_shape, grad, stride, padding, dilation, 1)

    def bias_grad(self, grad):
        return grad.sum(dim=(0, 2, 3))


class _DepthwiseOps(_ConvOps):
    """A depthwise ``nn.Conv2d`` (``groups == in_channels``; ``out = m·in``): channel ``c`` owns rows ``c·m..c·m+m``."""

    kind = "depthwise"

    def __init__(self, module: nn.Conv2d):
        super().__init__(module)
        self.multiplier = module.out_channels // module.in_channels

    @property
    def weight_per_channel(self) -> int:
        return self.multiplier * self.kernel_elements

    def slice_shape(self, k):
        return (k * self.multiplier, 1, *self.module.kernel_size)

    channel_dim = 0  # a depthwise weight is (in * multiplier, 1, kh, kw): channel c owns rows c*m .. c*m+m-1

    def _weight_index(self, index):
        m = self.multiplier
        if m == 1:
            return index
        return (index[:, None] * m + torch.arange(m, device=index.device)).reshape(-1)

    def channel_norms(self, weight_grad):
        return weight_grad.float().reshape(self.in_channels, -1).norm(dim=1)

    def delta_grad(self, grad, x_sel, delta_shape, index):
        stride, padding, dilation = self._geometry()
        grad_rows = grad.index_select(1, self._weight_index(index))
        return torch.nn.grad.conv2d_weight(
            x_sel.to(grad.dtype), delta_shape, grad_rows, stride, padding, dilation, x_sel.shape[1]
        )


def channel_ops_for(module: nn.Module) -> _ChannelOps | None:
    """The channel operations of a supported module, ``None`` for a module TraDy cannot target.

    Raises:
        TypeError: for a Conv2d TraDy cannot slice (grouped but not depthwise, non-zero padding mode, string padding).

    Example::

        >>> channel_ops_for(nn.Conv2d(32, 32, 3, padding=1, groups=32)).kind
        'depthwise'
        >>> channel_ops_for(nn.Linear(384, 1536)).slice_shape(4), channel_ops_for(nn.LayerNorm(384))
        ((1536, 4), None)
    """
    conv1d = _conv1d_class()
    if isinstance(module, nn.Linear):
        return _LinearOps(module)
    if conv1d is not None and isinstance(module, conv1d):
        return _TransposedOps(module)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise TypeError(
                f"TraDy supports Conv2d with numeric zero padding only, got padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r}"
            )
        if module.groups == 1:
            return _ConvOps(module)
        if module.groups == module.in_channels and module.out_channels % module.in_channels == 0:
            return _DepthwiseOps(module)
        raise TypeError(
            f"TraDy supports dense (groups=1) or depthwise Conv2d, got groups={module.groups} for "
            f"{module.in_channels} input channels"
        )
    return None


# ----------------------------------------------------------------------------------------------- autograd


class ChannelSliceFunction(torch.autograd.Function):
    """``y = layer(x)`` with the weight ``W + delta`` on the selected input channels ``index``.

    Saved for backward: the selected channels of ``x`` (only when ``delta`` needs a gradient) and references to the
    weights. Backward returns the input gradient (only when ``x`` needs one: below the lowest selected layer nothing
    does, so nothing is computed) and the gradient of ``delta``, i.e. of the selected weight slice only.
    ``weight`` never gets a gradient.

    Example::

        >>> linear, x, index = nn.Linear(64, 32), torch.randn(3, 5, 64), torch.tensor([0, 7, 9, 40])
        >>> ops, delta = channel_ops_for(linear), torch.zeros(32, 4, requires_grad=True)    # ops.slice_shape(4)
        >>> ChannelSliceFunction.apply(x, linear.weight, linear.bias, delta, index, ops).sum().backward()
        >>> delta.grad.shape                                    # only x[..., index] was saved for it
        torch.Size([32, 4])
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        delta: torch.Tensor,
        index: torch.Tensor,
        ops: _ChannelOps,
    ) -> torch.Tensor:
        w_eff = ops.effective_weight(weight, delta, index)
        out = ops.forward(x, w_eff, bias)
        x_sel = ops.select_input(x, index) if ctx.needs_input_grad[3] else None
        ctx.ops = ops
        ctx.x_shape = x.shape
        ctx.save_for_backward(x_sel, weight, delta, index)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x_sel, weight, delta, index = ctx.saved_tensors
        ops: _ChannelOps = ctx.ops
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.input_grad(grad, ops.effective_weight(weight, delta, index), ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = ops.bias_grad(grad)
        if ctx.needs_input_grad[3]:
            grad_delta = ops.delta_grad(grad, x_sel, delta.shape, index).to(delta.dtype)
        return grad_x, None, grad_bias, grad_delta, None, None


# ----------------------------------------------------------------------------------------------- the layer


class TraDyLayer(nn.Module, BaseTunerLayer):
    """A target conv/linear wrapped by TraDy: frozen ``base_layer`` plus a delta on the selected input channels.

    Per adapter the layer keeps the current selection (``trady_selected``: sorted channel indices), where its delta
    starts in the flat parameter (``trady_offset``), the channels already merged into the base weight
    (``trady_merged``: a boolean mask) and, after calibration, the per-channel RGN (``trady_rgn``).

    Re-sampling merges the current delta into ``base_layer.weight`` (in place): the base weight therefore carries
    the updates of past epochs, and disabling the adapter removes only the current epoch's delta.

    Example (not run by doctest: it needs a TraDy model calibrated on data, and the channels depend on the draw)::

        >>> layer = find_trady_model(peft_model).trady_layers()["bert.encoder.layer.5.output.dense"]  # doctest: +SKIP
        >>> layer.selected_channels()[:4]                       # doctest: +SKIP
        [0, 6, 22, 36]
        >>> layer.get_delta_weight("default").shape == layer.base_layer.weight.shape  # doctest: +SKIP
        True
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("trady_selected", "trady_offset", "trady_merged", "trady_rgn")

    def __init__(self, base_layer: nn.Module, adapter_name: str, store: FlatStore, **kwargs: Any) -> None:
        super().__init__()
        ops = channel_ops_for(base_layer)
        if ops is None:
            raise TypeError(f"TraDy cannot target {type(base_layer).__name__}; supported: {supported_module_types()}")
        self.base_layer = base_layer
        self.__dict__["ops"] = ops
        self.__dict__["_store"] = store
        self.trady_selected: dict[str, torch.Tensor] = {}
        self.trady_offset: dict[str, int] = {}
        self.trady_merged: dict[str, torch.Tensor] = {}
        self.trady_rgn: dict[str, torch.Tensor | None] = {}
        compat.init_tuner_layer_state(self, adapter_name)
        self._merge_backup: dict[str, torch.Tensor] = {}  # original slices under a peft merge: unmerge is exact
        self.calibrating = False
        self.kwargs = kwargs
        self.update_layer(adapter_name)

    # -- bookkeeping
    @property
    def in_channels(self) -> int:
        return self.ops.in_channels

    @property
    def weight_per_channel(self) -> int:
        return self.ops.weight_per_channel

    def update_layer(self, adapter_name: str) -> None:
        device = self.get_base_layer().weight.device
        self.trady_selected[adapter_name] = torch.zeros(0, dtype=torch.long, device=device)
        self.trady_offset[adapter_name] = 0
        self.trady_merged[adapter_name] = torch.zeros(self.in_channels, dtype=torch.bool, device=device)
        self.trady_rgn[adapter_name] = None

    def _index(self, adapter_name: str) -> torch.Tensor:
        """The selected channels, on the base weight's device (the model may have moved since the draw: the
        selection is a plain attribute, not a buffer, so that it can change size)."""
        index = self.trady_selected[adapter_name]
        device = self.get_base_layer().weight.device
        if index.device != device:
            index = self.trady_selected[adapter_name] = index.to(device)
            self.trady_merged[adapter_name] = self.trady_merged[adapter_name].to(device)
        return index

    def _delta(self, adapter_name: str) -> torch.Tensor | None:
        index = self.trady_selected.get(adapter_name)
        if index is None or index.numel() == 0 or adapter_name not in self._store.flat:
            return None
        flat = self._store.flat[adapter_name]
        shape = self.ops.slice_shape(index.numel())
        start = self.trady_offset[adapter_name]
        return flat[start : start + math.prod(shape)].view(shape)

    def set_selection(self, adapter_name: str, index: torch.Tensor, offset: int) -> None:
        """Select the input channels ``index`` (sorted), whose delta starts at ``offset`` in the flat parameter."""
        device = self.get_base_layer().weight.device
        self.trady_selected[adapter_name] = torch.as_tensor(index, dtype=torch.long).to(device).sort().values
        self.trady_offset[adapter_name] = int(offset)

    def selected_channels(self, adapter_name: str = "default") -> list[int]:
        """The input channels updated now."""
        return self.trady_selected[adapter_name].tolist()

    @torch.no_grad()
    def merge_current(self, adapter_name: str) -> None:
        """Add the current delta into the base weight and mark those channels as merged (used at re-sampling)."""
        delta = self._delta(adapter_name)
        if delta is None:
            return
        index = self._index(adapter_name)
        self.ops.add_slice(self.get_base_layer().weight.data, index, delta)
        self.trady_merged[adapter_name][index] = True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The current update as a dense tensor of the base weight's shape (zeros outside the selection)."""
        weight = self.get_base_layer().weight
        delta = self._delta(adapter_name)
        if delta is None:
            return torch.zeros_like(weight)
        return self.ops.effective_weight(torch.zeros_like(weight), delta.detach(), self._index(adapter_name))

    # -- what a memory profiler asks (hf_collapse.profiling): this layer trains a subset of its input channels
    profile_label = "trady"

    def trained_input_channels(self) -> int:
        """How many input channels train now: the selection of the active adapter, 0 when it is disabled, merged or
        frozen."""
        adapter = self.active_adapters[0] if self.active_adapters else "default"
        index = self.trady_selected.get(adapter)
        if index is None or self.disable_adapters or self.merged or not self.trainable_slices():
            return 0
        return int(index.numel())

    def trained_weight_elements(self) -> int:
        """The weight elements the trained channels update."""
        return self.trained_input_channels() * self.weight_per_channel

    def trainable_slices(self) -> list[torch.Tensor]:
        """The parameters that hold the updates (the tuner's flat parameters, shared by every TraDy layer)."""
        return [p for p in self._store.flat.values() if p.requires_grad]

    # -- peft's merge protocol
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the current delta into the base weight (``merge_and_unload`` calls this)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            delta = self._delta(name)
            if delta is None:
                self.merged_adapters.append(name)
                continue
            with torch.no_grad():
                weight = self.get_base_layer().weight
                index = self._index(name)
                merged = self.ops.effective_weight(weight.data, delta.detach(), index)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; the adapter {name!r} seems broken")
                self._merge_backup[name] = self.ops.read_slice(weight.data, index).clone()
                weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put back the slices the current delta was merged into, exactly (updates merged at earlier re-samplings
        stay in the base weight)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            original = self._merge_backup.pop(name, None)
            if original is not None:
                with torch.no_grad():
                    self.ops.write_slice(self.get_base_layer().weight.data, self._index(name), original)

    # -- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or self.calibrating:
            return self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            delta = self._delta(name)
            if delta is None:
                continue
            base = self.get_base_layer()
            index = self._index(name)
            if not torch.is_grad_enabled() or not (delta.requires_grad or x.requires_grad):
                return self.ops.forward(x, self.ops.effective_weight(base.weight, delta, index), base.bias)
            return ChannelSliceFunction.apply(x, base.weight, base.bias, delta, index, self.ops)
        return self.base_layer(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Model code reads attributes of the layer it calls (MobileNetV2's TF padding reads conv.stride...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_layer":  # torch's own tables, or the layer not built yet
                raise
            base = dict(self.named_children()).get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def __repr__(self) -> str:
        return "trady." + super().__repr__()

    def extra_repr(self) -> str:
        selected = {name: int(index.numel()) for name, index in self.trady_selected.items()}
        return f"kind={self.ops.kind}, in_channels={self.in_channels}, selected={selected}"
