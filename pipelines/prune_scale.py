"""Pruner cost at a real draft's scale: pruner overhead against the prefill time it saves, per keep ratio.

    python -m pipelines.prune_scale [--preset ov-0.5b] [--ratios 1,0.5,0.25,0.1] [--pruners joint]
                                    [--samples 2] [--repeats 2] [--threads 1] [--out DIR]
                                    [--hidden H --layers L --heads A --kv-heads G --intermediate M --side S]

Why: the embedded toy draft (a 1-layer, 128-wide language model) prefills in a few milliseconds, so pruning can
save it only ~1 ms, and any pruner's fixed cost looks large beside that (``pipelines.prune_eval``). A pruner is
meant for drafts whose prefill is real work. Time does not depend on the weights' values, so this script builds a
**random-weight** ``LlavaForConditionalGeneration`` at a real draft's shape and times exactly what
``prune_eval`` times, with the same code (``prune_eval.time_variants``): the vision tower, the pruner (scoring,
selection and the merge assignment) and the language model's prefill over the kept tokens, plus one decode step.
It measures cost only; acceptance needs trained models (``prune_eval``).

Preset ``ov-0.5b``: LLaVA-OneVision-0.5B's base-resolution geometry (a 27 x 27 patch grid: 729 visual tokens, a
378-pixel image in 14-pixel patches) and Qwen2-0.5B's language model shape (896 wide, 24 layers, 14 heads, 2 KV
heads, MLP 4864), built with a Llama language model (the same matmuls, less Qwen2's small q/k/v biases). The
vision tower has one layer at SigLIP-so400m's width (1152): it runs before pruning and is the same at every keep
ratio, so its depth does not change the time saved; the table reports it apart.

Prints a table and the issue's goal (joint pruner's overhead <= 10% of the prefill time it saves at keep 0.25);
writes ``DIR/prune_scale.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from covspec.cli import pipeline_main
from covspec.config import load_config
from covspec.data.shapes import load_split
from covspec.models.tiny import TinySpec, tiny_llava
from covspec.pruning import PRUNERS, build_pruner
from pipelines.prune_eval import RATIOS, Variant, _median, time_variants, variants

OV_05B = TinySpec(image_size=378, patch_size=14, vision_hidden=1152, vision_layers=1, hidden=896, layers=24, heads=14,
                  kv_heads=2, intermediate=4864, init_scale=0.02)  # fmt: skip
PRESETS: dict[str, TinySpec] = {"ov-0.5b": OV_05B}
GOAL = 0.10  # joint pruner overhead / prefill saved at keep 0.25


def build_spec(preset: str, **overrides: int | None) -> TinySpec:
    """The preset's shape with the given fields replaced (``side``: visual tokens per grid side)."""
    spec = PRESETS[preset]
    side = overrides.pop("side", None)
    if side is not None:
        overrides["image_size"] = side * spec.patch_size
    return dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def summarize(vs: list[Variant]) -> list[dict[str, Any]]:
    """Medians per variant (ms) and the overhead over the draft prefill time saved against ``none``."""

    def ms(v: Variant, key: str) -> float:
        return 1e3 * (_median(v.timing[key]) or 0.0)

    base = ms(vs[0], "draft_prefill_s")
    out = []
    for v in vs:
        prefill, pruner = ms(v, "draft_prefill_s"), ms(v, "pruner_s")
        saved = base - prefill
        out.append({
            "method": v.label, "pruner": v.method, "merge": v.merge, "keep_ratio": v.keep_ratio,
            "vision_ms": ms(v, "vision_s") if v.method != "none" else None,
            # unpruned, the prefill runs the tower itself: only the total is known
            "lm_prefill_ms": ms(v, "lm_prefill_s") if v.method != "none" else None,
            "draft_prefill_ms": prefill, "pruner_ms": pruner,
            "prefill_saved_ms": saved if v.method != "none" else None,
            "overhead_of_saving": pruner / saved if v.method != "none" and saved > 0 else None,
            "draft_step_ms": ms(v, "draft_step_s"),
        })  # fmt: skip
    return out


