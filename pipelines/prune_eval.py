"""Visual token pruning, evaluated: keep ratios x pruners on the synthetic test split, in one run.

    python -m pipelines.prune_eval [CONFIG] [key=value ...] [--out DIR] [--ratios 1,0.5,0.25,0.1]
                                   [--pruners joint,random,uniform,attention,diversity] [--timing-samples 4]
                                   [--merge both|config] [--as-configured]

For every sample, target_only runs once (the reference), then every (pruner, keep ratio) variant runs covspec
(greedy, co-located link) and draft_only, interleaved so that machine noise hits all variants alike. covspec
drafts chains of the fixed ``drafting.gamma`` without branching, so the accepted length depends only on the
pruned draft's agreement with the target and every run gives the same numbers (adaptive drafting and wait-time
branching depend on measured times; ``--as-configured`` drafts as configured). Keep ratio
1.0 is the identity for every pruner: it runs once, as ``none``. ``pruning.prune_target=true`` runs the lossy
mode instead (the target prefills the same kept tokens); every row is then labelled ``(lossy)``.

Reported per variant:

- mean accepted length ``1 + accepted / rounds`` (drafted tokens accepted per round, plus the target's token) and
  acceptance rate ``accepted / drafted``, summed over samples; their ratio to the unpruned draft's;
- draft prefill time (vision tower + LM prefill), pruner overhead (scoring + selection; the vision tower is shared
  with the prefill and counted there) and draft decode-step time: medians of an isolated micro-benchmark (no edge
  thread competing), interleaved across variants; the in-engine per-request medians go to the JSON too;
- ``overhead/saved``: pruner time over the prefill time it saves against the unpruned draft;
- draft exact match (draft_only answers), covspec tokens/s, and greedy identity with target_only.

Writes ``DIR/prune_eval.csv``, ``DIR/prune_eval.json``, ``DIR/accepted_length_vs_keep_ratio.png`` and
``DIR/prefill_time_vs_keep_ratio.png``; logs them with the metrics to MLflow when ``tracking.enabled``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from covspec.cli import pipeline_main, split_config_args
from covspec.config import Config, load_config
from covspec.data import load_benchmark
from covspec.data.metrics import exact_match
from covspec.pruning import PRUNERS, build_pruner, choose
from covspec.runtime.edge import Edge
from covspec.runtime.engine import LocalEngine, colocated_profile

RATIOS = (1.0, 0.5, 0.25, 0.1)
METHODS = tuple(PRUNERS)  # joint, random, uniform, attention, diversity
GOALS = {"joint_025_vs_unpruned": 0.95, "joint_010_vs_unpruned": 0.85, "overhead_of_saving_025": 0.10}


@dataclasses.dataclass
class Variant:
    """One (pruner, keep ratio) point; ``none`` at 1.0 is the unpruned draft."""

    method: str
    keep_ratio: float
    lossy: bool = False
    merge: bool = False
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    timing: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.method == "none":
            return "none"
        return f"{self.method}{'+merge' if self.merge else ''}{' (lossy)' if self.lossy else ''}"

    def config(self, cfg: Config) -> Config:
        overrides = {"method": self.method, "keep_ratio": self.keep_ratio, "merge": self.merge}
        return dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, **overrides))


def variants(cfg: Config, ratios: list[float], methods: list[str], merges: tuple[bool, ...] = (True,)) -> list[Variant]:
    """``none`` at 1.0, then every (keep ratio < 1, merge, pruner). The lossy mode never merges."""
    lossy = cfg.pruning.prune_target
    merges = (False,) if lossy else merges
    out = [Variant("none", 1.0, lossy)]
    out += [Variant(m, r, lossy, merge) for r in ratios if r < 1 for merge in merges for m in methods]
    return out


def evaluate(engine_for, variants_: list[Variant], samples, progress=None) -> dict[str, list[int]]:
    """Runs target_only once per sample, then covspec and draft_only for each variant; fills ``variant.rows``."""
    reference: dict[str, list[int]] = {}
    profile = colocated_profile()
    for sample in samples:
        image = sample.image()
        ref = engine_for(variants_[0]).run("target_only", image, sample.question, profile)
        reference[sample.sample_id] = ref.token_ids
        for v in variants_:
            engine = engine_for(v)
            r = engine.run("covspec", image, sample.question, profile)
            d = engine.run("draft_only", image, sample.question)
            metrics = r.metrics()
            row = {k: metrics[k] for k in ("num_tokens", "latency_s", "rounds", "num_drafted", "num_accepted",
                                           "visual_tokens", "visual_tokens_kept", "draft_prefill_s", "pruner_s",
                                           "lossy")}  # fmt: skip
            row.update(sample_id=sample.sample_id, matches_target_only=r.token_ids == ref.token_ids,
                       draft_exact_match=exact_match(d.text, sample.answer),
                       covspec_exact_match=exact_match(r.text, sample.answer))  # fmt: skip
            v.rows.append(row)
        if progress:
            progress()
    return reference


@torch.inference_mode()
def time_variants(engine_for, variants_: list[Variant], samples, repeats: int = 5, steps: int = 8) -> None:
    """Isolated medians of vision tower, pruner, LM prefill and decode step per variant (fills ``timing``)."""
    for v in variants_:
        v.timing = {"vision_s": [], "pruner_s": [], "lm_prefill_s": [], "draft_prefill_s": [], "draft_step_s": []}
    for _ in range(repeats):
        for sample in samples:
            image = sample.image()
            for v in variants_:
                engine = engine_for(v)
                draft, pruner = engine.draft, engine.pruner
                inputs = draft.prepare(image, sample.question)
                t0 = time.perf_counter()
                keep = None
                if pruner is not None and pruner.count(inputs.num_visual_tokens) < inputs.num_visual_tokens:
                    draft.visual_features(inputs)  # the pruned prefill reuses it
                    t1 = time.perf_counter()
                    keep, counts = choose(pruner, draft, inputs, v.lossy)
                    t2 = time.perf_counter()
                else:
                    t1 = t2 = t0
                    counts = None
                state, _ = draft.prefill(inputs, keep, counts)
                t3 = time.perf_counter()
                token = torch.tensor([draft.eos_token_id + 1])
                step = []
                for _ in range(steps):
                    t = time.perf_counter()
                    draft.forward(state, token)
                    step.append(time.perf_counter() - t)
                v.timing["vision_s"].append(t1 - t0)
                v.timing["pruner_s"].append(t2 - t1)
                v.timing["lm_prefill_s"].append(t3 - t2)
                v.timing["draft_prefill_s"].append(t3 - t2 + t1 - t0)
                v.timing["draft_step_s"].append(statistics.median(step))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(variants_: list[Variant]) -> list[dict[str, Any]]:
    """One summary dict per variant, with ratios to the unpruned draft measured in this run."""
    out = []
    for v in variants_:
        rows = v.rows
        rounds = sum(r["rounds"] for r in rows)
        drafted = sum(r["num_drafted"] for r in rows)
        accepted = sum(r["num_accepted"] for r in rows)
        summary = {
            "method": v.label,
            "pruner": v.method,
            "merge": v.merge,
            "keep_ratio": v.keep_ratio,
            "lossy": v.lossy and v.method != "none",
            "samples": len(rows),
            "visual_tokens_kept": statistics.fmean(r["visual_tokens_kept"] for r in rows) if rows else None,
            "mean_accepted_length": 1 + accepted / rounds if rounds else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "draft_prefill_ms": 1e3 * _median(v.timing.get("draft_prefill_s", [])) if v.timing else None,
            "pruner_ms": 1e3 * _median(v.timing.get("pruner_s", [])) if v.timing else None,
            "draft_step_ms": 1e3 * _median(v.timing.get("draft_step_s", [])) if v.timing else None,
            "engine_draft_prefill_ms": 1e3 * _median([r["draft_prefill_s"] for r in rows]) if rows else None,
            "engine_pruner_ms": 1e3 * _median([r["pruner_s"] for r in rows]) if rows else None,
            "draft_exact_match": statistics.fmean(r["draft_exact_match"] for r in rows) if rows else None,
            "covspec_exact_match": statistics.fmean(r["covspec_exact_match"] for r in rows) if rows else None,
            "covspec_tokens_per_s": sum(r["num_tokens"] for r in rows) / max(sum(r["latency_s"] for r in rows), 1e-9),
            "identical_to_target_only": statistics.fmean(r["matches_target_only"] for r in rows) if rows else None,
        }
        out.append(summary)
    base = out[0]
    for s in out:
        for key in ("mean_accepted_length", "acceptance_rate"):
            s[f"{key}_vs_unpruned"] = s[key] / base[key] if s[key] and base[key] else None
        saved = base["draft_prefill_ms"] - s["draft_prefill_ms"] if base["draft_prefill_ms"] is not None else None
        s["prefill_saved_ms"] = saved
        s["overhead_of_saving"] = s["pruner_ms"] / saved if saved and saved > 0 and s["pruner_ms"] else None
    return out


def goals(summary: list[dict[str, Any]], merge: bool = True) -> dict[str, Any]:
    """The issue's goals, checked on this run's numbers for the rows with ``merge`` (the configured mode; every
    pruner compared in the same mode). Absent when a needed variant did not run."""

    def find(method: str, ratio: float) -> dict[str, Any] | None:
        rows = [s for s in summary if s["pruner"] == method and s["keep_ratio"] == ratio]
        return next((s for s in rows if s["merge"] == merge or method == "none"), None)

    out: dict[str, Any] = {}
    j25, j10 = find("joint", 0.25), find("joint", 0.1)
    if j25:
        out["joint@0.25 accepted length vs unpruned >= 95%"] = j25["mean_accepted_length_vs_unpruned"]
        out["joint@0.25 pruner overhead / prefill saved <= 10%"] = j25["overhead_of_saving"]
    if j10:
        out["joint@0.1 accepted length vs unpruned >= 85%"] = j10["mean_accepted_length_vs_unpruned"]
        for other in ("random", "uniform", "attention"):
            o = find(other, 0.1)
            if o and o["mean_accepted_length"] and j10["mean_accepted_length"]:
                out[f"joint@0.1 beats {other}@0.1 (accepted length difference)"] = (
                    j10["mean_accepted_length"] - o["mean_accepted_length"]
                )
    ratios = sorted({s["keep_ratio"] for s in summary}, reverse=True)
    for method in sorted({s["pruner"] for s in summary} - {"none"}):
        curve = [(find(method, r) or find("none", r) or {}).get("draft_prefill_ms") for r in ratios]
        if None not in curve:
            name = f"{method}{'+merge' if merge else ''}"
            out[f"{name}: draft prefill ms at keep {ratios}"] = [round(c, 3) for c in curve]
    ident = [s["identical_to_target_only"] for s in summary if not s["lossy"]]
    if ident:
        out["greedy identical to target_only (non-lossy rows)"] = min(ident)
    return out


COLUMNS = [
    ("pruner", "method", "s"), ("keep", "keep_ratio", "g"), ("kept", "visual_tokens_kept", ".0f"),
    ("acc.len", "mean_accepted_length", ".3f"), ("vs none", "mean_accepted_length_vs_unpruned", ".1%"),
    ("accept", "acceptance_rate", ".3f"), ("prefill ms", "draft_prefill_ms", ".2f"),
    ("saved ms", "prefill_saved_ms", ".2f"), ("pruner ms", "pruner_ms", ".3f"),
    ("ovh/saved", "overhead_of_saving", ".0%"), ("step ms", "draft_step_ms", ".3f"),
    ("draft EM", "draft_exact_match", ".1%"), ("tok/s", "covspec_tokens_per_s", ".1f"),
    ("=target", "identical_to_target_only", ".0%"),
]  # fmt: skip


def print_table(summary: list[dict[str, Any]], title: str, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, _, _ in COLUMNS:
        table.add_column(name, justify="left" if name == "pruner" else "right")
    for s in summary:
        table.add_row(*["-" if s.get(k) is None else format(s[k], spec) for _, k, spec in COLUMNS])
    Console(file=file or sys.stdout, width=200).print(table)


def plot(summary: list[dict[str, Any]], key: str, ylabel: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = summary[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(s["method"] for s in summary[1:]):
        points = [(s["keep_ratio"], s[key]) for s in [base, *summary] if s is base or s["method"] == method]
        points = sorted(p for p in points if p[1] is not None)
        label = method
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ratios = sorted({s["keep_ratio"] for s in summary})
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("keep ratio (visual tokens kept by the draft)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def drafting_label(config: dict[str, Any]) -> str:
    """How covspec drafted in the evaluation (``report["config"]``), for the table's title."""
    d, b = config["drafting"], config["branching"]
    policy = f"gamma={d['gamma']}" if d["policy"] == "fixed" else f"adaptive (tau={d['threshold']:g})"
    tree = f"trees of {b['tree']}" if b["tree"] else "chains"
    wait = f"wait-time branching {b['budget']}" if b["budget"] else "no wait-time branching"
    return f"{policy}, {tree}, {wait}"


