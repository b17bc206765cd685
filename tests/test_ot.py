"""Sliced and max-sliced Wasserstein distances (hf_collapse.ot), checked against POT where POT defines the value."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import ot as pot
import pytest
import torch

from hf_collapse.ot import (
    ASCENT_STARTS,
    ASCENT_STEPS,
    max_sliced_wasserstein,
    random_directions,
    sliced_wasserstein,
)


def pair(n: int = 40, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A shifted and scaled pair: x ~ N(0, I), y = 2 x' + 0.5 with x' an independent sample."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), 2 * torch.randn(n, d, generator=g) + 0.5


def as_pot(x: torch.Tensor, y: torch.Tensor, dirs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same data for POT: float64 numpy, projections as columns (d, L)."""
    return x.double().numpy(), y.double().numpy(), dirs.T.double().numpy()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pot_grid_max_2d(x: torch.Tensor, y: torch.Tensor, n_angles: int = 3600) -> float:
    """Brute-force max slice in 2-D: POT's max over a fine grid of directions on the half circle."""
    angles = np.linspace(0.0, np.pi, n_angles, endpoint=False)
    grid = np.stack([np.cos(angles), np.sin(angles)])  # (2, n_angles), POT's layout
    xs, ys = x.double().numpy(), y.double().numpy()
    return float(pot.sliced.max_sliced_wasserstein_distance(xs, ys, projections=grid))


# ---------------------------------------------------------------------------------------------- agreement with POT


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sliced_matches_pot_on_same_directions(p):
    x, y = pair()
    dirs = random_directions(x.shape[1], 30, generator=gen(1))
    xs, ys, proj = as_pot(x, y, dirs)
    expected = pot.sliced.sliced_wasserstein_distance(xs, ys, projections=proj, p=p)
    got = sliced_wasserstein(x, y, p=p, directions=dirs)
    assert got.item() == pytest.approx(float(expected), abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_random_max_matches_pot_on_same_directions(p):
    x, y = pair()
    dirs = random_directions(x.shape[1], 30, generator=gen(1))
    xs, ys, proj = as_pot(x, y, dirs)
    expected = pot.sliced.max_sliced_wasserstein_distance(xs, ys, projections=proj, p=p)
    got = max_sliced_wasserstein(x, y, slicing="random", p=p, directions=dirs)
    assert got.item() == pytest.approx(float(expected), abs=1e-5, rel=1e-5)


def test_random_max_returns_the_argmax_direction_of_pot():
    x, y = pair()
    dirs = random_directions(x.shape[1], 30, generator=gen(1))
    xs, ys, proj = as_pot(x, y, dirs)
    _, log = pot.sliced.max_sliced_wasserstein_distance(xs, ys, projections=proj, log=True)
    _, theta = max_sliced_wasserstein(x, y, slicing="random", directions=dirs, return_direction=True)
    assert torch.allclose(theta, dirs[int(np.argmax(log["projected_emds"]))], atol=1e-6)


def test_ascent_reaches_the_max_slice_found_by_a_fine_grid_in_2d():
    # In 2-D the true max slice is found by brute force: POT's max over 3600 directions on a half circle.
    x, y = pair(n=50, d=2, seed=3)
    true_max = pot_grid_max_2d(x, y)
    ascent = max_sliced_wasserstein(x, y, n_projections=5, generator=gen(0)).item()
    assert ascent >= true_max * (1 - 1e-4)
    assert ascent <= true_max * (1 + 1e-3)  # the grid is fine enough that nothing much above it exists


def test_one_ascent_step_in_2d_searches_the_whole_circle():
    # In 2-D the great circle through theta and the gradient is the whole circle: one line search finds the max.
    x, y = pair(n=50, d=2, seed=3)
    true_max = pot_grid_max_2d(x, y)
    start = torch.tensor([1.0, 0.3])
    assert max_sliced_wasserstein(x, y, ascent_steps=0, init_direction=start).item() < 0.95 * true_max
    assert max_sliced_wasserstein(x, y, ascent_steps=1, init_direction=start).item() >= true_max * (1 - 1e-4)


def test_ascent_escapes_the_high_dimensional_trap_of_random_slicing():
    x, y = pair(n=64, d=2048)
    dirs = random_directions(2048, 50, generator=gen(1))
    xs, ys, proj = as_pot(x, y, dirs)
    pot_value = float(pot.sliced.max_sliced_wasserstein_distance(xs, ys, projections=proj))
    ascent = max_sliced_wasserstein(x, y, directions=dirs).item()
    # The mean shift alone is 0.5 * sqrt(2048) ~ 22.6 along the all-ones direction; random slices see ~1.5.
    assert ascent >= 10 * pot_value
    assert ascent >= 0.5 * math.sqrt(2048)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("init", [False, True])
def test_ascent_value_is_pots_1d_wasserstein_on_the_returned_unit_direction(p, init):
    # A valid max-sliced value: the exact 1-D distance (POT's wasserstein_1d, float64) of a unit direction, hence a
    # lower bound of the true max slice; never an estimate carried along by the ascent.
    x, y = pair(n=64, d=512)
    start = random_directions(512, 1, generator=gen(5))[0] if init else None
    value, theta = max_sliced_wasserstein(x, y, p=p, init_direction=start, generator=gen(0), return_direction=True)
    assert theta.norm().item() == pytest.approx(1.0, abs=1e-6)
    xs, ys, t = x.double().numpy(), y.double().numpy(), theta.double().numpy()
    expected = float(pot.wasserstein_1d(xs @ t, ys @ t, p=p)) ** (1.0 / p)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ascent_never_exceeds_the_true_max_slice_in_2d():
    for seed in range(4):
        x, y = pair(n=50, d=2, seed=seed)
        assert max_sliced_wasserstein(x, y, generator=gen(seed), ascent_steps=20).item() <= pot_grid_max_2d(x, y) * (
            1 + 1e-3
        )


def planted(n: int, d: int, seed: int = 123, spread: float = 3.0):
    """Same means, one planted direction ``v`` along which y has ``sqrt(1 + spread^2)`` times x's spread."""
    g = gen(seed)
    v = torch.randn(d, generator=g)
    v = v / v.norm()
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g) + spread * torch.randn(n, 1, generator=g) * v
    return x, y, v


