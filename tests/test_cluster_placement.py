"""Pinning actors to CPU cores (``cluster.edge_cores`` / ``cluster.device_cores``): no Ray needed."""

from __future__ import annotations

import os
import re
import threading

import pytest

from covspec.cluster.experiment import _pinning
from covspec.cluster.placement import available_cores, check_cores, check_gpus, pin_process
from covspec.config import load_config
from covspec.errors import ConfigError

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs os.sched_setaffinity")


def _thread_cores() -> set[frozenset[int]]:
    """The core masks of this process's threads (a thread that ends while they are read is skipped)."""
    masks = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            masks.add(frozenset(os.sched_getaffinity(int(tid))))
        except ProcessLookupError:
            continue
    return masks


@linux
def test_pin_process_pins_every_thread_and_the_threads_started_later():
    original = available_cores()
    ready, stop = threading.Event(), threading.Event()
    before = threading.Thread(target=lambda: (ready.set(), stop.wait()), daemon=True)  # running before the pin
    before.start()
    ready.wait()
    one = [original[-1]]
    try:
        assert pin_process(one, "cluster.edge_cores") == one
        assert _thread_cores() == {frozenset(one)}  # the thread that was already running too
        seen: list[set[int]] = []
        later = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen == [set(one)]
    finally:
        stop.set()
        pin_process(original, "cluster.edge_cores")
    assert available_cores() == original
    assert pin_process([], "cluster.edge_cores") == original  # empty: nothing pinned


@linux
def test_a_core_the_machine_does_not_have_is_a_config_error_naming_the_key():
    count, before = os.cpu_count(), _thread_cores()
    with pytest.raises(ConfigError, match=re.escape(f"cluster.device_cores: core {count} is not on this machine")):
        pin_process([0, count], "cluster.device_cores")
    assert _thread_cores() == before  # refused before any thread was pinned
    check_cores([], "cluster.edge_cores")  # nothing to check


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.edge_cores=[-1]", "cluster.edge_cores[0] must be"),
        ("cluster.device_cores=[0, 0]", "cluster.device_cores lists 0 twice"),
        ("cluster.edge_cores=0", "cluster.edge_cores must be a list"),
    ],
)
def test_core_lists_are_validated(override: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_the_run_table_says_what_is_pinned():
    c = load_config(None, ["cluster.edge_cores=[0]", "cluster.device_cores=[1, 2]"]).cluster
    assert _pinning(c) == "; edge pinned to core(s) 0; devices pinned to core(s) 1, 2"
    assert _pinning(load_config(None, []).cluster) == ""


def test_the_run_table_names_edge_error_replies():
    from covspec.cluster.experiment import format_table

    cfg = load_config(None, ["methods=[target_only,covspec]"])
    quiet = [{"method": "target_only", "edge_errors": 0}, {"method": "covspec", "edge_errors": 0}]
    assert "Edge error replies" not in format_table(cfg, quiet, "r1")
    text = format_table(cfg, [quiet[0], {"method": "covspec", "edge_errors": 3}], "r1")
    assert "Edge error replies: covspec 3" in " ".join(text.split())


def test_the_run_table_states_this_runs_lossless_bound():
    from covspec.cluster.experiment import format_table

    cfg = load_config(None, ["methods=[target_only,covspec]"])
    rows = [{"method": "target_only", "edge_capacity_ceiling_vs_target_only": 2.3234,
             "edge_capacity_ceiling_cpu_vs_target_only": 2.2873}, {"method": "covspec"}]  # fmt: skip
    text = " ".join(format_table(cfg, rows, "r1").split())
    assert "since each prefills the prompt once (in this run 2.32x busy, 2.29x CPU)." in text
    assert "(in this run" not in " ".join(format_table(cfg, [{"method": "covspec"}], "r1").split())


@pytest.mark.parametrize(
    ("overrides", "command", "message"),
    [
        (
            ["models.target.device=cuda"],
            "run",
            "models.target.device is 'cuda' but cluster.edge_gpus is 0: Ray hides the GPUs from an edge replica "
            "that reserves none; set cluster.edge_gpus (e.g. 1, or a fraction to share one)",
        ),
        (
            ["models.draft.device=cuda", "cluster.edge_gpus=1"],
            "run",
            "models.draft.device is 'cuda' but cluster.device_gpus is 0",
        ),
        (
            ["models.target.device=cuda:1", "cluster.edge_gpus=0.5"],
            "run",
            "models.target.device is 'cuda:1' but an edge replica reserving cluster.edge_gpus=0.5 "
            "sees its GPU as cuda:0",
        ),
        (
            ["models.target.device=cuda", "cluster.edge_gpus=1"],
            "tune",
            "models.target.device is 'cuda' but tune.trial_gpus is 0: Ray hides the GPUs from a trial",
        ),
    ],
)
def test_a_model_on_a_gpu_its_ray_actor_cannot_see_is_a_config_error(overrides, command, message):
    with pytest.raises(ConfigError) as info:
        check_gpus(load_config(None, overrides), command)
    assert str(info.value).startswith(message)


def test_gpu_reservations_that_fit_pass():
    from pathlib import Path

    check_gpus(load_config(None, []), "run")  # everything on the CPU: nothing to reserve
    check_gpus(load_config(None, []), "tune")
    check_gpus(load_config(None, ["models.target.device=cuda:1", "cluster.edge_gpus=2"]), "run")
    check_gpus(load_config(None, ["models.target.device=mps", "models.draft.device=mps"]), "tune")  # not Ray's GPUs
    for path in sorted((Path(__file__).parents[1] / "configs" / "models").glob("*.yaml")):  # the shipped GPU pairs
        cfg = load_config(path)
        check_gpus(cfg, "run")
        check_gpus(cfg, "tune")
    with pytest.raises(ValueError, match="command"):
        check_gpus(load_config(None, []), "bench")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:1", "cluster.address: no Ray cluster answers at '127.0.0.1:1' (Connection refused)"),
        ("no-such-host.invalid:6379", "cluster.address: no Ray cluster answers at 'no-such-host.invalid:6379' ("),
    ],
)
def test_joining_a_cluster_nobody_runs_fails_at_once_naming_the_key(address, message, monkeypatch):
    """Ray itself retried such an address for minutes (`covspec run cluster.address=nowhere:1234` was still
    retrying after 120 s)."""
    import time

    import ray

    from covspec.cluster.placement import connect_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # this test process may hold the session's Ray
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init must not be reached"))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        connect_ray(address, timeout_s=2.0)
    assert str(info.value).startswith(message) and time.perf_counter() - start < 5


