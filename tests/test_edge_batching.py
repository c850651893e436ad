"""Batched edge work (one target forward for many sessions), session ownership and reopening: no Ray needed."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from covspec.data.shapes import load_split
from covspec.models.tiny import TINY_SPECS, tiny_llava
from covspec.protocol import (
    ErrorCode,
    ErrorReply,
    Link,
    MoreCandidates,
    OpenSession,
    SessionOpened,
    TokenChunk,
    VerifyRequest,
    VerifyResponse,
    decode,
    encode,
    new_session_id,
    probs_to_bytes,
)
from covspec.runtime.device import Device, DeviceSettings, png_bytes
from covspec.runtime.edge import Edge, Frame, Step
from covspec.runtime.engine import colocated_profile
from covspec.runtime.transport import InProcessTransport


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return tiny_llava(TINY_SPECS[0], 0)


def _open(edge: Edge, target, sample, method="covspec", peer="", temperature=0.0, **extra) -> str:
    sid = new_session_id()
    ids = target.prepare(sample.image(), sample.question).input_ids.tolist()
    msg = OpenSession(sid, method, ids, png_bytes(sample.image()), "png", temperature, 1.0, 32, 3, 4, **extra)
    replies = edge.process([Frame(encode(msg), peer)])[0]
    assert isinstance(replies[0][0], SessionOpened), replies
    return sid


def _greedy_blocks(target, sample, k: int) -> list[int]:
    """A block whose first tokens are the target's own greedy continuation, then a wrong one (a real rejection)."""
    from covspec.decoding.autoregressive import generate

    out = generate(target, target.prepare(sample.image(), sample.question), 8).token_ids
    block = (out + [5] * k)[:k]
    block[-1] = (block[-1] + 1) % target.vocab_size or 5
    return block


def test_batched_verification_equals_unbatched_for_sessions_of_different_lengths(target):
    samples = load_split("test", 4, offset=11)  # different kinds: prompts of different lengths
    lengths = {len(target.prepare(s.image(), s.question).input_ids) for s in samples}
    assert len(lengths) > 1
    edge_a, edge_b = Edge(target, prefill="separate"), Edge(target, prefill="separate")  # round 0 batched too
    rounds = []
    for i, s in enumerate(samples):
        sid = new_session_id()
        ids = target.prepare(s.image(), s.question).input_ids.tolist()
        msg = OpenSession(sid, "covspec", ids, png_bytes(s.image()), "png", 0.0, 1.0, 32, 3, 4)
        edge_a.process([Frame(encode(msg))])
        edge_b.process([Frame(encode(msg))])
        rounds.append((sid, _greedy_blocks(target, s, 2 + i)))
    frames = [Frame(encode(VerifyRequest(sid, 0, block, committed_len=0, last_token=-1))) for sid, block in rounds]
    batched = edge_a.process(frames)  # one batched forward over 4 sessions
    single = [edge_b.process([f])[0] for f in frames]  # one forward each
    assert edge_a.stats.batch_sizes == {len(frames): 1}
    for got, want in zip(batched, single, strict=True):
        (msg_a, _), (msg_b, _) = got[0], want[0]
        assert isinstance(msg_a, VerifyResponse)
        assert (msg_a.num_accepted, msg_a.token) == (msg_b.num_accepted, msg_b.token)
    assert any(m[0][0].num_accepted > 0 for m in batched) and any(
        m[0][0].num_accepted < len(b) for m, (_, b) in zip(batched, rounds, strict=True)
    )
    # the next round continues from the batched caches exactly like the single ones
    for (sid, _), got in zip(rounds, batched, strict=True):
        reply = got[0][0]
        nxt = VerifyRequest(sid, 1, [5, 6], committed_len=reply.num_accepted + 1, last_token=reply.token)
        a, b = edge_a.process([Frame(encode(nxt))])[0][0][0], edge_b.process([Frame(encode(nxt))])[0][0][0]
        assert (a.num_accepted, a.token) == (b.num_accepted, b.token)
        sa, sb = edge_a.sessions[sid], edge_b.sessions[sid]
        assert sa.state.seq_len == sb.state.seq_len and sa.committed == sb.committed
        torch.testing.assert_close(sa.last_logits, sb.last_logits, atol=1e-4, rtol=1e-4)


