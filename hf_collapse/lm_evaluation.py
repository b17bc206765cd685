"""How far a pruned LLM stays a general model, measured the way the field measures it: perplexity on held-out text
of several corpora (not only the one that calibrated and healed it) and zero-shot task accuracy with
lm-eval-harness on the in-memory model, at each stage, into the report (:class:`LMEvaluation`).

lm-eval is an optional extra (``pip install "hf_collapse[eval]"``). Tasks are lm-eval task names (hellaswag,
arc_easy, piqa, winogrande, ...: these download their data, so they need a network) or paths of task YAML files,
which run offline when their data is local (``dataset_path: json``): :func:`hf_collapse.data.zero_shot_tasks.
write_tasks` builds such tasks from held-out documents.

Example::

    >>> from hf_collapse.lm_evaluation import LMEvaluation, zero_shot
    >>> zero_shot(model, tokenizer, ["tasks/bbc_news_continuation.yaml", "arc_easy"], limit=200)
    {'bbc_news_continuation': {'acc': 0.56, 'acc_norm': 0.63}, 'arc_easy': {...}}
    >>> evaluation = LMEvaluation({"bbc_news": news_loader, "wiki": wiki_loader}, healing_corpora=["bbc_news"],
    ...                           tokenizer=tokenizer, tasks=["tasks/wiki_continuation.yaml"])
    >>> evaluation.measure(model, "original", report)          # then "after removal", "after healing"
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .metrics import device_of, perplexity
from .report import CollapseReport

__all__ = ["LMEvaluation", "is_available", "primary_metric", "task_name", "zero_shot"]

logger = logging.getLogger(__name__)

#: The metric a task is reported by, in order of preference (length-normalised accuracy first, as the field does
#: for multiple choice).
_PREFERRED = ("acc_norm", "acc", "exact_match")


#: The kinds of local task :mod:`hf_collapse.data.zero_shot_tasks` writes, named ``<corpus>_<kind>``.
LOCAL_TASK_KINDS = ("continuation", "last_word")


def local_task_corpus(task: str, corpora: Iterable[str]) -> str | None:
    """The corpus a local task was built from: ``"wiki"`` for ``"wiki_continuation"``, by its whole name, never a
    prefix (``"wiki_2024_continuation"`` is not ``wiki``'s); ``None`` for any other task."""
    return next((c for c in corpora if task in {f"{c}_{kind}" for kind in LOCAL_TASK_KINDS}), None)


def is_available() -> bool:
    """Whether lm-eval-harness is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs a line per truncated request and per task build: keep its warnings out of the user's console."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def task_name(task: str | os.PathLike) -> str:
    """The lm-eval name of a task given by name or by YAML path (its ``task:`` key)."""
    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        return str(task)
    if not path.is_file():
        raise FileNotFoundError(f"no task file {str(path)!r}")
    import yaml

    class _Loader(yaml.SafeLoader):  # lm-eval YAMLs may carry `!function` tags: read the name only
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    data = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(data.get("task"), str):
        raise ValueError(f"{str(path)!r} is not an lm-eval task file (it has no `task:` name)")
    return data["task"]


def primary_metric(metrics: Mapping[str, float]) -> tuple[str, float]:
    """``(name, value)`` of the metric a task's result is reported by: ``acc_norm``, else ``acc``, else
    ``exact_match``, else the first one."""
    for name in _PREFERRED:
        if name in metrics:
            return name, metrics[name]
    name = next(iter(metrics))
    return name, metrics[name]


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | os.PathLike],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a causal LM on lm-eval-harness tasks, in memory (no subprocess, no saving): ``{task: {metric: value}}``
    with the metrics the task defines (``acc``, ``acc_norm``, ...; standard errors left out).

    Args:
        model: a causal LM (collapsed or not), evaluated on its own device; its train/eval mode is restored.
        tokenizer: its tokenizer.
        tasks: lm-eval task names or task YAML paths (a YAML's folder is added to lm-eval's task search path).
        limit: at most this many items per task (``None``: all).
        batch_size: lm-eval's batch size.
        num_fewshot: examples in the prompt (``None``: the task's default, zero for the local tasks).

    Raises:
        ModuleNotFoundError: when lm-eval is not installed (``pip install "hf_collapse[eval]"``).
        ValueError: for an empty task list or a task lm-eval does not know.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            'zero-shot tasks need lm-eval-harness: pip install "hf_collapse[eval]" (or pip install lm-eval)'
        ) from error
    if not tasks:
        raise ValueError("give at least one task (an lm-eval task name or a task YAML file)")
    names = [task_name(task) for task in tasks]
    folders = sorted({str(Path(t).resolve().parent) for t in tasks if Path(t).suffix in (".yaml", ".yml")})
    manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval does not know the task(s) {unknown}: give a task name or a task YAML path")
    was_training = model.training
    try:
        with _quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device_of(model)))
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=0,
            )
    finally:
        model.train(was_training)
    scores: dict[str, dict[str, float]] = {}
    for name in names:
        metrics = results["results"][name]
        scores[name] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))
        }
    return scores


@dataclass
class LMEvaluation:
    """What a causal LM is measured on at each stage of a compression (:data:`hf_collapse.report.STAGES`), recorded
    into its :class:`~hf_collapse.report.CollapseReport` (``report.evaluations``: report.json, report.md, the card).

    Args:
        corpora: ``{name: batches}`` of held-out windows of each corpus (with labels), for perplexity.
        healing_corpora: the names of the corpora whose *training* part calibrated or healed the model (their
            held-out part is measured like the others, and marked: the model was fitted to that kind of text).
        tokenizer: the model's tokenizer (for zero-shot tasks).
        tasks: lm-eval task names or task YAML paths (:mod:`hf_collapse.data.zero_shot_tasks` builds offline ones).
        limit: at most this many items per task.
        batch_size: lm-eval's batch size.
        described: ``{name: description}`` of each corpus's measured part (e.g. ``"bbc_news, test split"``).
    """

    corpora: Mapping[str, Iterable[Mapping[str, Any]]] = field(default_factory=dict)
    healing_corpora: Sequence[str] = ()
    tokenizer: Any = None
    tasks: Sequence[str | os.PathLike] = ()
    limit: int | None = None
    batch_size: int = 8
    described: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.tasks and self.tokenizer is None:
            raise ValueError("zero-shot tasks need the model's tokenizer")
        if self.tasks and not is_available():
            raise ModuleNotFoundError(
                'zero-shot tasks need lm-eval-harness: pip install "hf_collapse[eval]" (or pip install lm-eval)'
            )

    def what(self) -> str:
        """What :meth:`measure` measures, in a few words (for progress messages)."""
        parts = [f"perplexity on {', '.join(self.corpora)}"] if self.corpora else []
        if self.tasks:
            parts.append(f"{len(self.tasks)} zero-shot task{'s' if len(self.tasks) > 1 else ''}")
        return "; ".join(parts) or "nothing"

    def measure(self, model: nn.Module, stage: str, report: CollapseReport) -> dict[str, float]:
        """Measure ``model`` at ``stage`` and record it in ``report``; returns ``{evaluation name: value}``."""
        measured: dict[str, float] = {}
        for name, batches in self.corpora.items():
            entry = report.record(
                f"perplexity on {name}",
                stage,
                perplexity(model, batches),
                metric="perplexity",
                higher_is_better=False,
                data=self.described.get(name, f"{name}, held out"),
                seen_in_healing=name in self.healing_corpora,
            )
            measured[entry.name] = entry.values[stage]
        if self.tasks:
            results = zero_shot(model, self.tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size)
            for task, metrics in results.items():
                metric, value = primary_metric(metrics)
                corpus = local_task_corpus(task, self.corpora)
                entry = report.record(
                    task,
                    stage,
                    value,
                    metric=metric,
                    higher_is_better=True,
                    data="lm-eval task" + (f" on {self.described.get(corpus, corpus)}" if corpus else ""),
                    seen_in_healing=corpus in self.healing_corpora,
                )
                measured[entry.name] = entry.values[stage]
        return measured
