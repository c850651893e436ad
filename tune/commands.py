"""``covspec tune [CONFIG] [key=value ...] [--resume]``: a hyperparameter search (docs/tune.md)."""

from __future__ import annotations

import argparse
import sys

from covspec.cli import Subparsers, add_config_arguments, command, config_from_args


@command
def _tune(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "tune", help="search covspec's knobs with Optuna through Ray Tune on val samples, tracked in MLflow"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search named by tune.name (default: the latest under tune.storage); with no "
        "CONFIG and no overrides but tune.name/tune.storage it runs on with its saved config",
    )
    parser.add_argument("--quiet", action="store_true", help="no line per finished trial")
    add_config_arguments(parser)
    parser.set_defaults(handler=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from tune.search import run_search

    cfg = config_from_args(args)
    # `--resume` with nothing but where to find the search: continue it with its own saved config.
    locate_only = not args.config_args or all(a.startswith(("tune.name=", "tune.storage=")) for a in args.config_args)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = run_search(cfg, resume=args.resume, log=log, verbose=not args.quiet, stored_config=locate_only)
    counts = ", ".join(f"{n} {status}" for status, n in result.counts.items() if n)
    print(
        f"search {result.name}: {len(result.records)} trials ({counts or 'none ended'}); table and plot in {result.dir}"
    )
    if result.interrupted:
        print(f"interrupted: `covspec tune --resume tune.name={result.name}` continues it")
    if result.best is not None:
        m = result.best.metrics
        print(
            f"best trial {result.best.trial_id}: speedup {m['speedup']:.3f} over target_only, "
            f"{m['tokens_per_s']:.1f} tokens/s, {m['bytes_per_token']:.1f} bytes/token, "
            f"mean accepted length {m['mean_accepted_length']:.2f} (val split)"
        )
    print(f"parent MLflow run: {result.parent_run_id} ({result.tracking_uri})")
    print(f"best.yaml: {result.best_path if result.best_path else 'none (no trial completed feasibly)'}")
    return 0 if result.best_path else 1
