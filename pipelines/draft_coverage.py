"""Where the draft disagrees with the target, and how much a token tree could recover: one pass per sample.

    python -m pipelines.draft_coverage [CONFIG] [key=value ...] [--topk 3] [--out DIR]

For each sample of the configured benchmark the target answers greedily (the reference), then the draft, prefilled
exactly as the device prefills it (the configured pruner, merging included), scores that answer in one forward
(teacher-forced). At every answer position (EOS included) it records whether the draft's greedy token is the
target's, the rank of the target's token among the draft's top ``--topk``, and the draft's top probability (the
confidence the confidence stop reads). Reported:

- agreement: the share of positions where the draft's argmax is the target's token;
- top-k coverage: of the positions where it is not, the share where the target's token is among the draft's top k
  (k = 2..topk);
- calibration: per band of confidence, how often the draft's argmax was right;
- rounds per answer with unbounded blocks, greedy: a chain (one draft per position) ends a round at every
  disagreement, so it needs disagreements + 1 rounds; a token tree that also offers the draft's top-k tokens at
  every position ends one only where the target's token is outside them. These are upper bounds for any block
  length and drafting cost: they show how far a chain can go on these answers and what verifying a tree of
  alternatives could add (docs/drafting.md).

Writes ``DIR/draft_coverage.json`` (default ``results/draft_coverage``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from covspec.cli import pipeline_main, split_config_args
from covspec.config import Config, load_config
from covspec.data import load_benchmark
from covspec.decoding.autoregressive import generate
from covspec.pruning import choose
from covspec.runtime.engine import LocalEngine

BANDS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0 + 1e-9)


@torch.inference_mode()
def score_sample(engine: LocalEngine, image, question: str, max_new_tokens: int, topk: int) -> dict[str, Any]:
    """The target's greedy answer and, per position, the draft's confidence and the target token's rank in the
    draft's top ``topk`` (``topk`` when it is not among them)."""
    target, draft, pruner = engine.target, engine.draft, engine.pruner
    gen = generate(target, target.prepare(image, question), max_new_tokens)
    answer = gen.token_ids + ([target.eos_token_id] if gen.finished else [])  # the EOS is verified like any token
    inputs = draft.prepare(image, question)
    keep, counts = (None, None) if pruner is None else choose(pruner, draft, inputs, engine.cfg.pruning.prune_target)
    state, first = draft.prefill(inputs, keep, counts)
    rows = [first[None]]
    if len(answer) > 1:
        rows.append(draft.forward(state, torch.tensor(answer[:-1], dtype=torch.long)))
    logits = torch.cat(rows).float()  # [len(answer), V]: row i predicts answer[i]
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    truth = torch.tensor(answer)[:, None]
    hit = top_i == truth  # [n, k]
    rank = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(truth[:, 0], topk))
    return {"answer": answer, "rank": rank.tolist(), "confidence": top_p[:, 0].tolist()}


def summarize(rows: list[dict[str, Any]], topk: int) -> dict[str, Any]:
    ranks = [r for row in rows for r in row["rank"]]
    confs = [c for row in rows for c in row["confidence"]]
    positions = len(ranks)
    misses = [r for r in ranks if r > 0]
    tokens = sum(len(row["answer"]) for row in rows)
    out: dict[str, Any] = {
        "samples": len(rows),
        "positions": positions,
        "agreement": (positions - len(misses)) / positions if positions else None,
        "coverage_at_disagreements": {
            f"top{k}": sum(r < k for r in misses) / len(misses) if misses else None for k in range(2, topk + 1)
        },
        "tokens_per_answer": tokens / len(rows) if rows else None,
    }
    rounds = {"chain": [sum(r > 0 for r in row["rank"]) + 1 for row in rows]}
    for k in range(2, topk + 1):
        rounds[f"tree top{k}"] = [sum(r >= k for r in row["rank"]) + 1 for row in rows]
    out["rounds_per_answer"] = {name: sum(v) / len(v) for name, v in rounds.items()} if rows else {}
    out["tokens_per_round"] = {name: tokens / sum(v) for name, v in rounds.items()} if rows else {}
    bands = []
    for lo, hi in itertools.pairwise(BANDS):
        inside = [r == 0 for r, c in zip(ranks, confs, strict=True) if lo <= c < hi]
        bands.append({"band": f"[{lo:g}, {min(hi, 1):g}]" if hi > 1 else f"[{lo:g}, {hi:g})", "positions": len(inside),
                      "draft_right": sum(inside) / len(inside) if inside else None})  # fmt: skip
    out["calibration"] = bands
    return out


