"""What a collapse costs and saves, measured: parameters, FLOPs of a forward pass, latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, the operations
that dominate); latency is the median of timed runs after warm-up, under ``torch.inference_mode``.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .architectures.base import adapter_for, first_tensor

__all__ = ["count_parameters", "example_inputs", "forward_flops", "module_flops", "measure_latency", "hardware_description"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once); only trainable ones with ``trainable_only``.

    Example::

        >>> from hf_collapse.metrics import count_parameters
        >>> count_parameters(model)                             # all-MiniLM-L6-v2
        22713216
        >>> trainable = count_parameters(peft_model, trainable_only=True)
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def example_inputs(model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> dict[str, Any]:
    """Inputs of the right shapes for ``model`` (random token ids, images or latents; seeded).

    ``seq_len`` applies to text models only (BERT and GPT-2 cap it to fit their position embeddings); image and
    diffusion inputs take their size from the config.

    Example::

        >>> from hf_collapse.metrics import example_inputs
        >>> {name: tuple(x.shape) for name, x in example_inputs(model, batch_size=2, seq_len=32).items()}
        {'input_ids': (2, 32), 'attention_mask': (2, 32)}
    """
    return adapter_for(model).example_inputs(model, batch_size=batch_size, seq_len=seq_len)


def to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _forward(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**to_device(inputs, device_of(model)))


def module_flops(model: nn.Module, inputs: Mapping[str, Any], paths: Iterable[str] = ()) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass in total, and of each submodule at ``paths`` (module paths in ``model``).

    A path that names no module raises ``ValueError``: use ``block.path``, not ``block.name``, for a model under a
    task head. A module that exists but did not run counts 0 FLOPs.

    Example::

        >>> from hf_collapse.metrics import example_inputs, module_flops
        >>> total, per_layer = module_flops(model, example_inputs(model), ["encoder.layer.0", "pooler"])
        >>> total, per_layer                                    # all-MiniLM-L6-v2, 128 tokens
        (2718203904, {'encoder.layer.0': 452984832, 'pooler': 294912})
    """
    paths = list(paths)
    known = {name for name, _ in model.named_modules()}
    unknown = [path for path in paths if path not in known]
    if unknown:
        raise ValueError(f"no module at {unknown} in {type(model).__name__} (paths are relative to the model "
                         f"passed, e.g. a Block's .path rather than its .name under a task head)")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        _forward(model, inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_module = {}
    for path in paths:
        per_module[path] = int(sum(counts.get(f"{root}.{path}", {}).values()))
    return int(counter.get_total_flops()), per_module


def forward_flops(model: nn.Module, inputs: Mapping[str, Any]) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (a dict of keyword arguments).

    Example::

        >>> from hf_collapse.metrics import example_inputs, forward_flops
        >>> forward_flops(model, example_inputs(model, batch_size=1, seq_len=128))     # all-MiniLM-L6-v2
        2718203904
    """
    return module_flops(model, inputs)[0]


def measure_latency(
    model: nn.Module,
    inputs: Mapping[str, Any],
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Median wall-clock seconds of one forward pass, after ``warmup`` untimed passes, in inference mode.

    ``inputs`` are moved to the model's device first; on CUDA the device is synchronized around each pass.

    Example::

        >>> from hf_collapse.metrics import example_inputs, measure_latency
        >>> seconds = measure_latency(model, example_inputs(model), warmup=3, repeats=10)
        >>> print(f"{seconds * 1e3:.1f} ms")
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = device_of(model)
    inputs = to_device(inputs, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            synchronize()
            start = time.perf_counter()
            first_tensor(model(**inputs))
            synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def hardware_description() -> str:
    """The device latencies were measured on, for reports and model cards.

    The current CUDA device's name whenever CUDA is available (whatever device the model is on), else the CPU.

    Example::

        >>> from hf_collapse.metrics import hardware_description
        >>> hardware_description()                              # on a machine without CUDA
        'CPU (x86_64, 2 threads)'
    """
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
