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
direction; both scale with the data, so features scaled by 0.1 give ~0.16 against ~7). See
``benchmarks/bench_msw.py`` for the measured table. Use ``slicing="ascent"`` when the max slice is
what you mean.

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
from typing import Optional, Union

import torch

__all__ = ["max_sliced_wasserstein", "random_directions", "sliced_wasserstein"]

_SLICINGS = ("ascent", "random")
# Line search of an ascent step (see ``_ascend``): halvings of the power-iteration angle, and a grid over the half
# circle (angles k * pi / _GRID, k = 1 .. _GRID - 1).
_HALVINGS = 6
_GRID = 16
# then _REFINE zooms around the best angle so far, each on offsets _ZOOM times the distance to its nearest neighbour
_REFINE = 2
_ZOOM = (-0.75, -0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 0.75)


def random_directions(
    d: int,
    n: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
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
    directions: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
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
    n_projections: int = 50,
    ascent_steps: int = 10,
    p: float = 2,
    directions: Optional[torch.Tensor] = None,
    init_direction: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_direction: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Max-sliced Wasserstein-p distance ``max_theta W_p(x @ theta, y @ theta)`` over unit directions ``theta``.

    ``slicing="random"``: the max over ``n_projections`` random directions (or the rows of ``directions``), the
    same value as POT's ``ot.sliced.max_sliced_wasserstein_distance`` on the same directions. In high dimension
    this is close to the *average* slice, far below the true max slice (see the module docstring).

    ``slicing="ascent"`` (default): start from ``init_direction`` if given (a warm start, e.g. the direction this
    function returned at the previous training step), otherwise from the best of the random directions; then take
    at most ``ascent_steps`` steps of projected (Riemannian) gradient ascent of ``W_p(theta)`` on the unit sphere,
    on detached data. Each step removes the radial part of the gradient and moves along the great circle towards
    it, renormalising. The step angle needs no tuning at any data scale: a line search on that circle, which costs
    one matrix-vector product per data set because every point of the circle projects to
    ``cos(t) x theta + sin(t) x u``, tries the angle that lands on the gradient direction (a power-iteration step)
    and halvings of it, a coarse grid over the half circle, then zooms in around the best. A step is taken only if
    it improves the value; when none does, the next backtracking starts below the smallest angle tried, and the
    ascent stops once the angles fall under float32 resolution (or the tangent gradient vanishes). The end value is
    checked exactly against the start, so the result is never below the value at the starting direction (hence,
    without a warm start, never below ``slicing="random"`` on the same directions, up to float rounding between
    a matrix product and a matrix-vector product).

    The value is ``W_p(x @ theta*, y @ theta*)`` with ``theta*`` held fixed (detached): gradients flow to ``x`` and
    ``y`` only. ``return_direction=True`` also returns ``theta*`` (unit norm, shape ``(d,)``, float32, no grad)::

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
    x32, y32 = _check_pair(x, y, p, n_projections)
    d = x32.shape[1]
    if init_direction is not None and slicing != "ascent":
        raise ValueError("init_direction is only used by slicing='ascent'")
    with torch.autocast(device_type=x32.device.type, enabled=False):
        if slicing == "random":
            dirs = _directions(directions, d, n_projections, generator, x32.device)
            powered = _wpp(x32 @ dirs.T, y32 @ dirs.T, p)
            best = int(torch.argmax(powered.detach()))
            value, theta = _root(powered[best], p), dirs[best].detach()
        else:
            xd, yd = x32.detach(), y32.detach()
            if init_direction is not None:
                theta = _unit(_as_direction(init_direction, d, "init_direction").to(x32.device))
            else:
                dirs = _directions(directions, d, n_projections, generator, x32.device)
                powered = _wpp(xd @ dirs.T, yd @ dirs.T, p)
                theta = dirs[int(torch.argmax(powered))]
            start = theta
            theta, start_powered = _ascend(xd, yd, start, int(ascent_steps), p)
            powered = _slice_powered(x32, y32, theta, p)  # autograd through x and y, theta held fixed
            if float(powered.detach()) < start_powered:  # the ascent tracked values up to rounding: never end below
                theta, powered = start, _slice_powered(x32, y32, start, p)
            value = _root(powered, p)
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


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm()
    if not torch.isfinite(norm) or norm <= 0:
        raise ValueError("a direction must be finite and non-zero")
    return v / norm


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


def _wpp(px: torch.Tensor, py: torch.Tensor, p: float) -> torch.Tensor:
    """``W_p^p`` per column between projections ``px``, ``py`` of shape ``(n, L)``: sort, then mean of |diff|^p."""
    diff = torch.sort(px, dim=0).values - torch.sort(py, dim=0).values
    if p == 2:
        return diff.square().mean(dim=0)
    if p == 1:
        return diff.abs().mean(dim=0)
    return diff.abs().pow(p).mean(dim=0)


def _slice_powered(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, p: float) -> torch.Tensor:
    """``W_p^p`` on the single slice ``theta`` (d,), as a 0-dim tensor."""
    return _wpp((x @ theta)[:, None], (y @ theta)[:, None], p)[0]


def _root(powered: torch.Tensor, p: float) -> torch.Tensor:
    """``powered ** (1/p)`` with a zero (not NaN) gradient at 0, where the distance is not differentiable."""
    if p == 1:
        return powered
    positive = powered > 0
    safe = torch.where(positive, powered, torch.ones_like(powered))
    return torch.where(positive, safe.pow(1.0 / p), torch.zeros_like(powered))


def _ascend(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, steps: int, p: float) -> tuple[torch.Tensor, float]:
    """Projected gradient ascent of ``W_p^p(theta)`` on the unit sphere from the unit ``theta``.

    Returns the best direction seen and ``W_p^p`` at the start (the caller checks the end against it exactly).

    Each step takes the gradient ``g`` (the sorting held fixed, as autograd would give it), removes its radial
    component to get the tangent direction ``u = g_t / |g_t|``, and moves along the great circle
    ``theta(t) = cos(t) theta + sin(t) u`` (renormalised against rounding). The step angle ``t`` comes from a line
    search that needs a single product with the data: the projections of every point of that circle are
    ``cos(t) x theta + sin(t) x u`` (the same for ``y``), so once ``x u`` and ``y u`` are known, any number of
    angles is scored for the price of sorting. The angles are all scale free (nothing to tune): the angle that
    lands on ``g / |g|`` (for p = 2 and a fixed matching, a power-iteration step) and halvings of it
    (backtracking), plus a coarse grid over the half circle that lets a step jump between basins; then
    ``_REFINE`` zooms around the best angle. The best angle is taken only if it improves the value; otherwise
    ``theta`` stays, the next backtracking starts below the smallest angle tried, and once that falls under
    float32 resolution the ascent stops. So the value never drops below that of the start.
    """
    n = x.shape[0]

    def score(px: torch.Tensor, py: torch.Tensor):
        """W_p^p of each column of the projections ``px``, ``py`` (n, K), with the sorted differences and orders."""
        sx, ix = torch.sort(px, dim=0)
        sy, iy = torch.sort(py, dim=0)
        r = sx - sy
        return (r.square() if p == 2 else r.abs().pow(p)).mean(dim=0), r, ix, iy

    def gradient(r: torch.Tensor, ix: torch.Tensor, iy: torch.Tensor) -> torch.Tensor:
        w = (2.0 / n) * r if p == 2 else (p / n) * r.abs().pow(p - 1) * torch.sign(r)
        return torch.empty_like(w).scatter_(0, ix, w) @ x - torch.empty_like(w).scatter_(0, iy, w) @ y

    px_theta, py_theta = x @ theta, y @ theta
    values, r, ix, iy = score(px_theta[:, None], py_theta[:, None])
    value, grad = float(values[0]), gradient(r[:, 0], ix[:, 0], iy[:, 0])
    start_value, scale = value, 1.0
    for _ in range(steps):
        radial = torch.dot(grad, theta)
        tangent = grad - radial * theta
        tangent_norm, radial = float(tangent.norm()), float(radial)
        if not math.isfinite(tangent_norm) or tangent_norm <= 1e-12 * max(abs(radial), 1e-30):
            break  # stationary on the sphere (or identical inputs): nothing to climb
        u = tangent / tangent_norm
        px_plane = torch.stack([px_theta, x @ u], dim=1)  # (n, 2): projections on theta and u
        py_plane = torch.stack([py_theta, y @ u], dim=1)
        power = math.atan2(tangent_norm, max(radial, 0.0))
        angles = [power * scale * 0.5**j for j in range(_HALVINGS)]
        if scale == 1.0:
            angles += [math.pi * j / _GRID for j in range(1, _GRID)]
        for stage in range(_REFINE + 1):
            if stage:  # zoom in around the best angle so far: still no product with the data
                spacing = min([abs(a - best) for a in angles if a != best] + [abs(best)])
                if spacing <= 1e-7:
                    break
                angles = [best + spacing * f for f in _ZOOM]
            rotation = torch.tensor([[math.cos(a) for a in angles], [math.sin(a) for a in angles]], dtype=x.dtype,
                                    device=x.device)
            px, py = px_plane @ rotation, py_plane @ rotation
            values, r_all, ix_all, iy_all = score(px, py)
            k = int(torch.argmax(values))
            best, best_value, best_px, best_py = angles[k], float(values[k]), px[:, k], py[:, k]
            best_r, best_ix, best_iy = r_all[:, k], ix_all[:, k], iy_all[:, k]
        if best_value > value:
            theta = math.cos(best) * theta + math.sin(best) * u
            norm = theta.norm()
            theta, px_theta, py_theta = theta / norm, best_px / norm, best_py / norm
            value, grad = best_value, gradient(best_r, best_ix, best_iy)
            scale = 1.0
        else:
            scale *= 0.5**_HALVINGS
            if power * scale < 1e-7:
                break  # the steps fall below float32 resolution on the sphere
    return theta.detach(), start_value
