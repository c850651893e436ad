"""Merging pruned visual tokens (proportional attention): the counts, the adapters' log-count key bias, and its
meaning — a kept token with count c is attended exactly like c copies of it."""

from __future__ import annotations

import pytest
import torch

from covspec.config import PruningConfig, load_config
from covspec.data.shapes import load_split
from covspec.errors import ConfigError
from covspec.models.base import biased_causal_mask
from covspec.models.llava import LlavaAdapter
from covspec.models.tiny import TINY_SPECS, tiny_llava, tiny_qwen2_vl
from covspec.pruning import PRUNERS, JointPruner, build_pruner
from covspec.pruning.select import representation_counts


def test_counts_assign_each_dropped_token_to_its_most_similar_kept_token():
    a, b, c = torch.eye(3)
    features = torch.stack([a, a, b, b + 0.01 * c, b, c, 2 * c])  # cosine: 2*c is c
    counts = representation_counts(features, torch.tensor([0, 2, 5]))
    assert counts.tolist() == [2.0, 3.0, 2.0]
    # a kept token always represents itself, even when an identical token is kept too; the b tokens are orthogonal
    # to every kept token (a tie) and go to the first, b + 0.01 c to c
    assert representation_counts(features, torch.tensor([0, 1, 5])).tolist() == [3.0, 1.0, 3.0]
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([3, 10, 20, 44])
    counts = representation_counts(features, keep)
    assert counts.sum() == 50 and bool((counts >= 1).all())


def test_biased_causal_mask_layout():
    bias = torch.tensor([0.0, 1.0, 2.0])
    prefill = biased_causal_mask(bias, 0, 3, torch.float32)[0, 0]
    low = torch.finfo(torch.float32).min
    assert prefill.tolist() == [[0.0, low, low], [0.0, 1.0, low], [0.0, 1.0, 2.0]]
    step = biased_causal_mask(bias, 5, 2, torch.float32)[0, 0]  # 5 cached entries, then 2 new tokens
    assert step.tolist() == [[0.0, 1.0, 2.0, 0.0, 0.0, 0.0, low], [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]]


def _duplicated_logits(adapter: LlavaAdapter, inputs, keep, counts, extra: list[int]) -> torch.Tensor:
    """Logits of the unbiased model on a sequence where each kept visual token appears ``count`` times at its own
    position, the copies of one token seeing each other (so they stay identical at every layer), then ``extra``."""
    rows = LlavaAdapter.kept_positions(inputs, keep)
    embeds = adapter.embed(inputs)[rows]
    visual = inputs.image_mask[rows]
    reps = torch.ones(len(rows), dtype=torch.long)
    reps[visual] = counts.long()
    embeds = embeds.repeat_interleave(reps, dim=0)
    positions = rows.repeat_interleave(reps)
    extra_t = torch.tensor(extra, dtype=torch.long)
    embeds = torch.cat([embeds, adapter.model.get_input_embeddings()(extra_t)])
    length = int(inputs.input_ids.shape[0])
    positions = torch.cat([positions, torch.arange(length, length + len(extra))])
    group = torch.cat([torch.arange(len(rows)).repeat_interleave(reps), len(rows) + torch.arange(len(extra))])
    allowed = group[None, :] <= group[:, None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.inference_mode():
        out = adapter.model(inputs_embeds=embeds[None], position_ids=positions[None], attention_mask=mask[None, None])
    return out.logits[0, -1]


@pytest.mark.parametrize("spec", [0, 1])
def test_a_count_is_attention_to_that_many_copies_at_prefill_and_every_decode_step(spec):
    adapter = tiny_llava(TINY_SPECS[spec], 3)
    sample = load_split("test", 1, offset=4)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    n = inputs.num_visual_tokens
    keep = torch.tensor(sorted(torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 4].tolist()))
    counts = representation_counts(adapter.visual_features(inputs), keep)
    assert counts.max() > 1
    state, logits = adapter.prefill(inputs, keep, counts)
    assert torch.allclose(logits, _duplicated_logits(adapter, inputs, keep, counts, []), atol=1e-4)
    plain_state, plain = adapter.prefill(inputs, keep)
    assert not torch.allclose(logits, plain, atol=1e-3)  # the bias matters
    extra: list[int] = []
    for token in (7, 11, 5):
        extra.append(token)
        step = adapter.forward(state, torch.tensor([token]))[-1]
        assert torch.allclose(step, _duplicated_logits(adapter, inputs, keep, counts, extra), atol=1e-4), extra
    # a block of k tokens in one forward and a rollback keep the bias
    adapter.rollback(state, state.seq_len - 2)
    block = adapter.forward(state, torch.tensor(extra[1:]))
    assert torch.allclose(block[-1], _duplicated_logits(adapter, inputs, keep, counts, extra), atol=1e-4)
    # counts of one are no bias: the keep-only prefill
    _, ones = adapter.prefill(inputs, keep, torch.ones(len(keep)))
    assert torch.allclose(ones, plain, atol=1e-5)
    with pytest.raises(ValueError, match="batched"):
        adapter.forward_batch([state, plain_state], [torch.tensor([1]), torch.tensor([2])])


