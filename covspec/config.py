"""Typed configuration: nested dataclasses used as OmegaConf structured configs.

The dataclasses below are the schema; YAML files nest exactly like them. ``load_config`` is the one way in:
dataclass defaults, then a YAML file, then ``key=value`` overrides, then validation. Only the typed ``Config``
object travels past the CLI; nothing else in the library sees a raw ``DictConfig``.

Every user mistake becomes a :class:`~covspec.errors.ConfigError` whose message names the dotted key, e.g.
``pruning.keep_ratio must be in (0, 1], got 1.5``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from covspec.errors import ConfigError

__all__ = [
    "ABLATIONS",
    "BASE_METHODS",
    "BENCHMARKS",
    "DRAFT_POLICIES",
    "DRAFT_STOPS",
    "DTYPES",
    "METHODS",
    "PRUNING_METHODS",
    "SPLITS",
    "BranchingConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "DraftingConfig",
    "GenerationConfig",
    "LinkConfig",
    "ModelConfig",
    "ModelsConfig",
    "PruningConfig",
    "ScoreWeights",
    "TrackingConfig",
    "TuneConfig",
    "VerificationConfig",
    "config_to_dict",
    "config_to_yaml",
    "flatten",
    "load_config",
    "load_config_text",
]

# Allowed values of the enum-like string fields. Other modules may import these (e.g. to build registries).
ABLATIONS: dict[str, tuple[str, ...]] = {
    "covspec_no_pruning": ("pruning.method=none",),
    "covspec_no_adaptive": ("drafting.policy=fixed",),
    "covspec_no_tree": ("branching.tree=0",),
    "covspec_no_branching": ("branching.budget=0", "branching.tree=0"),
}
"""covspec with one of its three ideas switched off: the overrides applied to the config for that method."""
BASE_METHODS = ("target_only", "draft_only", "vanilla_sd", "dssd", "covspec")
METHODS = (*BASE_METHODS, *ABLATIONS)
DTYPES = ("float32", "float16", "bfloat16")
BENCHMARKS = ("shapes", "vqav2", "mmbench", "mmmu")  # loaders: covspec.data.load_benchmark
SPLITS = ("train", "val", "test")
SHAPES_KINDS = ("color", "shape", "count", "position", "describe")  # covspec.data.shapes.KINDS (a test checks)
PRUNING_METHODS = ("none", "joint", "random", "uniform", "attention", "diversity")
DRAFT_POLICIES = ("fixed", "adaptive")
DRAFT_STOPS = ("cost", "threshold")
PREFILL_POLICIES = ("auto", "idle", "fused", "separate")  # verification.prefill: covspec.runtime.edge.Edge
MULTI_IMAGE = ("first", "concat")  # covspec.data.mmmu
TUNE_METRICS = ("speedup", "tokens_per_s")  # what `covspec tune` maximizes (docs/tune.md)
_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")
_MAX_SEED = 2**32 - 1  # the range every RNG we seed (random, numpy, torch) accepts


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers: each raises ConfigError("<dotted key> must be ..., got <value>").


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"{'<' if high_open else '<='} {high}"


def _check_number(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Checks that ``value`` is a finite number (an int if ``integer``) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ConfigError(f"{key} must be {_interval(low, high, low_open, high_open)}, got {value!r}")


def _check_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    _check_number(key, value, low, high, integer=True)


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def ray_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address ``host:port`` (or Ray Client's ``ray://host:port``); None for anything else."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal: [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _check_text(key: str, value: Any, *, optional: bool = False) -> None:
    """Checks for a non-empty string (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")


def _check_list(key: str, value: Any, item: typing.Callable[[str, Any], None], *, what: str,
                empty: bool = True) -> None:  # fmt: skip
    """Checks a list (non-empty unless ``empty``) whose items pass ``item(key[i], value)``, none listed twice."""
    if not isinstance(value, list) or not (empty or value):
        raise ConfigError(f"{key} must be a {'' if empty else 'non-empty '}list{what}, got {value!r}")
    for i, x in enumerate(value):
        item(f"{key}[{i}]", x)
        if x in value[:i]:
            raise ConfigError(f"{key} lists {x!r} twice")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


class _Section:
    """Mixin: ``validate`` checks this section's own fields, then recurses into nested sections."""

    def validate(self, prefix: str = "") -> None:
        """Raises ConfigError naming the first invalid key; ``prefix`` is this section's dotted path."""
        self._check(prefix)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value.validate(_join(prefix, f.name))

    def _check(self, prefix: str) -> None:
        """Checks this section's own fields (not nested sections); sections without rules keep this no-op."""


# ---------------------------------------------------------------------------------------------------------------
# Schema. The keys are public: other modules, YAML files and Tune search spaces rely on them exactly.


@dataclass
class ModelConfig(_Section):
    """One VLM of the pair."""

    path: str = "toy-target"
    """Checkpoint directory, builtin name (``toy-target``/``toy-draft``) or Hugging Face hub id."""
    dtype: str = "float32"
    """Weight and activation dtype: one of ``DTYPES``."""
    device: str = "cpu"
    """Torch device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

    def _check(self, prefix: str) -> None:
        _check_text(_join(prefix, "path"), self.path)
        _check_choice(_join(prefix, "dtype"), self.dtype, DTYPES)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"{_join(prefix, 'device')} must be cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class ModelsConfig(_Section):
    """The draft (device) and target (edge) VLMs."""

    target: ModelConfig = field(default_factory=lambda: ModelConfig(path="toy-target"))
    """The large VLM on the edge server; it verifies."""
    draft: ModelConfig = field(default_factory=lambda: ModelConfig(path="toy-draft"))
    """The small VLM on each device; it drafts."""


@dataclass
class DataConfig(_Section):
    """Which benchmark samples to run."""

    benchmark: str = "shapes"
    """Benchmark name: one of ``BENCHMARKS``."""
    split: str = "test"
    """Benchmark split: ``train``, ``val`` or ``test``."""
    limit: int = 20
    """Number of samples to run (>= 1)."""
    offset: int = 0
    """Index of the first sample (>= 0)."""
    kinds: list[str] = field(default_factory=list)
    """Shapes only: the question kinds to run (``color``, ``shape``, ``count``, ``position``, ``describe``); the split's
    samples of those kinds in index order, with the ids they have unfiltered. Empty: every kind (they alternate)."""
    path: str | None = None
    """Local data directory or file for real benchmarks (required for them); None for the synthetic one. Layouts:
    docs/benchmarks.md."""
    subjects: list[str] = field(default_factory=list)
    """MMMU subjects to load (folder names, e.g. ``[Accounting, Art]``); empty: every subject. MMMU only."""
    circular: bool = False
    """MMBench CircularEval: ask each question once per rotation of its options; it counts only if all are right."""
    multi_image: str = "first"
    """MMMU questions with several images: ``first`` (the row's first image, as MMMU's reference evaluation of
    single-image models) or ``concat`` (all of them side by side, left to right). MMMU only."""

    def label(self) -> str:
        """``benchmark/split``, with the kinds or subjects chosen: how tables name the samples."""
        chosen = self.kinds or self.subjects
        return f"{self.benchmark}/{self.split}" + (f" [{', '.join(chosen)}]" if chosen else "")

    def _check(self, prefix: str) -> None:
        _check_choice(_join(prefix, "benchmark"), self.benchmark, BENCHMARKS)
        _check_choice(_join(prefix, "split"), self.split, SPLITS)
        _check_int(_join(prefix, "limit"), self.limit, 1)
        _check_int(_join(prefix, "offset"), self.offset, 0)
        _check_text(_join(prefix, "path"), self.path, optional=True)
        if self.benchmark != "shapes" and self.path is None:
            raise ConfigError(f"{_join(prefix, 'path')} must be set for {_join(prefix, 'benchmark')}={self.benchmark}")
        _check_list(_join(prefix, "kinds"), self.kinds, lambda k, v: _check_choice(k, v, SHAPES_KINDS), what="")
        if self.kinds and self.benchmark != "shapes":
            raise ConfigError(f"{_join(prefix, 'kinds')} applies to {_join(prefix, 'benchmark')}=shapes only, "
                              f"got {self.benchmark!r}")  # fmt: skip
        key = _join(prefix, "subjects")
        _check_list(key, self.subjects, _check_text, what=" of strings")
        if self.subjects and self.benchmark != "mmmu":
            raise ConfigError(f"{key} applies to {_join(prefix, 'benchmark')}=mmmu only, got {self.benchmark!r}")
        _check_choice(_join(prefix, "multi_image"), self.multi_image, MULTI_IMAGE)
        if self.multi_image != "first" and self.benchmark != "mmmu":
            raise ConfigError(f"{_join(prefix, 'multi_image')} applies to {_join(prefix, 'benchmark')}=mmmu only, "
                              f"got {self.benchmark!r}")  # fmt: skip
        if not isinstance(self.circular, bool):
            raise ConfigError(f"{_join(prefix, 'circular')} must be true or false, got {self.circular!r}")
        if self.circular and self.benchmark != "mmbench":
            raise ConfigError(f"{_join(prefix, 'circular')} applies to {_join(prefix, 'benchmark')}=mmbench only, "
                              f"got {self.benchmark!r}")  # fmt: skip


@dataclass
class GenerationConfig(_Section):
    """Sampling parameters shared by every method (the target's distribution p is defined by them)."""

    max_new_tokens: int = 48
    """Generation stops after this many tokens (1..4096) or at EOS."""
    temperature: float = 0.0
    """0 means greedy decoding; > 0 means sampling, verified by speculative sampling."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1.0 disables it."""

    def _check(self, prefix: str) -> None:
        _check_int(_join(prefix, "max_new_tokens"), self.max_new_tokens, 1, 4096)
        _check_number(_join(prefix, "temperature"), self.temperature, 0)
        _check_number(_join(prefix, "top_p"), self.top_p, 0, 1, low_open=True)


@dataclass
class ScoreWeights(_Section):
    """Weights of the three visual-token scores in the joint pruning score."""

    relevance: float = 1.0
    """Query relevance: how much the question attends to / resembles the token."""
    activity: float = 0.5
    """Token activity: how strongly the token is activated or attended overall."""
    lowrank: float = 0.5
    """Low-rank dependency: how much of the token the other tokens do not explain."""

    def _check(self, prefix: str) -> None:
        for name in ("relevance", "activity", "lowrank"):
            _check_number(_join(prefix, name), getattr(self, name), 0)
        if self.relevance == self.activity == self.lowrank == 0:
            raise ConfigError(f"{prefix or 'weights'} must not all be zero")


@dataclass
class PruningConfig(_Section):
    """Training-free visual token pruning before the draft's prefill."""

    method: str = "joint"
    """Pruner: one of ``PRUNING_METHODS`` (``joint`` is CoVSpec's; the others are baselines)."""
    keep_ratio: float = 0.25
    """Fraction of visual tokens kept, in (0, 1]."""
    weights: ScoreWeights = field(default_factory=ScoreWeights)
    """Score weights for the ``joint`` pruner."""
    merge: bool = True
    """Merge instead of dropping: each dropped visual token is assigned to its most similar kept one, and the draft
    attends to a kept token as to that many copies (proportional attention). Training-free; the draft only: with
    ``prune_target`` neither model merges, so that both see the same tokens. With ``joint`` it also switches the
    selection from stratified to greedy (docs/pruning.md)."""
    prune_target: bool = False
    """Also prune the target's visual tokens (an ablation; output is then no longer target-exact)."""

    def _check(self, prefix: str) -> None:
        _check_choice(_join(prefix, "method"), self.method, PRUNING_METHODS)
        _check_number(_join(prefix, "keep_ratio"), self.keep_ratio, 0, 1, low_open=True)
        _check_bool(_join(prefix, "merge"), self.merge)
        _check_bool(_join(prefix, "prune_target"), self.prune_target)


@dataclass
class DraftingConfig(_Section):
    """How many tokens the device drafts per verification round."""

    policy: str = "adaptive"
    """``fixed``: always ``gamma`` tokens; ``adaptive``: confidence stop + cost-model controller (covspec only; the
    baselines draft fixed blocks). See docs/drafting.md."""
    gamma: int = 5
    """Draft length of the fixed policy, and the adaptive policy's starting length (1..64)."""
    gamma_min: int = 1
    """Shortest block the adaptive policy drafts (1..64, <= gamma_max)."""
    gamma_max: int = 24
    """Longest block the adaptive policy drafts (1..64)."""
    threshold: float = 0.4
    """Adaptive policy: τ, in [0, 1]. Drafting stops after a token whose top probability is below the stop's
    threshold: τ itself (``stop: threshold``), or the cost model's threshold capped at τ (``stop: cost``)."""
    stop: str = "threshold"
    """Adaptive policy's confidence stop: ``threshold`` (always τ) or ``cost`` (threshold min(τ, R·c/α): an unsure
    token ends the block only when one more draft step would add fewer expected tokens than the round's rate R pays
    for it; τ until R, c and α are measured). See docs/drafting.md."""

    def _check(self, prefix: str) -> None:
        _check_choice(_join(prefix, "policy"), self.policy, DRAFT_POLICIES)
        _check_choice(_join(prefix, "stop"), self.stop, DRAFT_STOPS)
        for name in ("gamma", "gamma_min", "gamma_max"):
            _check_int(_join(prefix, name), getattr(self, name), 1, 64)
        if self.gamma_min > self.gamma_max:
            raise ConfigError(
                f"{_join(prefix, 'gamma_min')} must be <= {_join(prefix, 'gamma_max')}, "
                f"got {self.gamma_min} > {self.gamma_max}"
            )
        _check_number(_join(prefix, "threshold"), self.threshold, 0, 1)


@dataclass
class BranchingConfig(_Section):
    """Parallel branching: drafting continues while a block is being verified."""

    budget: int = 2
    """Branches drafted while a block is verified: the main one plus budget - 1 alternatives (the draft's second or
    third choice at its least confident positions; 0: branching off, >= 0). 2 suits devices that share cores with
    the edge (covspec run); a device with its own core can spend the whole wait (16). covspec only; see
    docs/drafting.md."""

    tree: int = 2
    """Alternative branches sent with each block and verified in the same round (token-tree verification): at the
    block's least confident positions, the draft's second (or third) choice and a continuation after it. 0: the
    block is a chain. Greedy decoding; under sampling with ``sampling_trees``. covspec only; see
    docs/drafting.md."""

    sampling_trees: bool = True
    """Send token trees under sampling too: the alternatives are then guesses of the correction, verified ahead
    (exact); docs/drafting.md, "Token trees under sampling"."""

    sampling_continuation: int = 4
    """Under sampling, the most tokens drafted after a tree alternative's root (>= 0; 0: as deep as the block, as
    under greedy decoding). Sampled continuations are rarely accepted far: on the toy pair full-depth ones cost more
    drafting than they saved, 4 paid at every RTT measured (docs/drafting.md)."""

    def _check(self, prefix: str) -> None:
        _check_int(_join(prefix, "budget"), self.budget, 0)
        _check_int(_join(prefix, "tree"), self.tree, 0)
        _check_bool(_join(prefix, "sampling_trees"), self.sampling_trees)
        _check_int(_join(prefix, "sampling_continuation"), self.sampling_continuation, 0)


@dataclass
class VerificationConfig(_Section):
    """Edge-side verification and candidate-based correction."""

    num_candidates: int = 4
    """m: candidates drawn from p sent back at a rejected position (1..256)."""
    prefill: str = "auto"
    """When the edge prefills a speculative session (docs/engine.md): ``fused`` with its first block in one target
    forward; ``idle`` the same, except that an edge with nothing queued and no other request in flight prefills at
    once; ``separate`` when the session opens; ``auto``: ``fused`` on the Ray Serve edge (``covspec run``: many devices
    share it), ``idle`` in one process (``covspec bench``, ``generate``: one request at a time)."""

    def _check(self, prefix: str) -> None:
        _check_int(_join(prefix, "num_candidates"), self.num_candidates, 1, 256)
        _check_choice(_join(prefix, "prefill"), self.prefill, PREFILL_POLICIES)


@dataclass
class LinkConfig(_Section):
    """Emulated device-edge network link (per device) and device compute speed."""

    rtt_ms: float = 20.0
    """Round-trip time in milliseconds (>= 0)."""
    jitter_ms: float = 0.0
    """Standard deviation of the one-way delay in milliseconds (>= 0)."""
    up_mbps: float = 20.0
    """Device-to-edge bandwidth in Mbit/s (> 0)."""
    down_mbps: float = 50.0
    """Edge-to-device bandwidth in Mbit/s (> 0)."""
    loss: float = 0.0
    """Probability that a message is lost and must be resent, in [0, 1)."""
    compute_slowdown: float = 1.0
    """Factor by which the device's compute is slowed to emulate a phone (>= 1)."""

    def _check(self, prefix: str) -> None:
        _check_number(_join(prefix, "rtt_ms"), self.rtt_ms, 0)
        _check_number(_join(prefix, "jitter_ms"), self.jitter_ms, 0)
        _check_number(_join(prefix, "up_mbps"), self.up_mbps, 0, low_open=True)
        _check_number(_join(prefix, "down_mbps"), self.down_mbps, 0, low_open=True)
        _check_number(_join(prefix, "loss"), self.loss, 0, 1, high_open=True)
        _check_number(_join(prefix, "compute_slowdown"), self.compute_slowdown, 1)


@dataclass
class TrackingConfig(_Section):
    """MLflow tracking."""

    enabled: bool = True
    """Log runs to MLflow (``covspec run``, ``covspec tune`` and the pipelines; ``covspec bench`` only prints)."""
    uri: str | None = None
    """MLflow tracking URI; None means ``sqlite:///<repo-or-cwd>/mlruns/mlflow.db`` (decided by tracking)."""
    experiment: str = "covspec"
    """MLflow experiment name."""

    def _check(self, prefix: str) -> None:
        _check_bool(_join(prefix, "enabled"), self.enabled)
        _check_text(_join(prefix, "uri"), self.uri, optional=True)
        _check_text(_join(prefix, "experiment"), self.experiment)


@dataclass
class ClusterConfig(_Section):
    """The distributed runtime of ``covspec run``: Ray device actors and the Ray Serve edge (docs/cluster.md)."""

    address: str | None = None
    """Ray cluster to join (``auto``: the one ``ray start`` started on this machine, or ``host:port`` of its head);
    None starts a local Ray in this process."""
    num_devices: int = 8
    """Device drafter actors (1..256)."""
    device_cpus: float = 0.1
    """CPUs Ray reserves per device actor (fractional, in (0, 64]); 8 x 0.1 leaves room on a 2-core machine."""
    device_threads: int = 1
    """Torch threads per device actor (>= 1)."""
    device_nice: int = 19
    """Scheduling niceness of device actors (0..19): when devices and edge share cores, the edge gets them first, as
    it would on a real deployment where every device brings its own compute. 0 disables it."""
    edge_replicas: int = 1
    """Ray Serve replicas of the edge verifier (1..64); a session stays on the replica holding its cache."""
    edge_cpus: float = 0.5
    """CPUs Ray reserves per edge replica (fractional, in (0, 64])."""
    edge_gpus: float = 0.0
    """GPUs Ray reserves per edge replica (>= 0; Ray hides GPUs from actors that reserve none)."""
    device_gpus: float = 0.0
    """GPUs Ray reserves per device actor (>= 0, fractional allowed)."""
    edge_threads: int = 1
    """Torch threads of each edge replica (>= 1); with 1, the edge's CPU time is its compute time."""
    edge_cores: list[int] = field(default_factory=list)
    """CPU cores the edge replicas' processes are pinned to (Linux); empty: not pinned. With ``device_cores`` on
    other cores, devices emulate their own compute (docs/cluster.md)."""
    device_cores: list[int] = field(default_factory=list)
    """CPU cores the device actors' processes are pinned to (Linux); empty: not pinned."""
    max_batch_size: int = 16
    """Most requests one batched target forward takes (1..1024)."""
    batch_wait_ms: float = 2.0
    """How long a batch waits for more requests after its first, in ms (0..1000)."""
    session_ttl_s: float = 600.0
    """Edge sessions idle for longer are dropped (> 0); a device reopens a lost session from its committed tokens."""
    http: bool = False
    """Start Ray Serve's HTTP proxy (a read-only stats endpoint); off by default: devices use deployment handles."""
    http_host: str = "127.0.0.1"
    """Address the HTTP proxy binds when ``http`` is on (loopback by default)."""
    http_port: int = 8000
    """Port of the HTTP proxy (1..65535)."""
    device_links: list[LinkConfig] = field(default_factory=list)
    """Per-device links and slow-down factors, assigned round robin; empty: every device uses ``link``."""
    sample_timeout_s: float = 600.0
    """A sample that takes longer on a device is retried on another (> 0)."""
    max_attempts: int = 3
    """Attempts per sample before the run gives up on it (1..100)."""
    warmup: bool = True
    """Before measuring, every device answers one sample with target_only and with covspec (results discarded):
    first calls pay for lazy initialization (Serve handles, torch kernels for new shapes)."""
    repeats: int = 3
    """Passes over the samples (1..100), the methods in alternating order (forward, then reversed, ...) so that the
    machine's drift hits them alike; the table pools every pass and gives each method's ratios per pass and their
    median."""

    def _check(self, prefix: str) -> None:
        _check_text(_join(prefix, "address"), self.address, optional=True)
        if self.address is not None and ray_host_port(self.address) is None and self.address != "auto":
            raise ConfigError(f"{_join(prefix, 'address')} must be auto or host:port, got {self.address!r}")
        _check_int(_join(prefix, "num_devices"), self.num_devices, 1, 256)
        _check_number(_join(prefix, "device_cpus"), self.device_cpus, 0, 64, low_open=True)
        _check_int(_join(prefix, "device_threads"), self.device_threads, 1)
        _check_int(_join(prefix, "device_nice"), self.device_nice, 0, 19)
        _check_int(_join(prefix, "edge_replicas"), self.edge_replicas, 1, 64)
        _check_number(_join(prefix, "edge_cpus"), self.edge_cpus, 0, 64, low_open=True)
        _check_int(_join(prefix, "edge_threads"), self.edge_threads, 1)
        for name in ("edge_cores", "device_cores"):
            _check_list(_join(prefix, name), getattr(self, name), lambda k, v: _check_int(k, v, 0, 65535),
                        what=" of core numbers")  # fmt: skip
        _check_number(_join(prefix, "edge_gpus"), self.edge_gpus, 0)
        _check_number(_join(prefix, "device_gpus"), self.device_gpus, 0)
        _check_int(_join(prefix, "max_batch_size"), self.max_batch_size, 1, 1024)
        _check_number(_join(prefix, "batch_wait_ms"), self.batch_wait_ms, 0, 1000)
        _check_number(_join(prefix, "session_ttl_s"), self.session_ttl_s, 0, low_open=True)
        _check_bool(_join(prefix, "http"), self.http)
        _check_text(_join(prefix, "http_host"), self.http_host)
        _check_int(_join(prefix, "http_port"), self.http_port, 1, 65535)
        for i, link in enumerate(self.device_links):
            link.validate(f"{_join(prefix, 'device_links')}[{i}]")
        _check_number(_join(prefix, "sample_timeout_s"), self.sample_timeout_s, 0, low_open=True)
        _check_int(_join(prefix, "max_attempts"), self.max_attempts, 1, 100)
        _check_bool(_join(prefix, "warmup"), self.warmup)
        _check_int(_join(prefix, "repeats"), self.repeats, 1, 100)


@dataclass
class TuneConfig(_Section):
    """``covspec tune``: a Ray Tune + Optuna search over this config's keys, tracked in MLflow (docs/tune.md).

    Each trial runs target_only and covspec on ``val_limit`` samples of the val split with the trial's config; its
    objectives are ``metric`` (up) and decoding bytes per token (down). Greedy trials whose output differs from
    target_only are infeasible. These keys only steer the search: ``best.yaml`` carries their defaults.
    """

    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted config key -> ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{int: [lo, hi]}``
    or ``{choice: [v, ...]}``; a section key may choose among named mappings (``link: {choice: {lan: {...}}}``).
    Empty: the built-in default space (``configs/tune/default.yaml`` spells it out)."""
    num_samples: int = 16
    """Trials to run (1..10000)."""
    max_concurrent: int = 2
    """Trials running at once (1..256)."""
    time_budget_s: float = 1200.0
    """Wall-clock budget of the whole search in seconds (> 0); running trials are stopped when it is spent."""
    metric: str = "speedup"
    """Speed objective, maximized: ``speedup`` (covspec tokens/s over target_only's, measured on the same samples
    in the same trial: robust to machine load) or ``tokens_per_s``."""
    trial_cpus: float = 1.0
    """CPUs Ray reserves per trial (fractional, in (0, 64]); a trial runs floor(trial_cpus) torch threads (>= 1)."""
    trial_gpus: float = 0.0
    """GPUs Ray reserves per trial (fractional allowed, >= 0): required when a model is on ``cuda``, since Ray hides
    the GPUs from a trial that reserves none."""
    val_limit: int = 20
    """Validation samples per trial (1..100000), taken from the val split from ``data.offset``."""
    report_every: int = 5
    """Samples per intermediate report (>= 1): ASHA compares trials at these points."""
    grace_period: int = 1
    """Reports a trial makes before ASHA may stop it early (>= 1)."""
    include_base: bool = True
    """Evaluate this config's own values of the searched keys as the first trial (the baseline)."""
    max_accuracy_drop: float = 0.0
    """Sampling only (greedy output must match target_only exactly): the largest drop of exact match below
    target_only's that a feasible trial may show, in [0, 1]."""
    name: str | None = None
    """Search name: results under ``<storage>/<name>``; None: a new ``search-<time>`` (with --resume: the latest)."""
    storage: str = "results/tune"
    """Directory of the searches' Ray Tune state and outputs."""

    def _check(self, prefix: str) -> None:
        if not isinstance(self.space, dict):
            raise ConfigError(f"{_join(prefix, 'space')} must be a mapping of dotted keys, got {self.space!r}")
        _check_int(_join(prefix, "num_samples"), self.num_samples, 1, 10000)
        _check_int(_join(prefix, "max_concurrent"), self.max_concurrent, 1, 256)
        _check_number(_join(prefix, "time_budget_s"), self.time_budget_s, 0, low_open=True)
        _check_choice(_join(prefix, "metric"), self.metric, TUNE_METRICS)
        _check_number(_join(prefix, "trial_cpus"), self.trial_cpus, 0, 64, low_open=True)
        _check_number(_join(prefix, "trial_gpus"), self.trial_gpus, 0)
        _check_int(_join(prefix, "val_limit"), self.val_limit, 1, 100000)
        _check_int(_join(prefix, "report_every"), self.report_every, 1)
        _check_int(_join(prefix, "grace_period"), self.grace_period, 1)
        _check_bool(_join(prefix, "include_base"), self.include_base)
        _check_number(_join(prefix, "max_accuracy_drop"), self.max_accuracy_drop, 0, 1)
        _check_text(_join(prefix, "name"), self.name, optional=True)
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"{_join(prefix, 'name')} must be letters, digits, '_', '.' or '-', got {self.name!r}")
        _check_text(_join(prefix, "storage"), self.storage)


@dataclass
class Config(_Section):
    """A whole experiment. YAML files nest exactly like this class."""

    seed: int = 0
    """Seed for every random number generator (0..2**32-1)."""
    method: str = "covspec"
    """Decoding method of single-method commands (e.g. ``covspec generate``): one of ``METHODS``."""
    methods: list[str] = field(default_factory=lambda: ["target_only", "vanilla_sd", "dssd", "covspec", *ABLATIONS])
    """Methods that ``covspec bench`` / ``covspec run`` compare, in order; each one of ``METHODS`` (the ablations
    ``covspec_no_pruning`` / ``_no_adaptive`` / ``_no_branching`` are covspec with one idea switched off)."""
    models: ModelsConfig = field(default_factory=ModelsConfig)
    """The draft and target VLMs."""
    data: DataConfig = field(default_factory=DataConfig)
    """Benchmark samples."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling parameters."""
    pruning: PruningConfig = field(default_factory=PruningConfig)
    """Visual token pruning on the device."""
    drafting: DraftingConfig = field(default_factory=DraftingConfig)
    """Draft length policy."""
    branching: BranchingConfig = field(default_factory=BranchingConfig)
    """Parallel branching."""
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    """Verification and correction."""
    link: LinkConfig = field(default_factory=LinkConfig)
    """Emulated device-edge link."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray device actors and the Ray Serve edge (``covspec run``)."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter search (``covspec tune``)."""
    threads: int = 2
    """Torch intra-op threads per process (>= 1)."""
    output: str | None = None
    """Path of the per-sample results JSONL; None: do not write one."""

    def _check(self, prefix: str) -> None:
        _check_int(_join(prefix, "seed"), self.seed, 0, _MAX_SEED)
        _check_choice(_join(prefix, "method"), self.method, METHODS)
        _check_list(_join(prefix, "methods"), self.methods, lambda k, v: _check_choice(k, v, METHODS), what="",
                    empty=False)  # fmt: skip
        _check_int(_join(prefix, "threads"), self.threads, 1)
        _check_text(_join(prefix, "output"), self.output, optional=True)


# ---------------------------------------------------------------------------------------------------------------
# Loading.


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _YamlLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" keys may be overridden, by design
            continue
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node)


