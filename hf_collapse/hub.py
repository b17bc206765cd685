"""Model cards that say what was removed and what it cost, and pushing collapsed models to the Hub.

``model_card`` builds a ``huggingface_hub.ModelCard`` from the template in ``model_cards/``: metadata
(``base_model``, ``library_name``, tags, ``model-index`` with the evaluation result), a compression table with
parameters, FLOPs and measured latency before and after (and the hardware they were measured on), the
trade-off plot, how the model was trained, and the exact loading code: plain ``from_pretrained`` when the
config expresses the change, ``AutoCollapsedModel`` otherwise.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .architectures.base import unwrap_model
from .report import CollapseReport, format_count
from .surgery import collapse_record, model_class_name

__all__ = ["loading_code", "model_card", "push_to_hub", "save_with_card"]

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "collapsed_model.md"
_FALLBACK_TEMPLATE = "---\n{{ card_data }}\n---\n\n# {{ model_name }}\n\n{{ summary }}\n\n{{ compression_table }}\n\n" \
                     "```python\n{{ loading_code }}\n```\n"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _library(model: nn.Module) -> str:
    return "peft" if _is_peft(model) else model_class_name(model).split(".")[0]


def plain_reload_exact(model: nn.Module) -> bool:
    record = collapse_record(model)
    return record is None or bool(record.get("plain_reload_exact"))


def loading_code(model: nn.Module, repo_or_path: str) -> str:
    """The code that loads ``model`` back from ``repo_or_path`` exactly (an adapter: onto its base model)."""
    cls = model_class_name(model).split(".")[1]
    if _is_peft(model):
        config = model.peft_config[model.active_adapter]
        base = config.base_model_name_or_path or "<the base model>"
        library = model_class_name(model).split(".")[0]
        return (f"import hf_collapse  # registers TraDy with peft\nfrom peft import PeftModel\nfrom {library} import {cls}\n\n"
                f"base = {cls}.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"{repo_or_path}\")")
    library = _library(model)
    if plain_reload_exact(model):
        return f"from {library} import {cls}\n\nmodel = {cls}.from_pretrained(\"{repo_or_path}\")"
    return ("import hf_collapse  # pip install hf_collapse\n\n"
            f"model = hf_collapse.AutoCollapsedModel.from_pretrained(\"{repo_or_path}\")  # -> {cls}")


def _table(report: CollapseReport) -> str:
    s = report.summary()
    rows = [("parameters", format_count(s["params_before"]), format_count(s["params_after"]),
             f"{s['params_before'] / s['params_after']:.2f}x fewer"),
            ("forward FLOPs", format_count(s["flops_before"]), format_count(s["flops_after"]),
             f"{s['flops_ratio']:.2f}x fewer" if s["flops_ratio"] else "")]
    if s["latency_s_before"] and s["latency_s_after"]:
        rows.append(("latency (ms)", f"{s['latency_s_before'] * 1e3:.2f}", f"{s['latency_s_after'] * 1e3:.2f}",
                     f"{s['latency_speedup']:.2f}x faster"))
    if s["metric_before"] is not None and s["metric_after"] is not None:
        rows.append((report.metric_name or "metric", f"{s['metric_before']:.4f}", f"{s['metric_after']:.4f}",
                     f"{s['metric_after'] - s['metric_before']:+.4f}"))
    lines = ["| | before | after | change |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    lines.append(f"\n{s['removed']} {report.unit_name} removed. FLOPs counted with `torch.utils.flop_counter` on "
                 f"one example input; latency is the median of timed runs after warm-up on {report.hardware or 'n/a'}.")
    return "\n".join(lines)


def model_card(
    model: nn.Module,
    report: CollapseReport | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    training: str | None = None,
    model_name: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` for a collapsed (or TraDy-tuned) model.

    Args:
        model: the collapsed model.
        report: its :class:`CollapseReport` (compression table, removed units, evaluation result).
        repo_id: where it will live (used in the loading code; default: a local path placeholder).
        base_model: the Hub id of the model it was compressed from.
        datasets: Hub ids of the data it was trained / evaluated on.
        training: a sentence on how it was trained (default: built from the report's settings).

    Example::

        >>> card = hf_collapse.hub.model_card(collapsed, report, repo_id="me/minilm-collapsed")
        >>> card.save("out/README.md")
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    method = report.method if report else (str(next(iter(model.peft_config.values())).peft_type)
                                           if _is_peft(model) else "hf_collapse")
    tags = ["hf-collapse", method.lower()]
    eval_results = None
    if report is not None and report.after.metric is not None and report.metric_name:
        eval_results = [EvalResult(task_type="other", dataset_type=(datasets or ["custom"])[0],
                                   dataset_name=str(report.extra.get("dataset", (datasets or ["custom"])[0])),
                                   metric_type=report.metric_name, metric_value=float(report.after.metric))]
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"{type(unwrap_model(model)).__name__}-collapsed")
    if base_model is None and _is_peft(model):
        base_model = next(iter(model.peft_config.values())).base_model_name_or_path
    card_data = ModelCardData(base_model=base_model, library_name=_library(model), tags=tags, datasets=datasets,
                              model_name=name, eval_results=eval_results)
    if report is not None:
        extra = ", ".join(f"{k} = {v}" for k, v in report.extra.items() if v is not None)
        removed = "\n".join(f"- `{r['name']}` (score {r['score']:.4g})" for r in report.removed)
        kwargs = dict(
            summary=f"{report.model_class.split('.')[-1]} ({report.family} family) with "
                    f"{report.after.removed} {report.unit_name} removed by {method}.",
            compression_table=_table(report),
            removed_list=f"Removed, in order (lowest score first):\n\n{removed}" if removed else "",
            plot="![Trade-off: metric and latency against units removed](tradeoff.png)",
            training=training or f"Method: {method}. Budget: {report.budget}. Settings: {extra or 'n/a'}.",
        )
    else:
        kwargs = dict(summary=f"{type(unwrap_model(model)).__name__} prepared with hf_collapse.",
                      compression_table="No collapse report was given.", removed_list="", plot="",
                      training=training or "")
    target = repo_id or "path/to/this/folder"
    note = ("This repository holds a peft adapter: load it onto its base model with `PeftModel.from_pretrained`."
            if _is_peft(model) else
            "The config expresses the change, so plain `from_pretrained` rebuilds the model exactly."
            if plain_reload_exact(model) else
            "The config alone cannot express this change (it is recorded under the `hf_collapse` key of "
            "`config.json`): load it with `hf_collapse.AutoCollapsedModel`, which replays the recorded edits.")
    template = str(TEMPLATE) if TEMPLATE.is_file() else None
    content_kwargs = dict(model_name=name, method=method, loading_code=loading_code(model, target),
                          loading_note=note, **kwargs)
    if template:
        return ModelCard.from_template(card_data, template_path=template, **content_kwargs)
    return ModelCard.from_template(card_data, template_str=_FALLBACK_TEMPLATE, **content_kwargs)


def save_with_card(model: nn.Module, folder: str | os.PathLike, report: CollapseReport | None = None,
                   processor: Any = None, **card_kwargs: Any) -> Path:
    """``save_pretrained`` the model (and processor), its card as ``README.md``, and the report's plot."""
    folder = Path(folder)
    (model if _is_peft(model) else unwrap_model(model)).save_pretrained(folder)  # an adapter stays an adapter
    if processor is not None:
        processor.save_pretrained(folder)
    if report is not None:
        report.plot(folder / "tradeoff.png")
        (folder / "collapse_report.json").write_text(report.to_json() + "\n")
    model_card(model, report, **card_kwargs).save(folder / "README.md")
    return folder


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # accelerate not initialised: a single process
        return int(os.environ.get("RANK", "0")) == 0


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    report: CollapseReport | None = None,
    processor: Any = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload model compressed with hf_collapse",
    **card_kwargs: Any,
) -> str | None:
    """Save the model (and tokenizer / image processor / scheduler), write its card, create the repository and
    upload the folder with ``huggingface_hub``. Only the main process pushes; the others return ``None``.

    Returns the URL of the commit.

    Example::

        >>> hf_collapse.push_to_hub(collapsed, "me/minilm-collapsed", report=report, processor=tokenizer,
        ...                         base_model="sentence-transformers/all-MiniLM-L6-v2")
    """
    if not _is_main_process():
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_with_card(model, tmp, report, processor, repo_id=repo_id, **card_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 repo_type="model")
    return getattr(info, "commit_url", None) or str(info)
