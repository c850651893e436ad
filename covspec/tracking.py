"""MLflow logging helpers: one run per experiment or pipeline, flattened config params, metrics, artifacts.

Tracking is off unless ``tracking.enabled``; then ``start_run`` yields the active ``mlflow.ActiveRun`` and the
``log_*`` helpers write to it. Every helper is a no-op when no run is active, so pipelines call them
unconditionally.

Store: ``tracking.uri`` if set, else a SQLite store ``sqlite:///<cwd>/mlruns/mlflow.db``. A SQLite store keeps the
artifacts of the experiments it creates in ``artifacts/`` beside its database (``<cwd>/mlruns/artifacts`` by
default). MLflow 3 refuses the plain file store, and an ``./mlruns`` folder would switch its default to it, so the
URI is always set explicitly. ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`` (from the same
directory) shows the runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from covspec.config import Config, config_to_yaml, flatten

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def default_root() -> Path:
    """``<cwd>/mlruns``: the local store's directory."""
    return Path.cwd() / "mlruns"


def tracking_uri(cfg: Config) -> str:
    """``cfg.tracking.uri``, else the local SQLite store under ``default_root()``."""
    return cfg.tracking.uri or f"sqlite:///{default_root() / 'mlflow.db'}"


def params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params: dotted keys, values as strings (lists as JSON, None as ``null``)."""
    out = {}
    for key, value in flatten(cfg).items():
        text = json.dumps(value) if isinstance(value, list | tuple) or value is None else str(value)
        out[key] = text[:MAX_PARAM_CHARS]
    return out


def _experiment_id(cfg: Config) -> str:
    import mlflow

    name = cfg.tracking.experiment
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):  # a local database keeps its artifacts beside it (MLflow's default: ./mlruns)
        root = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
        root.mkdir(parents=True, exist_ok=True)
        location = root.resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def start_run(
    cfg: Config, run_name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None
) -> Iterator[Any]:
    """An MLflow run with the config logged (params and ``config.yaml``) when ``cfg.tracking.enabled``.

    ``run_id`` continues an existing run (resume) instead of starting a new one; its params must not change.

    Yields:
        The active ``mlflow.ActiveRun``, or None when tracking is off (nothing is imported or written then).
        The run ends FINISHED, FAILED if the body raises, or KILLED if it is interrupted (Ctrl-C).
    """
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    if cfg.tracking.uri is None:
        default_root().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        if run_id is not None:
            with mlflow.start_run(run_id=run_id) as run:
                _check_resumable(run, cfg)
                yield run
            return
        with mlflow.start_run(experiment_id=_experiment_id(cfg), run_name=run_name, tags=dict(tags or {})) as run:
            mlflow.log_params(params(cfg))
            mlflow.log_text(config_to_yaml(cfg), "config.yaml")
            yield run
    except KeyboardInterrupt:  # MLflow ended it FAILED; it was stopped, not broken (resumable all the same)
        with contextlib.suppress(Exception):
            mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
        raise


def _check_resumable(run: Any, cfg: Config) -> None:
    """A resumed run must have been started with the same config (MLflow params are immutable)."""
    from covspec.errors import ConfigError

    logged = run.data.params
    for key, value in params(cfg).items():
        if key in logged and logged[key] != value:
            raise ConfigError(f"cannot resume run {run.info.run_id}: {key} was {logged[key]}, now {value}")


def _active() -> bool:
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    return mlflow.active_run() is not None


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Logs the finite numeric values of ``metrics`` (bools as 0/1; others skipped) to the active run."""
    if not _active():
        return
    import mlflow

    clean = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, numbers.Real) and math.isfinite(value):
            clean[f"{prefix}{key}"] = float(value)
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Copies a file into the active run's artifacts."""
    if _active():
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)


def log_dict(data: Any, name: str) -> None:
    """Writes ``data`` as a JSON (or YAML, by ``name``'s suffix) artifact of the active run."""
    if _active():
        import mlflow

        mlflow.log_dict(data, name)