COLUMNS = [
    ("pruner", "method", "s"), ("keep", "keep_ratio", "g"), ("vision ms", "vision_ms", ".1f"),
    ("LM prefill ms", "lm_prefill_ms", ".1f"), ("prefill ms", "draft_prefill_ms", ".1f"),
    ("saved ms", "prefill_saved_ms", ".1f"), ("pruner ms", "pruner_ms", ".2f"),
    ("ovh/saved", "overhead_of_saving", ".1%"), ("step ms", "draft_step_ms", ".2f"),
]  # fmt: skip


@pipeline_main("prune_scale")
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="python -m pipelines.prune_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ov-0.5b")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated keep ratios")
    ap.add_argument("--pruners", default="joint", help=f"comma-separated, of {', '.join(PRUNERS)}")
    ap.add_argument("--keep-only", action="store_true", help="pruners without merging (default: merging)")
    ap.add_argument("--samples", type=int, default=2, help="shapes test samples (images and questions) timed")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the samples (medians over all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=Path("results/prune_scale"))
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "side"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        ratios = sorted({float(r) for r in args.ratios.split(",")} | {1.0}, reverse=True)
        methods = [m for m in args.pruners.split(",") if m]
        bad = [m for m in methods if m not in PRUNERS] + [r for r in ratios if not 0 < r <= 1]
        if bad or not methods:
            raise ValueError(f"unknown pruners or keep ratios outside (0, 1]: {bad or args.pruners!r}")
        for name in ("samples", "repeats", "threads"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        sizes = {k: getattr(args, k.replace("-", "_")) for k in ("hidden", "layers", "heads", "kv-heads",
                                                                  "intermediate", "side")}  # fmt: skip
        if any(v is not None and v < 1 for v in sizes.values()):
            raise ValueError(f"model sizes must be >= 1, got {sizes}")
        spec = build_spec(args.preset, **{k.replace("-", "_"): v for k, v in sizes.items()})
    except ValueError as err:
        print(f"prune_scale: error: {err}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    draft = tiny_llava(spec, seed=0)
    params = sum(p.numel() for p in draft.model.parameters())
    cfg = load_config(None, [])
    vs = variants(cfg, ratios, methods, merges=(not args.keep_only,))
    engines = {v.label + f"@{v.keep_ratio:g}": SimpleNamespace(draft=draft, pruner=build_pruner(
        v.config(cfg).pruning, cfg.seed)) for v in vs}  # fmt: skip
    samples = load_split("test", args.samples)
    print(f"built a random-weight draft of {params / 1e6:.0f}M parameters ({spec}) in "
          f"{time.perf_counter() - t0:.0f} s; timing {len(vs)} variants x {len(samples)} samples x {args.repeats} "
          f"passes on {args.threads} thread(s)", file=sys.stderr)  # fmt: skip
    time_variants(lambda v: engines[v.label + f"@{v.keep_ratio:g}"], vs, samples, repeats=args.repeats, steps=4)
    summary = summarize(vs)

    n = draft.prepare(samples[0].image(), samples[0].question).num_visual_tokens
    table = Table(title=f"pruner cost at scale: preset {args.preset}, {params / 1e6:.0f}M parameters, {n} visual "
                  f"tokens, random weights; medians of {len(samples) * args.repeats}")  # fmt: skip
    for name, _, _ in COLUMNS:
        table.add_column(name, justify="left" if name == "pruner" else "right")
    for s in summary:
        table.add_row(*["-" if s.get(k) is None else format(s[k], f) for _, k, f in COLUMNS])
    Console(width=160).print(table)
    goal = next((s for s in summary if s["pruner"] == "joint" and s["keep_ratio"] == 0.25), None)
    if goal is not None:
        ratio = goal["overhead_of_saving"]
        verdict = ("missed: pruning saved no prefill time" if ratio is None
                   else f"{ratio:.2%} ({'met' if ratio <= GOAL else 'missed'})")  # fmt: skip
        print(f"  {goal['method']}@0.25 pruner overhead / prefill saved <= {GOAL:.0%}: {verdict}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prune_scale.json"
    report = {"preset": args.preset, "spec": dataclasses.asdict(spec), "parameters": params, "visual_tokens": n,
              "threads": args.threads, "summary": summary,
              "timing_s": {v.label + f"@{v.keep_ratio:g}": v.timing for v in vs}}  # fmt: skip
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
