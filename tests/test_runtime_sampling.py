"""Sampling exactness through the whole device<->edge path (wire protocol, edge thread, device correction).

A tiny random pair whose draft disagrees with the target, temperature 1, a fixed image and question. The first
generated token of 20,000 independent covspec requests (one seed each) must follow the target's exact
distribution p at that position: chi-square goodness of fit p-value > 1e-3 and total variation < 0.02.
A deliberately broken corrector (always take the first candidate) must fail the same test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from covspec.data.shapes import load_split
from covspec.decoding.sampling import probs_from_logits
from covspec.models.tiny import TinySpec, tiny_llava
from covspec.protocol import Link
from covspec.runtime.device import Device, DeviceSettings
from covspec.runtime.edge import Edge
from covspec.runtime.engine import colocated_profile
from covspec.runtime.transport import InProcessTransport

SPEC = TinySpec(image_size=16, patch_size=8, vision_hidden=16, hidden=32, layers=1, heads=2, kv_heads=2, init_scale=0.5)
TEMPERATURE = 1.0
DRAWS = 20_000


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    target, draft = tiny_llava(SPEC, seed=0), tiny_llava(SPEC, seed=1)
    sample = load_split("test", 1)[0]
    image = sample.image()
    _, t_logits = target.prefill(target.prepare(image, sample.question))
    _, d_logits = draft.prefill(draft.prepare(image, sample.question))
    p = probs_from_logits(t_logits.double(), TEMPERATURE).numpy()
    q = probs_from_logits(d_logits.double(), TEMPERATURE).numpy()
    return target, draft, image, sample.question, p, q


def first_tokens(setup, method: str, draws: int) -> np.ndarray:
    target, draft, image, question, _, _ = setup
    edge = Edge(target)
    transport = InProcessTransport(edge.handle, Link(colocated_profile()))
    counts = np.zeros(target.vocab_size)
    try:
        for seed in range(draws):
            settings = DeviceSettings(method=method, max_new_tokens=1, temperature=TEMPERATURE, seed=seed,
                                      num_candidates=2)  # fmt: skip
            r = Device(draft, transport, settings).run(image, question)
            counts[r.token_ids[0] if r.token_ids else target.eos_token_id] += 1
    finally:
        transport.close()
    return counts


def fit(counts: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Chi-square p-value (bins with expected count < 5 pooled) and total variation against p."""
    n = counts.sum()
    expected = p * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # pool too small to stand alone: fold it into the smallest bin
        obs, exp = obs[:-1], exp[:-1]
        obs[np.argmin(exp)] += counts[~big].sum()
        exp[np.argmin(exp)] += expected[~big].sum()
    pvalue = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    return float(pvalue), float(0.5 * np.abs(counts / n - p).sum())


@pytest.mark.slow
def test_covspec_first_token_follows_target_distribution(setup):
    p, q = setup[4], setup[5]
    assert 0.5 * np.abs(p - q).sum() > 0.3, "the pair must disagree for the test to have power"
    counts = first_tokens(setup, "covspec", DRAWS)
    pvalue, tv = fit(counts, p)
    assert pvalue > 1e-3 and tv < 0.02, (pvalue, tv)


@pytest.mark.slow
def test_dssd_first_token_follows_target_distribution(setup):
    counts = first_tokens(setup, "dssd", 3_000)
    pvalue, _ = fit(counts, setup[4])
    assert pvalue > 1e-3, pvalue


@pytest.mark.slow
def test_broken_corrector_fails(setup, monkeypatch):
    """Taking the first candidate (skipping the max(0, 1 - q/p) test) is biased; the same test catches it."""
    monkeypatch.setattr("covspec.runtime.device.correct_from_candidates", lambda ids, *_: int(ids[0]))
    counts = first_tokens(setup, "covspec", 3_000)  # fewer draws suffice: a p-value only shrinks with more
    pvalue, tv = fit(counts, setup[4])
    assert pvalue < 1e-6, (pvalue, tv)
