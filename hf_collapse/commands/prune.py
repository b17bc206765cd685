"""``hf-collapse prune``: depth compression of a causal LM in one command.

Scores the units (blocks or sub-layers) on calibration text, removes them under a block count or a perplexity
budget, heals the result if asked (on the training text with general text mixed in, unless --heal_mix none), and
measures, before and after removal and after healing, perplexity on held-out text of the training corpus *and of
other corpora* and, if asked, zero-shot task accuracy with lm-eval-harness; then parameters, FLOPs and generation
speed (tokens/s with the KV cache). Saves the model with its card, and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import lm_window_parts, lm_windows, shuffle_windows
from ..data.tasks import model_source
from ..report import CollapseReport
from . import COMMANDS
from .arguments import LMJobArguments, at_least, check_dataset, parse_job_flags, seed_everything
from .output import phase, print_collapse_summary, say_on_failure

if TYPE_CHECKING:  # pragma: no cover
    from ..lm_evaluation import LMEvaluation

__all__ = [
    "DEFAULT_PRUNE_TRAINING",
    "DESCRIPTION",
    "PruneJobArguments",
    "generation_speed",
    "main",
    "prune_training_defaults",
    "run_prune_job",
]

logger = logging.getLogger(__name__)

DESCRIPTION = COMMANDS["prune"]

HEALING = ("distill", "lora", "linear")

#: TrainingArguments of the command (they matter to healing by training, "distill" and "lora"); flags override them.
DEFAULT_PRUNE_TRAINING: dict[str, Any] = dict(
    output_dir="outputs/prune",
    max_steps=100,
    per_device_train_batch_size=4,
    learning_rate=5e-5,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=10,
    save_strategy="no",
    logging_steps=10,
    report_to="none",
    seed=0,
)
#: LoRA heals with a larger step than full-parameter distillation: on SmolLM2 with 8 of 30 blocks removed, 7 minutes
#: of LoRA (r=16) at 5e-4 took perplexity from 101.8 to 42.5, distillation at 5e-5 to 51.5 (benchmarks/bench_llm_depth).
LORA_LEARNING_RATE = 5e-4


def prune_training_defaults(heal: str | None) -> dict[str, Any]:
    """The ``TrainingArguments`` defaults of ``hf-collapse prune`` for the healing method (flags override them)."""
    return {**DEFAULT_PRUNE_TRAINING, "learning_rate": LORA_LEARNING_RATE} if heal == "lora" else DEFAULT_PRUNE_TRAINING


@dataclass
class PruneJobArguments(LMJobArguments):
    """The ``hf-collapse prune`` flags besides ``TrainingArguments`` (which configure healing by training)."""

    method: str = field(
        default="block_influence",
        metadata={
            "help": "One-shot scorer (block_influence, angular, loss, msw, random) or search: sleb (re-scored by loss "
            "after each removal), blockpruner (attention and MLP sub-layers, re-scored), span (the closest contiguous "
            "span of --num_units blocks)."
        },
    )
    granularity: str = field(default="block", metadata={"help": "Units: block, attention or mlp."})
    per_flop: bool = field(
        default=False,
        metadata={
            "help": "blockpruner: remove the sub-layer of least loss increase per parameter (FLOP) it removes, not of "
            "least loss (which spends a FLOPs budget on the small attention sub-layers first)."
        },
    )
    num_units: int | None = field(default=None, metadata={"help": "Remove this many units."})
    max_metric_delta: float | None = field(default=None, metadata={"help": "Perplexity may rise by this much."})
    max_metric_ratio: float | None = field(default=None, metadata={"help": "Perplexity may grow by this factor."})
    flops_fraction: float | None = field(
        default=None,
        metadata={"help": "Remove until the forward FLOPs are at most this fraction of the original's (e.g. 0.8)."},
    )
    heal: str | None = field(default=None, metadata={"help": f"Healing after removal: {', '.join(HEALING)}."})
    max_length: int = field(default=128, metadata={"help": "Tokens per calibration / evaluation window."})
    calibration_windows: int = field(default=32, metadata={"help": "Windows of training text for scoring."})
    heal_windows: int = field(
        default=512,
        metadata={
            "help": "Windows of training text for healing (linear: the fit's calibration; distill/lora: training data)."
        },
    )
    eval_windows: int = field(default=32, metadata={"help": "Held-out windows for perplexity."})
    batch_size: int = field(default=8, metadata={"help": "Windows per batch for scoring and perplexity."})
    generate_tokens: int = field(default=32, metadata={"help": "Tokens generated to measure tokens/s (0: skip)."})
    latency_repeats: int = field(default=3, metadata={"help": "Interleaved rounds of each speed measurement."})
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Continue an interrupted removal from its progress folder (<output_dir>/prune_progress)."},
    )
    eval_datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Corpora whose held-out text is measured besides --dataset's (perplexity at each stage). Default: "
            "wiki and newsgroups (bbc_news and newsgroups when --dataset is wiki): with the default --heal_mix, "
            "newsgroups stays text that neither calibrated nor healed the model; none: only --dataset."
        },
    )
    eval_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Zero-shot lm-eval tasks measured at each stage: task names (their data needs a network), task "
            "YAML files, or local (next-sentence and last-word tasks built from the held-out text of --dataset and "
            "--eval_datasets). Needs lm-eval: pip install 'hf_collapse[eval]'."
        },
    )
    eval_limit: int = field(default=200, metadata={"help": "Items per zero-shot task."})
    heal_mix: list[str] | None = field(
        default=None,
        metadata={
            "help": "Corpora whose training text is mixed into the healing text, so that healing does not make a "
            "specialist of --dataset. Default: general text, wiki (bbc_news when --dataset is wiki); none: heal on "
            "--dataset's text alone (a model for that domain only)."
        },
    )
    heal_mix_ratio: float = field(
        default=0.5, metadata={"help": "Share of the healing windows taken from --heal_mix (the rest: --dataset)."}
    )

    def measured_corpora(self) -> list[str]:
        """--dataset, then the corpora of --eval_datasets (default: the general embedded corpus and newsgroups, the
        text of a kind that the default healing never sees)."""
        names = self.eval_datasets if self.eval_datasets is not None else [*self._general_corpus(), "newsgroups"]
        return [self.dataset, *self._other_corpora(names)]

    def healing_mix(self) -> list[str]:
        """The corpora mixed into the healing text: --heal_mix, by default the general embedded corpus (none
        without --heal, or with --heal_mix none)."""
        if self.heal is None:
            return []
        return self._other_corpora(self.heal_mix if self.heal_mix is not None else self._general_corpus())

    def _general_corpus(self) -> list[str]:
        """The embedded corpus of general text that --dataset is not: wiki, or bbc_news for --dataset wiki."""
        return ["bbc_news"] if self.dataset.lower().replace("-", "_") == "wiki" else ["wiki"]

    def _other_corpora(self, names: list[str]) -> list[str]:
        """``names`` without --dataset and "none"."""
        return list(dict.fromkeys(c for c in names if c.lower() != "none" and c != self.dataset))

    def __post_init__(self):
        super().__post_init__()
        from ..removal import SEARCHES
        from ..scoring import DATA_FREE, SCORERS

        methods = [*SCORERS, "loss", *DATA_FREE, *SEARCHES]
        if self.method not in methods:
            raise ValueError(f"--method {self.method!r}: expected one of {', '.join(methods)}")
        if self.heal is not None and self.heal not in HEALING:
            raise ValueError(f"--heal {self.heal!r}: expected one of {', '.join(HEALING)}")
        if self.heal is not None:
            from ..healing import check_heal_applicable

            try:
                check_heal_applicable(self.heal, sublayers=self.method == "blockpruner" or self.granularity != "block")
            except ValueError as error:
                raise ValueError(f"--heal {self.heal}: {error}") from None
        if self.granularity not in ("block", "attention", "mlp"):
            raise ValueError(f"--granularity {self.granularity!r}: expected block, attention or mlp")
        budgets = (self.num_units, self.flops_fraction, self.max_metric_delta, self.max_metric_ratio)
        if all(limit is None for limit in budgets):
            raise ValueError(
                "no budget: pass --num_units, --flops_fraction, --max_metric_delta, --max_metric_ratio, or several"
            )
        if self.flops_fraction is not None and not 0 < self.flops_fraction < 1:
            raise ValueError(f"--flops_fraction must be between 0 and 1, got {self.flops_fraction}")
        if self.method in SEARCHES and self.granularity != "block":
            raise ValueError(f"--method {self.method} chooses its own units: leave out --granularity")
        if self.per_flop and self.method != "blockpruner":
            raise ValueError(
                f"--per_flop ranks sub-layers of unequal size: it needs --method blockpruner, not {self.method}"
            )
        if self.method == "span" and self.num_units is None:
            raise ValueError("--method span removes --num_units consecutive blocks at once: give --num_units")
        at_least("num_units", self.num_units, 1)
        at_least("max_metric_delta", self.max_metric_delta, 0)
        at_least("max_metric_ratio", self.max_metric_ratio, 1)
        for name in ("max_length", "calibration_windows", "heal_windows", "eval_windows", "batch_size"):
            at_least(name, getattr(self, name), 1)
        at_least("generate_tokens", self.generate_tokens, 0)
        at_least("latency_repeats", self.latency_repeats, 0)
        at_least("eval_limit", self.eval_limit, 1)
        if not 0 < self.heal_mix_ratio < 1:
            raise ValueError(f"--heal_mix_ratio must be between 0 and 1 (exclusive), got {self.heal_mix_ratio}")
        if self.heal is None and [c for c in self.heal_mix or [] if c.lower() != "none"]:
            raise ValueError("--heal_mix mixes text into healing: give --heal too")
        for name in self.measured_corpora()[1:]:
            check_dataset(name, "--eval_datasets")
        for name in self.healing_mix():
            check_dataset(name, "--heal_mix")
        if self.eval_tasks:
            from ..lm_evaluation import is_available

            if not is_available():
                raise ValueError("--eval_tasks needs lm-eval-harness: pip install 'hf_collapse[eval]'")
            for task in self.eval_tasks:
                if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
                    raise ValueError(f"--eval_tasks {task!r}: no such task file")
        if self.resume_from is not None and not Path(self.resume_from).is_dir():
            raise ValueError(
                f"--resume_from {self.resume_from!r}: no such folder (the progress folder of an "
                "interrupted run, <output_dir>/prune_progress by default)"
            )


def generation_speed(models: list[Any], prompt: dict[str, Any], new_tokens: int, rounds: int) -> list[float]:
    """Tokens per second of greedy generation with the KV cache, the models timed side by side in ``rounds``
    interleaved rounds (:func:`hf_collapse.metrics.compare_latency`; median per model)."""
    from ..metrics import compare_latency

    def generate(model: Any, inputs: dict[str, Any]) -> Any:
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True
        )

    timing = compare_latency(models, prompt, warmup=1, rounds=max(rounds, 1), min_seconds=0, call=generate)
    return [new_tokens * prompt["input_ids"].shape[0] / seconds for seconds in timing.seconds]


def run_prune_job(job: PruneJobArguments, args) -> tuple[Any, CollapseReport, dict[str, Any]]:
    """Score, remove, heal and measure a causal LM, then save it with its card and report in ``args.output_dir``
    (``collapsed/`` and ``report/``) and push it when ``args.push_to_hub`` is set. Returns ``(model, report,
    summary)``.

    Three roles of data, kept apart: the training text calibrates the scores and heals; the validation text decides
    the budget (its perplexity at every step); the test text is only reported (perplexity at every stage, the
    ``--eval_datasets`` corpora's and the local zero-shot tasks too). The removal writes its progress to
    ``<output_dir>/prune_progress``, and the pruned model is saved before healing and evaluation: when a later phase
    fails, ``--resume_from <output_dir>/prune_progress`` heals and measures again without searching again (with the
    same or another ``--heal``)."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import hub
    from ..data import describe_split, load_splits
    from ..distributed import is_main_process
    from ..metrics import perplexity
    from ..removal import prune

    seed_everything(args)
    output = Path(args.output_dir)
    progress = Path(job.resume_from) if job.resume_from else output / "prune_progress"
    with phase(f"loading {job.model} and {job.dataset}"):
        source = model_source(job.model)
        model = AutoModelForCausalLM.from_pretrained(source).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        splits = load_splits(job.dataset, text_column=job.text_column)
        texts = {split: list(splits[split][job.text_column]) for split in splits}
        windows = {
            split: lm_windows(texts[split], tokenizer, max_length=job.max_length, max_windows=count)
            for split, count in (
                ("train", job.calibration_windows),
                ("validation", job.eval_windows),
                ("test", job.eval_windows),
            )
        }
        deciding = DataLoader(windows["validation"], batch_size=job.batch_size)
        tested = DataLoader(windows["test"], batch_size=job.batch_size)
    cut = lambda split: f"{len(windows[split])} windows of {job.max_length} tokens"  # noqa: E731
    roles = {
        "calibration": f"{describe_split(splits['train'])} (its first {cut('train')})",
        "validation": f"{describe_split(splits['validation'])} (its first {cut('validation')})",
        "test": f"{describe_split(splits['test'])} (its first {cut('test')})",
    }
    measurements = _measurements(job, args, tokenizer, tested, texts, output)
    with phase(f"{job.method}: scoring and removing {job.granularity} units under the budget (perplexity of each)"):
        collapsed, report = prune(
            model,
            DataLoader(windows["train"], batch_size=job.batch_size),
            method=job.method,
            granularity=job.granularity,
            per_flop=job.per_flop,
            num_units=job.num_units,
            max_metric_delta=job.max_metric_delta,
            max_metric_ratio=job.max_metric_ratio,
            flops_fraction=job.flops_fraction,
            eval_fn=lambda m: perplexity(m, deciding),
            higher_is_better=False,
            metric_name="perplexity",
            latency_repeats=job.latency_repeats,
            progress=not args.disable_tqdm,
            progress_dir=progress,
            resume_from=job.resume_from,
        )
    others = job.measured_corpora()[1:]
    roles["test"] += f"; the test splits of {', '.join(others)}" if others else ""
    report.data_roles = roles
    report.extra.update(
        {
            "model": job.model,
            "dataset": job.dataset,
            "max_length": job.max_length,
            "calibration_windows": len(windows["train"]),
            "validation_windows": len(windows["validation"]),
            "test_windows": len(windows["test"]),
        }
    )
    _save(collapsed, report, tokenizer, output)  # the search's result is safe before anything else can fail
    saved = f"{output / 'collapsed'} and {output / 'report'}"
    with say_on_failure(
        f"healing or measuring failed; the pruned model (before healing) and its report are saved in {saved}. Continue "
        f"without searching again: --resume_from {progress} (another --heal, or none, is fine)"
    ):
        final = _heal_and_measure(job, args, model, collapsed, report, tokenizer, texts, deciding, measurements)
        _save(final, report, tokenizer, output)
    if is_main_process() and args.push_to_hub and args.hub_model_id:
        with phase(f"pushing to {args.hub_model_id}"):
            hub.push_to_hub(final, args.hub_model_id, report=report, processor=tokenizer, token=args.hub_token)
    return final, report, report.summary()


def _heal_and_measure(job, args, model, collapsed, report, tokenizer, texts, deciding, measurements):
    """Heal the pruned model if asked, measure every stage on the test text (and the budget's metric after healing
    on the validation text), time generation; returns the final model. Everything lands in ``report``."""
    from ..healing import heal
    from ..metrics import perplexity

    final = collapsed
    stages = [("original", model), ("after removal", collapsed)]
    mix = job.healing_mix()
    if job.heal is not None and report.after.removed:
        with phase(f"healing ({job.heal}{' with ' + ', '.join(mix) + ' mixed in' if mix else ''})"):
            healing, shares = _healing_windows(job, args, tokenizer, texts["train"])
            final = heal(collapsed, model, healing, method=job.heal, args=args)
            report.extra.update(heal=job.heal, heal_windows=len(healing))
            report.data_roles["healing"] = _healing_description(job, shares)
            if mix:
                report.extra.update(heal_mix=mix, heal_mix_ratio=round(1 - shares[0] / len(healing), 4))
                if job.heal_mix_ratio != report.extra["heal_mix_ratio"]:
                    report.extra["heal_mix_ratio_requested"] = job.heal_mix_ratio
                    logger.warning(
                        "--heal_mix_ratio %s asked for, %s reached: the mixed corpora hold fewer windows than asked",
                        job.heal_mix_ratio,
                        report.extra["heal_mix_ratio"],
                    )
        with phase("perplexity after healing on the validation text"):
            report.record_budget_metric("after healing", perplexity(final, deciding))
        stages.append(("after healing", final))
    for stage, measured in stages:
        with phase(f"measuring the {stage if stage == 'original' else 'model ' + stage} ({measurements.what()})"):
            measurements.measure(measured, stage, report)
    if job.generate_tokens:
        with phase(f"timing generation ({job.generate_tokens} tokens, KV cache)"):
            batch = next(iter(measurements.corpora.values()))
            prompt = {k: v[:1, : min(32, job.max_length)] for k, v in next(iter(batch)).items() if k != "labels"}
            speed = generation_speed([model, final], prompt, job.generate_tokens, job.latency_repeats)
            report.extra.update(
                tokens_per_s_before=round(speed[0], 2),
                tokens_per_s_after=round(speed[1], 2),
                generation_speedup=round(speed[1] / speed[0], 3),
            )
    return final


def _save(model, report: CollapseReport, tokenizer, output: Path) -> None:
    """The model with its card (``collapsed/``) and the report (``report/``), on the main process."""
    from .. import hub
    from ..distributed import is_main_process

    if is_main_process():
        with phase(f"saving to {output}"):
            hub.save_with_card(model, output / "collapsed", report, processor=tokenizer)
            report.save(output / "report")


def _healing_description(job: PruneJobArguments, shares: list[int]) -> str:
    """The healing text, with the windows each corpus gave."""
    corpora = [job.dataset, *job.healing_mix()]
    parts = ", ".join(f"{count} windows of {name}" for name, count in zip(corpora, shares))
    return f"the train splits ({parts}; {job.max_length} tokens each)"


def _measurements(job: PruneJobArguments, args, tokenizer, tested, texts, output: Path) -> LMEvaluation:
    """Perplexity on the test text of --dataset and of each --eval_datasets corpus, and the --eval_tasks, as one
    :class:`~hf_collapse.lm_evaluation.LMEvaluation` (corpora named by short names: the local tasks' prefixes). Local
    zero-shot tasks are built from test text and keep no item that overlaps the training text."""
    from torch.utils.data import DataLoader

    from ..data import load_splits
    from ..data.zero_shot_tasks import write_tasks
    from ..lm_evaluation import LMEvaluation

    names = job.measured_corpora()
    short = {name: _short_name(name) for name in names}
    corpora, tests, trains = {short[job.dataset]: tested}, {short[job.dataset]: texts["test"]}, [texts["train"]]
    with phase(f"loading the test text of {', '.join(names)}"):
        for name in names[1:]:
            other = load_splits(name, text_column=job.text_column)
            tests[short[name]] = list(other["test"][job.text_column])
            trains.append(list(other["train"][job.text_column]))
            windows = lm_windows(tests[short[name]], tokenizer, max_length=job.max_length, max_windows=job.eval_windows)
            corpora[short[name]] = DataLoader(windows, batch_size=job.batch_size)
    tasks: list[str | Path] = []
    for task in job.eval_tasks or []:
        if task == "local":
            with phase("writing local zero-shot tasks (next sentence, last word) from the test text"):
                training = [text for part in trains for text in part]
                for name, text in tests.items():
                    tasks += write_tasks(
                        output / "zero_shot_tasks", text, prefix=name, num_items=job.eval_limit, exclude=training
                    )
        else:
            tasks.append(task)
    return LMEvaluation(
        corpora,
        healing_corpora=[short[job.dataset], *(_short_name(n) for n in job.healing_mix())],
        tokenizer=tokenizer,
        tasks=tasks,
        limit=job.eval_limit,
        batch_size=job.batch_size,
        described={short[name]: f"{name}, test split" for name in names},
    )


def _short_name(dataset: str) -> str:
    """A dataset argument as a plain name (a file's stem for a path): the prefix of its local tasks."""
    import re

    name = Path(dataset).stem if Path(dataset).exists() else dataset.split("/")[-1]
    return re.sub(r"\W+", "_", name).strip("_").lower() or "data"


def _healing_windows(job: PruneJobArguments, args, tokenizer, train_text) -> tuple[Any, list[int]]:
    """--heal_windows windows of --dataset's training text, or with text mixed in (:meth:`~PruneJobArguments.
    healing_mix`) --heal_mix_ratio of them taken from the training text of the mixed corpora (shuffled together), and
    the number of windows each corpus gave (a short corpus gives fewer than asked)."""
    from ..data import load_splits

    mix = job.healing_mix()
    if not mix:
        windows = lm_windows(train_text, tokenizer, max_length=job.max_length, max_windows=job.heal_windows)
        return windows, [len(windows)]
    mixed = round(job.heal_windows * job.heal_mix_ratio)
    each = [mixed // len(mix) + (i < mixed % len(mix)) for i in range(len(mix))]
    parts = [(train_text, job.heal_windows - mixed)]
    parts += [
        (load_splits(name, text_column=job.text_column)["train"][job.text_column], n) for name, n in zip(mix, each)
    ]
    pieces = lm_window_parts(parts, tokenizer, max_length=job.max_length)
    return shuffle_windows(pieces, seed=args.seed), [len(piece) for piece in pieces]


def main(argv: Sequence[str]) -> int:
    """``hf-collapse prune [job flags] [TrainingArguments flags]``."""
    from transformers import TrainingArguments

    # LoRA heals with a larger learning rate than distillation: the defaults depend on --heal.
    job, args = parse_job_flags(
        "hf-collapse prune",
        DESCRIPTION,
        PruneJobArguments,
        TrainingArguments,
        DEFAULT_PRUNE_TRAINING,
        argv,
        defaults_for_job=lambda job: prune_training_defaults(job.heal),
    )
    _, report, _ = run_prune_job(job, args)
    mix = job.healing_mix()
    mixed = f" with {', '.join(mix)} mixed in" if mix else ""
    print_collapse_summary(
        report,
        job.model,
        job.dataset,
        f"{job.method} scores, {job.granularity} units, healing: {job.heal or 'none'}{mixed}",
        args.output_dir,
    )
    return 0
