"""Adaptive drafting and parallel branching against fixed-γ covspec over emulated round-trip times, in one run.

    python -m pipelines.drafting_bench [CONFIG] [key=value ...] [--out DIR] [--rtts 5,20,50,100]

Variants (all method ``covspec``, same models, edge, samples and link apart from its RTT):

- ``fixed``: ``drafting.policy=fixed`` with ``drafting.gamma``, no branching (the conventional baseline);
- ``adaptive``: ``drafting.policy=adaptive`` (confidence stop + controller), no branching;
- ``adaptive+branching``: adaptive with ``branching.budget`` branches (4 when the config's budget is 0);
- ``adaptive+branching+tree``: that, and each block sent as a token tree with ``branching.tree`` alternatives
  (2 when the config's is 0) verified in the same round (under sampling with ``branching.sampling_trees``, the
  alternatives then being guesses of the correction: docs/drafting.md).

Each (RTT, variant) pair is one device on its own emulated link, serving every sample in turn (the adaptive policy's
estimates carry over between its requests, as on a phone). For each sample ``target_only`` runs once (the greedy
reference), then every (RTT, variant) pair back to back, the variant order rotating per sample, so machine noise
hits all alike.
The table gives tokens/s, the ratio to ``fixed`` at the same RTT, mean accepted length (1 + accepted/rounds), mean
block length and the controller's mean γ, device idle fraction, branch hit rate and greedy identity to
``target_only``. Written under DIR (default ``results/drafting_bench``): ``drafting_bench.json`` (config, summary,
every request), ``drafting_bench.csv`` (summary) and ``drafting_bench.png`` (tokens/s and block length vs RTT).
With ``tracking.enabled`` the summary metrics and these files are logged to MLflow (``covspec.tracking``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from covspec.cli import pipeline_main
from covspec.config import Config, config_to_dict, load_config
from covspec.data import load_benchmark
from covspec.errors import CovspecError
from covspec.inputs import check_question
from covspec.models.loading import check_pair_files, load_adapter
from covspec.protocol import Link
from covspec.pruning import build_pruner
from covspec.runtime.device import Device
from covspec.runtime.edge_process import EdgeProcess
from covspec.runtime.engine import LocalEngine, colocated_profile, device_settings, link_profile
from covspec.runtime.transport import InProcessTransport, responsive_links

RTTS_MS = (5.0, 20.0, 50.0, 100.0)
EDGES = ("process", "thread")
VARIANTS = ("fixed", "adaptive", "adaptive+branching", "adaptive+branching+tree")
DEFAULT_BUDGET = 4
DEFAULT_TREE = 2


def variant_config(cfg: Config, variant: str) -> Config:
    """``cfg`` with the drafting policy and branch budget of ``variant``."""
    out = copy.deepcopy(cfg)
    out.drafting.policy = "fixed" if variant == "fixed" else "adaptive"
    out.branching.budget = 0 if "branching" not in variant else cfg.branching.budget or DEFAULT_BUDGET
    out.branching.tree = 0 if "tree" not in variant else cfg.branching.tree or DEFAULT_TREE
    out.validate()
    return out


@responsive_links()  # the links' delivery threads get the GIL within 0.5 ms while it runs
def run(cfg: Config, rtts: tuple[float, ...] = RTTS_MS, progress=None, edge: str = "process") -> dict[str, Any]:
    """Every sample through ``target_only`` and every (RTT, variant); returns the per-request rows.

    Each (RTT, variant) is one device on its own link that serves every sample in turn, as a phone would: the
    adaptive policy's estimates carry over from one request to the next (``Device.draft_policy``). ``edge``:
    ``process`` verifies in a spawned process (``cluster.edge_threads`` torch threads), so that drafting during a
    wait really runs in parallel with the verification; ``thread`` verifies on a thread of this process.
    """
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {', '.join(EDGES)}, got {edge!r}")
    samples = load_benchmark(cfg.data, seed=cfg.seed)  # shapes by default; any benchmark of docs/benchmarks.md
    base = link_profile(cfg)
    target = cfg.models.target
    links = len(rtts) * len(VARIANTS)
    remote, edge_handle = None, None
    if edge == "process":  # the target lives in the edge process only: the reference runs there too
        check_pair_files(target, cfg.models.draft)  # the edge process never sees the draft's tokenizer
        torch.set_num_threads(cfg.threads)
        draft = load_adapter(cfg.models.draft.path, cfg.models.draft.dtype, cfg.models.draft.device,
                             key="models.draft.path")  # fmt: skip
        pruner = build_pruner(cfg.pruning, cfg.seed)
        remote = EdgeProcess(target.path, links=links + 1, dtype=target.dtype, device=target.device,
                             threads=cfg.cluster.edge_threads, session_ttl_s=cfg.cluster.session_ttl_s)  # fmt: skip
        reference_device = Device(draft, remote.transport(Link(colocated_profile())),
                                  device_settings(cfg, "target_only"))  # fmt: skip
    else:
        engine = LocalEngine.from_config(cfg)
        draft, pruner, edge_handle = engine.draft, engine.pruner, engine.edge.handle
        reference_device = Device(draft, InProcessTransport(edge_handle, Link(colocated_profile())),
                                  device_settings(cfg, "target_only"))  # fmt: skip
    devices: dict[tuple[float, str], Device] = {}
    for rtt in rtts:
        for variant in VARIANTS:
            link = Link(dataclasses.replace(base, rtt_ms=rtt), seed=cfg.seed)
            settings = device_settings(variant_config(cfg, variant), "covspec")
            transport = remote.transport(link) if remote else InProcessTransport(edge_handle, link)
            devices[rtt, variant] = Device(draft, transport, settings, pruner)
    rows: list[dict[str, Any]] = []
    try:
        for i, sample in enumerate(samples):
            image, question = sample.image(), check_question(sample.question, draft.tokenizer)
            reference = reference_device.run(image, question).token_ids
            order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
            for rtt in rtts:
                for variant in order:
                    r = devices[rtt, variant].run(image, question)
                    row = {"sample_id": sample.sample_id, "rtt_ms": rtt, "variant": variant,
                           "token_ids": r.token_ids}  # fmt: skip
                    row.update(r.metrics())
                    row["matches_target_only"] = r.token_ids == reference
                    rows.append(row)
            if progress:
                progress(i + 1, len(samples))
    finally:
        for device in [*devices.values(), reference_device]:
            device.transport.close()
        if remote is not None:
            remote.close()
    return {"rows": rows, "samples": len(samples), "config": cfg, "rtts": list(rtts), "edge": edge}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (RTT, variant), ratios against ``fixed`` at the same RTT."""
    greedy = report["config"].generation.temperature == 0
    out = []
    for rtt in report["rtts"]:
        fixed_tps = None
        for variant in VARIANTS:
            rows = [r for r in report["rows"] if r["rtt_ms"] == rtt and r["variant"] == variant]
            tokens, latency = sum(r["num_tokens"] for r in rows), sum(r["latency_s"] for r in rows)
            rounds, drafted = sum(r["rounds"] for r in rows), sum(r["num_drafted"] for r in rows)
            busy, idle = sum(r["device_busy_s"] for r in rows), sum(r["device_idle_s"] for r in rows)
            hits, misses = sum(r["branch_hits"] for r in rows), sum(r["branch_misses"] for r in rows)
            gammas = [g for r in rows for g in r["controller_gammas"]]
            tps = tokens / max(latency, 1e-9)
            fixed_tps = tps if variant == "fixed" else fixed_tps
            out.append({
                "rtt_ms": rtt, "variant": variant, "samples": len(rows), "tokens_per_s": tps,
                "ratio_vs_fixed": _ratio(tps, fixed_tps),
                "mean_accepted_length": 1 + sum(r["num_accepted"] for r in rows) / rounds if rounds else None,
                "acceptance_rate": _ratio(sum(r["num_accepted"] for r in rows), drafted),
                "mean_block_length": _ratio(drafted, rounds),
                "mean_controller_gamma": statistics.fmean(gammas) if gammas else None,
                "device_idle_fraction": _ratio(idle, busy + idle),
                "branch_hit_rate": _ratio(hits, hits + misses),
                "tokens_reused_per_request": sum(r["tokens_reused"] for r in rows) / max(len(rows), 1),
                "tree_hit_rate": _ratio(sum(r["tree_hits"] for r in rows), sum(r["tree_rounds"] for r in rows)),
                "rounds_per_request": rounds / max(len(rows), 1),
                "identical_to_target_only": (
                    sum(r["matches_target_only"] for r in rows) / len(rows) if greedy and rows else None
                ),
            })  # fmt: skip
    return out


