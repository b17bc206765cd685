"""Sliced and max-sliced Wasserstein distances between two sets of samples, in torch and differentiable.

Each input is an ``(n, d)`` tensor of ``n`` samples with uniform weights (flatten per-sample features with
``features.flatten(1)`` first). A *slice* is a unit direction ``theta``: both sets are projected onto it and
compared with the 1-D Wasserstein-p distance, which for equal ``n`` and uniform weights is exact and cheap: sort
both projections, ``W_p = mean(|sorted(x @ theta) - sorted(y @ theta)| ** p) ** (1 / p)``.

* :func:`sliced_wasserstein` averages over random slices, exactly as POT's
  ``ot.sliced.sliced_wasserstein_distance``: ``(mean_l W_p^p(theta_l)) ** (1 / p)``.
* :func:`max_sliced_wasserstein` takes the worst slice. ``slicing="random"`` is POT's
  ``ot.sliced.max_sliced_wasserstein_distance`` (``max_l W_p(theta_l)`` over the random directions);
  ``slicing="ascent"`` (the default) searches the unit sphere for the true max slice by projected gradient ascent.

Known trap: POT's max-sliced distance is the max over ``n_projections`` (50) *random* directions. In high dimension a
random direction is nearly orthogonal to every direction that matters, so the max of 50 of them is close to the
average slice and far below the true max slice. Measured on a shifted and scaled pair (``x ~ N(0, I)``,
``y = 2 x' + 0.5`` with ``x'`` an independent ``N(0, I)`` sample) at ``n=128, d=16384``: POT's random max gives ~1.6
while the max slice found by ascent is ~68 (the mean shift alone is worth ``0.5 * sqrt(d) = 64`` along the all-ones
direction; both scale with the data, so features scaled by 0.1 give ~0.16 against ~7). Use ``slicing="ascent"`` when
the max slice is what you mean.

The ascent's cold start is where the speed comes from. With ``n < d`` the two samples' means differ along a
direction where the slice is large (their true mean shift, and, with ``n`` samples in ``d`` dimensions, a sampling
difference of norm about ``sqrt(2 d / n)`` times the spread), so ``mean(x) - mean(y)`` is a candidate start beside a
few random directions; from it one or two ascent steps reach the local max (measured: 68.4565 at the start, 68.4574
after one step, no change after 30). The default call costs about eight passes over the data, matrix-vector products
and sorts of ``n`` values, no host synchronisation: ~40x POT's value in less than POT's time on the same float32
torch tensors (POT's time is drawing and applying 50 directions). See ``benchmarks/experiments/msw.json`` for the
measured table. More steps help where random and mean-shift starts both miss (a variance-only difference in moderate
dimension: at ``n=d=256`` with one planted direction, 5 steps find it, 2 get three quarters of the way): the
LaCoOT trainer takes its own ``msw_ascent_steps`` per training step, warm-started from the previous step's direction.

Conventions that differ from POT: ``directions`` here are *rows*, shape ``(L, d)`` (POT's ``projections`` are
columns, ``(d, L)``); given directions are renormalised to unit length (POT uses them as they are); randomness comes
from a ``torch.Generator``, not a numpy seed.

All computation runs in float32 with autocast disabled, whatever the input dtype or the surrounding autocast region,
and the result is a 0-dim float32 tensor through which gradients flow back to ``x`` and ``y``::

    >>> import torch
    >>> from hf_collapse.ot import max_sliced_wasserstein
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(64, 32, generator=g), 2 * torch.randn(64, 32, generator=g) + 0.5
    >>> loss = max_sliced_wasserstein(x, y, generator=g)
    >>> loss.dtype, loss.dim()
    (torch.float32, 0)
"""

from __future__ import annotations

import math

import torch

__all__ = ["max_sliced_wasserstein", "random_directions", "sliced_wasserstein"]

_SLICINGS = ("ascent", "random")
# Line search of an ascent step (see ``_ascend``): halvings of the power-iteration angle, and a grid over the half
# circle (angles k * pi / _GRID, k = 1 .. _GRID - 1).
_HALVINGS = 6
_GRID = 16
# then _REFINE zooms around the best angle so far, each on offsets _ZOOM times the distance to its nearest neighbour
_REFINE = 2
_ZOOM_POINTS, _ZOOM_STEP = 6, 0.125  # offsets k * 0.125, k = -6 .. 6
_TINY = torch.finfo(torch.float32).tiny
# Defaults of max_sliced_wasserstein: POT's 50 random directions for slicing="random". For slicing="ascent": the
# difference of the means plus a few random cold starts (random ones add little in high dimension and cost d normal
# draws each; in low dimension they add diversity), and two ascent steps: each step is two passes over the data (the
# tangent's projections, then the gradient), the cost that matters on CPU, and in high dimension steps beyond the
# first add < 0.01 % (see the module docstring); callers that need convergence pass more (the LaCoOT trainer's
# msw_ascent_steps, warm-started; block scoring takes at least 10).
RANDOM_PROJECTIONS = 50
ASCENT_STARTS = 4
ASCENT_STEPS = 2


