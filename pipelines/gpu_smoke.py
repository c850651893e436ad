"""GPU smoke test of the model families: adapter equivalence checks and a short covspec run, with step timings.

    python -m pipelines.gpu_smoke [--device cuda] [--families llava,llava_next,llava_onevision,qwen2_vl,qwen2_5_vl]
                                  [--tokens 8] [--k 5] [--samples 2]

For each family it builds a tiny random-weight target and draft (``covspec.models.tiny.TINY_FAMILIES``, no
downloads) on the device and runs the checks the tests run (``covspec.models.checks``): greedy decoding equals
``model.generate``, k-token verification equals k steps, rollback, pruned prefill positions, ``prepare_from_ids``,
batched verification, token-tree verification; then covspec greedy through the in-process engine (random draft,
and the target drafting for itself with the joint pruner at keep 0.25) must equal target-only greedy. It prints one
table row per family: the checks' outcome, prefill / decode step / verify-k medians (ms) and the engine's time per
generated token.

Without CUDA (and ``--device cuda``, the default) it prints a skip message and exits 0. ``--device cpu`` runs the
same path on the CPU. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch

from covspec.cli import pipeline_main

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu runs the same checks)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families to check")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per greedy / engine run")
    parser.add_argument("--k", type=int, default=5, help="tokens per verification in the timing")
    parser.add_argument("--samples", type=int, default=2, help="benchmark samples per check")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)} (choose from {', '.join(FAMILIES)})")
    return args


def check_family(family: str, device: str, tokens: int, k: int, num_samples: int) -> dict:
    """Every check on one family; returns the table row.

    The adapter checks (and timings) and the engine run fail separately: ``status`` is ``ok`` or names the phase
    that failed and its first error, so a broken engine path still leaves the adapter timings in the table.
    """
    from covspec.data.shapes import load_split
    from covspec.models import checks as C
    from covspec.models.tiny import TINY_FAMILIES

    atol = 1e-3 if device.startswith("cuda") else 1e-4
    samples = load_split("test", num_samples, offset=1)
    row: dict = {"family": family, "checks": 0}
    failures = []
    try:
        target, draft = TINY_FAMILIES[family](1, device), TINY_FAMILIES[family](2, device)
    except Exception as exc:
        return row | {"status": _failed("build", exc)}
    block = torch.tensor([7, 9, 11, 13, 8])
    wide = samples[0].image().resize((96, 64))  # non-square: anyres unpadding, a 3 x 4 Qwen grid
    images = [(s.image(), s.question) for s in samples] + [(wide, samples[0].question)]
    try:
        for image, question in images:
            inputs = target.prepare(image, question)
            C.check_greedy(target, inputs, tokens)
            C.check_verify_block(target, inputs, block, atol)
            C.check_rollback(target, inputs, block, atol)
            C.check_pruned_prefill(target, inputs, torch.arange(0, inputs.num_visual_tokens, 3), block, atol)
            C.check_prepare_from_ids(target, image, question)
            row["checks"] += 5
        if hasattr(target, "forward_batch"):
            prompts = [target.prepare(image, question) for image, question in images]
            C.check_forward_batch(target, prompts, [block[: 2 + i] for i in range(len(prompts))], atol)
            row["checks"] += 1
        C.check_tree_verify(target, target.prepare(*images[0]), target.prepare(*images[-1]), atol=atol)
        row["checks"] += 1
        row |= C.step_timings(target, target.prepare(*images[0]), k)
    except Exception as exc:  # report, then still try the engine
        failures.append(_failed("adapter", exc))
    try:
        runs = C.check_engine_greedy(target, draft, samples, tokens)
        runs += C.check_engine_greedy(target, target, samples, tokens, pruning="joint", keep_ratio=0.25)
        row["checks"] += len(runs)
        generated = max(1, sum(len(r["tokens"]) for r in runs))
        row["engine_ms_per_token"] = 1e3 * sum(r["covspec_s"] for r in runs) / generated
        row["target_only_ms_per_token"] = 1e3 * sum(r["target_only_s"] for r in runs) / generated
    except Exception as exc:
        failures.append(_failed("engine", exc))
    row["status"] = "; ".join(failures) or "ok"
    return row


def _failed(phase: str, exc: Exception) -> str:
    traceback.print_exc(file=sys.stderr)
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{phase} FAILED: {type(exc).__name__}: {message}"


def table(rows: list[dict], k: int) -> str:
    """A plain-text table of the rows."""
    cols = [
        ("family", "family", "{}"),
        ("checks", "checks", "{}"),
        ("prefill_ms", "prefill ms", "{:.2f}"),
        ("decode_step_ms", "decode step ms", "{:.2f}"),
        (f"verify_{k}_ms", f"verify-{k} ms", "{:.2f}"),
        ("engine_ms_per_token", "covspec ms/token", "{:.2f}"),
        ("target_only_ms_per_token", "target-only ms/token", "{:.2f}"),
        ("status", "status", "{}"),
    ]
    cells = [[h for _, h, _ in cols]]
    for row in rows:
        cells.append([fmt.format(row[key]) if key in row else "-" for key, _, fmt in cols])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@pipeline_main("gpu_smoke")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: skipped: CUDA is not available on this machine (use --device cpu to run the checks here)")
        return 0
    if args.device.startswith("cuda"):
        print(f"gpu_smoke: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    torch.manual_seed(0)
    rows = []
    for family in args.families:
        row = check_family(family, args.device, args.tokens, args.k, args.samples)
        print(f"  {family}: {row['status']} ({row['checks']} checks)", flush=True)
        rows.append(row)
    print(table(rows, args.k))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