COLUMNS = [
    ("RTT ms", "rtt_ms", ".0f"), ("variant", "variant", "s"), ("tok/s", "tokens_per_s", ".1f"),
    ("vs fixed", "ratio_vs_fixed", ".2f"), ("acc.len", "mean_accepted_length", ".2f"),
    ("accept", "acceptance_rate", ".2f"), ("block", "mean_block_length", ".2f"),
    ("ctrl γ", "mean_controller_gamma", ".2f"), ("idle", "device_idle_fraction", ".1%"),
    ("branch hit", "branch_hit_rate", ".1%"), ("reused/req", "tokens_reused_per_request", ".1f"),
    ("rounds/req", "rounds_per_request", ".2f"), ("tree hit", "tree_hit_rate", ".1%"),
    ("=target", "identical_to_target_only", ".0%"),
]  # fmt: skip


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict[str, Any], summary: list[dict[str, Any]], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg: Config = report["config"]
    d, link = cfg.drafting, cfg.link
    table = Table(
        title=f"drafting bench: {report['samples']} samples of {cfg.data.label()}, "
        f"T={cfg.generation.temperature:g}, fixed gamma={d.gamma}, adaptive gamma in [{d.gamma_min}, {d.gamma_max}], "
        f"threshold {d.threshold:g}, "
        f"budget {cfg.branching.budget or DEFAULT_BUDGET}, tree {cfg.branching.tree or DEFAULT_TREE}, "
        f"jitter {link.jitter_ms:g} ms, "
        f"compute slowdown {link.compute_slowdown:g}, edge in a {report.get('edge', 'thread')}"
    )
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "variant" else "right")
    for row in summary:
        table.add_row(*[_fmt(row.get(key), spec) for _, key, spec in COLUMNS])
    console = Console(file=file or sys.stdout, width=200)
    console.print(table)
    for variant in VARIANTS[1:]:
        gammas = [_fmt(r["mean_controller_gamma"], ".1f") for r in summary if r["variant"] == variant]
        console.print(f"controller's mean gamma ({variant}) by RTT {report['rtts']}: {', '.join(gammas)}")
    console.print(
        "tok/s: generated tokens / summed request latency. acc.len: 1 + accepted/rounds. block: drafted/rounds "
        "(the confidence stop and max_new_tokens cut blocks below the controller's gamma). idle: device idle / "
        "(busy + idle). Ratios are measured side by side in this run."
    )


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        rows = [r for r in summary if r["variant"] == variant]
        rtts = [r["rtt_ms"] for r in rows]
        (line,) = ax1.plot(rtts, [r["tokens_per_s"] for r in rows], marker="o", label=variant)
        ax2.plot(rtts, [r["mean_block_length"] for r in rows], marker="o", color=line.get_color(),
                 label=f"{variant} (sent)")  # fmt: skip
        if any(r["mean_controller_gamma"] is not None for r in rows):
            gammas = [r["mean_controller_gamma"] for r in rows]
            ax2.plot(rtts, gammas, marker="x", linestyle="--", color=line.get_color(),
                     label=f"{variant} (controller γ)")  # fmt: skip
    ax1.set(xlabel="round-trip time (ms)", ylabel="tokens / s", title="throughput")
    ax2.set(xlabel="round-trip time (ms)", ylabel="tokens", title="block length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], summary: list[dict[str, Any]], out: Path) -> list[Path]:
    """JSON, CSV and plot under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "drafting_bench.json", out / "drafting_bench.csv", out / "drafting_bench.png"]
    doc = {"config": config_to_dict(report["config"]), "rtts_ms": report["rtts"], "edge": report.get("edge"),
           "summary": summary,
           "requests": report["rows"]}  # fmt: skip
    paths[0].write_text(json.dumps(doc, indent=1), encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    plot(summary, paths[2])
    return paths


def track(cfg: Config, summary: list[dict[str, Any]], paths: list[Path]) -> None:
    """Log the summary and the files to MLflow (``covspec.tracking``; nothing happens unless tracking is on)."""
    from covspec import tracking

    metrics = {
        f"{r['variant'].replace('+', '_')}.rtt{r['rtt_ms']:g}.{key}": r[key]
        for r in summary
        for key in ("tokens_per_s", "ratio_vs_fixed", "mean_block_length", "mean_controller_gamma",
                    "device_idle_fraction", "branch_hit_rate", "identical_to_target_only")
    }  # fmt: skip
    with tracking.start_run(cfg, run_name="drafting_bench") as run:
        tracking.log_metrics(metrics)
        for path in paths:
            tracking.log_artifact(path)
    if run is not None:
        print(f"logged to MLflow: run {run.info.run_id} ({tracking.tracking_uri(cfg)})")


@pipeline_main("drafting_bench")
def main(argv: list[str] | None = None) -> int:
    from covspec.cli import split_config_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="*", help="[CONFIG] [key=value ...]")
    ap.add_argument("--out", default="results/drafting_bench", help="output directory")
    ap.add_argument("--rtts", default=",".join(f"{r:g}" for r in RTTS_MS), help="round-trip times in ms")
    ap.add_argument("--edge", choices=EDGES, default="process",
                    help="verify in a spawned process (default: device and edge compute in parallel, as on two "
                         "machines) or on a thread of this process")  # fmt: skip
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    path, overrides = split_config_args(args.config)
    cfg = load_config(path, overrides)
    try:
        rtts = tuple(float(x) for x in args.rtts.split(","))
    except ValueError:
        raise CovspecError(f"--rtts must be comma-separated numbers of milliseconds, got {args.rtts!r}") from None
    if any(not 0 <= r < 1e6 for r in rtts):
        raise CovspecError(f"--rtts must be in [0, 1e6) ms, got {args.rtts!r}")

    def progress(done: int, total: int) -> None:
        print(f"sample {done}/{total}", file=sys.stderr, flush=True)

    report = run(cfg, rtts, progress, edge=args.edge)
    summary = summarize(report)
    print_table(report, summary)
    paths = write(report, summary, Path(args.out))
    print(f"written: {', '.join(map(str, paths))}")
    track(cfg, summary, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
