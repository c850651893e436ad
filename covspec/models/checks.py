"""Equivalence checks every adapter must pass, shared by the tests and ``pipelines/gpu_smoke.py``.

Each check runs one property on one adapter and raises ``CheckFailed`` (an ``AssertionError``) with what differed:

- ``check_greedy``: prefill + one-token steps decode exactly what ``model.generate(do_sample=False)`` does;
- ``check_verify_block``: scoring k tokens in one forward equals k single steps;
- ``check_rollback``: cropping the cache and re-scoring equals a fresh path;
- ``check_pruned_prefill``: ``keep`` = every visual token equals the unpruned prefill, and a pruned prefill followed
  by decode steps equals one uncached forward over the kept embeddings at their *original* positions, the decoded
  tokens continuing at ``max(prompt positions) + 1`` (computed here from the model's own position function);
- ``check_prepare_from_ids``: ids tokenized elsewhere (and with resized placeholder runs) rebuild the same inputs;
- ``check_forward_batch``: batched scoring across sessions of different lengths equals per-session forwards;
- ``check_tree_verify``: scoring a token tree in one forward gives each node the logits of the chain to it, and
  keeping one path's cache entries (``kvcache.keep_nodes``) leaves the cache of that chain (alone, batched with a
  chain session, and after a merged-pruned prefill);
- ``check_prefill_fused``: the prompt and a first block (chain or tree) in one forward equal ``prefill`` then
  ``forward``, and the state continues alike;
- ``check_engine_greedy``: covspec greedy through the in-process engine equals target-only greedy.

``step_timings`` measures prefill, one decode step and a k-token verification (medians, device-synchronized).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from PIL import Image

from covspec.models.base import PromptInputs, VLMAdapter, cut_at_eos


class CheckFailed(AssertionError):
    """An adapter broke one of the equivalences."""


def _sync(adapter: VLMAdapter) -> None:
    if getattr(adapter, "device", torch.device("cpu")).type == "cuda":
        torch.cuda.synchronize(adapter.device)


def _close(name: str, ours: torch.Tensor, theirs: torch.Tensor, atol: float) -> float:
    """Max abs difference of two logit tensors; raises if over ``atol`` or if any argmax differs."""
    diff = float((ours.float() - theirs.float()).abs().max())
    if diff > atol or not torch.equal(ours.argmax(-1), theirs.argmax(-1)):
        raise CheckFailed(f"{name}: logits differ by {diff:.3g} (atol {atol:g}) or in argmax")
    return diff


def model_inputs(adapter: VLMAdapter, inputs: PromptInputs) -> dict:
    """Keyword arguments of ``model.generate`` for the unpruned prompt (LLaVA needs only ids and pixels)."""
    if hasattr(adapter, "model_inputs"):
        return adapter.model_inputs(inputs)
    return {"input_ids": inputs.input_ids[None], "pixel_values": inputs.pixel_values}


@torch.inference_mode()
def hf_greedy(adapter: VLMAdapter, inputs: PromptInputs, max_new_tokens: int) -> list[int]:
    """``model.generate(do_sample=False)``'s new tokens, cut before the first EOS."""
    out = adapter.model.generate(**model_inputs(adapter, inputs), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs.input_ids.shape[0] :].tolist()
    return cut_at_eos(new, adapter.eos_token_ids)


def check_greedy(adapter: VLMAdapter, inputs: PromptInputs, max_new_tokens: int = 8) -> list[int]:
    """Adapter greedy decoding equals ``model.generate``; returns the tokens."""
    from covspec.decoding.autoregressive import generate

    ours = generate(adapter, inputs, max_new_tokens).token_ids
    theirs = hf_greedy(adapter, inputs, max_new_tokens)
    if ours != theirs:
        raise CheckFailed(f"greedy: adapter decoded {ours}, model.generate {theirs}")
    return ours