def run(cfg: Config, topk: int = 3, progress=None) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, temperature=0.0))
    engine = LocalEngine.from_config(cfg)
    rows = []
    for sample in load_benchmark(cfg.data, seed=cfg.seed):
        row = score_sample(engine, sample.image(), sample.question, cfg.generation.max_new_tokens, topk)
        rows.append({"sample_id": sample.sample_id, **row})
        if progress:
            progress()
    return {"summary": summarize(rows, topk), "rows": rows, "config": dataclasses.asdict(cfg)}


def print_report(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    s = summary
    console.print(f"[bold]{title}[/bold]")
    console.print(f"{s['samples']} answers, {s['positions']} positions, {s['tokens_per_answer']:.1f} tokens per "
                  f"answer; draft/target agreement {s['agreement']:.3f}")  # fmt: skip
    cover = ", ".join(f"{k} {v:.0%}" for k, v in s["coverage_at_disagreements"].items() if v is not None)
    console.print(f"where the draft's argmax is wrong, the target's token is in its {cover or '-'}")
    console.print("unbounded blocks, greedy: rounds per answer (upper bounds)")
    rounds = Table()
    for col in ("verification", "rounds / answer", "tokens / round"):
        rounds.add_column(col, justify="left" if col == "verification" else "right")
    for name, value in s["rounds_per_answer"].items():
        rounds.add_row(name, f"{value:.2f}", f"{s['tokens_per_round'][name]:.2f}")
    console.print(rounds)
    console.print("calibration of the draft's top probability (the confidence stop's signal)")
    cal = Table()
    for col in ("confidence", "positions", "draft right"):
        cal.add_column(col, justify="right")
    for band in s["calibration"]:
        right = "-" if band["draft_right"] is None else f"{band['draft_right']:.0%}"
        cal.add_row(band["band"], str(band["positions"]), right)
    console.print(cal)


@pipeline_main("draft_coverage")
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from covspec.errors import CovspecError

    ap = argparse.ArgumentParser(prog="python -m pipelines.draft_coverage", description=__doc__.split("\n")[0])
    ap.add_argument("config_args", nargs="*", metavar="CONFIG|KEY=VALUE")
    ap.add_argument("--topk", type=int, default=3, help="the draft's top-k tokens checked (>= 2)")
    ap.add_argument("--out", type=Path, default=Path("results/draft_coverage"), help="output directory")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.topk < 2:
            raise CovspecError(f"--topk must be >= 2, got {args.topk}")
        path, overrides = split_config_args(args.config_args)
        cfg = load_config(path, overrides)
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("draft_coverage", total=cfg.data.limit)
            report = run(cfg, args.topk, progress=lambda: progress.advance(task))
    except CovspecError as err:
        print(f"draft_coverage: error: {err}", file=sys.stderr)
        return 2
    p = cfg.pruning
    pruning = "unpruned" if p.method == "none" else f"{p.method} {p.keep_ratio:g}{' + merge' if p.merge else ''}"
    print_report(report["summary"], f"draft {cfg.models.draft.path} ({pruning}) vs target {cfg.models.target.path}, "
                 f"{cfg.data.label()}, teacher-forced on the target's greedy answers")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "draft_coverage.json"
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