def test_a_batched_forward_copies_each_sessions_cache_once(target, monkeypatch):
    """The padded caches go into one buffer per layer sized for the whole forward, and the forward's new keys are
    written into it in place: after it, every session's cache is a view of that buffer (no second copy), and the
    logits equal per-session forwards. A layer asked to hold more than it was sized for falls back to copying."""
    from covspec.models.kvcache import _filled_layer

    samples = load_split("test", 3, offset=11)
    prompts = [target.prepare(s.image(), s.question) for s in samples]
    states = [target.prefill(p)[0] for p in prompts]
    assert len({s.seq_len for s in states}) > 1
    blocks = [torch.tensor([7, 9][: 1 + i % 2]) for i in range(3)]
    concatenating = DynamicLayer.update
    with monkeypatch.context() as m:
        m.setattr(DynamicLayer, "update", lambda *a, **k: pytest.fail("the batched forward concatenated its cache"))
        got = target.forward_batch(states, blocks)
    assert DynamicLayer.update is concatenating
    for layer in range(len(states[0].cache.layers)):
        storages = {s.cache.layers[layer].keys.untyped_storage().data_ptr() for s in states}
        assert len(storages) == 1, f"layer {layer}: the sessions' keys live in {len(storages)} buffers"
    for p, block, logits in zip(prompts, blocks, got, strict=True):
        ref, _ = target.prefill(p)
        torch.testing.assert_close(logits, target.forward(ref, block), atol=1e-4, rtol=0)

    layers = [s.cache.layers[0] for s in states]
    past = [int(x.keys.shape[-2]) for x in layers]
    width = max(past)
    merged = _filled_layer(layers, past, width, width + 1)
    assert torch.equal(merged.values[0, :, : width - past[0]], torch.zeros_like(merged.values[0, :, : width - past[0]]))
    new = torch.randn(3, *layers[0].keys.shape[1:2], 2, layers[0].keys.shape[-1])
    keys, _ = merged.update(new, new)  # 2 columns into a buffer with room for 1: concatenated instead
    assert keys.shape[-2] == width + 2 and torch.equal(keys[..., width:, :], new)
    for i, (layer, n) in enumerate(zip(layers, past, strict=True)):
        assert torch.equal(keys[i, :, width - n : width], layer.keys[0])

    # a model whose cache layers are of another kind (a sliding window, ...) keeps the concatenating path
    import covspec.models.kvcache as kvcache

    states = [target.prefill(p)[0] for p in prompts]
    monkeypatch.setattr(kvcache, "DynamicLayer", type("OtherLayer", (), {}))
    monkeypatch.setattr(kvcache, "_filled_layer", lambda *a: pytest.fail("an unknown layer kind was preallocated"))
    for p, block, logits in zip(prompts, blocks, target.forward_batch(states, blocks), strict=True):
        ref, _ = target.prefill(p)
        torch.testing.assert_close(logits, target.forward(ref, block), atol=1e-4, rtol=0)


def test_target_only_steps_decode_all_streams_in_one_forward(target):
    samples = load_split("test", 3, offset=5)
    edge = Edge(target)
    sids = [_open(edge, target, s, method="target_only") for s in samples]
    streams: dict[str, list[int]] = {sid: [] for sid in sids}
    while any(sid in edge.sessions for sid in sids):
        live = [sid for sid in sids if sid in edge.sessions]
        for sid, replies in zip(live, edge.process([Step(sid) for sid in live]), strict=True):
            chunk = replies[0][0]
            assert isinstance(chunk, TokenChunk)
            streams[sid].extend(chunk.token_ids)
    assert max(edge.stats.batch_sizes) == 3  # every live stream in one forward
    single = Edge(target)
    for sid, s in zip(sids, samples, strict=True):
        transport = InProcessTransport(single.handle, Link(colocated_profile()))
        try:
            r = Device(target, transport, DeviceSettings(method="target_only", max_new_tokens=32)).run(
                s.image(), s.question
            )
        finally:
            transport.close()
        assert streams[sid] == r.token_ids


