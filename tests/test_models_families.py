"""Model families beyond the toy LLaVA: Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision (tiny random weights).

Each family passes the shared adapter checks (``covspec.models.checks``: greedy = ``model.generate``, k-token
verification = k steps, rollback, pruned-prefill positions, ``prepare_from_ids``, batched verification), covspec
greedy through the engine equals target-only greedy with and without draft pruning, and loading by path dispatches
on ``model_type``.
"""

from __future__ import annotations

import pytest
import torch

from covspec.data.shapes import load_split
from covspec.errors import InputError
from covspec.models import checks as C
from covspec.models.llava_next import LlavaNextAdapter
from covspec.models.loading import load_adapter
from covspec.models.qwen2_vl import MRopeState, Qwen2VLAdapter
from covspec.models.tiny import TINY_FAMILIES
from covspec.pruning import PRUNERS, JointPruner
from covspec.pruning import scores as S
from covspec.pruning.probe import probe_attention, question_rows
from covspec.pruning.select import num_kept, stratified_top, weighted_sum

NEW = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
BLOCK = torch.tensor([7, 9, 11, 13, 8])


@pytest.fixture(scope="module")
def adapters():
    """Per family: a target (seed 1) and a draft (seed 2), built once."""
    torch.set_num_threads(1)  # as the toy_pair fixture: tiny models on a shared 2-core machine
    return {family: (TINY_FAMILIES[family](1), TINY_FAMILIES[family](2)) for family in NEW}


@pytest.fixture(scope="module")
def prompts():
    """(image, question) pairs: two square images and a non-square one (anyres unpadding, a 3 x 4 Qwen grid)."""
    samples = load_split("test", 2, offset=1)
    return [(s.image(), s.question) for s in samples] + [(samples[0].image().resize((96, 64)), samples[0].question)]


# -- adapter equivalences --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW)
def test_greedy_matches_generate(adapters, prompts, family):
    target, _ = adapters[family]
    for image, question in (prompts[0], prompts[2]):
        tokens = C.check_greedy(target, target.prepare(image, question), max_new_tokens=8)
        assert len(tokens) >= 3 and len(set(tokens)) > 1, "random model too degenerate to test anything"


@pytest.mark.parametrize("family", NEW)
def test_verify_rollback_and_pruned_positions(adapters, prompts, family):
    target, _ = adapters[family]
    square, wide = target.prepare(*prompts[0]), target.prepare(*prompts[2])
    C.check_verify_block(target, square, BLOCK)
    C.check_rollback(target, wide, BLOCK)
    C.check_pruned_prefill(target, square, torch.arange(0, square.num_visual_tokens, 3), BLOCK)
    n = wide.num_visual_tokens
    random_keep = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: n // 4].sort().values
    C.check_pruned_prefill(target, wide, random_keep, BLOCK)
    C.check_pruned_prefill(target, wide, torch.tensor([n - 1]), BLOCK)


@pytest.mark.parametrize("family", NEW)
def test_prepare_from_ids_round_trips(adapters, prompts, family):
    target, _ = adapters[family]
    for image, question in prompts:
        C.check_prepare_from_ids(target, image, question)


@pytest.mark.parametrize("family", NEW)
def test_forward_batch_matches_single_sessions(adapters, prompts, family):
    target, _ = adapters[family]
    if not hasattr(target, "forward_batch"):
        pytest.skip(f"{type(target).__name__} has no forward_batch")
    inputs = [target.prepare(image, question) for image, question in prompts]
    C.check_forward_batch(target, inputs, [BLOCK[:2], BLOCK, BLOCK[:1]])


