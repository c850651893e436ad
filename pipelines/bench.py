"""Side-by-side benchmark of every method on the same samples, in one process, in one run.

    covspec bench [CONFIG] [key=value ...] [--out results.jsonl]
    python -m pipelines.bench [CONFIG] [key=value ...]

For each sample every method runs back to back (interleaved, so machine noise hits all methods alike),
through the same Edge, models and emulated link. Hugging Face assisted generation (``generate(
assistant_model=draft)``, co-located, greedy) runs on the same pair and prompts as the external peer.
Results stream to JSONL as they finish; the table reports ratios measured in this run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from covspec.config import Config
from covspec.data import load_benchmark
from covspec.data.metrics import benchmark_score, exact_match, token_f1
from covspec.decoding.analysis import alpha_from_acceptance_length, speedup_bound
from covspec.models.base import cut_at_eos
from covspec.models.loading import load_adapter
from covspec.protocol.accounting import PROJECTED_VOCAB
from covspec.runtime.device import RequestResult
from covspec.runtime.engine import LocalEngine, check_pair, method_config
from covspec.runtime.transport import responsive_links

HF_PEER = "hf_assisted"
HF_SETTINGS = (
    "transformers assisted generation, greedy, default assistant schedule (heuristic, 20 tokens, threshold 0.4)"
)


@dataclass
class MethodStats:
    """Aggregates of one method over the run."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def sum(self, key: str) -> float:
        return sum(r.get(key) or 0 for r in self.rows)

    def mean(self, key: str) -> float | None:
        vals = [r[key] for r in self.rows if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    def quantile(self, key: str, q: float) -> float:
        vals = sorted(r[key] for r in self.rows)
        return vals[min(len(vals) - 1, int(q * len(vals)))]

    @property
    def tokens_per_s(self) -> float:
        return self.sum("num_tokens") / max(self.sum("latency_s"), 1e-9)

    @property
    def decoding_bytes_per_token(self) -> float:
        return (self.sum("bytes_up") + self.sum("bytes_down")) / max(self.sum("num_tokens"), 1)


def result_row(sample, method: str, r: RequestResult) -> dict[str, Any]:
    """One JSONL line: the required fields, then the request's metrics (the projected bytes among them)."""
    row: dict[str, Any] = {
        "sample_id": sample.sample_id,
        "kind": sample.kind,
        "method": method,
        "token_ids": r.token_ids,
        "text": r.text,
        "reference": sample.answer,
        "exact_match": exact_match(r.text, sample.answer),
        "token_f1": token_f1(r.text, sample.answer),
        "score": sample.score(r.text),  # the benchmark's own metric (VQA accuracy, option accuracy, ...)
        "group": getattr(sample, "group", ""),  # MMBench CircularEval: the question its rotated copies share
    }
    row.update(r.metrics())
    return row


def hf_assisted(engine: LocalEngine, sample, max_new_tokens: int) -> dict[str, Any]:
    """Hugging Face assisted generation on the same pair and prompt (its draft never sees the image)."""
    target, draft = engine.target, engine.draft
    inputs = target.prepare(sample.image(), sample.question)
    calls = 0

    def count(_module, _args):
        nonlocal calls
        calls += 1

    hook = target.model.register_forward_pre_hook(count)
    try:
        start = time.perf_counter()
        out = target.model.generate(
            input_ids=inputs.input_ids[None],
            pixel_values=inputs.pixel_values,
            assistant_model=draft.model,
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
        latency = time.perf_counter() - start
    finally:
        hook.remove()
    new = out[0, inputs.input_ids.shape[0] :].tolist()
    tokens = cut_at_eos(new, target.eos_token_ids)
    text = target.decode(tokens)
    rounds = max(calls - 1, 1)  # the first call is the prefill
    return {
        "sample_id": sample.sample_id, "kind": sample.kind, "method": HF_PEER, "token_ids": tokens, "text": text,
        "reference": sample.answer, "exact_match": exact_match(text, sample.answer),
        "token_f1": token_f1(text, sample.answer), "score": sample.score(text), "group": getattr(sample, "group", ""),
        "num_tokens": len(tokens),
        "latency_s": latency, "rounds": rounds, "mean_accepted_length": len(tokens) / rounds, "bytes_up": 0,
        "bytes_down": 0, "bytes_upload": 0, "settings": HF_SETTINGS,
    }  # fmt: skip


def step_costs(engine: LocalEngine, sample, steps: int = 40) -> dict[str, float]:
    """Median KV-cached decode step of target and draft, and a k-token verify, measured side by side."""
    out: dict[str, list[float]] = {"target_step_s": [], "draft_step_s": [], "target_verify_s": []}
    k = engine.cfg.drafting.gamma
    states = {}
    for name, adapter in (("target", engine.target), ("draft", engine.draft)):
        states[name], _ = adapter.prefill(adapter.prepare(sample.image(), sample.question))
    token = torch.tensor([5])
    block = torch.full((k,), 5)
    for _ in range(steps):
        for name, adapter in (("target", engine.target), ("draft", engine.draft)):
            t = time.perf_counter()
            adapter.forward(states[name], token)
            out[f"{name}_step_s"].append(time.perf_counter() - t)
            adapter.rollback(states[name], states[name].seq_len - 1)
        t = time.perf_counter()
        engine.target.forward(states["target"], block)
        out["target_verify_s"].append(time.perf_counter() - t)
        engine.target.rollback(states["target"], states["target"].seq_len - k)
    return {key: statistics.median(v) for key, v in out.items()}


@responsive_links()  # the links' delivery threads get the GIL within 0.5 ms while it runs
def run_bench(cfg: Config, out_path: Path | None, hf_peer: bool = True, progress=None,
              edge: str = "thread") -> dict[str, Any]:  # fmt: skip
    """Run every method of ``cfg.methods`` on the configured samples; returns the report.

    ``edge``: ``thread`` verifies on a thread of this process; ``process`` in a spawned edge process
    (``LocalEngine.with_edge_process``), so that a device drafting during a wait runs in parallel with it. Then this
    process loads the target only once that process has ended (one copy of it in memory at a time): the Hugging
    Face peer runs in a pass of its own after the methods, and the step costs are timed last, as always.
    """
    samples = load_benchmark(cfg.data, seed=cfg.seed)  # first: a bad data file fails before any model loads
    if edge == "process":  # the target lives in the edge process alone while the methods run
        engine = LocalEngine.with_edge_process(cfg)
    elif edge == "thread":
        engine = LocalEngine.from_config(cfg)
    else:
        raise ValueError(f"edge must be thread or process, got {edge!r}")
    if progress:
        progress(0)  # the models are loaded: the progress shows from here
    methods = list(cfg.methods)
    greedy = cfg.generation.temperature == 0
    run_hf = hf_peer and greedy
    stats: dict[str, MethodStats] = {m: MethodStats() for m in methods + ([HF_PEER] if run_hf else [])}
    sink = out_path.open("w", encoding="utf-8") if out_path else None
    reference: dict[str, list[int]] = {}

    def write(row: dict[str, Any]) -> None:
        stats[row["method"]].add(row)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    try:
        for i, sample in enumerate(samples):
            image = sample.image()
            for method in methods:
                r = engine.run(method, image, sample.question, link_seed=cfg.seed * 100_003 + i)
                if method == "target_only":
                    reference[sample.sample_id] = r.token_ids
                write(result_row(sample, method, r))
            if run_hf and engine.target is not None:  # interleaved with the methods
                write(hf_assisted(engine, sample, cfg.generation.max_new_tokens))
            if progress:
                progress()
        engine.close()  # the edge process, if any
        if engine.target is None:  # now, with the edge process gone, this process loads the target: one copy at a time
            t = cfg.models.target
            engine.target = load_adapter(t.path, t.dtype, t.device, key="models.target.path")
            check_pair(engine.target, engine.draft)
            for sample in samples if run_hf else []:  # a pass of its own, after the methods
                write(hf_assisted(engine, sample, cfg.generation.max_new_tokens))
    finally:
        if sink:
            sink.close()
        engine.close()
    for _name, s in stats.items():
        for row in s.rows:
            ref = reference.get(row["sample_id"])
            row["matches_target_only"] = None if ref is None else row["token_ids"] == ref
    costs = step_costs(engine, samples[0])
    return {"stats": stats, "costs": costs, "config": cfg, "samples": len(samples), "edge_mode": edge,
            "edge": engine.edge.stats if edge == "thread" else None}  # fmt: skip


def summarize(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary dict per method, with ratios against target_only and vanilla_sd from the same run."""
    stats: dict[str, MethodStats] = report["stats"]
    cfg: Config = report["config"]
    costs = report["costs"]
    base = stats.get("target_only")
    vanilla = stats.get("vanilla_sd")
    cost_ratio = costs["draft_step_s"] / costs["target_step_s"]
    verify_cost = costs["target_verify_s"] / costs["target_step_s"]
    rtt = (cfg.link.rtt_ms / 1e3) / costs["target_step_s"]
    out = []
    for name, s in stats.items():
        row: dict[str, Any] = {"method": name, "samples": len(s.rows), "tokens_per_s": s.tokens_per_s}
        if any(r.get("lossy") for r in s.rows):  # pruning.prune_target: the target saw a pruned image too
            row["method"], row["lossy"] = f"{name} (lossy)", True
        row["speedup"] = s.tokens_per_s / base.tokens_per_s if base else None
        row["mean_accepted_length"] = (
            1 + s.sum("num_accepted") / s.sum("rounds") if s.rows and "num_accepted" in s.rows[0] and s.sum("rounds")
            else s.mean("mean_accepted_length") if name == HF_PEER else None
        )  # fmt: skip
        row["acceptance_rate"] = s.sum("num_accepted") / s.sum("num_drafted") if s.sum("num_drafted") else None
        row["decoding_bytes_per_token"] = s.decoding_bytes_per_token
        row["upload_bytes_per_request"] = s.sum("bytes_upload") / max(len(s.rows), 1)
        proj = [r.get("projected_bytes_decoding") for r in s.rows]
        row["projected_bytes_per_token"] = (
            sum(proj) / max(s.sum("num_tokens"), 1) if proj and all(p is not None for p in proj) else None
        )
        if vanilla and name not in ("target_only", "draft_only", HF_PEER):  # speculative methods only
            row["reduction_vs_vanilla"] = 1 - row["decoding_bytes_per_token"] / vanilla.decoding_bytes_per_token
            vp = [r.get("projected_bytes_decoding") for r in vanilla.rows]
            if row["projected_bytes_per_token"] is not None and all(p is not None for p in vp):
                vpt = sum(vp) / max(vanilla.sum("num_tokens"), 1)
                row["projected_reduction_vs_vanilla"] = 1 - row["projected_bytes_per_token"] / vpt
        row["exact_match"] = s.mean("exact_match")
        row["score"] = benchmark_score((r.get("group", ""), r["score"]) for r in s.rows)  # CircularEval-aware
        matches = [r["matches_target_only"] for r in s.rows if r.get("matches_target_only") is not None]
        # Greedy output must equal target-only token for token; sampled output is only equal in distribution.
        greedy = cfg.generation.temperature == 0
        row["identical_to_target_only"] = sum(matches) / len(matches) if matches and greedy else None
        busy, idle = s.sum("device_busy_s"), s.sum("device_idle_s")
        speculative = name not in ("target_only", "draft_only", HF_PEER)
        row["device_idle_fraction"] = idle / (busy + idle) if speculative and busy + idle > 0 else None
        hits, misses = s.sum("branch_hits"), s.sum("branch_misses")
        row["branch_hit_rate"] = hits / (hits + misses) if hits + misses else None
        tree_rounds = s.sum("tree_rounds")
        row["tree_hit_rate"] = s.sum("tree_hits") / tree_rounds if tree_rounds else None
        row["latency_p50_s"] = s.quantile("latency_s", 0.5)
        row["latency_p95_s"] = s.quantile("latency_s", 0.95)
        if row["mean_accepted_length"] and name not in (HF_PEER,) and _fixed_chains(cfg, name):
            gamma = cfg.drafting.gamma
            alpha = alpha_from_acceptance_length(row["mean_accepted_length"], gamma)
            row["alpha"] = alpha
            row["bound_speedup"] = speedup_bound(alpha, gamma, cost_ratio, verify_cost, rtt)
        out.append(row)
    return out


def _fixed_chains(cfg: Config, name: str) -> bool:
    """Whether ``name`` drafts fixed-γ chains: the analytic bound (``speedup_bound``) models nothing else."""
    from covspec.runtime.engine import device_settings

    try:
        wire, method_cfg = method_config(cfg, name)
    except (KeyError, ValueError):
        return True
    return not device_settings(method_cfg, wire).pipelined


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(report: dict[str, Any], file=None) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.table import Table

    cfg: Config = report["config"]
    rows = summarize(report)
    costs = report["costs"]
    link = cfg.link
    table = Table(
        title=f"covspec bench: {report['samples']} samples of {cfg.data.label()}, "
        f"link rtt {link.rtt_ms:g} ms, up {link.up_mbps:g} / down {link.down_mbps:g} Mbit/s, "
        f"T={cfg.generation.temperature:g}, gamma={cfg.drafting.gamma}, m={cfg.verification.num_candidates}, "
        f"edge in a {report.get('edge_mode', 'thread')}"
        + (f", pruning {cfg.pruning.method} keep {cfg.pruning.keep_ratio:g}"
           f"{' (target pruned too: lossy)' if cfg.pruning.prune_target else ''}"
           if cfg.pruning.method != "none" else "")
    )  # fmt: skip
    cols = [
        ("method", "method", "s"), ("tok/s", "tokens_per_s", ".1f"), ("speedup", "speedup", ".2f"),
        ("bound", "bound_speedup", ".2f"), ("acc.len", "mean_accepted_length", ".2f"),
        ("accept", "acceptance_rate", ".2f"), ("B/tok", "decoding_bytes_per_token", ".1f"),
        ("vs vanilla", "reduction_vs_vanilla", ".2%"), ("B/tok@152k*", "projected_bytes_per_token", ".0f"),
        ("vs vanilla@152k*", "projected_reduction_vs_vanilla", ".3%"),
        ("upload B/req", "upload_bytes_per_request", ".0f"),
        ("EM", "exact_match", ".1%"), ("=target", "identical_to_target_only", ".0%"),
        ("p50 s", "latency_p50_s", ".3f"), ("p95 s", "latency_p95_s", ".3f"),
    ]  # fmt: skip
    if cfg.data.benchmark != "shapes":  # on shapes the score is the exact match already shown
        cols.insert(cols.index(("EM", "exact_match", ".1%")), ("score", "score", ".1%"))
    optional = [("idle", "device_idle_fraction", ".0%"), ("branch hit", "branch_hit_rate", ".0%"),
                ("tree hit", "tree_hit_rate", ".0%")]  # fmt: skip
    cols += [c for c in optional if any(row.get(c[1]) is not None for row in rows)]  # adaptive drafting / branching
    for title, _, _ in cols:
        table.add_column(title, justify="left" if title == "method" else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(key), spec) for _, key, spec in cols])
    console = Console(file=file or sys.stdout, width=220)
    console.print(table)
    console.print(
        f"step costs (medians, this run): target decode {costs['target_step_s'] * 1e3:.2f} ms, draft decode "
        f"{costs['draft_step_s'] * 1e3:.2f} ms (ratio {costs['target_step_s'] / costs['draft_step_s']:.1f}x), "
        f"target verify of {cfg.drafting.gamma} {costs['target_verify_s'] * 1e3:.2f} ms.\n"
        "B/tok: decoding traffic (both directions, after the one-time image+prompt upload) per generated token, "
        "counted from serialized frames. vanilla_sd and dssd ship float32 distributions, as their papers do.\n"
        f"* projected: this run's frames re-sized for a {PROJECTED_VOCAB:,}-token vocabulary (Qwen2.5-VL): ids "
        "of its worst-case size, distribution rows of its width, every other field as sent.\n"
        "bound: analytic speedup for the measured acceptance length, draft/target step ratio, verify cost and RTT "
        "(covspec.decoding.analysis).\n"
        + (f"{HF_PEER}: {HF_SETTINGS}; co-located (no link); in transformers 5.x its draft never sees the image."
           if HF_PEER in report["stats"] else "")
    )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    from covspec.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