def test_batched_prefill_equals_single_prefill(target):
    samples = load_split("test", 3, offset=2)
    edge_a, edge_b = Edge(target, prefill="separate"), Edge(target, prefill="separate")
    msgs = []
    for s in samples:
        ids = target.prepare(s.image(), s.question).input_ids.tolist()
        msgs.append(OpenSession(new_session_id(), "covspec", ids, png_bytes(s.image()), "png", 0.0, 1.0, 32, 0, 4))
    edge_a.process([Frame(encode(m)) for m in msgs])
    for m in msgs:
        edge_b.process([Frame(encode(m))])
    assert edge_a.stats.forwards == 1 and edge_b.stats.forwards == 3
    for edge in (edge_a, edge_b):  # prefill time on both clocks, inside the edge's busy / CPU time
        st = edge.stats
        assert 0 < st.prefill_s <= st.busy_s and 0 < st.prefill_cpu_s <= st.cpu_s
        assert 0 < st.prefill_thread_cpu_s <= st.thread_cpu_s <= st.cpu_s  # the calling thread's share of the CPU
        assert st.to_dict()["prefill_cpu_s"] == st.prefill_cpu_s
        assert st.to_dict()["prefill_thread_cpu_s"] == st.prefill_thread_cpu_s
    for m in msgs:
        a, b = edge_a.sessions[m.session_id], edge_b.sessions[m.session_id]
        assert a.state.seq_len == b.state.seq_len
        torch.testing.assert_close(a.last_logits, b.last_logits, atol=1e-4, rtol=1e-4)


def _snapshot(edge: Edge, sid: str):
    s = edge.sessions[sid]
    logits = None if s.last_logits is None else s.last_logits.clone()  # None: the prefill waits for the first block
    return s.seq, list(s.committed), s.length, logits, s.peer, s.state is None


def test_a_session_belongs_to_its_device(target):
    sample = load_split("test", 1)[0]
    edge = Edge(target)
    sid = _open(edge, target, sample, peer="device-a")
    before = _snapshot(edge, sid)
    for frame in (
        VerifyRequest(sid, 0, [5, 6], committed_len=0, last_token=-1),  # another device naming it
        VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1, draft_probs=probs_to_bytes(torch.tensor([0.5]))),
    ):
        reply = edge.process([Frame(encode(frame), "device-b")])[0][0][0]
        assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNKNOWN_SESSION
    from covspec.protocol import Close

    reply = edge.process([Frame(encode(Close(sid)), "device-b")])[0][0][0]
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNKNOWN_SESSION
    after = _snapshot(edge, sid)
    assert before[:3] == after[:3] and before[3] is after[3] is None and after[4:] == ("device-a", True)
    ok = edge.process([Frame(encode(VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1)), "device-a")])
    assert isinstance(ok[0][0][0], VerifyResponse)


def test_an_expired_session_is_refused_and_the_others_are_untouched(target):
    sample = load_split("test", 1)[0]
    edge = Edge(target, session_ttl_s=60)
    old, fresh = _open(edge, target, sample), _open(edge, target, sample)
    edge.sessions[old].last_used -= 120  # idle for two minutes
    before = _snapshot(edge, fresh)
    reply = edge.process([Frame(encode(VerifyRequest(old, 0, [5], committed_len=0, last_token=-1)))])[0][0][0]
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNKNOWN_SESSION
    assert old not in edge.sessions and _snapshot(edge, fresh)[:3] == before[:3]


def test_reopen_refuses_bad_committed_tokens(target):
    sample = load_split("test", 1)[0]
    edge = Edge(target)
    ids = target.prepare(sample.image(), sample.question).input_ids.tolist()
    for committed, words in (([target.eos_token_id], "EOS"), ([5] * 32, "max_new_tokens")):
        msg = OpenSession(new_session_id(), "covspec", ids, png_bytes(sample.image()), "png", 0.0, 1.0, 32, 0, 4,
                          committed=committed, seq=3)  # fmt: skip
        reply = edge.process([Frame(encode(msg))])[0][0][0]
        assert isinstance(reply, ErrorReply) and words in reply.message
    assert not edge.sessions


