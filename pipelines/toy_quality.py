"""Quality bars of the embedded toy pair, measured on the shapes test split in one run.

    python -m pipelines.toy_quality [--samples 200] [--json out.json]

Reports, per question kind and overall:
- target and draft greedy exact match, and teacher-forced token accuracy on the reference answers;
- draft/target greedy agreement: per position, teacher-forced on the target's own greedy outputs (EOS included);
- the cost of one KV-cached decode step of each model (median of many, interleaved side by side);
- the training time recorded in each checkpoint's training.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from covspec.cli import pipeline_main
from covspec.data.metrics import exact_match
from covspec.data.shapes import KINDS, load_split
from covspec.decoding.autoregressive import generate
from covspec.models.loading import load_adapter, resolve_path

BARS = {
    "target_exact_match": 0.85,
    "target_token_accuracy": 0.97,
    "draft_exact_match_min": 0.40,
    "agreement": 0.70,
    "step_cost_ratio": 4.0,
    "train_minutes": 90.0,
}


@torch.inference_mode()
def teacher_forced(adapter, inputs, continuation: list[int]) -> list[int]:
    """Greedy predictions at each position of ``continuation`` (+ EOS) given the prompt and the gold prefix."""
    ids = torch.cat([inputs.input_ids, torch.tensor(continuation, dtype=torch.long)])
    logits = adapter.model(input_ids=ids[None], pixel_values=inputs.pixel_values).logits[0]
    start = inputs.input_ids.shape[0] - 1
    return logits[start : start + len(continuation) + 1].argmax(-1).tolist()


def step_costs(target, draft, sample, steps: int = 200) -> dict[str, float]:
    times: dict[str, list[float]] = {"target": [], "draft": []}
    states = {}
    for name, adapter in (("target", target), ("draft", draft)):
        states[name], _ = adapter.prefill(adapter.prepare(sample.image(), sample.question))
    token = torch.tensor([target.eos_token_id + 3])
    for _ in range(steps):
        for name, adapter in (("target", target), ("draft", draft)):
            t = time.perf_counter()
            adapter.forward(states[name], token)
            times[name].append(time.perf_counter() - t)
            adapter.rollback(states[name], states[name].seq_len - 1)
    return {f"{k}_step_ms": statistics.median(v) * 1e3 for k, v in times.items()}


def measure(num_samples: int, seed: int = 0, target_path: str = "toy-target", draft_path: str = "toy-draft") -> dict:
    torch.set_num_threads(2)
    target = load_adapter(target_path, key="--target")
    draft = load_adapter(draft_path, key="--draft")
    tok = target.tokenizer
    samples = load_split("test", num_samples, seed=seed)
    per_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        t_inputs = target.prepare(s.image(), s.question)
        d_inputs = draft.prepare(s.image(), s.question)
        gold = tok(" " + s.answer, add_special_tokens=False)["input_ids"]
        gold_eos = [*gold, target.eos_token_id]
        t_out = generate(target, t_inputs, 48).token_ids
        d_out = generate(draft, d_inputs, 48).token_ids
        k = per_kind[s.kind]
        k["target_em"].append(exact_match(target.decode(t_out), s.answer))
        k["draft_em"].append(exact_match(draft.decode(d_out), s.answer))
        t_pred = teacher_forced(target, t_inputs, gold)
        k["target_tok"].extend(float(a == b) for a, b in zip(t_pred, gold_eos, strict=True))
        d_pred = teacher_forced(draft, d_inputs, gold)
        k["draft_tok"].extend(float(a == b) for a, b in zip(d_pred, gold_eos, strict=True))
        agree = teacher_forced(draft, d_inputs, t_out)
        k["agreement"].extend(float(a == b) for a, b in zip(agree, [*t_out, target.eos_token_id], strict=True))
    kinds = {kind: {m: statistics.fmean(v) for m, v in per_kind[kind].items()} for kind in KINDS if kind in per_kind}
    overall = {m: statistics.fmean([x for kind in per_kind.values() for x in kind[m]]) for m in per_kind[KINDS[0]]}
    costs = step_costs(target, draft, samples[0])
    train = {}
    for role, path in (("target", target_path), ("draft", draft_path)):
        meta = json.loads(Path(resolve_path(path), "training.json").read_text(encoding="utf-8"))
        train[role] = {"steps": meta.get("trained_steps"), "minutes": meta.get("train_seconds", 0) / 60}
    return {"samples": len(samples), "kinds": kinds, "overall": overall, "costs": costs, "training": train}


def check_bars(r: dict) -> dict[str, bool]:
    o, c = r["overall"], r["costs"]
    return {
        f"target exact match >= {BARS['target_exact_match']:.0%}": o["target_em"] >= BARS["target_exact_match"],
        f"target token accuracy >= {BARS['target_token_accuracy']:.0%}": o["target_tok"]
        >= BARS["target_token_accuracy"],
        f"draft exact match >= {BARS['draft_exact_match_min']:.0%} and below target": (
            BARS["draft_exact_match_min"] <= o["draft_em"] < o["target_em"]
        ),
        f"agreement >= {BARS['agreement']:.2f}": o["agreement"] >= BARS["agreement"],
        f"target step >= {BARS['step_cost_ratio']:g}x draft step": (
            c["target_step_ms"] >= BARS["step_cost_ratio"] * c["draft_step_ms"]
        ),
        f"training <= {BARS['train_minutes']:g} min": (
            sum(t["minutes"] for t in r["training"].values()) <= BARS["train_minutes"]
        ),
    }


def print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"toy pair on shapes/test ({r['samples']} samples)")
    cols = [("target EM", "target_em"), ("target tok acc", "target_tok"), ("draft EM", "draft_em"),
            ("draft tok acc", "draft_tok"), ("agreement", "agreement")]  # fmt: skip
    table.add_column("kind")
    for title, _ in cols:
        table.add_column(title, justify="right")
    for kind, vals in [*r["kinds"].items(), ("all", r["overall"])]:
        table.add_row(kind, *[f"{vals[key]:.1%}" for _, key in cols])
    console = Console()
    console.print(table)
    c, t = r["costs"], r["training"]
    console.print(
        f"decode step (median, side by side): target {c['target_step_ms']:.2f} ms, draft {c['draft_step_ms']:.2f} ms, "
        f"ratio {c['target_step_ms'] / c['draft_step_ms']:.1f}x\n"
        f"training: target {t['target']['steps']} steps in {t['target']['minutes']:.1f} min, "
        f"draft {t['draft']['steps']} steps in {t['draft']['minutes']:.1f} min"
    )
    for bar, ok in check_bars(r).items():
        console.print(f"{'PASS' if ok else 'FAIL'}  {bar}")


@pipeline_main("toy_quality")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--target", default="toy-target", help="target checkpoint (default: the shipped toy target)")
    ap.add_argument("--draft", default="toy-draft", help="draft checkpoint (default: the shipped toy draft)")
    args = ap.parse_args(argv)
    report = measure(args.samples, target_path=args.target, draft_path=args.draft)
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if all(check_bars(report).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
