"""One runner for benchmarks written as data: experiment files in, a result cache, tables and plots out.

An experiment file (``benchmarks/experiments/<name>.json``) names a *kind* (the code that runs one configuration,
``benchmarks/kinds/<kind>.py``), the settings every run shares (``base``) and one or more ``grids`` (each a mapping
of setting -> list of values, expanded as a product). Every expanded run is the whole of its settings, kind
included; its result is cached under ``benchmarks/results/cache/<experiment>/<hash of those settings>.json``, so a
changed setting never reuses a stale result and an interrupted run continues where it stopped. After running, the
kind's report turns the cached results into ``benchmarks/results/<experiment>.md`` (and plots), and every docs page
holding the markers ``<!-- benchmark: <experiment> -->`` ... ``<!-- end benchmark -->`` gets that table regenerated.

    python benchmarks/run.py benchmarks/experiments/trady_regimes.json [--jobs 2] [--report_only] [--fresh]
    python benchmarks/run.py benchmarks/experiments/*.json --smoke   # every experiment on a tiny configuration

``--smoke`` runs each kind's smallest configuration of every grid point kind (one per distinct kind setting
combination, a few seconds each) in a scratch cache and writes nothing under ``benchmarks/results``: what the tests
run, so that a benchmark broken by a library change is seen in CI rather than months later.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def load_experiment(path: Path) -> dict:
    experiment = json.loads(Path(path).read_text())
    for key in ("name", "kind", "grids"):
        if key not in experiment:
            raise ValueError(f"{path}: an experiment file needs {key!r}")
    return experiment


def expand(experiment: dict) -> list[dict]:
    """Every run of ``experiment``: its base settings updated by each point of each grid (duplicates once)."""
    runs, seen = [], set()
    version = getattr(kind_module(experiment["kind"]), "VERSION", 1)
    for grid in experiment["grids"]:
        names = list(grid)
        for values in itertools.product(*(grid[n] if isinstance(grid[n], list) else [grid[n]] for n in names)):
            point = dict(zip(names, values))
            settings = {"kind": experiment["kind"], "kind_version": version, **experiment.get("base", {}), **point}
            key = run_key(settings)
            if key not in seen:
                seen.add(key)
                runs.append(settings)
    return runs


def run_key(settings: dict) -> str:
    """The cache key of a run: a hash of all of its settings (the kind and the kind's version included)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def kind_module(name: str):
    return importlib.import_module(f"kinds.{name}")


def _run_one(settings: dict, cache: str, threads: int) -> tuple[str, float]:
    import torch

    torch.set_num_threads(threads)
    module = kind_module(settings["kind"])
    start = time.perf_counter()
    result = module.run(settings)
    path = Path(cache) / f"{run_key(settings)}.json"
    path.write_text(json.dumps({"settings": settings, "result": result}, indent=1, default=float) + "\n")
    return run_key(settings), time.perf_counter() - start


def run_experiment(experiment: dict, cache: Path, jobs: int, fresh: bool, smoke: bool) -> list[tuple[dict, dict]]:
    module = kind_module(experiment["kind"])
    runs = expand(experiment)
    if smoke:  # one run per distinct setting combination the kind cares about, at its smallest size
        runs = list({run_key(module.smoke(s)): module.smoke(s) for s in runs}.values())
    cache.mkdir(parents=True, exist_ok=True)
    todo = [s for s in runs if fresh or not (cache / f"{run_key(s)}.json").is_file()]
    print(f"{experiment['name']}: {len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to run", flush=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_run_one, s, str(cache), threads) for s in todo]
            for number, future in enumerate(futures, start=1):
                key, seconds = future.result()
                print(f"  [{number}/{len(todo)}] {key} {seconds:.0f} s", flush=True)
    else:
        for number, settings in enumerate(todo, start=1):
            key, seconds = _run_one(settings, str(cache), threads)
            print(f"  [{number}/{len(todo)}] {describe(settings)} {seconds:.0f} s", flush=True)
    return [(s, json.loads((cache / f"{run_key(s)}.json").read_text())["result"]) for s in runs]


def describe(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items() if k not in ("kind", "kind_version"))


def docs_pages_out_of_date(experiment: dict, results: list[tuple[dict, dict]], write: bool) -> list[Path]:
    """The docs pages whose table between ``experiment``'s markers is not the one ``results`` give (rewritten when
    ``write``)."""
    module = kind_module(experiment["kind"])
    pattern = re.compile(
        rf"(<!-- benchmark: {re.escape(experiment['name'])} -->\n).*?(<!-- end benchmark -->)", flags=re.DOTALL
    )
    stale = []
    for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        content = page.read_text()
        updated = pattern.sub(lambda m: m.group(1) + module.docs_table(experiment, results) + m.group(2), content)
        if updated != content:
            stale.append(page)
            if write:
                page.write_text(updated)
    return stale


def write_report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    """The kind's report of ``results``: ``<out>/<name>.md`` (and its plots), and the docs tables regenerated."""
    text = kind_module(experiment["kind"]).report(experiment, results, out)
    missing = len(expand(experiment)) - len(results)
    if missing:
        text += (
            f"\n{missing} of the experiment's {missing + len(results)} runs are not run yet: "
            f"`python benchmarks/run.py benchmarks/experiments/{experiment['name']}.json` runs them (the others are "
            "cached).\n"
        )
    (out / f"{experiment['name']}.md").write_text(text)
    for page in docs_pages_out_of_date(experiment, results, write=True):
        print(f"  regenerated the table in {page.relative_to(ROOT)}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", type=Path)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; threads split among them)")
    parser.add_argument("--fresh", action="store_true", help="run again even what is cached")
    parser.add_argument("--report_only", action="store_true", help="regenerate tables and plots from the cache")
    parser.add_argument("--smoke", action="store_true", help="each experiment on a tiny configuration, nothing kept")
    parser.add_argument(
        "--check_docs",
        action="store_true",
        help="exit 1 when a docs table is not what the cache gives (writes nothing)",
    )
    args = parser.parse_args(argv)
    for path in args.experiments:
        experiment = load_experiment(path)
        if args.smoke:
            with tempfile.TemporaryDirectory() as scratch:
                results = run_experiment(experiment, Path(scratch) / "cache", 1, True, smoke=True)
                kind_module(experiment["kind"]).report(experiment, results, Path(scratch))
            print(f"{experiment['name']}: smoke run of {len(results)} configurations passed")
            continue
        cache = RESULTS / "cache" / experiment["name"]
        if args.report_only or args.check_docs:
            runs = expand(experiment)
            missing = [s for s in runs if not (cache / f"{run_key(s)}.json").is_file()]
            if missing:
                print(f"{experiment['name']}: {len(missing)} of {len(runs)} runs not cached; reporting the others")
            results = [
                (s, json.loads((cache / f"{run_key(s)}.json").read_text())["result"]) for s in runs if s not in missing
            ]
        else:
            results = run_experiment(experiment, cache, args.jobs, args.fresh, smoke=False)
        if args.check_docs:
            stale = docs_pages_out_of_date(experiment, results, write=False) if results else []
            if stale:
                print(f"{experiment['name']}: the tables of {[str(p.relative_to(ROOT)) for p in stale]} are stale")
                return 1
            continue
        print(write_report(experiment, results, RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