@pytest.mark.parametrize("method", ["covspec", "target_only"])
def test_a_reopen_whose_tokens_hold_the_image_placeholder_feeds_them_as_the_lost_session_did(target, method):
    """A sampled answer can hold the image placeholder id. Prefilled with the prompt it would be counted as part of
    the image; the edge feeds such committed tokens after the prefill instead, as plain tokens, exactly as the lost
    session had fed them: the reopened session continues from the same logits."""
    sample = load_split("test", 1)[0]
    edge = Edge(target)
    inputs = target.prepare(sample.image(), sample.question)
    committed = [5, target.image_token_id, 7]
    msg = OpenSession(new_session_id(), method, inputs.input_ids.tolist(), png_bytes(sample.image()), "png", 0.0,
                      1.0, 32, 0, 4, committed=committed, seq=3)  # fmt: skip
    reply = edge.process([Frame(encode(msg))])[0][0][0]
    assert not isinstance(reply, ErrorReply), reply
    s = edge.sessions[msg.session_id]
    state, _ = target.prefill(inputs)
    want = target.forward(state, torch.tensor(committed))[-1]
    assert s.committed == committed and s.state.seq_len == state.seq_len
    assert torch.allclose(s.last_logits, want.float(), atol=1e-4)


class _Forgetful:
    """An edge handler that loses every session after every ``every``-th verdict (an expiry, a replica restart)."""

    def __init__(self, edge: Edge, every: int) -> None:
        self.edge, self.every, self.verdicts = edge, every, 0

    def __call__(self, payload: bytes, peer: str = ""):
        for msg, frame in self.edge.handle(payload, peer):
            yield msg, frame
            if isinstance(msg, VerifyResponse | TokenChunk):
                self.verdicts += 1
                if self.verdicts % self.every == 0:
                    self.edge.sessions.clear()


@pytest.mark.parametrize("method", ["target_only", "vanilla_sd", "dssd", "covspec", "covspec+tree"])
def test_a_lost_session_is_reopened_and_the_output_does_not_change(toy_pair, method):
    target, draft = toy_pair
    samples = [s for s in load_split("test", 12) if s.kind == "describe"][:2]  # long answers: several rounds
    for sample in samples:
        outputs = []
        for handler in (Edge(target).handle, _Forgetful(Edge(target), every=2)):
            transport = InProcessTransport(handler, Link(colocated_profile()))
            tree = 2 if method.endswith("+tree") else 0  # a token tree in flight is resent as it was
            settings = DeviceSettings(method=method.removesuffix("+tree"), max_new_tokens=40, gamma=3, tree=tree)
            try:
                outputs.append(Device(draft, transport, settings).run(sample.image(), sample.question))
            finally:
                transport.close()
        plain, lossy = outputs
        assert lossy.token_ids == plain.token_ids
        assert plain.session_reopens == 0 and lossy.session_reopens >= 1, method
        assert (lossy.tree_rounds > 0) == method.endswith("+tree")


class _LosesCorrections:
    """An edge handler that loses the session when a MoreCandidates arrives for a session that has verified a round
    (the device is mid-correction); the resent one, on the reopened session, is answered."""

    def __init__(self, edge: Edge) -> None:
        self.edge, self.lost = edge, 0

    def __call__(self, payload: bytes, peer: str = ""):
        msg = decode(payload)
        if isinstance(msg, MoreCandidates) and self.edge.sessions[msg.session_id].verified > 0:
            self.edge.sessions.clear()
            self.lost += 1
        yield from self.edge.handle(payload, peer)