def test_auto_without_a_cluster_is_a_config_error_not_a_traceback(monkeypatch):
    import ray

    from covspec.cluster.placement import connect_ray

    def init(**kwargs):
        assert kwargs["address"] == "auto"
        raise ConnectionError("Could not find any running Ray instance. Please specify ...\nmore")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ConfigError, match=r"^cluster\.address: cannot join a Ray cluster at 'auto': Could not find "
                                          r"any running Ray instance\. Please specify \.\.\.$"):  # fmt: skip
        connect_ray("auto")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert connect_ray("auto") is False  # Ray already up in this process: joined by whoever started it


@pytest.mark.parametrize("address", ["foo", "host:0", ":6379", "host:port", "host:70000"])
def test_a_malformed_cluster_address_is_a_config_error(address):
    with pytest.raises(ConfigError, match=rf"^cluster\.address must be auto or host:port, got '{address}'$"):
        load_config(None, [f"cluster.address={address}"])
    for good in ("auto", "10.0.0.5:6379", "head.example:6379", "ray://head.example:10001"):
        assert load_config(None, [f"cluster.address={good}"]).cluster.address == good


def test_covspec_run_on_an_unreachable_cluster_leaves_no_run_behind(tmp_path, monkeypatch, capsys):
    from covspec.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ray.is_initialized", lambda: False)  # as in a fresh `covspec run` process
    argv = ["run", "cluster.address=127.0.0.1:1", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "data.limit=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "covspec: error: cluster.address: no Ray cluster answers at '127.0.0.1:1' (Connection refused)\n"
    assert list(tmp_path.iterdir()) == []  # no results directory, no MLflow store


def test_the_cause_of_a_remote_traceback_is_its_last_error_line():
    from covspec.cluster.experiment import cause_line

    trace = """Traceback (most recent call last):
  File "/x/replica.py", line 1, in initialize_callable
    raise covspec.errors.InputError(...)
covspec.errors.InputError: models.target.path: cannot load the weights of '/m': truncated

During handling, another line
"""
    assert cause_line(trace) == "InputError: models.target.path: cannot load the weights of '/m': truncated"
    assert cause_line("ray::DeviceActor.__init__()\nsafetensors._safetensors_rust.SafetensorError: bad header") == (
        "SafetensorError: bad header"
    )
    assert cause_line("Failed to update the deployments.\n") == "Failed to update the deployments."
    assert cause_line("") == "no reason given"


def test_actors_that_cannot_all_fit_in_the_cluster_are_refused_naming_the_keys():
    """Ray kept such actors pending without a word: `covspec run cluster.device_cpus=1` on 2 cores waited 600 s for
    its devices, then printed a traceback."""
    from pathlib import Path

    from covspec.cluster.placement import check_resources

    check_resources(load_config(None, []), {"CPU": 2.0})  # the embedded default: 0.5 + 8 x 0.1 on 2 cores
    for path in sorted((Path(__file__).parents[1] / "configs" / "models").glob("*.yaml")):  # edge + 8 devices: 1 GPU
        check_resources(load_config(path), {"CPU": 16.0, "GPU": 1.0})
    with pytest.raises(ConfigError) as info:
        check_resources(load_config(None, ["cluster.device_cpus=1"]), {"CPU": 2.0})
    assert str(info.value) == (
        "cluster.edge_replicas x cluster.edge_cpus + cluster.num_devices x cluster.device_cpus = 1 x 0.5 + 8 x 1 = "
        "8.5 CPUs, but this Ray cluster has 2: lower them (fractions are fine) or join a larger cluster"
    )
    with pytest.raises(ConfigError, match=r"^cluster\.edge_replicas x cluster\.edge_gpus \+ .* = 2 x 1 \+ 8 x 0 = 2 "
                                          r"GPUs, but this Ray cluster has 1:"):  # fmt: skip
        check_resources(load_config(None, ["cluster.edge_replicas=2", "cluster.edge_gpus=1"]), {"CPU": 8, "GPU": 1})
    with pytest.raises(ConfigError, match="GPUs, but this Ray cluster has 0"):  # no GPU at all
        check_resources(load_config(None, ["cluster.edge_gpus=0.5"]), {"CPU": 2.0})


def test_covspec_run_checks_a_local_rays_cpus_before_starting_it(tmp_path, monkeypatch, capsys):
    import ray

    from covspec.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `covspec run` process
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray must not start"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["run", "cluster.device_cpus=1", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covspec: error: cluster.edge_replicas x cluster.edge_cpus + ") and "8.5 CPUs" in err
    assert list(tmp_path.iterdir()) == []
