"""Accept / correct rules of speculative decoding: pure functions, no model, no I/O.

Words, used the same way across covspec:

- p is the target's distribution, q the draft's, both from
  :func:`covspec.decoding.sampling.probs_from_logits` with the same sampling parameters.
- *drafted* tokens x_1..x_k: proposed by the device, x_i ~ q_i.
- *accepted* tokens: the drafted prefix the target keeps; ``num_accepted`` counts them (0..k) and
  never includes the bonus.
- *recovered* token: the correction emitted at the first rejection (position ``num_accepted + 1``),
  drawn from the residual r ∝ max(0, p − q) at that position (greedy: the target argmax).
- *bonus* token: emitted when all k are accepted, drawn from p at position k+1.
- ``acceptance_length = num_accepted + 1``: tokens emitted per round (exactly one recovered or
  bonus token always follows the accepted ones).

Who does what. The edge holds p and knows only q(x_i) for the drafted tokens, which is enough for
the accept test (:func:`verify_sampling`, :func:`verify_greedy`). The correction needs the residual,
i.e. p and q over the whole vocabulary at the rejected position. The baselines move a full row over
the link (vanilla_sd: every q up and p rows down; dssd: the rejected p row down, :func:`correct_from_residual`).
covspec sends m candidates y ~ p with their p(y) down (:func:`sample_candidates`) and the device
accepts one with its own q (:func:`correct_from_candidates`): exact rejection sampling from r.
:func:`correct_topk_approximate` (top-k candidates of p) is the paper's approximate variant.

Greedy is not a separate code path: at temperature 0, p and q are one-hot, :func:`verify_sampling`
accepts exactly the drafted tokens equal to the target argmax and the one candidate drawn from p *is*
the target argmax, which the device always accepts (q(y) = 0 there). :func:`verify_greedy` is the
same rule stated directly on logits.

Batched kernels (:func:`accept_drafts`, :func:`accept_candidates`) return tensors without host
syncs; the per-round functions wrap them and sync once to return Python ints for the wire.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from covspec.decoding.sampling import sample

METHODS = ("covspec", "dssd", "vanilla_sd", "topk_approximate")  # wire modes + the approximate ablation


class VerifyResult(NamedTuple):
    """Outcome of a greedy round: ``token`` is the recovered token, or the bonus if all accepted."""

    num_accepted: int
    token: int


class AcceptResult(NamedTuple):
    """Outcome of a sampling round's accept test (the edge then sends candidates or a bonus)."""

    num_accepted: int
    rejected: bool  # num_accepted < k: a correction is due at position num_accepted


# --- edge side ------------------------------------------------------------------------------------


def verify_greedy(draft_ids: Tensor, target_logits: Tensor) -> VerifyResult:
    """Greedy verification: accept while the drafted token equals the target argmax.

    Args:
        draft_ids: ``[k]`` drafted tokens.
        target_logits: ``[k+1, V]`` target logits (or probabilities) at the k drafted positions and
            the one after them.

    Returns:
        ``num_accepted`` and the target argmax at position ``num_accepted`` (recovered or bonus).
    """
    target_ids = target_logits.argmax(-1)  # [k+1]
    matches = (draft_ids == target_ids[:-1]).to(torch.int64)  # [k]
    num_accepted = matches.cumprod(-1).sum(-1)  # leading run of matches
    token = target_ids.gather(-1, num_accepted.unsqueeze(-1)).squeeze(-1)
    n, token = torch.stack([num_accepted, token]).tolist()  # the one host sync
    return VerifyResult(n, token)


def accept_drafts(draft_ids: Tensor, draft_probs: Tensor, target_probs: Tensor, generator: torch.Generator) -> Tensor:
    """Batched accept test: x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), in order.

    Draws exactly one uniform per drafted token whatever the outcome, so the generator advances by a
    fixed amount per call. No host sync.

    Args:
        draft_ids: ``[..., k]`` drafted tokens.
        draft_probs: ``[..., k]`` q_i(x_i), as sent by the device.
        target_probs: ``[..., k+1, V]`` (or ``[..., k, V]``) target distributions p.
        generator: on the tensors' device.

    Returns:
        ``num_accepted``: long ``[...]``, the length of the accepted prefix (0..k).
    """
    k = draft_ids.shape[-1]
    p_x = target_probs[..., :k, :].gather(-1, draft_ids.unsqueeze(-1)).squeeze(-1)  # [..., k]
    u = torch.rand(draft_ids.shape, generator=generator, device=draft_ids.device, dtype=torch.float64)
    # u < p/q written without the division; q(x) = 0 (never drafted in practice) accepts iff p(x) > 0.
    accepted = u * draft_probs.to(torch.float64) < p_x.to(torch.float64)  # [..., k]
    return accepted.to(torch.int64).cumprod(-1).sum(-1)