def test_a_session_lost_during_a_correction_is_reopened_and_the_correction_goes_on(toy_pair, monkeypatch):
    """The device refuses the first candidates of every correction (so it asks for more) and the edge loses the
    session each time it does: the device reopens from the tokens through the accepted drafts and asks again."""
    import covspec.runtime.device as device_module

    target, draft = toy_pair
    real, calls = device_module.correct_from_candidates, []

    def refuse_first(*args):
        calls.append(len(calls) % 2 == 0)
        return None if calls[-1] else real(*args)

    monkeypatch.setattr(device_module, "correct_from_candidates", refuse_first)
    # Whether a correction follows a verified round depends on the models' draws: the first (sample, seed) whose run
    # has one is checked (the scan is deterministic).
    cases = [(s, seed) for s in load_split("test", 12) if s.kind == "describe" for seed in range(4, 12)]
    for sample, seed in cases:
        calls.clear()
        handler = _LosesCorrections(Edge(target))
        transport = InProcessTransport(handler, Link(colocated_profile()))
        try:
            settings = DeviceSettings(method="covspec", max_new_tokens=40, gamma=3, temperature=0.8, seed=seed)
            r = Device(draft, transport, settings).run(sample.image(), sample.question)
        finally:
            transport.close()
        if handler.lost:
            break
    assert handler.lost >= 1, "no run corrected after a verified round"
    assert r.session_reopens == handler.lost
    assert r.more_candidate_requests >= handler.lost
    assert 0 < len(r.token_ids) <= 40 and r.text
    assert not handler.edge.sessions  # closed at the end


def test_more_candidates_on_a_reopened_session_draw_from_the_next_position(toy_pair):
    target, _ = toy_pair
    sample = load_split("test", 1)[0]
    edge = Edge(target)
    reply = edge.process([Frame(encode(MoreCandidates(_open(edge, target, sample, temperature=0.8), 0)))])[0][0][0]
    assert isinstance(reply, ErrorReply)  # a fresh session has no correction to resume (seq 0: nothing before it)
    greedy = _open(edge, target, sample, committed=[7], seq=2)
    reply = edge.process([Frame(encode(MoreCandidates(greedy, 1)))])[0][0][0]
    assert isinstance(reply, ErrorReply) and reply.code == ErrorCode.UNEXPECTED_TYPE
    sid = _open(edge, target, sample, temperature=0.8, committed=[7], seq=2)
    reply = edge.process([Frame(encode(MoreCandidates(sid, 1)))])[0][0][0]
    assert isinstance(reply, VerifyResponse) and reply.num_accepted == 0 and len(reply.candidate_ids) == 4
    # the next round must commit one of them as its last token (refused otherwise, nothing changed), then goes on
    outside = next(t for t in range(5, 40) if t not in reply.candidate_ids)
    bad = VerifyRequest(sid, 2, [5], committed_len=2, last_token=outside, draft_probs=probs_to_bytes([0.5]))
    refused = edge.process([Frame(encode(bad))])[0][0][0]
    assert isinstance(refused, ErrorReply) and "last_token" in refused.message
    assert edge.sessions[sid].committed == [7] and edge.sessions[sid].seq == 2
    ok = VerifyRequest(sid, 2, [5], committed_len=2, last_token=reply.candidate_ids[0],
                       draft_probs=probs_to_bytes([0.5]))  # fmt: skip
    assert isinstance(edge.process([Frame(encode(ok))])[0][0][0], VerifyResponse)


def test_a_session_that_cannot_be_reopened_fails_clearly(toy_pair):
    from covspec.runtime.device import EdgeError

    target, draft = toy_pair
    sample = next(s for s in load_split("test", 12) if s.kind == "describe")
    edge = Edge(target)

    def amnesiac(payload: bytes, peer: str = ""):  # loses every session as soon as it opened it
        for msg, frame in edge.handle(payload, peer):
            yield msg, frame
            if isinstance(msg, SessionOpened):
                edge.sessions.clear()

    transport = InProcessTransport(amnesiac, Link(colocated_profile()))
    try:
        with pytest.raises(EdgeError, match="unknown_session"):
            Device(draft, transport, DeviceSettings(method="covspec", max_new_tokens=40, gamma=1)).run(
                sample.image(), sample.question
            )
    finally:
        transport.close()


def test_stale_frames_of_an_old_session_are_ignored(toy_pair):
    target, draft = toy_pair
    sample = load_split("test", 1)[0]
    edge = Edge(target)

    def noisy(payload: bytes, peer: str = ""):
        yield from edge.handle(payload, peer)
        stale = ErrorReply("A" * 16, 0, ErrorCode.UNKNOWN_SESSION, "a late reply to a session closed long ago")
        yield stale, encode(stale)

    transport = InProcessTransport(noisy, Link(colocated_profile()))
    try:
        r = Device(draft, transport, DeviceSettings(method="covspec", max_new_tokens=24)).run(
            sample.image(), sample.question
        )
    finally:
        transport.close()
    assert r.session_reopens == 0 and r.token_ids
    assert decode(encode(ErrorReply("", -1, "x", "y"))).session_id == ""
    assert copy.copy(r.token_ids) == r.token_ids


