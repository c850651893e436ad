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
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}


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
