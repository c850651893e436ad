"""LLaVA adapter: prefill + stepwise decode equals ``model.generate``; rollback; pruned prefill."""

from __future__ import annotations

import pytest
import torch

from covspec.data.shapes import load_split
from covspec.decoding.autoregressive import generate
from covspec.errors import InputError
from covspec.models.loading import load_adapter, resolve_path
from covspec.models.tiny import TINY_SPECS, tiny_llava


def _hf_greedy(adapter, inputs, max_new_tokens: int) -> list[int]:
    out = adapter.model.generate(
        input_ids=inputs.input_ids[None],
        pixel_values=inputs.pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    new = out[0, inputs.input_ids.shape[0] :].tolist()
    return new[: new.index(adapter.eos_token_id)] if adapter.eos_token_id in new else new


@pytest.fixture(scope="module")
def toy_target():
    return load_adapter("toy-target")


@pytest.fixture(scope="module")
def toy_draft():
    return load_adapter("toy-draft", key="models.draft.path")


@pytest.mark.parametrize("role", ["toy_target", "toy_draft"])
def test_toy_greedy_matches_generate(role, request):
    adapter = request.getfixturevalue(role)
    for sample in load_split("test", 3, offset=5):
        inputs = adapter.prepare(sample.image(), sample.question)
        assert inputs.num_visual_tokens >= 144
        ours = generate(adapter, inputs, max_new_tokens=40).token_ids
        assert ours == _hf_greedy(adapter, inputs, 40)


@pytest.mark.parametrize("spec_index", range(len(TINY_SPECS)))
def test_tiny_random_greedy_matches_generate(spec_index):
    adapter = tiny_llava(TINY_SPECS[spec_index], seed=spec_index)
    for sample in load_split("val", 2):
        inputs = adapter.prepare(sample.image(), sample.question)
        ours = generate(adapter, inputs, max_new_tokens=16).token_ids
        theirs = _hf_greedy(adapter, inputs, 16)
        assert ours == theirs
        assert len(set(theirs)) > 1 or len(theirs) < 3, "random model too degenerate to test anything"


def test_verify_k_tokens_matches_single_steps():
    adapter = tiny_llava(TINY_SPECS[2], seed=3)
    sample = load_split("test", 1)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    tokens = torch.tensor([7, 9, 11, 13, 8])
    state, _ = adapter.prefill(inputs)
    block = adapter.forward(state, tokens)  # [5, V]
    state2, _ = adapter.prefill(inputs)
    singles = torch.stack([adapter.forward(state2, tokens[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(block, singles, atol=1e-4, rtol=1e-4)
    assert torch.equal(block.argmax(-1), singles.argmax(-1))


def test_rollback_matches_fresh_prefill():
    adapter = tiny_llava(TINY_SPECS[0], seed=1)
    sample = load_split("test", 1)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    state, _ = adapter.prefill(inputs)
    prompt_len = state.seq_len
    adapter.forward(state, torch.tensor([5, 6, 7, 8]))
    adapter.rollback(state, prompt_len + 1)  # keep the first drafted token, reject the rest
    after_rollback = adapter.forward(state, torch.tensor([9, 10]))
    fresh, _ = adapter.prefill(inputs)
    expected = adapter.forward(fresh, torch.tensor([5, 9, 10]))[1:]
    torch.testing.assert_close(after_rollback, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="roll forward"):
        adapter.rollback(state, state.seq_len + 1)


def test_pruned_prefill_keeps_original_positions():
    """Keeping every visual token through the pruned path equals the unpruned prefill."""
    adapter = tiny_llava(TINY_SPECS[0], seed=2)
    sample = load_split("test", 1)[0]
    inputs = adapter.prepare(sample.image(), sample.question)
    n = inputs.num_visual_tokens
    full_state, full_logits = adapter.prefill(inputs)
    _all_state, all_logits = adapter.prefill(inputs, keep=torch.arange(n))
    torch.testing.assert_close(full_logits, all_logits, atol=1e-5, rtol=1e-5)
    half_state, _ = adapter.prefill(inputs, keep=torch.arange(0, n, 2))
    assert half_state.seq_len == full_state.seq_len
    assert half_state.cache_len == full_state.seq_len - n // 2
    step = adapter.forward(half_state, torch.tensor([5]))
    assert step.shape == (1, adapter.vocab_size)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a checkpoint directory"):
        resolve_path(str(tmp_path / "empty"), key="models.draft.path")


def test_prefill_fused_equals_prefill_then_forward(toy_target):
    """The edge's first round in one forward (prompt + block, chain or token tree) equals prefill, then verify."""
    from covspec.models import checks as C

    a, b = (toy_target.prepare(s.image(), s.question) for s in load_split("test", 2, offset=3))
    assert a.input_ids.shape != b.input_ids.shape  # prompts of different lengths: the batched rows are padded
    C.check_prefill_fused(toy_target, a, b)
    with pytest.raises(C.CheckFailed, match="block rows"):  # it can fail: a block scored in the wrong order
        original = toy_target.prefill_fused

        def shifted(inputs, tokens, parents=None):
            state, rows = original(inputs, tokens[[1, 0, *range(2, len(tokens))]], parents)
            return state, rows

        toy_target.prefill_fused = shifted
        try:
            C.check_prefill_fused(toy_target, a)
        finally:
            del toy_target.prefill_fused