@pytest.mark.parametrize("family", NEW)
def test_engine_covspec_greedy_equals_target_only(adapters, family):
    target, draft = adapters[family]
    samples = load_split("test", 2, offset=1)
    C.check_engine_greedy(target, draft, samples, max_new_tokens=8)  # a random draft: rejections
    C.check_engine_greedy(target, draft, samples, max_new_tokens=8, pruning="joint", keep_ratio=0.25)
    own = C.check_engine_greedy(target, target, samples, max_new_tokens=8)
    assert all(r["num_accepted"] == r["num_drafted"] for r in own)  # the target drafting for itself: all accepted
    pruned = C.check_engine_greedy(target, target, samples, max_new_tokens=8, pruning="joint", keep_ratio=0.25)
    assert any(r["num_accepted"] > 0 for r in pruned)
    if family.startswith("qwen"):  # branches are grafted back into the cache: positions must follow the offset
        # wait-time branches; blocks of at most 3 tokens, so that 8 tokens take several rounds whatever the timing
        adaptive = ("drafting.policy=adaptive", "drafting.gamma_max=3", "branching.budget=4", "branching.tree=0")
        # a 30 ms round trip: every wait is long enough to draft branches in, whatever the host's load
        branched = C.check_engine_greedy(target, target, samples, 8, "joint", 0.25, overrides=adaptive, rtt_ms=30.0)
        assert sum(r["branch_hits"] for r in branched) > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_every_listed_eos_id_ends_generation(prompts, family):
    """Qwen2 chat checkpoints list two EOS ids; make a token the model emits mid-answer the second: the adapter, the
    engine (target drafting for itself, so blocks run through the EOS) and ``model.generate`` all stop there."""
    model = TINY_FAMILIES[family](1)
    image, question = prompts[0]
    full = C.check_greedy(model, model.prepare(image, question), max_new_tokens=8)
    stop = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    model.model.generation_config.eos_token_id = [model.eos_token_id, full[stop]]
    adapter = type(model)(model.model, model.processor)
    assert adapter.eos_token_ids == {model.eos_token_id, full[stop]}
    assert C.check_greedy(adapter, adapter.prepare(image, question), max_new_tokens=8) == full[:stop]
    sample = load_split("test", 1, offset=1)[0]
    assert sample.image().tobytes() == image.tobytes()
    rows = C.check_engine_greedy(adapter, adapter, [sample], max_new_tokens=8)
    assert rows[0]["tokens"] == full[:stop]


# -- Qwen2-VL: M-RoPE positions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_follow_the_merged_grid(adapters, prompts, family):
    target, _ = adapters[family]
    image, question = prompts[2]  # 96 x 64 -> 3 x 4 merged tokens
    inputs = target.prepare(image, question)
    assert target.visual_grid(inputs) == (3, 4) and inputs.num_visual_tokens == 12 == target.image_tokens(image)
    pos, rope_delta = target.mrope(inputs)  # [3, L], int
    visual = pos[:, inputs.image_mask]  # [3, 12]
    start = int(visual[0, 0])
    assert visual[0].tolist() == [start] * 12  # one temporal position
    assert visual[1].tolist() == [start + r for r in range(3) for _ in range(4)]  # rows
    assert visual[2].tolist() == [start + c for _ in range(3) for c in range(4)]  # columns
    length = inputs.input_ids.shape[0]
    assert rope_delta == int(pos.max()) + 1 - length < 0
    state, _ = target.prefill(inputs, keep=torch.tensor([0, 5, 11]))
    assert isinstance(state, MRopeState) and state.pruned == 9
    assert state.seq_len + state.rope_delta == int(pos.max()) + 1  # the next token's position


def test_qwen_pruned_check_catches_wrong_decode_positions(adapters, prompts, monkeypatch):
    """Decoding at ``seq_len`` (1-D style, ignoring the M-RoPE offset) is what ``check_pruned_prefill`` must catch."""
    target, _ = adapters["qwen2_5_vl"]
    inputs = target.prepare(*prompts[0])
    keep = torch.arange(0, inputs.num_visual_tokens, 2)
    C.check_pruned_prefill(target, inputs, keep, BLOCK)
    monkeypatch.setattr(target, "_positions", lambda state, k: torch.arange(state.seq_len, state.seq_len + k))
    with pytest.raises(C.CheckFailed):
        C.check_pruned_prefill(target, inputs, keep, BLOCK)