def test_edge_batching_pipeline_prints_costs_and_saturation_capacity(capsys):
    from pipelines import edge_batching

    argv = ["--batches", "1,2", "--repeats", "1", "--tau", "4", "--tokens", "10", "threads=1", "data.limit=2"]
    assert edge_batching.main(argv) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "decode" in out and "prefill" in out and "edge capacity at saturation" in out
    assert "fused" in out and "separate prefill" in out
    assert "1 torch threads, medians" in out  # as the edge computes (cluster.edge_threads): no hint
    assert edge_batching.main(["--batches", "1", "--repeats", "1", "threads=2", "data.limit=1"]) == 0
    assert "threads=1 to time it so" in capsys.readouterr().out  # a thread count other than the edge's is flagged
    rows = [{"kind": k, "batch": b, "ms": ms} for k, b, ms in
            (("verify", 1, 10.0), ("decode", 1, 5.0), ("prefill", 1, 20.0), ("fused", 1, 22.0))]  # fmt: skip
    (cap,) = edge_batching.saturation(rows, tau=4.0, tokens=10.0)
    assert cap["target_only"] == pytest.approx(10 / (0.020 + 10 * 0.005))
    assert cap["speculative"] == pytest.approx(10 / (0.022 + 1.5 * 0.010))  # the first of 2.5 rounds is fused
    assert cap["separate_prefill"] == pytest.approx(10 / (0.020 + 2.5 * 0.010))
    assert cap["ratio_decode_only"] == pytest.approx((4 / 0.010) / (1 / 0.005))
    assert "paired" in out
    # paired ratios: batch 4 is 2x batch 1's throughput in every repeat although the host slowed 3x in the second
    paired = edge_batching.paired_ratios({1: [0.010, 0.030, 0.010], 4: [0.020, 0.060, 0.020]})
    assert paired[4] == pytest.approx({"paired_vs_batch_1": 2.0, "paired_p25": 2.0, "paired_p75": 2.0})
    assert paired[1]["paired_vs_batch_1"] == 1.0
    spread = edge_batching.paired_ratios({1: [0.01] * 4, 8: [0.08, 0.04, 0.02, 0.04]})[8]
    assert spread == pytest.approx({"paired_vs_batch_1": 2.0, "paired_p25": 1.75, "paired_p75": 2.5})


def test_edge_statistics_of_replicas_and_passes_add_up():
    from covspec.cluster.edge_app import add_stats, diff_stats, total_stats

    a = {"busy_s": 1.0, "verify_rounds": 3, "batch_sizes": {1: 2, 4: 1}}
    b = {"busy_s": 0.5, "verify_rounds": 1, "batch_sizes": {"4": 2}}  # keys as they may come back from a board
    total = total_stats({"r1": a, "r2": b})
    assert total["busy_s"] == 1.5 and total["verify_rounds"] == 4 and total["replicas"] == 2
    assert total["batch_sizes"] == {1: 2, 4: 3} and total["cpu_s"] == 0
    assert total_stats({}) == {**add_stats({}, {}), "replicas": 0}
    phase = diff_stats(total, total_stats({"r1": a}))
    assert phase["busy_s"] == 0.5 and phase["batch_sizes"] == {4: 2}
    assert add_stats(phase, phase)["batch_sizes"] == {4: 4}


