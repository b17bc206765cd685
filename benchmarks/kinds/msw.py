"""Max-sliced Wasserstein: POT's random slicing against hf_collapse's ascent, value and time side by side.

POT's ``ot.sliced.max_sliced_wasserstein_distance`` takes the max over ``projections`` random directions; in high
dimension that is close to the average slice. ``hf_collapse.ot.max_sliced_wasserstein`` (default
``slicing="ascent"``) climbs to a max slice. On a shifted and scaled pair (x ~ N(0, I), y = 2 x' + 0.5 with x' an
independent sample, numpy ``default_rng(seed)``) of ``n`` points in ``d`` dimensions, three calls run interleaved,
``warmup`` discarded rounds and then ``repeats`` timed ones, so that machine noise hits them alike:

* POT on float64 numpy inputs, as POT is normally used;
* POT on the same float32 torch tensors as ours (POT's torch backend): the like-for-like comparison a torch user
  makes, and the reference of the target;
* ours on float32 torch tensors, default arguments (the difference of the means and 4 random cold starts, the
  default number of ascent steps).

Each timed call is preceded by ``gap`` seconds of sleep: numpy's OpenBLAS workers and torch's OpenMP workers keep
spinning for a while after a call, and a call timed right after another would be charged for them. Run with
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine (it is read when torch loads, so it is recorded, not set).

Target (n=128, d=16384), like for like: ours finds >= 10x POT's value in <= POT's time (median of the rounds).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

VERSION = 1
TARGET = {"n": 128, "d": 16384, "min_value_ratio": 10.0, "max_time_ratio": 1.0}
CALLS = ("pot_f64", "pot_torch", "ours")
REFERENCES = ("pot_f64", "pot_torch")


def _timed(fn, gap: float) -> tuple[float, float]:
    """``(value, seconds)`` of ``fn()``, after ``gap`` seconds of sleep that let the other library's threads idle."""
    time.sleep(gap)
    start = time.perf_counter()
    value = fn()
    return float(value), time.perf_counter() - start


def _environment() -> dict:
    import os
    import platform

    import numpy as np
    import ot
    import torch

    from hf_collapse.ot import ASCENT_STEPS

    return {
        "pot": ot.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ours_ascent_steps": ASCENT_STEPS,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "processor": platform.processor() or platform.machine(),
    }


def run(s: dict) -> dict:
    import numpy as np
    import ot
    import torch

    from hf_collapse.ot import max_sliced_wasserstein

    rng = np.random.default_rng(s["seed"])
    x64 = rng.standard_normal((s["n"], s["d"]))
    y64 = 2.0 * rng.standard_normal((s["n"], s["d"])) + 0.5
    xt, yt = torch.from_numpy(x64.astype(np.float32)), torch.from_numpy(y64.astype(np.float32))

    def pot(xs, ys, r):
        return ot.sliced.max_sliced_wasserstein_distance(xs, ys, n_projections=s["projections"], seed=r)

    calls = {
        "pot_f64": lambda r: pot(x64, y64, r),
        "pot_torch": lambda r: pot(xt, yt, r),
        "ours": lambda r: max_sliced_wasserstein(xt, yt, generator=torch.Generator().manual_seed(r)),  # defaults
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CALLS}
    for r in range(s["warmup"] + s["repeats"]):  # interleaved; the first `warmup` rounds are discarded
        round_ = {name: _timed(lambda call=call, r=r: call(r), s["gap"]) for name, call in calls.items()}
        if r >= s["warmup"]:
            for name, measured in round_.items():
                runs[name].append(measured)
    return {**_summary(runs, s["d"]), "environment": _environment()}


