"""LaCoOT against healing: which recipe gives the best model at reduced depth, once the removed model is healed?

One run is one ``recipe`` fine-tuning the real pretrained ``model`` (the embedded ``minilm``: MiniLM, 6 blocks) on
one ``task`` with one ``seed`` (``LaCoOTTrainer``: ``epochs`` at ``learning_rate``, batches of ``batch_size`` lines
of at most ``max_length`` tokens, ``lr_warmup`` and ``weight_decay`` as in ``TrainingArguments``):

* ``plain``: ordinary fine-tuning; blocks scored afterwards by ShortGPT's block influence and by Gromov et al.'s
  angular distance (both reported; the better one after healing is "the best plain scorer");
* ``lacoot``: fine-tuning with the LaCoOT penalty on every block (λ = ``msw_weight``), blocks scored by their MSW;
* ``lacoot_targeted``: the penalty only on the ``max_k`` blocks the angular distance ranks lowest on the *pretrained*
  model (before any fine-tuning), removed in MSW order;
* ``lacoot_warmup``: the penalty on every block, λ ramped from 0 over the first ``msw_warmup_ratio`` of training, so
  that the task is learnt before the blocks are bent towards identities.

Blocks are scored on the first ``scoring_examples`` training examples. For k = 0 .. ``max_k`` blocks removed, the
test accuracy (and the validation accuracy where the task has a validation split: BBC News) without healing and, at
the k of ``healed_k``, after healing by distillation from the recipe's own full model (``hf_collapse.heal(method=
"distill")``, ``heal_epochs``). Scorers that choose the same blocks share their measurements. ``max_train_samples``
and ``max_eval_samples`` (``null``: all) only shrink smoke runs. Tasks: the embedded dialog topics (19 classes of
chat lines) and BBC News topics (5 classes).

Targets (issue 21): at half depth, LaCoOT + healing >= the best plain scorer (chosen on validation accuracy where
there is a validation split) + the same healing + 1 point, on every seed; LaCoOT's full-depth accuracy within 0.5 point
of plain fine-tuning (mean).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .common import mean

VERSION = 1
RECIPES = ("plain", "lacoot", "lacoot_targeted", "lacoot_warmup")
PLAIN_SCORERS = ("block_influence", "angular")
TASK_NAMES = {"dialog_topics": ("dialog topics", "lines"), "bbc_news": ("BBC News topics", "articles")}
LEAD, FULL_DEPTH = 0.01, -0.005  # the targets: healed lead on every seed, full-depth difference of the means


def scorers_of(recipe: str) -> tuple[str, ...]:
    return PLAIN_SCORERS if recipe == "plain" else ("msw",)


def _data(s: dict):
    from transformers import AutoTokenizer

    from hf_collapse.data import embedded_model_path, load_bbc_news, load_dialog_topics, tokenize_text_dataset

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path(s["model"]))
    loader = {"dialog_topics": load_dialog_topics, "bbc_news": load_bbc_news}[s["task"]]
    data = tokenize_text_dataset(loader(), tokenizer, max_length=s["max_length"])
    for split, most in (
        ("train", s["max_train_samples"]),
        ("validation", s["max_eval_samples"]),
        ("test", s["max_eval_samples"]),
    ):
        if most and split in data:
            data[split] = data[split].select(range(min(most, len(data[split]))))
    return data, tokenizer


def _pretrained(model: str, seed: int, num_labels: int):
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_collapse.data import embedded_model_path

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(embedded_model_path(model), num_labels=num_labels)


def _training_arguments(s: dict, folder: str, **extra):
    from hf_collapse.lacoot import LaCoOTArguments

    return LaCoOTArguments(
        folder,
        num_train_epochs=s["epochs"],
        learning_rate=s["learning_rate"],
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=64,
        warmup_steps=s["lr_warmup"],
        weight_decay=s["weight_decay"],
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=s["seed"],
        **extra,
    )


def _penalty(s: dict, num_labels: int, scoring_loader) -> dict:
    """The recipe's LaCoOT arguments: no penalty (plain), on every block, on the targeted blocks, or ramped up."""
    import hf_collapse

    extra = {"msw_weight": 0.0 if s["recipe"] == "plain" else s["msw_weight"]}
    if s["recipe"] == "lacoot_targeted":  # ranked on the pretrained model (seed 0 head), whatever the run's seed
        scores = hf_collapse.score_blocks(
            _pretrained(s["model"], 0, num_labels), scoring_loader, method="angular", progress=False
        )
        extra["msw_blocks"] = ",".join(sorted(scores, key=scores.get)[: s["max_k"]])
    if s["recipe"] == "lacoot_warmup":
        extra["msw_warmup_ratio"] = s["msw_warmup_ratio"]
    return extra