def test_qwen_sessions_do_not_share_rope_offsets(adapters, prompts):
    """One model, two interleaved sessions with different offsets: each decodes as if it were alone."""
    target, _ = adapters["qwen2_vl"]
    a, b = target.prepare(*prompts[0]), target.prepare(*prompts[2])
    assert target.mrope(a)[1] != target.mrope(b)[1]
    state_a, _ = target.prefill(a)
    state_b, _ = target.prefill(b, keep=torch.arange(0, b.num_visual_tokens, 2))
    target.forward(state_b, BLOCK[:2])
    interleaved = target.forward(state_a, BLOCK[:2])
    alone, _ = target.prefill(a)
    torch.testing.assert_close(interleaved, target.forward(alone, BLOCK[:2]), atol=1e-5, rtol=1e-5)


def test_qwen_prompt_with_two_image_runs_is_refused_at_prefill(adapters, prompts):
    """The edge turns a prefill ValueError into a protocol error; prepare_from_ids itself must not raise."""
    target, _ = adapters["qwen2_vl"]
    image, question = prompts[0]
    ids = target.prepare(image, question).input_ids.tolist()
    inputs = target.prepare_from_ids(image, ids + ids[ids.index(target.image_token_id) :])
    with pytest.raises(ValueError, match="image placeholders"):
        target.prefill(inputs)


@pytest.mark.parametrize("layer", [0, 1])
def test_probe_attention_matches_qwen_eager_attention(adapters, prompts, layer):
    """The pruning probe uses the adapter's M-RoPE positions: equal to the model's own attention weights."""
    target, _ = adapters["qwen2_5_vl"]
    inputs = target.prepare(*prompts[2])
    rows = question_rows(inputs)
    ours = probe_attention(target, inputs, layer, rows)  # [heads, T, L]
    model = target.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**target.model_inputs(inputs), output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.allclose(ours, out.attentions[layer][0][:, rows].float(), atol=1e-5)


@pytest.mark.parametrize("family", NEW)
def test_pruners_select_valid_tokens(adapters, prompts, family):
    target, _ = adapters[family]
    image, question = prompts[2]
    n = target.prepare(image, question).num_visual_tokens
    for name, cls in PRUNERS.items():
        for ratio in (0.5, 0.25):
            keep = cls(ratio).select(target, target.prepare(image, question))
            assert keep.shape == (num_kept(n, ratio),), name
            assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep) and keep.max() < n
    if family.startswith("qwen"):  # the joint pruner's stratified lattice follows the merged grid (3 x 4)
        pruner, inputs = JointPruner(0.5), target.prepare(image, question)
        gram = S.cosine_gram(target.visual_features(inputs))
        joint = weighted_sum(pruner.scores(target, inputs, gram), pruner.weights)
        assert torch.equal(pruner.select(target, inputs), stratified_top(joint, 6, (3, 4)))


# -- LLaVA-NeXT / OneVision: packed features ---------------------------------------------------------------------


def test_llava_next_visual_tokens_are_the_packed_features(adapters, prompts):
    """Base tile, then each unpadded row of the tile grid followed by the learned newline token."""
    target, _ = adapters["llava_next"]
    image, question = prompts[0]  # 96 x 96 -> 2 x 2 tiles of 4 x 4 patches
    inputs = target.prepare(image, question)
    assert inputs.num_visual_tokens == 16 + 8 * (8 + 1) == target.image_tokens(image)
    features = target.visual_features(inputs)
    newline = target.model.model.image_newline
    for row in range(8):
        assert torch.equal(features[16 + 9 * row + 8], newline.to(features.dtype))
    wide = target.prepare(*prompts[2])  # 96 x 64: rows of padding are unpadded away
    assert wide.num_visual_tokens < inputs.num_visual_tokens


