"""Model cards that say what was removed and what it cost, and pushing collapsed models to the Hub.

``model_card`` builds a ``huggingface_hub.ModelCard`` from the template in ``hf_collapse/model_cards/``: metadata
(``base_model``, ``library_name``, tags, ``model-index`` with the evaluation result), a compression table with
parameters, FLOPs and measured latency before and after (and the hardware they were measured on), the
trade-off plot, how the model was trained, and the exact loading code: plain ``from_pretrained`` when the
config expresses the change, ``AutoCollapsedModel`` otherwise. Diffusers pipelines are saved and pushed whole; their
loading code passes the components that need ``AutoCollapsedModel`` to the pipeline's ``from_pretrained``.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .architectures.base import unwrap_model
from .distributed import is_main_process
from .report import CollapseReport, Evaluation, describe_speedup, format_count, roles_markdown
from .surgery import COLLAPSED_ADAPTER_MESSAGE, collapse_record, is_peft_model, model_class_name

__all__ = [
    "collapsed_components",
    "headline_sentence",
    "loading_code",
    "model_card",
    "push_to_hub",
    "save_with_card",
]

#: The model card template, package data of hf_collapse (installed with it, wheel or editable).
TEMPLATE = resources.files(__package__).joinpath("model_cards", "collapsed_model.md")


def _template_text() -> str:
    """The card template's text; a missing template is an error (an incomplete install), never a stripped card."""
    try:
        return TEMPLATE.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the model card template {TEMPLATE} is missing: this hf_collapse install is "
            "incomplete (reinstall the package; the template ships as package data)"
        ) from error


def _library(model: nn.Module) -> str:
    return "peft" if is_peft_model(model) else model_class_name(model).split(".")[0]


