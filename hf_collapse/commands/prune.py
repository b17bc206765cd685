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

from ..budget import BudgetArguments
from ..data import lm_window_parts, lm_windows, shuffle_windows
from ..data.tasks import model_source
from ..pipeline import Healing, run_pipeline
from ..report import CollapseReport
from . import COMMANDS
from .arguments import (
    LMJobArguments,
    at_least,
    check_dataset,
    check_healing,
    healing_help,
    parse_job_flags,
    seed_everything,
)
from .output import phase, print_collapse_summary, say

if TYPE_CHECKING:  # pragma: no cover
    from ..lm_evaluation import LMEvaluation

__all__ = [
    "DEFAULT_PRUNE_TRAINING",
    "DESCRIPTION",
    "PruneJobArguments",
    "main",
    "prune_training_defaults",
    "run_prune_job",
]

logger = logging.getLogger(__name__)

DESCRIPTION = COMMANDS["prune"]


def _method_help() -> str:
    from ..scoring import SCORERS
    from ..searches import SEARCHES

    return f"One-shot scorer: {SCORERS.describe()}; or search: {SEARCHES.describe()}."


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


def prune_training_defaults(heal: str | None) -> dict[str, Any]:
    """The ``TrainingArguments`` defaults of ``hf-collapse prune`` for the healing method (flags override them): a
    method's own learning rate where it declares one (:attr:`hf_collapse.healing.HealingMethod.learning_rate`)."""
    from ..healing import HEALING

    rate = HEALING.get(heal).learning_rate if heal in HEALING else None
    return DEFAULT_PRUNE_TRAINING if rate is None else {**DEFAULT_PRUNE_TRAINING, "learning_rate": rate}