def test_qwen2_vl_takes_counts_too():
    adapter = tiny_qwen2_vl()
    sample = load_split("test", 1)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    n = inputs.num_visual_tokens
    keep = torch.arange(0, n, 3)
    ones_state, ones = adapter.prefill(inputs, keep, torch.ones(len(keep)))
    plain_state, plain = adapter.prefill(inputs, keep)
    assert torch.allclose(ones, plain, atol=1e-5)
    token = torch.tensor([4])
    assert torch.allclose(adapter.forward(ones_state, token), adapter.forward(plain_state, token), atol=1e-5)
    counts = representation_counts(adapter.visual_features(inputs), keep)
    state, merged = adapter.prefill(inputs, keep, counts)
    assert state.key_bias is not None and not torch.allclose(merged, plain, atol=1e-4)
    assert adapter.forward(state, torch.tensor([4])).shape == (1, adapter.vocab_size)


def test_bad_counts_are_refused():
    adapter = tiny_llava(TINY_SPECS[0], 0)
    sample = load_split("test", 1)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    keep = torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match="3 kept visual tokens"):
        adapter.prefill(inputs, keep, torch.ones(2))
    with pytest.raises(ValueError, match=">= 1"):
        adapter.prefill(inputs, keep, torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="need keep"):
        adapter.prefill(inputs, None, torch.ones(3))


def test_config_merge_key_builds_merging_pruners():
    assert load_config().pruning.merge is True
    with pytest.raises(ConfigError, match=r"pruning\.merge"):
        load_config(overrides=["pruning.merge=sometimes"])
    for method in PRUNERS:
        for merge in (True, False):
            pruner = build_pruner(PruningConfig(method=method, keep_ratio=0.25, merge=merge))
            assert pruner.merge is merge
    joint = build_pruner(PruningConfig(method="joint", keep_ratio=0.25))
    assert isinstance(joint, JointPruner) and joint.selection == "greedy"
    assert build_pruner(PruningConfig(method="joint", keep_ratio=0.25, merge=False)).selection == "stratified"
    with pytest.raises(ValueError, match="merge"):
        JointPruner(0.5, merge="yes")


def test_pruner_counts_follow_merge_and_keep():
    adapter = tiny_llava(TINY_SPECS[0], 0)
    sample = load_split("test", 1)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    merging = build_pruner(PruningConfig(method="uniform", keep_ratio=0.25))
    keep = merging.select(adapter, inputs)
    counts = merging.counts(adapter, inputs, keep)
    assert counts.shape == keep.shape and counts.sum() == inputs.num_visual_tokens
    assert merging.counts(adapter, inputs, None) is None
    plain = build_pruner(PruningConfig(method="uniform", keep_ratio=0.25, merge=False))
    assert plain.counts(adapter, inputs, keep) is None
