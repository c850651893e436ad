"""The distributed runtime: `covspec run` end to end, device and edge faults, resume. Marked ``ray``.

One session-scoped local Ray (``ray_session``, 2 CPUs, token auth off for speed); the end-to-end test runs the
``covspec run`` command in a subprocess with Ray's default token authentication on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from covspec.config import load_config
from covspec.data.shapes import load_split
from covspec.decoding.autoregressive import generate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = ["cluster.num_devices=2", "cluster.warmup=false", "generation.max_new_tokens=24", "cluster.batch_wait_ms=1",
         "cluster.repeats=1"]  # fmt: skip


def _reference(target, samples, max_new_tokens: int) -> dict[str, list[int]]:
    return {s.sample_id: generate(target, target.prepare(s.image(), s.question), max_new_tokens).token_ids
            for s in samples}  # fmt: skip


def _describe_samples(n: int):
    return [s for s in load_split("test", 40) if s.kind == "describe"][:n]  # long answers: many rounds


def _short_then_long():
    """A one-round answer, then the two longest describe answers.

    Both devices start together; the short sample ends first, and the other device is then still many rounds into
    its long one, so a fault injected when the first row arrives hits a sample in flight. (With three similar
    samples the other device had sometimes finished too by then, and nothing was hit.)
    """
    short = next(s for s in load_split("test", 40) if s.kind == "color")
    return [short, *sorted(_describe_samples(8), key=lambda s: -len(s.answer))[:2]]


def test_covspec_run_every_method_on_two_devices_with_token_auth(tmp_path, toy_pair):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: token auth on
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cmd = [sys.executable, "-m", "covspec.cli", "run", "data.limit=1", *SMALL, "tracking.enabled=true",
           f"tracking.uri={uri}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Token authentication is enabled" in proc.stderr
    cfg = load_config(None, ["data.limit=1"])
    for method in cfg.methods:
        assert method in proc.stdout
    runs = list((tmp_path / "results").iterdir())
    assert len(runs) == 1
    rows = [json.loads(line) for line in (runs[0] / "samples.jsonl").read_text().splitlines()]
    assert Counter((r["method"], r["sample_id"]) for r in rows) == {(m, s.sample_id): 1 for m in cfg.methods
                                                                    for s in load_split("test", 1)}  # fmt: skip
    target, _ = toy_pair
    reference = _reference(target, load_split("test", 1), 24)
    for r in rows:
        assert r["token_ids"] == reference[r["sample_id"]], r["method"]
        assert r["num_tokens"] > 0 and r["bytes_upload"] > 0
    summary = json.loads((runs[0] / "summary.json").read_text())
    by = {row["method"]: row for row in summary}
    assert by["covspec"]["identical_to_target_only"] == 1.0
    assert all(row["edge_errors"] == 0 for row in summary)  # device and edge agree on every frame (and on closing)
    assert "Edge error replies" not in proc.stdout
    assert "(raylet)" not in proc.stdout + proc.stderr  # the teardown no longer kills Serve's controller by itself
    assert proc.stdout.rstrip().splitlines()[-1].startswith("run ")  # the table, then where it is: nothing after
    assert by["covspec"]["decoding_bytes_per_token"] < by["vanilla_sd"]["decoding_bytes_per_token"]
    assert by["covspec"]["edge_capacity"] > 0 and by["target_only"]["system_tokens_per_s"] > 0
    base = by["target_only"]  # its ceiling: busy time over prefill time
    assert base["edge_capacity_ceiling_vs_target_only"] == pytest.approx(1 / base["edge_prefill_share"])
    assert by["covspec"]["edge_capacity_ceiling_vs_target_only"] > by["covspec"]["edge_capacity_vs_target_only"]
    for row in (base, by["covspec"]):  # the CPU clock's ceiling bounds the CPU clock's capacity the same way
        assert row["edge_capacity_ceiling_cpu_vs_target_only"] > row["edge_capacity_cpu_vs_target_only"]
    assert "cap ceiling" in proc.stdout and "ceil/CPU" in proc.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(runs[0].name)
    assert run.info.status == "FINISHED"
    assert run.data.params["cluster.num_devices"] == "2"
    assert "covspec.edge_capacity" in run.data.metrics and "target_only.system_tokens_per_s" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.jsonl", "table.txt", "config.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/throughput.png", "plots/bytes_per_token.png", "plots/accepted_length_hist.png"} <= plots


def test_an_edge_that_cannot_load_its_target_fails_naming_the_cause_and_leaves_nothing(ray_session, tmp_path):
    """Serve's own error says only "Failed to update the deployments ['EdgeServer']" (as a traceback); the cause is
    in the replica's. Nothing of the half-started cluster stays behind in the session's Ray."""
    import shutil

    import ray
    from ray import serve

    from covspec.cluster.experiment import Cluster, StartError
    from covspec.models.loading import BUILTIN

    bad = tmp_path / "target"
    shutil.copytree(BUILTIN["toy-target"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # truncated
    cfg = load_config(None, [*SMALL, f"models.target.path={bad}"])
    with pytest.raises(StartError) as info:
        Cluster(cfg, log=lambda m: None)
    assert str(info.value).startswith(f"the edge did not start: InputError: models.target.path: cannot load the "
                                      f"weights of '{bad}': ")  # fmt: skip
    assert not [name for name in serve.status().applications if name.startswith("covspec-edge")]
    assert not [a for a in ray.util.list_named_actors() if str(a).startswith("covspec-")]


def _jobs(method: str, samples):
    from covspec.cluster.devices import Job
    from covspec.cluster.experiment import _png

    return [Job(method, s.sample_id, s.question, _png(s.image()), i) for i, s in enumerate(samples)]


@pytest.fixture(scope="module")
def cluster(ray_session):
    """One edge (pinned to the last core) + 2 devices (pinned to every core) shared by the fault tests (in file
    order; the last one kills the devices)."""
    from covspec.cluster.experiment import Cluster

    cores = sorted(os.sched_getaffinity(0))  # the cores Ray's workers may use here
    cfg = load_config(None, [*SMALL, "generation.max_new_tokens=40", f"cluster.edge_cores=[{cores[-1]}]",
                             f"cluster.device_cores=[{','.join(map(str, cores))}]"])  # fmt: skip
    cl = Cluster(cfg, log=lambda m: None)
    yield cl
    cl.close()


def test_the_edge_replica_and_the_devices_run_on_the_cores_they_are_pinned_to(cluster):
    cores = sorted(os.sched_getaffinity(0))
    assert cluster.edge_cores == cores[-1:]
    assert [info["cores"] for info in cluster.info] == [cores] * 2


def test_a_device_killed_mid_sample_has_its_sample_retried_elsewhere(cluster, toy_pair):
    import ray

    from covspec.cluster.experiment import run_method
    from covspec.runtime.transport import LINK_SWITCH_INTERVAL_S

    assert all(info["switch_interval_s"] == LINK_SWITCH_INTERVAL_S for info in cluster.info)  # responsive links
    # devices at cluster.device_nice, below the edge (a Ray worker at Ray's worker niceness, 15 by default)
    assert [info["nice"] for info in cluster.info] == [19, 19] and cluster.edge_nice < 19
    samples = _short_then_long()
    rows: list[dict] = []

    def sink(row):
        if not rows:
            assert row["sample_id"] == samples[0].sample_id, "the one-round sample should finish first"
            ray.kill(cluster.devices[1 - row["device"]], no_restart=False)
        rows.append(row)

    phase = run_method(cluster, "covspec", _jobs("covspec", samples), sink)
    assert phase.retries >= 1
    assert Counter(r["sample_id"] for r in rows) == {s.sample_id: 1 for s in samples}
    reference = _reference(toy_pair[0], samples, 40)
    assert all(r["token_ids"] == reference[r["sample_id"]] for r in rows)
    assert any(r["attempts"] > 1 for r in rows)


def test_an_edge_replica_killed_mid_run_is_replaced_and_outputs_do_not_change(cluster, toy_pair):
    from ray import serve

    from covspec.cluster.edge_app import DEPLOYMENT_NAME
    from covspec.cluster.experiment import run_method

    samples = _short_then_long()
    rows: list[dict] = []
    replicas = cluster.edge_stats()["replicas"]

    def sink(row):
        if not rows:
            assert row["sample_id"] == samples[0].sample_id, "the one-round sample should finish first"
            serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=cluster.app_name).crash.remote()
        rows.append(row)

    run_method(cluster, "covspec_no_adaptive", _jobs("covspec_no_adaptive", samples), sink)
    assert Counter(r["sample_id"] for r in rows) == {s.sample_id: 1 for s in samples}
    reference = _reference(toy_pair[0], samples, 40)
    assert all(r["token_ids"] == reference[r["sample_id"]] for r in rows)
    assert cluster.edge_stats()["replicas"] == replicas + 1  # Serve started a replica in place of the dead one
    assert sum(r["session_reopens"] for r in rows) + sum(r["attempts"] - 1 for r in rows) >= 1


def test_resume_skips_finished_samples_and_continues_the_mlflow_run(cluster, tmp_path, monkeypatch):
    """Two passes (the methods forward, then reversed), the last row torn: the resumed run redoes only it."""
    import mlflow

    from covspec.cluster.experiment import read_rows, run_experiment

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [*SMALL, "generation.max_new_tokens=40", "data.limit=2", "methods=[target_only,covspec]",
                             "cluster.repeats=2", "tracking.enabled=true", f"tracking.uri={uri}"])  # fmt: skip
    first = run_experiment(cfg, log=lambda m: None, cluster=cluster)
    path = Path(first["dir"]) / "samples.jsonl"
    order = [(r["repeat"], r["method"]) for r in read_rows(path)]
    assert sorted(set(order), key=order.index) == [(0, "target_only"), (0, "covspec"), (1, "covspec"),
                                                   (1, "target_only")]  # fmt: skip
    covspec = next(r for r in first["summary"] if r["method"] == "covspec")
    by_pass = covspec["edge_capacity_vs_target_only_by_repeat"]
    assert len(by_pass) == 2 and None not in by_pass
    assert covspec["edge_capacity_vs_target_only_median"] == pytest.approx(sum(by_pass) / 2)
    assert "per pass" in first["table"] and " / " in first["table"]
    lines = path.read_text().splitlines()
    dropped = json.loads(lines[-1])
    assert (dropped["repeat"], dropped["method"]) == (1, "target_only")
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the last row torn mid-write
    second = run_experiment(cfg, resume=first["run_id"], log=lambda m: None, cluster=cluster)
    assert second["run_id"] == first["run_id"]
    assert list(second["phases"]) == [dropped["method"]]  # only the unfinished method ran again
    rows = read_rows(path)
    assert Counter((r["method"], r["sample_id"], r["repeat"]) for r in rows) == {
        (m, s.sample_id, r): 1 for m in ("target_only", "covspec") for s in load_split("test", 2) for r in (0, 1)
    }
    # the resumed process timed only the redone row: its rates count only that row's tokens, in pass 1 only
    redone = next(r for r in second["summary"] if r["method"] == "target_only")
    assert redone["measured_tokens"] == dropped["num_tokens"] and redone["tokens"] > dropped["num_tokens"]
    assert redone["system_tokens_per_s_vs_target_only_by_repeat"] == [None, 1.0]
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(first["run_id"]).info.status == "FINISHED"
    with pytest.raises(Exception, match="no results"):
        run_experiment(cfg, resume="nonexistent-run", log=lambda m: None, cluster=cluster)


def test_a_run_that_cannot_progress_fails_clearly_and_keeps_partial_results(cluster, tmp_path, monkeypatch):
    import mlflow
    import ray

    from covspec.cluster.experiment import RunError, run_experiment

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [*SMALL, "generation.max_new_tokens=40", "data.limit=6", "methods=[target_only]",
                             "tracking.enabled=true", f"tracking.uri={uri}"])  # fmt: skip

    def progress_factory(method, total):
        def advance():  # after the first result, every device dies for good
            for device in cluster.devices:
                ray.kill(device, no_restart=True)

        return advance

    with pytest.raises(RunError, match="no device is left"):
        run_experiment(cfg, log=lambda m: None, progress_factory=progress_factory, cluster=cluster)
    (run_dir,) = (tmp_path / "results").iterdir()
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < 6
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(run_dir.name).info.status == "FAILED"
    assert "samples.jsonl" in {a.path for a in client.list_artifacts(run_dir.name)}