def test_onevision_pools_grids_beyond_anyres_max(adapters, prompts):
    target, _ = adapters["llava_onevision"]
    image, question = prompts[0]  # 96 x 96 -> 4 x 4 tiles (16 x 16 patches), pooled to 12 x 12 (anyres_max_9)
    inputs = target.prepare(image, question)
    assert inputs.num_visual_tokens == 16 + 12 * (12 + 1) == target.visual_features(inputs).shape[0]


# -- loading and the pair check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW)
def test_load_adapter_dispatches_on_model_type(adapters, prompts, family, tmp_path):
    target, _ = adapters[family]
    target.model.save_pretrained(tmp_path)
    target.processor.save_pretrained(tmp_path)
    loaded = load_adapter(str(tmp_path), key="models.draft.path")
    assert type(loaded) is type(target) and loaded.image_token_id == target.image_token_id
    assert isinstance(loaded, LlavaNextAdapter if family.startswith("llava") else Qwen2VLAdapter)
    image, question = prompts[2]
    ours, theirs = target.prepare(image, question), loaded.prepare(image, question)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    torch.testing.assert_close(target.prefill(ours)[1], loaded.prefill(theirs)[1])
    half = load_adapter(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_loading_errors_name_the_key(adapters, tmp_path):
    from transformers import LlamaConfig

    target, _ = adapters["qwen2_vl"]
    target.model.config.save_pretrained(tmp_path / "no-processor")
    with pytest.raises(InputError, match=r"models\.draft\.path: cannot load the processor"):
        load_adapter(str(tmp_path / "no-processor"), key="models.draft.path")
    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path / "text-only")
    with pytest.raises(InputError, match=r"models\.target\.path: unsupported model type 'llama'.*qwen2_5_vl"):
        load_adapter(str(tmp_path / "text-only"))


