"""Depth compression of a real decoder LM, measured the way the field measures it: SmolLM2-135M-Instruct (30 blocks),
calibrated and healed on one corpus (A: BBC News), measured on its held-out test articles *and on text of other
kinds* (B: English Wikipedia sections, C: chat lines), and on zero-shot tasks (lm-eval-harness: the next sentence
among four and the last word of a passage, built from the held-out text of A and B).

Every run measures perplexity on ``eval_windows`` test windows of ``max_length`` tokens of A, B and C, and on as many
validation windows of A (the only windows a decision may look at), with the parameters and forward FLOPs. Its
``part`` says what it measures:

* ``removal``: ``blocks`` blocks removed by ``search`` through :func:`hf_collapse.prune`: ``block_influence``
  (ShortGPT) and ``loss`` (one-shot SLEB), scored once on ``calibration_windows`` windows of A; ``sleb`` (re-scored
  after each removal) on ``search_windows``, ``sleb_same_data`` on ``calibration_windows``, ``sleb+newsgroups`` on
  half A, half Usenet posts; ``span`` (PruneMe's contiguous span) on ``calibration_windows``;
* ``sublayers``: BlockPruner's attention / MLP sub-layers (``search`` ``blockpruner`` by loss, or
  ``blockpruner_per_flop`` by loss increase per FLOP) on ``search_windows``, stopped at the first state with no more
  FLOPs than ``blocks`` blocks removed;
* ``heal``: the model with ``removed`` (unit names in removal order, as a search's ``removed`` lists them; ``[]``: the
  uncompressed model, the reference of the same training without removal) healed by ``heal``: ``none``, ``linear``
  (ReplaceMe's least squares; ``linear-cosine``: its cosine objective) fitted on 16 batches, or ``lora`` /
  ``distill`` / ``lora-distill`` trained for ``heal_minutes`` of wall time; on up to ``training_windows`` windows of
  A's training articles, or with ``+newsgroups`` / ``+wiki`` half A, half Usenet posts / Wikipedia training
  sections. Also measures the zero-shot tasks (``task_items`` items each);
* ``command``: ``hf-collapse prune --num_units <blocks> --heal <heal>`` on BBC News end to end, timed as a user runs
  it (a subprocess; ``options`` are extra flags).

The removal healed is chosen on A's validation windows (the report says whether the healed ``removed`` still is the
best of the block searches there). Targets (issue 20, 8 of 30 blocks removed, 2 CPU cores): healed in <= 10 minutes
on A, perplexity on B <= 1.5x the original's and <= 1.3x on A, zero-shot accuracy retained >= 95%; training-free
(scoring + linear map) <= 2.0x on both corpora; the best scorer beats one-shot loss at 4 and 8 blocks; sub-layer
removal at the same FLOPs beats block removal; the command with --heal linear <= 5 minutes.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

VERSION = 1
TIMED = True  # heals on a wall-clock budget, search and command times
CORPORA = ("A bbc_news", "B wiki", "C chat")
#: the general text mixed into calibration or healing: the corpus of each name
GENERAL = {"newsgroups": "groups", "wiki": "wiki"}
#: fitted on this many batches (of 8 windows of 128 tokens: 16k tokens for 576 x 576 maps)
LINEAR_CALIBRATION_BATCHES = 16
#: the search a smoke run of each stands for (the same code path)
SMOKE_SEARCHES = {"block_influence": "loss", "sleb": "sleb+newsgroups", "sleb_same_data": "sleb+newsgroups"}
SMOKE_COMMAND = ["--calibration_windows", "2", "--heal_windows", "2", "--eval_windows", "2", "--max_length", "16"]
SMOKE_COMMAND += ["--generate_tokens", "2", "--latency_repeats", "1", "--eval_datasets", "wiki"]


# ---------------------------------------------------------------------------------------------------- measuring


@functools.lru_cache(maxsize=1)
def _corpora() -> dict:
    from hf_collapse.data import load_bbc_news, load_dialog_topics, load_newsgroups, load_wiki

    return {"news": load_bbc_news(), "wiki": load_wiki(), "chat": load_dialog_topics(), "groups": load_newsgroups()}


def _windows(s: dict, corpus: str, split: str, count: int):
    from hf_collapse.data import lm_windows

    from .smollm2_depth import smollm2

    tokenizer = smollm2(s["model"])[1]
    return lm_windows(_corpora()[corpus][split]["text"], tokenizer, max_length=s["max_length"], max_windows=count)


def _half_and_half(s: dict, general: str, half: int):
    """``half`` windows of A's training articles and ``half`` of ``general``'s training text (``newsgroups``: Usenet
    posts, ``wiki``: Wikipedia sections), shuffled together."""
    from hf_collapse.data import mixed_lm_windows

    from .smollm2_depth import smollm2

    parts = [(_corpora()["news"]["train"]["text"], half), (_corpora()[GENERAL[general]]["train"]["text"], half)]
    return mixed_lm_windows(parts, smollm2(s["model"])[1], s["max_length"])


def _loader(windows):
    from torch.utils.data import DataLoader

    return DataLoader(windows, batch_size=8)


@functools.lru_cache(maxsize=2)
def _evaluation(model: str, max_length: int, eval_windows: int) -> tuple[dict, object, dict]:
    """(the test windows of A, B, C; A's validation windows; the one-window probe the FLOPs are counted on)."""
    s = {"model": model, "max_length": max_length}
    tests = {
        name: _loader(_windows(s, corpus, "test", eval_windows))
        for name, corpus in zip(CORPORA, ("news", "wiki", "chat"))
    }
    probe = {"input_ids": next(iter(tests["A bbc_news"]))["input_ids"][:1]}
    return tests, _loader(_windows(s, "news", "validation", eval_windows)), probe


def _measure(m, s: dict, with_tasks: bool = False) -> dict:
    import tempfile

    from hf_collapse.data.zero_shot_tasks import write_tasks
    from hf_collapse.lm_evaluation import primary_metric, zero_shot
    from hf_collapse.metrics import count_parameters, forward_flops, perplexity

    from .smollm2_depth import smollm2

    tests, validation, probe = _evaluation(s["model"], s["max_length"], s["eval_windows"])
    result = {name: round(perplexity(m, loader), 3) for name, loader in tests.items()}
    result["A validation"] = round(perplexity(m, validation), 3)
    result.update(params=count_parameters(m), flops=forward_flops(m, probe))
    result["original_blocks"] = smollm2(s["model"])[0].config.num_hidden_layers
    if with_tasks:
        with tempfile.TemporaryDirectory(prefix="llm_depth_tasks_") as folder:
            tasks = []
            # No item may share its passage with text any run calibrates, searches or heals on.
            fitted = [text for corpus in ("news", *GENERAL.values()) for text in _corpora()[corpus]["train"]["text"]]
            for corpus, prefix in (("news", "bbc_news"), ("wiki", "wiki")):
                texts = _corpora()[corpus]["test"]["text"]
                tasks += write_tasks(folder, texts, prefix=prefix, num_items=s["task_items"], exclude=fitted)
            scores = zero_shot(m, smollm2(s["model"])[1], tasks, batch_size=8)
        result["tasks"] = {task: round(primary_metric(metrics)[1], 4) for task, metrics in scores.items()}
    return result


def _calibration(s: dict):
    """The calibration windows of a search: ``search_windows`` for SLEB and BlockPruner (half of them Usenet posts
    for ``sleb+newsgroups``), ``calibration_windows`` for the one-shot scorers, the span and ``sleb_same_data``."""
    search = s["search"]
    if search == "sleb+newsgroups":
        return _loader(_half_and_half(s, "newsgroups", s["search_windows"] // 2))
    count = s["search_windows"] if search == "sleb" or search.startswith("blockpruner") else s["calibration_windows"]
    return _loader(_windows(s, "news", "train", count))


def _removal(s: dict) -> dict:
    import hf_collapse

    from .smollm2_depth import smollm2

    start = time.perf_counter()
    method = s["search"].removesuffix("_same_data").removesuffix("+newsgroups")
    smaller, report = hf_collapse.prune(
        smollm2(s["model"])[0], _calibration(s), method=method, num_units=s["blocks"], latency_repeats=0, progress=False
    )
    return {
        **_measure(smaller, s),
        "search_seconds": round(time.perf_counter() - start, 1),
        "removed": [step.unit for step in report.kept_steps[1:]],
    }


def _sublayers(s: dict) -> dict:
    """BlockPruner's sub-layer search until its FLOPs are at most those of ``blocks`` blocks removed: its first state
    at or under them."""
    import hf_collapse
    from hf_collapse.metrics import forward_flops

    from .smollm2_depth import rebuild_removal, smollm2

    model = smollm2(s["model"])[0]
    probe = _evaluation(s["model"], s["max_length"], s["eval_windows"])[2]
    target = forward_flops(hf_collapse.remove_blocks(model, [f"model.layers.{i}" for i in range(s["blocks"])]), probe)
    start = time.perf_counter()
    _, report = hf_collapse.prune(
        model,
        _calibration(s),
        method="blockpruner",
        per_flop=s["search"] == "blockpruner_per_flop",
        flops_fraction=(target + 0.5) / forward_flops(model, probe),
        latency_repeats=0,
        progress=False,
        example_inputs=probe,
    )
    search_seconds = round(time.perf_counter() - start, 1)
    steps = report.steps[1:]
    removed = [step.unit for step in steps[: next(i + 1 for i, step in enumerate(steps) if step.flops <= target)]]
    return {**_measure(rebuild_removal(model, removed), s), "search_seconds": search_seconds, "removed": removed}


def _heal(s: dict) -> dict:
    from transformers import default_data_collator

    import hf_collapse

    from .smollm2_depth import rebuild_removal, smollm2, train_heal

    model = smollm2(s["model"])[0]
    student = rebuild_removal(model, s["removed"])
    if s["heal"] == "none":
        return _measure(student, s, with_tasks=True)
    kind, mix = s["heal"].partition("+")[::2]
    if mix:  # as many windows of A as the general corpus gives (the 20 Newsgroups sample: a few hundred)
        half = len(_windows(s, GENERAL[mix], "train", s["training_windows"] // 2))
        data = _half_and_half(s, mix, half)
    else:
        data = _windows(s, "news", "train", s["training_windows"])
    if kind.startswith("linear"):
        healed = hf_collapse.heal(
            student,
            model,
            data,
            method="linear",
            data_collator=default_data_collator,
            calibration_batches=LINEAR_CALIBRATION_BATCHES,
            objective="cosine" if kind == "linear-cosine" else "lstsq",
        )
        return _measure(healed.eval(), s, with_tasks=True)
    healed, steps = train_heal(student, model, data, kind, s["heal_minutes"])
    return {**_measure(healed, s, with_tasks=True), "steps": steps}


def _command(s: dict) -> dict:
    import subprocess
    import sys
    import tempfile

    import hf_collapse

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        cli = Path(sys.executable).with_name("hf-collapse")
        argv = [str(cli), "prune", "--model", s["model"], "--dataset", "bbc_news", "--num_units", str(s["blocks"])]
        argv += ["--heal", s["heal"], "--output_dir", folder, "--disable_tqdm", "true", *s["options"]]
        subprocess.run(argv, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        report = hf_collapse.CollapseReport.load(Path(folder) / "report")
    return {"command_seconds": round(seconds, 1), "evaluations": {e.name: e.values for e in report.evaluations}}


def run(s: dict) -> dict:
    import torch

    torch.manual_seed(0)
    start = time.perf_counter()
    result = {"removal": _removal, "sublayers": _sublayers, "heal": _heal, "command": _command}[s["part"]](s)
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def smoke(s: dict) -> dict:
    """One block (or one unit) on 2 windows of 16 tokens, zero-shot tasks of 4 items, heals of a second, and one run per
    code path: one-shot scoring, an iterative search on mixed calibration text, the span, BlockPruner; no heal, the
    linear map on mixed text, a training heal (the real SmolLM2: loading it and the corpora is most of the time)."""
    small = {"max_length": 16, "eval_windows": 2, "blocks": 1, "calibration_windows": 2, "search_windows": 2}
    small.update(task_items=4, training_windows=32, heal_minutes=0.02, options=SMOKE_COMMAND)
    shrunk = {**s, **{key: value for key, value in small.items() if key in s}}
    if s["part"] == "removal":
        shrunk["search"] = SMOKE_SEARCHES.get(s["search"], s["search"])
    if s["part"] == "sublayers":  # the slowest search: every sub-layer re-scored at each of its steps
        shrunk["search_windows"] = 1
    if s["part"] == "heal":
        linear = s["heal"].startswith("linear")
        shrunk["removed"] = s["removed"][:1] if linear else []
        shrunk["heal"] = s["heal"] if linear else s["heal"].partition("+")[0]
    return shrunk


# ---------------------------------------------------------------------------------------------------- reporting


def _points(results, part: str) -> list[tuple[dict, dict]]:
    return [(s, r) for s, r in results if s["part"] == part]


def _uncompressed(results) -> dict | None:
    return next((r for s, r in _points(results, "heal") if not s["removed"] and s["heal"] == "none"), None)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _bold(text: str, best: bool) -> str:
    return f"**{text}**" if best else text


def _ratio_cell(r: dict, corpus: str, reference: dict | None) -> str:
    if reference is None:
        return _number(r[corpus])
    return f"{_number(r[corpus])} ({r[corpus] / reference[corpus]:.2f}x)"


def _kept(r: dict, base: dict | None) -> float | None:
    """The mean share of each zero-shot task's accuracy (of ``base``) that ``r`` retains."""
    if base is None or "tasks" not in r:
        return None
    return sum(r["tasks"][t] / base["tasks"][t] for t in base["tasks"]) / len(base["tasks"])


def _search_label(s: dict, removed_counts: dict[int, int]) -> str:
    cw, sw = s.get("calibration_windows"), s["search_windows"]
    counts = " / ".join(str(removed_counts[k]) for k in sorted(removed_counts))
    return {
        "block_influence": f"block influence (ShortGPT), one shot ({cw} windows)",
        "loss": f"loss, one shot ({cw} windows)",
        "sleb": f"SLEB (loss re-scored after each removal), {sw} windows",
        "sleb_same_data": f"SLEB on the one-shot loss's {cw} windows",
        "sleb+newsgroups": f"SLEB on {sw // 2} windows of A + {sw // 2} of Usenet posts",
        "span": "span (PruneMe: closest consecutive blocks by angular distance)",
        "blockpruner": f"BlockPruner (loss), same FLOPs ({counts} sub-layers), {sw} windows",
        "blockpruner_per_flop": f"BlockPruner per FLOP (loss increase per parameter removed), same FLOPs ({counts} "
        f"sub-layers), {sw} windows",
    }[s["search"]]


def _heal_label(heal: str) -> str:
    kind, mix = heal.partition("+")[::2]
    name = {
        "none": "none",
        "linear": "linear (ReplaceMe, least squares) fitted on A",
        "linear-cosine": "linear (ReplaceMe, cosine objective) fitted on A",
        "lora": "LoRA on A",
        "distill": "distillation from the original's logits on A",
        "lora-distill": "LoRA distilling the original's logits on A",
    }[kind]
    return name + (f" + {mix}" if mix else "") + (", training-free" if kind.startswith("linear") else "")


def _removal_name(results, removed: list[str]) -> str:
    """The search whose removal ``removed`` is (its name and block count), or its unit count."""
    for s, r in _points(results, "removal") + _points(results, "sublayers"):
        if r["removed"] == removed:
            return f"{s['search']}, {s['blocks']} blocks"
    return f"{len(removed)} units"


def _removes(by_point: dict, search: str, k: int) -> set[str] | None:
    point = by_point.get((search, k))
    return None if point is None else set(point[1]["removed"])


def _scorer_table(results) -> str:
    removals = _points(results, "removal") + _points(results, "sublayers")
    if not removals:
        return "Removal alone: not run yet.\n"
    ks = sorted({s["blocks"] for s, _ in removals})
    depth = removals[0][1]["original_blocks"]
    by_point = {(s["search"], s["blocks"]): (s, r) for s, r in removals}
    best = {(k, c): min(r[c] for s, r in removals if s["blocks"] == k) for k in ks for c in CORPORA}
    lines = [
        "| scorer | " + " | ".join(f"{k} of {depth} blocks removed" for k in ks) + f" | search ({ks[-1]} blocks) |",
        "| --- | " + " | ".join("---" for _ in ks) + " | ---: |",
    ]
    searches = list(dict.fromkeys(s["search"] for s, _ in removals))
    for search in searches:
        points = {k: by_point[(search, k)] for k in ks if (search, k) in by_point}
        cells = []
        for k in ks:
            if k not in points:
                cells.append("not run yet")
                continue
            r = points[k][1]
            cell = " / ".join(_bold(_number(r[c]), r[c] == best[(k, c)]) for c in CORPORA)
            same = next(
                (
                    o
                    for o in searches[: searches.index(search)]
                    if _removes(by_point, o, k) == _removes(by_point, search, k)
                ),
                None,
            )
            cells.append(cell + (f" (the same {k} blocks as {same})" if same else ""))
        settings = points[max(points)][0]
        seconds = points.get(ks[-1], (None, {}))[1].get("search_seconds")
        label = _search_label(settings, {k: len(r["removed"]) for k, (_, r) in points.items()})
        lines.append(f"| {label} | {' | '.join(cells)} | {'' if seconds is None else f'{seconds:,.0f} s'} |")
    return "\n".join(lines) + "\n"


def _healing_table(results) -> str:
    heals = _points(results, "heal")
    base = _uncompressed(results)
    compressed = [(s, r) for s, r in heals if s["removed"]]
    if not compressed:
        return "Healing: not run yet.\n"
    references = [(s, r) for s, r in heals if not s["removed"] and s["heal"] != "none"]
    several = len({tuple(s["removed"]) for s, _ in compressed}) > 1
    minutes = {s["heal_minutes"] for s, _ in heals if "heal_minutes" in s}
    steps_header = f"steps in {minutes.pop():g} min" if len(minutes) == 1 else "steps"
    best = {c: min(r[c] for _, r in compressed) for c in CORPORA}
    kept = {id(r): _kept(r, base) for _, r in heals}
    best_kept = max((kept[id(r)] for _, r in compressed if kept[id(r)] is not None), default=None)
    lines = [
        f"| healing | A (healing text) | B Wikipedia | C chat | tasks kept | {steps_header} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def line(label: str, r: dict, bold: bool) -> None:
        cells = [_bold(_ratio_cell(r, c, base), bold and r[c] == best[c]) for c in CORPORA]
        share = kept[id(r)]
        cells.append("" if share is None else _bold(f"{share:.1%}", bold and share == best_kept))
        cells.append(str(r.get("steps", "")))
        lines.append(f"| {label} | {' | '.join(cells)} |")

    for s, r in compressed:
        line((f"{_removal_name(results, s['removed'])}: " if several else "") + _heal_label(s["heal"]), r, True)
    for s, r in references:
        line(f"*reference*: the uncompressed model given {_heal_label(s['heal'])}, nothing removed", r, False)
    return "\n".join(lines) + "\n"


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    tables = {"scorers": _scorer_table, "healing": _healing_table}
    if part is not None:
        return tables[part](results)
    return "\n".join(table(results) for table in tables.values())


def _short_heal(heal: str) -> str:
    kind, mix = heal.partition("+")[::2]
    name = {"linear": "linear map", "linear-cosine": "cosine linear map", "lora-distill": "LoRA distilling"}
    mixed = {"newsgroups": " + Usenet posts", "wiki": " + Wikipedia"}
    return name.get(kind, kind.capitalize() if kind == "distill" else "LoRA") + " on A" + mixed.get(mix, "")


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    base = _uncompressed(results)
    parts = []
    for s, r in _points(results, "heal"):
        if s["removed"] and s["heal"] != "none" and base is not None:
            ratios = ", ".join(f"{c.split()[0]} {r[c] / base[c]:.2f}x" for c in CORPORA)
            parts.append(f"{_short_heal(s['heal'])}: {ratios}, tasks {_kept(r, base):.1%} kept")
    removals = _points(results, "removal")
    for k in sorted({s["blocks"] for s, _ in removals}):
        scores = {s["search"]: r["A bbc_news"] for s, r in removals if s["blocks"] == k}
        top = min(scores, key=scores.get)
        parts.append(f"at {k} blocks {top} {scores[top]:.1f} vs one-shot loss {scores.get('loss', float('nan')):.1f}")
    subs = _points(results, "sublayers")
    if subs:
        at = ", ".join(f"{r['A bbc_news']:.1f} at {s['blocks']}" for s, r in subs)
        parts.append(f"sub-layers at the same FLOPs {at}")
    for s, r in _points(results, "command"):
        parts.append(f"`prune --heal {s['heal']}` {r['command_seconds'] / 60:.1f} min")
    return "; ".join(parts) if parts else "not run yet"


def _full_table(results) -> list[str]:
    """Every run: perplexity (x over the original, or over the identically trained reference), tasks kept, FLOPs
    ratio, wall time."""
    base = _uncompressed(results)
    lines = [
        "| setting | removed | "
        + " | ".join(f"ppl {c} (x)" for c in CORPORA)
        + " | tasks kept | FLOPs ratio | wall s |",
        "| --- | ---: | " + " | ".join("---:" for _ in CORPORA) + " | ---: | ---: | ---: |",
    ]

    def line(name: str, r: dict, units: int, reference: dict | None) -> None:
        kept = _kept(r, base)
        flops = "" if base is None else f"{base['flops'] / r['flops']:.2f}"
        cells = " | ".join(_ratio_cell(r, c, reference) for c in CORPORA)
        lines.append(
            f"| {name} | {units} | {cells} | {'' if kept is None else f'{kept:.1%}'} | {flops} | {r['seconds']:.0f} |"
        )

    heals = _points(results, "heal")
    references = {s["heal"]: r for s, r in heals if not s["removed"] and s["heal"] != "none"}
    for s, r in heals:
        if not s["removed"]:
            line("uncompressed" + ("" if s["heal"] == "none" else f" + {s['heal']} (reference)"), r, 0, base)
    for s, r in sorted(_points(results, "removal") + _points(results, "sublayers"), key=lambda p: p[0]["blocks"]):
        name = s["search"] + (" (same FLOPs)" if s["part"] == "sublayers" else "")
        line(name, r, s["blocks"] if s["part"] == "removal" else len(r["removed"]), base)
    for s, r in heals:
        if s["removed"]:
            removal = _removal_name(results, s["removed"])
            line(
                f"{removal}, " + ("all measures" if s["heal"] == "none" else f"heal {s['heal']}"),
                r,
                len(s["removed"]),
                base,
            )
            if s["heal"] in references:
                line(
                    f"  same vs identically trained uncompressed ({s['heal']})",
                    r,
                    len(s["removed"]),
                    references[s["heal"]],
                )
    return lines


def _task_table(results) -> list[str]:
    measured = [(s, r) for s, r in _points(results, "heal") if "tasks" in r]
    if not measured:
        return []
    tasks = list(measured[0][1]["tasks"])
    lines = ["| model | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for s, r in measured:
        name = _removal_name(results, s["removed"]) if s["removed"] else "uncompressed"
        name += "" if s["heal"] == "none" else f" + {s['heal']}"
        lines.append(f"| {name} | " + " | ".join(f"{r['tasks'][t]:.2f}" for t in tasks) + " |")
    return lines


def _verdicts(results) -> list[str]:
    base = _uncompressed(results)
    lines = []
    for s, r in _points(results, "heal"):
        if not s["removed"] or s["heal"] == "none" or base is None:
            continue
        b_target = (
            "B's kind mixed into healing: not a measure of unseen text"
            if s["heal"].endswith("+wiki")
            else f"target <= 1.5{', training-free <= 2.0' if s['heal'].startswith('linear') else ''}"
        )
        lines.append(
            f"- {_removal_name(results, s['removed'])} + {s['heal']}: A x{r['A bbc_news'] / base['A bbc_news']:.2f} "
            f"(target <= 1.3), B x{r['B wiki'] / base['B wiki']:.2f} ({b_target}), tasks kept {_kept(r, base):.1%} "
            "(target >= 95%)"
        )
    removals, subs = _points(results, "removal"), _points(results, "sublayers")
    for k in sorted({s["blocks"] for s, _ in removals}):
        scores = {s["search"]: r["A bbc_news"] for s, r in removals if s["blocks"] == k}
        top = min(scores, key=scores.get)
        loss = scores.get("loss", float("nan"))
        line = f"- {k} removed: best scorer {top} {scores[top]:.1f} vs one-shot loss {loss:.1f}"
        for s, r in subs:
            if s["blocks"] == k and base is not None:
                line += (
                    f"; sub-layers ({s['search']}) at the same FLOPs {r['A bbc_news']:.1f} "
                    f"(FLOPs x{base['flops'] / r['flops']:.2f})"
                )
        lines.append(line)
    for s, r in _points(results, "command"):
        lines.append(
            f"- `hf-collapse prune --num_units {s['blocks']} --heal {s['heal']}`: {r['command_seconds'] / 60:.1f} min "
            "(target <= 5)"
        )
    return lines


def _choice(results) -> str:
    """Whether the removal healed is the block search the validation windows choose at its block count."""
    healed = {tuple(s["removed"]) for s, _ in _points(results, "heal") if s["removed"]}
    removals = _points(results, "removal")
    if not healed or not removals:
        return ""
    lines = []
    for removed in sorted(healed, key=len):
        candidates = [(s, r) for s, r in removals if s["blocks"] == len(removed)]
        if not candidates:
            continue
        ranked = sorted(candidates, key=lambda p: p[1]["A validation"])
        chosen = ranked[0][1]["removed"] == list(removed)
        listing = ", ".join(f"{s['search']} {r['A validation']:.1f}" for s, r in ranked)
        lines.append(
            f"The {len(removed)}-block removal healed is {_removal_name(results, list(removed))}: "
            + ("the best" if chosen else "**not** the best")
            + f" of the block searches on A's validation windows ({listing})."
        )
    return "\n".join(lines) + "\n\n"


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    base = _uncompressed(results)
    text = f"# {experiment['name']}\n\n{experiment.get('description', '')}\n\n"
    if base is not None:
        text += f"Original: perplexity {', '.join(f'{c} {base[c]:.1f}' for c in CORPORA)}.\n\n"
    text += "## Removal alone\n\nPerplexity on A / B / C (test windows); search time.\n\n" + _scorer_table(results)
    text += "\n## Healing\n\n" + _choice(results) + _healing_table(results)
    text += "\n## Every run\n\nPerplexity (x: over the original, or over the identically trained reference); tasks "
    text += "kept: mean share of each zero-shot task's accuracy retained.\n\n" + "\n".join(_full_table(results)) + "\n"
    tasks = _task_table(results)
    if tasks:
        text += "\nZero-shot accuracy of each task:\n\n" + "\n".join(tasks) + "\n"
    verdicts = _verdicts(results)
    if verdicts:
        text += "\n## Targets\n\n" + "\n".join(verdicts) + "\n"
    return text