def test_fused_prefill_answers_the_first_round_as_a_separate_prefill_does(target):
    """With a fused prefill (the default; nothing asks this edge to prefill when idle) a speculative session's
    prefill waits for its first block and both run in one forward: the verdicts, the caches after them and the next
    round equal the unfused edge's; a chain and a token tree; an OpenSession and its first block in one batch; a
    refused first block changes nothing."""
    samples = load_split("test", 3, offset=11)
    fused, plain = Edge(target), Edge(target, prefill="separate")
    for i, s in enumerate(samples):
        greedy = _greedy_blocks(target, s, 5)
        if i == 0:  # a token tree: the main chain is wrong at node 3, a branch from node 2 holds the right token
            right = _greedy_blocks(target, s, 6)[3]
            ids, branches = greedy[:4], [2, 1]
            ids = [*ids[:3], (right + 1) % target.vocab_size or 5, right]
        else:
            ids, branches = greedy, []
        verdicts, caches = [], []
        for edge in (fused, plain):
            sid = _open(edge, target, s)
            assert (edge.sessions[sid].state is None) == (edge is fused)  # fused: nothing computed yet
            bad = VerifyRequest(sid, 1, ids, committed_len=0, last_token=-1, branches=branches)  # wrong seq
            assert isinstance(edge.process([Frame(encode(bad))])[0][0][0], ErrorReply)
            assert (edge.sessions[sid].state is None) == (edge is fused)  # refused: still pending
            block = VerifyRequest(sid, 0, ids, committed_len=0, last_token=-1, branches=branches)
            verdict = edge.process([Frame(encode(block))])[0][0][0]
            assert isinstance(verdict, VerifyResponse)
            nxt = VerifyRequest(sid, 1, [5, 6], committed_len=verdict.num_accepted + 1, last_token=verdict.token)
            verdicts.append((verdict.num_accepted, verdict.token, verdict.leaf, edge.process([Frame(encode(nxt))])[0]))
            caches.append(edge.sessions[sid])
        (a_n, a_tok, a_leaf, a_next), (b_n, b_tok, b_leaf, b_next) = verdicts
        assert (a_n, a_tok, a_leaf) == (b_n, b_tok, b_leaf)
        assert (a_next[0][0].num_accepted, a_next[0][0].token) == (b_next[0][0].num_accepted, b_next[0][0].token)
        assert caches[0].state.seq_len == caches[1].state.seq_len and caches[0].committed == caches[1].committed
        torch.testing.assert_close(caches[0].last_logits, caches[1].last_logits, atol=1e-4, rtol=1e-4)
        if i == 0:
            assert a_n == 4 and a_leaf == 4  # the branch's path was accepted
    assert fused.stats.fused_prefills == 3 and plain.stats.fused_prefills == 0
    assert fused.stats.forwards == 3 + 3 and plain.stats.forwards == 3 + 3 + 3  # open + round 0 in one forward
    assert 0 < fused.stats.prefill_s <= fused.stats.busy_s and fused.stats.verify_rounds == plain.stats.verify_rounds
    # an OpenSession and its first block in the same batch: the block waits for the open (second pass), one forward
    s = samples[1]
    ids = target.prepare(s.image(), s.question).input_ids.tolist()
    sid = new_session_id()
    opened = OpenSession(sid, "covspec", ids, png_bytes(s.image()), "png", 0.0, 1.0, 32, 3, 4)
    block = VerifyRequest(sid, 0, _greedy_blocks(target, s, 5), committed_len=0, last_token=-1)
    forwards = fused.stats.forwards
    replies = fused.process([Frame(encode(opened)), Frame(encode(block))])
    assert isinstance(replies[0][0][0], SessionOpened) and isinstance(replies[1][0][0], VerifyResponse)
    assert fused.stats.forwards == forwards + 1
    # target_only streams start decoding at once: their prefill is never deferred
    assert fused.sessions[_open(fused, target, s, method="target_only")].state is not None
    # several sessions' first blocks in one batch: one batched fused forward, the same verdicts as the plain edge
    verdicts = []
    for edge in (fused, plain):
        sids = [_open(edge, target, s) for s in samples]
        blocks = [_greedy_blocks(target, s, 3 + i) for i, s in enumerate(samples)]
        before = (edge.stats.forwards, edge.stats.prefill_forwards, edge.stats.prefills)
        out = edge.process([Frame(encode(VerifyRequest(sid, 0, b, committed_len=0, last_token=-1)))
                            for sid, b in zip(sids, blocks, strict=True)])  # fmt: skip
        verdicts.append([(r[0][0].num_accepted, r[0][0].token) for r in out])
        after = (edge.stats.forwards, edge.stats.prefill_forwards, edge.stats.prefills)
        # fused: one forward prefilled 3 sessions; plain: they were prefilled one by one when opened
        assert [a - b for a, b in zip(after, before, strict=True)] == ([1, 1, 3] if edge is fused else [1, 0, 0])
    assert verdicts[0] == verdicts[1] and fused.stats.fused_prefills == 3 + 1 + 3
    assert plain.stats.prefills == plain.stats.prefill_forwards == 3 + 3


