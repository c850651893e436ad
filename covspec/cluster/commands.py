"""``covspec run`` (the main job: a multi-device experiment on Ray) and ``covspec ui`` (the MLflow UI)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from covspec.cli import Subparsers, add_config_arguments, command, config_from_args, start_progress, stop_progress


@command
def _run(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "run", help="the main job: every method over the benchmark on Ray device actors + a Ray Serve edge"
    )
    parser.add_argument(
        "--resume", metavar="RUN_ID", default=None, help="continue run RUN_ID: skip what results/RUN_ID/ holds"
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from covspec.cluster.experiment import RunError, run_experiment

    cfg = config_from_args(args)
    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=err)

    def factory(method: str, total: int):
        start_progress(progress)  # with the first bar
        task = progress.add_task(method, total=total)
        return lambda: progress.advance(task)

    try:
        result = run_experiment(cfg, resume=args.resume, log=lambda m: err.print(m), progress_factory=factory,
                                on_table=lambda table: print(table, flush=True))  # fmt: skip
    except RunError as exc:
        stop_progress(progress)
        print(f"covspec: run failed: {exc} (partial results are kept; --resume continues)", file=sys.stderr)
        return 1
    finally:
        stop_progress(progress)
    print(f"run {result['run_id']}: results, table and plots in {result['dir']}"
          + (f"; MLflow run {result['run_id']} at {_uri(cfg)}" if cfg.tracking.enabled else ""))  # fmt: skip
    return 0


def _uri(cfg) -> str:
    from covspec.tracking import tracking_uri

    return tracking_uri(cfg)


@command
def _ui(commands: Subparsers) -> None:
    parser = commands.add_parser("ui", help="the MLflow UI over the tracking store, on 127.0.0.1")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of starting the UI")
    add_config_arguments(parser)
    parser.set_defaults(handler=_start_ui)


def ui_command(cfg, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for the store of ``cfg``; the artifacts sit beside a SQLite database."""
    from covspec.tracking import default_root, tracking_uri

    uri = tracking_uri(cfg)
    if cfg.tracking.uri is None:
        default_root().mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def _start_ui(args: argparse.Namespace) -> int:
    from covspec.errors import InputError

    cfg = config_from_args(args)
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    cmd = ui_command(cfg, args.host, args.port)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    print(f"MLflow UI on http://{args.host}:{args.port} (store {cmd[5]}); Ctrl-C stops it", file=sys.stderr)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
