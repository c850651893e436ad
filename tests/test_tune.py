"""covspec tune: search spaces, the Pareto front, a tiny Ray Tune search with MLflow runs, resume, a crashing trial,
and the MLflow UI check."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from covspec.cli import main
from covspec.config import Config, load_config
from covspec.errors import ConfigError
from tune.report import TrialRecord, best_trial, pareto_front
from tune.space import DEFAULT_SPACE, candidate_config, parse_space

ROOT = Path(__file__).resolve().parents[1]
TUNE_CONFIGS = sorted((ROOT / "configs" / "tune").glob("*.yaml"))
TINY_SPACE = "tune.space={drafting.threshold: {uniform: [0.1, 0.8]}, branching.budget: {choice: [0, 2]}}"


def tiny_overrides(tmp_path: Path) -> list[str]:
    """A search of 4 trials of 2 val samples of at most 8 tokens, with its own storage and MLflow store."""
    return [
        "generation.max_new_tokens=8", "threads=1", "tune.num_samples=4", "tune.max_concurrent=2",
        "tune.val_limit=2", "tune.report_every=1", "tune.trial_cpus=1", "tune.time_budget_s=240",
        f"tune.storage={tmp_path / 'results'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=tune-test", TINY_SPACE,
    ]  # fmt: skip


def tiny(tmp_path: Path, *extra: str) -> Config:
    return load_config(overrides=[*tiny_overrides(tmp_path), *extra])


# --- spaces: validated before anything runs -------------------------------------------------------------------


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_shipped_tune_configs_validate(path: Path):
    dims = parse_space(load_config(path))
    assert dims and all(d.key.split(".")[0] not in ("data", "generation", "tune") for d in dims)


def test_default_space_is_the_shipped_one_and_has_room_for_16_trials():
    assert load_config(ROOT / "configs" / "tune" / "default.yaml").tune.space == DEFAULT_SPACE
    dims = parse_space(load_config())  # an empty tune.space searches the default space
    assert [d.key for d in dims] == list(DEFAULT_SPACE)
    assert sum(d.kind in ("uniform", "loguniform") for d in dims) >= 2  # continuous: far more than 16 points


@pytest.mark.parametrize(
    ("space", "named"),
    [
        ("{pruning.keep_ratio: {uniform: [0.1, 1.5]}}", "tune.space.pruning.keep_ratio: upper bound 1.5"),
        ("{verification.num_candidates: {int: [0, 8]}}", "tune.space.verification.num_candidates: lower bound 0"),
        ("{drafting.treshold: {uniform: [0.1, 0.5]}}", "unknown config key 'drafting.treshold'"),
        ("{pruning.method: {choice: [joint, best]}}", "tune.space.pruning.method: choice 'best'"),
        ("{data.split: {choice: [test]}}", "tune.space.data.split"),
        ("{link: {choice: {lan: {rtt: 1.0}}}}", "unknown config key 'link.rtt'"),
        ("{drafting.gamma: {uniform: [1, 8]}}", "drafting.gamma is an integer"),
    ],
)
def test_bad_spaces_are_refused_naming_the_key(space: str, named: str):
    with pytest.raises(ConfigError) as err:
        parse_space(load_config(overrides=[f"tune.space={space}"]))
    assert named in str(err.value)


def test_cross_key_bounds_are_checked_with_the_other_dimensions_moved():
    ok = "{drafting.gamma_min: {int: [1, 30]}, drafting.gamma_max: {int: [4, 30]}}"
    assert len(parse_space(load_config(overrides=[f"tune.space={ok}"]))) == 2
    with pytest.raises(ConfigError, match=r"drafting\.gamma_min: upper bound 30"):
        parse_space(load_config(overrides=["tune.space={drafting.gamma_min: {int: [1, 30]}}"]))  # gamma_max is 24


def test_trial_configs_are_ordinary_configs():
    cfg = load_config(ROOT / "configs" / "tune" / "links.yaml")
    dims = parse_space(cfg)
    trial = candidate_config(cfg, dims, {"link": "lte", "drafting.threshold": 0.3, "drafting.gamma_max": 9,
                                         "branching.budget": 0, "branching.tree": 3})  # fmt: skip
    assert (trial.link.rtt_ms, trial.link.up_mbps, trial.drafting.gamma_max, trial.branching.budget,
            trial.branching.tree) == (50, 10, 9, 0, 3)  # fmt: skip
    params = {"link": "lan", "drafting.threshold": 0.3, "drafting.gamma_max": 4, "branching.budget": 0,
              "branching.tree": 0}  # fmt: skip
    with pytest.raises(ConfigError, match=r"gamma_min must be <= drafting\.gamma_max"):  # a trial reports infeasible
        candidate_config(load_config(overrides=["drafting.gamma_min=8"]), dims, params)


def test_cli_refuses_a_bad_space_before_any_trial(tmp_path, capsys):
    storage = tmp_path / "results"
    code = main(["tune", "tune.space={pruning.keep_ratio: {uniform: [0.0, 0.5]}}", f"tune.storage={storage}",
                 f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pruning.keep_ratio" in err and "lower bound 0.0" in err
    assert not storage.exists() and not (tmp_path / "m.db").exists()  # no search directory, no MLflow run
    assert main(["tune", "--resume", f"tune.storage={storage}"]) == 2
    assert "no search under" in capsys.readouterr().err


# --- the front and the records --------------------------------------------------------------------------------


def rec(tid: str, speedup: float, bpt: float, status: str = "complete") -> TrialRecord:
    m = {"speedup": speedup, "bytes_per_token": bpt, "tokens_per_s": 10 * speedup, "mean_accepted_length": 3.0}
    return TrialRecord(tid, status, {}, m)


def test_pareto_front_and_best():
    records = [
        rec("a", 1.0, 20),
        rec("b", 1.2, 25),
        rec("c", 0.9, 22),
        rec("d", 1.1, 18),
        rec("e", 2.0, 5, "early_stopped"),
    ]
    assert [r.trial_id for r in pareto_front(records, "speedup")] == ["d", "b"]  # c is dominated by d, a by d
    assert best_trial(records, "speedup").trial_id == "b"  # early-stopped trials ran fewer samples: not comparable
    assert best_trial([rec("x", 1.0, 1, "infeasible")], "speedup") is None


def test_records_are_classified_from_their_reports():
    full = {"samples": 2, "feasible": 1, "all_samples": 1}
    assert TrialRecord.of("t", {}, [{**full, "all_samples": 0}, full], None).status == "complete"
    assert TrialRecord.of("t", {}, [{**full, "all_samples": 0}], None).status == "early_stopped"
    assert TrialRecord.of("t", {}, [{**full, "feasible": 0}], None).status == "infeasible"
    assert TrialRecord.of("t", {}, [full], "Traceback ...\nValueError: boom").status == "failed"
    assert TrialRecord.of("t", {}, [], None).status == "not_run"


# --- Ray Tune + MLflow ----------------------------------------------------------------------------------------


@pytest.fixture
def ray_local(ray_session):
    """The session's local Ray (tests/conftest.py): one Ray per test session."""
    return ray_session