def test_default_ascent_finds_a_planted_direction_that_random_slicing_misses():
    x, y, v = planted(n=512, d=64)
    pot_values = [
        float(pot.sliced.max_sliced_wasserstein_distance(x.double().numpy(), y.double().numpy(), seed=s))
        for s in range(5)
    ]
    value, theta = max_sliced_wasserstein(x, y, generator=gen(0), return_direction=True)  # defaults
    assert value.item() >= 2 * max(pot_values)
    assert abs(theta @ v).item() > 0.9  # it is the planted direction, not a lucky one


@pytest.mark.parametrize("seed", range(3))
def test_default_ascent_is_ten_times_pots_default_in_high_dimension(seed):
    # The like-for-like comparison of benchmarks/experiments/msw.json (float32 torch tensors to both), at a smaller d.
    x, y = pair(n=128, d=4096, seed=seed)
    pot_value = float(pot.sliced.max_sliced_wasserstein_distance(x, y, seed=seed))  # 50 random directions
    assert max_sliced_wasserstein(x, y, generator=gen(seed)).item() >= 10 * pot_value


def test_cold_start_includes_the_difference_of_the_means():
    # With no ascent step the start is returned: on a shifted pair the mean-shift direction beats every random one.
    x, y = pair(n=64, d=1024)
    value, theta = max_sliced_wasserstein(x, y, ascent_steps=0, generator=gen(0), return_direction=True)
    shift = x.mean(0) - y.mean(0)
    assert abs(theta @ shift / shift.norm()).item() == pytest.approx(1.0, abs=1e-5)
    assert value.item() >= 0.5 * math.sqrt(1024)


@pytest.mark.parametrize("slicing", ["random", "ascent"])
@pytest.mark.parametrize("warm", [False, True])
def test_no_host_synchronisation(slicing, warm, monkeypatch):
    # Meta tensors carry no data: any .item(), float(), bool() or data-dependent branch on them raises. Running the
    # whole call (and its backward) on them shows it can be queued on a GPU without waiting for the device.
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: contextlib.nullcontext())  # autocast refuses "meta"
    x = torch.empty(30, 10, device="meta", requires_grad=True)
    y = torch.empty(30, 10, device="meta")
    init = torch.empty(10, device="meta") if warm and slicing == "ascent" else None
    value, theta = max_sliced_wasserstein(
        x, y, slicing=slicing, init_direction=init, ascent_steps=3, generator=gen(0), return_direction=True
    )
    assert value.shape == () and theta.shape == (10,)
    value.backward()
    assert x.grad.shape == (30, 10)