def _is_pipeline(model: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(model, DiffusionPipeline)


def collapsed_components(pipeline: Any) -> dict[str, nn.Module]:
    """The components of a diffusers pipeline that carry an hf_collapse record, by component name.

    Example::

        >>> pipe.transformer = collapsed_dit
        >>> list(hf_collapse.hub.collapsed_components(pipe))
        ['transformer']
    """
    return {
        name: component
        for name, component in pipeline.components.items()
        if isinstance(component, nn.Module) and collapse_record(component) is not None
    }


def plain_reload_exact(model: Any) -> bool:
    """Whether plain ``from_pretrained`` rebuilds ``model`` (every collapsed component of a pipeline) exactly."""
    if _is_pipeline(model):
        return all(plain_reload_exact(c) for c in collapsed_components(model).values())
    record = collapse_record(model)
    return record is None or bool(record.get("plain_reload_exact"))


def _components_to_replay(pipeline: Any) -> list[str]:
    """The collapsed components whose config cannot express their edits (loaded with AutoCollapsedModel)."""
    return [name for name, c in collapsed_components(pipeline).items() if not plain_reload_exact(c)]


def _pipeline_loading_code(pipeline: Any, repo_or_path: str) -> str:
    import diffusers

    cls = type(pipeline).__name__
    cls = cls if getattr(diffusers, cls, None) is type(pipeline) else "DiffusionPipeline"
    replayed = _components_to_replay(pipeline)
    lines = ["import hf_collapse  # pip install hf_collapse"] if replayed else []
    lines += [f"from diffusers import {cls}", ""]
    lines += [
        f'{name} = hf_collapse.AutoCollapsedModel.from_pretrained("{repo_or_path}", subfolder="{name}")'
        for name in replayed
    ]
    components = "".join(f", {name}={name}" for name in replayed)
    lines.append(f'pipe = {cls}.from_pretrained("{repo_or_path}"{components})')
    return "\n".join(lines)


def loading_code(model: Any, repo_or_path: str) -> str:
    """The code that loads ``model`` back from ``repo_or_path`` exactly (an adapter: onto its base model; a
    diffusers pipeline: as ``pipe``, its non-plain collapsed components through ``AutoCollapsedModel``).

    Example::

        >>> print(hf_collapse.hub.loading_code(collapsed_bert, "me/bert-collapsed"))
        from transformers import BertForSequenceClassification
        <BLANKLINE>
        model = BertForSequenceClassification.from_pretrained("me/bert-collapsed")
    """
    if _is_pipeline(model):
        return _pipeline_loading_code(model, repo_or_path)
    cls = model_class_name(model).split(".")[1]
    if is_peft_model(model):
        if collapse_record(model) is not None:
            # The adapter's base (adapter_config.json) is not the collapsed model: no code loads this back.
            raise ValueError(COLLAPSED_ADAPTER_MESSAGE.format(cls=cls))
        config = model.peft_config[model.active_adapter]
        base = config.base_model_name_or_path or "<the base model>"
        library = model_class_name(model).split(".")[0]
        return (
            "import hf_collapse.trady  # registers TraDy with peft\nfrom peft import PeftModel\n"
            f"from {library} import {cls}\n\n"
            f'base = {cls}.from_pretrained("{base}")\nmodel = PeftModel.from_pretrained(base, "{repo_or_path}")'
        )
    library = _library(model)
    if plain_reload_exact(model):
        return f'from {library} import {cls}\n\nmodel = {cls}.from_pretrained("{repo_or_path}")'
    return (
        "import hf_collapse  # pip install hf_collapse\n\n"
        f'model = hf_collapse.AutoCollapsedModel.from_pretrained("{repo_or_path}")  # -> {cls}'
    )


def _count_of(count: int, unit_name: str) -> str:
    """``"1 block"``, ``"3 blocks"``, ``"1 activation layer"``."""
    return f"{count} {unit_name[:-1] if count == 1 and unit_name.endswith('s') else unit_name}"


def _table(report: CollapseReport) -> str:
    """Size and speed, the original against the collapsed model (healing changes neither): what the model costs.
    What it computes is in the results (:func:`_results_section`), stage by stage."""
    s = report.summary()
    rows = [
        (
            "parameters",
            format_count(s["params_before"]),
            format_count(s["params_after"]),
            f"{s['params_before'] / s['params_after']:.2f}x fewer",
        ),
        (
            "forward FLOPs",
            format_count(s["flops_before"]),
            format_count(s["flops_after"]),
            f"{s['flops_ratio']:.2f}x fewer" if s["flops_ratio"] else "",
        ),
    ]
    if s["latency_s_before"] and s["latency_s_after"]:
        rows.append(
            (
                "latency (ms)",
                f"{s['latency_s_before'] * 1e3:.2f}",
                f"{s['latency_s_after'] * 1e3:.2f}",
                describe_speedup(s),
            )
        )
    lines = ["| | original | this model | change |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    lines.append(
        f"\n{_count_of(s['removed'], report.unit_name)} removed. {report.budget_sentence()} FLOPs counted with "
        "`torch.utils.flop_counter` on "
        "one example input; latency is the median of timed runs after warm-up, the collapsed and the original "
        f"model timed side by side in interleaved rounds, on {report.hardware or 'n/a'}."
    )
    return "\n".join(lines)


def _value(entry: Evaluation, stage: str) -> str:
    return f"{entry.values[stage]:.{2 if entry.metric == 'perplexity' else 4}f}"


def headline_sentence(report: CollapseReport) -> str:
    """The card's first result: the saved model's metric on test data (:meth:`CollapseReport.headline`), or, when no
    test data was measured, the budget's metric said to be on the data that decided."""
    entry = report.headline()
    if entry is None or entry.final_stage is None:
        return ""
    stage = entry.final_stage
    value = f"**{entry.metric} {_value(entry, stage)}**"
    data = entry.data or "data that was not described"
    original = f"; the original model: {_value(entry, 'original')}" if "original" in entry.values else ""
    if entry.role == "test":
        return (
            f"Result of this model ({stage}): {value} on {data} (test data: only reported, never used for a "
            f"decision){original}."
        )
    return (
        f"Result of this model ({stage}): {value} on {data}, the data that decided the budget: no untouched test "
        f"data was measured, so this number flatters the model; evaluate it on your own test data{original}."
    )


def _eval_results(report: CollapseReport, datasets: list[str] | None):
    """``model-index`` results: the saved model's value of every test measurement (one per dataset and metric); the
    budget's metric (on validation data, so said) only when nothing was measured on test data."""
    from huggingface_hub import EvalResult

    tested = [e for e in report.evaluations if e.role == "test" and e.final_stage is not None]
    entries = tested or [e for e in [report.budget_evaluation()] if e is not None and e.final_stage is not None]
    results = []
    for entry in entries:
        corpus = entry.name.removeprefix(f"{entry.metric} on ")
        if entry.role == "validation":
            corpus = str(report.extra.get("dataset", (datasets or ["custom"])[0]))
        results.append(
            EvalResult(
                task_type="text-generation" if entry.metric == "perplexity" else "other",
                dataset_type=corpus,
                dataset_name=entry.data or corpus,
                dataset_split=entry.role,
                metric_type=entry.metric,
                metric_name=f"{entry.metric} ({entry.final_stage})",
                metric_value=float(entry.values[entry.final_stage]),
            )
        )
    return results or None


def model_card(
    model: Any,
    report: CollapseReport | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    training: str | None = None,
    model_name: str | None = None,
    data_roles: dict[str, str] | None = None,
):
    """A ``huggingface_hub.ModelCard`` for a collapsed (or TraDy-tuned) model, or a diffusers pipeline that holds one.

    Args:
        model: the collapsed model, a peft adapter model, or a diffusers pipeline with a collapsed component.
        report: its :class:`CollapseReport` (compression table, removed units, evaluation result).
        repo_id: where it will live (used in the loading code; default: a local path placeholder).
        base_model: the Hub id of the model it was compressed from.
        datasets: Hub ids of the data it was trained / evaluated on.
        training: a sentence on how it was trained (default: built from the report's settings).
        model_name: the card's title (default: from ``repo_id``, else the model class).
        data_roles: ``{role: description}`` of the data (:data:`hf_collapse.report.DATA_ROLES`), for a model without
            a report (a TraDy adapter); a report carries its own (``report.data_roles``).

    Example::

        >>> card = hf_collapse.hub.model_card(collapsed, report, repo_id="me/minilm-collapsed")
        >>> card.save("out/README.md")
    """
    from huggingface_hub import ModelCard, ModelCardData

    method = (
        report.method
        if report
        else (str(next(iter(model.peft_config.values())).peft_type) if is_peft_model(model) else "hf_collapse")
    )
    tags = ["hf-collapse", method.lower()]
    eval_results = _eval_results(report, datasets) if report is not None else None
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"{type(unwrap_model(model)).__name__}-collapsed")
    if base_model is None and is_peft_model(model):
        base_model = next(iter(model.peft_config.values())).base_model_name_or_path
    card_data = ModelCardData(
        base_model=base_model,
        library_name=_library(model),
        tags=tags,
        datasets=datasets,
        model_name=name,
        eval_results=eval_results,
    )
    if report is not None:
        extra = ", ".join(f"{k} = {v}" for k, v in report.extra.items() if v is not None)
        removed = "\n".join(f"- `{r['name']}` (score {r['score']:.4g})" for r in report.removed)
        described = f"{report.model_class.split('.')[-1]} ({report.family} family)"
        removed_count = _count_of(report.after.removed, report.unit_name)
        summary = f"{described} with {removed_count} removed by {method}."
        if _is_pipeline(model):
            summary = (
                f"A {type(model).__name__} whose `{_reported_component(model, report)}` component, a "
                f"{described}, has {removed_count} removed by {method}. The tables below are that component's."
            )
        kwargs = dict(
            summary=summary,
            headline=headline_sentence(report),
            compression_table=_table(report),
            removed_list=f"Removed, in order (lowest score first):\n\n{removed}" if removed else "",
            plot="![Trade-off: metric and latency against units removed](tradeoff.png)",
            results=_results_section(report),
            data=_data_section({**(data_roles or {}), **report.data_roles}),
            training=training or f"Method: {method}. Budget: {report.budget}. Settings: {extra or 'n/a'}.",
        )
    else:
        kwargs = dict(
            summary=f"{type(unwrap_model(model)).__name__} prepared with hf_collapse.",
            headline="",
            compression_table="No collapse report was given.",
            removed_list="",
            plot="",
            results="No collapse report was given: nothing was measured.",
            data=_data_section(data_roles or {}),
            training=training or "",
        )
    target = repo_id or "path/to/this/folder"
    note = (
        "This repository holds a peft adapter: load it onto its base model with `PeftModel.from_pretrained`."
        if is_peft_model(model)
        else _pipeline_note(model)
        if _is_pipeline(model)
        else "The config expresses the change, so plain `from_pretrained` rebuilds the model exactly."
        if plain_reload_exact(model)
        else "The config alone cannot express this change (it is recorded under the `hf_collapse` key of "
        "`config.json`): load it with `hf_collapse.AutoCollapsedModel`, which replays the recorded edits."
    )
    recorded = collapsed_components(model) if _is_pipeline(model) else collapse_record(model) is not None
    if _library(model) == "diffusers" and plain_reload_exact(model) and recorded:
        note += _DIFFUSERS_RECORD_NOTE
    content_kwargs = dict(
        model_name=name, method=method, loading_code=loading_code(model, target), loading_note=note, **kwargs
    )
    return ModelCard.from_template(card_data, template_str=_template_text(), **content_kwargs)