def _children(uri: str, parent: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(parent).info.experiment_id
    return client, client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def _interrupt_after_first_trial(out: Path) -> threading.Thread:
    """SIGUSR1 (Ray Tune's stop signal, like Ctrl-C) once a trial has ended."""

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "trials.jsonl").is_file():
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.ray
@pytest.mark.slow
def test_search_interrupted_resumed_tracked_and_its_best_runs(ray_local, tmp_path):
    from covspec.data import load_benchmark
    from covspec.runtime.engine import LocalEngine
    from tune.search import run_search

    cfg = tiny(tmp_path, "tune.name=t4", "tune.max_concurrent=1")  # one actor, reused: the cheapest here
    out = tmp_path / "results" / "t4"
    watcher = _interrupt_after_first_trial(out)
    first = run_search(cfg, log=lambda m: None, verbose=False)
    watcher.join()
    assert first.interrupted and 1 <= len(first.records) < 4

    with pytest.raises(ConfigError, match=r"cannot resume .*: branching\.budget was 2, now 4"):
        run_search(tiny(tmp_path, "tune.name=t4", "tune.max_concurrent=1", "branching.budget=4"), resume=True)
    done = run_search(cfg, resume=True, log=lambda m: None, verbose=False)
    assert not done.interrupted and done.parent_run_id == first.parent_run_id
    assert len(done.records) == 4 and {r.status for r in done.records} <= {"complete", "early_stopped"}
    base = next(r for r in done.records if r.trial_id == done.base_id)  # the base config's values: the first point
    assert base.status == "complete" and base.params == {"drafting.threshold": 0.4, "branching.budget": 2}

    client, children = _children(done.tracking_uri, done.parent_run_id)
    assert sorted(c.data.tags["tune.trial_id"] for c in children) == sorted(r.trial_id for r in done.records)
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert all({"drafting.threshold", "branching.budget"} <= set(c.data.params) for c in children)
    assert all("speedup" in c.data.metrics and "bytes_per_token" in c.data.metrics for c in children)
    parent = client.get_run(done.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 4
    artifacts = {a.path for a in client.list_artifacts(done.parent_run_id)}
    assert {"best.yaml", "pareto.png", "trials.csv", "trials.md", "config.yaml", "space.yaml"} <= artifacts

    best = load_config(done.best_path)  # a full ordinary config: covspec run / covspec bench take it as is
    assert best.tune == Config().tune and best.data.split == "test"
    assert best.drafting.threshold == done.best.params["drafting.threshold"]
    engine = LocalEngine.from_config(best)
    sample = load_benchmark(best.data, best.seed)[0]
    ours = engine.run("covspec", sample.image(), sample.question)
    assert ours.token_ids == engine.run("target_only", sample.image(), sample.question).token_ids


@pytest.mark.ray
@pytest.mark.slow
def test_a_crashing_trial_is_recorded_failed_and_the_search_finishes(ray_local, tmp_path):
    from tune.search import run_search

    missing = tmp_path / "no-such-checkpoint"
    space = f"tune.space={{models.draft.path: {{choice: ['{missing}', toy-draft]}}}}"
    # The base config's draft is the missing one: the first trial (the base point) crashes loading it.
    cfg = tiny(tmp_path, space, f"models.draft.path={missing}", "tune.num_samples=2", "tune.val_limit=1")
    result = run_search(cfg, log=lambda m: None, verbose=False)
    assert not result.interrupted and len(result.records) == 2  # the search went on after the crash
    failed = [r for r in result.records if r.status == "failed"]
    assert failed and all("no-such-checkpoint" in r.error for r in failed)
    _, children = _children(result.tracking_uri, result.parent_run_id)
    by_id = {c.data.tags["tune.trial_id"]: c for c in children}
    assert all(
        by_id[r.trial_id].info.status == "FAILED" and "tune.error" in by_id[r.trial_id].data.tags for r in failed
    )
    assert (result.dir / "trials.csv").read_text().count("failed") == len(failed)


@pytest.mark.ray
def test_a_trial_larger_than_the_cluster_is_refused_naming_the_key(ray_local):
    """The session's Ray has 2 CPUs and no GPU: a trial asking for more of either is refused before the search, and
    the Ray it did not start keeps running."""
    from tune.search import _ensure_ray

    refused = [("tune.trial_gpus=1", "tune.trial_gpus must be <= the cluster's 0 GPUs, got 1"),
               ("tune.trial_cpus=3", "tune.trial_cpus must be <= the cluster's 2 CPUs, got 3")]  # fmt: skip
    for override, message in refused:
        with pytest.raises(ConfigError) as info:
            _ensure_ray(load_config(None, [override]))
        assert str(info.value) == message
    assert ray_local.is_initialized()
    assert _ensure_ray(load_config(None, ["tune.trial_cpus=0.5"])) is False  # fits: nothing started


# --- the dashboard --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_ui_lists_the_runs_in_headless_chromium(tmp_path):
    from pipelines.ui_check import check_ui, find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium (Debian: apt-get install -y chromium)")
    from mlflow import MlflowClient

    from covspec import tracking

    cfg = load_config(overrides=["tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'ui.db'}",
                                 "tracking.experiment=ui-check"])  # fmt: skip
    with tracking.start_run(cfg, "tune ui-search") as run:
        parent = run.info.run_id
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    for i in range(2):
        child = client.create_run(run.info.experiment_id, run_name=f"trial {i}", tags={"mlflow.parentRunId": parent})
        client.set_terminated(child.info.run_id)
    result = check_ui(cfg, tmp_path / "ui", run_id=parent)
    assert result["ok"], result
    assert result["runs_listed"] == 3 and result["names_in_dom"] == ["tune ui-search"]
    png = Path(result["screenshot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ui/mlflow-ui.png" in {a.path for a in client.list_artifacts(parent, "ui")}
