from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from covspec.cli import main, split_config_args
from covspec.config import Config, config_to_dict
from covspec.errors import ConfigError, InputError


def test_config_show_prints_the_resolved_yaml(capsys, write_yaml):
    path = write_yaml("pruning:\n  method: joint\n")
    assert main(["config", "show", str(path), "data.limit=3", "methods=[covspec,dssd]"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["data"]["limit"] == 3
    assert shown["methods"] == ["covspec", "dssd"]
    assert shown["pruning"]["method"] == "joint"
    assert shown.keys() == config_to_dict(Config()).keys()


def test_config_show_without_arguments_prints_the_defaults(capsys):
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config_to_dict(Config())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "show", "pruning.keep_ratio=1.5"], "pruning.keep_ratio must be in (0, 1], got 1.5"),
        (["config", "show", "data.limt=3"], "unknown config key 'data.limt'"),
        (["config", "show", "missing.yaml"], "config file not found: missing.yaml"),
        (["config", "show", "data.limit=3", "oops"], "expected key=value"),
        (["run", "models.target.device=cuda"], "models.target.device is 'cuda' but cluster.edge_gpus is 0"),
        (["tune", "models.draft.device=cuda"], "models.draft.device is 'cuda' but tune.trial_gpus is 0"),
        (["bench", "--out", "/proc/nope/x.jsonl"], "--out: cannot write '/proc/nope/x.jsonl' (No such file"),
        (["bench", "output=/proc/x.jsonl"], "output: cannot write '/proc/x.jsonl' ("),
    ],
)
def test_user_errors_print_one_line_and_exit_2(capsys, argv: list[str], message: str):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("covspec: error: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_debug_reraises_user_errors():
    with pytest.raises(ConfigError):
        main(["--debug", "config", "show", "data.limit=0"])


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["config"]) == 2
    assert main(["nonsense"]) == 2
    assert "usage:" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("covspec.cli._config_show", interrupted)
    assert main(["config", "show"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_split_config_args():
    assert split_config_args([]) == (None, [])
    assert split_config_args(["a.yaml"]) == ("a.yaml", [])
    assert split_config_args(["a.yaml", "x=1", "y=2"]) == ("a.yaml", ["x=1", "y=2"])
    assert split_config_args(["x=1"]) == (None, ["x=1"])
    with pytest.raises(InputError, match=r"'b\.yaml'"):
        split_config_args(["a.yaml", "b.yaml"])


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "covspec.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_module_entry_point_runs_without_traceback():
    ok = _run_module("config", "show", "data.limit=3")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["data"]["limit"] == 3
    bad = _run_module("config", "show", "data.limit=abc")
    assert bad.returncode == 2
    assert bad.stderr == "covspec: error: data.limit must be an integer, got 'abc'\n"


@pytest.mark.parametrize("name", ["prune_eval", "drafting_bench", "edge_batching", "draft_coverage"])
def test_pipelines_report_a_missing_checkpoint_in_one_line(name, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COVSPEC_DEBUG", raising=False)
    main = importlib.import_module(f"pipelines.{name}").main
    assert main(["models.target.path=/nonexistent/target", "tracking.enabled=false", "data.limit=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{name}: error: models.target.path: checkpoint directory '/nonexistent/target' does not exist"]


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """A tiny random-weight Qwen2-VL checkpoint: a real family whose tokenizer is not the toy pair's."""
    from covspec.models.tiny import tiny_qwen2_vl

    path = tmp_path_factory.mktemp("tiny-qwen")
    adapter = tiny_qwen2_vl(seed=1)
    adapter.model.save_pretrained(path)
    adapter.processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", [["run"], ["tune"], ["bench", "--edge", "process", "--no-hf-assisted"]])
def test_a_pair_without_a_shared_tokenizer_fails_before_anything_starts(command, qwen_checkpoint, tmp_path,
                                                                        monkeypatch, capsys):  # fmt: skip
    """Before this check, `covspec run` started Ray, deployed the edge and started the devices, and then every
    device died on the edge's first reply (vocab_mismatch) with a traceback Ray could not even deserialize."""
    monkeypatch.chdir(tmp_path)  # results/, mlruns/ and tune storage would be created here
    argv = [*command, f"models.target.path={qwen_checkpoint}", "data.limit=1",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"tune.storage={tmp_path / 'tune'}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "models.draft.path and models.target.path have different tokenizers" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no results, no MLflow store, no search


def test_the_drafting_bench_checks_the_pair_before_its_edge_process_starts(qwen_checkpoint, tmp_path, monkeypatch,
                                                                           capsys):  # fmt: skip
    from pipelines import drafting_bench

    monkeypatch.chdir(tmp_path)
    assert drafting_bench.main([f"models.target.path={qwen_checkpoint}", "data.limit=1", "--edge", "process"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drafting_bench: error: models.draft.path and models.target.path have")


def test_a_missing_checkpoint_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", f"models.draft.path={tmp_path / 'nowhere'}", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models.draft.path: checkpoint directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_protocol_errors_survive_pickling():
    """Ray pickles a device's exception back to the driver: a ProtocolError that could not be rebuilt reached
    `covspec run` as an UnserializableException, past its retry logic, as a traceback."""
    import pickle

    from covspec.protocol import ErrorCode, ProtocolError

    err = pickle.loads(pickle.dumps(ProtocolError(ErrorCode.VOCAB_MISMATCH, "edge vocab_size 53, device 50")))
    assert (type(err), err.code, err.message) == (ProtocolError, "vocab_mismatch", "edge vocab_size 53, device 50")
    assert str(err) == "vocab_mismatch: edge vocab_size 53, device 50"
