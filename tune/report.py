"""What a search leaves: one record per trial, the trials table, the Pareto front and its plot, ``best.yaml``.

Only *complete* feasible trials (every val sample run, outputs identical to target_only when greedy) enter the Pareto
front: early-stopped trials were measured on fewer samples, and samples differ in length, so their figures are not
comparable. The front is over (speed metric, up; decoding bytes per token, down); ``best.yaml`` is the front's trial
with the highest speed metric.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from covspec.config import Config, TuneConfig, config_to_yaml

__all__ = ["STATUSES", "TrialRecord", "best_trial", "pareto_front", "plot_pareto", "write_best", "write_table"]

STATUSES = ("complete", "early_stopped", "infeasible", "failed", "not_run")
"""complete: every sample run; early_stopped: stopped by ASHA or the time budget after some reports; infeasible:
output differs from target_only (or an invalid combination of values); failed: the trial raised; not_run: stopped
before its first report."""

MLFLOW_STATUS = {
    "complete": "FINISHED",
    "infeasible": "FINISHED",
    "early_stopped": "KILLED",
    "not_run": "KILLED",
    "failed": "FAILED",
}
COLUMNS = (
    "speedup",
    "tokens_per_s",
    "target_tokens_per_s",
    "bytes_per_token",
    "mean_accepted_length",
    "identical_to_target_only",
    "exact_match",
    "samples",
)


@dataclass
class TrialRecord:
    """One ended trial as the driver saw it."""

    trial_id: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    """The trial's last report (cumulative over the samples it ran); empty if it never reported."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every report, in order."""
    error: str = ""

    @classmethod
    def of(cls, trial_id: str, params: dict, history: list[dict], error: str | None) -> TrialRecord:
        """Classifies a trial from its reports and error."""
        history = [
            {
                k: v
                for k, v in h.items()
                if k
                in (
                    *COLUMNS,
                    "feasible",
                    "all_samples",
                    "note",
                    "objective_speed",
                    "objective_bytes",
                    "target_exact_match",
                )
            }
            for h in history
        ]
        last = history[-1] if history else {}
        if error:
            status = "failed"
        elif not last:
            status = "not_run"
        elif not last.get("feasible", 0):
            status = "infeasible"
        elif last.get("all_samples"):
            status = "complete"
        else:
            status = "early_stopped"
        return cls(trial_id, status, dict(params), dict(last), history, error or "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, line: str) -> TrialRecord:
        return cls(**json.loads(line))


def pareto_front(records: list[TrialRecord], metric: str) -> list[TrialRecord]:
    """Complete feasible trials that no other such trial beats on both ``metric`` (up) and bytes/token (down)."""
    pool = [r for r in records if r.status == "complete"]

    def dominated(a: TrialRecord) -> bool:
        sa, ba = a.metrics[metric], a.metrics["bytes_per_token"]
        return any(
            b.metrics[metric] >= sa
            and b.metrics["bytes_per_token"] <= ba
            and (b.metrics[metric] > sa or b.metrics["bytes_per_token"] < ba)
            for b in pool
        )

    return sorted((r for r in pool if not dominated(r)), key=lambda r: r.metrics["bytes_per_token"])


def best_trial(records: list[TrialRecord], metric: str) -> TrialRecord | None:
    """The front's trial with the highest ``metric`` (fewest bytes/token on a tie); None without a complete one."""
    front = pareto_front(records, metric)
    return max(front, key=lambda r: (r.metrics[metric], -r.metrics["bytes_per_token"]), default=None)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def write_table(records: list[TrialRecord], keys: list[str], metric: str, out_dir: Path) -> tuple[Path, Path]:
    """``trials.csv`` and ``trials.md``: one row per trial, Pareto membership, measurements, searched values."""
    front = {r.trial_id for r in pareto_front(records, metric)}
    header = ["trial", "status", "pareto", *COLUMNS, *keys, "note"]
    rows = []
    for r in records:
        note = r.error.strip().splitlines()[-1] if r.error.strip() else r.metrics.get("note", "")
        rows.append(
            [
                r.trial_id,
                r.status,
                "yes" if r.trial_id in front else "",
                *[_fmt(r.metrics.get(c)) for c in COLUMNS],
                *[_fmt(r.params.get(k)) for k in keys],
                note[:200],
            ]
        )
    csv_path, md_path = out_dir / "trials.csv", out_dir / "trials.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def plot_pareto(records: list[TrialRecord], metric: str, base_id: str | None, out: Path) -> Path:
    """Two panels: ``metric`` against bytes/token (with the front) and against mean accepted length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(records, metric)
    best = best_trial(records, metric)
    label = {"speedup": "speedup over target_only (tokens/s ratio)", "tokens_per_s": "covspec tokens/s"}[metric]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"complete": ("o", "tab:blue"), "early_stopped": ("s", "0.6"), "infeasible": ("x", "tab:red")}
    for ax, x_key, x_label in (
        (axes[0], "bytes_per_token", "decoding bytes per token (down is better)"),
        (axes[1], "mean_accepted_length", "mean accepted length"),
    ):
        for status, (marker, color) in styles.items():
            pts = [r for r in records if r.status == status and r.metrics.get(x_key) is not None]
            if status == "infeasible":  # their measurements are real even though the objectives are penalized
                pts = [r for r in pts if r.metrics.get("samples")]
            ax.scatter(
                [r.metrics[x_key] for r in pts],
                [r.metrics[metric] for r in pts],
                marker=marker,
                color=color,
                label=f"{status} ({len(pts)})",
                alpha=0.8,
            )
        if front:
            ax.plot(
                [r.metrics[x_key] for r in front],
                [r.metrics[metric] for r in front],
                "o",
                mfc="none",
                mec="black",
                ms=11,
                label="Pareto front",
            )
        if x_key == "bytes_per_token" and len(front) > 1:
            ax.step(
                [r.metrics[x_key] for r in front], [r.metrics[metric] for r in front], where="post", color="k", lw=0.8
            )
        for rec, mark, name in ((best, "*", "best.yaml"), (_by_id(records, base_id), "D", "base config")):
            if rec is not None and rec.metrics.get(x_key) is not None and rec.metrics.get("samples"):
                ax.scatter(
                    [rec.metrics[x_key]],
                    [rec.metrics[metric]],
                    marker=mark,
                    s=160,
                    color="gold",
                    edgecolors="black",
                    zorder=5,
                    label=name,
                )
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"covspec tune: {len(records)} trials, objectives {metric} (up) and bytes/token (down), val split")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _by_id(records: list[TrialRecord], trial_id: str | None) -> TrialRecord | None:
    return next((r for r in records if r.trial_id == trial_id), None)


def write_best(candidate: Config, record: TrialRecord, metric: str, note: str, out: Path) -> Path:
    """``best.yaml``: the winning trial's full config with the tune section at its defaults, loadable as is."""
    cfg = candidate
    cfg.tune = TuneConfig()
    m = record.metrics
    head = (
        f"# covspec tune: best trial {record.trial_id} ({note})\n"
        f"# on the val split: {metric} {m[metric]:.4g}, {m['tokens_per_s']:.1f} tokens/s, "
        f"{m['bytes_per_token']:.1f} bytes/token, mean accepted length {m['mean_accepted_length']:.2f}\n"
    )
    out.write_text(head + config_to_yaml(cfg), encoding="utf-8")
    return out
