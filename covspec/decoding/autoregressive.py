"""Plain autoregressive decoding with an adapter: the target-only / draft-only reference loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from covspec.decoding.sampling import probs_from_logits, sample
from covspec.models.base import PromptInputs, VLMAdapter


@dataclass
class Generation:
    """Output of one request. ``token_ids`` excludes the EOS token."""

    token_ids: list[int]
    finished: bool  # stopped at EOS (else at max_new_tokens)
    latency_s: float
    ttft_s: float
    step_times_s: list[float] = field(default_factory=list)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy argmax at temperature 0, else a draw from the warped distribution. logits: [V]."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    return int(sample(probs_from_logits(logits.float(), temperature, top_p), generator))


def generate(
    adapter: VLMAdapter,
    inputs: PromptInputs,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    keep: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` tokens one KV-cached step at a time (``keep``/``counts``: a pruned, possibly
    merged prefill, ``VLMAdapter.prefill``)."""
    start = time.perf_counter()
    state, logits = adapter.prefill(inputs, keep=keep, counts=counts)
    tokens: list[int] = []
    steps: list[float] = []
    ttft = 0.0
    finished = False
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        if i == 0:
            ttft = time.perf_counter() - start
        if token in adapter.eos_token_ids:
            finished = True
            break
        tokens.append(token)
        if i + 1 == max_new_tokens:
            break
        t = time.perf_counter()
        logits = adapter.forward(state, torch.tensor([token]))[-1]
        steps.append(time.perf_counter() - t)
    return Generation(tokens, finished, time.perf_counter() - start, ttft, steps)
