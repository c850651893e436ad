"""Subcommands that run models: ``generate`` and ``eval`` (registered into :mod:`covspec.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from covspec.cli import Subparsers, add_config_arguments, command, config_from_args, start_progress, stop_progress
from covspec.config import Config
from covspec.data import load_benchmark
from covspec.data.metrics import benchmark_score, exact_match, token_f1
from covspec.decoding.autoregressive import generate
from covspec.errors import InputError
from covspec.inputs import check_question, load_image
from covspec.models.loading import load_adapter


def load_role(cfg: Config, role: str):
    """The adapter for ``models.<role>`` of ``cfg``."""
    model = getattr(cfg.models, role)
    return load_adapter(model.path, model.dtype, model.device, key=f"models.{role}.path")


@command
def _generate(commands: Subparsers) -> None:
    parser = commands.add_parser("generate", help="answer one question about one image")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="question about the image")
    parser.add_argument("--model", choices=["target", "draft"], default="target", help="model for local decoding")
    parser.add_argument("--method", default=None, help="run through the device/edge engine with this method")
    parser.add_argument("--json", action="store_true", help="print answer, token ids and metrics as JSON")
    add_config_arguments(parser)
    parser.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    image = load_image(args.image)
    check_question(args.question)  # cheap checks before any model loads
    torch.set_num_threads(cfg.threads)
    if args.method is not None:
        from covspec.runtime.engine import run_one

        result = run_one(cfg, args.method, image, args.question)
        answer, token_ids, metrics = result.text, result.token_ids, result.metrics()
    else:
        adapter = load_role(cfg, args.model)
        question = check_question(args.question, adapter.tokenizer)
        generator = torch.Generator().manual_seed(cfg.seed)
        gen = cfg.generation
        out = generate(adapter, adapter.prepare(image, question), gen.max_new_tokens, gen.temperature, gen.top_p,
                       generator)  # fmt: skip
        answer, token_ids = adapter.decode(out.token_ids), out.token_ids
        metrics = {"num_tokens": len(out.token_ids), "latency_s": out.latency_s, "ttft_s": out.ttft_s}
    if args.json:
        print(json.dumps({"answer": answer, "token_ids": token_ids, "metrics": metrics}))
    else:
        print(answer)
    return 0


@command
def _eval(commands: Subparsers) -> None:
    parser = commands.add_parser("eval", help="answer a benchmark split with one model and print accuracy")
    parser.add_argument("--model", choices=["target", "draft"], default="target")
    add_config_arguments(parser)
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    cfg = config_from_args(args)
    torch.set_num_threads(cfg.threads)
    samples = load_benchmark(cfg.data, seed=cfg.seed)  # first: a bad data file fails before any model loads
    adapter = load_role(cfg, args.model)
    generator = torch.Generator().manual_seed(cfg.seed)
    by_kind: dict[str, list[tuple[float, float, float, str]]] = defaultdict(list)
    gen = cfg.generation
    for sample in track(samples, description=f"{args.model} on {cfg.data.split}", console=Console(stderr=True)):
        out = generate(adapter, adapter.prepare(sample.image(), sample.question), gen.max_new_tokens, gen.temperature,
                       gen.top_p, generator)  # fmt: skip
        text = adapter.decode(out.token_ids)
        by_kind[sample.kind].append(
            (
                exact_match(text, sample.answer),
                token_f1(text, sample.answer),
                sample.score(text),
                getattr(sample, "group", ""),
            )
        )
    table = Table(title=f"{args.model} ({cfg.models.target.path if args.model == 'target' else cfg.models.draft.path})"
                  f" on {cfg.data.label()}, {len(samples)} samples")  # fmt: skip
    scored = cfg.data.benchmark != "shapes"  # the benchmark's own metric; on shapes it is the exact match
    for col in ("kind", "n", *(["score"] if scored else []), "exact match", "token F1"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    rows = [*sorted(by_kind.items()), ("all", [x for v in by_kind.values() for x in v])]
    for kind, scores in rows:
        n = len(scores)
        em, f1 = f"{sum(s[0] for s in scores) / n:.1%}", f"{sum(s[1] for s in scores) / n:.3f}"
        score = benchmark_score((s[3], s[2]) for s in scores)  # MMBench CircularEval: per question, all copies
        table.add_row(kind, str(n), *([f"{score:.1%}"] if scored else []), em, f1)
    Console(file=sys.stdout).print(table)
    return 0


@command
def _bench(commands: Subparsers) -> None:
    parser = commands.add_parser("bench", help="compare every method side by side on the same samples")
    parser.add_argument("--out", default=None, help="results JSONL (default: config 'output', else none)")
    parser.add_argument("--no-hf-assisted", action="store_true", help="skip the Hugging Face assisted-generation peer")
    parser.add_argument("--edge", choices=("thread", "process"), default="thread",
                        help="verify on a thread of this process (default) or in a spawned edge process, so that "
                             "drafting during a wait runs in parallel (the HF peer then runs after them)")  # fmt: skip
    add_config_arguments(parser)
    parser.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress

    from pipelines.bench import print_report, run_bench

    cfg = config_from_args(args)
    out = args.out or cfg.output
    out_path = Path(out) if out else None
    if out_path is not None:  # before any model loads
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.open("w", encoding="utf-8").close()
        except OSError as exc:
            key = "--out" if args.out else "output"
            raise InputError(f"{key}: cannot write {str(out_path)!r} ({exc.strerror or type(exc).__name__})") from None
    progress = Progress(console=Console(stderr=True), transient=True)
    task = progress.add_task(f"bench ({', '.join(cfg.methods)})", total=cfg.data.limit)

    def advance(n: int = 1) -> None:
        start_progress(progress)  # once the models are loaded
        progress.advance(task, n)

    try:
        report = run_bench(cfg, out_path, hf_peer=not args.no_hf_assisted, progress=advance, edge=args.edge)
    finally:
        stop_progress(progress)
    print_report(report)
    if out_path is not None:
        print(f"per-request results: {out_path}")
    return 0