def verify_sampling(
    draft_ids: Tensor, draft_probs: Tensor, target_probs: Tensor, generator: torch.Generator
) -> AcceptResult:
    """Speculative-sampling accept test for one round (stops at the first rejection).

    Args:
        draft_ids: ``[k]`` drafted tokens.
        draft_probs: ``[k]`` q_i(x_i) as sent by the device.
        target_probs: ``[k+1, V]`` target distributions p.
        generator: edge randomness; consumes k uniforms.

    Returns:
        ``AcceptResult(num_accepted, rejected)``. If ``rejected``, the correction is drawn at
        position ``num_accepted`` (row ``target_probs[num_accepted]``); otherwise the bonus is
        ``sample(target_probs[k], generator)``.
    """
    n = int(accept_drafts(draft_ids, draft_probs, target_probs, generator))
    return AcceptResult(n, n < draft_ids.shape[-1])


def sample_candidates(
    target_probs_row: Tensor, num_candidates: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """covspec correction payload: m i.i.d. draws from p (with replacement) and their p values.

    Args:
        target_probs_row: ``[..., V]`` p at the rejected position.
        num_candidates: m.
        generator: edge randomness; consumes m uniforms per row.

    Returns:
        ``ids`` long ``[..., m]`` and ``p_values`` ``[..., m]`` (dtype of p; send at least float32,
        the device's accept probability is computed from these values).
    """
    ids = sample(target_probs_row, generator, num_samples=num_candidates)  # [..., m]
    return ids, target_probs_row.gather(-1, ids)


def select_topk_candidates(target_probs_row: Tensor, num_candidates: int) -> tuple[Tensor, Tensor]:
    """Payload of the APPROXIMATE variant: the m most probable tokens of p and their p values.

    Returns:
        ``ids`` long ``[..., m]`` and ``p_values`` ``[..., m]``, most probable first.
    """
    p_values, ids = torch.topk(target_probs_row, num_candidates, dim=-1)
    return ids, p_values


def residual_probs(p: Tensor, q: Tensor) -> Tensor:
    """Residual distribution r = normalize(max(0, p − q)).

    A rejection at x needs p(x) < q(x), hence Σ(q − p)^+ > 0 and, as both sum to 1, Σ(p − q)^+ > 0:
    the residual mass is positive whenever a correction is due. For the degenerate p == q (mass 0)
    this returns p, a well-defined distribution rather than NaNs.

    Args:
        p: ``[..., V]`` target distribution.
        q: ``[..., V]`` draft distribution.

    Returns:
        ``[..., V]`` residual r.
    """
    r = (p - q).clamp_min(0.0)
    mass = r.sum(-1, keepdim=True)  # Z = Σ(p − q)^+ = TV(p, q)
    return torch.where(mass > 0, r / mass.clamp_min(torch.finfo(r.dtype).tiny), p)


# --- device side ----------------------------------------------------------------------------------


def accept_candidates(
    candidate_ids: Tensor, candidate_p: Tensor, draft_probs: Tensor, generator: torch.Generator
) -> Tensor:
    """Batched covspec correction: index of the first candidate accepted, ``m`` if none.

    Candidate y is accepted with probability max(0, 1 − q(y)/p(y)); see
    :func:`correct_from_candidates` for why this is exact. Draws m uniforms per row whatever the
    outcome. No host sync.

    Args:
        candidate_ids: ``[..., m]`` candidates y ~ p from the edge.
        candidate_p: ``[..., m]`` their p(y) from the edge.
        draft_probs: ``[..., V]`` the device's own q at the rejected position.
        generator: device randomness, independent of the edge's.

    Returns:
        Long ``[...]``: position of the first accepted candidate, or m when all were refused.
    """
    q_y = draft_probs.gather(-1, candidate_ids).to(torch.float64)  # [..., m]
    p_y = candidate_p.to(torch.float64)
    u = torch.rand(candidate_ids.shape, generator=generator, device=candidate_ids.device, dtype=torch.float64)
    # u < 1 − q/p  <=>  u·p < p − q  (p > 0 for any candidate drawn from p; p = 0 is never accepted).
    accepted = u * p_y < p_y - q_y  # [..., m]
    m = candidate_ids.shape[-1]
    first = accepted.to(torch.int64).argmax(-1)  # first True (argmax returns the first maximum)
    return torch.where(accepted.any(-1), first, m)


def correct_from_candidates(
    candidate_ids: Tensor, candidate_p: Tensor, draft_probs_row: Tensor, generator: torch.Generator
) -> int | None:
    """covspec correction on the device: the first candidate accepted, ``None`` if all refused.

    Why this is exact. Each candidate is y ~ p and is kept with probability
    a(y) = max(0, 1 − q(y)/p(y)) = (p(y) − q(y))^+ / p(y). So one draw yields y *and* keeps it with
    probability p(y)·a(y) = (p(y) − q(y))^+ = Z·r(y), where r = (p − q)^+ / Z is the residual and
    Z = Σ(p − q)^+ = TV(p, q) ≤ 1. This is rejection sampling from r with proposal p and envelope
    constant 1/Z (valid because Z·r(y) ≤ p(y)): a draw is kept with probability Z and, given that, is
    distributed as r. Draws are i.i.d., so the first kept one is exactly r-distributed, and the number
    of draws is geometric with mean 1/Z. A batch of m fails with probability (1 − Z)^m; the caller then
    asks for m fresh candidates, which are independent of the refused ones, so the result stays exact.
    Falling back to :func:`correct_from_residual` after some failed batches is also exact (a mixture
    of exact r-samples). Needs p(y) as a float32 or better on the wire.

    Args:
        candidate_ids: ``[m]`` candidates y ~ p from the edge, in the order drawn.
        candidate_p: ``[m]`` their p(y).
        draft_probs_row: ``[V]`` q over the full vocabulary at the rejected position.
        generator: device randomness; consumes m uniforms.

    Returns:
        The recovered token, or ``None`` when every candidate was refused.
    """
    m = candidate_ids.shape[-1]
    first = accept_candidates(candidate_ids, candidate_p, draft_probs_row, generator)  # [] in 0..m
    token = candidate_ids.gather(-1, first.clamp(max=m - 1).unsqueeze(-1)).squeeze(-1)
    first, token = torch.stack([first, token]).tolist()  # the one host sync
    return None if first == m else token


def correct_from_residual(target_probs_row: Tensor, draft_probs_row: Tensor, generator: torch.Generator) -> int:
    """Standard correction (vanilla_sd, dssd): one draw from r ∝ max(0, p − q), given both full rows.

    Args:
        target_probs_row: ``[V]`` p at the rejected position.
        draft_probs_row: ``[V]`` q at the rejected position.
        generator: consumes one uniform.
    """
    return int(sample(residual_probs(target_probs_row, draft_probs_row), generator))


def correct_topk_approximate(
    candidate_ids: Tensor, candidate_p: Tensor, draft_probs_row: Tensor, generator: torch.Generator
) -> int:
    """APPROXIMATE correction (paper's "selective bonus-token candidates"): NOT lossless.

    Samples from the residual restricted to the edge's top-m tokens of p and renormalized,
    ∝ max(0, p(y) − q(y)) over the candidates; if the residual is zero on all of them, from p
    restricted to them. Residual mass outside p's top-m is never emitted, so the output distribution
    deviates from p whenever r has support there.

    Args:
        candidate_ids: ``[m]`` from :func:`select_topk_candidates`.
        candidate_p: ``[m]`` their p values.
        draft_probs_row: ``[V]`` q at the rejected position.
        generator: consumes one uniform.
    """
    q_y = draft_probs_row.gather(-1, candidate_ids).to(candidate_p.dtype)
    weights = residual_probs(candidate_p, q_y)  # falls back to candidate_p when the residual is 0 here
    return int(candidate_ids.gather(-1, sample(weights, generator).unsqueeze(-1)))


# --- one round, composed ---------------------------------------------------------------------------


def speculative_step_reference(
    draft_ids: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    *,
    method: str,
    num_candidates: int,
    edge_generator: torch.Generator,
    device_generator: torch.Generator,
    max_candidate_rounds: int = 16,
) -> list[int]:
    """One speculative round, edge and device halves composed in-process (reference, not the runtime).

    Args:
        draft_ids: ``[k]`` drafted tokens.
        draft_probs: ``[k, V]`` q rows at the drafted positions.
        target_probs: ``[k+1, V]`` p rows.
        method: one of :data:`METHODS`.
        num_candidates: m, candidates per covspec batch (or top-m for ``topk_approximate``).
        edge_generator: draws accept uniforms, candidates and the bonus.
        device_generator: draws the correction on the device.
        max_candidate_rounds: covspec asks for fresh candidates up to this many times, then falls
            back to the full residual (still exact, see :func:`correct_from_candidates`).

    Returns:
        The emitted tokens: the accepted drafts then one recovered or bonus token
        (``len == acceptance_length``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    k = draft_ids.shape[-1]
    q_x = draft_probs.gather(-1, draft_ids.unsqueeze(-1)).squeeze(-1)  # [k], what the device sends
    n, rejected = verify_sampling(draft_ids, q_x, target_probs, edge_generator)
    emitted = draft_ids[:n].tolist()
    if not rejected:
        return [*emitted, int(sample(target_probs[k], edge_generator))]  # bonus
    p_row, q_row = target_probs[n], draft_probs[n]
    if method == "covspec":
        for _ in range(max_candidate_rounds):
            ids, p_values = sample_candidates(p_row, num_candidates, edge_generator)
            token = correct_from_candidates(ids, p_values, q_row, device_generator)
            if token is not None:
                return [*emitted, token]
    if method == "topk_approximate":
        ids, p_values = select_topk_candidates(p_row, num_candidates)
        return [*emitted, correct_topk_approximate(ids, p_values, q_row, device_generator)]
    return [*emitted, correct_from_residual(p_row, q_row, device_generator)]  # dssd, vanilla_sd