_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def _read_yaml(path: Path) -> dict:
    """Reads a config file into a plain dict; an empty file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of config keys, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> dict:
    """``"a.b=[1, 2]"`` -> ``{"a": {"b": [1, 2]}}``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override must look like key=value (e.g. data.limit=5), got {item!r}")
    try:
        value = _parse_yaml(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"cannot parse the value of override {item!r}: {problem}") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def _field_type(dotted: str) -> Any:
    """The annotated type of a dotted key in the schema, or None if it is not a plain field path."""
    tp: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if tp == str | None:
        return "a string or null"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list of strings" if typing.get_args(tp) == (str,) else "a list"
    if dataclasses.is_dataclass(tp):
        return "a section (a mapping of keys)"
    return f"of type {tp}"


def _lookup(data: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return False, None
        data = data[part]
    return True, data


def _check_keys(data: Mapping, schema: type, prefix: str, where: str) -> None:
    """Refuses unknown keys and scalars given for sections (OmegaConf's own messages for these are noisy)."""
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        dotted = _join(prefix, str(key))
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f", did you mean {_join(prefix, close[0])!r}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}{where}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be {_describe(hints[key])}, got {value!r}{where}")
            _check_keys(value, hints[key], dotted, where)
        elif typing.get_origin(hints[key]) is dict and not isinstance(value, Mapping):  # OmegaConf: a TypeError
            raise ConfigError(f"{dotted} must be {_describe(hints[key])}, got {value!r}{where}")
        elif hints[key] is bool and not isinstance(value, bool):  # OmegaConf would turn 3 into true and 0 into false
            raise ConfigError(f"{dotted} must be {_describe(bool)}, got {value!r}{where}")


