"""Max-sliced Wasserstein: POT's random slicing against hf_collapse's ascent, value and time side by side.

POT's ``ot.sliced.max_sliced_wasserstein_distance`` takes the max over 50 random directions; in high dimension
that is close to the average slice. ``hf_collapse.ot.max_sliced_wasserstein`` (default ``slicing="ascent"``)
climbs to a max slice. On a shifted and scaled pair (x ~ N(0, I), y = 2 x' + 0.5 with x' an independent sample)
at several (n, d), three calls run interleaved, repeat after repeat, so machine noise hits them alike:

* POT on float64 numpy inputs, as POT is normally used;
* POT on the same float32 torch tensors as ours (POT's torch backend: torch randn and matmul): the like-for-like
  comparison a torch user makes, and the reference of the target;
* ours on float32 torch tensors, default arguments (the difference of the means and 4 random cold starts,
  2 ascent steps).

Both comparisons are printed, value ratio and time ratio (ours / POT). Target (n=128, d=16384), like-for-like:
ours finds >= 10x POT's value in <= POT's time. Torch and BLAS threads are left at their defaults. Each timed call
is preceded by a short sleep (``--gap``): numpy's OpenBLAS workers and torch's OpenMP workers keep spinning for a
while after a call, and on a small machine a call timed right after another would be charged for those spinning
threads. Run with ``OMP_WAIT_POLICY=PASSIVE`` on a shared machine.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_msw.py [--sizes 128x256,128x4096,128x16384,512x4096 --repeats 11]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_collapse.ot import max_sliced_wasserstein  # noqa: E402

TARGET = {"n": 128, "d": 16384, "min_value_ratio": 10.0, "max_time_ratio": 1.0, "reference": "pot_torch"}


def timed(fn, gap: float):
    time.sleep(gap)  # let the other library's spinning worker threads (OpenBLAS, OpenMP) go idle first
    start = time.perf_counter()
    value = fn()
    return float(value), time.perf_counter() - start


def bench(n: int, d: int, repeats: int, warmup: int, n_projections: int, seed: int, gap: float) -> dict:
    rng = np.random.default_rng(seed)
    x64 = rng.standard_normal((n, d))
    y64 = 2.0 * rng.standard_normal((n, d)) + 0.5
    x32, y32 = x64.astype(np.float32), y64.astype(np.float32)
    xt, yt = torch.from_numpy(x32), torch.from_numpy(y32)

    def pot(xs, ys, r):
        return ot.sliced.max_sliced_wasserstein_distance(xs, ys, n_projections=n_projections, seed=r)

    def ours(r):
        return max_sliced_wasserstein(xt, yt, generator=torch.Generator().manual_seed(r))  # defaults

    runs = {"pot_f64": [], "pot_torch": [], "ours": []}
    for r in range(-warmup, repeats):  # interleaved; the first `warmup` rounds are discarded
        round_ = {
            "pot_f64": timed(lambda r=r: pot(x64, y64, r + warmup), gap),
            "pot_torch": timed(lambda r=r: pot(xt, yt, r + warmup), gap),
            "ours": timed(lambda r=r: ours(r + warmup), gap),
        }
        if r >= 0:
            for key, run in round_.items():
                runs[key].append(run)

    out = {"n": n, "d": d}
    for key, values_times in runs.items():
        values, times = zip(*values_times)
        out[key] = {
            "value_median": statistics.median(values),
            "value_min": min(values),
            "value_max": max(values),
            "time_median_s": statistics.median(times),
            "times_s": list(times),
        }
    for ref in ("pot_f64", "pot_torch"):
        out[f"vs_{ref}"] = {
            "value_ratio": out["ours"]["value_median"] / out[ref]["value_median"],
            "time_ratio": out["ours"]["time_median_s"] / out[ref]["time_median_s"],
            # per-round time ratios: both calls ran in the same round, so this spread is the noise that matters
            "time_ratio_rounds": sorted(o / p for (_, o), (_, p) in zip(runs["ours"], runs[ref])),
        }
    out["mean_shift_bound"] = 0.5 * d**0.5  # W_2 along the all-ones direction from the mean shift alone
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128x256,128x4096,128x16384,512x4096", help="comma-separated NxD")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--projections", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gap",
        type=float,
        default=0.3,
        help="seconds of sleep before each timed call, so that numpy's OpenBLAS threads and torch's "
        "OpenMP threads, which spin for a while after work, do not steal each other's cores",
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_msw.json"))
    args = parser.parse_args()

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    rows = [bench(n, d, args.repeats, args.warmup, args.projections, args.seed, args.gap) for n, d in sizes]

    print(
        f"max-sliced W2, shifted and scaled pair (x ~ N(0,I), y = 2x' + 0.5); median of {args.repeats} interleaved "
        f"repeats; POT = ot.sliced.max_sliced_wasserstein_distance, {args.projections} random projections, on float64 "
        "numpy (f64) and on our float32 torch tensors (torch); ours = hf_collapse.ot.max_sliced_wasserstein "
        "defaults on float32 torch; ratios are ours / POT"
    )
    header = (
        f"{'n':>5} {'d':>6} | {'POT f64':>8} {'POT torch':>9} {'ours':>7} | {'POT f64 ms':>10} "
        f"{'POT torch ms':>12} {'ours ms':>8} | {'vs f64: value':>13} {'time':>6} | {'vs torch: value':>15} "
        f"{'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        f64, tch = row["vs_pot_f64"], row["vs_pot_torch"]
        print(
            f"{row['n']:>5} {row['d']:>6} | {row['pot_f64']['value_median']:>8.3f} "
            f"{row['pot_torch']['value_median']:>9.3f} {row['ours']['value_median']:>7.2f} | "
            f"{row['pot_f64']['time_median_s'] * 1e3:>10.1f} {row['pot_torch']['time_median_s'] * 1e3:>12.1f} "
            f"{row['ours']['time_median_s'] * 1e3:>8.1f} | {f64['value_ratio']:>12.1f}x {f64['time_ratio']:>5.2f}x | "
            f"{tch['value_ratio']:>14.1f}x {tch['time_ratio']:>5.2f}x"
        )

    target_row = next((r for r in rows if (r["n"], r["d"]) == (TARGET["n"], TARGET["d"])), None)
    verdict = None
    if target_row is not None:
        like = target_row["vs_pot_torch"]
        value_ratio, time_ratio = like["value_ratio"], like["time_ratio"]
        value_ok = value_ratio >= TARGET["min_value_ratio"]
        time_ok = time_ratio <= TARGET["max_time_ratio"]
        verdict = {"value_ok": value_ok, "time_ok": time_ok, "met": value_ok and time_ok}
        time_note = "met" if time_ok else f"MISSED by {time_ratio / TARGET['max_time_ratio']:.2f}x"
        rounds = like["time_ratio_rounds"]
        print(
            f"\ntarget at n={TARGET['n']}, d={TARGET['d']}, like for like (POT given the same float32 torch tensors): "
            f"ours >= {TARGET['min_value_ratio']:g}x POT's value in <= {TARGET['max_time_ratio']:g}x its time -> "
            f"value {value_ratio:.1f}x ({'met' if value_ok else 'MISSED'}), time {time_ratio:.2f}x ({time_note}; "
            f"per-round ratios {rounds[0]:.2f}x .. {rounds[-1]:.2f}x)"
        )
        f64 = target_row["vs_pot_f64"]
        print(f"  against POT on float64 numpy: value {f64['value_ratio']:.1f}x, time {f64['time_ratio']:.2f}x")
    print(
        f"  timing: {args.gap:g} s of sleep before each timed call (see --gap); "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )

    result = {
        "benchmark": "max-sliced Wasserstein: POT random slicing vs hf_collapse ascent",
        "data": "x ~ N(0, I), y = 2 x' + 0.5, x' independent N(0, I); numpy default_rng(seed)",
        "pot": f"ot.sliced.max_sliced_wasserstein_distance(n_projections={args.projections}), POT {ot.__version__}",
        "ours": "hf_collapse.ot.max_sliced_wasserstein defaults (slicing='ascent': mean-shift + 4 random starts, "
        "2 ascent steps)",
        "time_ratio_reference": "target: pot_torch (POT on the same float32 torch tensors); also reported: pot_f64",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "gap_s": args.gap,
        "target": TARGET,
        "target_verdict": verdict,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