def check_verify_block(adapter: VLMAdapter, inputs: PromptInputs, tokens: torch.Tensor, atol: float = 1e-4) -> float:
    """``forward`` of k tokens in one call equals k single-token calls; returns the max logit difference."""
    state, _ = adapter.prefill(inputs)
    block = adapter.forward(state, tokens)  # [k, V]
    state2, _ = adapter.prefill(inputs)
    singles = torch.stack([adapter.forward(state2, tokens[i : i + 1])[0] for i in range(tokens.shape[0])])
    if state.seq_len != state2.seq_len:
        raise CheckFailed(f"verify: lengths {state.seq_len} != {state2.seq_len}")
    return _close("verify k tokens vs k steps", block, singles, atol)


def check_rollback(adapter: VLMAdapter, inputs: PromptInputs, tokens: torch.Tensor, atol: float = 1e-4) -> float:
    """Score ``tokens``, roll back to after the first, score two more: equals a fresh path. Needs 4+ tokens."""
    state, _ = adapter.prefill(inputs)
    prompt_len = state.seq_len
    adapter.forward(state, tokens)
    adapter.rollback(state, prompt_len + 1)  # keep the first token, reject the rest
    after = adapter.forward(state, tokens[2:4])
    fresh, _ = adapter.prefill(inputs)
    expected = adapter.forward(fresh, torch.cat([tokens[:1], tokens[2:4]]))[1:]
    try:
        adapter.rollback(state, state.seq_len + 1)
    except ValueError:
        pass
    else:
        raise CheckFailed("rollback: rolling forward was not refused")
    return _close("rollback then forward vs fresh", after, expected, atol)


def full_positions(adapter: VLMAdapter, inputs: PromptInputs) -> torch.Tensor:
    """Position ids of the unpruned prompt from the model's own function: [rows, L] (3 rows for M-RoPE)."""
    if hasattr(adapter, "rope_positions"):  # Qwen2-VL family
        pos, _ = adapter.model.model.get_rope_index(
            inputs.input_ids[None],
            mm_token_type_ids=inputs.image_mask.long()[None],
            image_grid_thw=inputs.extra["image_grid_thw"],
        )
        return pos[:, 0]
    return torch.arange(inputs.input_ids.shape[0], device=inputs.input_ids.device)[None]


@torch.inference_mode()
def check_pruned_prefill(
    adapter: VLMAdapter, inputs: PromptInputs, keep: torch.Tensor, tokens: torch.Tensor, atol: float = 1e-4
) -> float:
    """Keep-all equals the unpruned prefill; a pruned prefill + ``forward(tokens)`` equals one uncached forward."""
    from covspec.models.llava import LlavaAdapter

    n = inputs.num_visual_tokens
    full_state, full_logits = adapter.prefill(inputs)
    all_state, all_logits = adapter.prefill(inputs, keep=torch.arange(n))
    diff = _close("keep=all vs unpruned prefill", all_logits, full_logits, atol)
    diff = max(
        diff,
        _close(
            "keep=all vs unpruned step",
            adapter.forward(all_state, tokens[:2]),
            adapter.forward(full_state, tokens[:2]),
            atol,
        ),
    )

    state, prefill_logits = adapter.prefill(inputs, keep=keep)
    rows = LlavaAdapter.kept_positions(inputs, keep)  # [L_kept]
    if state.seq_len != inputs.input_ids.shape[0] or state.cache_len != rows.shape[0]:
        raise CheckFailed(f"pruned prefill: seq_len {state.seq_len}, cache_len {state.cache_len}, kept {len(rows)}")
    steps = adapter.forward(state, tokens)  # [k, V]

    pos = full_positions(adapter, inputs)  # [R, L]
    k = tokens.shape[0]
    after = int(pos.max()) + 1 + torch.arange(k, device=pos.device)  # decoded tokens continue after the prompt
    position_ids = torch.cat([pos[:, rows], after.expand(pos.shape[0], k)], dim=1)  # [R, L_kept + k]
    embeds = torch.cat([adapter.embed(inputs)[rows], adapter.model.get_input_embeddings()(tokens.to(pos.device))])
    out = adapter.model(
        inputs_embeds=embeds[None],
        position_ids=position_ids[:, None] if pos.shape[0] == 3 else position_ids,
        attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long, device=embeds.device),  # not "packed"
    )
    m = rows.shape[0]
    diff = max(diff, _close("pruned prefill vs uncached forward", prefill_logits, out.logits[0, m - 1], atol))
    return max(diff, _close("steps after pruned prefill vs uncached forward", steps, out.logits[0, m:], atol))


