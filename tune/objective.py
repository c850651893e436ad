"""One trial: covspec with the trial's config against target_only, on the same val samples, in one process.

Why the in-process engine (``LocalEngine``) and not ``covspec run``'s Ray actors: a trial answers a few dozen short
questions, and the distributed runtime would pay its start-up (Serve app, device actors, warm-up) per trial, more
than the trial's own work; the device, edge, wire protocol and emulated link are the same code in both. Each sample
runs target_only then covspec back to back, so machine load hits both alike and ``speedup`` (their tokens/s ratio)
stays comparable across trials running at different times or side by side.

After every ``tune.report_every`` samples the trial reports cumulative metrics (ASHA compares trials there). A
greedy trial whose output differs from target_only on any sample is infeasible: it reports at once and stops.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from covspec.config import Config, load_config_text

__all__ = ["INFEASIBLE_BYTES", "Totals", "objective_config", "run_trial", "trial_metrics"]

INFEASIBLE_BYTES = 1e9
"""Bytes-per-token objective reported by infeasible trials (any feasible trial dominates them)."""

_MODELS: dict[tuple, Any] = {}  # per worker process: trials on a reused actor share the loaded pair


def objective_config(candidate: Config) -> Config:
    """The config a trial runs: the candidate on ``tune.val_limit`` val samples, target_only and covspec."""
    cfg = copy.deepcopy(candidate)
    cfg.data.split = "val"
    cfg.data.limit = cfg.tune.val_limit
    cfg.methods = ["target_only", "covspec"]
    cfg.threads = max(1, int(cfg.tune.trial_cpus))  # a fractional trial gets one thread, not the config's
    cfg.tracking.enabled = False
    cfg.output = None
    return cfg


@dataclass
class Totals:
    """Sums over the samples a trial has run so far."""

    samples: int = 0
    tokens: int = 0
    latency_s: float = 0.0
    target_tokens: int = 0
    target_latency_s: float = 0.0
    bytes: int = 0
    rounds: int = 0
    accepted: int = 0
    identical: int = 0
    exact: float = 0.0
    target_exact: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    def add(self, sample_id: str, target: dict[str, Any], ours: dict[str, Any], same: bool, em: tuple) -> None:
        self.samples += 1
        self.tokens += ours["num_tokens"]
        self.latency_s += ours["latency_s"]
        self.target_tokens += target["num_tokens"]
        self.target_latency_s += target["latency_s"]
        self.bytes += ours["bytes_up"] + ours["bytes_down"]
        self.rounds += ours["rounds"]
        self.accepted += ours["num_accepted"]
        self.identical += same
        self.exact += em[1]
        self.target_exact += em[0]
        if not same:
            self.mismatches.append(sample_id)


def trial_metrics(t: Totals, cfg: Config) -> dict[str, Any]:
    """The metrics a trial reports: measurements, feasibility, and the two (penalized) objectives."""
    tokens_per_s = t.tokens / max(t.latency_s, 1e-9)
    target_tokens_per_s = t.target_tokens / max(t.target_latency_s, 1e-9)
    greedy = cfg.generation.temperature == 0
    if greedy:
        feasible = t.identical == t.samples
    else:  # sampling: equal in distribution only; require that accuracy does not drop (beyond the allowance)
        feasible = (t.exact - t.target_exact) / max(t.samples, 1) >= -cfg.tune.max_accuracy_drop
    m = {
        "samples": t.samples,
        "tokens_per_s": tokens_per_s,
        "target_tokens_per_s": target_tokens_per_s,
        "speedup": tokens_per_s / max(target_tokens_per_s, 1e-9),
        "bytes_per_token": t.bytes / max(t.tokens, 1),
        "mean_accepted_length": 1 + t.accepted / t.rounds if t.rounds else 0.0,
        "identical_to_target_only": t.identical / max(t.samples, 1),
        "exact_match": t.exact / max(t.samples, 1),
        "target_exact_match": t.target_exact / max(t.samples, 1),
        "feasible": int(feasible),
    }
    m["objective_speed"] = m[cfg.tune.metric] if feasible else 0.0
    m["objective_bytes"] = m["bytes_per_token"] if feasible else INFEASIBLE_BYTES
    return m


def _engine(cfg: Config):
    from covspec.models.loading import load_adapter
    from covspec.runtime.edge import Edge
    from covspec.runtime.engine import LocalEngine, check_pair

    key = (
        cfg.models.target.path,
        cfg.models.target.dtype,
        cfg.models.target.device,
        cfg.models.draft.path,
        cfg.models.draft.dtype,
        cfg.models.draft.device,
    )
    if key not in _MODELS:
        t, d = cfg.models.target, cfg.models.draft
        target = load_adapter(t.path, t.dtype, t.device, key="models.target.path")
        draft = load_adapter(d.path, d.dtype, d.device, key="models.draft.path")
        check_pair(target, draft)
        _MODELS.clear()  # keep one pair per worker
        _MODELS[key] = (target, draft)
    target, draft = _MODELS[key]
    return LocalEngine(cfg, target, draft, Edge(target))


def run_trial(params: dict[str, Any], base_yaml: str, space: dict[str, Any]) -> None:
    """Ray Tune function trainable: build the trial's config, run it on val samples, report per chunk.

    Args:
        params: the trial's value of every searched key (dotted keys), as chosen by the searcher.
        base_yaml: the search's base config (``config_to_yaml``).
        space: the search space (``tune.space`` or the default), as validated by the driver.
    """
    import torch
    from ray import tune as raytune

    from covspec.data import load_benchmark
    from covspec.data.metrics import exact_match
    from covspec.errors import ConfigError
    from tune.space import candidate_config, parse_dimensions

    base = load_config_text(base_yaml, where="search base config")
    try:
        cfg = objective_config(candidate_config(base, parse_dimensions(space), params))
    except ConfigError as err:  # an invalid combination (e.g. gamma_min > gamma_max): infeasible, not a crash
        metrics = trial_metrics(Totals(), objective_config(base))
        metrics.update(feasible=0, objective_speed=0.0, objective_bytes=INFEASIBLE_BYTES)
        raytune.report({**metrics, "all_samples": 0, "note": f"invalid: {err}"})
        return
    torch.set_num_threads(cfg.threads)
    samples = load_benchmark(cfg.data, seed=cfg.seed)
    engine = _engine(cfg)
    for method in ("target_only", "covspec"):  # unmeasured: first calls pay lazy initialization (kernels, caches)
        engine.run(method, samples[0].image(), samples[0].question, link_seed=cfg.seed)
    totals = Totals()
    for i, sample in enumerate(samples):
        image = sample.image()
        seed = cfg.seed * 100_003 + i  # the link seed of covspec bench: same delays for both methods
        target = engine.run("target_only", image, sample.question, link_seed=seed)
        ours = engine.run("covspec", image, sample.question, link_seed=seed)
        em = (exact_match(target.text, sample.answer), exact_match(ours.text, sample.answer))
        totals.add(sample.sample_id, target.metrics(), ours.metrics(), ours.token_ids == target.token_ids, em)
        metrics = trial_metrics(totals, cfg)
        last = i + 1 == len(samples)
        if not metrics["feasible"] and cfg.generation.temperature == 0:
            note = f"output differs from target_only on {sample.sample_id}"
            raytune.report({**metrics, "all_samples": int(last), "note": note})
            return
        if last or (i + 1) % cfg.tune.report_every == 0:
            raytune.report({**metrics, "all_samples": int(last), "note": ""})
