"""Dashboard check: the MLflow UI lists an experiment's runs, seen through its REST API and in headless Chromium.

    python -m pipelines.ui_check [CONFIG] [key=value ...] [--run RUN_ID] [--port 5123] [--out DIR]

Starts the MLflow UI on 127.0.0.1 over the config's tracking store (the same command as ``covspec ui``, with job
execution off), asks ``/api/2.0/mlflow/runs/search`` for the experiment's runs, then opens the experiment page in
Debian's ``chromium`` (``--headless``): the rendered DOM must name the runs, and a screenshot is saved to ``--out``
and, with ``--run``, logged as an artifact (``ui/``) of that run. ``--run`` also requires that run and its child runs
(e.g. a ``covspec tune`` search) to be listed. Exit status 0 when every check passes, 1 otherwise, 2 for usage errors
(no chromium: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from covspec.config import Config
from covspec.errors import InputError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH, or None."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None, timeout: float = 10.0) -> Any:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.startswith(("{", "[")) else text


def start_ui(cfg: Config, port: int, timeout_s: float = 90.0) -> subprocess.Popen:
    """``mlflow ui`` on 127.0.0.1:port in its own process group; returns once ``/health`` answers."""
    from covspec.cluster.commands import ui_command

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        ui_command(cfg, "127.0.0.1", port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InputError(f"mlflow ui exited with {proc.returncode}: {(proc.stderr.read() or '').strip()[-500:]}")
        try:
            if _get(f"http://127.0.0.1:{port}/health", timeout=2) == "OK":
                return proc
        except OSError:
            time.sleep(0.5)
    stop_ui(proc)
    raise InputError(f"mlflow ui did not answer on 127.0.0.1:{port} within {timeout_s:.0f} s")


def stop_ui(proc: subprocess.Popen) -> None:
    """Stops the UI server and the workers it spawned (its own process group, which we created)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def chromium(binary: str, url: str, *args: str, budget_ms: int = 15000, timeout_s: float = 120.0) -> str:
    """Headless Chromium on ``url``; returns its stdout (the DOM with ``--dump-dom``) after ``budget_ms`` of virtual
    time for the page's scripts."""
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--virtual-time-budget={budget_ms}", "--window-size=1600,1000", *args, url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    return done.stdout


def check_ui(cfg: Config, out_dir: Path, run_id: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Runs the dashboard check; returns what it found (``ok`` is True when every check passed)."""
    from covspec.tracking import tracking_uri

    binary = find_chromium()
    if binary is None:
        raise InputError("no chromium on PATH (Debian: apt-get install -y chromium)")
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = start_ui(cfg, port)
    base = f"http://127.0.0.1:{port}"
    try:
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={cfg.tracking.experiment}")
        exp_id = exp["experiment"]["experiment_id"]
        runs = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 1000})
        runs = runs.get("runs", [])
        names = {r["info"]["run_id"]: r["info"].get("run_name", "") for r in runs}
        wanted = []
        if run_id is not None:
            children = [r["info"]["run_id"] for r in runs
                        if {"key": "mlflow.parentRunId", "value": run_id} in r["data"].get("tags", [])]  # fmt: skip
            wanted = [run_id, *children]
        url = f"{base}/#/experiments/{exp_id}/runs"  # the training-runs table (MLflow 3 opens on GenAI traces)
        shot = out_dir / "mlflow-ui.png"
        shot.unlink(missing_ok=True)
        dom = chromium(binary, url, "--dump-dom", f"--screenshot={shot}")
    finally:
        stop_ui(proc)
    top = [n for rid, n in names.items() if n and (run_id is None or rid == run_id)]
    in_dom = [n for n in top if html.escape(n, quote=False) in dom]
    count = re.search(r"(\d+)(?:</strong>)?\s+matching runs", dom)  # the table's footer: runs, children included
    result = {
        "url": url,
        "tracking_uri": tracking_uri(cfg),
        "experiment_id": exp_id,
        "runs_listed": len(runs),
        "missing_from_api": [r for r in wanted if r not in names],
        "names_checked_in_dom": top,
        "names_in_dom": in_dom,
        "matching_runs_in_dom": int(count.group(1)) if count else None,
        "screenshot": str(shot) if shot.is_file() else None,
    }
    result["ok"] = (
        bool(runs) and not result["missing_from_api"] and bool(in_dom) and result["matching_runs_in_dom"] == len(runs)
        and result["screenshot"] is not None
    )  # fmt: skip
    (out_dir / "ui_check.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if run_id is not None and result["screenshot"]:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(cfg))
        client.log_artifact(run_id, str(shot), "ui")
        client.log_artifact(run_id, str(out_dir / "ui_check.json"), "ui")
    return result


def main(argv: list[str] | None = None) -> int:
    from covspec.cli import split_config_args
    from covspec.config import load_config
    from covspec.errors import CovspecError

    parser = argparse.ArgumentParser(prog="python -m pipelines.ui_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("config_args", nargs="*", metavar="CONFIG|KEY=VALUE")
    parser.add_argument("--run", default=None, help="a run (e.g. a tune parent) that must be listed with its children")
    parser.add_argument("--port", type=int, default=None, help="UI port (default: a free one)")
    parser.add_argument("--out", type=Path, default=Path("results/ui_check"))
    args = parser.parse_args(argv)
    try:
        path, overrides = split_config_args(args.config_args)
        result = check_ui(load_config(path, overrides), args.out, args.run, args.port)
    except CovspecError as err:
        print(f"ui_check: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
