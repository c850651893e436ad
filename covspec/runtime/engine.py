"""Composition: build the Edge, a Device and its link from a ``Config`` and run requests in one process."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from covspec.config import ABLATIONS, METHODS, Config, LinkConfig
from covspec.inputs import MAX_PROMPT_CHARS, check_question, question_token_limit
from covspec.models.base import VLMAdapter
from covspec.models.loading import load_adapter
from covspec.protocol import Link, LinkProfile
from covspec.pruning import Pruner, build_pruner
from covspec.runtime.device import Device, DeviceSettings, RequestResult
from covspec.runtime.edge import Edge, prefill_policy
from covspec.runtime.transport import InProcessTransport, Transport

_NO_LIMIT_MBPS = math.inf


def link_profile(cfg: Config) -> LinkProfile:
    """The emulated link of ``cfg.link``."""
    return link_profile_of(cfg.link)


def link_profile_of(link: LinkConfig) -> LinkProfile:
    """The emulated link of one ``LinkConfig``."""
    return LinkProfile(
        rtt_ms=link.rtt_ms,
        jitter_ms=link.jitter_ms,
        up_mbps=link.up_mbps,
        down_mbps=link.down_mbps,
        loss=link.loss,
        compute_slowdown=link.compute_slowdown,
    )


def colocated_profile() -> LinkProfile:
    """Zero latency, unlimited bandwidth: device and edge on one machine."""
    return LinkProfile(rtt_ms=0.0, jitter_ms=0.0, up_mbps=_NO_LIMIT_MBPS, down_mbps=_NO_LIMIT_MBPS, loss=0.0)


def method_config(cfg: Config, method: str) -> tuple[str, Config]:
    """The base method and config of ``method``: an ablation (``covspec_no_pruning`` ...) is covspec with its
    overrides applied to a copy of ``cfg``; any other method runs with ``cfg`` itself."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method not in ABLATIONS:
        return method, cfg
    variant = copy.deepcopy(cfg)
    for item in ABLATIONS[method]:
        dotted, value = item.split("=", 1)
        *path, name = dotted.split(".")
        section = variant
        for part in path:
            section = getattr(section, part)
        setattr(section, name, type(getattr(section, name))(value))
    return "covspec", variant


def device_settings(cfg: Config, method: str) -> DeviceSettings:
    """What a Device needs for ``method`` (a base method or an ablation) under ``cfg``."""
    method, cfg = method_config(cfg, method)
    greedy = cfg.generation.temperature == 0
    return DeviceSettings(
        method=method,
        max_new_tokens=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p,
        gamma=cfg.drafting.gamma,
        num_candidates=cfg.verification.num_candidates,
        seed=cfg.seed,
        compute_slowdown=cfg.link.compute_slowdown,
        # Adaptive drafting and branching are covspec's; the baselines draft fixed blocks, as in their papers.
        policy=cfg.drafting.policy if method == "covspec" else "fixed",
        gamma_min=cfg.drafting.gamma_min,
        gamma_max=cfg.drafting.gamma_max,
        threshold=cfg.drafting.threshold,
        stop=cfg.drafting.stop,
        branch_budget=cfg.branching.budget if method == "covspec" else 0,
        tree=cfg.branching.tree if method == "covspec" and (greedy or cfg.branching.sampling_trees) else 0,
        tree_continuation=0 if greedy else cfg.branching.sampling_continuation,
        prune_target=cfg.pruning.prune_target,
    )


def check_pair(target: VLMAdapter, draft: VLMAdapter) -> None:
    """Draft and target must share the tokenizer (same vocabulary, same ids) and the width of the ids they score."""
    from covspec.models.loading import check_same_tokenizer, check_same_width

    check_same_tokenizer(target.tokenizer, draft.tokenizer)
    check_same_width(target.vocab_size, draft.vocab_size)