def test_an_idle_edge_prefills_waiting_sessions_and_a_busy_one_fuses(target):
    """``prefill="idle"`` (the default): ``prefill_idle`` prefills the sessions still waiting for their first block
    (one batched forward, on the busy and prefill clocks), whose blocks are then verified as on a separate-prefill
    edge; ``fused`` never prefills when idle; a transport calls the hook when no frame waits."""
    samples = load_split("test", 2, offset=11)
    idle, fused, plain = Edge(target), Edge(target, prefill="fused"), Edge(target, prefill="separate")
    sids = {id(e): [_open(e, target, s) for s in samples] for e in (idle, fused, plain)}
    assert fused.prefill_idle() == 0 and plain.prefill_idle() == 0
    assert all(fused.sessions[sid].state is None for sid in sids[id(fused)])
    busy = idle.stats.busy_s
    assert idle.prefill_idle() == 2 and idle.prefill_idle() == 0  # both at once; then nothing waits
    assert idle.stats.busy_s > busy and idle.stats.prefill_s > 0
    st = idle.stats
    assert (st.prefills, st.idle_prefills, st.prefill_forwards, st.fused_prefills) == (2, 2, 1, 0)
    busy_with_another = _open(idle, target, samples[0])  # waits, and ...
    idle.process(
        [Frame(encode(VerifyRequest(_open(idle, target, samples[1]), 0, [5], committed_len=0, last_token=-1)))]
    )  # ... another session is mid-request: no prefill now
    assert idle.prefill_idle() == 0 and idle.sessions[busy_with_another].state is None
    verdicts = []
    for edge in (idle, fused, plain):
        out = edge.process([Frame(encode(VerifyRequest(sid, 0, _greedy_blocks(target, s, 4), committed_len=0,
                                                       last_token=-1)))
                            for sid, s in zip(sids[id(edge)], samples, strict=True)])  # fmt: skip
        verdicts.append([(r[0][0].num_accepted, r[0][0].token) for r in out])
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert (idle.stats.fused_prefills, fused.stats.fused_prefills) == (1, 2)  # idle: the mid-request one fused
    with pytest.raises(ValueError, match="prefill must be"):
        Edge(target, prefill="lazy")
    from covspec.config import ConfigError, load_config
    from covspec.runtime.edge import prefill_policy

    assert (prefill_policy("auto", shared=True), prefill_policy("auto", shared=False)) == ("fused", "idle")
    assert prefill_policy("separate", shared=True) == "separate"
    with pytest.raises(ConfigError, match=r"verification\.prefill"):
        load_config(overrides=["verification.prefill=lazy"])
    calls = []

    def echo(payload: bytes):
        yield from ()

    transport = InProcessTransport(echo, Link(colocated_profile()), idle=lambda: calls.append(1))
    try:
        transport.send(MoreCandidates("A" * 16, 0))
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        transport.close()
    assert calls == [1]


def test_an_idle_prefill_the_model_refuses_is_not_retried(target, monkeypatch):
    edge = Edge(target, prefill="idle")
    sample = load_split("test", 1)[0]
    sid = _open(edge, target, sample)
    block = VerifyRequest(sid, 0, _greedy_blocks(target, sample, 3), committed_len=0, last_token=-1)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise ValueError("prompt holds 3 image placeholders, the image has 4 visual tokens")

    monkeypatch.setattr(target, "prefill", refuse)
    assert edge.prefill_idle() == 0 and edge.prefill_idle() == 0 and calls == [1]  # tried once
    assert edge.sessions[sid].idle_refused and edge.stats.prefills == 0
    assert isinstance(edge.process([Frame(encode(block))])[0][0][0], VerifyResponse)  # its block fuses as usual