@dataclass
class PruneJobArguments(LMJobArguments, BudgetArguments):
    """The ``hf-collapse prune`` flags besides ``TrainingArguments`` (which configure healing by training); the budget
    (:class:`~hf_collapse.budget.BudgetArguments`) is on perplexity: lower is better."""

    method: str = field(
        default="block_influence",
        metadata={"help": _method_help},
    )
    granularity: str = field(default="block", metadata={"help": "Units: block, attention or mlp."})
    per_flop: bool = field(
        default=False,
        metadata={
            "help": "blockpruner: remove the sub-layer of least loss increase per parameter (FLOP) it removes, not of "
            "least loss (which spends a FLOPs budget on the small attention sub-layers first)."
        },
    )
    heal: str | None = field(default=None, metadata={"help": healing_help})
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
        LMJobArguments.__post_init__(self)
        BudgetArguments.__post_init__(self)
        from ..healing import check_heal_applicable
        from ..searches import find_search, method_names

        try:
            search = find_search(self.method)
        except ValueError:
            raise ValueError(f"--method {self.method!r}: expected one of {', '.join(method_names())}") from None
        check_healing(self.heal)
        if self.granularity not in ("block", "attention", "mlp"):
            raise ValueError(f"--granularity {self.granularity!r}: expected block, attention or mlp")
        if not self.has_budget():
            raise ValueError(
                "no budget: pass --num_units, --flops_fraction, --max_metric_delta, --max_metric_ratio, or several"
            )
        budget = self.budget(higher_is_better=False)
        try:  # what the search cannot do, and a healing that cannot heal what it removes, before any work
            search.check(budget, self.granularity, {"per_flop": self.per_flop})
            if self.heal is not None:
                check_heal_applicable(self.heal, sublayers=search.removes_sublayers(self.granularity))
        except ValueError as error:
            raise ValueError(f"--method {self.method}{' --heal ' + self.heal if self.heal else ''}: {error}") from None
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
    others = job.measured_corpora()[1:]
    roles = {
        "calibration": f"{describe_split(splits['train'])} (its first {cut('train')})",
        "validation": f"{describe_split(splits['validation'])} (its first {cut('validation')})",
        "test": f"{describe_split(splits['test'])} (its first {cut('test')})"
        + (f"; the test splits of {', '.join(others)}" if others else ""),
    }
    measurements = _measurements(job, args, tokenizer, tested, texts, output)
    healing = (lambda: _healing(job, args, tokenizer, texts["train"])) if job.heal is not None else None

    def remove():
        with phase(f"{job.method}: scoring and removing {job.granularity} units under the budget (validation text)"):
            return prune(
                model,
                DataLoader(windows["train"], batch_size=job.batch_size),
                method=job.method,
                granularity=job.granularity,
                per_flop=job.per_flop,
                **job.limits(),
                eval_fn=lambda m: perplexity(m, deciding),
                higher_is_better=False,
                metric_name="perplexity",
                latency_repeats=job.latency_repeats,
                progress=not args.disable_tqdm,
                progress_dir=progress,
                resume_from=job.resume_from,
            )

    def save(saved, report: CollapseReport) -> None:
        report.extra.update(
            model=job.model,
            dataset=job.dataset,
            max_length=job.max_length,
            calibration_windows=len(windows["train"]),
            validation_windows=len(windows["validation"]),
            test_windows=len(windows["test"]),
        )
        _save(saved, report, tokenizer, output)

    place = f"{output / 'collapsed'} and {output / 'report'}"
    final, report = run_pipeline(
        model,
        remove,
        healing=healing,
        validation_metric=lambda m: perplexity(m, deciding),
        measure=lambda measured, stage, report: measurements.measure(measured, stage, report),
        compare=_generation_speed(job, tested) if job.generate_tokens else None,
        save=save,
        data_roles=roles,
        on_failure=lambda error: say(
            f"healing or measuring failed; the pruned model (before healing) and its report are saved in {place}. "
            f"Continue without searching again: --resume_from {progress} (another --heal, or none, is fine)"
        ),
        phase=phase,
    )
    if report.extra.get("heal_mix_ratio_requested") is not None:
        logger.warning(
            "--heal_mix_ratio %s asked for, %s reached: the mixed corpora hold fewer windows than asked",
            job.heal_mix_ratio,
            report.extra["heal_mix_ratio"],
        )
    if is_main_process() and args.push_to_hub and args.hub_model_id:
        with phase(f"pushing to {args.hub_model_id}"):
            hub.push_to_hub(final, args.hub_model_id, report=report, processor=tokenizer, token=args.hub_token)
    return final, report, report.summary()


def _generation_speed(job: PruneJobArguments, tested):
    """``(original, final, report)``: tokens/s of greedy generation with the KV cache, side by side, after the first
    32 tokens of the first test window."""
    from ..metrics import generation_speed

    def compare(original, final, report: CollapseReport) -> None:
        first = next(iter(tested))
        prompt = {k: v[:1, : min(32, job.max_length)] for k, v in first.items() if k != "labels"}
        speed = generation_speed([original, final], prompt, job.generate_tokens, job.latency_repeats)
        report.extra.update(
            tokens_per_s_before=round(speed[0], 2),
            tokens_per_s_after=round(speed[1], 2),
            generation_speedup=round(speed[1] / speed[0], 3),
        )

    return compare


def _healing(job: PruneJobArguments, args, tokenizer, train_text) -> Healing:
    """The healing of --heal: its windows of training text (with --heal_mix mixed in), the share of each corpus."""
    windows, shares = _healing_windows(job, args, tokenizer, train_text)
    extra: dict[str, Any] = {"heal_windows": len(windows)}
    mix = job.healing_mix()
    if mix:
        extra.update(heal_mix=mix, heal_mix_ratio=round(1 - shares[0] / len(windows), 4))
        if job.heal_mix_ratio != extra["heal_mix_ratio"]:
            extra["heal_mix_ratio_requested"] = job.heal_mix_ratio
    return Healing(job.heal, windows, args=args, described=_healing_description(job, shares), extra=extra)


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
