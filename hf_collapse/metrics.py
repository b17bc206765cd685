"""What a collapse costs and saves, measured: parameters, FLOPs of a forward pass, latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions, the operations
that dominate); latency is the median of timed runs after warm-up, under ``torch.inference_mode``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .architectures.base import adapter_for, count_parameters, first_tensor

__all__ = [
    "LatencyComparison",
    "compare_latency",
    "count_parameters",
    "example_inputs",
    "forward_flops",
    "generation_speed",
    "hardware_description",
    "measure_latency",
    "measure_step",
    "module_flops",
    "perplexity",
]


def example_inputs(model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> dict[str, Any]:
    """Inputs of the right shapes for ``model`` (random token ids, images or latents; seeded).

    ``seq_len`` applies to text models only (BERT and GPT-2 cap it to fit their position embeddings); image and
    diffusion inputs take their size from the config.

    Example::

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
        >>> from hf_collapse.metrics import example_inputs
        >>> {name: tuple(x.shape) for name, x in example_inputs(model, batch_size=2, seq_len=32).items()}
        {'input_ids': (2, 32), 'attention_mask': (2, 32)}
    """
    return adapter_for(model).example_inputs(model, batch_size=batch_size, seq_len=seq_len)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device``: a tensor, or a mapping / list / tuple of them (nested);
    anything else is returned as it is. A mapping comes back as a ``dict``. The one device helper of the package.

    Example::

        >>> import torch
        >>> from hf_collapse.metrics import device_of, to_device
        >>> ids, mask = torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)
        >>> batch = to_device({"input_ids": ids, "attention_mask": mask}, device_of(torch.nn.Linear(2, 2)))
        >>> batch["input_ids"].device
        device(type='cpu')
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _forward(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**to_device(inputs, device_of(model)))


def module_flops(model: nn.Module, inputs: Mapping[str, Any], paths: Iterable[str] = ()) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass in total, and of each submodule at ``paths`` (module paths in ``model``).

    A path that names no module raises ``ValueError``: use ``block.path``, not ``block.name``, for a model under a
    task head. A module that exists but did not run counts 0 FLOPs.

    Example::

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
        >>> from hf_collapse.metrics import example_inputs, module_flops
        >>> total, per_layer = module_flops(model, example_inputs(model), ["encoder.layer.0", "pooler"])
        >>> total, per_layer                                    # all-MiniLM-L6-v2, 128 tokens
        (2718203904, {'encoder.layer.0': 452984832, 'pooler': 294912})
    """
    paths = list(paths)
    known = {name for name, _ in model.named_modules()}
    unknown = [path for path in paths if path not in known]
    if unknown:
        raise ValueError(
            f"no module at {unknown} in {type(model).__name__} (paths are relative to the model "
            f"passed, e.g. a Block's .path rather than its .name under a task head)"
        )
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # no dropout, and no BatchNorm statistics touched (or refused, at batch size 1)
    try:
        with torch.inference_mode(), counter:
            _forward(model, inputs)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_module = {}
    for path in paths:
        per_module[path] = int(sum(counts.get(f"{root}.{path}", {}).values()))
    return int(counter.get_total_flops()), per_module


def forward_flops(model: nn.Module, inputs: Mapping[str, Any]) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (a dict of keyword arguments).

    Example::

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
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

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
        >>> from hf_collapse.metrics import example_inputs, measure_latency
        >>> seconds = measure_latency(model, example_inputs(model), warmup=3, repeats=10)
        >>> print(f"{seconds * 1e3:.1f} ms")      # depends on the machine   # doctest: +SKIP
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


@dataclass
class LatencyComparison:
    """Latencies of several models timed side by side (see :func:`compare_latency`).

    Attributes:
        seconds: each model's median seconds per forward pass.
        speedups: each model's median over rounds of (reference time / its time); 1.0 for the reference.
        spreads: each model's interquartile range of that per-round ratio, ``(low, high)``.
        rounds: number of interleaved rounds.
    """

    seconds: list[float]
    speedups: list[float]
    spreads: list[tuple[float, float]]
    rounds: int

    def significant(self, index: int) -> bool:
        """Whether model ``index`` is measurably faster or slower than the reference: its whole interquartile
        range of ratios lies on one side of 1."""
        low, high = self.spreads[index]
        return low > 1.0 or high < 1.0


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], q[2])