def test_default_numbers_of_directions():
    # slicing="random" keeps POT's 50 directions; the ascent's cold start draws a few (the mean shift does the rest).
    x, y = pair()
    dirs = random_directions(x.shape[1], 50, generator=gen(3))
    assert max_sliced_wasserstein(x, y, slicing="random", generator=gen(3)).item() == pytest.approx(
        max_sliced_wasserstein(x, y, slicing="random", directions=dirs).item(), rel=1e-6
    )
    starts = random_directions(x.shape[1], ASCENT_STARTS, generator=gen(3))
    assert max_sliced_wasserstein(x, y, generator=gen(3)).item() == pytest.approx(
        max_sliced_wasserstein(x, y, directions=starts).item(), rel=1e-6
    )
    assert max_sliced_wasserstein(x, y, generator=gen(3)).item() == pytest.approx(
        max_sliced_wasserstein(x, y, generator=gen(3), ascent_steps=ASCENT_STEPS).item(), rel=1e-6
    )


# ------------------------------------------------------------------------------------------------ metric properties


@pytest.mark.parametrize("distance", ["sliced", "random", "ascent"])
def test_zero_on_identical_inputs_with_finite_zero_gradient(distance):
    x, _ = pair()
    x = x.clone().requires_grad_(True)
    if distance == "sliced":
        value = sliced_wasserstein(x, x, generator=gen(0))
    else:
        value = max_sliced_wasserstein(x, x, slicing=distance, generator=gen(0))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("slicing", ["random", "ascent"])
def test_max_sliced_is_symmetric(slicing):
    x, y = pair()
    dirs = random_directions(x.shape[1], 20, generator=gen(1))
    forward = max_sliced_wasserstein(x, y, slicing=slicing, directions=dirs)
    backward = max_sliced_wasserstein(y, x, slicing=slicing, directions=dirs)
    assert forward.item() == pytest.approx(backward.item(), rel=1e-5)
    assert sliced_wasserstein(x, y, directions=dirs).item() == pytest.approx(
        sliced_wasserstein(y, x, directions=dirs).item(), rel=1e-6
    )


@pytest.mark.parametrize("slicing", ["random", "ascent"])
def test_invariant_to_sample_order(slicing):
    x, y = pair()
    dirs = random_directions(x.shape[1], 20, generator=gen(1))
    px, py = torch.randperm(x.shape[0], generator=gen(2)), torch.randperm(y.shape[0], generator=gen(3))
    assert not torch.equal(px, py)
    value = max_sliced_wasserstein(x, y, slicing=slicing, directions=dirs)
    permuted = max_sliced_wasserstein(x[px], y[py], slicing=slicing, directions=dirs)
    assert permuted.item() == pytest.approx(value.item(), rel=1e-5)
    assert sliced_wasserstein(x[px], y[py], directions=dirs).item() == pytest.approx(
        sliced_wasserstein(x, y, directions=dirs).item(), rel=1e-6
    )


def test_scaling_the_data_scales_the_ascent_value_without_tuning():
    x, y = pair(n=32, d=64)
    base = max_sliced_wasserstein(x, y, generator=gen(0)).item()
    for c in (1e-3, 1e3):
        assert max_sliced_wasserstein(c * x, c * y, generator=gen(0)).item() == pytest.approx(c * base, rel=1e-3)


# --------------------------------------------------------------------------------------------------------- ascent


@pytest.mark.parametrize("seed", range(5))
def test_ascent_is_never_below_random_on_the_same_directions(seed):
    x, y = pair(n=30, d=10, seed=seed)
    dirs = random_directions(10, 25, generator=gen(seed + 100))
    random = max_sliced_wasserstein(x, y, slicing="random", directions=dirs).item()
    ascent = max_sliced_wasserstein(x, y, directions=dirs).item()
    assert ascent >= random * (1 - 1e-6)


def test_ascent_improves_strictly_over_random_on_a_pair_with_structure():
    x, y = pair(n=30, d=10)
    dirs = random_directions(10, 25, generator=gen(100))
    random = max_sliced_wasserstein(x, y, slicing="random", directions=dirs).item()
    assert max_sliced_wasserstein(x, y, directions=dirs).item() > 1.05 * random


