"""Sampling exactness through the whole device<->edge path (wire protocol, edge thread, device correction).

A tiny random pair whose draft disagrees with the target, temperature 1, a fixed image and question. The first
generated token of 12,000 independent covspec requests (one seed each) must follow the target's exact
distribution p at that position: chi-square goodness of fit p-value > 1e-3 and total variation below 0.02 scaled
from 20,000 draws by 1/sqrt(n) (0.026).
A deliberately broken corrector (always take the first candidate) must fail the same test. With adaptive drafting
and parallel branching on (6,000 requests), the first two tokens must also follow the target's joint distribution,
and a draft close to the target (so that branches match often) must keep the first three tokens exact. Token trees
under sampling (corrections that take an alternative commit the edge's verdict on its continuation) must keep the
first two tokens' joint distribution and the third token's conditional, and an edge that skips the continuation's
accept test must fail.

The requests are independent, so their seeds are split over two worker processes (spawned once per module, one
core each): every request still runs the whole path in its worker, with the same models built from the same seeds.
"""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from scipy import stats

import covspec.runtime.device as device_module
import covspec.runtime.edge as edge_module
from covspec.data.shapes import load_split
from covspec.decoding.sampling import probs_from_logits
from covspec.decoding.verify import accept_drafts, correct_from_candidates
from covspec.models.tiny import TinySpec, tiny_llava
from covspec.protocol import Link, LinkProfile, MoreCandidates, decode
from covspec.runtime.device import Device, DeviceSettings
from covspec.runtime.edge import Edge
from covspec.runtime.engine import colocated_profile
from covspec.runtime.transport import InProcessTransport

SPEC = TinySpec(image_size=16, patch_size=8, vision_hidden=16, hidden=32, layers=1, heads=2, kv_heads=2, init_scale=0.5)
TEMPERATURE = 1.0
DRAWS = 12_000  # with Ray and Tune tests in the suite, this keeps it under 15 min
BRANCHING_DRAWS = 6_000  # the pipelined loop costs ~2x per request
TV_AT_20K = 0.02  # allowed total variation at 20,000 draws; it scales like 1/sqrt(n)


WORKERS = 2


NOISE = {"close": 0.1, "mid": 0.3}  # draft = the target with this much noise on its language model


