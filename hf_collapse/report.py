"""CollapseReport: what a compression run removed, and what each step cost and saved, as measured.

Shared by LaCoOT (blocks) and TLC (activation layers). ``report.save(folder)`` writes ``report.json``,
``report.md`` (a markdown table) and ``tradeoff.png`` (metric against the number of removed units, with the
measured latency on a second axis).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import Budget

__all__ = [
    "DATA_ROLES",
    "STAGES",
    "STOP_REASONS",
    "CollapseReport",
    "CollapseStep",
    "Evaluation",
    "describe_speedup",
    "describe_split",
    "format_count",
    "roles_markdown",
]

#: The stages at which a model is evaluated beyond the budget's metric, in order.
STAGES = ("original", "after removal", "after healing")

#: The roles data plays in a compression, in the order a card lists them, with what each role means. Calibration,
#: validation and test data are kept apart: what decides is never what is reported.
DATA_ROLES = {
    "training": "trained the model before the collapse",
    "calibration": "scored the units and fitted what the method fits",
    "healing": "healed the model after the removal",
    "validation": "decided: the budget's metric, early stops",
    "test": "only reported: no decision was made on it",
}

#: Why a search stopped (``CollapseReport.stopped_by``).
STOP_REASONS = {
    "num_units": "it removed the number of units asked for",
    "flops_fraction": "the FLOPs reached the share asked for",
    "metric": "the next step would have taken the metric over its budget",
    "exhausted": "nothing was left to remove",
}


@dataclass
class CollapseStep:
    """One state of the model during a collapse: step 0 is the uncollapsed model.

    Attributes:
        removed: number of units (blocks, layers) removed so far.
        unit: the unit removed at this step (its name in the original model), ``None`` at step 0.
        score: that unit's score.
        metric: the evaluated metric, when an evaluation function was given.
        params, flops: measured parameters and forward FLOPs.
        latency_s: measured median latency in seconds.
        latency_speedup: the uncollapsed model's latency over this state's, as the median of per-round ratios of
            the two timed side by side (interleaved rounds, so that a passing load hits both); ``None`` at step 0.
        latency_spread: the interquartile range ``[low, high]`` of those per-round ratios.
        reference_latency_s: the uncollapsed model's median latency in the same rounds.
        kept: ``False`` for a step that was tried and rejected because it broke the budget.
        details: method-specific numbers (e.g. TLC's neurons ON/OFF).

    Example::

        >>> collapsed, report = hf_collapse.collapse(model, scores, num_units=2)
        >>> [(step.removed, step.unit) for step in report.steps]
        [(0, None), (1, 'bert.encoder.layer.4'), (2, 'bert.encoder.layer.2')]
        >>> report.steps[-1].params < report.steps[0].params
        True
    """

    removed: int
    unit: str | None
    score: float | None
    metric: float | None
    params: int
    flops: int
    latency_s: float | None
    kept: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    latency_speedup: float | None = None
    latency_spread: list[float] | None = None
    reference_latency_s: float | None = None

    @property
    def latency_significant(self) -> bool | None:
        """Whether the speed-up is measurable: its spread lies wholly above (or below) 1. ``None`` if unmeasured."""
        if self.latency_speedup is None or not self.latency_spread:
            return None
        low, high = self.latency_spread
        return low > 1.0 or high < 1.0


@dataclass
class Evaluation:
    """One measurement of the model beyond the budget's metric, at each stage (:data:`STAGES`): perplexity on a
    corpus, or a zero-shot task's accuracy.

    Attributes:
        name: what is measured, e.g. ``"perplexity on bbc_news"`` or ``"bbc_news_continuation"``.
        metric: the metric's name (``"perplexity"``, ``"acc_norm"``, ...).
        higher_is_better: whether a larger value is better.
        data: the text it is measured on, and which part (e.g. ``"bbc_news, test split"``).
        seen_in_healing: whether that corpus also gave the calibration / healing text (its held-out part is measured
            either way): a model healed on it measures better on it than on other text.
        values: ``{stage: value}``.
        role: ``"test"`` (only reported: the default) or ``"validation"`` (the data that decided the budget).

    Example::

        >>> entry = report.evaluations[0]
        >>> entry.name, entry.values, entry.relative("after healing")
        ('perplexity on wiki', {'original': 24.5, 'after removal': 88.1, 'after healing': 33.0}, 1.347)
    """

    name: str
    metric: str
    higher_is_better: bool
    data: str = ""
    seen_in_healing: bool = False
    values: dict[str, float] = field(default_factory=dict)
    role: str = "test"

    @property
    def final_stage(self) -> str | None:
        """The last stage measured (the saved model's)."""
        return next((s for s in reversed(STAGES) if s in self.values), None)

    def relative(self, stage: str) -> float | None:
        """The value at ``stage`` over the original's: the retained fraction of an accuracy, the factor of a
        perplexity."""
        original, value = self.values.get("original"), self.values.get(stage)
        return value / original if original and value is not None else None


@dataclass
class CollapseReport:
    """The result of :func:`hf_collapse.collapse` (and of TLC's ``compress``).

    Example::

        >>> collapsed, report = hf_collapse.collapse(model, scores, num_units=2)
        >>> print(report.to_markdown())
        >>> report.save("outputs/report")          # report.json, report.md, tradeoff.png
    """

    method: str
    model_class: str
    family: str
    unit_name: str = "blocks"
    metric_name: str | None = None
    higher_is_better: bool = True
    budget: dict[str, Any] = field(default_factory=dict)
    hardware: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    steps: list[CollapseStep] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)
    #: ``{role: description}`` of the data each role of :data:`DATA_ROLES` was played by (what the caller said).
    data_roles: dict[str, str] = field(default_factory=dict)
    #: Why the search stopped (a key of :data:`STOP_REASONS`), ``None`` before it ran.
    stopped_by: str | None = None
    #: Whether the budget was met: ``False`` when a target it set (``num_units``, ``flops_fraction``) was not reached
    #: because nothing was left to remove; ``None`` before the search ran.
    budget_met: bool | None = None

    # -- views ---------------------------------------------------------------------------------------
    @property
    def kept_steps(self) -> list[CollapseStep]:
        return [s for s in self.steps if s.kept]

    @property
    def removed(self) -> list[dict[str, Any]]:
        """The removed units in order, with their scores."""
        return [{"name": s.unit, "score": s.score} for s in self.kept_steps if s.unit is not None]

    @property
    def before(self) -> CollapseStep:
        return self.steps[0]

    @property
    def after(self) -> CollapseStep:
        return self.kept_steps[-1]

    def summary(self) -> dict[str, Any]:
        """Before/after numbers and ratios of the final model."""
        before, after = self.before, self.after
        ratio = lambda a, b: (a / b) if a and b else None  # noqa: E731
        return {
            "removed": after.removed,
            "unit": self.unit_name,
            "metric_before": before.metric,
            "metric_after": after.metric,
            "params_before": before.params,
            "params_after": after.params,
            "flops_before": before.flops,
            "flops_after": after.flops,
            # Side by side when measured so (the same rounds for both), else the two separate medians.
            "latency_s_before": after.reference_latency_s or before.latency_s,
            "latency_s_after": after.latency_s,
            "flops_ratio": ratio(before.flops, after.flops),
            "latency_speedup": after.latency_speedup or ratio(before.latency_s, after.latency_s),
            "latency_spread": after.latency_spread,
            "latency_significant": after.latency_significant,
        }

    def record(
        self,
        name: str,
        stage: str,
        value: float,
        *,
        metric: str,
        higher_is_better: bool,
        data: str = "",
        seen_in_healing: bool = False,
        role: str = "test",
    ) -> Evaluation:
        """Record ``value`` of the evaluation ``name`` at ``stage`` (one of :data:`STAGES`), creating the entry on
        first use; ``role`` is ``"test"`` (only reported) or ``"validation"`` (the data that decided). Returns the
        entry."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
        if role not in ("validation", "test"):
            raise ValueError(f"unknown role {role!r}; accepted: validation, test")
        entry = next((e for e in self.evaluations if e.name == name), None)
        if entry is None:
            entry = Evaluation(name, metric, higher_is_better, data, seen_in_healing, role=role)
            self.evaluations.append(entry)
        entry.values[stage] = float(value)
        return entry

    def record_budget_metric(self, stage: str, value: float) -> Evaluation:
        """Record the budget's metric at ``stage`` on the data that decided it (``data_roles["validation"]``): the
        search measured the original and the collapsed model (recorded with the first call); a job records it after
        healing too."""

        def record(at: str, measured: float) -> Evaluation:
            return self.record(
                f"{self.metric_name or 'metric'} (the budget's)",
                at,
                measured,
                metric=self.metric_name or "metric",
                higher_is_better=self.higher_is_better,
                data=self.data_roles.get("validation", ""),
                role="validation",
            )

        if not any(e.role == "validation" for e in self.evaluations) and self.steps:
            for known, measured in (("original", self.before.metric), ("after removal", self.after.metric)):
                if measured is not None and known != stage:
                    record(known, measured)
        return record(stage, value)

    def budget_evaluation(self) -> Evaluation | None:
        """The budget's metric at each stage, on the data that decided it: the row recorded with
        :meth:`record_budget_metric`, else one made of the search's first and last kept states (``None`` without a
        metric)."""
        recorded = next((e for e in self.evaluations if e.role == "validation"), None)
        if recorded is not None:
            return recorded
        if not self.steps or self.before.metric is None or self.after.metric is None:
            return None
        return Evaluation(
            f"{self.metric_name or 'metric'} (the budget's)",
            self.metric_name or "metric",
            self.higher_is_better,
            self.data_roles.get("validation", ""),
            values={"original": self.before.metric, "after removal": self.after.metric},
            role="validation",
        )

    def results(self) -> list[Evaluation]:
        """Every measurement at each stage: the budget's metric on the data that decided it, then what was measured
        on test data (:attr:`evaluations`)."""
        budget = self.budget_evaluation()
        rest = [e for e in self.evaluations if e is not budget]
        return ([budget] if budget is not None else []) + rest

    def headline(self) -> Evaluation | None:
        """The result to show first: the saved model's (last stage's) value on **test** data, the first test row
        recorded; without test rows, the budget's metric (on the data that decided it: say so), ``None`` without
        any."""
        tested = [e for e in self.evaluations if e.role == "test" and e.final_stage is not None]
        return tested[0] if tested else self.budget_evaluation()

    def evaluations_markdown(self) -> str:
        """Every result (:meth:`results`) as a markdown table: the role of its data, each stage's value and the last
        stage relative to the original (``""`` when there are none)."""
        results = self.results()
        if not results:
            return ""
        stages = [s for s in STAGES if any(s in e.values for e in results)]
        last = stages[-1]
        lines = [
            f"| measured | data | role | {' | '.join(stages)} | {last} / original |",
            f"| --- | --- | --- | {' | '.join('---:' for _ in stages)} | ---: |",
        ]
        for e in results:
            relative = e.relative(last)
            shown = "" if relative is None else f"{relative:.3f}" + ("x" if e.metric == "perplexity" else "")
            fitted = " (its training part fitted the model)" if e.seen_in_healing else ""
            data = (e.data or "not described") + fitted
            role = "validation (decided)" if e.role == "validation" else "test (reported only)"
            cells = " | ".join(_fmt(e.values.get(s), 2 if e.metric == "perplexity" else 4) for s in stages)
            name = e.name if e.metric in e.name else f"{e.name} ({e.metric})"
            lines.append(f"| {name} | {data} | {role} | {cells} | {shown} |")
        return "\n".join(lines)

    def roles_markdown(self) -> str:
        """Which data played which role (:data:`DATA_ROLES`), as a markdown list (``""`` when none was said)."""
        return roles_markdown(self.data_roles)

    def budget_sentence(self) -> str:
        """What the budget asked, why the search stopped, and whether that met it, in one sentence."""
        asked = ", ".join(f"{k} = {v}" for k, v in self.budget.items()) or "none"
        if self.stopped_by is None:
            return f"Budget: {asked}."
        sentence = f"Budget: {asked}; the search stopped because {STOP_REASONS.get(self.stopped_by, self.stopped_by)}"
        if self.budget_met is False:
            reached = f"{self.after.removed} {self.unit_name}"
            if self.budget.get("flops_fraction") and self.before.flops:
                reached += f", {self.after.flops / self.before.flops:.2f} of the original FLOPs"
            return f"{sentence}: **the budget was not met** (reached {reached})."
        return sentence + "."

    def pool_reference_latency(self) -> None:
        """Make step 0's latency the median of all its timings: the original was timed again beside every kept
        state (``reference_latency_s``), so its own latency is best estimated over all those rounds."""
        paired = [s.reference_latency_s for s in self.steps if s.reference_latency_s is not None]
        if paired and self.steps and self.steps[0].latency_s is not None:
            self.steps[0].latency_s = statistics.median([self.steps[0].latency_s, *paired])

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["removed"] = self.removed
        data["summary"] = self.summary()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollapseReport:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["steps"] = [CollapseStep(**step) for step in data.get("steps", [])]
        kwargs["evaluations"] = [Evaluation(**entry) for entry in data.get("evaluations", [])]
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> CollapseReport:
        path = Path(path)
        return cls.from_dict(json.loads((path / "report.json" if path.is_dir() else path).read_text()))

    def to_markdown(self) -> str:
        metric = self.metric_name or "metric"
        lines = [
            f"| {self.unit_name} removed | removed | score | {metric} | parameters | FLOPs | latency (ms) | "
            "speed-up (side by side) | kept |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
        ]
        for s in self.steps:
            speedup = describe_speedup(
                {
                    "latency_speedup": s.latency_speedup,
                    "latency_spread": s.latency_spread,
                    "latency_significant": s.latency_significant,
                }
            )
            lines.append(
                f"| {s.removed} | {s.unit or '(original)'} | {_fmt(s.score)} | {_fmt(s.metric)} | {s.params:,} | "
                f"{format_count(s.flops)} | {_fmt(s.latency_s * 1e3 if s.latency_s is not None else None, 2)} | "
                f"{speedup} | {'yes' if s.kept else 'no (over budget)'} |"
            )
        if self.hardware:
            lines.append(f"\nLatency measured on {self.hardware}.")
        if self.stopped_by is not None:
            lines.append(f"\n{self.budget_sentence()}")
        if self.evaluations:
            lines.append(f"\n## Results at each stage\n\n{self.evaluations_markdown()}")
        if self.data_roles:
            lines.append(f"\n## Data\n\n{self.roles_markdown()}")
        return "\n".join(lines)

    def _metric_limits(self) -> list[tuple[float, str]]:
        """The metric values the budget allows, with their legend labels (none without a metric budget)."""
        budget = Budget.from_dict(self.budget or {}, self.higher_is_better)
        return budget.metric_limits(self.before.metric) if budget is not None else []

    def plot(self, path: str | Path) -> Path:
        """Write the trade-off plot (metric and latency against units removed, the metric budget as a line, the
        legend below the axes) as PNG."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def figure(self):
        """The trade-off plot as a matplotlib ``Figure`` (what :meth:`plot` writes); close it when done."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = self.kept_steps
        xs = [s.removed for s in steps]
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        if any(s.metric is not None for s in steps):
            ax.plot(xs, [s.metric for s in steps], "o-", color="tab:blue", label=self.metric_name or "metric")
            ax.set_ylabel(self.metric_name or "metric", color="tab:blue")
            rejected = [s for s in self.steps if not s.kept]
            if rejected:
                ax.plot(
                    [s.removed for s in rejected],
                    [s.metric for s in rejected],
                    "x",
                    color="tab:red",
                    label="rejected (over budget)",
                )
            for limit, label in self._metric_limits():
                ax.axhline(limit, color="tab:red", linestyle=":", linewidth=1, label=label)
        else:
            ax.plot(xs, [s.flops / 1e9 for s in steps], "o-", color="tab:blue", label="GFLOPs")
            ax.set_ylabel("GFLOPs", color="tab:blue")
        ax.set_xlabel(f"{self.unit_name} removed")
        ax.set_xticks(sorted(set(xs + [s.removed for s in self.steps])))
        handles, labels = ax.get_legend_handles_labels()
        if any(s.latency_s is not None for s in steps):
            twin = ax.twinx()
            twin.plot(
                xs,
                [s.latency_s * 1e3 if s.latency_s else None for s in steps],
                "s--",
                color="tab:orange",
                label="latency (ms)",
            )
            twin.set_ylabel("latency (ms)", color="tab:orange")
            extra_handles, extra_labels = twin.get_legend_handles_labels()
            handles, labels = handles + extra_handles, labels + extra_labels
        ax.set_title(f"{self.method}: {self.model_class}")
        ax.grid(alpha=0.3)
        if handles:  # below the axes, never over the data
            fig.legend(handles, labels, loc="lower center", ncol=min(len(handles), 4), frameon=False, fontsize=8)
            fig.tight_layout(rect=(0, 0.08, 1, 1))
        else:
            fig.tight_layout()
        return fig

    def save(self, folder: str | Path) -> Path:
        """Write ``report.json``, ``report.md`` and ``tradeoff.png`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(self.to_json() + "\n")
        (folder / "report.md").write_text(f"# Collapse report: {self.method}\n\n{self.to_markdown()}\n")
        self.plot(folder / "tradeoff.png")
        return folder


def roles_markdown(data_roles: dict[str, str]) -> str:
    """``{role: description}`` (:data:`DATA_ROLES`) as a markdown list, in the roles' order (``""`` for none)."""
    return "\n".join(
        f"- **{role}** ({meaning}): {data_roles[role]}" for role, meaning in DATA_ROLES.items() if data_roles.get(role)
    )


def describe_split(dataset: Any) -> str:
    """Where a split of :func:`hf_collapse.data.load_splits` / :func:`~hf_collapse.data.prepare_task` comes from and
    which part it is, e.g. ``"dialog_topics: 20% of the train split, carved out (seed 0)"`` (its
    ``info.description``, kept through ``map``, ``select`` and the other ``datasets`` operations; ``""`` for data that
    was not described, or that is no ``datasets.Dataset``)."""
    info = getattr(dataset, "info", None)
    return (getattr(info, "description", None) or "") if info is not None else ""


def describe_speedup(summary: dict[str, Any]) -> str:
    """``"1.46x faster (1.41-1.52)"``, or ``"no measurable change (x0.97, 0.90-1.05)"`` when the spread of the
    side-by-side ratios includes 1: a ratio below 1 for a smaller model is then noise, not a slow-down.

    Example::

        >>> from hf_collapse.report import describe_speedup
        >>> describe_speedup(report.summary())
        '1.46x faster (1.41-1.52)'
    """
    speedup, spread = summary.get("latency_speedup"), summary.get("latency_spread")
    if not speedup:
        return ""
    if not spread:
        return f"{speedup:.2f}x faster"
    interval = f"{spread[0]:.2f}-{spread[1]:.2f}"
    if summary.get("latency_significant") is False:
        return f"no measurable change (x{speedup:.2f}, {interval})"
    return f"{speedup:.2f}x {'faster' if speedup >= 1 else 'slower'} ({interval})"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_count(value: float) -> str:
    """``22.7M``, ``2.7G``: a count in thousands / millions / billions (one decimal).

    A value below 1000 is returned as ``str(value)``, unrounded.

    Example::

        >>> from hf_collapse.report import format_count
        >>> format_count(22_713_216), format_count(2_718_203_904), format_count(512)
        ('22.7M', '2.7G', '512')
    """
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < (1000 if not unit else 999.95):  # 999_950 is "1.0M", not "1000.0K"
            return f"{value:.1f}{unit}" if unit else str(value)
        value /= 1000
    return f"{value:.1f}P"