def check_prepare_from_ids(adapter: VLMAdapter, image: Image.Image, question: str) -> None:
    """``prepare_from_ids`` on ``prepare``'s ids rebuilds the same inputs, also from a resized placeholder run."""
    ref = adapter.prepare(image, question)
    ids = ref.input_ids.tolist()
    image_id = adapter.image_token_id
    collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
    first = ids.index(image_id)
    doubled = ids[:first] + [image_id] * ref.num_visual_tokens + ids[first:]
    for name, prompt_ids in (("same", ids), ("one placeholder", collapsed), ("twice the placeholders", doubled)):
        got = adapter.prepare_from_ids(image, prompt_ids)
        if not torch.equal(got.input_ids, ref.input_ids) or not torch.equal(got.image_mask, ref.image_mask):
            raise CheckFailed(f"prepare_from_ids ({name}): ids differ from prepare's")
        if not torch.equal(got.pixel_values, ref.pixel_values):
            raise CheckFailed(f"prepare_from_ids ({name}): pixel values differ from prepare's")
        for key, value in ref.extra.items():
            other = got.extra.get(key)
            same = torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value
            if not same:
                raise CheckFailed(f"prepare_from_ids ({name}): extra[{key!r}] differs from prepare's")


def check_forward_batch(
    adapter: VLMAdapter, prompts: list[PromptInputs], blocks: list[torch.Tensor], atol: float = 1e-4
) -> float:
    """``forward_batch`` over sessions of different lengths (one pruned) equals per-session ``forward``."""
    states, expected = [], []
    for i, (inputs, block) in enumerate(zip(prompts, blocks, strict=True)):
        keep = torch.arange(0, inputs.num_visual_tokens, 2) if i == 0 else None
        state, _ = adapter.prefill(inputs, keep=keep)
        states.append(state)
        ref, _ = adapter.prefill(inputs, keep=keep)
        expected.append(adapter.forward(ref, block))
    got = adapter.forward_batch(states, blocks)
    diff = 0.0
    for i, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        diff = max(diff, _close(f"forward_batch session {i}", ours, theirs, atol))
    after = [adapter.forward(s, b[:1]) for s, b in zip(states, blocks, strict=True)]  # the states stay usable
    for i, (inputs, block) in enumerate(zip(prompts, blocks, strict=True)):
        keep = torch.arange(0, inputs.num_visual_tokens, 2) if i == 0 else None
        ref, _ = adapter.prefill(inputs, keep=keep)
        adapter.forward(ref, block)
        diff = max(
            diff, _close(f"forward after forward_batch, session {i}", after[i], adapter.forward(ref, block[:1]), atol)
        )
    return diff


TREE_PARENTS = [-1, 0, 1, 0, 3, -1, 5]  # two branches at the root, one forking at node 0
"""The tree ``check_tree_verify`` scores (7 nodes; ``TREE_TOKENS`` are its default tokens)."""
TREE_TOKENS = torch.tensor([7, 9, 11, 12, 13, 8, 10])