def random_directions(
    d: int,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` directions drawn uniformly on the unit sphere of ``R^d``, as the rows of an ``(n, d)`` tensor.

    Drawn on the generator's device (CPU by default) and moved to ``device``, so a CPU generator gives the same
    directions whatever the target device::

        >>> dirs = random_directions(16, 4, generator=torch.Generator().manual_seed(0))
        >>> dirs.shape, bool(torch.allclose(dirs.norm(dim=1), torch.ones(4)))
        (torch.Size([4, 16]), True)
    """
    if d < 1 or n < 1:
        raise ValueError(f"random_directions needs d >= 1 and n >= 1, got d={d}, n={n}")
    draw_device = generator.device if generator is not None else device
    dirs = torch.randn(n, d, generator=generator, device=draw_device, dtype=torch.float32)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return dirs.to(device=device, dtype=dtype)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    n_projections: int = 50,
    p: float = 2,
    directions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sliced Wasserstein-p distance ``(mean_l W_p^p(x @ theta_l, y @ theta_l)) ** (1 / p)``.

    The same reduction as POT's ``ot.sliced.sliced_wasserstein_distance`` (p-th powers averaged over slices, then
    the p-th root), on ``n_projections`` random unit directions drawn with ``generator``, or on the rows of
    ``directions`` (``(L, d)``; renormalised; ``n_projections`` is then ignored)::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(32, 8, generator=g, requires_grad=True)
        >>> sliced_wasserstein(x, x.detach() + 1.0, generator=g).backward()
    """
    x32, y32 = _check_pair(x, y, p, n_projections)
    with torch.autocast(device_type=x32.device.type, enabled=False):
        dirs = _directions(directions, x32.shape[1], n_projections, generator, x32.device)
        powered = _wpp(x32 @ dirs.T, y32 @ dirs.T, p)  # (L,) W_p^p per slice
        return _root(powered.mean(), p)


def max_sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    slicing: str = "ascent",
    n_projections: int | None = None,
    ascent_steps: int = ASCENT_STEPS,
    p: float = 2,
    directions: torch.Tensor | None = None,
    init_direction: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_direction: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Max-sliced Wasserstein-p distance ``max_theta W_p(x @ theta, y @ theta)`` over unit directions ``theta``.

    ``slicing="random"``: the max over ``n_projections`` random directions (default 50, as POT), or the rows of
    ``directions``: the same value as POT's ``ot.sliced.max_sliced_wasserstein_distance`` on the same directions. In
    high dimension this is close to the *average* slice, far below the true max slice (see the module docstring).

    ``slicing="ascent"`` (default): start from ``init_direction`` if given (a warm start, e.g. the direction this
    function returned at the previous training step); otherwise from the best of the candidates: the difference of
    the means ``mean(x) - mean(y)`` and ``n_projections`` random directions (default ``ASCENT_STARTS`` = 4) or the
    rows of ``directions``, all scored with one product per data set. In high dimension the difference of the means
    is the candidate that matters (a random direction sees almost none of a mean shift) and random starts add
    little but cost one row of ``d`` normal draws each; in low dimension they add diversity against local maxima.
    Then ``ascent_steps`` steps (default ``ASCENT_STEPS`` = 2) of projected (Riemannian) gradient ascent of
    ``W_p(theta)`` on the unit sphere, on detached data. Each step removes the radial part of the gradient and
    moves along the great circle towards it, renormalising. The step angle needs no tuning at any data scale: a
    line search on that circle, which costs one matrix-vector product per data set because every point of the
    circle projects to ``cos(t) x theta + sin(t) x u``, tries the angle that lands on the gradient direction (a
    power-iteration step on the matched cross-covariance) and halvings of it, a coarse grid over the half circle,
    then zooms in around the best. A step is taken only if it improves the value; when none does, the next
    backtracking starts below the smallest angle tried. The end is checked exactly against the start, so the result
    is never below the value at the starting direction (hence, without a warm start, never below
    ``slicing="random"`` on the same directions, up to float rounding between a matrix product and a matrix-vector
    product).

    The ascent runs exactly ``ascent_steps`` steps with no host synchronisation (no ``.item()``, no data-dependent
    Python branch): on a GPU the whole call is queued without waiting, and a step that finds nothing better is a
    no-op, selected on the device with ``torch.where``. Each step costs four matrix-vector products (the tangent's
    projections and the new gradient; the last step skips its unused gradient) and a few sorts of ``n`` values. A
    zero or non-finite ``init_direction`` is refused with a ValueError on the CPU; on an accelerator, where checking
    would wait for the device, it is replaced by the difference of the means.

    The value is ``W_p(x @ theta*, y @ theta*)`` with ``theta*`` held fixed (detached), computed from the
    projections of one product of the data with ``theta*`` (not from the ascent's running projections, which carry
    rounding): it is the exact 1-D distance on a unit direction, hence a lower bound of the true
    max-sliced distance, and gradients flow to ``x`` and ``y`` only (the envelope theorem: at a max slice the
    direction's own variation contributes nothing to first order). ``return_direction=True`` also returns
    ``theta*`` (unit norm, shape ``(d,)``, float32, no grad)::

        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 256, generator=g), 2 * torch.randn(64, 256, generator=g) + 0.5
        >>> value, theta = max_sliced_wasserstein(x, y, generator=g, return_direction=True)
        >>> value_next = max_sliced_wasserstein(x, y, init_direction=theta)   # warm start at the next step
        >>> bool(value_next >= value - 1e-4)
        True
    """
    if slicing not in _SLICINGS:
        raise ValueError(f"unknown slicing {slicing!r}: expected one of {', '.join(map(repr, _SLICINGS))}")
    if int(ascent_steps) != ascent_steps or ascent_steps < 0:
        raise ValueError(f"ascent_steps must be an integer >= 0, got {ascent_steps!r}")
    if n_projections is None:
        n_projections = RANDOM_PROJECTIONS if slicing == "random" else ASCENT_STARTS
    x32, y32 = _check_pair(x, y, p, n_projections)
    d = x32.shape[1]
    if init_direction is not None and slicing != "ascent":
        raise ValueError("init_direction is only used by slicing='ascent'")
    with torch.autocast(device_type=x32.device.type, enabled=False):
        if slicing == "random":
            dirs = _directions(directions, d, n_projections, generator, x32.device)
            powered = _wpp(x32 @ dirs.T, y32 @ dirs.T, p)
            best = torch.argmax(powered.detach()).reshape(1)  # stays on the device: no host sync
            value, theta = _root(powered.index_select(0, best)[0], p), dirs.index_select(0, best)[0].detach()
        else:
            xd, yd = x32.detach(), y32.detach()
            if init_direction is not None:
                start = _warm_direction(init_direction, d, xd, yd)
                start_px, start_py = xd @ start, yd @ start
            else:
                dirs = _directions(directions, d, n_projections, generator, x32.device)
                mean_shift = _mean_shift(xd, yd)
                # last, so that on a tie (e.g. identical means, a zero vector) a random unit direction wins
                dirs = torch.cat([dirs, (mean_shift / mean_shift.norm().clamp_min(_TINY))[None]])
                px_all, py_all = xd @ dirs.T, yd @ dirs.T
                best = torch.argmax(_wpp(px_all, py_all, p)).reshape(1)
                start = dirs.index_select(0, best)[0]
                start_px, start_py = px_all.index_select(1, best)[:, 0], py_all.index_select(1, best)[:, 0]
            theta, px, py = start, start_px, start_py
            if ascent_steps:
                end = _ascend(xd, yd, start, start_px, start_py, int(ascent_steps), p)
                # The exact check: the end's own projections against the start's; never end below the start.
                end_px, end_py = xd @ end, yd @ end
                keep_end = _wpp(end_px[:, None], end_py[:, None], p)[0] >= _wpp(px[:, None], py[:, None], p)[0]
                theta = torch.where(keep_end, end, start)
                px, py = torch.where(keep_end, end_px, px), torch.where(keep_end, end_py, py)
            # W_p on theta from projections already computed by one product with the data (no further pass over
            # it); autograd reaches x and y as through x @ theta, theta held fixed.
            px, py = _FixedSliceProjection.apply(x32, theta, px), _FixedSliceProjection.apply(y32, theta, py)
            value = _root(_wpp(px[:, None], py[:, None], p)[0], p)
    return (value, theta) if return_direction else value


# --------------------------------------------------------------------------------------------------------------------
# internals


def _check_pair(x: torch.Tensor, y: torch.Tensor, p: float, n_projections: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"x and y must be 2-D (n_samples, n_features); got shapes {tuple(x.shape)} and {tuple(y.shape)} "
            "(flatten per-sample features with .flatten(1))"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features; got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of samples (uniform weights, equal n); got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x and y must be non-empty; got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    if int(n_projections) != n_projections or n_projections < 1:
        raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    return x.float(), y.float()


def _as_direction(v: torch.Tensor, d: int, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(v).__name__}")
    if v.numel() != d or v.dim() > 2 or (v.dim() == 2 and 1 not in v.shape):
        raise ValueError(f"{name} must have shape ({d},) to match the {d} features, got {tuple(v.shape)}")
    return v.detach().reshape(d).float()


def _warm_direction(init_direction: torch.Tensor, d: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``init_direction`` as a unit float32 vector on the data's device.

    A zero or non-finite one is refused with a ValueError when it lives on the CPU (checking is free there). On an
    accelerator the check would make the host wait for the device at every training step, so instead a degenerate
    warm start is replaced, on the device, by the difference of the means (unit, or zero if the means agree).
    """
    v = _as_direction(init_direction, d, "init_direction")
    norm = v.norm()
    if v.device.type == "cpu":
        if not torch.isfinite(norm) or norm <= 0:
            raise ValueError("a direction must be finite and non-zero")
        return (v / norm).to(x.device)
    v = v.to(x.device)
    norm = norm.to(x.device)
    mean_shift = _mean_shift(x, y)
    fallback = mean_shift / mean_shift.norm().clamp_min(_TINY)
    return torch.where(torch.isfinite(norm) & (norm > 0), v / norm.clamp_min(_TINY), fallback)


def _directions(directions, d, n_projections, generator, device) -> torch.Tensor:
    """The slices as unit rows ``(L, d)``: given ``directions`` (renormalised) or ``n_projections`` random ones."""
    if directions is None:
        return random_directions(d, n_projections, generator=generator, device=device)
    if not isinstance(directions, torch.Tensor):
        raise TypeError(f"directions must be a torch tensor, got {type(directions).__name__}")
    if directions.dim() == 1:
        directions = directions[None]
    if directions.dim() != 2 or directions.shape[1] != d or directions.shape[0] < 1:
        raise ValueError(
            f"directions must have shape (L, {d}) (one direction per row; POT's projections are the transpose), "
            f"got {tuple(directions.shape)}"
        )
    dirs = directions.detach().to(device=device, dtype=torch.float32)
    norms = dirs.norm(dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()) or bool((norms <= 0).any()):
        raise ValueError("directions must be finite and non-zero")
    return dirs / norms


def _mean_shift(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean(x) - mean(y)`` over samples, as matrix-vector products (about twice as fast as ``mean(dim=0)`` on CPU)."""
    weights = torch.full((x.shape[0],), 1.0 / x.shape[0], device=x.device, dtype=x.dtype)
    return weights @ x - weights @ y


class _FixedSliceProjection(torch.autograd.Function):
    """``x @ theta`` for a fixed (detached) ``theta`` whose value ``projection`` was already computed: the forward
    returns it as is, the backward is that of the product (``grad_x = outer(grad, theta)``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(theta)
        return projection.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (theta,) = ctx.saved_tensors
        grad_x = torch.outer(grad, theta) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _wpp(px: torch.Tensor, py: torch.Tensor, p: float) -> torch.Tensor:
    """``W_p^p`` per column between projections ``px``, ``py`` of shape ``(n, L)``: sort, then mean of |diff|^p."""
    diff = torch.sort(px, dim=0).values - torch.sort(py, dim=0).values
    if p == 2:
        return diff.square().mean(dim=0)
    if p == 1:
        return diff.abs().mean(dim=0)
    return diff.abs().pow(p).mean(dim=0)


def _root(powered: torch.Tensor, p: float) -> torch.Tensor:
    """``powered ** (1/p)`` with a zero (not NaN) gradient at 0, where the distance is not differentiable."""
    if p == 1:
        return powered
    positive = powered > 0
    safe = torch.where(positive, powered, torch.ones_like(powered))
    return torch.where(positive, safe.pow(1.0 / p), torch.zeros_like(powered))


def _ascend(
    x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, px: torch.Tensor, py: torch.Tensor, steps: int, p: float
) -> torch.Tensor:
    """``steps`` steps of projected gradient ascent of ``W_p^p(theta)`` on the unit sphere from the unit ``theta``
    (whose projections ``px = x @ theta``, ``py = y @ theta`` are given); returns the best direction seen (detached).

    Each step takes the gradient ``g`` (the sorting held fixed, as autograd would give it), removes its radial
    component to get the tangent direction ``u = g_t / |g_t|``, and moves along the great circle
    ``theta(t) = cos(t) theta + sin(t) u`` (renormalised against rounding). The step angle ``t`` comes from a line
    search that needs a single product with the data: the projections of every point of that circle are
    ``cos(t) x theta + sin(t) x u`` (the same for ``y``), so once ``x u`` and ``y u`` are known, any number of
    angles is scored for the price of sorting. The angles are all scale free (nothing to tune): the angle that
    lands on ``g / |g|`` (for p = 2 and a fixed matching, a power-iteration step) and halvings of it
    (backtracking), plus a coarse grid over the half circle that lets a step jump between basins; then
    ``_REFINE`` zooms around the best angle. The best angle is taken only if it improves the value; otherwise
    ``theta`` stays and the next backtracking starts below the smallest angle tried.

    Everything stays on the device: angles are tensors, the argmax is gathered with ``index_select`` and the
    accept/reject of a step is a ``torch.where``, so the loop never waits for the device (a GPU runs it queued).
    """
    n, device, dtype = x.shape[0], x.device, x.dtype
    halvings = 0.5 ** torch.arange(_HALVINGS, device=device, dtype=dtype)
    grid = torch.arange(1, _GRID, device=device, dtype=dtype) * (math.pi / _GRID)
    zoom = torch.arange(-_ZOOM_POINTS, _ZOOM_POINTS + 1, device=device, dtype=dtype) * _ZOOM_STEP
    backtrack = 0.5**_HALVINGS

    # x's and y's projections travel together as the rows of one (2, n[, K]) tensor: one sort, one gather, one
    # torch.where for both (on CPU the per-operation overhead, not the arithmetic, is what a step costs).
    def score(cand: torch.Tensor):
        """W_p^p of each column of the projections ``cand`` (2, n, K), with the sorted differences and orders."""
        ordered, order = torch.sort(cand, dim=1)
        r = ordered[0] - ordered[1]
        return (r.square() if p == 2 else r.abs().pow(p)).mean(dim=0), r, order

    def gradient(r: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        w = (2.0 / n) * r if p == 2 else (p / n) * r.abs().pow(p - 1) * torch.sign(r)
        weights = torch.empty_like(order, dtype=dtype).scatter_(1, order, w.expand(2, n))
        return weights[0] @ x - weights[1] @ y

    proj = torch.stack([px, py])  # (2, n)
    values, r, order = score(proj[:, :, None])
    value, r, order = values[0], r[:, 0], order[:, :, 0]
    grad = gradient(r, order)
    scale = torch.ones((), device=device, dtype=dtype)
    for step in range(steps):
        radial = torch.dot(grad, theta)
        tangent = grad - radial * theta
        tangent_norm = tangent.norm()
        # stationary on the sphere (or identical inputs): u = 0 makes every candidate cos(t) theta, never better
        moving = tangent_norm > 1e-12 * radial.abs().clamp_min(1e-30)  # False for NaN too
        u = tangent * torch.where(moving, 1.0 / tangent_norm.clamp_min(_TINY), 0.0)
        proj_u = torch.stack([x @ u, y @ u])[:, :, None]  # with proj: the projections of the whole great circle
        power = torch.atan2(tangent_norm, radial.clamp_min(0.0))
        angles = torch.cat([power * scale * halvings, grid])
        best = angles[0]  # set by every stage (the first does not read it)
        for stage in range(_REFINE + 1):
            if stage:  # zoom in around the best angle so far: still no product with the data
                gaps = (angles - best).abs()
                spacing = torch.minimum(torch.where(gaps > 0, gaps, math.inf).min(), best.abs())
                angles = best + spacing * zoom  # offset 0 is among them: the best so far is kept
            # broadcasting, not a (n, 2) @ (2, K) product: no GEMM overhead
            cand = torch.addcmul(proj[:, :, None] * angles.cos(), proj_u, angles.sin())
            values, r_all, order_all = score(cand)
            k = torch.argmax(values).reshape(1)
            best = angles.index_select(0, k)[0]
        best_value = values.index_select(0, k)[0]
        improved = best_value > value
        moved = best.cos() * theta + best.sin() * u
        norm = moved.norm()
        theta = torch.where(improved, moved / norm, theta)
        proj = torch.where(improved, cand.index_select(2, k)[:, :, 0] / norm, proj)
        r = torch.where(improved, r_all.index_select(1, k)[:, 0] / norm, r)
        order = torch.where(improved, order_all.index_select(2, k)[:, :, 0], order)
        value = torch.where(improved, best_value, value)
        if step + 1 < steps:  # the last step's gradient would go unused: skip its pass over the data
            scale = torch.where(improved, 1.0, scale * backtrack)
            grad = gradient(r, order)
    return theta.detach()
