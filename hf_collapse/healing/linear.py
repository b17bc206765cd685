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

The fit is ridge-regularised towards ``T = I`` (the unhealed student, where the span is the identity):
``T = (MᵀM + λI)⁻¹ (Mᵀ R + λI)``, ``λ = ridge · tr(MᵀM) / d``, over the real tokens of the calibration batches.
Spans are healed in forward order on the student healed so far, so later fits see earlier corrections. After
each fold the block's output is checked against the predictor: a family whose block does not add its down
projection's output to the stream unchanged is refused rather than silently mis-folded. A span with no kept
block before it (removed from the first position) has no projection to fold into and is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..architectures.base import first_tensor, unwrap_model
from ..metrics import device_of, to_device
from .common import RemovedSpan, calibration_batches as collect_batches, removed_spans

__all__ = ["fold_site", "linear"]


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
                raise ValueError(f"{type(layer).__name__} normalises its MLP output ({name}) before the residual "
                                 f"addition: a linear map of the stream cannot be folded into mlp.down_proj exactly")
        return "residual", down
    output = getattr(layer, "output", None)
    dense, norm = getattr(output, "dense", None), getattr(output, "LayerNorm", None)
    if isinstance(dense, nn.Linear) and isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        return "post_norm", dense
    raise ValueError(f"{type(layer).__name__} has no projection a linear replacement can be folded into exactly "
                     f"(supported: an mlp.down_proj adding to the residual stream, as in Llama-style decoders, or "
                     f"output.dense before output.LayerNorm, as in BERT-style encoders)")


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


@contextmanager
def _capture_output(module: nn.Module, store: dict[str, torch.Tensor]) -> Iterator[None]:
    handle = module.register_forward_hook(lambda m, a, out: store.__setitem__("y", first_tensor(out).detach()))
    try:
        yield
    finally:
        handle.remove()


def _base(kind: str, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """The part of the stream that does not go through the projection: ``Y = h - M`` or the attention output."""
    return store["out"] - store["m"] if kind == "residual" else store["a"]


def _target(kind: str, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if kind == "residual":
        return y
    norm = layer.output.LayerNorm
    gamma = norm.weight.detach()
    gamma = torch.where(gamma.abs() < 1e-6, torch.full_like(gamma, 1e-6), gamma)
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(gamma)
    return (y - beta) / gamma


def _predicted(kind: str, layer: nn.Module, base: torch.Tensor, m: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    mixed = m @ T.to(m.dtype)
    return base + mixed if kind == "residual" else layer.output.LayerNorm(base + mixed)


def _heal_span(student: nn.Module, teacher: nn.Module, span: RemovedSpan, batches: list[dict], ridge: float) -> None:
    layer = student.get_submodule(span.preceding)
    kind, projection = fold_site(layer)
    last_removed = teacher.get_submodule(span.teacher_blocks[-1])
    student_device, teacher_device = device_of(student), device_of(teacher)
    d = projection.out_features
    gram = torch.zeros(d, d, dtype=torch.float64, device=student_device)
    cross = torch.zeros(d, d, dtype=torch.float64, device=student_device)
    first: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            store: dict[str, torch.Tensor] = {}
            with _capture(layer, kind, projection, store):
                student(**to_device(batch, student_device))
            with _capture_output(last_removed, store):
                teacher(**to_device(batch, teacher_device))
            missing = [k for k in ("m", "out", "y") + (("a",) if kind == "post_norm" else ()) if k not in store]
            if missing:
                raise RuntimeError(f"calibration did not reach {span.preceding!r} / {span.teacher_blocks[-1]!r}")
            if not first:
                first = dict(store)
            m, base = store["m"], _base(kind, store)
            residual = _target(kind, layer, store["y"].to(student_device)) - base
            mask = batch.get("attention_mask")
            if mask is not None and tuple(mask.shape) == tuple(m.shape[:2]):
                keep = mask.to(student_device).bool()
                m, residual = m[keep], residual[keep]
            m, residual = m.reshape(-1, d).double(), residual.reshape(-1, d).double()
            gram += m.T @ m
            cross += m.T @ residual
        identity = torch.eye(d, dtype=torch.float64, device=student_device)
        lam = ridge * float(torch.trace(gram)) / d + 1e-12
        T = torch.linalg.solve(gram + lam * identity, cross + lam * identity)
        weight = projection.weight
        projection.weight.copy_((T.T @ weight.double()).to(weight.dtype))
        if projection.bias is not None:
            projection.bias.copy_((projection.bias.double() @ T).to(projection.bias.dtype))
        # The folded block must compute exactly the fitted predictor (catches families with a scaled branch).
        check: dict[str, torch.Tensor] = {}
        with _capture(layer, kind, projection, check):
            student(**to_device(batches[0], student_device))
        expected = _predicted(kind, layer, _base(kind, first), first["m"], T)
        scale = float(expected.abs().max()) + 1.0
        if float((check["out"] - expected).abs().max()) > 1e-4 * scale:
            raise ValueError(f"{type(layer).__name__} does not add its {type(projection).__name__} output to the "
                             f"stream unchanged: the linear replacement cannot be folded into it exactly")


def linear(student: nn.Module, teacher: nn.Module, train_dataset, args=None, *, data_collator=None,
           calibration_batches: int = 16, ridge: float = 1e-3) -> nn.Module:
    """Replace each removed span by a least-squares linear map folded into the preceding block (in place).

    The fit has ``d x d`` unknowns per span (``d`` the hidden size): give it many more calibration tokens than ``d``.
    On SmolLM2 (``d`` = 576) with 8 of 30 blocks removed, 16 batches of 8 windows of 128 tokens took held-out
    perplexity from 101.8 to 63.6; 4 batches of 8 (4k tokens) helped less, and 4 windows (512 tokens, fewer than
    ``d``) made a model with 2 blocks removed far worse (20.4 to 221).

    ``student`` is changed in place (:func:`hf_collapse.heal` passes a copy); ``args`` (optional) gives the
    calibration batch size (``per_device_train_batch_size``).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    spans = removed_spans(student, teacher)
    for span in spans:
        if span.preceding is None:
            raise ValueError(f"the removed span {list(span.teacher_blocks)} starts the stage: no kept block precedes "
                             f"it, so there is no projection to fold its linear replacement into")
        fold_site(student.get_submodule(span.preceding))  # refuse before any work
    batch_size = getattr(args, "per_device_train_batch_size", 8) if args is not None else 8
    batches = collect_batches(student, train_dataset, data_collator, batch_size, calibration_batches)
    inner_student = unwrap_model(student)
    teacher_mode, student_mode = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        for span in spans:
            _heal_span(student, teacher, span, batches, ridge)
    finally:
        teacher.train(teacher_mode)
        student.train(student_mode)
    return inner_student