def _first_line(err: OmegaConfBaseException) -> str:
    return (getattr(err, "msg", None) or str(err)).splitlines()[0]


def _merge(base: Any, data: dict, where: str) -> Any:
    """Merges a plain dict into the structured config, turning OmegaConf errors into one-line ConfigErrors."""
    _check_keys(data, Config, "", where)
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as err:
        key = err.full_key or ""
        found, value = _lookup(data, key)
        tp = _field_type(key) if key else None
        if found and tp is not None:
            raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}{where}") from None
        raise ConfigError(f"{key + ': ' if key else ''}{_first_line(err)}{where}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Builds the validated config: dataclass defaults, then the YAML file, then the overrides.

    Args:
        path: YAML file nested like :class:`Config`; it may set any subset of keys. None: defaults only.
        overrides: ``key=value`` items with dotted keys, applied in order; values are parsed as YAML
            (``data.limit=5``, ``methods=[covspec,dssd]``, ``output=null``).

    Returns:
        The typed, validated config.

    Raises:
        ConfigError: unreadable file, YAML syntax error, unknown key, wrong type or invalid value; the message
            names the file or the dotted key.
    """
    if isinstance(overrides, str):  # a lone "k=v" would otherwise be iterated character by character
        overrides = [overrides]
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), f" (in {path})")
    for item in overrides:
        merged = _merge(merged, _parse_override(item), "")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # e.g. an unresolvable ${interpolation}
        raise ConfigError(f"{err.full_key + ': ' if err.full_key else ''}{_first_line(err)}") from None
    assert isinstance(cfg, Config)
    cfg.validate()
    return cfg


def load_config_text(text: str, where: str = "config text") -> Config:
    """The validated config of a YAML document (e.g. ``config_to_yaml`` output shipped to a Ray actor)."""
    data = _parse_yaml(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    merged = _merge(OmegaConf.structured(Config), data, f" (in {where})")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts and lists (any dataclass works)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    """The config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def flatten(cfg: Any) -> dict[str, Any]:
    """The config as one flat dict with dotted keys (``{"pruning.weights.relevance": 1.0, ...}``).

    Lists are kept as values, not expanded. Accepts a config dataclass or a nested dict.
    """
    data = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    flat: dict[str, Any] = {}

    def visit(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                visit(value, _join(prefix, str(key)))
            else:
                flat[_join(prefix, str(key))] = value

    visit(data, "")
    return flat