@dataclass
class LocalEngine:
    """A target, a draft and an Edge in one process; each request gets a fresh device link.

    ``pruner`` defaults to the one ``cfg.pruning`` describes (None for ``method: none``); every Device gets it.
    ``with_edge_process`` builds one whose edge runs in a spawned process instead: then ``target`` and ``edge`` are
    None (the target is loaded once, there).
    """

    cfg: Config
    target: VLMAdapter | None
    draft: VLMAdapter
    edge: Edge | None
    pruner: Pruner | None = field(default=None)
    remote: Any = field(default=None)
    """An ``edge_process.EdgeProcess`` to verify in instead of ``edge`` (``with_edge_process``), or None."""

    def __post_init__(self) -> None:
        if self.pruner is None:
            self.pruner = build_pruner(self.cfg.pruning, self.cfg.seed)
        self._remote_link: Any = None

    @classmethod
    def with_edge_process(cls, cfg: Config) -> LocalEngine:
        """Verify every request in a spawned edge process (one link, reused request after request), so that a device
        drafting during a wait runs in parallel with the verification instead of sharing this process's interpreter
        lock with it (``covspec.runtime.edge_process``). This process loads only the draft; the pair's tokenizers
        are checked from their files first. ``close`` ends the edge process.
        """
        from covspec.models.loading import check_pair_files
        from covspec.runtime.edge_process import EdgeProcess

        m, cluster = cfg.models, cfg.cluster
        check_pair_files(m.target, m.draft)
        torch.set_num_threads(cfg.threads)
        draft = load_adapter(m.draft.path, m.draft.dtype, m.draft.device, key="models.draft.path")
        remote = EdgeProcess(m.target.path, links=1, dtype=m.target.dtype, device=m.target.device,
                             threads=cluster.edge_threads, session_ttl_s=cluster.session_ttl_s,
                             prefill=prefill_policy(cfg.verification.prefill, shared=False))  # fmt: skip
        return cls(cfg, None, draft, None, remote=remote)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote, self._remote_link = None, None

    def _transport(self, link: Link) -> Transport:
        if self.remote is None:
            if self.edge is None:
                raise RuntimeError("this engine's edge process has ended (close): it has no edge to verify with")
            return InProcessTransport(self.edge.handle, link, idle=self.edge.prefill_idle)
        if self._remote_link is None:
            self._remote_link = self.remote.transport(link)
        self._remote_link.link = link  # requests run one at a time: the next one's link profile and seed
        return self._remote_link

    @classmethod
    def from_config(cls, cfg: Config) -> LocalEngine:
        torch.set_num_threads(cfg.threads)
        m = cfg.models
        target = load_adapter(m.target.path, m.target.dtype, m.target.device, key="models.target.path")
        draft = load_adapter(m.draft.path, m.draft.dtype, m.draft.device, key="models.draft.path")
        check_pair(target, draft)
        return cls(cfg, target, draft, Edge(target, prefill=prefill_policy(cfg.verification.prefill, shared=False)))

    def run(
        self,
        method: str,
        image: Image.Image,
        question: str,
        profile: LinkProfile | None = None,
        link_seed: int = 0,
        keep: torch.Tensor | None = None,
    ) -> RequestResult:
        """One request with ``method`` over a link of ``profile`` (``cfg.link`` by default)."""
        question = check_question(question, self.draft.tokenizer, question_token_limit(self.draft),
                                  max_chars=MAX_PROMPT_CHARS, keep_lines=True)  # fmt: skip
        settings = device_settings(self.cfg, method)
        pruner = self.pruner_for(method)
        if method == "draft_only":
            return Device(self.draft, None, settings, pruner).run(image, question, keep)
        transport = self._transport(Link(profile or link_profile(self.cfg), seed=link_seed))
        try:
            result = Device(self.draft, transport, settings, pruner).run(image, question, keep)
        finally:
            if self.remote is None:
                transport.close()
        result.method = method
        return result

    def pruner_for(self, method: str) -> Pruner | None:
        """The pruner ``method`` runs with (None for an ablation that switches pruning off)."""
        _, mcfg = method_config(self.cfg, method)
        return self.pruner if mcfg.pruning == self.cfg.pruning else build_pruner(mcfg.pruning, self.cfg.seed)


def run_one(cfg: Config, method: str, image: Image.Image, question: str) -> RequestResult:
    """Load the pair of ``cfg`` and answer one question with ``method`` (``covspec generate --method``)."""
    from covspec.errors import ConfigError

    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return LocalEngine.from_config(cfg).run(method, image, question)
