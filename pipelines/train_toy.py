"""Train the embedded toy VLM pair (draft and target) on the shapes benchmark, on CPU.

The shipped pair was made like this, in bfloat16 steps where it pays (each checkpoint's ``training.json`` lists its
segments, the tower stage included):

    # 1. a vision tower: a draft-sized model (1-layer language model) trained from scratch with the patch probe;
    #    only its tower is kept
    python pipelines/train_toy.py --role draft --pack 16 --batch-size 16 --precision bf16 --steps 1500 \
        --eval-every 250 --out tower
    # 2. the target: that tower (trained further) under a new 8-layer language model, packed; --count-vision-time
    #    adds stage 1's time to the target's record
    python pipelines/train_toy.py --role target --vision-from tower --count-vision-time --pack 16 --batch-size 16 \
        --precision bf16 --steps 2000 --eval-every 250 --out covspec/assets/toy-target
    # 3. the draft: the target's tower (trained further, with the probe) under a new 1-layer language model,
    #    packed; the 2,000-step schedule is stopped halfway, as for the draft before it (docs/toy-models.md)
    python pipelines/train_toy.py --role draft --vision-from covspec/assets/toy-target --pack 16 --batch-size 16 \
        --steps 2000 --stop-at 1000 --eval-every 500 --threads 1 --out covspec/assets/toy-draft

Both roles are ``LlavaForConditionalGeneration`` built from ``covspec.models.toy.toy_config``.
Training samples are drawn fresh from the train split (the generator is deterministic by index),
with a question-kind mix weighted towards the harder kinds (position, describe). The loss covers
answer tokens and EOS only. Every ``--eval-every`` steps the script reports teacher-forced token
accuracy and greedy exact match per kind on a validation subset and saves the checkpoint, so an
interrupted run still leaves a usable model. The fixed seed makes runs repeatable up to CPU
floating-point nondeterminism. ``--precision bf16`` runs the projections and MLPs under CPU bfloat16 autocast
(attention in float32): ~1.4x faster steps on CPUs with AMX; stages 1 and 2 of the shipped recipe use it
(docs/toy-models.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AttentionInterface, GenerationConfig, LlavaForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from covspec.cli import pipeline_main
from covspec.data.metrics import exact_match
from covspec.data.shapes import (
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    KINDS,
    SHAPE_SIZE,
    SHAPES,
    Sample,
    Scene,
    load_split,
    make_sample,
    questions,
)
from covspec.models.toy import IMAGE, build_processor, toy_config


def fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA in float32 inside a bf16 autocast region (``--precision bf16``): only the projections and MLPs run in
    bfloat16. SDPA's CPU kernel is slower in bfloat16 than in float32 (the step is as fast as with eager bfloat16
    attention), and the attention scores keep full precision."""
    with torch.autocast("cpu", enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


AttentionInterface.register("covspec_fp32_sdpa", fp32_attention)

PATCH_CLASSES = [(c, k) for c in COLORS for k in SHAPES]
TRAIN_KIND_WEIGHTS = {"color": 0.2, "shape": 0.2, "count": 0.1, "position": 0.2, "describe": 0.3}


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def patch_labels(samples: list[Sample], patch: int = 8) -> torch.Tensor:
    """Per-patch class of every image: 0 empty, else 1 + index of the (color, kind) whose shape covers it.

    Shapes fill one patch-aligned 2x2 block in the centre of their cell (``shapes.SHAPE_SIZE``), so the label
    is exact. Returns [B, P] with P = (IMAGE_SIZE / patch)^2, row-major like the vision tower's patches.
    """
    labels = torch.zeros(len(samples), (IMAGE_SIZE // patch) ** 2, dtype=torch.long)
    for b, s in enumerate(samples):
        for shape in s.scene.shapes:
            labels[b, shape_patches(shape, patch)] = 1 + PATCH_CLASSES.index((shape.color, shape.kind))
    return labels


class PatchProbe(torch.nn.Module):
    """Training-only auxiliary head: classifies each visual token's patch (empty / color x kind).

    A dense per-patch target teaches the vision tower colors and shape kinds directly, instead of only
    through the language model's answer loss, where a from-scratch tower stayed near chance on shape kinds
    for a thousand steps. The head is not part of the saved checkpoint.
    """

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.head = torch.nn.Linear(model.config.vision_config.hidden_size, 1 + len(PATCH_CLASSES))
        self.features: torch.Tensor | None = None
        model.model.vision_tower.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output) -> None:
        self.features = output.last_hidden_state[:, 1:]  # drop CLS: [B, P, H_vision]

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features)  # [B, P, C]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def referent(sample: Sample):
    """The one shape a color / shape / position question asks about, or None (count, describe)."""
    shapes = sample.scene.shapes
    if sample.kind == "color":
        found = [s for s in shapes if f"the {s.kind}?" in sample.question]
    elif sample.kind == "shape":
        found = [s for s in shapes if f"the {s.color} object?" in sample.question]
    elif sample.kind == "position":
        found = [s for s in shapes if f"the {s.color} {s.kind}?" in sample.question]
    else:
        return None
    if len(found) != 1:
        raise AssertionError(f"{sample.id}: {len(found)} shapes match {sample.question!r}")
    return found[0]


def shape_patches(shape, patch: int = 8) -> list[int]:
    """Row-major indices of the visual tokens (patches) that ``shape`` covers."""
    side = IMAGE_SIZE // patch
    row, col = divmod(shape.cell, GRID)
    top = (row * CELL + CELL // 2 - SHAPE_SIZE // 2) // patch
    left = (col * CELL + CELL // 2 - SHAPE_SIZE // 2) // patch
    n = SHAPE_SIZE // patch
    return [(top + i) * side + left + j for i in range(n) for j in range(n)]


class AttentionGuide:
    """Training-only auxiliary loss: one attention head looks at the shape the question is about.

    A color, shape or position question is answered by finding one object among up to four; learnt
    from the answer loss alone, the toy target kept attending to the wrong object (63% exact match on
    color questions after 2,800 steps, while it described whole scenes at 97%). The guide supervises
    head ``head`` of language-model layer ``layer``: at every answer position its attention mass on the
    referred shape's visual tokens is pushed up (loss ``-log mass``). Only that layer runs eager
    attention (to expose its weights); the saved checkpoint is unchanged in kind.

    Off by default (``--attn-loss 0``); the shipped checkpoints were trained without it. Its one trial, on a
    deeper, narrower target (language model 112 wide x 14 layers, weight 0.5, layer 4) did not help: the guided
    head put ~55% of its mass on the referred shape within 500 steps, yet color and position answers stayed at
    chance after 1,300 steps (token accuracy flat at 0.75-0.78), where the then-shipped 192 x 6 target answered 55-60%
    of them by step 1,000 without the guide. On that shape (192 x 6, layer 2) the head reached ~80% mass by
    step 650, with color / shape / position answers at 10% / 25% / 30%: no better than without it.
    """

    def __init__(self, model: LlavaForConditionalGeneration, layer: int, head: int = 0) -> None:
        attn = model.model.language_model.layers[layer].self_attn
        config = copy.copy(attn.config)
        config._attn_implementation = "eager"
        attn.config = config
        attn.register_forward_hook(self._capture)
        self.layer, self.head = layer, head
        self.image_token = model.config.image_token_index
        self.weights: torch.Tensor | None = None

    def _capture(self, _module, _inputs, output) -> None:
        self.weights = output[1][:, self.head]  # [B, T, T]

    def loss(self, batch: dict[str, torch.Tensor], samples: list[Sample]) -> torch.Tensor | None:
        losses = []
        for b, sample in enumerate(samples):
            shape = referent(sample)
            if shape is None:
                continue
            image_pos = (batch["input_ids"][b] == self.image_token).nonzero().flatten()
            cols = image_pos[shape_patches(shape)]
            rows = (batch["labels"][b, 1:] != -100).nonzero().flatten()
            mass = self.weights[b][rows][:, cols].sum(-1)
            losses.append(-torch.log(mass.clamp_min(1e-6)).mean())
        return torch.stack(losses).mean() if losses else None


def right_pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    """[len(rows), longest] long tensor of ``rows``, each padded on the right with ``fill``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def answer_ids(tok, answer: str) -> list[int]:
    """The supervised continuation of a prompt: the answer's tokens and eos."""
    return tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def collate(processor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded batch: prompt + answer + eos, labels only on answer and eos."""
    tok = processor.tokenizer
    enc = processor(images=[s.image() for s in samples], text=[prompt_text(processor, s.question) for s in samples])
    rows, labels = [], []
    for prompt_ids, s in zip(enc["input_ids"], samples, strict=True):
        answer = answer_ids(tok, s.answer)
        rows.append(list(prompt_ids) + answer)
        labels.append([-100] * len(prompt_ids) + answer)
    return {
        "input_ids": right_pad(rows, tok.pad_token_id),
        "attention_mask": right_pad([[1] * len(r) for r in rows], 0),
        "labels": right_pad(labels, -100),
        "pixel_values": torch.from_numpy(np.stack(enc["pixel_values"])),
    }


def expand_layers(model: LlavaForConditionalGeneration, layers: int) -> list[int]:
    """Deepen a trained language model to ``layers`` without changing what it computes (block expansion, as in
    LLaMA Pro): a copy of a layer, with its attention output and MLP down projections zeroed, is inserted after
    evenly spaced layers. A zeroed block adds nothing to the residual stream, so the expanded model's outputs are
    the original's until training moves them. Returns the indices (in the new stack) of the inserted layers."""
    lm = model.model.language_model
    old = list(lm.layers)
    if layers < len(old):
        raise ValueError(f"--lm-layers {layers} is fewer than the {len(old)} layers of the checkpoint")
    extra = layers - len(old)
    if extra > len(old):
        raise ValueError(f"--lm-layers {layers}: block expansion at most doubles the {len(old)} layers of the model")
    after = {round((i + 1) * len(old) / extra) - 1 for i in range(extra)} if extra else set()
    stack, inserted = [], []
    for i, layer in enumerate(old):
        stack.append(layer)
        if i in after:
            clone = copy.deepcopy(layer)
            with torch.no_grad():
                clone.self_attn.o_proj.weight.zero_()
                clone.mlp.down_proj.weight.zero_()
            inserted.append(len(stack))
            stack.append(clone)
    for idx, layer in enumerate(stack):
        layer.self_attn.layer_idx = idx  # the KV cache is indexed by it
    lm.layers = torch.nn.ModuleList(stack)
    model.config.text_config.num_hidden_layers = len(stack)
    return inserted


@dataclass(frozen=True)
class QA:
    """One question about a packed image."""

    kind: str
    question: str
    answer: str


def scene_qas(scene: Scene, rng: random.Random, limit: int) -> list[QA]:
    """Up to ``limit`` of the scene's unambiguous questions, every kind first (a random one of each), then the rest."""
    by_kind = {k: [QA(k, q, a) for q, a in questions(scene, k)] for k in KINDS}
    for items in by_kind.values():
        rng.shuffle(items)
    first = [items[0] for items in by_kind.values() if items]
    rest = [qa for items in by_kind.values() for qa in items[1:]]
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[:limit]


def collate_packed(processor, packs: list[tuple[Scene, list[QA]]]) -> dict[str, torch.Tensor]:
    """One row per image: the shared prefix (bos, "USER:", the visual tokens) then one block per question.

    Each block (question, " ASSISTANT:", answer, eos) attends to the prefix and causally to itself only, and its
    positions continue from the prefix as if it were the only question: every block's logits are those of its own
    single-question sequence (``tests/test_train_toy.py`` checks it), while the image is encoded and prefilled once
    for all of them. Labels cover the answers and eos. Padding attends to itself only, so no row is fully masked.
    """
    tok = processor.tokenizer
    rows, labels, positions, blocks, pixels = [], [], [], [], []
    for scene, qas in packs:
        # The image is processed once: the prefix is the prompt up to the image placeholder (expanded), and each
        # question block is the prompt's text after it, tokenized as the processor tokenizes that segment.
        texts = [prompt_text(processor, qa.question) for qa in qas]
        cut = texts[0].index(IMAGE) + len(IMAGE)
        enc = processor(images=[scene.render()], text=[texts[0][:cut]])
        row = list(enc["input_ids"][0])
        split = len(row)
        lab, pos, blk = [-100] * split, list(range(split)), [0] * split
        for b, (text, qa) in enumerate(zip(texts, qas, strict=True), start=1):
            if text[:cut] != texts[0][:cut]:
                raise ValueError(f"question {qa.question!r} does not share the image prefix")
            question = tok(text[cut:], add_special_tokens=False)["input_ids"]
            answer = answer_ids(tok, qa.answer)
            row += question + answer
            lab += [-100] * len(question) + answer
            pos += range(split, split + len(question) + len(answer))
            blk += [b] * (len(question) + len(answer))
        rows.append(row)
        labels.append(lab)
        positions.append(pos)
        blocks.append(blk)
        pixels.append(enc["pixel_values"][0])
    n, width = len(rows), max(len(r) for r in rows)
    input_ids, label_t = right_pad(rows, tok.pad_token_id), right_pad(labels, -100)
    pos_t, blk_t = right_pad(positions, 0), right_pad(blocks, -1)  # block -1: padding
    q, k = blk_t[:, :, None], blk_t[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding (and everything) sees itself
    mask = torch.zeros((n, 1, width, width)).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos_t, "labels": label_t,
            "pixel_values": torch.from_numpy(np.stack(pixels))}  # fmt: skip


@torch.no_grad()
def evaluate(model, processor, samples: list[Sample], max_new_tokens: int = 40) -> dict[str, dict[str, float]]:
    """Per-kind teacher-forced token accuracy and greedy exact match."""
    model.eval()
    tok = processor.tokenizer
    stats: dict[str, dict[str, float]] = {k: {"tok_ok": 0, "tok_n": 0, "em": 0, "n": 0} for k in KINDS}
    for start in range(0, len(samples), 25):
        chunk = samples[start : start + 25]
        batch = collate(processor, chunk)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        pred = logits[:, :-1].argmax(-1)
        gold = batch["labels"][:, 1:]
        for i, s in enumerate(chunk):
            m = gold[i] != -100
            stats[s.kind]["tok_ok"] += int((pred[i][m] == gold[i][m]).sum())
            stats[s.kind]["tok_n"] += int(m.sum())
        tok.padding_side = "left"
        enc = processor(images=[s.image() for s in chunk], text=[prompt_text(processor, s.question) for s in chunk],
                        return_tensors="pt", padding=True)  # fmt: skip
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for s, text in zip(chunk, texts, strict=True):
            stats[s.kind]["em"] += exact_match(text, s.answer)
            stats[s.kind]["n"] += 1
    model.train()
    return {
        k: {"token_acc": v["tok_ok"] / max(v["tok_n"], 1), "exact_match": v["em"] / max(v["n"], 1)}
        for k, v in stats.items()
    }


def vision_stage(source: Path) -> dict | None:
    """The record of a checkpoint trained to provide a vision tower (``--count-vision-time``): one segment holding its
    training time and its own segments; None when it has no ``training.json``."""
    meta_file = source / "training.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return {"vision_tower_from": str(source), "role": meta.get("role"), "steps": meta.get("trained_steps"),
            "seconds": meta.get("train_seconds", 0.0), "segments": meta.get("segments", [])}  # fmt: skip


def save(model, processor, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


@pipeline_main("train_toy")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["target", "draft"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default by role)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--eval-samples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint instead of random init")
    ap.add_argument("--kind-weights", default=None, help="question-kind mix, e.g. position=0.4,shape=0.3,...")
    ap.add_argument(
        "--patch-loss",
        type=float,
        default=1.0,
        help="weight of the per-patch auxiliary loss (its head is not saved: with --init a fresh head's "
        "loss can pull a trained tower towards it; 0 turns it off)",
    )
    ap.add_argument("--attn-loss", type=float, default=0.0, help="weight of the attention-guide loss (0: off)")
    ap.add_argument("--attn-layer", type=int, default=None, help="language-model layer the guide supervises")
    ap.add_argument("--data-offset", type=int, default=0, help="first train-split index (use fresh samples)")
    ap.add_argument(
        "--pack",
        type=int,
        default=0,
        help="questions per image, packed in one row (0: one question per row, kind mix applies)",
    )
    ap.add_argument(
        "--vision-from",
        type=Path,
        default=None,
        help="start the vision tower from this checkpoint's (same vision config), e.g. the draft from the target's",
    )
    ap.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    ap.add_argument(
        "--count-vision-time",
        action="store_true",
        help="the --vision-from checkpoint was trained only to provide this tower: its recorded training time "
        "(and segments) count towards this model's",
    )
    ap.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop (evaluate and save) after this many steps of the --steps schedule",
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: projections and MLPs under CPU bfloat16 autocast, attention in float32 (weights, optimizer "
        "state and evaluation stay float32); ~1.4x faster steps on CPUs with AMX",
    )
    ap.add_argument(
        "--lm-layers",
        type=int,
        default=None,
        help="language-model layers (default: the role's size); with --init, deepens the checkpoint "
        "by block expansion (inserted layers start as identities)",
    )
    args = ap.parse_args(argv)
    if args.pack < 0:
        ap.error(f"--pack must be >= 0, got {args.pack}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        ap.error(f"--stop-at must be in 1..--steps ({args.steps}), got {args.stop_at}")
    if args.pack and args.attn_loss > 0:
        ap.error("--attn-loss needs one question per row; it cannot be combined with --pack")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    processor = build_processor()
    expanded: list[int] = []
    if args.init is not None:
        if not (args.init / "config.json").is_file():
            ap.error(f"--init {args.init}: no checkpoint there (config.json is missing)")
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
        meta_file = args.init / "training.json"
        previous = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if args.lm_layers is not None:
            try:
                expanded = expand_layers(model, args.lm_layers)
            except ValueError as exc:
                ap.error(str(exc))
    else:
        config = toy_config(args.role, processor.tokenizer)
        if args.lm_layers is not None:
            config.text_config.num_hidden_layers = args.lm_layers
        model = LlavaForConditionalGeneration(config)
        previous = {}
    if args.vision_from is not None:
        if not (args.vision_from / "config.json").is_file():
            ap.error(f"--vision-from {args.vision_from}: no checkpoint there (config.json is missing)")
        source = LlavaForConditionalGeneration.from_pretrained(args.vision_from).model.vision_tower
        try:
            model.model.vision_tower.load_state_dict(source.state_dict())
        except RuntimeError:
            ap.error(f"--vision-from {args.vision_from}: its vision tower does not have this model's shape")
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    tower_stage: dict | None = None
    if args.count_vision_time:
        if args.vision_from is None:
            ap.error("--count-vision-time needs --vision-from")
        if args.init is not None:
            ap.error("--count-vision-time starts a model's record: it cannot be combined with --init")
        tower_stage = vision_stage(args.vision_from)
        if tower_stage is None:
            ap.error(f"--count-vision-time: no {args.vision_from / 'training.json'} (no training time to count)")
    model.generation_config = GenerationConfig(
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        max_new_tokens=48,
        do_sample=False,
    )
    model.train()
    if args.precision == "bf16":
        model.set_attn_implementation("covspec_fp32_sdpa")
    lr = args.lr or (1.5e-3 if args.role == "target" else 3e-3)
    probe = PatchProbe(model) if args.patch_loss > 0 else None
    guide = None
    if args.attn_loss > 0:
        layers = model.config.text_config.num_hidden_layers
        guide = AttentionGuide(model, args.attn_layer if args.attn_layer is not None else max(1, layers // 3))
    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(args.seed)
    mix = dict(TRAIN_KIND_WEIGHTS)
    if args.kind_weights:
        mix = {k: float(v) for k, v in (item.split("=") for item in args.kind_weights.split(","))}
    kinds, weights = zip(*mix.items(), strict=True)
    val = load_split("val", args.eval_samples, seed=args.seed)
    index = args.data_offset
    # wall time accumulates across continuations (and from the tower's own training with --count-vision-time)
    started = time.time() - previous.get("train_seconds", tower_stage["seconds"] if tower_stage else 0.0)
    meta = {
        "role": args.role,
        "continued_from": previous.get("trained_steps", 0),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": lr,
        "seed": args.seed,
        "data_offset": args.data_offset,
        "kind_weights": mix,
        "patch_loss": args.patch_loss,
        "attn_loss": args.attn_loss,
        "attn_layer": guide.layer if guide is not None else None,
        "pack": args.pack,
        "precision": args.precision,
        "vision_from": str(args.vision_from) if args.vision_from else previous.get("vision_from"),
        "freeze_vision": args.freeze_vision,
        "vision_time_counted": args.count_vision_time,
        "expanded_layers": expanded or previous.get("expanded_layers", []),
    }
    segment = {k: meta[k] for k in ("steps", "batch_size", "lr", "data_offset", "pack", "patch_loss", "attn_loss",
                                    "precision", "freeze_vision")}  # fmt: skip
    segment["kind_weights"] = None if args.pack else mix  # packed rows hold every question of their scene
    segment["expanded_to"] = args.lm_layers if expanded else None
    earlier = previous.get("segments") or ([tower_stage] if tower_stage else None)
    if earlier is None and previous:  # a checkpoint from before segments were recorded: its last segment's record
        earlier = [{"steps": previous.get("trained_steps"), "seconds": previous.get("train_seconds"),
                    "last": {k: previous.get(k) for k in ("steps", "batch_size", "lr", "kind_weights")}}]  # fmt: skip
    segment_start = time.time()
    for step in range(args.steps):
        batch_samples = []
        for _ in range(args.batch_size):
            batch_samples.append(make_sample("train", index, seed=args.seed, kind=rng.choices(kinds, weights)[0]))
            index += 1
        if args.pack:
            packs = [(s.scene, scene_qas(s.scene, rng, args.pack)) for s in batch_samples]
            batch = collate_packed(processor, packs)
        else:
            batch = collate(processor, batch_samples)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch).loss
            if probe is not None:
                loss = loss + args.patch_loss * probe.loss(patch_labels(batch_samples))
            guide_loss = guide.loss(batch, batch_samples) if guide is not None else None
        if guide_loss is not None:
            loss = loss + args.attn_loss * guide_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            guided = f" guide {guide_loss.item():.3f}" if guide_loss is not None else ""
            print(f"[{args.role}] step {step} loss {loss.item():.4f}{guided} lr {lr_at(step):.2e} "
                  f"elapsed {time.time() - started:.0f}s", flush=True)  # fmt: skip
        last = step + 1 == (args.stop_at or args.steps)
        if (step + 1) % args.eval_every == 0 or last:
            report = evaluate(model, processor, val)
            meta.update(
                trained_steps=previous.get("trained_steps", 0) + step + 1,
                train_seconds=round(time.time() - started, 1),
                val=report,
                segments=[*(earlier or []), {**segment, "steps": step + 1,
                                             "seconds": round(time.time() - segment_start, 1)}],
            )  # fmt: skip
            save(model, processor, args.out, meta)
            summary = " ".join(f"{k}={v['exact_match']:.2f}/{v['token_acc']:.3f}" for k, v in report.items())
            print(f"[{args.role}] eval step {step + 1}: {summary}", flush=True)
        if last:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