def test_truncated_weights_are_an_input_error_naming_the_key(tmp_path):
    """safetensors raises its own error class, which used to escape as a traceback."""
    import shutil

    from covspec.models.loading import BUILTIN

    shutil.copytree(BUILTIN["toy-draft"], tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(InputError, match=r"^models\.draft\.path: cannot load the weights of '.*draft': "):
        load_adapter(str(tmp_path / "draft"), key="models.draft.path")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_pair_with_padded_lm_heads(family):
    """Like Qwen2.5-VL-3B (151,936 LM-head rows) drafting for 7B (152,064): one tokenizer, different head widths."""
    import dataclasses

    from covspec.models.tiny import ONEVISION, TinyQwenSpec, tiny_llava_next, tiny_qwen2_vl

    if family == "qwen2_5_vl":
        target = tiny_qwen2_vl(TinyQwenSpec(lm_head_pad=64), seed=1)
    else:
        target = tiny_llava_next(dataclasses.replace(ONEVISION, lm_head_pad=64), seed=1)
    draft = TINY_FAMILIES[family](2)
    assert target.model.config.text_config.vocab_size == draft.model.config.text_config.vocab_size + 64
    assert target.vocab_size == draft.vocab_size == len(target.tokenizer)
    sample = load_split("test", 1, offset=1)[0]
    state, logits = target.prefill(target.prepare(sample.image(), sample.question))
    assert logits.shape == (target.vocab_size,) and target.forward(state, BLOCK).shape == (5, target.vocab_size)
    C.check_engine_greedy(target, draft, [sample], max_new_tokens=6, pruning="joint", keep_ratio=0.25)


def test_the_pair_check_from_files_agrees_with_the_adapters_on_logit_width(tmp_path):
    """check_pair_files reads no weights, yet it sizes the logits as the adapters do: a Qwen2.5-VL pair whose LM heads
    are padded differently passes (both cut to the tokenizer), a LLaVA target with a wider head (not cut) does not."""
    import json
    import shutil

    from covspec.config import ModelConfig
    from covspec.models.loading import BUILTIN, check_pair_files
    from covspec.models.tiny import TinyQwenSpec, tiny_qwen2_vl
    from covspec.runtime.engine import check_pair

    padded, plain = tiny_qwen2_vl(TinyQwenSpec(lm_head_pad=64), seed=1), TINY_FAMILIES["qwen2_5_vl"](2)
    for name, adapter in (("target", padded), ("draft", plain)):
        adapter.model.save_pretrained(tmp_path / name)
        adapter.processor.save_pretrained(tmp_path / name)
    check_pair(padded, plain)
    check_pair_files(ModelConfig(path=str(tmp_path / "target")), ModelConfig(path=str(tmp_path / "draft")))

    wide = tmp_path / "wide-target"
    shutil.copytree(BUILTIN["toy-target"], wide, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((wide / "config.json").read_text())
    config["text_config"]["vocab_size"] += 8
    (wide / "config.json").write_text(json.dumps(config))
    n = config["text_config"]["vocab_size"] - 8  # the toy pair's vocabulary
    with pytest.raises(InputError) as info:
        check_pair_files(ModelConfig(path=str(wide)), ModelConfig(path="toy-draft"))
    assert str(info.value).startswith(f"models.draft.path and models.target.path score different vocabularies ({n} "
                                      f"vs {n + 8} ids) over the same tokenizer")  # fmt: skip


def test_check_pair_refuses_families_with_other_tokenizers(adapters):
    from covspec.runtime.engine import check_pair

    qwen, _ = adapters["qwen2_5_vl"]
    llava, _ = adapters["llava_next"]
    check_pair(qwen, adapters["qwen2_vl"][0])  # Qwen2-VL and Qwen2.5-VL share the tokenizer here
    with pytest.raises(InputError, match=r"models\.draft\.path and models\.target\.path have different tokenizers"):
        check_pair(qwen, llava)


# -- the GPU smoke script ----------------------------------------------------------------------------------------


def test_gpu_smoke_skips_without_cuda(monkeypatch, capsys):
    from pipelines import gpu_smoke

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main([]) == 0
    assert "skipped: CUDA is not available" in capsys.readouterr().out


def test_gpu_smoke_runs_its_checks_on_cpu(capsys):
    from pipelines import gpu_smoke

    assert gpu_smoke.main(["--device", "cpu", "--families", "qwen2_5_vl", "--samples", "1", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "qwen2_5_vl" in out and "verify-5 ms" in out and "ok" in out


def test_gpu_smoke_reports_a_failing_check(monkeypatch, capsys):
    from pipelines import gpu_smoke

    def broken(*args, **kwargs):
        raise C.CheckFailed("greedy: injected")

    monkeypatch.setattr(C, "check_greedy", broken)
    argv = ["--device", "cpu", "--families", "llava_next", "--samples", "1", "--tokens", "4"]
    assert gpu_smoke.main(argv) == 1
    assert "adapter FAILED: CheckFailed: greedy: injected" in capsys.readouterr().out


@pytest.mark.parametrize("family", NEW)
def test_prefill_batch_matches_single_prefills(adapters, prompts, family):
    """Several prompts of different lengths (and tile layouts) prefilled in one forward, as an edge batches new
    sessions: the same last rows and cache lengths as one prefill each."""
    target, _ = adapters[family]
    inputs = [target.prepare(image, question) for image, question in prompts]
    for (state, logits), x in zip(target.prefill_batch(inputs), inputs, strict=True):
        ref, ref_logits = target.prefill(x)
        assert logits.shape == ref_logits.shape and state.seq_len == ref.seq_len
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", NEW)
def test_prefill_fused_equals_prefill_then_forward(adapters, prompts, family):
    target, _ = adapters[family]
    square, wide = target.prepare(*prompts[0]), target.prepare(*prompts[2])
    C.check_prefill_fused(target, square, wide)
    C.check_prefill_fused(target, wide, square)


@pytest.mark.parametrize("family", NEW)
def test_token_tree_scores_every_branch_as_its_chain(adapters, prompts, family):
    target, _ = adapters[family]
    C.check_tree_verify(target, target.prepare(*prompts[0]), target.prepare(*prompts[2]))