def write_outputs(summary: list[dict[str, Any]], report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "prune_eval.csv", out_dir / "prune_eval.json"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    json_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    n, data = report["samples"], report["config"]["data"]
    acc_png, pre_png = out_dir / "accepted_length_vs_keep_ratio.png", out_dir / "prefill_time_vs_keep_ratio.png"
    plot(summary, "mean_accepted_length", "mean accepted length (1 + accepted / rounds)", acc_png,
         f"covspec greedy, {n} {data['benchmark']}/{data['split']} samples: accepted length vs keep ratio")  # fmt: skip
    plot(summary, "draft_prefill_ms", "draft prefill time, ms (median)", pre_png,
         "draft prefill (vision tower + LM) vs keep ratio")  # fmt: skip
    return [csv_path, json_path, acc_png, pre_png]


def run(cfg: Config, ratios: list[float], methods: list[str], timing_samples: int = 4, progress=None,
        merges: tuple[bool, ...] | None = None, as_configured: bool = False) -> dict:  # fmt: skip
    """The whole evaluation; returns the report (summary rows, goals, per-sample rows, config).

    ``merges``: which of merging / keep-only to run for every pruner (default: the configured ``pruning.merge``).
    ``as_configured``: covspec drafts exactly as configured. By default it drafts chains of the fixed
    ``drafting.gamma`` (no branching, no token trees), so the accepted length depends only on the pruned draft's
    agreement with the target and every greedy run gives the same numbers. Adaptive drafting chooses block lengths
    from measured times and wait-time branching's hits depend on timing: with them the unpruned draft's accepted
    length moved by 3.5% between identical runs (docs/pruning.md), as much as the pruning being measured.
    """
    merges = (cfg.pruning.merge,) if merges is None else merges
    torch.set_num_threads(cfg.threads)
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, temperature=0.0))
    if not as_configured:
        cfg = dataclasses.replace(cfg, drafting=dataclasses.replace(cfg.drafting, policy="fixed"),
                                  branching=dataclasses.replace(cfg.branching, budget=0, tree=0))  # fmt: skip
    base = LocalEngine.from_config(dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, method="none")))
    edge = Edge(base.target)
    engines: dict[tuple[str, float, bool], LocalEngine] = {}

    def engine_for(v: Variant) -> LocalEngine:
        key = (v.method, v.keep_ratio, v.merge)
        if key not in engines:
            vcfg = v.config(cfg)
            engines[key] = LocalEngine(vcfg, base.target, base.draft, edge, build_pruner(vcfg.pruning, cfg.seed))
        return engines[key]

    vs = variants(cfg, ratios, methods, merges)
    samples = load_benchmark(cfg.data, seed=cfg.seed)  # shapes by default; any benchmark of docs/benchmarks.md
    evaluate(engine_for, vs, samples, progress)
    time_variants(engine_for, vs, samples[: max(1, timing_samples)])
    summary = summarize(vs)
    return {
        "samples": len(samples),
        "summary": summary,
        "goals": goals(summary, cfg.pruning.merge and not cfg.pruning.prune_target),
        "rows": {v.label + f"@{v.keep_ratio:g}": v.rows for v in vs},
        "timing_s": {v.label + f"@{v.keep_ratio:g}": v.timing for v in vs},
        "config": dataclasses.asdict(cfg),
    }


