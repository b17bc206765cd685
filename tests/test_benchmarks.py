"""Benchmarks as data (``benchmarks/run.py``): an experiment file expands to its runs, each cached under a hash of all
of its settings (a changed setting is a new run, an unchanged one is never run twice), the report and the docs
tables are regenerated from the cache, and every experiment file smoke-runs on a tiny configuration, so that a
benchmark broken by a library change is seen here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "benchmarks" / "experiments").glob("*.json"))


@pytest.fixture
def runner(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_runner", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture
def toy_kind(monkeypatch):
    """A kind that records its calls: result = twice the setting ``x``."""
    kind = types.ModuleType("kinds.toy_double")
    kind.VERSION, kind.calls = 1, []

    def run(settings):
        kind.calls.append(settings["x"])
        return {"y": 2 * settings["x"]}

    kind.run = run
    kind.smoke = lambda settings: {**settings, "x": 0}
    kind.report = lambda experiment, results, out: f"{len(results)} runs\n"

    def docs_table(experiment, results, part=None):
        rows = sorted(results, key=lambda p: p[0]["x"])
        if part == "largest":
            return f"largest y: {rows[-1][1]['y']}\n"
        return "| x | y |\n" + "".join(f"| {s['x']} | {r['y']} |\n" for s, r in rows)

    kind.docs_table = docs_table
    kind.headline = lambda experiment, results: f"y up to {max(r['y'] for _, r in results)}"
    monkeypatch.setitem(sys.modules, "kinds.toy_double", kind)
    return kind


def test_every_experiment_file_expands_to_distinct_runs_keyed_by_all_their_settings(runner):
    assert EXPERIMENTS, "benchmarks/experiments holds the experiment files"
    for path in EXPERIMENTS:
        experiment = runner.load_experiment(path)
        runs = runner.expand(experiment)
        keys = [runner.run_key(s) for s in runs]
        assert len(set(keys)) == len(runs) > 0
        assert all(s["kind"] == experiment["kind"] and "kind_version" in s for s in runs)
        changed = {**experiment, "base": {**experiment.get("base", {}), "batch_size": 7}}
        assert not set(keys) & {runner.run_key(s) for s in runner.expand(changed)}  # nothing stale is reused


def test_the_cache_runs_each_configuration_once_and_the_docs_tables_come_from_it(runner, toy_kind, tmp_path):
    experiment = {"name": "toy", "kind": "toy_double", "base": {"x": 1}, "grids": [{"x": [1, 2, 3]}, {"x": [3]}]}
    results = runner.run_experiment(experiment, tmp_path / "cache", jobs=1, fresh=False, smoke=False)
    assert sorted(toy_kind.calls) == [1, 2, 3] and sorted(r["y"] for _, r in results) == [2, 4, 6]
    runner.run_experiment(experiment, tmp_path / "cache", jobs=1, fresh=False, smoke=False)
    assert sorted(toy_kind.calls) == [1, 2, 3]  # all cached
    experiment["grids"].append({"x": [4]})
    results = runner.run_experiment(experiment, tmp_path / "cache", jobs=1, fresh=False, smoke=False)
    assert sorted(toy_kind.calls) == [1, 2, 3, 4]
    sibling = {**experiment, "name": "sibling", "grids": [{"x": [2, 5]}]}  # x=2 was measured by "toy"
    runner.run_experiment(sibling, tmp_path / "sibling", jobs=1, fresh=False, smoke=False)
    assert sorted(toy_kind.calls) == [1, 2, 3, 4, 5]
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("before\n<!-- benchmark: toy -->\nstale table\n<!-- end benchmark -->\nafter\n")
    runner.ROOT = tmp_path
    (tmp_path / "README.md").write_text("no markers\n")
    runner.write_report(experiment, results, tmp_path)
    table = "| x | y |\n| 1 | 2 |\n| 2 | 4 |\n| 3 | 6 |\n| 4 | 8 |\n"
    assert page.read_text() == f"before\n<!-- benchmark: toy -->\n{table}<!-- end benchmark -->\nafter\n"
    assert (tmp_path / "toy.md").read_text() == "4 runs\n"


def test_parts_of_an_experiment_the_summary_table_and_imported_results_are_regenerated_from_the_cache(
    runner, toy_kind, tmp_path
):
    """One page may show one part of an experiment (``name:part``); the summary table of docs/benchmarks.md has one
    row per experiment file with a ``summary``, from its cache; a result the runner did not measure (imported from
    the script an experiment replaced) is marked in the summary and named in the report."""
    runner.HERE, runner.ROOT, runner.RESULTS = tmp_path, tmp_path, tmp_path / "results"
    experiment = {
        "name": "toy",
        "kind": "toy_double",
        "summary": {"measures": "twice x", "target": "y = 2x"},
        "grids": [{"x": [1, 2]}],
    }
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "toy.json").write_text(json.dumps(experiment))
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("no markers\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "<!-- benchmark: toy:largest -->\nstale\n<!-- end benchmark -->\n"
        "<!-- benchmark: summary -->\nstale\n<!-- end benchmark -->\n"
    )
    cache = runner.RESULTS / "cache" / "toy"
    runner.run_experiment(experiment, cache, jobs=1, fresh=False, smoke=False)
    assert toy_kind.calls == [1, 2]
    imported = cache / f"{runner.run_key(runner.expand(experiment)[1])}.json"
    record = json.loads(imported.read_text())
    imported.write_text(json.dumps({**record, "provenance": "measured by an old script"}))

    assert runner.main([str(tmp_path / "experiments" / "toy.json"), "--check_docs"]) == 1  # the page is stale
    assert runner.main([str(tmp_path / "experiments" / "toy.json"), "--report_only"]) == 0
    text = page.read_text()
    assert "<!-- benchmark: toy:largest -->\nlargest y: 4\n<!-- end benchmark -->" in text
    assert "| `toy.json` | twice x | y up to 4 † | y = 2x |" in text and "† measured (with the same settings)" in text
    assert (
        "1 of these results were not measured by this runner: measured by an old script"
        in (runner.RESULTS / "toy.md").read_text()
    )
    assert runner.main([str(tmp_path / "experiments" / "toy.json"), "--check_docs"]) == 0
    assert toy_kind.calls == [1, 2]  # reporting never runs anything


def test_a_timed_kind_runs_alone_whatever_jobs_says(runner, toy_kind, tmp_path, monkeypatch):
    toy_kind.TIMED = True
    used = []
    monkeypatch.setattr(runner, "ProcessPoolExecutor", lambda **kwargs: used.append(kwargs))
    experiment = {"name": "toy", "kind": "toy_double", "grids": [{"x": [1, 2, 3]}]}
    runner.run_experiment(experiment, tmp_path / "cache", jobs=2, fresh=False, smoke=False)
    assert used == [] and toy_kind.calls == [1, 2, 3]


def test_the_docs_tables_of_every_experiment_are_what_its_cache_gives():
    """A docs table between benchmark markers is what ``run.py --report_only`` regenerates from the committed cache
    (``--check_docs`` compares without writing)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *map(str, EXPERIMENTS), "--check_docs"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_smoke_runs_on_a_tiny_configuration(path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), str(path), "--smoke"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "smoke run of" in done.stdout
