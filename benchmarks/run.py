"""One runner for benchmarks written as data: experiment files in, a result cache, tables and plots out.

An experiment file (``benchmarks/experiments/<name>.json``) names a *kind* (the code that runs one configuration,
``benchmarks/kinds/<kind>.py``), the settings every run shares (``base``) and one or more ``grids`` (each a mapping
of setting -> list of values, expanded as a product). Every expanded run is the whole of its settings, kind
included; its result is cached under ``benchmarks/results/cache/<experiment>/<hash of those settings>.json``, so a
changed setting never reuses a stale result and an interrupted run continues where it stopped; a run another
experiment already cached with the very same settings is copied, not run again. After running, the
kind's report turns the cached results into ``benchmarks/results/<experiment>.md`` (and plots), and every docs page
holding the markers ``<!-- benchmark: <experiment> -->`` ... ``<!-- end benchmark -->`` gets that table regenerated.

    python benchmarks/run.py benchmarks/experiments/trady_regimes.json [--jobs 2] [--report_only] [--fresh]
    python benchmarks/run.py benchmarks/experiments/*.json --smoke   # every experiment on a tiny configuration

A page may show one part of an experiment's results (``<!-- benchmark: <experiment>:<part> -->``, the kind's
``docs_table(experiment, results, part)``), and ``<!-- benchmark: summary -->`` holds one row per experiment file
that declares a ``summary`` (what it measures, its target) with the kind's ``headline`` of its cached results: the
table of docs/benchmarks.md; ``<!-- benchmark: headlines -->`` the same headlines for the files with a ``readme``
line: the README's table. A cached result may carry a ``provenance`` (where it was measured when not by this
runner, e.g. imported from the script an experiment replaced); the report says so, and ``--fresh`` measures it again.

A kind that times things declares ``TIMED = True``: its runs never share the machine with each other
(``--jobs`` does not apply to them).

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
import shutil
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


def reuse_across_experiments(runs: list[dict], cache: Path) -> None:
    """Copy into ``cache`` the results another experiment's cache holds for the very same settings (the key is the
    hash of all of them): a baseline shared by two experiments is measured once."""
    for settings in runs:
        name = f"{run_key(settings)}.json"
        if not (cache / name).is_file():
            for other in sorted(cache.parent.glob(f"*/{name}")):
                if json.loads(other.read_text())["settings"] == settings:
                    shutil.copyfile(other, cache / name)
                    break


def run_experiment(experiment: dict, cache: Path, jobs: int, fresh: bool, smoke: bool) -> list[tuple[dict, dict]]:
    module = kind_module(experiment["kind"])
    runs = expand(experiment)
    if smoke:  # one run per distinct setting combination the kind cares about, at its smallest size
        runs = list({run_key(module.smoke(s)): module.smoke(s) for s in runs}.values())
    cache.mkdir(parents=True, exist_ok=True)
    if not fresh:
        reuse_across_experiments(runs, cache)
    todo = [s for s in runs if fresh or not (cache / f"{run_key(s)}.json").is_file()]
    print(f"{experiment['name']}: {len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to run", flush=True)
    if getattr(module, "TIMED", False):  # a kind that times things runs alone, on every core
        jobs = 1
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


MARKER = re.compile(r"(<!-- benchmark: ([\w-]+)(?::([\w-]+))? -->\n).*?(<!-- end benchmark -->)", flags=re.DOTALL)


def docs_pages_out_of_date(experiment: dict, results: list[tuple[dict, dict]], write: bool) -> list[Path]:
    """The docs pages whose tables between ``experiment``'s markers are not the ones ``results`` give (rewritten
    when ``write``)."""
    module = kind_module(experiment["kind"])

    def table(match: re.Match) -> str:
        if match.group(2) != experiment["name"]:
            return match.group(0)
        part = match.group(3)
        body = module.docs_table(experiment, results, part) if part else module.docs_table(experiment, results)
        return match.group(1) + body + match.group(4)

    return _rewrite_pages(table, write)


def _rewrite_pages(table, write: bool) -> list[Path]:
    stale = []
    for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        content = page.read_text()
        updated = MARKER.sub(table, content)
        if updated != content:
            stale.append(page)
            if write:
                page.write_text(updated)
    return stale


def cached_records(experiment: dict) -> list[tuple[dict, dict]]:
    """The cached ``(settings, record)`` of ``experiment``'s runs (those not run yet left out); a record holds the
    ``result`` and, for a result this runner did not measure, its ``provenance``."""
    cache = RESULTS / "cache" / experiment["name"]
    found = [(s, cache / f"{run_key(s)}.json") for s in expand(experiment)]
    return [(s, json.loads(path.read_text())) for s, path in found if path.is_file()]


def cached_results(experiment: dict) -> list[tuple[dict, dict]]:
    """The cached ``(settings, result)`` of ``experiment``'s runs (those not run yet left out)."""
    return [(s, record["result"]) for s, record in cached_records(experiment)]


