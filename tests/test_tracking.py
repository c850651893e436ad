"""MLflow tracking helpers: a run with params, metrics and artifacts in a temporary SQLite store; off by default."""

from __future__ import annotations

import json

import pytest

from covspec import tracking
from covspec.config import load_config


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["tracking.enabled=false"])
    with tracking.start_run(cfg, "off") as run:
        assert run is None
        tracking.log_metrics({"x": 1.0})  # no active run: a no-op
    assert not (tmp_path / "mlruns").exists()


def test_params_are_flat_strings():
    p = tracking.params(load_config(overrides=["pruning.keep_ratio=0.25", "methods=[covspec, dssd]"]))
    assert p["pruning.keep_ratio"] == "0.25"
    assert json.loads(p["methods"]) == ["covspec", "dssd"]
    assert p["data.path"] == "null" and p["tracking.enabled"] == "True"


def test_run_logs_params_metrics_and_artifacts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["tracking.enabled=true", "tracking.experiment=test-exp", "pruning.method=joint"])
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    artifact = tmp_path / "table.csv"
    artifact.write_text("a,b\n1,2\n")
    with tracking.start_run(cfg, "unit") as run:
        tracking.log_metrics({"tokens_per_s": 12.5, "identical": True, "skip": None, "nan": float("nan"), "s": "x"})
        tracking.log_metrics({"acc": 3.0}, prefix="joint.0.25.")
        tracking.log_artifact(artifact)
        run_id = run.info.run_id
    assert mlflow.active_run() is None
    stored = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(cfg)).get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "unit"
    assert stored.data.params["pruning.method"] == "joint"
    assert stored.data.metrics == {"tokens_per_s": 12.5, "identical": 1.0, "joint.0.25.acc": 3.0}
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    files = {p.name for p in (tmp_path / "mlruns" / "artifacts").rglob("*") if p.is_file()}
    assert {"table.csv", "config.yaml"} <= files


def test_failed_body_marks_the_run_failed(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    cfg = load_config(overrides=["tracking.enabled=true", f"tracking.uri={uri}"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError), tracking.start_run(cfg, "boom") as run:
        run_id = run.info.run_id
        raise RuntimeError("boom")
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"
    assert not (tmp_path / "mlruns").exists()  # a configured URI leaves the default store alone
    assert (tmp_path / "artifacts").is_dir()  # a SQLite store keeps artifacts beside its database


@pytest.mark.parametrize("resumed", [False, True])
def test_an_interrupted_body_marks_the_run_killed(resumed, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(overrides=["tracking.enabled=true", f"tracking.uri={uri}"])
    run_id = None
    if resumed:
        with tracking.start_run(cfg, "first") as run:
            run_id = run.info.run_id
    with pytest.raises(KeyboardInterrupt), tracking.start_run(cfg, "stopped", run_id=run_id) as run:
        run_id = run.info.run_id
        raise KeyboardInterrupt
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"
    assert mlflow.active_run() is None