def compare_latency(
    models: Sequence[nn.Module],
    inputs: Mapping[str, Any],
    warmup: int = 2,
    rounds: int = 7,
    min_seconds: float = 0.05,
    call: Callable[[nn.Module, dict[str, Any]], Any] | None = None,
) -> LatencyComparison:
    """Time ``models`` side by side on ``inputs``: interleaved rounds, each round timing every model once (in a
    rotating order), so that a load that comes and goes on a shared machine hits all of them alike. The first
    model is the reference of the ratios.

    Each timing runs as many forward passes as make the reference take ``min_seconds`` (at least one), in eval mode
    and inference mode (each model's train/eval mode is restored after). ``call(model, inputs)`` times something else
    than a forward pass, e.g. ``lambda m, x: m.generate(**x, max_new_tokens=32)``.

    Example (not run by doctest: it needs a collapsed model, and timings vary)::

        >>> from hf_collapse.metrics import compare_latency, example_inputs
        >>> timing = compare_latency([model, collapsed], example_inputs(model), rounds=7)  # doctest: +SKIP
        >>> timing.speedups[1], timing.spreads[1], timing.significant(1)  # doctest: +SKIP
        (1.46, (1.41, 1.52), True)
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    if not models:
        raise ValueError("no models to time")
    prepared = [to_device(inputs, device_of(m)) for m in models]
    modes = [m.training for m in models]
    synchronize = torch.cuda.synchronize if any(device_of(m).type == "cuda" for m in models) else (lambda: None)

    def timed(index: int, number: int) -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(number):
            if call is None:
                first_tensor(models[index](**prepared[index]))
            else:
                call(models[index], prepared[index])
        synchronize()
        return (time.perf_counter() - start) / number

    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            for index in range(len(models)):
                for _ in range(warmup):
                    timed(index, 1)
            number = max(1, min(1000, round(min_seconds / max(timed(0, 1), 1e-6))))
            times: list[list[float]] = [[] for _ in models]
            for r in range(rounds):
                order = [(r + k) % len(models) for k in range(len(models))]
                for index in order:
                    times[index].append(timed(index, number))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    ratios = [[ref / t for ref, t in zip(times[0], model_times)] for model_times in times]
    return LatencyComparison(
        seconds=[statistics.median(t) for t in times],
        speedups=[statistics.median(r) for r in ratios],
        spreads=[_quartiles(r) for r in ratios],
        rounds=rounds,
    )


def hardware_description(device: torch.device | str | nn.Module | None = None) -> str:
    """The device latencies were measured on, for reports and model cards.

    ``device`` (a device, or a model whose parameters' device is used): the CUDA device's name for a CUDA device,
    else the CPU with its thread count. Without it: the current CUDA device when CUDA is available, else the CPU.

    Example::

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
        >>> from hf_collapse.metrics import hardware_description
        >>> hardware_description(model)                         # a model on the CPU, e.g. 'CPU (x86_64, 2 threads)'
        'CPU (...)'
    """
    if isinstance(device, nn.Module):
        device = device_of(device)
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_step(
    model: nn.Module,
    inputs: Mapping[str, Any],
    latency_repeats: int,
    reference: nn.Module | None = None,
    flops: int | None = None,
) -> dict[str, Any]:
    """Parameters, FLOPs and (when ``latency_repeats > 0``) latency of ``model`` on ``inputs``.

    With a ``reference`` (the uncollapsed model), the two are timed side by side in ``latency_repeats`` interleaved
    rounds (:func:`hf_collapse.metrics.compare_latency`), and the result carries the speed-up over the reference with
    its spread: a ratio that survives a busy machine. Without one, ``latency_s`` is a plain median. Measured in eval
    mode (the train/eval mode is restored after); latency fields are ``None`` when ``latency_repeats`` is 0. ``flops``,
    when known (e.g. derived from a first count), is taken as is instead of counting a forward pass again.

    Example::

        >>> from transformers import AutoModel
        >>> from hf_collapse.data import embedded_model_path
        >>> from hf_collapse.metrics import example_inputs, measure_step
        >>> model = AutoModel.from_pretrained(embedded_model_path("minilm"))   # all-MiniLM-L6-v2, a BertModel
        >>> measure_step(model, example_inputs(model), latency_repeats=0)
        {'params': 22713216, 'flops': 2718203904, 'latency_s': None}
        >>> collapsed = hf_collapse.remove_blocks(model, ["encoder.layer.5"])   # doctest: +SKIP
        >>> timed = measure_step(collapsed, example_inputs(model), latency_repeats=7, reference=model)  # doctest: +SKIP
        >>> timed["latency_speedup"]    # timed side by side: machine-dependent   # doctest: +SKIP
        1.2
    """
    was_training = model.training
    model.eval()
    try:
        measured: dict[str, Any] = {
            "params": count_parameters(model),
            "flops": forward_flops(model, inputs) if flops is None else int(flops),
            "latency_s": None,
        }
        if latency_repeats and reference is not None:
            timing = compare_latency([reference, model], inputs, rounds=latency_repeats)
            measured.update(
                latency_s=timing.seconds[1],
                latency_speedup=timing.speedups[1],
                latency_spread=list(timing.spreads[1]),
                reference_latency_s=timing.seconds[0],
            )
        elif latency_repeats:
            measured["latency_s"] = measure_latency(model, inputs, warmup=2, repeats=latency_repeats)
        return measured
    finally:
        model.train(was_training)


def perplexity(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> float:
    """Token-weighted perplexity of a causal LM: ``exp`` of the mean next-token cross-entropy over every counted
    token of every batch (not the mean of per-batch perplexities or losses, so batch sizes do not matter).

    Each batch is a mapping with ``input_ids``, optionally ``attention_mask`` and ``labels`` (other entries, e.g.
    ``token_type_ids``, are passed to the model). Without ``labels``, the targets are the ``input_ids``. Positions
    whose label is ``-100`` or whose ``attention_mask`` is 0 (padding) are not counted, nor is a token predicted from a
    padding position. Padded batches give the perplexity of their sequences unpadded, left padding (what decoder
    tokenizers use for generation) included: position ids then follow the mask, unless the batch gives its own. As in
    ``transformers``'s causal LMs, the logits at position ``t`` predict the label at ``t + 1`` (the labels are not
    shifted by the caller). Runs under ``torch.inference_mode`` in eval mode (the model's mode is put back), on the
    model's device; the sums are accumulated in float64.

    Args:
        model: a causal LM whose output has ``logits`` (``(batch, seq, vocab)``).
        batches: an iterable of batches, e.g. a ``DataLoader`` over :func:`hf_collapse.data.lm_windows`.

    Returns:
        The perplexity, a float >= 1.

    Raises:
        ValueError: when no token is counted (no batch, or every label masked).

    Example::

        >>> from torch.utils.data import DataLoader
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from hf_collapse.data import embedded_model_path, lm_windows, load_bbc_news
        >>> from hf_collapse.metrics import perplexity
        >>> folder = embedded_model_path("smollm2")   # SmolLM2-135M, converted once (a minute)   # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(folder)                                 # doctest: +SKIP
        >>> windows = lm_windows(load_bbc_news()["test"]["text"], AutoTokenizer.from_pretrained(folder),
        ...                      max_length=128, max_windows=32)                                    # doctest: +SKIP
        >>> perplexity(model, DataLoader(windows, batch_size=8))   # measured: 35.8   # doctest: +SKIP
        35.8...
    """
    import inspect
    import math

    import torch.nn.functional as F

    device = device_of(model)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs = dict(to_device(dict(batch), device))
                labels = inputs.pop("labels", None)
                input_ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                labels = (input_ids if labels is None else labels).clone()
                if mask is not None:
                    labels = labels.masked_fill(mask == 0, -100)
                    if "position_ids" not in inputs and takes_positions and bool((mask == 0).any()):
                        # Left padding: a row's first real token is at position 0, as it would be unpadded.
                        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
                logits = model(**inputs).logits
                targets = labels[:, 1:]
                logits = logits[:, :-1]
                counted = targets != -100
                if mask is not None:  # a token predicted from a padding position (left padding) is not counted
                    counted &= mask[:, :-1].bool()
                if not bool(counted.any()):
                    continue
                total_nll += F.cross_entropy(logits[counted].float(), targets[counted], reduction="sum").double().cpu()
                total_tokens += int(counted.sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("perplexity: no token to count (no batch, or every label is -100 or padding)")
    return math.exp(float(total_nll) / total_tokens)


def generation_speed(
    models: Sequence[nn.Module], prompt: Mapping[str, Any], new_tokens: int, rounds: int = 3
) -> list[float]:
    """Tokens per second of greedy generation with the KV cache (``new_tokens`` new tokens after ``prompt``), the
    models timed side by side in ``rounds`` interleaved rounds (:func:`compare_latency`; the median per model).

    Example::

        >>> from hf_collapse.metrics import generation_speed
        >>> before, after = generation_speed([llama, pruned], {"input_ids": ids}, new_tokens=32)  # doctest: +SKIP
    """

    def generate(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True
        )

    timing = compare_latency(models, prompt, warmup=1, rounds=max(rounds, 1), min_seconds=0, call=generate)
    return [new_tokens * prompt["input_ids"].shape[0] / seconds for seconds in timing.seconds]