def provenances(records: list[tuple[dict, dict]]) -> dict[str, int]:
    """How many of ``records`` each non-runner provenance accounts for."""
    counts: dict[str, int] = {}
    for _, record in records:
        if origin := record.get("provenance"):
            counts[origin] = counts.get(origin, 0) + 1
    return counts


def summary_table(table: str = "summary") -> str:
    """A table of every experiment file's headline, from the cache: ``"summary"`` (docs/benchmarks.md: one row per
    file with a ``summary``: what it measures, the result, the target) or ``"headlines"`` (the README: one row per
    file with a ``readme`` line saying what was measured)."""
    header = ["| experiment | measures | result | target |", "| --- | --- | --- | --- |"]
    lines = header if table == "summary" else ["| what | measured |", "| --- | --- |"]
    imported = False
    for path in sorted((HERE / "experiments").glob("*.json")):
        experiment = load_experiment(path)
        if (table == "summary" and "summary" not in experiment) or (table != "summary" and "readme" not in experiment):
            continue
        records = cached_records(experiment)
        results = [(settings, record["result"]) for settings, record in records]
        headline = kind_module(experiment["kind"]).headline(experiment, results) if results else "not run yet"
        if provenances(records):
            headline, imported = headline + " †", True
        if table == "summary":
            summary = experiment["summary"]
            lines.append(f"| `{path.name}` | {summary['measures']} | {headline} | {summary['target']} |")
        else:
            lines.append(f"| {experiment['readme']} | {headline} |")
    if imported:
        lines.append(
            "\n† measured (with the same settings) by the script the experiment replaced, before the runner existed; "
            "the experiment's report (`benchmarks/results/<experiment>.md`) names the commit."
        )
    return "\n".join(lines) + "\n"


def summary_pages_out_of_date(write: bool) -> list[Path]:
    tables = {name: summary_table(name) for name in ("summary", "headlines")}
    return _rewrite_pages(
        lambda m: m.group(1) + tables[m.group(2)] + m.group(4) if m.group(2) in tables else m.group(0),
        write,
    )


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
    imported = provenances(cached_records(experiment)) if out == RESULTS else {}
    for origin, count in imported.items():
        text += (
            f"\n{count} of these results were not measured by this runner: {origin}. `--fresh` measures them again.\n"
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
            results = cached_results(experiment)
            if missing := len(expand(experiment)) - len(results):
                print(f"{experiment['name']}: {missing} runs not cached; reporting the {len(results)} others")
        else:
            results = run_experiment(experiment, cache, args.jobs, args.fresh, smoke=False)
        if args.check_docs:
            stale = docs_pages_out_of_date(experiment, results, write=False) if results else []
            if stale:
                print(f"{experiment['name']}: the tables of {[str(p.relative_to(ROOT)) for p in stale]} are stale")
                return 1
            continue
        print(write_report(experiment, results, RESULTS))
    if args.smoke:
        return 0
    stale = summary_pages_out_of_date(write=not args.check_docs)
    if args.check_docs and stale:
        print(f"summary: the table of {[str(p.relative_to(ROOT)) for p in stale]} is stale")
        return 1
    for page in stale:
        print(f"  regenerated the summary table in {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
