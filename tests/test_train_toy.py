"""The toy pair's training helpers: which shape a question refers to, which visual tokens it covers, and the
auxiliary losses (per-patch probe, attention guide) that ``pipelines/train_toy.py`` adds to the answer loss."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from covspec.data.shapes import IMAGE_SIZE, KINDS, Sample, make_sample, questions
from covspec.models import toy
from covspec.models.loading import BUILTIN
from pipelines.train_toy import (
    AttentionGuide,
    PatchProbe,
    collate,
    collate_packed,
    expand_layers,
    main,
    patch_labels,
    referent,
    scene_qas,
    shape_patches,
)

PATCH = toy.PATCH_SIZE
SIDE = IMAGE_SIZE // PATCH


def _lit_patches(sample) -> set[int]:
    """Row-major indices of the patches with any non-black pixel in the rendered image."""
    pixels = np.asarray(sample.image()).sum(-1) > 0
    return {r * SIDE + c for r in range(SIDE) for c in range(SIDE)
            if pixels[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].any()}  # fmt: skip


@pytest.mark.parametrize("index", range(12))
def test_shape_patches_are_exactly_the_drawn_patches(index: int):
    sample = make_sample("train", index)
    covered = [set(shape_patches(s, PATCH)) for s in sample.scene.shapes]
    assert all(len(c) == 4 for c in covered)
    assert set().union(*covered) == _lit_patches(sample)
    labels = patch_labels([sample], PATCH)[0]
    assert {int(i) for i in labels.nonzero().flatten()} == _lit_patches(sample)


@pytest.mark.parametrize("kind", KINDS)
def test_referent_is_the_shape_the_answer_names(kind: str):
    for index in range(30):
        sample = make_sample("train", index, kind=kind)
        shape = referent(sample)
        if kind in ("count", "describe"):
            assert shape is None
            continue
        assert shape in sample.scene.shapes
        # the answer states the referent's attributes (the asked one included)
        assert shape.color in sample.answer and shape.kind in sample.answer
        if kind == "position":
            assert sample.answer.endswith(f"in the {shape.position}.")


def _tiny_llava(seed: int, layers: int = 2) -> LlavaForConditionalGeneration:
    """A random toy-shaped LLaVA (the toy tokenizer and processor), small enough for a unit test."""
    torch.manual_seed(seed)
    toy.TOY_SIZES["tiny-test"] = {"v_hidden": 32, "v_layers": 1, "v_heads": 2, "hidden": 32, "layers": layers,
                                  "heads": 2, "inter": 64}  # fmt: skip
    try:
        return LlavaForConditionalGeneration(toy.toy_config("tiny-test"))
    finally:
        del toy.TOY_SIZES["tiny-test"]


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_llava(seed=0)


def test_attention_guide_loss_is_minus_log_mass_on_the_referent(tiny_model):
    processor = toy.build_processor()
    samples = [make_sample("train", i, kind=k) for i, k in enumerate(["color", "count", "position"])]
    batch = collate(processor, samples)
    guide = AttentionGuide(tiny_model, layer=1)
    tiny_model(**batch)
    assert guide.weights is not None and guide.weights.shape[0] == 3
    # the captured weights are the layer's real attention: rows sum to one
    assert torch.allclose(guide.weights.sum(-1)[batch["attention_mask"].bool()], torch.ones(()), atol=1e-5)

    # replace the attention by one that puts mass m on the referent's patches at every answer position
    weights = torch.zeros_like(guide.weights)
    image_token = tiny_model.config.image_token_index
    for b, sample in enumerate(samples):
        image_pos = (batch["input_ids"][b] == image_token).nonzero().flatten()
        shape = referent(sample)
        if shape is not None:
            weights[b, :, image_pos[shape_patches(shape)]] = 0.25 * (0.5 if b == 0 else 0.9)
    guide.weights = weights
    expected = (-torch.log(torch.tensor(0.5)) - torch.log(torch.tensor(0.9))) / 2  # count has no referent
    assert torch.isclose(guide.loss(batch, samples), expected, atol=1e-6)
    assert guide.loss(batch, [samples[1]] * 3) is None  # nothing to guide

    # and on the real weights the loss is differentiable into the language model
    tiny_model(**batch)
    loss = guide.loss(batch, samples)
    loss.backward()
    grad = tiny_model.model.language_model.layers[1].self_attn.q_proj.weight.grad
    assert loss.item() > 0 and grad is not None and grad.abs().sum() > 0
    # only the guided layer runs eager attention; the model's config (what save_pretrained writes) is untouched
    assert tiny_model.config.text_config._attn_implementation != "eager"
    assert tiny_model.model.language_model.layers[0].self_attn.config._attn_implementation != "eager"


def test_patch_probe_learns_the_patch_classes(tiny_model):
    """The probe's loss falls when trained on a fixed batch: the labels are learnable from the tower's features."""
    processor = toy.build_processor()
    samples = [make_sample("train", i) for i in range(8)]
    batch = collate(processor, samples)
    probe = PatchProbe(tiny_model)
    opt = torch.optim.Adam(list(tiny_model.parameters()) + list(probe.parameters()), lr=3e-3)
    losses = []
    for _ in range(30):
        tiny_model.model.vision_tower(batch["pixel_values"])
        loss = probe.loss(patch_labels(samples, PATCH))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_scene_qas_covers_every_kind_first_and_only_real_questions():
    rng = random.Random(0)
    for index in range(20):
        scene = make_sample("train", index).scene
        everything = {(k, q, a) for k in KINDS for q, a in questions(scene, k)}
        qas = scene_qas(scene, rng, limit=100)
        assert {(qa.kind, qa.question, qa.answer) for qa in qas} == everything and len(qas) == len(everything)
        kinds_present = {k for k, _, _ in everything}
        first = scene_qas(scene, rng, limit=len(kinds_present))
        assert {qa.kind for qa in first} == kinds_present  # a short pack still sees every kind the scene has
        assert len(scene_qas(scene, rng, limit=2)) == 2


def test_packed_rows_give_each_question_the_logits_and_loss_of_its_own_sequence():
    """Packing several questions about one image in a row (block mask + restarted positions) is exact: every
    answer token gets the logits it gets in its single-question row, and the loss is the same mean."""
    model = _tiny_llava(seed=1).eval()
    processor = toy.build_processor()
    rng = random.Random(3)
    packs = [(make_sample("train", i).scene, None) for i in (4, 9)]
    packs = [(scene, scene_qas(scene, rng, limit=n)) for (scene, _), n in zip(packs, (5, 2), strict=True)]
    packed = collate_packed(processor, packs)
    singles = [Sample(f"x{j}", "train", qa.kind, qa.question, qa.answer, scene)
               for scene, qas in packs for j, qa in enumerate(qas)]  # fmt: skip
    single = collate(processor, singles)
    with torch.no_grad():
        out_p = model(**packed)
        out_s = model(**single)
    assert torch.allclose(out_p.loss, out_s.loss, atol=1e-5)
    # answer-token logits, in order, from both layouts (the logit at t predicts the label at t + 1)
    got = torch.cat([out_p.logits[b, :-1][packed["labels"][b, 1:] != -100] for b in range(len(packs))])
    want = torch.cat([out_s.logits[b, :-1][single["labels"][b, 1:] != -100] for b in range(len(singles))])
    assert got.shape == want.shape and got.shape[0] > 20
    assert torch.allclose(got, want, atol=1e-4)
    # the image is prefilled once per row: one row per image, shorter than the singles laid end to end
    assert packed["input_ids"].shape[0] == 2
    assert int((packed["input_ids"] == processor.tokenizer.convert_tokens_to_ids(toy.IMAGE)).sum()) == 2 * 144


def test_expanded_model_computes_what_the_original_did_and_reloads(tmp_path):
    """Block expansion deepens the language model without changing its outputs (full forward and KV-cached greedy
    decoding), and the saved model loads with plain transformers at the new depth."""
    model = _tiny_llava(seed=2, layers=3).eval()
    processor = toy.build_processor()
    batch = collate(processor, [make_sample("val", i) for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prompt = {k: v[:1] for k, v in collate(processor, [make_sample("val", 7)]).items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
        gen_before = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    inserted = expand_layers(model, 5)
    assert len(model.model.language_model.layers) == 5 and len(inserted) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.language_model.layers] == list(range(5))
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-6)
        assert torch.equal(model.generate(**prompt, max_new_tokens=6, do_sample=False), gen_before)
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.text_config.num_hidden_layers == 5
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, before, atol=1e-6)
    with pytest.raises(ValueError, match="fewer than the 5 layers"):
        expand_layers(model, 4)
    with pytest.raises(ValueError, match="at most doubles the 5 layers of the model"):
        expand_layers(model, 11)


def test_vision_from_copies_the_tower_and_refuses_another_shape(tmp_path, capsys):
    """``--vision-from`` starts the draft's vision tower from a checkpoint's (frozen with ``--freeze-vision``: after
    training steps it is still that checkpoint's), and a tower of another shape is refused naming the checkpoint."""
    out = tmp_path / "draft"
    args = ["--role", "draft", "--vision-from", str(BUILTIN["toy-target"]), "--freeze-vision", "--patch-loss", "0",
            "--steps", "2", "--eval-every", "2", "--eval-samples", "2", "--warmup", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    trained = LlavaForConditionalGeneration.from_pretrained(out).model.vision_tower.state_dict()
    source = LlavaForConditionalGeneration.from_pretrained(BUILTIN["toy-target"]).model.vision_tower.state_dict()
    assert trained.keys() == source.keys() and all(torch.equal(trained[k], source[k]) for k in source)
    assert json.loads((out / "training.json").read_text())["segments"][-1]["freeze_vision"] is True
    other = tmp_path / "other"
    _tiny_llava(seed=6).save_pretrained(other)
    with pytest.raises(SystemExit) as exit_info:
        main(["--role", "draft", "--vision-from", str(other), "--steps", "1", "--out", str(tmp_path / "no")])
    assert exit_info.value.code == 2
    assert f"--vision-from {other}: its vision tower does not have this model's shape" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_count_vision_time_adds_the_tower_checkpoints_training_time_and_segments(tmp_path, capsys):
    """``--count-vision-time``: the --vision-from checkpoint was trained only for its tower, so its recorded time and
    segments start this model's record (a recipe's total is then read off the final checkpoints). Without
    --vision-from, from a checkpoint with no training record, or with --init (a continuation already has a record),
    it is refused naming the problem."""
    tower = tmp_path / "tower"
    common = ["--role", "draft", "--steps", "2", "--eval-every", "2", "--eval-samples", "2", "--warmup", "1"]
    assert main([*common, "--out", str(tower)]) == 0
    record = json.loads((tower / "training.json").read_text())
    record["train_seconds"] = 600.0  # a stage of known length, so that the sum is unambiguous
    (tower / "training.json").write_text(json.dumps(record))
    out = tmp_path / "model"
    assert main([*common, "--vision-from", str(tower), "--count-vision-time", "--out", str(out)]) == 0
    meta = json.loads((out / "training.json").read_text())
    assert meta["vision_time_counted"] is True
    assert 600.0 < meta["train_seconds"] < 600.0 + 300.0
    first, last = meta["segments"]
    assert first["vision_tower_from"] == str(tower) and first["seconds"] == 600.0 and first["steps"] == 2
    assert first["segments"] == record["segments"]
    assert last["steps"] == 2 and last["seconds"] < 300.0
    plain = tmp_path / "plain"
    assert main([*common, "--vision-from", str(tower), "--out", str(plain)]) == 0
    assert json.loads((plain / "training.json").read_text())["train_seconds"] < 300.0  # not counted by default
    (tower / "training.json").unlink()
    for extra, message in (
        ([], "--count-vision-time needs --vision-from"),
        (["--vision-from", str(tower)], f"no {tower / 'training.json'} (no training time"),
        (["--vision-from", str(out), "--init", str(out)], "it cannot be combined with --init"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *extra, "--count-vision-time", "--out", str(tmp_path / "no")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "no").exists()


def test_bf16_training_step_matches_fp32_and_saves_a_float32_checkpoint(tmp_path):
    """``--precision bf16`` (CPU autocast, eager attention) computes the loss and gradients of the fp32 step up to
    bfloat16 rounding, on packed rows too, and a bf16 run saves float32 weights whose config does not pin eager
    attention, loadable with plain transformers."""
    model = _tiny_llava(seed=4)
    processor = toy.build_processor()
    rng = random.Random(5)
    packs = [(make_sample("train", i).scene, None) for i in (1, 2)]
    packed = collate_packed(processor, [(scene, scene_qas(scene, rng, limit=4)) for scene, _ in packs])
    single = collate(processor, [make_sample("train", i) for i in range(4)])
    for batch in (single, packed):
        grads = {}
        for precision in ("fp32", "bf16"):
            model.zero_grad()
            model.set_attn_implementation("eager" if precision == "bf16" else "sdpa")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            grads[precision] = (loss.detach(), flat)
        (loss32, g32), (loss16, g16) = grads["fp32"], grads["bf16"]
        assert abs(float(loss16 - loss32)) < 0.02 * float(loss32)
        assert float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)) > 0.99
    out = tmp_path / "draft"
    assert main(["--role", "draft", "--steps", "2", "--eval-every", "2", "--eval-samples", "2", "--warmup", "1",
                 "--precision", "bf16", "--out", str(out)]) == 0  # fmt: skip
    meta = json.loads((out / "training.json").read_text())
    assert meta["precision"] == "bf16" and meta["segments"][-1]["precision"] == "bf16"
    assert "eager" not in (out / "config.json").read_text()
    reloaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    assert reloaded.config.text_config._attn_implementation != "eager"


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--init", str(BUILTIN["toy-target"]), "--lm-layers", "4"], "fewer than the 8 layers"),
     (["--init", "no/such/dir"], "no checkpoint there"),
     (["--pack", "-1"], "--pack must be >= 0"),
     (["--steps", "5", "--stop-at", "6"], "--stop-at must be in 1..--steps (5), got 6"),
     (["--vision-from", "no/such/dir"], "--vision-from no/such/dir: no checkpoint there")],
)  # fmt: skip
def test_bad_training_arguments_exit_2_naming_the_problem(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--role", "target", "--steps", "1", "--out", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
