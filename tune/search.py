"""The search driver: Optuna (multi-objective) through Ray Tune with ASHA, one MLflow parent run and a child per trial.

Flow of :func:`run_search`: validate the space (before Ray starts); open the parent MLflow run (or reopen it on
resume); start Ray unless it runs already; fit the Tuner, whose :class:`TrialLogger` callback writes each ended
trial to ``<dir>/trials.jsonl`` and to an MLflow child run from the driver; then write the table, the Pareto plot and
``best.yaml`` beside Ray Tune's state in ``<tune.storage>/<tune.name>/`` and log them on the parent run.

Resume: Ray Tune keeps its experiment state (searcher and scheduler included) in that directory; ``Tuner.restore``
continues an interrupted search, reruns its unfinished trials and leaves ended ones alone. The config must be the
search's own (``config.yaml`` there); the parent run id comes from ``search.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from covspec.config import Config, config_to_yaml, flatten, load_config_text
from covspec.errors import ConfigError, InputError
from tune.report import MLFLOW_STATUS, TrialRecord, best_trial, plot_pareto, write_best, write_table
from tune.space import Dimension, candidate_config, parse_space, space_of

__all__ = ["SearchResult", "TrialLogger", "run_search"]

OBJECTIVES = (("objective_speed", "max"), ("objective_bytes", "min"))


@dataclass
class SearchResult:
    """What ``covspec tune`` prints."""

    name: str
    dir: Path
    parent_run_id: str
    tracking_uri: str
    records: list[TrialRecord]
    best: TrialRecord | None
    best_path: Path | None
    base_id: str | None
    interrupted: bool
    counts: dict[str, int] = field(default_factory=dict)


class BaselineASHA(ASHAScheduler):
    """ASHA that never stops the base config's trial: the search's baseline is measured on every val sample (its
    reports still count in the rungs the others are compared at)."""

    def __init__(self, base_point: dict[str, Any] | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.base_point = base_point

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if self.base_point and all(trial.config.get(k) == v for k, v in self.base_point.items()):
            return self.CONTINUE
        return decision


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class TrialLogger(Callback):
    """Ray Tune callback (driver side): each ended trial goes to ``trials.jsonl`` and to an MLflow child run.

    Holds only plain data: Ray pickles it with the experiment and brings it back on ``Tuner.restore``.
    """

    def __init__(self, out_dir: str, uri: str, parent_run_id: str, base_yaml: str, space: dict, verbose: bool):
        self.out_dir, self.uri, self.parent_run_id = out_dir, uri, parent_run_id
        self.base_yaml, self.space, self.verbose = base_yaml, space, verbose
        self._history: dict[str, list[dict[str, Any]]] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._history.setdefault(trial.trial_id, []).append(dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        text = ""
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace")
        self._end(trial, text.strip() or "the trial raised (no error text)")

    def on_experiment_end(self, trials, **info) -> None:
        # An interrupted search ends with trials that never reported an end (Ray marks them TERMINATED on cleanup,
        # but its saved state, which Tuner.restore reads, still has them running or pending).
        ended = {r.trial_id for r in read_records(Path(self.out_dir))}
        unfinished = [t.trial_id for t in trials if t.trial_id not in ended]
        (Path(self.out_dir) / "status.json").write_text(json.dumps({"unfinished": unfinished, "trials": len(trials)}))

    def _end(self, trial: Any, error: str | None) -> None:
        params = {k: v for k, v in trial.config.items() if not k.startswith("_")}
        history = self._history.pop(trial.trial_id, None) or ([trial.last_result] if trial.last_result else [])
        record = TrialRecord.of(trial.trial_id, params, history, error)
        with (Path(self.out_dir) / "trials.jsonl").open("a", encoding="utf-8") as f:
            f.write(record.to_json() + "\n")
        log_child_run(self.uri, self.parent_run_id, record, self._trial_yaml(record))
        if self.verbose:
            m = record.metrics
            figures = (
                (
                    f"speedup {m['speedup']:.3f}, {m['tokens_per_s']:.1f} tok/s, {m['bytes_per_token']:.1f} B/tok, "
                    f"acc.len {m['mean_accepted_length']:.2f}, {m['samples']} samples"
                )
                if m.get("samples")
                else ""
            )
            print(f"trial {record.trial_id}: {record.status} {figures}", file=sys.stderr, flush=True)

    def _trial_yaml(self, record: TrialRecord) -> str | None:
        from tune.space import parse_dimensions

        try:
            base = load_config_text(self.base_yaml, where="search base config")
            return config_to_yaml(candidate_config(base, parse_dimensions(self.space), record.params))
        except (ConfigError, KeyError):
            return None


def log_child_run(uri: str, parent_run_id: str, record: TrialRecord, trial_yaml: str | None) -> str | None:
    """One MLflow child run for ``record`` under the parent (skipped if this trial has one already)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    found = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`tune.trial_id` = '{record.trial_id}'"
    )
    if found:
        return None
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "tune.trial_id": record.trial_id,
        "tune.status": record.status,
        "covspec.command": "tune-trial",
    }
    if record.error:
        tags["tune.error"] = record.error.strip().splitlines()[-1][:4000]
    elif record.metrics.get("note"):
        tags["tune.note"] = str(record.metrics["note"])[:4000]
    run = client.create_run(exp, run_name=f"trial {record.trial_id}", tags=tags)
    now = int(time.time() * 1000)
    params = [Param(k, str(v)[:6000]) for k, v in record.params.items()]
    metrics = [
        Metric(k, float(v), now, int(h.get("samples", i + 1)))
        for i, h in enumerate(record.history)
        for k, v in h.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    client.log_batch(
        run.info.run_id,
        metrics=metrics,
        params=params,
        tags=[RunTag("tune.samples", str(record.metrics.get("samples", 0)))],
    )
    if trial_yaml:
        client.log_text(run.info.run_id, trial_yaml, "config.yaml")
    if record.error:
        client.log_text(run.info.run_id, record.error, "error.txt")
    client.set_terminated(run.info.run_id, status=MLFLOW_STATUS[record.status])
    return run.info.run_id


# ---------------------------------------------------------------------------------------------------------------


def _resolve(cfg: Config, resume: bool, stored_config: bool) -> tuple[Config, Path]:
    """The config with ``tune.name`` set, and the search directory; checks what exists there.

    On resume the search's own config comes back from its directory: as is with ``stored_config``, else ``cfg``
    must equal it."""
    storage = Path(cfg.tune.storage).resolve()
    cfg = copy.deepcopy(cfg)
    if not resume:
        cfg.tune.name = cfg.tune.name or time.strftime("search-%Y%m%d-%H%M%S")
        out = storage / cfg.tune.name
        if out.exists():
            raise ConfigError(f"tune.name: {out} holds a search already; --resume continues it, or set another name")
        return cfg, out
    if cfg.tune.name is None:
        found = sorted(storage.glob("*/search.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise InputError(f"--resume: no search under {storage} (tune.storage)")
        cfg.tune.name = found[-1].parent.name
    out = storage / cfg.tune.name
    if not (out / "search.json").is_file():
        raise InputError(f"--resume: no search at {out} (names are the folders under {storage})")
    stored = load_config_text((out / "config.yaml").read_text(encoding="utf-8"), where=str(out / "config.yaml"))
    if stored_config:
        return stored, out
    old, new = flatten(stored), flatten(cfg)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ConfigError(f"cannot resume {out}: {key} was {old.get(key)!r}, now {new.get(key)!r}")
    return cfg, out


def _ensure_ray(cfg: Config) -> bool:
    """Starts Ray unless it is running (returns whether it did); checks that a trial fits in the cluster."""
    import ray

    from covspec.cluster.placement import connect_ray

    started = connect_ray(cfg.cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    for key, name, want in (("CPU", "trial_cpus", cfg.tune.trial_cpus), ("GPU", "trial_gpus", cfg.tune.trial_gpus)):
        have = resources.get(key, 0)
        if have < want:
            if started:
                ray.shutdown()
            raise ConfigError(f"tune.{name} must be <= the cluster's {have:g} {key}s, got {want:g}")
    return started


def _tuner(
    cfg: Config, dims: list[Dimension], space: dict, out: Path, parent: str, uri: str, restore: bool, verbose: bool
) -> Any:
    import optuna
    from ray import tune as raytune
    from ray.tune.search.optuna import OptunaSearch

    from tune.objective import run_trial

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0; ours prints per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base_yaml = config_to_yaml(cfg)
    trainable = raytune.with_resources(
        raytune.with_parameters(run_trial, base_yaml=base_yaml, space=space),
        {"cpu": cfg.tune.trial_cpus, "gpu": cfg.tune.trial_gpus},
    )
    if restore:
        return raytune.Tuner.restore(str(out), trainable=trainable, resume_unfinished=True, resume_errored=False)
    t = cfg.tune
    base_point = {d.key: d.value_in(cfg) for d in dims}
    points = [base_point] if t.include_base and None not in base_point.values() else None
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(2, min(10, t.num_samples // 3)))
    searcher = OptunaSearch(
        metric=[m for m, _ in OBJECTIVES], mode=[m for _, m in OBJECTIVES], points_to_evaluate=points, sampler=sampler
    )
    chunks = math.ceil(t.val_limit / t.report_every)
    scheduler = BaselineASHA(
        points[0] if points else None,
        time_attr="training_iteration",
        metric="objective_speed",
        mode="max",
        max_t=chunks,
        grace_period=min(t.grace_period, chunks),
        reduction_factor=2,
    )
    logger = TrialLogger(str(out), uri, parent, base_yaml, space, verbose)
    return raytune.Tuner(
        trainable,
        param_space={d.key: d.domain() for d in dims},
        tune_config=raytune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent,
            time_budget_s=t.time_budget_s,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=raytune.RunConfig(
            name=out.name,
            storage_path=str(out.parent),
            callbacks=[logger],
            verbose=0,
            failure_config=raytune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )


def read_records(out: Path) -> list[TrialRecord]:
    """The ended trials of a search, in the order they ended (the last line wins for a trial logged twice)."""
    path = out / "trials.jsonl"
    records: dict[str, TrialRecord] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = TrialRecord.from_json(line)
                records.pop(rec.trial_id, None)
                records[rec.trial_id] = rec
    return list(records.values())


def run_search(
    cfg: Config,
    resume: bool = False,
    log: Callable[[str], None] = print,
    verbose: bool = True,
    stored_config: bool = False,
) -> SearchResult:
    """Runs (or resumes) the search of ``cfg.tune``; returns a :class:`SearchResult`.

    With ``resume``, ``cfg``'s ``tune.storage`` and ``tune.name`` find the search (no name: the latest); its saved
    config is then used as is if ``stored_config``, else ``cfg`` must equal it.

    Raises:
        ConfigError: an invalid space (naming ``tune.space.<key>``), an existing search without ``resume``, a
            resume with another config, ``cluster.address`` or a trial's resources. Raised before any trial starts.
        InputError: nothing to resume; unless the space searches ``models.*``, a model pair without a shared
            tokenizer or a missing checkpoint (with it, each trial loads and checks its own pair: a failed trial).
    """
    from covspec import tracking
    from covspec.cluster.placement import check_gpus
    from covspec.models.loading import check_pair_files

    cfg, out = _resolve(cfg, resume, stored_config)
    check_gpus(cfg, "tune")
    dims = parse_space(cfg)
    if not any(d.key.startswith("models.") for d in dims):  # one pair for every trial: check it before the search
        check_pair_files(cfg.models.target, cfg.models.draft)  # (a searched pair: each trial checks its own)
    space = space_of(cfg)
    tracked = copy.deepcopy(cfg)
    tracked.tracking.enabled = True  # a search is always tracked
    uri = tracking.tracking_uri(tracked)
    state = json.loads((out / "search.json").read_text()) if resume else {}
    tags = {"covspec.command": "tune", "tune.name": cfg.tune.name}
    import ray

    started = _ensure_ray(cfg)  # before the search's MLflow run or directory exists: a bad address leaves neither
    try:
        with tracking.start_run(tracked, f"tune {cfg.tune.name}", tags, run_id=state.get("parent_run_id")) as run:
            parent = run.info.run_id
            if not resume:
                out.mkdir(parents=True)
                (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
                (out / "search.json").write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
                tracking.log_dict(space, "space.yaml")
            log(f"search {cfg.tune.name} in {out}; parent MLflow run {parent} ({uri})")
            (out / "status.json").unlink(missing_ok=True)
            from ray import tune as raytune

            restore = resume and raytune.Tuner.can_restore(str(out))
            start = time.perf_counter()
            _tuner(cfg, dims, space, out, parent, uri, restore, verbose).fit()
            elapsed = time.perf_counter() - start
            if started:  # the trials' workers go before the report is written
                ray.shutdown()
                started = False
            return _finish(cfg, dims, out, parent, uri, elapsed)
    finally:
        if started:
            ray.shutdown()


def _finish(cfg: Config, dims: list[Dimension], out: Path, parent: str, uri: str, elapsed: float) -> SearchResult:
    """Table, plot and best.yaml from the ended trials, written to ``out`` and logged on the parent run."""
    from covspec import tracking

    records = read_records(out)
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
    # Interrupted (Ctrl-C, SIGUSR1): trials that never ended, or fewer trials than asked with time budget left.
    short = status.get("trials", 0) < cfg.tune.num_samples and elapsed < cfg.tune.time_budget_s
    interrupted = bool(status.get("unfinished")) or short
    metric = cfg.tune.metric
    base_point = {d.key: d.value_in(cfg) for d in dims}
    base = next((r for r in records if all(r.params.get(k) == v for k, v in base_point.items())), None)
    counts = {
        s: sum(r.status == s for r in records) for s in ("complete", "early_stopped", "infeasible", "failed", "not_run")
    }
    keys = [d.key for d in dims]
    write_table(records, keys, metric, out)
    plot_pareto(records, metric, base.trial_id if base else None, out / "pareto.png")
    best = best_trial(records, metric)
    best_path = None
    if best is not None:
        note = f"search {cfg.tune.name}, parent MLflow run {parent}"
        best_path = write_best(candidate_config(cfg, dims, best.params), best, metric, note, out / "best.yaml")
    summary = {f"trials_{k}": v for k, v in counts.items()} | {"search_s": elapsed, "trials": len(records)}
    if best is not None:
        summary |= {
            f"best_{k}": best.metrics[k] for k in ("speedup", "tokens_per_s", "bytes_per_token", "mean_accepted_length")
        }
    if base is not None and base.metrics.get("samples"):
        summary |= {f"base_{k}": base.metrics[k] for k in ("speedup", "tokens_per_s", "bytes_per_token")}
    tracking.log_metrics(summary)
    for name in ("trials.csv", "trials.md", "pareto.png", "best.yaml"):
        if (out / name).is_file():
            tracking.log_artifact(out / name)
    import mlflow

    mlflow.set_tags({"tune.best_trial": best.trial_id if best else "", "tune.interrupted": str(interrupted)})
    return SearchResult(
        cfg.tune.name, out, parent, uri, records, best, best_path, base.trial_id if base else None, interrupted, counts
    )
