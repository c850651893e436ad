"""Accept / correct rules: greedy semantics, and statistical exactness of sampling corrections.

Statistical criterion used throughout: a chi-square goodness-of-fit test of the emitted tokens against
p must give a p-value > 1e-3 (false-alarm rate 1e-3 per check; seeds are fixed, so every run is the
same) AND the total variation distance must be < 0.015 where at least 20,000 tokens were counted.
Broken correctors must fail the same test with a p-value < 1e-6, which shows the test has power.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from covspec.decoding.sampling import probs_from_logits, sample
from covspec.decoding.verify import (
    METHODS,
    accept_candidates,
    accept_drafts,
    correct_from_candidates,
    correct_from_residual,
    correct_topk_approximate,
    residual_probs,
    sample_candidates,
    select_topk_candidates,
    speculative_step_reference,
    verify_greedy,
    verify_sampling,
)

MIN_PVALUE, MAX_TV, TV_MIN_COUNT = 1e-3, 0.015, 20_000


def _gens(seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Independent generators for the draft, the edge and the device."""
    return tuple(torch.Generator().manual_seed(seed * 3 + i) for i in range(3))


def _fit(tokens: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(chi-square p-value, total variation) of tokens ``[n]`` against p ``[V]``; asserts zero-mass cells empty."""
    p = p.double() / p.double().sum()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0, "emitted a token outside p's support"
    n, support = counts.sum(), p > 0
    pvalue = chisquare(counts[support].numpy(), (n * p[support]).numpy()).pvalue
    return float(pvalue), float(0.5 * (counts / n - p).abs().sum())


def _assert_distributed_as(tokens: torch.Tensor, p: torch.Tensor) -> None:
    pvalue, tv = _fit(tokens, p)
    assert pvalue > MIN_PVALUE, f"chi-square p-value {pvalue:.2e} (n={tokens.numel()}, tv={tv:.4f})"
    if tokens.numel() >= TV_MIN_COUNT:
        assert tv < MAX_TV, f"total variation {tv:.4f} (n={tokens.numel()})"


# --- p and q for the statistical tests: rows [k+1, V] and [k, V] with k = 3 --------------------------


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "random":
        return torch.softmax(1.5 * torch.randn(4, 8, generator=g), -1), torch.softmax(
            1.5 * torch.randn(3, 8, generator=g), -1
        )
    if name == "far":  # q ranks the tokens in the opposite order: low acceptance, large residual
        a = 2.0 * torch.randn(4, 6, generator=g)
        return torch.softmax(a, -1), torch.softmax(-a[:3], -1)
    if name == "close":  # q a small perturbation of p: high acceptance, tiny residual mass Z
        p = torch.softmax(torch.randn(4, 7, generator=g), -1)
        q = p[:3] * torch.exp(0.1 * torch.randn(3, 7, generator=g))
        return p, q / q.sum(-1, keepdim=True)
    if name == "q_support_where_p_zero":  # top-p truncated p, full-support q: some drafts always rejected
        p = probs_from_logits(torch.randn(4, 8, generator=g), temperature=1.0, top_p=0.6)
        return p, torch.softmax(torch.randn(3, 8, generator=g), -1)
    if name == "p_support_where_q_zero":  # top-p truncated q: the residual covers tokens q never drafts
        p = torch.softmax(torch.randn(4, 8, generator=g), -1)
        return p, probs_from_logits(torch.randn(3, 8, generator=g), temperature=1.0, top_p=0.5)
    if name == "residual_in_p_tail":  # r lives on p's two least likely tokens
        p = torch.tensor([[0.5, 0.2, 0.15, 0.15]] * 4)
        return p, torch.tensor([[0.6, 0.3, 0.05, 0.05]] * 3)
    raise KeyError(name)


CASES = ["random", "far", "close", "q_support_where_p_zero", "p_support_where_q_zero", "residual_in_p_tail"]


# --- batched simulation over independent rounds, built from the library's batched kernels ------------


def _covspec_correct(p_rows, q_rows, m, edge, device, pick="exact"):
    """Candidate correction for rows ``[R, V]``, asking for fresh candidates until every row is done."""
    out = torch.full((p_rows.shape[0],), -1, dtype=torch.int64)
    pending = torch.arange(p_rows.shape[0])
    while pending.numel():
        ids, p_values = sample_candidates(p_rows[pending], m, edge)  # [R, m]
        if pick == "first_candidate":  # broken: ignores q, i.e. emits a draw from p
            out[pending] = ids[:, 0]
            break
        if pick == "most_probable_candidate":  # broken: biased toward p's mode
            out[pending] = ids.gather(-1, p_values.argmax(-1, keepdim=True)).squeeze(-1)
            break
        first = accept_candidates(ids, p_values, q_rows[pending], device)  # [R]
        done = first < m
        out[pending[done]] = ids[done].gather(-1, first[done].unsqueeze(-1)).squeeze(-1)
        pending = pending[~done]
    return out


def _simulate(p, q, n, method, *, m=2, seed=0):
    """n independent rounds with drafts x_i ~ q_i. Returns emitted ``[n, k+1]`` and num_accepted ``[n]``."""
    (k, vocab), (draft, edge, device) = q.shape, _gens(seed)
    x = sample(q.expand(n, k, vocab), draft)  # [n, k]
    num_accepted = accept_drafts(x, q[torch.arange(k), x], p.expand(n, k + 1, vocab), edge)  # [n]
    p_next = p[num_accepted]  # [n, V]: row of the recovered or bonus token
    last = torch.empty(n, dtype=torch.int64)
    bonus = num_accepted == k
    last[bonus] = sample(p_next[bonus], edge)
    rej = ~bonus
    p_rows, q_rows = p_next[rej], q[num_accepted[rej]]
    if method == "dssd":
        last[rej] = sample(residual_probs(p_rows, q_rows), device)
    else:
        last[rej] = _covspec_correct(p_rows, q_rows, m, edge, device, pick=method)
    emitted = torch.cat([x, torch.zeros(n, 1, dtype=torch.int64)], 1)
    return emitted.scatter_(1, num_accepted.unsqueeze(1), last.unsqueeze(1)), num_accepted


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("method", ["exact", "dssd"])
def test_emitted_tokens_are_distributed_as_p(case, k, method):
    p, q = _case(case)
    p, q = p[: k + 1], q[:k]
    emitted, num_accepted = _simulate(p, q, 60_000, method, seed=k)
    # Position 1 over all rounds; position j+1 over the rounds that accepted the first j drafts.
    for j in range(k + 1):
        reached = num_accepted >= j
        if j == 0 or reached.sum() >= 2_000:
            _assert_distributed_as(emitted[reached, j], p[j])


@pytest.mark.parametrize("case", ["far", "random", "residual_in_p_tail"])
@pytest.mark.parametrize("pick", ["first_candidate", "most_probable_candidate"])
def test_broken_correctors_fail_the_same_test(case, pick):
    p, q = _case(case)
    emitted, _ = _simulate(p[:2], q[:1], 60_000, pick)
    pvalue, tv = _fit(emitted[:, 0], p[0])
    assert pvalue < 1e-6, (pvalue, tv)


def test_candidate_batch_refusal_rate_is_one_minus_tv_to_the_m():
    # With m candidates a batch is refused with probability (1 - Z)^m, Z = sum (p - q)^+.
    p, q = _case("random")
    m, n = 3, 40_000
    z = float((p[0] - q[0]).clamp_min(0).sum())
    _, edge, device = _gens(5)
    ids, p_values = sample_candidates(p[0].expand(n, -1), m, edge)
    refused = (accept_candidates(ids, p_values, q[0].expand(n, -1), device) == m).double().mean()
    assert abs(float(refused) - (1 - z) ** m) < 4 * ((1 - z) ** m / n) ** 0.5 + 1e-3


# --- the same guarantee through the per-round public functions -------------------------------------


@pytest.mark.parametrize("method", ["covspec", "dssd"])
def test_reference_step_round_by_round_is_exact(method):
    p, q = _case("random")
    p, q = p[:3], q[:2]
    draft, edge, device = _gens(42)
    first, second = [], []
    for _ in range(20_000):
        x = sample(q, draft)  # [k]
        out = speculative_step_reference(
            x, q, p, method=method, num_candidates=2, edge_generator=edge, device_generator=device
        )
        assert 1 <= len(out) <= 3 and out[:-1] == x[: len(out) - 1].tolist()
        first.append(out[0])
        if len(out) >= 2:
            second.append(out[1])
    _assert_distributed_as(torch.tensor(first), p[0])
    _assert_distributed_as(torch.tensor(second), p[1])  # position 2 given position 1 accepted


def test_topk_approximate_deviates_when_the_residual_is_in_p_tail():
    p, q = _case("residual_in_p_tail")
    p, q = p[:2], q[:1]
    draft, edge, device = _gens(9)

    def first_tokens(method):
        return torch.tensor(
            [
                speculative_step_reference(
                    sample(q, draft),
                    q,
                    p,
                    method=method,
                    num_candidates=2,
                    edge_generator=edge,
                    device_generator=device,
                )[0]
                for _ in range(4_000)
            ]
        )

    approx = first_tokens("topk_approximate")
    assert _fit(approx, p[0])[0] < 1e-6
    assert (approx >= 2).float().mean() < 0.12  # tokens 2, 3 only come from drafts (p says 0.3)
    _assert_distributed_as(first_tokens("covspec"), p[0])


def test_topk_approximate_samples_restricted_residual():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ids, p_values = select_topk_candidates(p, 2)
    assert ids.tolist() == [0, 1]
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([correct_topk_approximate(ids, p_values, q, g) for _ in range(3_000)])
    _assert_distributed_as(tokens, torch.tensor([0.75, 0.25, 0.0, 0.0]))  # ∝ (0.3, 0.1) on the top 2


# --- accept test ------------------------------------------------------------------------------------


def test_accept_probability_is_min_one_p_over_q():
    n = 40_000
    edge = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.3, 0.7], [0.9, 0.1]])  # [k+1, V] with k = 1
    for q_x, expected in [(0.6, 0.5), (0.3, 1.0), (0.2, 1.0), (0.9, 1 / 3)]:
        num_accepted = accept_drafts(
            torch.zeros(n, 1, dtype=torch.int64), torch.full((n, 1), q_x), p.expand(n, 2, 2), edge
        )
        rate = float(num_accepted.double().mean())
        assert abs(rate - expected) < 0.01, (q_x, rate)


def test_verify_sampling_stops_at_first_rejection():
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])  # [k+1, V], k = 3
    g = torch.Generator().manual_seed(0)
    draft_probs = torch.ones(3)
    assert verify_sampling(torch.tensor([1, 0, 1]), draft_probs, p, g) == (3, False)
    assert verify_sampling(torch.tensor([1, 1, 1]), draft_probs, p, g) == (1, True)  # x_3 would pass
    assert verify_sampling(torch.tensor([0, 0, 1]), draft_probs, p, g) == (0, True)


def test_randomness_consumption_is_fixed_per_call():
    p, q = _case("random")
    x, q_x = torch.tensor([0, 1, 2]), q[torch.arange(3), torch.tensor([0, 1, 2])]
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    verify_sampling(x, q_x, p, a)
    torch.rand(3, generator=b, dtype=torch.float64)  # exactly k uniforms, whatever was accepted
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    correct_from_candidates(torch.tensor([0, 1, 2, 3, 4]), p[0, :5], q[0], a)
    torch.rand(5, generator=b, dtype=torch.float64)  # exactly m uniforms
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- candidates, residual, corrections ----------------------------------------------------------------


def test_sample_candidates_returns_draws_from_p_with_their_values():
    p = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.25])
    ids, p_values = sample_candidates(p, 1_000, torch.Generator().manual_seed(0))
    assert ids.shape == p_values.shape == (1_000,)
    assert torch.equal(p_values, p[ids])
    assert set(ids.tolist()) == {1, 3, 4}


def test_residual_probs():
    p, q = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.2, 0.4, 0.2, 0.2])
    torch.testing.assert_close(residual_probs(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    p2, q2 = torch.tensor([0.4, 0.4, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    torch.testing.assert_close(residual_probs(p2, q2), torch.tensor([0.5, 0.5, 0.0]))
    # Batched rows; the degenerate p == q row (residual mass 0) returns p instead of NaNs.
    batched = residual_probs(torch.stack([p2, p2]), torch.stack([q2, p2]))
    torch.testing.assert_close(batched, torch.stack([torch.tensor([0.5, 0.5, 0.0]), p2]))


def test_correct_from_candidates_deterministic_cases():
    q = torch.tensor([0.0, 0.6, 0.4])
    g = torch.Generator().manual_seed(0)
    # q(y) >= p(y): never accepted. q(y) = 0: always accepted. The first accepted one is returned.
    assert correct_from_candidates(torch.tensor([1, 2, 1]), torch.tensor([0.5, 0.4, 0.5]), q, g) is None
    assert correct_from_candidates(torch.tensor([1, 0, 2]), torch.tensor([0.5, 0.1, 0.4]), q, g) == 0
    assert correct_from_candidates(torch.tensor([0, 1]), torch.tensor([0.1, 0.5]), q, g) == 0


def test_correct_from_residual_only_draws_from_the_residual_support():
    p, q = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.2, 0.4, 0.2, 0.2])
    g = torch.Generator().manual_seed(0)
    assert {correct_from_residual(p, q, g) for _ in range(200)} == {0}


def test_reference_rejects_unknown_method():
    p, q = _case("random")
    g = torch.Generator()
    with pytest.raises(ValueError, match="method"):
        speculative_step_reference(
            torch.tensor([0]), q[:1], p[:2], method="typo", num_candidates=2, edge_generator=g, device_generator=g
        )


# --- greedy -------------------------------------------------------------------------------------------


def _target_logits(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(len(argmaxes)))
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


@pytest.mark.parametrize(
    ("drafts", "target_argmax", "expected"),
    [
        ([3, 1, 4], [3, 1, 4, 7], (3, 7)),  # all accepted -> bonus
        ([5, 1, 4], [3, 1, 4, 7], (0, 3)),  # first mismatch at once -> recovered argmax
        ([3, 1, 9, 2], [3, 1, 4, 2, 8], (2, 4)),  # partial; a later match does not count
        ([6], [6, 2], (1, 2)),  # k = 1 accepted
        ([6], [0, 2], (0, 0)),  # k = 1 rejected
    ],
)
def test_verify_greedy(drafts, target_argmax, expected):
    result = verify_greedy(torch.tensor(drafts), _target_logits(target_argmax))
    assert result == expected
    assert (result.num_accepted, result.token) == expected


@pytest.mark.parametrize("seed", range(8))
def test_sampling_rules_on_one_hot_distributions_reproduce_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    k, vocab = 4, 12
    target_logits = torch.randn(k + 1, vocab, generator=g)
    draft_logits = torch.randn(k, vocab, generator=g)
    agree = int(torch.randint(0, k + 1, (), generator=g))  # draft copies the target on a prefix
    draft_logits[:agree] = target_logits[:agree]
    p = probs_from_logits(target_logits, temperature=0.0)
    q = probs_from_logits(draft_logits, temperature=0.0)
    draft_ids = q.argmax(-1)
    greedy = verify_greedy(draft_ids, target_logits)
    assert greedy.num_accepted >= agree

    n, rejected = verify_sampling(draft_ids, torch.ones(k), p, g)
    assert (n, rejected) == (greedy.num_accepted, greedy.num_accepted < k)
    if rejected:  # the single-candidate correction is the target argmax
        ids, p_values = sample_candidates(p[n], 1, g)
        assert correct_from_candidates(ids, p_values, q[n], g) == greedy.token
    expected = [*draft_ids[: greedy.num_accepted].tolist(), greedy.token]
    for method in METHODS:
        out = speculative_step_reference(
            draft_ids, q, p, method=method, num_candidates=1, edge_generator=g, device_generator=g
        )
        assert out == expected, method