def _models(draft_kind: str) -> tuple:
    """The target and a draft, built from fixed seeds: ``random`` disagrees with the target; ``close`` and ``mid``
    are the target with noise on its language model (``close``: branches match often; ``mid``: TV(p, q) about 0.6 at
    the first position, so that corrections are common and their first candidate is often refused). Same weights in
    every process."""
    target = tiny_llava(SPEC, seed=0)
    if draft_kind == "random":
        return target, tiny_llava(SPEC, seed=1)
    draft = tiny_llava(SPEC, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for w in draft.model.model.language_model.parameters():
            if w.dim() > 1:
                w += NOISE[draft_kind] * w.std() * torch.randn(w.shape, generator=gen)
    return target, draft


_CACHE: dict[str, tuple] = {}


def losing_corrections(edge: Edge):
    """The edge's frame handler, except that a MoreCandidates for a session that has verified a round (the device is
    mid-correction) finds the session gone, as after an expiry or a replica restart."""

    def handle(payload: bytes, peer: str = ""):
        msg = decode(payload)
        session = edge.sessions.get(msg.session_id) if isinstance(msg, MoreCandidates) else None
        if session is not None and session.verified > 0:
            edge.drop(msg.session_id)
        yield from edge.handle(payload, peer)

    return handle


def _accept_all(draft_ids, *_):
    return torch.tensor(draft_ids.shape[-1])


def losing_alternatives(edge: Edge):
    """The edge's frame handler, except that a frame naming a tree alternative (``via``: the device took it) finds
    the session gone: the device reopens it with the alternative among the committed tokens (which, with random
    tiny models, often hold the image placeholder id: the edge feeds those after the prompt)."""

    def handle(payload: bytes, peer: str = ""):
        msg = decode(payload)
        if getattr(msg, "via", -1) >= 0:
            edge.drop(msg.session_id)
        yield from edge.handle(payload, peer)

    return handle


def run_seeds(method: str, seeds: range, max_new_tokens: int, draft_kind: str, rtt_ms: float | None,
              broken: bool, settings: dict, lose_corrections: bool | str = False, broken_tree: bool = False,
              ) -> tuple[np.ndarray, list[tuple[int, int, int, int]], float]:  # fmt: skip
    """Worker body: one full device<->edge request per seed. Returns the first ``max_new_tokens`` tokens (EOS-padded),
    (branch hits, misses, session reopens, tree hits) per request, and a fingerprint of the target's first-token
    logits (the parent checks that the worker built the same model)."""
    torch.set_num_threads(1)
    # Taking the first candidate, skipping the max(0, 1 - q/p) test, is biased. Set on every call: workers are reused.
    device_module.correct_from_candidates = (lambda ids, *_: int(ids[0])) if broken else correct_from_candidates
    # So is accepting a tree alternative's whole continuation (the edge's accept test of it skipped).
    edge_module.accept_drafts = _accept_all if broken_tree else accept_drafts
    if draft_kind not in _CACHE:
        _CACHE[draft_kind] = _models(draft_kind)
    target, draft = _CACHE[draft_kind]
    sample = load_split("test", 1)[0]
    image = sample.image()
    _, logits = target.prefill(target.prepare(image, sample.question))
    edge = Edge(target)
    profile = colocated_profile() if rtt_ms is None else LinkProfile(rtt_ms=rtt_ms)
    handler = {False: edge.handle, True: losing_corrections(edge), "alternatives": losing_alternatives(edge)}
    transport = InProcessTransport(handler[lose_corrections], Link(profile))
    eos = target.eos_token_id
    tokens, branches = np.full((len(seeds), max_new_tokens), eos), []
    try:
        for i, seed in enumerate(seeds):
            s = DeviceSettings(method=method, max_new_tokens=max_new_tokens, temperature=TEMPERATURE, seed=seed,
                               **{"num_candidates": 2, **settings})  # fmt: skip
            r = Device(draft, transport, s).run(image, sample.question)
            tokens[i, : len(r.token_ids)] = r.token_ids
            branches.append((r.branch_hits, r.branch_misses, r.session_reopens, r.tree_hits))
    finally:
        transport.close()
    return tokens, branches, float(logits.double().sum())


@pytest.fixture(scope="module")
def pool():
    """Worker processes for the draws (spawned: no forked torch state), shared by the module's tests."""
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


@pytest.fixture(scope="module")
def setup(pool):
    torch.set_num_threads(1)
    target, draft = _models("random")
    sample = load_split("test", 1)[0]
    image = sample.image()
    _, t_logits = target.prefill(target.prepare(image, sample.question))
    _, d_logits = draft.prefill(draft.prepare(image, sample.question))
    p = probs_from_logits(t_logits.double(), TEMPERATURE).numpy()
    q = probs_from_logits(d_logits.double(), TEMPERATURE).numpy()
    return target, draft, image, sample.question, p, q, pool, float(t_logits.double().sum())


def generations(setup, method: str, draws: int, max_new_tokens: int = 1, draft: str = "random",
                rtt_ms: float | None = None, broken: bool = False, lose_corrections: bool | str = False,
                broken_tree: bool = False, **settings):  # fmt: skip
    """The first ``max_new_tokens`` tokens of ``draws`` requests (seeds 0..draws-1, split over the workers), padded
    with EOS; and (branch hits, misses, session reopens, tree hits) per request."""
    pool, fingerprint = setup[6], setup[7]
    bounds = np.linspace(0, draws, WORKERS + 1).astype(int)
    jobs = [pool.submit(run_seeds, method, range(a, b), max_new_tokens, draft, rtt_ms, broken, settings,
                        lose_corrections, broken_tree)
            for a, b in itertools.pairwise(bounds)]  # fmt: skip
    parts = [job.result() for job in jobs]
    for _, _, worker_fingerprint in parts:
        assert abs(worker_fingerprint - fingerprint) < 1e-9, "a worker built a different target"
    return np.concatenate([t for t, _, _ in parts]), [b for _, branches, _ in parts for b in branches]


def first_tokens(setup, method: str, draws: int, **settings) -> np.ndarray:
    tokens, _ = generations(setup, method, draws, **settings)
    return np.bincount(tokens[:, 0], minlength=setup[0].vocab_size).astype(float)


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


PIPELINED = dict(policy="adaptive", gamma=1, gamma_max=4, threshold=1.0, branch_budget=3)
"""Adaptive drafting whose confidence stop ends every block after one token, with branching on: the second token's
block is the one an alternative branch drafted during the first verification whenever that branch matched."""


def target_probs(setup, prefix: list[int]) -> np.ndarray:
    """p(. | prompt + prefix) at the test temperature."""
    target, _, image, question = setup[:4]
    state, logits = target.prefill(target.prepare(image, question))
    if prefix:
        logits = target.forward(state, torch.tensor(prefix))[-1]
    return probs_from_logits(logits.double(), TEMPERATURE).numpy()


def pair_probs(setup) -> np.ndarray:
    """[V, V] joint distribution of the first two tokens under the target (EOS ends the answer: (EOS, EOS))."""
    target, p = setup[0], setup[4]
    eos = target.eos_token_id
    joint = np.zeros((target.vocab_size, target.vocab_size))
    for t0 in range(target.vocab_size):
        if t0 == eos:
            joint[eos, eos] = p[eos]
        else:
            joint[t0] = p[t0] * target_probs(setup, [t0])
    return joint


def pair_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.bincount(tokens[:, 0] * vocab_size + tokens[:, 1], minlength=vocab_size**2).astype(float)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fixed", "adaptive+branching"])
def test_covspec_first_token_follows_target_distribution(setup, variant):
    p, q = setup[4], setup[5]
    assert 0.5 * np.abs(p - q).sum() > 0.3, "the pair must disagree for the test to have power"
    if variant == "fixed":
        counts = first_tokens(setup, "covspec", DRAWS)
    else:  # two tokens, so that the second comes from a branch whenever one matched
        tokens, branches = generations(setup, "covspec", BRANCHING_DRAWS, max_new_tokens=2, **PIPELINED)
        assert sum(h + m for h, m, *_ in branches) > BRANCHING_DRAWS // 2  # the branching loop ran
        counts = np.bincount(tokens[:, 0], minlength=len(p)).astype(float)
        pvalue, tv = fit(pair_counts(tokens, len(p)), pair_probs(setup).ravel())
        assert pvalue > 1e-3, (pvalue, tv)
    pvalue, tv = fit(counts, p)
    # TV of an empirical distribution shrinks like 1/sqrt(n): 0.02 at 20,000 draws is 0.026 at 12,000, 0.037 at 6,000
    assert pvalue > 1e-3 and tv < TV_AT_20K * (20_000 / counts.sum()) ** 0.5, (pvalue, tv)


@pytest.mark.slow
def test_drafts_reused_from_branches_keep_sampling_exact(setup):
    """A draft close to the target over a 2 ms link, so that branches match often (main and alternatives): the first
    two tokens follow the target's joint distribution, and the third its conditional after the commonest pair."""
    target = setup[0]
    tokens, branches = generations(setup, "covspec", 3_000, max_new_tokens=3, draft="close", rtt_ms=2.0, **PIPELINED)
    hits = sum(h for h, *_ in branches)
    assert hits > 0.05 * sum(h + m for h, m, *_ in branches), hits
    v, eos = target.vocab_size, target.eos_token_id
    pvalue, tv = fit(pair_counts(tokens, v), pair_probs(setup).ravel())
    assert pvalue > 1e-3, (pvalue, tv)
    pairs = pair_counts(tokens, v)
    pairs[eos * v : (eos + 1) * v] = pairs[eos::v] = 0  # prefixes that go on
    t0, t1 = divmod(int(np.argmax(pairs)), v)
    after = tokens[(tokens[:, 0] == t0) & (tokens[:, 1] == t1), 2]
    assert len(after) > 500
    pvalue, tv = fit(np.bincount(after, minlength=v).astype(float), target_probs(setup, [t0, t1]))
    assert pvalue > 1e-3, (pvalue, tv)


@pytest.mark.slow
def test_dssd_first_token_follows_target_distribution(setup):
    counts = first_tokens(setup, "dssd", 3_000)
    pvalue, _ = fit(counts, setup[4])
    assert pvalue > 1e-3, pvalue


@pytest.mark.slow
def test_broken_corrector_fails(setup):
    """Taking the first candidate (skipping the max(0, 1 - q/p) test) is biased; the same test catches it."""
    counts = first_tokens(setup, "covspec", 3_000, broken=True)  # fewer draws suffice: a p-value only shrinks
    pvalue, tv = fit(counts, setup[4])
    assert pvalue < 1e-6, (pvalue, tv)


@pytest.mark.slow
def test_a_correction_resumed_after_a_lost_session_stays_exact(setup):
    """One candidate per reply, a draft whose first token often needs a correction whose first candidate is refused,
    and an edge that loses the session whenever the device asks for more: the device reopens it and asks again. A
    rejection sampler's accepted draw follows the residual norm(max(0, p - q)) however many trials it took, so the
    first tokens of the resumed requests must follow it, and all first tokens p."""
    p = setup[4]
    _, draft = _models("mid")
    sample = load_split("test", 1)[0]
    _, d_logits = draft.prefill(draft.prepare(sample.image(), sample.question))
    q = probs_from_logits(d_logits.double(), TEMPERATURE).numpy()
    tokens, info = generations(setup, "covspec", 2_000, draft="mid", lose_corrections=True, num_candidates=1)
    resumed = np.array([reopens > 0 for _, _, reopens, _ in info])
    assert resumed.sum() > 250, resumed.sum()
    residual = np.maximum(p - q, 0.0)
    pvalue, tv = fit(np.bincount(tokens[resumed, 0], minlength=len(p)).astype(float), residual / residual.sum())
    assert pvalue > 1e-3, (pvalue, tv)
    pvalue, tv = fit(np.bincount(tokens[:, 0], minlength=len(p)).astype(float), p)
    assert pvalue > 1e-3, (pvalue, tv)


TREE = dict(policy="fixed", gamma=2, tree=2, num_candidates=1)
"""Blocks of two tokens, each with two alternatives (the draft's second and third choices after the first token, then
a continuation of one token); one candidate per reply, so that corrections often need more."""


def _conditional_after_commonest_pair(setup, tokens: np.ndarray) -> tuple[float, float, int]:
    v, eos = setup[0].vocab_size, setup[0].eos_token_id
    pairs = pair_counts(tokens, v)
    pairs[eos * v : (eos + 1) * v] = pairs[eos::v] = 0  # prefixes that go on
    t0, t1 = divmod(int(np.argmax(pairs)), v)
    after = tokens[(tokens[:, 0] == t0) & (tokens[:, 1] == t1), 2]
    return *fit(np.bincount(after, minlength=v).astype(float), target_probs(setup, [t0, t1])), len(after)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fixed", "branching"])
def test_sampling_token_trees_keep_the_target_distribution(setup, variant):
    """A draft whose first token is often rejected ("mid"), blocks of two with two alternatives at each position:
    whenever the correction is an alternative's root, the device commits the edge's verdict on its continuation
    (accepted, or rejected and corrected from that alternative's candidates; then its bonus or the next block). The
    first two tokens follow the target's joint distribution, the third its conditional after the commonest pair; with
    wait-time branching on too, the alternatives' caches are grafted after the wait's."""
    settings = TREE if variant == "fixed" else {**TREE, "branch_budget": 3}
    tokens, info = generations(setup, "covspec", 4_000, max_new_tokens=3, draft="mid", **settings)
    taken = sum(i[3] for i in info)
    assert taken > 0.2 * len(info), taken  # alternatives were taken often
    pvalue, tv = fit(pair_counts(tokens, setup[0].vocab_size), pair_probs(setup).ravel())
    assert pvalue > 1e-3, (pvalue, tv)
    pvalue, tv, n = _conditional_after_commonest_pair(setup, tokens)
    assert n > 300 and pvalue > 1e-3, (pvalue, tv, n)


@pytest.mark.slow
def test_a_tree_edge_that_skips_the_continuation_test_fails(setup):
    """The same test catches an edge that accepts a taken alternative's whole continuation unchecked."""
    tokens, _ = generations(setup, "covspec", 4_000, max_new_tokens=3, draft="mid", broken_tree=True, **TREE)
    pvalue, tv = fit(pair_counts(tokens, setup[0].vocab_size), pair_probs(setup).ravel())
    assert pvalue < 1e-6, (pvalue, tv)


@pytest.mark.slow
def test_a_tree_alternative_lost_with_its_session_stays_exact(setup):
    """An edge that loses the session whenever a frame names a taken alternative (the next block, or a request for
    more of its candidates): the device reopens the session with the alternative's tokens committed and goes on
    without ``via``. The first three tokens keep the target's distribution."""
    tokens, info = generations(setup, "covspec", 3_000, max_new_tokens=3, draft="mid", lose_corrections="alternatives",
                               **TREE)  # fmt: skip
    reopened = sum(i[2] > 0 for i in info)
    assert reopened > 0.15 * len(info), reopened
    pvalue, tv = fit(pair_counts(tokens, setup[0].vocab_size), pair_probs(setup).ravel())
    assert pvalue > 1e-3, (pvalue, tv)
    pvalue, tv, n = _conditional_after_commonest_pair(setup, tokens)
    assert n > 200 and pvalue > 1e-3, (pvalue, tv, n)