@pipeline_main("prune_eval")
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from covspec import tracking
    from covspec.errors import CovspecError

    ap = argparse.ArgumentParser(prog="python -m pipelines.prune_eval", description=__doc__.split("\n")[0])
    ap.add_argument("config_args", nargs="*", metavar="CONFIG|KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("results/prune_eval"), help="output directory")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated keep ratios")
    ap.add_argument("--pruners", default=",".join(METHODS), help="comma-separated pruners")
    ap.add_argument("--timing-samples", type=int, default=4, help="samples of the isolated timing benchmark")
    ap.add_argument("--merge", choices=("config", "both"), default="both",
                    help="every pruner merging and keep-only side by side, or as pruning.merge says")  # fmt: skip
    ap.add_argument("--as-configured", action="store_true",
                    help="draft as configured (adaptive drafting and wait-time branching depend on timing: "
                    "accepted lengths then vary by run); default: chains of the fixed gamma, no branching")  # fmt: skip
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides = split_config_args(args.config_args)
        cfg = load_config(path, overrides)
        ratios = sorted({float(r) for r in args.ratios.split(",")} | {1.0}, reverse=True)
        methods = [m for m in args.pruners.split(",") if m]
        bad = [m for m in methods if m not in PRUNERS] + [r for r in ratios if not 0 < r <= 1]
        if bad:
            raise CovspecError(f"unknown pruners or keep ratios outside (0, 1]: {bad}")
    except (CovspecError, ValueError) as err:
        print(f"prune_eval: error: {err}", file=sys.stderr)
        return 2
    with tracking.start_run(cfg, "prune_eval", tags={"pipeline": "prune_eval"}):
        merges = (True, False) if args.merge == "both" else (cfg.pruning.merge,)
        n_variants = 1 + len(methods) * len(merges) * sum(r < 1 for r in ratios)
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"prune_eval ({n_variants} variants)", total=cfg.data.limit)
            report = run(cfg, ratios, methods, args.timing_samples, progress=lambda: progress.advance(task),
                         merges=merges, as_configured=args.as_configured)  # fmt: skip
        summary = report["summary"]
        lossy = " [LOSSY: the target is pruned too]" if cfg.pruning.prune_target else ""
        where = f"{report['samples']} samples of {cfg.data.label()}"
        print_table(summary, f"visual token pruning: {where}, draft {cfg.models.draft.path}, greedy, "
                    f"{drafting_label(report['config'])}{lossy}")  # fmt: skip
        for goal, value in report["goals"].items():
            print(f"  {goal}: {value if not isinstance(value, float) else round(value, 4)}")
        paths = write_outputs(summary, report, args.out)
        print(f"wrote {', '.join(str(p) for p in paths)}")
        for s in summary:
            mode = f"{'_merge' if s['merge'] else ''}{'_lossy' if s['lossy'] else ''}"
            prefix = f"{s['pruner']}{mode}.{s['keep_ratio']:g}."
            tracking.log_metrics({k: v for k, v in s.items() if k not in ("method", "pruner")}, prefix=prefix)
        for p in paths:
            tracking.log_artifact(p)
        tracking.log_dict(report["goals"], "goals.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
