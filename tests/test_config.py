from __future__ import annotations

import re
from pathlib import Path

import pytest

from covspec.config import (
    ABLATIONS,
    METHODS,
    Config,
    DraftingConfig,
    config_to_dict,
    config_to_yaml,
    flatten,
    load_config,
)
from covspec.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.rglob("*.yaml"))


def test_defaults_load_and_match_the_schema():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.method == "covspec"
    # covspec run compares the device-edge methods and covspec's ablations; draft_only stays selectable
    assert cfg.methods == ["target_only", "vanilla_sd", "dssd", "covspec", *ABLATIONS]
    assert set(cfg.methods) | {"draft_only"} == set(METHODS)
    assert (cfg.pruning.method, cfg.drafting.policy, cfg.branching.budget) == ("joint", "adaptive", 2)
    assert cfg.cluster.num_devices == 8 and cfg.cluster.http is False and cfg.cluster.http_host == "127.0.0.1"
    assert cfg.models.target.path == "toy-target"
    assert cfg.models.draft.path == "toy-draft"
    assert cfg.pruning.weights.lowrank == 0.5
    assert cfg.data.path is None and cfg.tracking.uri is None and cfg.output is None


def test_shipped_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in CONFIG_FILES}
    assert {"default.yaml", "quick.yaml", "sampling.yaml", "network/lan.yaml", "network/lte.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_default_yaml_mirrors_the_dataclass_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()


def test_partial_files_change_only_their_keys():
    quick = load_config(CONFIGS / "quick.yaml")
    assert quick.data.limit < Config().data.limit
    sampling = load_config(CONFIGS / "sampling.yaml")
    assert (sampling.generation.temperature, sampling.generation.top_p) == (0.8, 0.95)
    lte = load_config(CONFIGS / "network" / "lte.yaml")
    assert lte.link != Config().link
    assert config_to_dict(lte) | {"link": None} == config_to_dict(Config()) | {"link": None}


def test_overrides_apply_in_order_after_the_file(write_yaml):
    path = write_yaml("data:\n  limit: 7\npruning:\n  method: joint\n")
    cfg = load_config(
        path,
        [
            "data.limit=5",
            "methods=[covspec, dssd]",
            "pruning.weights.relevance=2",
            "generation.temperature=1e-3",
            "tracking.uri=sqlite:///tmp/x.db",
            "models.draft.device=cuda:1",
            "data.limit=4",
        ],
    )
    assert cfg.data.limit == 4
    assert cfg.pruning.method == "joint"
    assert cfg.methods == ["covspec", "dssd"]
    assert cfg.pruning.weights.relevance == 2.0 and isinstance(cfg.pruning.weights.relevance, float)
    assert cfg.generation.temperature == pytest.approx(1e-3)
    assert cfg.tracking.uri == "sqlite:///tmp/x.db"
    assert cfg.models.draft.device == "cuda:1"


def test_override_can_set_a_whole_section_and_null():
    cfg = load_config(None, ["link={rtt_ms: 5, loss: 0.1}", "output=null", "data.path=/data/vqa"])
    assert (cfg.link.rtt_ms, cfg.link.loss, cfg.link.up_mbps) == (5.0, 0.1, Config().link.up_mbps)
    assert cfg.output is None and cfg.data.path == "/data/vqa"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.keeep_ratio=0.5", "unknown config key 'pruning.keeep_ratio', did you mean 'pruning.keep_ratio'?"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("pruning.weights.color=1", "unknown config key 'pruning.weights.color'"),
        ("data.limit=abc", "data.limit must be an integer, got 'abc'"),
        ("data.limit=2.5", "data.limit must be an integer, got 2.5"),
        ("link.rtt_ms=fast", "link.rtt_ms must be a number, got 'fast'"),
        ("tracking.enabled=maybe", "tracking.enabled must be true or false, got 'maybe'"),
        ("tracking.enabled=3", "tracking.enabled must be true or false, got 3"),  # OmegaConf alone: true
        ("cluster.http=0", "cluster.http must be true or false, got 0"),  # OmegaConf alone: false
        ("methods=covspec", "methods must be a list of strings, got 'covspec'"),
        ("pruning=0.5", "pruning must be a section (a mapping of keys), got 0.5"),
        ("models.target.path=[a]", "models.target.path must be a string, got ['a']"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message
    assert "full_key" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.keep_ratio=1.5", "pruning.keep_ratio must be in (0, 1], got 1.5"),
        ("pruning.keep_ratio=0", "pruning.keep_ratio must be in (0, 1], got 0.0"),
        ("drafting.gamma_min=25", "drafting.gamma_min must be <= drafting.gamma_max, got 25 > 24"),
        ("drafting.gamma=65", "drafting.gamma must be in [1, 64], got 65"),
        ("drafting.threshold=1.1", "drafting.threshold must be in [0, 1], got 1.1"),
        ("drafting.policy=greedy", "drafting.policy must be one of 'fixed', 'adaptive', got 'greedy'"),
        ("drafting.stop=never", "drafting.stop must be one of 'cost', 'threshold', got 'never'"),
        ("data.multi_image=grid", "data.multi_image must be one of 'first', 'concat', got 'grid'"),
        ("data.multi_image=concat", "data.multi_image applies to data.benchmark=mmmu only, got 'shapes'"),
        ("pruning.method=magic", "pruning.method must be one of"),
        ("method=speculative", "method must be one of 'target_only', 'draft_only'"),
        ("methods=[covspec, nope]", "methods[1] must be one of"),
        ("methods=[covspec, covspec]", "methods lists 'covspec' twice"),
        ("methods=[]", "methods must be a non-empty list, got []"),
        ("data.limit=0", "data.limit must be >= 1, got 0"),
        ("data.offset=-1", "data.offset must be >= 0, got -1"),
        ("data.benchmark=vqav3", "data.benchmark must be one of 'shapes', 'vqav2', 'mmbench', 'mmmu', got 'vqav3'"),
        ("data.split=dev", "data.split must be one of 'train', 'val', 'test', got 'dev'"),
        ("data.path=''", "data.path must be a non-empty string, got ''"),
        ("generation.temperature=-1", "generation.temperature must be >= 0, got -1.0"),
        ("generation.temperature=.nan", "generation.temperature must be a finite number, got nan"),
        ("generation.top_p=0", "generation.top_p must be in (0, 1], got 0.0"),
        ("generation.max_new_tokens=5000", "generation.max_new_tokens must be in [1, 4096], got 5000"),
        ("pruning.weights.activity=-0.1", "pruning.weights.activity must be >= 0, got -0.1"),
        ("pruning.weights={relevance: 0, activity: 0, lowrank: 0}", "pruning.weights must not all be zero"),
        ("models.draft.dtype=int8", "models.draft.dtype must be one of 'float32', 'float16', 'bfloat16'"),
        ("models.target.device=gpu", "models.target.device must be cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("models.target.path=' '", "models.target.path must be a non-empty string, got ' '"),
        ("verification.num_candidates=0", "verification.num_candidates must be in [1, 256], got 0"),
        ("branching.budget=-1", "branching.budget must be >= 0, got -1"),
        ("link.up_mbps=0", "link.up_mbps must be > 0, got 0.0"),
        ("link.loss=1", "link.loss must be in [0, 1), got 1.0"),
        ("link.compute_slowdown=0.5", "link.compute_slowdown must be >= 1, got 0.5"),
        ("tracking.experiment=''", "tracking.experiment must be a non-empty string"),
        ("threads=0", "threads must be >= 1, got 0"),
        ("seed=-1", "seed must be in [0, 4294967295], got -1"),
    ],
)
def test_validation_names_key_and_value(override: str, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_validate_on_a_directly_built_section_uses_the_prefix():
    with pytest.raises(ConfigError, match=r"^drafting\.gamma_min must be <= drafting\.gamma_max, got 3 > 2$"):
        DraftingConfig(gamma_min=3, gamma_max=2).validate("drafting")


def test_file_errors_are_named_in_the_message(write_yaml, tmp_path: Path):
    bad_key = write_yaml("pruning:\n  keeep_ratio: 0.5\n", "typo.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key 'pruning\.keeep_ratio'.*typo\.yaml"):
        load_config(bad_key)
    bad_bool = write_yaml("pruning:\n  merge: 1\n", "bool.yaml")
    with pytest.raises(ConfigError, match=r"^pruning\.merge must be true or false, got 1 \(in .*bool\.yaml\)$"):
        load_config(bad_bool)
    bad_type = write_yaml("data:\n  limit: abc\n", "type.yaml")
    with pytest.raises(ConfigError, match=r"^data\.limit must be an integer, got 'abc' \(in .*type\.yaml\)$"):
        load_config(bad_type)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(missing)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path)  # a directory


def test_yaml_syntax_errors_name_file_and_line(write_yaml):
    path = write_yaml("data:\n  limit: [1, 2\nseed: 3\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*broken\.yaml at line \d+"):
        load_config(path)
    dup = write_yaml("seed: 1\nseed: 2\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*duplicate key 'seed'"):
        load_config(dup)
    listing = write_yaml("- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match=r"list\.yaml must contain a mapping"):
        load_config(listing)
    assert load_config(write_yaml("", "empty.yaml")) == Config()


def test_bad_override_syntax_is_refused():
    for item in ["data.limit", "=5", "data..limit=5"]:
        with pytest.raises(ConfigError, match="key=value"):
            load_config(None, [item])
    with pytest.raises(ConfigError, match=r"cannot parse the value of override 'methods=\[a'"):
        load_config(None, ["methods=[a"])


def test_yaml_round_trip(write_yaml):
    cfg = load_config(None, ["methods=[dssd]", "pruning.method=joint", "output=out.jsonl", "link.loss=0.25"])
    assert load_config(write_yaml(config_to_yaml(cfg))) == cfg


def test_flatten_gives_dotted_keys():
    flat = flatten(Config())
    assert flat["pruning.weights.relevance"] == 1.0
    assert flat["models.target.dtype"] == "float32"
    assert flat["methods"] == Config().methods
    assert flat["cluster.num_devices"] == 8
    assert flat["seed"] == 0 and flat["output"] is None
    assert not any(isinstance(v, dict) for v in flat.values())
    assert len(flat) == len(set(flat))
    assert flatten({"a": {"b": 1}}) == {"a.b": 1}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.num_devices=0", "cluster.num_devices must be in [1, 256], got 0"),
        ("cluster.repeats=0", "cluster.repeats must be in [1, 100], got 0"),
        ("cluster.device_cpus=0", "cluster.device_cpus must be in (0, 64], got 0"),
        ("cluster.batch_wait_ms=-1", "cluster.batch_wait_ms must be in [0, 1000], got -1"),
        ("cluster.device_nice=20", "cluster.device_nice must be in [0, 19], got 20"),
        ("cluster.device_links=[{rtt_ms: -5}]", "cluster.device_links[0].rtt_ms must be >= 0, got -5"),
        ("cluster.http_port=70000", "cluster.http_port must be in [1, 65535], got 70000"),
        ("methods=[covspec_no_everything]", "methods[0] must be one of"),
    ],
)
def test_cluster_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_config_text_round_trip_keeps_device_links():
    from covspec.config import load_config_text

    cfg = load_config(None, ["cluster.device_links=[{rtt_ms: 5}, {rtt_ms: 50, compute_slowdown: 3}]"])
    back = load_config_text(config_to_yaml(cfg))
    assert back == cfg and back.cluster.device_links[1].compute_slowdown == 3