def _results_section(report: CollapseReport) -> str:
    """Every measurement at every stage (original, after removal, after healing), each row naming its data and that
    data's role, and which corpora healed the model."""
    table = report.evaluations_markdown()
    if not table:
        return "No metric was measured."
    # the corpora, as the rows measured on a corpus name them ("perplexity on wiki", "accuracy on dialog_topics")
    corpora = {
        e.name.removeprefix(f"{e.metric} on "): e.seen_in_healing
        for e in report.evaluations
        if e.role == "test" and e.name.startswith(f"{e.metric} on ")
    }
    healed_on = sorted(name for name, seen in corpora.items() if seen)
    others = sorted(name for name, seen in corpora.items() if not seen)
    lines = [
        "The budget's metric is measured on the data that decided the budget; every other row on test data, which "
        "no decision used. The last column is the final model over the original (a perplexity factor, or the share "
        "of an accuracy kept)."
    ]
    if healed_on:
        heal = report.extra.get("heal")
        did = f"healed the model ({heal})" if heal else "calibrated the model"
        sentence = f"The training part of {', '.join(healed_on)} {did}"
        if others:
            sentence += f"; {', '.join(others)} {'is' if len(others) == 1 else 'are'} text of a kind it never saw"
        lines.append(sentence + ".")
    return "\n\n".join([*lines, table])