def _heal(s: dict, student, full, data, collator, folder: str):
    from transformers import TrainingArguments

    import hf_collapse

    arguments = TrainingArguments(
        str(Path(folder) / "heal"),
        num_train_epochs=s["heal_epochs"],
        learning_rate=s["learning_rate"],
        per_device_train_batch_size=s["batch_size"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        seed=s["seed"],
    )
    return hf_collapse.heal(student, full, data["train"], method="distill", args=arguments, data_collator=collator)


def _accuracy(trainer, model, dataset=None) -> float:
    """Accuracy on ``dataset`` (default: the trainer's, the test split)."""
    return round(float(trainer.evaluate_model(model, dataset)["eval_accuracy"]), 4)


def _measure(s: dict, trainer, full, order: list[str], data, collator, folder: str, measured: dict) -> dict:
    """``{split: {k: accuracy}}`` of ``full`` with ``order[:k]`` removed, for k = 0 .. max_k, healed at healed_k;
    ``measured`` holds what other scorers of the same run already measured, by the blocks removed."""
    import hf_collapse

    accuracy: dict[str, dict[str, float]] = {}
    splits = ("test", "validation") if "validation" in data else ("test",)
    for k in range(s["max_k"] + 1):
        done = measured.setdefault(tuple(order[:k]), {})
        if not done:
            student = hf_collapse.remove_blocks(full, order[:k]) if k else full
            done.update({split: _accuracy(trainer, student, data[split]) for split in splits})
            if k in s["healed_k"]:
                healed = _heal(s, student, full, data, collator, folder)
                done.update({f"healed_{split}": _accuracy(trainer, healed, data[split]) for split in splits})
        for name, value in done.items():
            accuracy.setdefault(name, {})[str(k)] = value
    return accuracy


def run(s: dict) -> dict:
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    import hf_collapse
    from hf_collapse.data.tasks import accuracy
    from hf_collapse.lacoot import LaCoOTTrainer

    data, tokenizer = _data(s)
    collator = DataCollatorWithPadding(tokenizer)
    num_labels = data["train"].features["label"].num_classes
    scoring = data["train"].select(range(min(s["scoring_examples"], len(data["train"]))))  # never the test split
    scoring_loader = DataLoader(scoring, batch_size=64, collate_fn=collator)
    start = time.perf_counter()
    extra = _penalty(s, num_labels, scoring_loader)
    scorers = {}
    with tempfile.TemporaryDirectory() as folder:
        trainer = LaCoOTTrainer(
            model=_pretrained(s["model"], s["seed"], num_labels),
            args=_training_arguments(s, folder, **extra),
            train_dataset=data["train"],
            eval_dataset=data["test"],
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=accuracy,
        )
        trainer.train()
        full = trainer.model.eval()
        training_seconds = round(time.perf_counter() - start, 1)
        measured: dict[tuple[str, ...], dict[str, float]] = {}
        for scorer in scorers_of(s["recipe"]):
            if scorer == "msw":
                scores = trainer.block_scores(scoring)
            else:
                scores = hf_collapse.score_blocks(full, scoring_loader, method=scorer, progress=False)
            order = sorted(scores, key=scores.get)
            if "msw_blocks" in extra:  # only the penalised blocks are candidates
                order = [name for name in order if name in extra["msw_blocks"].split(",")]
            scorers[scorer] = {
                "removed": order[: s["max_k"]],
                "accuracy": _measure(s, trainer, full, order, data, collator, folder, measured),
            }
    return {
        "classes": num_labels,
        "test_examples": len(data["test"]),
        "blocks": full.config.num_hidden_layers,
        "training_seconds": training_seconds,
        "scorers": scorers,
    }


def smoke(s: dict) -> dict:
    """The same recipe and task on 32 training and 32 held-out examples of 16 tokens, one epoch, one block removed and
    healed."""
    return {
        **s,
        "seed": 0,
        "epochs": 1,
        "max_length": 16,
        "max_train_samples": 32,
        "max_eval_samples": 32,
        "scoring_examples": 32,
        "max_k": 1,
        "healed_k": [1],
    }


# ------------------------------------------------------------------------------------------------ report


def _runs(results, task: str) -> dict[tuple[str, str], dict[int, dict]]:
    """``{(recipe, scorer): {seed: accuracy}}`` of ``task``'s cached runs."""
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for s, r in results:
        if s["task"] == task:
            for scorer, scored in r["scorers"].items():
                runs.setdefault((s["recipe"], scorer), {})[s["seed"]] = scored["accuracy"]
    return runs


def _values(by_seed: dict[int, dict], split: str, k: int) -> dict[int, float]:
    got = {seed: accuracy.get(split, {}).get(str(k)) for seed, accuracy in by_seed.items()}
    return {seed: value for seed, value in got.items() if value is not None}


def _cell(values: dict[int, float], seeds: int, bold: bool = False) -> str:
    if not values:
        return "n/a"
    got = list(values.values())
    average = f"**{mean(got):.3f}**" if bold else f"{mean(got):.3f}"
    cell = f"{average} [{min(got):.3f}-{max(got):.3f}]"
    return cell if len(got) == seeds else f"{cell} ({len(got)} of {seeds} seeds)"


def _settings(results, task: str) -> dict:
    return next(s for s, _ in results if s["task"] == task)


def _tasks(results) -> list[str]:
    return [t for t in TASK_NAMES if any(s["task"] == t for s, _ in results)]


def _decides(runs, names) -> str:
    """The split choices between ``names`` are made on: validation where every one of them has it, else test."""
    return "validation" if all(any("validation" in a for a in runs[n].values()) for n in names) else "test"


def _best(runs, names, k: int) -> tuple[str, str] | None:
    """The one of ``names`` with the best mean healed accuracy at ``k`` blocks removed (on the split that decides)."""
    names = [n for n in names if _values(runs[n], "healed_test", k)]
    if not names:
        return None
    split = f"healed_{_decides(runs, names)}"
    return max(names, key=lambda n: mean(_values(runs[n], split, k).values()))


def _best_plain(runs, k: int):
    return _best(runs, [n for n in runs if n[0] == "plain"], k)


def _comparisons(results, task: str) -> list[dict]:
    """Every LaCoOT recipe against the best plain scorer, seed by seed on the seeds both have: the healed lead at
    max_k and the full-depth difference."""
    runs, k = _runs(results, task), _settings(results, task)["max_k"]
    plain = _best_plain(runs, k)
    if plain is None:
        return []
    out = []
    for name in runs:
        healed, reference = _values(runs[name], "healed_test", k), _values(runs[plain], "healed_test", k)
        seeds = sorted(seed for seed in healed if seed in reference)
        if name[0] == "plain" or not seeds:
            continue
        full, full_reference = _values(runs[name], "test", 0), _values(runs[plain], "test", 0)
        out.append(
            {
                "recipe": name,
                "plain": plain,
                "seeds": seeds,
                "healed": mean(healed[seed] for seed in seeds),
                "plain_healed": mean(reference[seed] for seed in seeds),
                "lead": [healed[seed] - reference[seed] for seed in seeds],
                "full_depth": mean(full[seed] - full_reference[seed] for seed in seeds),
            }
        )
    return out


def _label(s: dict, recipe: str) -> str:
    ramp = "half" if s["msw_warmup_ratio"] == 0.5 else f"{s['msw_warmup_ratio']:.0%}"
    return {
        "plain": "plain fine-tune, best plain scorer",
        "lacoot": f"LaCoOT, λ = {s['msw_weight']:g} from the first step",
        "lacoot_targeted": f"LaCoOT on the {s['max_k']} blocks the pretrained model's angular distance ranks lowest",
        "lacoot_warmup": f"LaCoOT, λ ramped up over the first {ramp} of training "
        f"(`msw_warmup_ratio={s['msw_warmup_ratio']:g}`)",
    }[recipe]


def _plain_label(s: dict, runs, plain: tuple[str, str], columns) -> str:
    """The best plain scorer's row name: which scorer, ``=`` the others that measured the same in ``columns``, how it
    was chosen."""

    def shown(name):
        return [_values(runs[name], *column) for column in columns]

    same = [n for n in runs if n[0] == "plain" and n != plain and shown(n) == shown(plain)]
    scorers = " = ".join(n[1].replace("_", " ") for n in [plain, *same])
    chosen = _decides(runs, [n for n in runs if n[0] == "plain"])
    return f"{_label(s, 'plain')} ({scorers}{', chosen on validation' if chosen == 'validation' else ''})"


def _title(results, task: str) -> str:
    name, unit = TASK_NAMES[task]
    r = next(r for s, r in results if s["task"] == task)
    n = r["test_examples"]
    return f"{name} ({r['classes']} classes, {n} test {unit}: a point is {n / 100:.2g} {unit})"


def _leader(runs, names, split: str, k: int) -> float | None:
    """The best mean accuracy among ``names`` on ``split`` at ``k`` blocks removed."""
    means = [mean(_values(runs[n], split, k).values()) for n in names if _values(runs[n], split, k)]
    return max(means, default=None)


def docs_table(experiment: dict, results: list[tuple[dict, dict]], part: str | None = None) -> str:
    """Per task (``part``: one of them): each recipe at full depth, at ``max_k`` blocks removed, and removed + healed
    (the best plain scorer for plain fine-tuning); the recipe that heals best in bold, with its cells that lead their
    column."""
    tasks = [part] if part else _tasks(results)
    return "\n".join(_docs_task_table(results, task) for task in tasks)


def _docs_task_table(results, task: str) -> str:
    if not any(s["task"] == task for s, _ in results):
        return f"{TASK_NAMES[task][0]}: not run yet\n"
    s, runs = _settings(results, task), _runs(results, task)
    k, blocks = s["max_k"], next(r["blocks"] for t, r in results if t["task"] == task)
    seeds = len({seed for by_seed in runs.values() for seed in by_seed})
    plain = _best_plain(runs, k)
    columns = (("test", 0), ("test", k), ("healed_test", k))
    rows = [(_plain_label(s, runs, plain, columns), plain)] if plain else []
    rows += [(_label(s, recipe), (recipe, "msw")) for recipe in RECIPES[1:] if (recipe, "msw") in runs]
    winner = _best(runs, [n for _, n in rows], k)
    leaders = [_leader(runs, [n for _, n in rows], *column) for column in columns]
    lines = [
        f"| {_title(results, task)} | full depth | {k} of {blocks} removed | {k} removed + healing |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, name in rows:
        cells = []
        for column, leader in zip(columns, leaders):
            values = _values(runs[name], *column)
            cells.append(_cell(values, seeds, bold=name == winner and values and mean(values.values()) == leader))
        lines.append(f"| {f'**{label}**' if name == winner else label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(recipe: str) -> str:
    return {
        "lacoot": "LaCoOT with λ from the first step",
        "lacoot_targeted": "targeted LaCoOT",
        "lacoot_warmup": "LaCoOT with λ ramped up",
    }[recipe]


def headline(experiment: dict, results: list[tuple[dict, dict]]) -> str:
    """The LaCoOT recipe that heals best (chosen on validation where there is one) against the best plain scorer,
    both healed, per task."""
    parts = []
    for task in _tasks(results):
        comparisons = _comparisons(results, task)
        runs, k = _runs(results, task), _settings(results, task)["max_k"]
        best = _best(runs, [c["recipe"] for c in comparisons], k)
        if best is None:
            parts.append(f"{TASK_NAMES[task][0]}: not run yet")
            continue
        c = next(c for c in comparisons if c["recipe"] == best)
        on_validation = _decides(runs, [n for n in runs if n[0] == "plain"]) == "validation"
        # Runs without a validation split (the dialog topics' cached ones) choose on test: said, not hidden.
        chosen = " (scorer chosen on validation)" if on_validation else " (no validation split: scorer chosen on test)"
        parts.append(
            f"{TASK_NAMES[task][0]}{chosen}: {_short(best[0])} {c['healed']:.3f} vs {c['plain_healed']:.3f} healed, "
            f"lead {' / '.join(f'{x * 100:+.1f}' for x in c['lead'])} points, full depth {c['full_depth'] * 100:+.1f}"
        )
    return "; ".join(parts)


def _full_table(results, task: str, split: str) -> list[str]:
    """Every recipe and scorer at every k, on ``split``: mean over seeds [min-max], healed where measured."""
    s, runs = _settings(results, task), _runs(results, task)
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    columns = [(split, 0)]
    for k in range(1, s["max_k"] + 1):
        columns += [(split, k)] + ([(f"healed_{split}", k)] if k in s["healed_k"] else [])
    names = [f"k={k}" + (" healed" if column.startswith("healed") else "") for column, k in columns]
    lines = [
        f"**{task}**: {split} accuracy, mean over seeds {seeds} [min-max], after removing k blocks (healed: + "
        f"{s['heal_epochs']:g} epoch of distillation from the recipe's own full model)",
        "",
        "| recipe (scorer) | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for recipe in RECIPES:
        for scorer in scorers_of(recipe):
            by_seed = runs.get((recipe, scorer), {})
            cells = [_cell(_values(by_seed, *column), len(seeds)) if by_seed else "not run yet" for column in columns]
            lines.append(f"| {recipe} ({scorer}) | " + " | ".join(cells) + " |")
    return lines + [""]


def _verdicts(results, task: str) -> list[str]:
    lines = []
    runs = _runs(results, task)
    chosen = _decides(runs, [n for n in runs if n[0] == "plain"])
    for c in _comparisons(results, task):
        (recipe, scorer), (_, plain) = c["recipe"], c["plain"]
        every_seed = all(x >= LEAD for x in c["lead"])
        lines.append(
            f"* {task}: {recipe} ({scorer}) + healing vs plain ({plain}) + healing (chosen on {chosen} accuracy): "
            f"test accuracy lead on seeds {c['seeds']} {', '.join(f'{x * 100:+.1f}' for x in c['lead'])} points, "
            f"mean {mean(c['lead']) * 100:+.1f} (target >= +{LEAD * 100:g} on every seed: "
            f"{'met' if every_seed else 'missed'}); full depth {c['full_depth'] * 100:+.1f} points (target >= "
            f"{FULL_DEPTH * 100:g}: {'met' if c['full_depth'] >= FULL_DEPTH else 'missed'})"
        )
    return lines + [""]


def report(experiment: dict, results: list[tuple[dict, dict]], out: Path) -> str:
    lines = [f"# {experiment['name']}", "", experiment.get("description", ""), ""]
    for task in _tasks(results):
        s = _settings(results, task)
        lines += [
            f"## {TASK_NAMES[task][0]}",
            "",
            f"{s['epochs']:g} epochs of lines of at most {s['max_length']} tokens, lr {s['learning_rate']:g}, "
            f"batch {s['batch_size']}; blocks scored on {s['scoring_examples']} training examples.",
            "",
            _docs_task_table(results, task),
        ]
        runs = _runs(results, task)
        for split in ("test", "validation") if _decides(runs, list(runs)) == "validation" else ("test",):
            lines += _full_table(results, task, split)
        lines += _verdicts(results, task)
    _plot(results, out / f"{experiment['name']}.png")
    lines.append(f"![LaCoOT recipes against plain fine-tuning, with and without healing]({experiment['name']}.png)")
    return "\n".join(lines) + "\n"


def _plot(results, path: Path) -> None:
    """Mean test accuracy against blocks removed, one panel per task: each recipe (and plain scorer) without healing
    (solid) and healed (dashed, same colour), drawn once every seed of the task has the point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _tasks(results)
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), dpi=110, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        s, runs = _settings(results, task), _runs(results, task)
        seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
        blocks = next(r["blocks"] for t, r in results if t["task"] == task)

        def curve(by_seed, split, ks, seeds=seeds):
            points = [(k, _values(by_seed, split, k)) for k in ks]
            return [(k, mean(v.values())) for k, v in points if len(v) == len(seeds)]

        for index, recipe in enumerate(RECIPES):
            for offset, scorer in enumerate(scorers_of(recipe)):
                by_seed, colour = runs.get((recipe, scorer), {}), f"C{index * 2 + offset}"
                removed = curve(by_seed, "test", range(s["max_k"] + 1))
                healed = removed[:1] + curve(by_seed, "healed_test", sorted(s["healed_k"]))
                for points, style, label in ((removed, "o-", f"{recipe} ({scorer})"), (healed, "s--", "  + healing")):
                    if len(points) > 1:
                        axis.plot(*zip(*points), style, color=colour, label=label)
        axis.set_xticks(range(s["max_k"] + 1))
        axis.set_xlabel(f"blocks removed (of {blocks})")
        axis.set_ylabel(f"test accuracy, mean of seeds {', '.join(map(str, seeds))}")
        axis.set_title(f"MiniLM on {task}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