def check_tree_verify(
    adapter: VLMAdapter, inputs: PromptInputs, other: PromptInputs, tokens: torch.Tensor = TREE_TOKENS,
    parents: list[int] = TREE_PARENTS, atol: float = 1e-4,
) -> float:  # fmt: skip
    """A token tree scored in one forward (single, batched next to a chain session, and on a merged-pruned prefill)
    equals scoring each root-to-node chain; after ``keep_nodes`` on a path, the next step equals the chain's."""
    from covspec.decoding.tree import path_to
    from covspec.models.kvcache import keep_nodes

    n = inputs.num_visual_tokens
    keep = torch.arange(0, n, 2)
    counts = torch.full((int(keep.shape[0]),), 2)
    diff = 0.0
    for label, prefill in (("tree", lambda: adapter.prefill(inputs)),
                           ("tree, merged-pruned prefill", lambda: adapter.prefill(inputs, keep, counts))):  # fmt: skip
        state, _ = prefill()
        base = state.seq_len
        rows = adapter.forward(state, tokens, parents)
        for leaf in range(len(parents)):
            ref, _ = prefill()
            chain = adapter.forward(ref, tokens[path_to(parents, leaf)])
            diff = max(diff, _close(f"{label}: node {leaf} vs its chain", rows[leaf], chain[-1], atol))
        path = path_to(parents, 4)
        keep_nodes(state, base, path)
        ref, _ = prefill()
        adapter.forward(ref, tokens[path])
        if (state.seq_len, state.cache_len) != (ref.seq_len, ref.cache_len):
            raise CheckFailed(f"{label}: keep_nodes left {state.seq_len} positions, the chain has {ref.seq_len}")
        nxt = tokens[:2]
        diff = max(diff, _close(f"{label}: step after keep_nodes", adapter.forward(state, nxt),
                                adapter.forward(ref, nxt), atol))  # fmt: skip
    if hasattr(adapter, "forward_batch"):
        a, _ = adapter.prefill(inputs)
        b, _ = adapter.prefill(other)
        got = adapter.forward_batch([a, b], [tokens, tokens[:3]], [parents, None])
        ref_a, _ = adapter.prefill(inputs)
        ref_b, _ = adapter.prefill(other)
        diff = max(diff, _close("batched tree session", got[0], adapter.forward(ref_a, tokens, parents), atol))
        diff = max(diff, _close("batched chain session", got[1], adapter.forward(ref_b, tokens[:3]), atol))
    return diff


def check_prefill_fused(
    adapter: VLMAdapter, inputs: PromptInputs, other: PromptInputs | None = None, tokens: torch.Tensor = TREE_TOKENS,
    parents: list[int] = TREE_PARENTS, atol: float = 1e-4,
) -> float:  # fmt: skip
    """``prefill_fused`` (the prompt and a first block in one forward) equals ``prefill`` then ``forward``, for a chain
    and a token tree: the prompt's last row, the block's rows, the state's lengths, and the next step after cropping
    (chain) or ``keep_nodes`` on a path (tree). With ``other`` (a prompt of another length) and an adapter that has
    ``prefill_fused_batch``: both prompts in one batched forward (a tree and a shorter chain) equal each alone, and
    each state continues alike."""
    from covspec.decoding.tree import path_to
    from covspec.models.kvcache import keep_nodes

    diff = 0.0
    for label, tree in (("chain", None), ("tree", parents)):
        state, rows = adapter.prefill_fused(inputs, tokens, tree)
        ref, last = adapter.prefill(inputs)
        base = ref.seq_len
        ref_rows = adapter.forward(ref, tokens, tree)
        if rows.shape[0] != len(tokens) + 1:
            raise CheckFailed(f"fused {label}: {rows.shape[0]} rows for {len(tokens)} tokens (expected k + 1)")
        diff = max(diff, _close(f"fused {label}: prompt row", rows[0], last, atol))
        diff = max(diff, _close(f"fused {label}: block rows", rows[1:], ref_rows, atol))
        if (state.seq_len, state.cache_len) != (ref.seq_len, ref.cache_len):
            raise CheckFailed(f"fused {label}: state has {state.seq_len} positions, prefill + forward {ref.seq_len}")
        if tree is None:
            adapter.rollback(state, base + 2)
            adapter.rollback(ref, base + 2)
        else:
            keep_nodes(state, base, path_to(tree, 4))
            keep_nodes(ref, base, path_to(tree, 4))
        nxt = tokens[:2]
        diff = max(diff, _close(f"fused {label}: step after the crop", adapter.forward(state, nxt),
                                adapter.forward(ref, nxt), atol))  # fmt: skip
    if other is None or not hasattr(adapter, "prefill_fused_batch"):
        return diff
    blocks, trees = [tokens, tokens[:3]], [parents, None]
    got = adapter.prefill_fused_batch([inputs, other], blocks, trees)
    for i, (x, (state, rows)) in enumerate(zip((inputs, other), got, strict=True)):
        ref, ref_rows = adapter.prefill_fused(x, blocks[i], trees[i])
        diff = max(diff, _close(f"batched fused row {i}", rows, ref_rows, atol))
        if (state.seq_len, state.cache_len) != (ref.seq_len, ref.cache_len):
            raise CheckFailed(f"batched fused row {i}: {state.seq_len} positions, alone {ref.seq_len}")
        nxt = tokens[:2]
        diff = max(diff, _close(f"batched fused row {i}: next step", adapter.forward(state, nxt),
                                adapter.forward(ref, nxt), atol))  # fmt: skip
    return diff


