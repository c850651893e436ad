"""probs_from_logits (greedy, temperature, top-p) and the inverse-CDF sampler."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from covspec.decoding.sampling import probs_from_logits, sample


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_greedy_is_one_hot_at_argmax_with_lowest_index_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 9.0]])
    probs = probs_from_logits(logits, temperature=0.0, top_p=0.3)
    expected = torch.zeros(3, 4)
    expected[0, 1] = expected[1, 0] = expected[2, 3] = 1.0
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))


def test_greedy_keeps_leading_dims():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    probs = probs_from_logits(logits, temperature=0.0)
    assert probs.shape == (2, 3, 11)
    assert torch.equal(probs.sum(-1), torch.ones(2, 3))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_scales_the_softmax(temperature):
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(probs_from_logits(logits, temperature), torch.softmax(logits / temperature, -1))


def test_higher_temperature_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])

    def entropy(p):
        return -(p * p.log()).sum()

    assert entropy(probs_from_logits(logits, 0.5)) < entropy(probs_from_logits(logits, 1.0))
    assert entropy(probs_from_logits(logits, 1.0)) < entropy(probs_from_logits(logits, 2.0))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.1, [0.0, 1.0, 0.0, 0.0]),  # at least the top token
        (0.5 - 1e-6, [0.0, 1.0, 0.0, 0.0]),
        (0.75, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),  # 0.5 < 0.75 <= 0.5 + 0.3
        (0.85, [0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),
        (0.97, [0.05, 0.5, 0.15, 0.3]),
        (1.0, [0.05, 0.5, 0.15, 0.3]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_the_mass(top_p, expected):
    probs = probs_from_logits(_logits([0.05, 0.5, 0.15, 0.3]), temperature=1.0, top_p=top_p)
    torch.testing.assert_close(probs, torch.tensor(expected, dtype=torch.float64))


def test_top_p_ties_break_toward_lower_index():
    # Three tied tokens of mass ~0.29 each: top_p = 0.5 needs two of them, and takes indices 1 and 2.
    probs = probs_from_logits(torch.tensor([0.0, 2.0, 2.0, 2.0, 1.0]), temperature=1.0, top_p=0.5)
    assert (probs > 0).tolist() == [False, True, True, False, False]
    torch.testing.assert_close(probs[1], probs[2])
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_top_p_applies_per_row_and_combines_with_temperature():
    logits = torch.stack([_logits([0.05, 0.5, 0.15, 0.3]), _logits([0.7, 0.1, 0.1, 0.1])])
    probs = probs_from_logits(logits, temperature=1.0, top_p=0.65)
    assert (probs > 0).tolist() == [[False, True, False, True], [True, False, False, False]]
    # Temperature is applied before truncation: at T=3 the first row is flat enough to keep 3 tokens.
    hot = probs_from_logits(logits[0], temperature=3.0, top_p=0.65)
    assert int((hot > 0).sum()) == 3


def test_dtypes():
    logits = torch.randn(5)
    assert probs_from_logits(logits.double(), 1.0).dtype == torch.float64
    assert probs_from_logits(logits.bfloat16(), 1.0, 0.9).dtype == torch.float32
    assert probs_from_logits(logits.half(), 0.0).dtype == torch.float32


@pytest.mark.parametrize(("temperature", "top_p"), [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_invalid_parameters_name_the_value(temperature, top_p):
    with pytest.raises(ValueError, match="must be"):
        probs_from_logits(torch.zeros(3), temperature, top_p)


def test_sample_shapes():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 7, generator=g), -1)
    assert sample(probs[0], g).shape == ()
    assert sample(probs, g).shape == (3,)
    assert sample(probs[0], g, num_samples=5).shape == (5,)
    assert sample(probs, g, num_samples=5).shape == (3, 5)
    assert sample(probs, g).dtype == torch.int64


def test_sample_is_reproducible_from_the_generator():
    probs = torch.softmax(torch.randn(50), -1)
    a = sample(probs, torch.Generator().manual_seed(7), num_samples=100)
    b = sample(probs, torch.Generator().manual_seed(7), num_samples=100)
    assert torch.equal(a, b)


def test_sample_one_hot_always_returns_the_hot_index():
    probs = probs_from_logits(torch.randn(4096, 6, generator=torch.Generator().manual_seed(3)), temperature=0.0)
    assert torch.equal(sample(probs, torch.Generator().manual_seed(0)), probs.argmax(-1))


def test_sample_matches_the_distribution_and_never_draws_zero_mass():
    # Unnormalized weights with zeros at both ends and in the middle.
    weights = torch.tensor([0.0, 2.0, 0.5, 0.0, 1.0, 0.5, 0.0])
    n = 40_000
    draws = sample(weights, torch.Generator().manual_seed(11), num_samples=n)
    counts = torch.bincount(draws, minlength=7).double()
    assert counts[weights == 0].sum() == 0
    p = (weights / weights.sum()).double()
    support = p > 0
    assert chisquare(counts[support].numpy(), (n * p[support]).numpy()).pvalue > 1e-3
    assert 0.5 * (counts / n - p).abs().sum() < 0.015
    assert math.isclose(float(counts.sum()), n)