def _data_section(data_roles: dict[str, str]) -> str:
    roles = roles_markdown(data_roles)
    if roles:
        return f"Which data played which role (calibration, validation and test data are kept apart):\n\n{roles}"
    return (
        "Not recorded: the code that made this model did not say which data calibrated it, which decided the budget "
        "and which measured it (`report.data_roles`)."
    )


_DIFFUSERS_RECORD_NOTE = (
    " diffusers logs that it ignores the `hf_collapse` config attribute while loading: that "
    "attribute is the record of the edits (metadata), not needed to rebuild the model."
)


def _reported_component(pipeline: Any, report: CollapseReport) -> str:
    collapsed = collapsed_components(pipeline)
    matching = [name for name, c in collapsed.items() if model_class_name(c) == report.model_class]
    if not matching:
        raise ValueError(
            f"the report is about a {report.model_class}, but the pipeline has no collapsed component "
            f"of that class (collapsed: {sorted(collapsed) or 'none'})"
        )
    return matching[0]


def _pipeline_note(pipeline: Any) -> str:
    replayed = _components_to_replay(pipeline)
    if not replayed:
        return (
            "The components' configs express the change, so the pipeline's plain `from_pretrained` rebuilds it exactly."
        )
    names = ", ".join(f"`{name}`" for name in replayed)
    return (
        f"The config of {names} alone cannot express this change (it is recorded under the `hf_collapse` key of "
        "its `config.json`): load that component with `hf_collapse.AutoCollapsedModel` (it replays the recorded "
        "edits) and pass it to the pipeline's `from_pretrained`."
    )


def save_with_card(
    model: Any,
    folder: str | os.PathLike,
    report: CollapseReport | None = None,
    processor: Any = None,
    **card_kwargs: Any,
) -> Path:
    """``save_pretrained`` the model (and processor), its card as ``README.md``, and the report's plot.

    ``model`` may be a diffusers pipeline whose component was collapsed: the pipeline is saved as a whole (its
    scheduler, tokenizer and other components included, so ``processor`` must be ``None``).

    Example::

        >>> folder = hf_collapse.hub.save_with_card(collapsed, "outputs/collapsed", report, processor=tokenizer)
        >>> sorted(p.name for p in folder.iterdir())  # config, weights, tokenizer files, README.md, tradeoff.png...
    """
    folder = Path(folder)
    if processor is not None and _is_pipeline(model):
        raise ValueError("a diffusers pipeline saves its own scheduler / tokenizer / processors: pass processor=None")
    (model if is_peft_model(model) else unwrap_model(model)).save_pretrained(folder)  # an adapter stays an adapter
    if processor is not None:
        processor.save_pretrained(folder)
    if report is not None:
        report.plot(folder / "tradeoff.png")
        (folder / "collapse_report.json").write_text(report.to_json() + "\n")
    model_card(model, report, **card_kwargs).save(folder / "README.md")
    return folder


def push_to_hub(
    model: Any,
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

    ``model`` may also be a diffusers pipeline whose component (``transformer``, ``unet``) was collapsed: the
    whole pipeline is pushed, and the card's loading code rebuilds it (see :func:`save_with_card`).

    Returns the URL of the commit.

    Example::

        >>> hf_collapse.push_to_hub(collapsed, "me/minilm-collapsed", report=report, processor=tokenizer,
        ...                         base_model="sentence-transformers/all-MiniLM-L6-v2")
        >>> pipe.transformer = collapsed_dit                  # a diffusers pipeline with a collapsed component
        >>> hf_collapse.push_to_hub(pipe, "me/dit-collapsed", report=report, base_model="facebook/DiT-XL-2-256")
    """
    if not is_main_process():
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_with_card(model, tmp, report, processor, repo_id=repo_id, **card_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model"
        )
    return getattr(info, "commit_url", None) or str(info)