@pytest.mark.parametrize("steps", [0, 1, 3, 10])
def test_warm_start_never_returns_less_than_its_starting_direction(steps):
    x, y = pair(n=30, d=10)
    for seed in range(4):
        start = random_directions(10, 1, generator=gen(seed))[0] * 3.0  # any norm: it is renormalised
        xs, ys, proj = as_pot(x, y, start[:, None].T / 3.0)
        at_start = float(pot.sliced.max_sliced_wasserstein_distance(xs, ys, projections=proj))
        value, theta = max_sliced_wasserstein(x, y, ascent_steps=steps, init_direction=start, return_direction=True)
        assert value.item() >= at_start - 1e-5
        if steps == 0:  # no step taken: the warm start itself, not a fresh random draw
            assert value.item() == pytest.approx(at_start, abs=1e-5)
            assert torch.allclose(theta, start / 3.0, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3, 10])
def test_warm_start_at_a_converged_direction_never_drops_even_by_rounding(d):
    # At a (near) max slice every step candidate is worse or equal: only improvements may be taken, and the end
    # value is checked exactly against the start, so the value with steps is never below the value with none.
    for seed in range(4):
        x, y = pair(n=40, d=d, seed=seed)
        _, theta = max_sliced_wasserstein(x, y, generator=gen(0), ascent_steps=50, return_direction=True)
        at_start = max_sliced_wasserstein(x, y, init_direction=theta, ascent_steps=0).item()
        for steps in (1, 3, 10):
            assert max_sliced_wasserstein(x, y, init_direction=theta, ascent_steps=steps).item() >= at_start


# ------------------------------------------------------------------------------------------- gradients and dtypes


@pytest.mark.parametrize("slicing", ["random", "ascent"])
def test_gradient_flows_to_x_and_y_but_not_to_the_direction(slicing):
    x, y = pair(n=30, d=10)
    x.requires_grad_(True)
    y.requires_grad_(True)
    value, theta = max_sliced_wasserstein(x, y, slicing=slicing, generator=gen(0), return_direction=True)
    assert value.requires_grad
    assert not theta.requires_grad and theta.grad_fn is None
    assert theta.shape == (10,) and theta.norm().item() == pytest.approx(1.0, abs=1e-6)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [1, 2, 3])
def test_ascent_gradient_is_that_of_the_fixed_final_slice(p):
    x, y = pair(n=30, d=10)
    x.requires_grad_(True)
    y.requires_grad_(True)
    value, theta = max_sliced_wasserstein(x, y, p=p, generator=gen(0), return_direction=True)
    grad_x, grad_y = torch.autograd.grad(value, (x, y))
    fixed = sliced_wasserstein(x, y, p=p, directions=theta[None])  # one slice: W_p on theta, plain autograd
    expected_x, expected_y = torch.autograd.grad(fixed, (x, y))
    assert value.item() == pytest.approx(fixed.item(), rel=1e-5)
    assert torch.allclose(grad_x, expected_x, atol=1e-6) and torch.allclose(grad_y, expected_y, atol=1e-6)


def test_sliced_gradient_flows():
    x, y = pair(n=30, d=10)
    x.requires_grad_(True)
    sliced_wasserstein(x, y, generator=gen(0)).backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("slicing", ["random", "ascent"])
def test_bf16_under_autocast_gives_the_float32_value(slicing):
    x, y = pair(n=64, d=256)
    xb, yb = x.bfloat16().requires_grad_(True), y.bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = max_sliced_wasserstein(xb, yb, slicing=slicing, generator=gen(0))
        sliced = sliced_wasserstein(xb, yb, generator=gen(0))
    reference = max_sliced_wasserstein(xb.detach().float(), yb.float(), slicing=slicing, generator=gen(0))
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert sliced.dtype == torch.float32
    sliced_reference = sliced_wasserstein(xb.detach().float(), yb.float(), generator=gen(0))
    assert sliced.item() == pytest.approx(sliced_reference.item(), rel=1e-5)
    value.backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ determinism, directions


