"""Depth compression of a real decoder LM, measured the way the field measures it: SmolLM2-135M-Instruct (30 blocks),
calibrated and healed on one corpus (A: BBC News), measured on its held-out articles *and on text of other kinds*
(B: English Wikipedia sections, C: chat lines) and on zero-shot tasks (lm-eval-harness: next sentence among four and
LAMBADA-style last word, built from the held-out text of A and B).

Rows:

* removal, 4 and 8 blocks, with the field's scorers in one API (:func:`hf_collapse.prune`): one-shot
  block_influence (ShortGPT) and loss (one-shot SLEB), SLEB proper (re-scored after each removal), PruneMe's
  contiguous span, and BlockPruner's attention / MLP sub-layers stopped at the same FLOPs as the block removal;
* healing of the best 8-block removal (best perplexity on A's *validation* windows: the choice is never made on the
  test text the rows report), each method at most ``--heal_minutes`` of
  wall time: linear maps (least squares, on A or on A and general text; ReplaceMe's cosine objective), LoRA on A's
  language-model loss, distillation from the original's logits on A, and both with general text mixed in (half the
  windows): Usenet posts (``+newsgroups``: a kind of text none of A, B, C is, so that B stays text the model never
  saw) or Wikipedia training sections (``+wiki``: B's own kind, shown for what mixing the very kind of text measured
  gives, not a measure of generality); LoRA and LoRA + newsgroups beside the uncompressed model given the identical
  training (their reference: what the same training does without any removal). Distillation's reference is the
  original itself (a model distilled from itself does not move); ``--long_heal HEAL MINUTES``: one heal given a
  longer budget;
* ``hf-collapse prune --heal linear`` end to end, timed (a subprocess, as a user runs it).

Every row gives wall time. Targets (issue 20, 8 of 30 blocks removed, 2 CPU cores): healed in <= 10 minutes on A,
perplexity on B <= 1.5x the original's and <= 1.3x on A, zero-shot accuracy retained >= 95%; training-free
(scoring + linear map) <= 2.0x on both corpora; the best scorer beats one-shot loss at 4 and 8 blocks; sub-layer
removal at the same FLOPs beats block removal; the command with --heal linear <= 5 minutes.

Each finished row is kept in ``<out>.json`` and reused by a later run (``--fresh`` starts over), so an interrupted
run continues where it stopped.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_llm_depth.py | tee benchmarks/results/bench_llm_depth.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

import hf_collapse  # noqa: E402
from hf_collapse.data import (  # noqa: E402
    embedded_model_path,
    lm_windows,
    load_bbc_news,
    load_dialog_topics,
    load_newsgroups,
    load_wiki,
    mixed_lm_windows,
)
from hf_collapse.data.zero_shot_tasks import write_tasks  # noqa: E402
from hf_collapse.lacoot import LaCoOTArguments, LaCoOTTrainer  # noqa: E402
from hf_collapse.lm_evaluation import primary_metric, zero_shot  # noqa: E402
from hf_collapse.metrics import count_parameters, forward_flops, hardware_description, perplexity  # noqa: E402

#: "sleb" re-scores on --search_windows windows, "sleb_same_data" on the one-shot scorers' --calibration_windows.
SEARCHES = ("block_influence", "loss", "sleb", "sleb_same_data", "span")
#: searches calibrated on half A, half general text (the healing mix): the removal chosen with generality in view
GENERAL_SEARCHES = ("sleb+newsgroups",)
SUBLAYER_SEARCHES = ("blockpruner", "blockpruner_per_flop")
HEALS = (
    "linear",
    "linear-cosine",
    "linear+newsgroups",
    "lora",
    "distill",
    "lora+newsgroups",
    "lora-distill+newsgroups",
    "distill+newsgroups",
    "lora+wiki",
    "distill+wiki",
)
#: Heals also given to the uncompressed model, as the reference of the same training without removal.
REFERENCED = ("lora", "lora+newsgroups")
#: Learning rates: LoRA (r = 16 on every linear of the kept blocks) needs a larger step than full-parameter
#: distillation (pure KL to the original's logits, temperature 2).
SETTINGS = {
    "lora": dict(learning_rate=5e-4, r=16),
    # LoRA whose loss is the KL to the original's logits (temperature 2), as distillation's, not the text's tokens
    "lora-distill": dict(learning_rate=5e-4, r=16, distill_alpha=1.0),
    "distill": dict(learning_rate=5e-5, alpha=1.0, temperature=2.0),
}
LINEAR_CALIBRATION_BATCHES = 16  # of 8 windows of 128 tokens: 16k tokens for 576 x 576 maps
#: λ of LaCoOT on SmolLM2: the per-block MSW of 128-token windows is about 2,000, against a next-token loss near 2.5.
LACOOT_WEIGHT = 1e-4


class TimeBudget(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed: the healing budget is time, not steps."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.steps = seconds, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def rebuild_removal(model, units: list[str]):
    """A copy of ``model`` with ``units`` (blocks or sub-layers, by their original names, in removal order; a result
    row's ``"removed"``) removed one after another."""
    depth = model.config.num_hidden_layers
    smaller, alive = copy.deepcopy(model), [f"model.layers.{i}" for i in range(depth)]
    for unit in units:
        for name in [u.strip() for u in unit.split(",")]:
            block = ".".join(name.split(".")[:3])
            current = f"model.layers.{alive.index(block)}" + name[len(block) :]
            smaller = hf_collapse.remove_blocks(smaller, [current])
            if name == block:
                alive.remove(block)
    return smaller


def training_arguments(folder: str, learning_rate: float, cls=TrainingArguments, **extra) -> TrainingArguments:
    """Training stops on the time budget, so the schedule cannot depend on a step count: constant after warm-up."""
    return cls(
        folder,
        max_steps=100_000,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        **extra,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--searches", nargs="+", choices=(*SEARCHES, *GENERAL_SEARCHES), default=list(SEARCHES))
    parser.add_argument(
        "--sublayer_searches",
        nargs="*",
        choices=SUBLAYER_SEARCHES,
        default=list(SUBLAYER_SEARCHES),
        help="BlockPruner's sub-layer search by loss, or by loss increase per FLOP, at the block removals' FLOPs",
    )
    parser.add_argument("--heal", nargs="+", default=list(HEALS))
    parser.add_argument(
        "--lacoot",
        nargs="*",
        choices=("every_block", "targeted"),
        default=["every_block", "targeted"],
        help="LaCoOT rows: the penalty on every block, or on the blocks of the healed removal",
    )
    parser.add_argument("--heal_minutes", type=float, default=9.0, help="wall-time budget of each training heal")
    parser.add_argument(
        "--heal_other",
        nargs="+",
        metavar=("REMOVAL", "HEAL"),
        help="heal another removal than the one chosen first (e.g. sleb+newsgroups lora+newsgroups linear+newsgroups)",
    )
    parser.add_argument(
        "--long_heal",
        nargs=2,
        metavar=("HEAL", "MINUTES"),
        help="one more row: HEAL (e.g. lora+newsgroups) given MINUTES of wall time, what a longer budget buys",
    )
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--eval_windows", type=int, default=32)
    parser.add_argument("--calibration_windows", type=int, default=16)
    parser.add_argument("--search_windows", type=int, default=8, help="calibration windows of sleb / blockpruner")
    parser.add_argument("--task_items", type=int, default=100, help="items of each zero-shot task")
    parser.add_argument("--out", default="benchmarks/results/bench_llm_depth")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows of an earlier run")
    opts = parser.parse_args()
    torch.manual_seed(0)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_file = out.with_suffix(".json")
    results = json.loads(cache_file.read_text()) if cache_file.is_file() and not opts.fresh else {}
    rows: dict[str, dict] = results.setdefault("rows", {})

    def row(key: str, compute):
        if key not in rows:
            start = time.perf_counter()
            rows[key] = {**compute(), "seconds": round(time.perf_counter() - start, 1)}
            cache_file.write_text(json.dumps(results, indent=1))
        shown = {k: v for k, v in rows[key].items() if k not in ("removed", "order")}
        print(f"  {key:<40} {json.dumps(shown)}", flush=True)
        return rows[key]

    folder = embedded_model_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    news, wiki, chat, groups = load_bbc_news(), load_wiki(), load_dialog_topics(), load_newsgroups()
    length = opts.max_length

    def windows(texts, count):
        return lm_windows(texts, tokenizer, max_length=length, max_windows=count)

    calibration = DataLoader(windows(news["train"]["text"], opts.calibration_windows), batch_size=8)
    search_calibration = DataLoader(windows(news["train"]["text"], opts.search_windows), batch_size=8)
    half = opts.search_windows // 2
    general_search_calibration = DataLoader(
        mixed_lm_windows([(news["train"]["text"], half), (groups["train"]["text"], half)], tokenizer, length),
        batch_size=8,
    )
    training = windows(news["train"]["text"], 6000)
    # half A, half general text: up to 3,000 windows of each, as many of A as the general corpus holds (the 20
    # Newsgroups sample: a few hundred, seen over several epochs)
    general = {"newsgroups": groups["train"]["text"], "wiki": wiki["train"]["text"]}
    halves = {name: len(windows(texts, 3000)) for name, texts in general.items()}
    mixed = {
        name: mixed_lm_windows([(news["train"]["text"], halves[name]), (texts, halves[name])], tokenizer, length)
        for name, texts in general.items()
    }
    # the test windows every row reports; the validation windows of A choose the removal to heal (and nothing else)
    deciding = DataLoader(windows(news["validation"]["text"], opts.eval_windows), batch_size=8)
    corpora = {
        "A bbc_news": DataLoader(windows(news["test"]["text"], opts.eval_windows), batch_size=8),
        "B wiki": DataLoader(windows(wiki["test"]["text"], opts.eval_windows), batch_size=8),
        "C chat": DataLoader(windows(chat["test"]["text"], opts.eval_windows), batch_size=8),
    }
    task_folder = Path(tempfile.mkdtemp(prefix="bench_llm_tasks_"))
    tasks = write_tasks(task_folder, news["test"]["text"], prefix="bbc_news", num_items=opts.task_items)
    tasks += write_tasks(task_folder, wiki["test"]["text"], prefix="wiki", num_items=opts.task_items)
    probe = {"input_ids": next(iter(corpora["A bbc_news"]))["input_ids"][:1]}
    depth = model.config.num_hidden_layers
    results["setup"] = {
        "model": "SmolLM2-135M-Instruct (embedded `smollm2`, Q4_1 GGUF dequantized to float32)",
        "blocks": depth,
        "max_length": length,
        "eval_windows": opts.eval_windows,
        "calibration_windows": opts.calibration_windows,
        "search_windows": opts.search_windows,
        "task_items": opts.task_items,
        "heal_minutes": opts.heal_minutes,
        "healing text": "A: BBC News training articles (+newsgroups / +wiki: half 20 Newsgroups training posts / "
        f"Wikipedia training sections, {halves['newsgroups']} / {halves['wiki']} windows of each)",
        "hardware": hardware_description(model),
        "threads": torch.get_num_threads(),
    }
    print(
        f"SmolLM2-135M: {depth} blocks, calibrated and healed on BBC News (A) training articles; the removal to heal "
        f"chosen on {opts.eval_windows} validation windows of A; perplexity on {opts.eval_windows} test windows of "
        f"{length} tokens of A, Wikipedia (B) and chat lines (C); zero-shot tasks of "
        f"{opts.task_items} items; {results['setup']['hardware']}",
        flush=True,
    )

    def measure(m, *, tasks_too: bool = False) -> dict:
        result = {name: round(perplexity(m, loader), 3) for name, loader in corpora.items()}
        result["A validation"] = round(perplexity(m, deciding), 3)
        result.update(params=count_parameters(m), flops=forward_flops(m, probe))
        if tasks_too:
            scores = zero_shot(m, tokenizer, tasks, batch_size=8)
            result["tasks"] = {task: round(primary_metric(metrics)[1], 4) for task, metrics in scores.items()}
        return result

    base = row("uncompressed", lambda: measure(model, tasks_too=True))

    def removal(method: str, k: int) -> dict:
        start = time.perf_counter()
        data = {"sleb": search_calibration, "sleb+newsgroups": general_search_calibration}.get(method, calibration)
        method = method.removesuffix("_same_data").removesuffix("+newsgroups")
        smaller, report = hf_collapse.prune(model, data, method=method, num_units=k, latency_repeats=0, progress=False)
        return {
            **measure(smaller),
            "search_seconds": round(time.perf_counter() - start, 1),
            "removed": [s.unit for s in report.kept_steps[1:]],
        }

    def sleb_prefix(k: int, method: str) -> dict:
        removed = rows[f"{max(opts.blocks)} removed/{method}"]["removed"][:k]
        return {**measure(rebuild(removed)), "removed": removed}

    def rebuild(units: list[str]):
        return rebuild_removal(model, units)

    for method in opts.searches:
        for k in sorted(opts.blocks, reverse=True):
            if method.startswith("sleb") and k != max(opts.blocks):
                # SLEB is greedy: its k-block result is the first k steps of the largest run
                row(f"{k} removed/{method}", lambda k=k, method=method: sleb_prefix(k, method))
                continue
            row(f"{k} removed/{method}", lambda method=method, k=k: removal(method, k))

    def sublayers_at_block_flops(per_flop: bool) -> dict:
        """BlockPruner's sub-layer search until its FLOPs are at most those of the largest block removal; the
        smaller removals are its prefixes at their FLOPs."""
        target = min(rows[f"{k} removed/{m}"]["flops"] for k in opts.blocks for m in opts.searches)
        start = time.perf_counter()
        smaller, report = hf_collapse.prune(
            model,
            search_calibration,
            method="blockpruner",
            per_flop=per_flop,
            flops_fraction=(target + 0.5) / base["flops"],  # the search stops at the first state at or under target
            latency_repeats=0,
            progress=False,
            example_inputs=probe,
        )
        steps = report.steps[1:]
        return {
            "search_seconds": round(time.perf_counter() - start, 1),
            "removed": [s.unit for s in steps],
            "flops_per_step": [s.flops for s in steps],
        }

    for sublayer_search in opts.sublayer_searches:
        per_flop = sublayer_search == "blockpruner_per_flop"
        search = row(f"{sublayer_search} search", lambda per_flop=per_flop: sublayers_at_block_flops(per_flop))
        for k in opts.blocks:
            target = max(rows[f"{k} removed/{m}"]["flops"] for m in opts.searches)
            # the first state of the search at or under the block removal's FLOPs
            n = next(i + 1 for i, f in enumerate(search["flops_per_step"]) if f <= target)
            row(
                f"{k} removed/{sublayer_search} (same FLOPs)",
                lambda n=n, search=search: {
                    **measure(rebuild(search["removed"][:n])),
                    "removed": search["removed"][:n],
                },
            )

    def best(k: int) -> str:
        return min(opts.searches, key=lambda m: rows[f"{k} removed/{m}"]["A validation"])

    k = max(opts.blocks)
    # the removal that is healed, kept from the run that first chose it (a scorer added later does not redo the heals)
    healed_before = [
        key.split("/", 1)[1].split(" + ")[0]
        for key in rows
        if key.startswith(f"{k} removed/") and " + " in key and "LaCoOT" not in key
    ]
    chosen = results.setdefault("healed_removal", healed_before[0] if healed_before else best(k))
    student_units = rows[f"{k} removed/{chosen}"]["removed"]

    def student(removal: str = chosen):
        return rebuild(rows[f"{k} removed/{removal}"]["removed"])

    row(f"{k} removed/{chosen} (best), measured fully", lambda: measure(student(), tasks_too=True))

    def heal_row(
        method: str, uncompressed: bool = False, minutes: float = opts.heal_minutes, removal: str = chosen
    ) -> dict:
        base_model = copy.deepcopy(model) if uncompressed else student(removal)
        kind, mix = method.partition("+")[::2]
        if kind.startswith("linear"):
            healed = hf_collapse.heal(
                base_model,
                model,
                mixed[mix] if mix else training,
                method="linear",
                data_collator=default_data_collator,
                calibration_batches=LINEAR_CALIBRATION_BATCHES,
                objective="cosine" if kind == "linear-cosine" else "lstsq",
            )
            return {**measure(healed.eval(), tasks_too=True), "scorer": removal}
        settings = dict(SETTINGS[kind])
        args = training_arguments(str(out.parent / f"_heal_{kind}"), settings.pop("learning_rate"))
        budget = TimeBudget(60 * minutes)
        healed = hf_collapse.heal(
            base_model,
            None if kind == "lora" else model,
            mixed[mix] if mix else training,
            method=kind.partition("-")[0],  # lora-distill: LoRA with the distillation loss
            args=args,
            callbacks=[budget],
            **settings,
        )
        return {**measure(healed.eval(), tasks_too=True), "scorer": removal, "steps": budget.steps}

    for method in opts.heal:
        row(f"{k} removed/{chosen} + {method}", lambda method=method: heal_row(method))
        if method in REFERENCED:
            row(f"uncompressed + {method} (reference)", lambda method=method: heal_row(method, uncompressed=True))
    if opts.long_heal:
        method, minutes = opts.long_heal[0], float(opts.long_heal[1])
        row(f"{k} removed/{chosen} + {method}, {minutes:g} min", lambda: heal_row(method, minutes=minutes))
    if opts.heal_other:
        other, *heals = opts.heal_other
        row(f"{k} removed/{other}, measured fully", lambda: measure(student(other), tasks_too=True))
        for method in heals:
            row(f"{k} removed/{other} + {method}", lambda method=method: heal_row(method, removal=other))

    def command() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            cli = Path(sys.executable).with_name("hf-collapse")
            subprocess.run(
                [
                    str(cli),
                    "prune",
                    "--model",
                    "smollm2",
                    "--dataset",
                    "bbc_news",
                    "--num_units",
                    str(k),
                    "--heal",
                    "linear",
                    "--output_dir",
                    tmp,
                    "--disable_tqdm",
                    "true",
                ],
                check=True,
                capture_output=True,
            )
            seconds = time.perf_counter() - start
            report = hf_collapse.CollapseReport.load(Path(tmp) / "report")
        return {"command_seconds": round(seconds, 1), "evaluations": {e.name: e.values for e in report.evaluations}}

    row(f"hf-collapse prune --num_units {k} --heal linear", command)

    def lacoot(targeted: bool) -> dict:
        """LaCoOT fine-tuning on A for the healing budget (λ = 1e-4, on every block, or only on the blocks the chosen
        scorer removes), then removal of k blocks by MSW and the training-free linear map: the same total wall
        time as removal + a training heal."""
        blocks = [u for unit in student_units for u in unit.split(", ")] if targeted else None
        args = training_arguments(
            str(out.parent / "_lacoot"),
            5e-5,
            cls=LaCoOTArguments,
            msw_weight=LACOOT_WEIGHT,
            msw_blocks=",".join(blocks) if blocks else "auto",
        )
        budget = TimeBudget(60 * opts.heal_minutes)
        trainer = LaCoOTTrainer(
            model=copy.deepcopy(model).train(),
            args=args,
            train_dataset=training,
            data_collator=default_data_collator,
            callbacks=[budget],
        )
        trainer.train()
        trained = trainer.model.eval()
        scores = hf_collapse.score_blocks(trained, calibration, method="msw", progress=False)
        if blocks:
            scores = {name: value for name, value in scores.items() if name in blocks}
        removed = sorted(scores, key=scores.get)[:k]
        smaller = hf_collapse.remove_blocks(trained, removed)
        healed = hf_collapse.heal(
            smaller,
            trained,
            training,
            method="linear",
            data_collator=default_data_collator,
            calibration_batches=LINEAR_CALIBRATION_BATCHES,
        )
        return {
            **measure(healed.eval(), tasks_too=True),
            "removed_without_heal": measure(smaller),
            "full_after_training": measure(trained),
            "steps": budget.steps,
            "removed": removed,
        }

    for targeted in (variant == "targeted" for variant in opts.lacoot):
        name = "LaCoOT on the scorer's blocks" if targeted else "LaCoOT"
        row(f"{k} removed/{name} + linear", lambda targeted=targeted: lacoot(targeted))
    results["summary"] = summarize(rows, opts, base, chosen)
    cache_file.write_text(json.dumps(results, indent=1))
    print(results["summary"])


def summarize(rows: dict, opts, base: dict, chosen: str) -> str:
    corpora = ("A bbc_news", "B wiki", "C chat")
    tasks = list(base["tasks"])
    lines = [
        "| setting | removed | "
        + " | ".join(f"ppl {c} (x)" for c in corpora)
        + " | tasks kept | FLOPs ratio | wall s |",
        "| --- | ---: | " + " | ".join("---:" for _ in corpora) + " | ---: | ---: | ---: |",
    ]

    def retained(r: dict) -> float | None:
        if "tasks" not in r:
            return None
        return sum(r["tasks"][t] / base["tasks"][t] for t in tasks) / len(tasks)

    def line(name: str, r: dict, k: int, reference: dict | None = None) -> None:
        ref = reference or base
        cells = " | ".join(f"{r[c]:.1f} ({r[c] / ref[c]:.2f})" for c in corpora)
        kept = retained(r)
        lines.append(
            f"| {name} | {k} | {cells} | {'' if kept is None else f'{kept:.1%}'} | "
            f"{base['flops'] / r['flops']:.2f} | {r['seconds']:.0f} |"
        )

    line("uncompressed", base, 0)
    for key, r in rows.items():
        if key.startswith("uncompressed + "):
            line(key, r, 0)
    for k in opts.blocks:
        for key, r in rows.items():
            if key.startswith(f"{k} removed/") and " + " not in key and "measured fully" not in key:
                line(f"{key.split('/', 1)[1]}", r, k)
    k = max(opts.blocks)
    line(f"{chosen}, all measures", rows[f"{k} removed/{chosen} (best), measured fully"], k)
    for method in opts.heal:
        r = rows[f"{k} removed/{chosen} + {method}"]
        line(f"{chosen} + heal {method}", r, k)
        reference = rows.get(f"uncompressed + {method} (reference)")
        if reference:
            line(f"  same vs identically trained uncompressed ({method})", r, k, reference)
    for key, r in rows.items():
        if key.startswith(f"{k} removed/{chosen} + ") and key.endswith(" min"):
            line(f"{chosen} + heal {key.split(' + ', 1)[1]}", r, k)
    if opts.heal_other:
        other, *heals = opts.heal_other
        line(f"{other}, all measures", rows[f"{k} removed/{other}, measured fully"], k)
        for method in heals:
            line(f"{other} + heal {method}", rows[f"{k} removed/{other} + {method}"], k)
    for key, r in rows.items():
        if key.startswith(f"{k} removed/LaCoOT"):
            line(f"{key.split('/', 1)[1]} (training {opts.heal_minutes:g} min)", r, k)
            line("  the same before the linear map", {**r["removed_without_heal"], "seconds": r["seconds"]}, k)
    lines.append("")
    lines.append(
        "Perplexity (x: over the original, or over the reference); tasks kept: mean share of each zero-shot "
        f"task's accuracy retained ({', '.join(tasks)})."
    )
    verdicts = []
    healed = [(chosen, method) for method in opts.heal]
    if opts.heal_other:
        healed += [(opts.heal_other[0], method) for method in opts.heal_other[1:]]
    for removal, method in healed:
        r = rows[f"{k} removed/{removal} + {method}"]
        b_target = (
            "B's kind mixed into healing: not a measure of unseen text"
            if method.endswith("+wiki")
            else (f"target <= 1.5{', training-free <= 2.0' if method.startswith('linear') else ''}")
        )
        verdicts.append(
            f"{'' if removal == chosen else removal + ' + '}{method}: "
            f"A x{r['A bbc_news'] / base['A bbc_news']:.2f} (target <= 1.3), "
            f"B x{r['B wiki'] / base['B wiki']:.2f} ({b_target}), tasks kept {retained(r):.1%} (target >= 95%)"
        )
    for kk in opts.blocks:
        scores = {m: rows[f"{kk} removed/{m}"]["A bbc_news"] for m in opts.searches}
        best = min(scores, key=scores.get)
        subs = {m: rows[f"{kk} removed/{m} (same FLOPs)"] for m in opts.sublayer_searches}
        verdicts.append(
            f"{kk} removed: best scorer {best} {scores[best]:.1f} vs one-shot loss "
            f"{scores.get('loss', float('nan')):.1f}"
            + "".join(
                f"; sub-layers ({m}) at the same FLOPs {sub['A bbc_news']:.1f} "
                f"(FLOPs x{base['flops'] / sub['flops']:.2f})"
                for m, sub in subs.items()
            )
        )
    command = rows.get(f"hf-collapse prune --num_units {k} --heal linear")
    if command:
        verdicts.append(f"hf-collapse prune --heal linear: {command['command_seconds'] / 60:.1f} min (target <= 5)")
    return "\n".join(lines + [""] + verdicts)


if __name__ == "__main__":
    main()