def _summary(runs: dict[str, list[tuple[float, float]]], d: int) -> dict:
    """Median value and time of each call, and ours / each POT call (per-round time ratios: both calls ran in the same
    round, so their spread is the noise that matters)."""
    out = {}
    for name, measured in runs.items():
        values, times = zip(*measured)
        out[name] = {
            "value_median": statistics.median(values),
            "value_min": min(values),
            "value_max": max(values),
            "time_median_s": statistics.median(times),
            "times_s": list(times),
        }
    for ref in REFERENCES:
        out[f"vs_{ref}"] = {
            "value_ratio": out["ours"]["value_median"] / out[ref]["value_median"],
            "time_ratio": out["ours"]["time_median_s"] / out[ref]["time_median_s"],
            "time_ratio_rounds": sorted(o / p for (_, o), (_, p) in zip(runs["ours"], runs[ref])),
        }
    out["mean_shift_bound"] = 0.5 * d**0.5  # W_2 along the all-ones direction from the mean shift alone
    return out


def smoke(s: dict) -> dict:
    return {**s, "n": 16, "d": 64, "repeats": 2, "warmup": 0, "gap": 0.0}


# ------------------------------------------------------------------------------------------------ report


def _sorted(results):
    return sorted(results, key=lambda pair: (pair[0]["n"], pair[0]["d"]))


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    lines = [
        "| n | d | POT f64 | POT torch | ours | POT f64 ms | POT torch ms | ours ms | vs f64: value | time | "
        "vs torch: value | time (per-round range) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s, r in _sorted(results):
        f64, tch = r["vs_pot_f64"], r["vs_pot_torch"]
        values = " | ".join(f"{r[c]['value_median']:.3f}" for c in CALLS)
        times = " | ".join(f"{r[c]['time_median_s'] * 1e3:.1f}" for c in CALLS)
        rounds = tch["time_ratio_rounds"]
        lines.append(
            f"| {s['n']} | {s['d']} | {values} | {times} | {f64['value_ratio']:.1f}x | {f64['time_ratio']:.2f}x | "
            f"{tch['value_ratio']:.1f}x | {tch['time_ratio']:.2f}x ({rounds[0]:.2f}x-{rounds[-1]:.2f}x) |"
        )
    return "\n".join(lines) + "\n"


def _target(results) -> dict | None:
    return next((r for s, r in results if (s["n"], s["d"]) == (TARGET["n"], TARGET["d"])), None)


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    row = _target(results)
    if row is None:
        return f"n={TARGET['n']}, d={TARGET['d']} not run yet"
    tch, f64 = row["vs_pot_torch"], row["vs_pot_f64"]
    return (
        f"{tch['value_ratio']:.1f}x POT's value in {tch['time_ratio']:.2f}x its time (float64 numpy POT: "
        f"{f64['value_ratio']:.1f}x in {f64['time_ratio']:.2f}x)"
    )


def _verdict(results) -> str:
    row = _target(results)
    if row is None:
        return f"Target (n={TARGET['n']}, d={TARGET['d']}): not run yet.\n"
    like = row["vs_pot_torch"]
    value_ok = like["value_ratio"] >= TARGET["min_value_ratio"]
    time_ok = like["time_ratio"] <= TARGET["max_time_ratio"]
    return (
        f"Target at n={TARGET['n']}, d={TARGET['d']}, like for like (POT given the same float32 torch tensors): ours "
        f">= {TARGET['min_value_ratio']:g}x POT's value in <= {TARGET['max_time_ratio']:g}x its time -> value "
        f"{like['value_ratio']:.1f}x ({'met' if value_ok else 'missed'}), time {like['time_ratio']:.2f}x "
        f"({'met' if time_ok else 'missed'}).\n"
    )


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    settings, result = _sorted(results)[0]
    env = result["environment"]
    return (
        f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n"
        f"Median of {settings['repeats']} interleaved rounds (after {settings['warmup']} discarded); values are the "
        f"max-sliced W2 each call returns, ratios are ours / POT; POT {env['pot']} with {settings['projections']} "
        f"random projections, ours with {env['ours_ascent_steps']} ascent steps.\n\n"
        f"{docs_table(experiment, results)}\n{_verdict(results)}\n"
        f"Timing: {settings['gap']:g} s of sleep before each timed call; torch {env['torch']}, "
        f"{env['torch_threads']} torch threads, {env['cpu_count']} CPUs ({env['processor']}), "
        f"OMP_WAIT_POLICY={env['omp_wait_policy'] or 'unset'}.\n"
    )