@pytest.mark.parametrize("slicing", ["random", "ascent"])
def test_deterministic_with_the_same_seeded_generator(slicing):
    x, y = pair(n=30, d=10)
    a, ta = max_sliced_wasserstein(x, y, slicing=slicing, generator=gen(7), return_direction=True)
    b, tb = max_sliced_wasserstein(x, y, slicing=slicing, generator=gen(7), return_direction=True)
    assert a.item() == b.item() and torch.equal(ta, tb)
    # The generator is what draws the random directions. For the ascent they are cold-start candidates beside the
    # difference of the means, which wins on this shifted pair whatever the draw: compare the starts on a pair with
    # no shift (scaled only), where a random candidate wins.
    scaled = (x, (y - 0.5)) if slicing == "ascent" else (x, y)
    steps = {"ascent_steps": 0} if slicing == "ascent" else {}
    _, ta = max_sliced_wasserstein(*scaled, slicing=slicing, generator=gen(7), return_direction=True, **steps)
    _, tc = max_sliced_wasserstein(*scaled, slicing=slicing, generator=gen(8), return_direction=True, **steps)
    assert not torch.equal(ta, tc)
    assert sliced_wasserstein(x, y, generator=gen(7)).item() == sliced_wasserstein(x, y, generator=gen(7)).item()


@pytest.mark.parametrize("slicing", ["random", "ascent"])
def test_given_directions_are_renormalised(slicing):
    x, y = pair()
    dirs = random_directions(x.shape[1], 20, generator=gen(1))
    scales = torch.linspace(0.5, 4.0, 20)[:, None]
    assert max_sliced_wasserstein(x, y, slicing=slicing, directions=dirs * scales).item() == pytest.approx(
        max_sliced_wasserstein(x, y, slicing=slicing, directions=dirs).item(), rel=1e-6
    )
    assert sliced_wasserstein(x, y, directions=dirs * scales).item() == pytest.approx(
        sliced_wasserstein(x, y, directions=dirs).item(), rel=1e-6
    )


def test_random_directions_are_unit_rows_drawn_from_the_generator():
    dirs = random_directions(16, 5, generator=gen(0))
    assert dirs.shape == (5, 16) and dirs.dtype == torch.float32
    assert torch.allclose(dirs.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.equal(dirs, random_directions(16, 5, generator=gen(0)))
    assert not torch.equal(dirs, random_directions(16, 5, generator=gen(1)))
    assert random_directions(16, 5, generator=gen(0), dtype=torch.float64).dtype == torch.float64


# ------------------------------------------------------------------------------------------------------- refusals


def refusal_cases():
    x, y = pair(n=8, d=4)
    return [
        (lambda: max_sliced_wasserstein(x[None], y[None]), r"2-D.*\(1, 8, 4\)"),
        (lambda: sliced_wasserstein(x[:, 0], y[:, 0]), r"2-D.*\(8,\)"),
        (lambda: max_sliced_wasserstein(x, y[:5]), r"same number of samples.*\(8, 4\).*\(5, 4\)"),
        (lambda: sliced_wasserstein(x, y[:5]), r"same number of samples.*\(8, 4\).*\(5, 4\)"),
        (lambda: max_sliced_wasserstein(x, y[:, :3]), r"same number of features.*\(8, 4\).*\(8, 3\)"),
        (lambda: max_sliced_wasserstein(x, y, slicing="power"), r"unknown slicing 'power'"),
        (lambda: max_sliced_wasserstein(x, y, p=0.5), r"p must be .*>= 1"),
        (lambda: sliced_wasserstein(x, y, p=0), r"p must be .*>= 1"),
        (lambda: max_sliced_wasserstein(x, y, n_projections=0), r"n_projections must be .*>= 1"),
        (lambda: sliced_wasserstein(x, y, n_projections=0), r"n_projections must be .*>= 1"),
        (lambda: max_sliced_wasserstein(x, y, ascent_steps=-1), r"ascent_steps must be .*>= 0"),
        (lambda: max_sliced_wasserstein(x, y, directions=torch.randn(4, 3)), r"directions must have shape \(L, 4\)"),
        (lambda: max_sliced_wasserstein(x, y, init_direction=torch.randn(3)), r"init_direction must have shape \(4,\)"),
        (lambda: max_sliced_wasserstein(x, y, init_direction=torch.zeros(4)), r"finite and non-zero"),
    ]


@pytest.mark.parametrize("case", range(len(refusal_cases())))
def test_refusals(case):
    call, message = refusal_cases()[case]
    with pytest.raises(ValueError, match=message):
        call()
