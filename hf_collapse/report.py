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

__all__ = ["STAGES", "CollapseReport", "CollapseStep", "Evaluation", "describe_speedup", "format_count"]

#: The stages at which a model is evaluated beyond the budget's metric, in order.
STAGES = ("original", "after removal", "after healing")


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
    ) -> Evaluation:
        """Record ``value`` of the evaluation ``name`` at ``stage`` (one of :data:`STAGES`), creating the entry on
        first use. Returns the entry."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
        entry = next((e for e in self.evaluations if e.name == name), None)
        if entry is None:
            entry = Evaluation(name, metric, higher_is_better, data, seen_in_healing)
            self.evaluations.append(entry)
        entry.values[stage] = float(value)
        return entry

    def evaluations_markdown(self) -> str:
        """The evaluations as a markdown table: each stage's value and the last stage relative to the original
        (``""`` when there are none)."""
        if not self.evaluations:
            return ""
        stages = [s for s in STAGES if any(s in e.values for e in self.evaluations)]
        last = stages[-1]
        lines = [
            f"| measured | on | {' | '.join(stages)} | {last} / original |",
            f"| --- | --- | {' | '.join('---:' for _ in stages)} | ---: |",
        ]
        for e in self.evaluations:
            relative = e.relative(last)
            shown = "" if relative is None else f"{relative:.3f}" + ("x" if e.metric == "perplexity" else "")
            data = e.data + (" (its corpus healed the model)" if e.seen_in_healing else "")
            cells = " | ".join(_fmt(e.values.get(s), 2 if e.metric == "perplexity" else 4) for s in stages)
            lines.append(f"| {e.name} ({e.metric}) | {data} | {cells} | {shown} |")
        return "\n".join(lines)

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
        if self.evaluations:
            lines.append(f"\n## Measured beyond the budget\n\n{self.evaluations_markdown()}")
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
