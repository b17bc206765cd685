"""Training-free linear replacement of removed spans (ReplaceMe-style), folded into a projection (``"linear"``).

Formulation. Let block ``p`` be the kept block right before a removed span, and ``y`` the teacher's residual
stream after the span's last block (the target). The stream after block ``p`` is, per token,

* pre-norm decoders (Llama-style: ``h = h' + down_proj(z)``, ``h'`` the stream after attention):
  ``h = Y + M`` with ``M`` the output of ``mlp.down_proj`` and ``Y = h - M``. We fit a ``d x d`` matrix ``T`` by
  least squares, ``Y + M T ≈ y``, and fold it into the down projection: ``W' = Tᵀ W`` (``b' = b T``), so
  block ``p`` now outputs exactly ``Y + M T`` — the fitted predictor — with no new module (ReplaceMe's fold);
* post-norm encoders (BERT-style: ``h = LayerNorm(a + dense(z))``, ``a`` the attention output): the stream is
  ``γ ⊙ n(a + m) + β``; we fit ``a + m T ≈ (y - β) / γ`` (the target moved before block ``p``'s LayerNorm) and
  fold ``T`` into ``output.dense`` the same way. The fold is exact (the model computes ``LN(a + m T)``); the fit
  is exact in the LayerNorm's image (a target already normalised, as the output of the span's own LayerNorm
  is, up to its affine parameters).

Models loaded in bfloat16 / float16 (as LLMs are) heal the same way: the statistics are accumulated and the fit is
solved in float64, the folded weights are rounded to the model's dtype, and the self-check allows that rounding.

The fit is ridge-regularised towards ``T = I`` (the unhealed student, where the span is the identity):
``T = (MᵀM + λI)⁻¹ (Mᵀ R + λI)``, ``λ = ridge · tr(MᵀM) / d``, over the real tokens of the calibration batches.
Spans are healed in forward order on the student healed so far, so later fits see earlier corrections. The
teacher runs once per calibration batch for all spans, and every pass stops at the deepest block it needs (the
student's, at the block the map is folded into). Before
any fit each block is checked (:func:`check_fold_site`): a family whose block does not add its down projection's output
to the stream unchanged is refused rather than silently mis-folded. A span with no kept
block before it (removed from the first position) has no projection to fold into and is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..architectures.base import first_tensor, unwrap_model
from ..metrics import device_of, to_device
from .base import HealingMethod
from .common import RemovedSpan, removed_spans
from .common import calibration_batches as collect_batches

__all__ = ["LinearReplacement", "check_fold_site", "fold_site", "linear"]


def fold_site(layer: nn.Module) -> tuple[str, nn.Linear]:
    """``(kind, projection)``: where a linear map of the stream after ``layer`` can be folded exactly.

    ``kind`` is ``"residual"`` (``mlp.down_proj`` adds to the residual stream) or ``"post_norm"``
    (``output.dense`` before ``output.LayerNorm``, BERT-style).

    Raises:
        ValueError: for a block with neither structure (the reason is named).
    """
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    if isinstance(down, nn.Linear):
        for name in ("post_feedforward_layernorm", "post_mlp_layernorm", "feed_forward_layernorm"):
            if isinstance(getattr(layer, name, None), nn.Module) and not isinstance(getattr(layer, name), nn.Identity):
                raise ValueError(
                    f"{type(layer).__name__} normalises its MLP output ({name}) before the residual "
                    f"addition: a linear map of the stream cannot be folded into mlp.down_proj exactly"
                )
        return "residual", down
    output = getattr(layer, "output", None)
    dense, norm = getattr(output, "dense", None), getattr(output, "LayerNorm", None)
    if isinstance(dense, nn.Linear) and isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        return "post_norm", dense
    raise ValueError(
        f"{type(layer).__name__} has no projection a linear replacement can be folded into exactly "
        f"(supported: an mlp.down_proj adding to the residual stream, as in Llama-style decoders, or "
        f"output.dense before output.LayerNorm, as in BERT-style encoders)"
    )


@contextmanager
def _capture(layer: nn.Module, kind: str, projection: nn.Linear, store: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = [
        projection.register_forward_hook(lambda m, a, out: store.__setitem__("m", out.detach())),
        layer.register_forward_hook(lambda m, a, out: store.__setitem__("out", first_tensor(out).detach())),
    ]
    if kind == "post_norm":

        def attention_output(module, args, kwargs):
            value = args[1] if len(args) > 1 else kwargs.get("input_tensor")
            store["a"] = value.detach()

        handles.append(layer.output.register_forward_pre_hook(attention_output, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _base(kind: str, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """The part of the stream that does not go through the projection, in float64: ``Y = h - M`` or the attention
    output."""
    return store["out"].double() - store["m"].double() if kind == "residual" else store["a"].double()


def _target(kind: str, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if kind == "residual":
        return y
    norm = layer.output.LayerNorm
    gamma = norm.weight.detach()
    gamma = torch.where(gamma.abs() < 1e-6, torch.full_like(gamma, 1e-6), gamma)
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(gamma)
    return (y - beta) / gamma


def _predicted(kind: str, layer: nn.Module, base: torch.Tensor, m: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """The fitted predictor ``base + m T`` (through the block's LayerNorm for post-norm blocks), in ``T``'s dtype."""
    stream = base.to(T.dtype) + m.to(T.dtype) @ T
    if kind == "residual":
        return stream
    norm = layer.output.LayerNorm
    bias = None if norm.bias is None else norm.bias.detach().to(T.dtype)
    return torch.nn.functional.layer_norm(
        stream, norm.normalized_shape, norm.weight.detach().to(T.dtype), bias, norm.eps
    )


#: The projection's weights are scaled by this factor in the structural check, so that its branch dominates the
#: stream and a branch the block rescales stands out of the rounding of half precision.
_PROBE_SCALE = 8.0


def _rounding(dtype: torch.dtype) -> float:
    """The relative rounding of one forward pass in ``dtype``: a few units in the last place of half precision (bf16
    keeps 8 bits), 1e-5 in float32."""
    return 8 * torch.finfo(dtype).eps if torch.finfo(dtype).bits <= 16 else 1e-5


@torch.no_grad()
def check_fold_site(model: nn.Module, layer: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Refuse a block that does not add its projection's output to the stream unchanged, before any fit: a linear map
    folded into the projection would then not be the map that was fitted.

    Pre-norm (``"residual"``): the stream minus the projection's output must not depend on the projection's weights;
    the block is run twice, the second time with the projection's weights scaled by 8 (so that its branch stands out
    of half precision's rounding), and a branch the block rescales (Granite's ``residual_multiplier``, Gemma's
    normalised MLP output) differs by its scale. Post-norm (``"post_norm"``): the output must be the block's LayerNorm
    of the attention output plus the projection's output. Computed in float64 from the captured tensors, with a
    tolerance for the rounding of the model's dtype.

    Raises:
        ValueError: naming the block when it does not add its projection's output unchanged.
    """
    kind, projection = fold_site(layer)
    device = device_of(model)
    first: dict[str, torch.Tensor] = {}
    with _capture(layer, kind, projection, first):
        model(**to_device(batch, device))
    rounding = _rounding(projection.weight.dtype)
    if kind == "residual":
        scaled: dict[str, torch.Tensor] = {}
        original = projection.weight.data.clone()
        bias = projection.bias.data.clone() if projection.bias is not None else None
        try:
            projection.weight.data.mul_(_PROBE_SCALE)
            if bias is not None:
                projection.bias.data.mul_(_PROBE_SCALE)
            with _capture(layer, kind, projection, scaled):
                model(**to_device(batch, device))
        finally:
            projection.weight.data.copy_(original)
            if bias is not None:
                projection.bias.data.copy_(bias)
        branch = scaled["m"].double() - first["m"].double()
        error = float(((scaled["out"].double() - first["out"].double()) - branch).norm())
        allowed = 0.05 * float(branch.norm()) + rounding * float(
            scaled["out"].double().norm() + first["out"].double().norm()
        )
    else:
        expected = _predicted(
            kind,
            layer,
            first["a"],
            first["m"],
            torch.eye(first["m"].shape[-1], dtype=torch.float64, device=first["m"].device),
        )
        error = float((first["out"].double() - expected).norm())
        allowed = rounding * float(expected.norm()) + 1e-6
    if not error <= allowed:
        raise ValueError(
            f"{type(layer).__name__} does not add its {type(projection).__name__} output to the "
            f"stream unchanged: the linear replacement cannot be folded into it exactly"
        )


class _Reached(Exception):
    """Raised by a forward hook once everything a calibration pass needs is recorded: the rest of the model is not
    run."""


@contextmanager
def _stop_after(module: nn.Module) -> Iterator[None]:
    """Run forward passes only up to ``module`` (its output recorded by hooks registered before this one)."""

    def stop(*_):
        raise _Reached

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def _run_until(model: nn.Module, module: nn.Module, batch: dict) -> None:
    with _stop_after(module):
        try:
            model(**batch)
        except _Reached:
            pass


def _teacher_targets(teacher: nn.Module, spans: list[RemovedSpan], batches: list[dict], device) -> list[list]:
    """The teacher's stream after each span's last block, for every batch (real tokens only, ``(tokens, d)``): one
    teacher pass per batch for all spans, stopped after the deepest of them."""
    ends = [teacher.get_submodule(span.teacher_blocks[-1]) for span in spans]
    targets: list[list[torch.Tensor]] = [[] for _ in spans]
    teacher_device = device_of(teacher)
    with torch.no_grad():
        for batch in batches:
            outputs: dict[int, torch.Tensor] = {}
            handles = [
                end.register_forward_hook(
                    lambda m, a, out, i=i, kept=outputs: kept.__setitem__(i, first_tensor(out).detach())
                )
                for i, end in enumerate(ends)
            ]
            try:
                _run_until(teacher, ends[-1], to_device(batch, teacher_device))
            finally:
                for handle in handles:
                    handle.remove()
            for i, span in enumerate(spans):
                if i not in outputs:
                    raise RuntimeError(f"calibration did not reach {span.teacher_blocks[-1]!r} in the teacher")
                targets[i].append(_real_tokens(outputs[i].to(device), batch))
    return targets


def _real_tokens(tensor: torch.Tensor, batch: dict) -> torch.Tensor:
    """``(tokens, d)``: the rows of the real tokens (the attention mask's) of a ``(batch, sequence, d)`` tensor."""
    mask = batch.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(tensor.shape[:2]):
        tensor = tensor[mask.to(tensor.device).bool()]
    return tensor.reshape(-1, tensor.shape[-1])


def _heal_span(
    student: nn.Module,
    span: RemovedSpan,
    batches: list[dict],
    targets: list[torch.Tensor],
    ridge: float,
    objective: str = "lstsq",
    cosine_steps: int = 100,
    cosine_lr: float = 1e-3,
) -> None:
    layer = student.get_submodule(span.preceding)
    kind, projection = fold_site(layer)
    student_device = device_of(student)
    d = projection.out_features
    gram = torch.zeros(d, d, dtype=torch.float64, device=student_device)
    cross = torch.zeros(d, d, dtype=torch.float64, device=student_device)
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (m, base, y) per batch, for the cosine fit
    with torch.no_grad():
        for batch, y in zip(batches, targets):
            store: dict[str, torch.Tensor] = {}
            with _capture(layer, kind, projection, store):
                _run_until(student, layer, to_device(batch, student_device))
            missing = [k for k in ("m", "out") + (("a",) if kind == "post_norm" else ()) if k not in store]
            if missing:
                raise RuntimeError(f"calibration did not reach {span.preceding!r}")
            m, base = _real_tokens(store["m"], batch).double(), _real_tokens(_base(kind, store), batch)
            residual = _target(kind, layer, y).double() - base
            gram += m.T @ m
            cross += m.T @ residual
            if objective == "cosine":
                kept.append((m.float(), base.float(), y.float()))
        identity = torch.eye(d, dtype=torch.float64, device=student_device)
        lam = ridge * float(torch.trace(gram)) / d + 1e-12
        T = torch.linalg.solve(gram + lam * identity, cross + lam * identity)
    if objective == "cosine":
        T = _cosine_fit(kind, layer, T, kept, cosine_steps, cosine_lr)
    with torch.no_grad():
        weight = projection.weight
        projection.weight.copy_((T.T @ weight.double()).to(weight.dtype))
        if projection.bias is not None:
            projection.bias.copy_((projection.bias.double() @ T).to(projection.bias.dtype))


def cosine_distance(kind: str, layer: nn.Module, T: torch.Tensor, kept) -> torch.Tensor:
    """Mean cosine distance ``1 - cos(predicted, y)`` over the calibration tokens (ReplaceMe's second objective)."""
    total, count = T.new_zeros(()), 0
    for m, base, y in kept:
        predicted = _predicted(kind, layer, base, m, T)
        total = total + (1 - torch.nn.functional.cosine_similarity(predicted, y.to(T.dtype), dim=-1)).sum()
        count += y.shape[0]
    return total / max(count, 1)


def _cosine_fit(kind: str, layer: nn.Module, start: torch.Tensor, kept, steps: int, lr: float) -> torch.Tensor:
    """ReplaceMe's cosine objective: ``T`` minimising the mean cosine distance between the predicted stream and the
    target, by full-batch Adam in float32 from the least-squares solution. The best ``T`` seen is returned, so the
    fit never ends worse than least squares on the calibration tokens."""
    T = start.float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([T], lr=lr)
    best, best_loss = start, float("inf")
    for step in range(steps + 1):
        loss = cosine_distance(kind, layer, T, kept)
        value = float(loss.detach())
        if value < best_loss:
            best, best_loss = (start if step == 0 else T.detach().double().clone()), value
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return best


def linear(
    student: nn.Module,
    teacher: nn.Module,
    train_dataset,
    args=None,
    *,
    data_collator=None,
    calibration_batches: int = 16,
    ridge: float = 1e-3,
    objective: str = "lstsq",
    cosine_steps: int = 100,
    cosine_lr: float = 1e-3,
) -> nn.Module:
    """Replace each removed span by a linear map folded into the preceding block (in place), fitted by least squares
    (``objective="lstsq"``) or, as ReplaceMe's second objective, by the mean cosine distance to the teacher's stream
    (``objective="cosine"``: ``cosine_steps`` full-batch Adam steps at ``cosine_lr`` from the least-squares
    solution, keeping the best; it holds the calibration tokens' streams in memory).

    Measured on SmolLM2-135M with 8 of 30 blocks removed (block_influence), fitted on 128 windows of BBC News: least
    squares took held-out BBC perplexity from 3.03x the original's to 2.18x, and chat lines (text it was not fitted
    on) from 3.33x to 3.27x; the cosine objective (100 steps at 1e-3) to 2.06x on BBC but 3.46x on chat lines: it
    fits the calibration text's kind more closely, and generalises less.

    The fit has ``d x d`` unknowns per span (``d`` the hidden size): give it many more calibration tokens than ``d``.
    On SmolLM2 (``d`` = 576) with 8 of 30 blocks removed, 16 batches of 8 windows of 128 tokens took held-out
    perplexity from 101.8 to 63.6; 4 batches of 8 (4k tokens) helped less, and 4 windows (512 tokens, fewer than
    ``d``) made a model with 2 blocks removed far worse (20.4 to 221).

    ``student`` is changed in place (:func:`hf_collapse.heal` passes a copy); ``args`` (optional) gives the
    calibration batch size (``per_device_train_batch_size``).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if objective not in ("lstsq", "cosine"):
        raise ValueError(f"objective must be 'lstsq' or 'cosine', got {objective!r}")
    if cosine_steps < 0 or cosine_lr <= 0:
        raise ValueError(f"cosine_steps must be >= 0 and cosine_lr > 0, got {cosine_steps} and {cosine_lr}")
    spans = removed_spans(student, teacher)
    for span in spans:
        if span.preceding is None:
            raise ValueError(
                f"the removed span {list(span.teacher_blocks)} starts the stage: no kept block precedes "
                f"it, so there is no projection to fold its linear replacement into"
            )
        fold_site(student.get_submodule(span.preceding))  # refuse before any work
    batch_size = getattr(args, "per_device_train_batch_size", 8) if args is not None else 8
    batches = collect_batches(student, train_dataset, data_collator, batch_size, calibration_batches)
    inner_student = unwrap_model(student)
    teacher_mode, student_mode = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        for span in spans:  # refuse before any fit
            check_fold_site(student, student.get_submodule(span.preceding), batches[0])
        targets = _teacher_targets(teacher, spans, batches, device_of(student))
        for span, span_targets in zip(spans, targets):  # in forward order: later fits see earlier corrections
            _heal_span(student, span, batches, span_targets, ridge, objective, cosine_steps, cosine_lr)
    finally:
        teacher.train(teacher_mode)
        student.train(student_mode)
    return inner_student


class LinearReplacement(HealingMethod):
    """``"linear"``: training-free replacement of each removed span of blocks by a linear map folded into the
    preceding block's projection, ReplaceMe-style (options ``data_collator``, ``calibration_batches`` (16), ``ridge``
    (1e-3), ``objective`` (``"lstsq"`` or ``"cosine"``), ``cosine_steps`` (100), ``cosine_lr`` (1e-3)); ``args``
    (optional) only gives the calibration batch size."""

    name = "linear"
    description = "training-free linear map folded into the block before each removed span (ReplaceMe)"
    trains = False
    whole_blocks_only = True

    def run(self, student, teacher, train_dataset, args, **options):
        return linear(student, teacher, train_dataset, args, **options)