def step_timings(adapter: VLMAdapter, inputs: PromptInputs, k: int = 5, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of an unpruned prefill, a one-token decode step and a k-token verification."""
    tokens = torch.arange(k) % adapter.vocab_size

    def timed(fn) -> float:
        _sync(adapter)
        start = time.perf_counter()
        fn()
        _sync(adapter)
        return (time.perf_counter() - start) * 1e3

    adapter.prefill(inputs)  # warm-up (allocator, kernels)
    prefill = [timed(lambda: adapter.prefill(inputs)) for _ in range(repeats)]
    state, _ = adapter.prefill(inputs)
    base = state.seq_len
    decode, verify = [], []
    for _ in range(repeats + 1):
        decode.append(timed(lambda: adapter.forward(state, tokens[:1])))
        adapter.rollback(state, base)
        verify.append(timed(lambda: adapter.forward(state, tokens)))
        adapter.rollback(state, base)
    return {
        "prefill_ms": statistics.median(prefill),
        "decode_step_ms": statistics.median(decode[1:]),
        f"verify_{k}_ms": statistics.median(verify[1:]),
    }


def check_engine_greedy(
    target: VLMAdapter,
    draft: VLMAdapter,
    samples: list,
    max_new_tokens: int = 8,
    pruning: str = "none",
    keep_ratio: float = 1.0,
    overrides: tuple[str, ...] = (),
    rtt_ms: float = 0.0,
) -> list[dict]:
    """covspec greedy through ``LocalEngine`` equals target-only greedy (and the target's own decoding) per sample.

    Args:
        samples: objects with ``image()`` and ``question`` (e.g. ``covspec.data.shapes.Sample``).
        pruning: the draft's ``pruning.method``, with ``keep_ratio``.
        overrides: more dotted config overrides (e.g. ``drafting.policy=adaptive``, ``branching.budget=4``).
        rtt_ms: the emulated link's round trip (0: co-located); a wait long enough to draft branches in.

    Returns:
        Per sample: tokens, accepted/drafted counts and end-to-end seconds of both runs.
    """
    from covspec.config import load_config
    from covspec.decoding.autoregressive import generate
    from covspec.runtime.edge import Edge
    from covspec.runtime.engine import LocalEngine, check_pair, colocated_profile

    check_pair(target, draft)
    settings = [
        f"generation.max_new_tokens={max_new_tokens}",
        f"pruning.method={pruning}",
        f"pruning.keep_ratio={keep_ratio}",
        *overrides,
    ]
    engine = LocalEngine(load_config(overrides=settings), target, draft, Edge(target))
    link = dataclasses.replace(colocated_profile(), rtt_ms=rtt_ms)
    rows = []
    for sample in samples:
        image, question = sample.image(), sample.question
        t0 = time.perf_counter()
        expected = engine.run("target_only", image, question, link)
        t1 = time.perf_counter()
        got = engine.run("covspec", image, question, link)
        t2 = time.perf_counter()
        reference = generate(target, target.prepare(image, question), max_new_tokens).token_ids
        if expected.token_ids != reference:
            raise CheckFailed(f"engine target_only decoded {expected.token_ids}, the target alone {reference}")
        if got.token_ids != expected.token_ids:
            raise CheckFailed(
                f"engine covspec ({pruning} {keep_ratio:g}) decoded {got.token_ids}, target_only {expected.token_ids}"
            )
        rows.append(
            {
                "tokens": got.token_ids,
                "num_accepted": got.num_accepted,
                "num_drafted": got.num_drafted,
                "branch_hits": getattr(got, "branch_hits", 0),
                "target_only_s": t1 - t0,
                "covspec_s": t2 - t1,
            }
        )
    if engine.edge.sessions:
        raise CheckFailed(f"engine left {len(engine.edge.sessions)} edge sessions open")
    return rows
