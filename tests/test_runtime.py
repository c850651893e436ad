"""The device<->edge engine end to end: greedy equality for every method, bad frames, byte accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covspec.data.shapes import load_split
from covspec.decoding.autoregressive import generate
from covspec.models.base import cut_at_eos
from covspec.models.llava import LlavaAdapter
from covspec.models.tiny import TINY_SPECS, TinySpec, tiny_llava
from covspec.protocol import (
    PROJECTED_VOCAB,
    PROTOCOL_VERSION,
    Close,
    ErrorReply,
    Link,
    LinkProfile,
    MoreCandidates,
    OpenSession,
    Round,
    VerifyRequest,
    VerifyResponse,
    decode,
    encode,
    new_session_id,
    probs_to_bytes,
    projected_decoding_bytes,
)
from covspec.runtime.device import SPECULATIVE_METHODS, Device, DeviceSettings, EdgeError, png_bytes
from covspec.runtime.edge import Edge
from covspec.runtime.engine import colocated_profile
from covspec.runtime.transport import InProcessTransport

METHODS = ("target_only", *SPECULATIVE_METHODS)


def run(edge, draft, method, sample, profile=None, **settings):
    transport = InProcessTransport(edge.handle, Link(profile or colocated_profile()))
    try:
        return Device(draft, transport, DeviceSettings(method=method, **settings)).run(sample.image(), sample.question)
    finally:
        transport.close()


def reference(target, sample, max_new_tokens):
    return generate(target, target.prepare(sample.image(), sample.question), max_new_tokens).token_ids


def hf_reference(target, sample, max_new_tokens):
    inputs = target.prepare(sample.image(), sample.question)
    out = target.model.generate(input_ids=inputs.input_ids[None], pixel_values=inputs.pixel_values,
                                max_new_tokens=max_new_tokens, do_sample=False)  # fmt: skip
    new = out[0, inputs.input_ids.shape[0] :].tolist()
    return cut_at_eos(new, target.eos_token_ids)


PAIRS = {
    "random-draft": (TINY_SPECS[0], 0, TINY_SPECS[1], 7),  # almost never agrees
    "other-shapes": (TINY_SPECS[2], 2, TINY_SPECS[0], 3),
    "gqa-target": (TINY_SPECS[1], 4, TINY_SPECS[2], 5),
    "self-draft": (TINY_SPECS[0], 1, TINY_SPECS[0], 1),  # the target as its own draft: always agrees
}


@pytest.mark.parametrize("pair", PAIRS)
def test_greedy_equals_target_generate_for_every_method(pair):
    tspec, tseed, dspec, dseed = PAIRS[pair]
    target, draft = tiny_llava(tspec, tseed), tiny_llava(dspec, dseed)
    edge = Edge(target)
    for sample in load_split("test", 2, offset=3):
        expected = hf_reference(target, sample, 24)
        for method in METHODS:
            r = run(edge, draft, method, sample, max_new_tokens=24, gamma=4)
            assert r.token_ids == expected, (pair, method)
            if method != "target_only" and pair == "self-draft":
                assert r.num_accepted == r.num_drafted  # every draft accepted
    assert not edge.sessions, "sessions must be closed"


def with_eos(adapter: LlavaAdapter, eos_ids: list[int]) -> LlavaAdapter:
    """The same model with ``generation_config.eos_token_id = eos_ids``, adapted afresh (as a checkpoint would be)."""
    adapter.model.generation_config.eos_token_id = list(eos_ids)
    return LlavaAdapter(adapter.model, adapter.processor)


PIPELINED = dict(policy="adaptive", gamma=3, gamma_max=6, threshold=0.5, branch_budget=3)


@pytest.mark.parametrize("draft_seed", [1, 7], ids=["self-draft", "other-draft"])
def test_a_second_eos_id_ends_the_answer_for_every_method(draft_seed):
    """Chat checkpoints list several EOS ids (Qwen2-VL: <|im_end|>, <|endoftext|>); ``generate`` stops at any.
    Make a token the target emits mid-answer a second EOS: every method, fixed and pipelined, must stop there too."""
    target = tiny_llava(TINY_SPECS[0], 1)
    sample = load_split("test", 1, offset=3)[0]
    full = reference(target, sample, 24)
    assert len(full) >= 4
    stop = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    eos = [target.eos_token_id, full[stop]]
    target = with_eos(target, eos)
    draft = with_eos(tiny_llava(TINY_SPECS[0] if draft_seed == 1 else TINY_SPECS[1], draft_seed), eos)
    assert target.eos_token_ids == frozenset(eos) and target.eos_token_id == eos[0]
    assert hf_reference(target, sample, 24) == full[:stop]  # transformers stops at the second id
    assert reference(target, sample, 24) == full[:stop]
    edge = Edge(target)
    for method in METHODS:
        for settings in ({"gamma": 4}, PIPELINED) if method != "target_only" else ({},):
            r = run(edge, draft, method, sample, max_new_tokens=24, **settings)
            assert r.token_ids == full[:stop], (method, settings)
    assert not edge.sessions


def test_draft_and_target_with_different_eos_ids_are_refused_clearly():
    target = tiny_llava(TINY_SPECS[0], 1)
    target = with_eos(target, [target.eos_token_id, 5])
    draft = tiny_llava(TINY_SPECS[0], 1)
    with pytest.raises(EdgeError, match=r"EOS ids \[.*5\].*draft and target must share them"):
        run(Edge(target), draft, "covspec", load_split("test", 1)[0], max_new_tokens=8)
    # target_only does not draft: the edge alone decides where the answer ends
    assert run(Edge(target), draft, "target_only", load_split("test", 1)[0], max_new_tokens=8).token_ids is not None


def test_toy_pair_greedy_equal_and_accepts(toy_pair):
    target, draft = toy_pair
    edge = Edge(target)
    profile = LinkProfile(rtt_ms=4, jitter_ms=1, up_mbps=50, down_mbps=50, loss=0.1)
    for sample in load_split("test", 3):
        expected = reference(target, sample, 48)
        assert expected == hf_reference(target, sample, 48)
        for method in METHODS:
            r = run(edge, draft, method, sample, profile, max_new_tokens=48, gamma=5)
            assert r.token_ids == expected, method
            if method != "target_only":
                assert r.num_accepted > 0  # partial agreement: the trained draft is right often, not always


def test_sampling_runs_for_every_method_and_is_seeded(toy_pair):
    target, draft = toy_pair
    edge = Edge(target)
    sample = load_split("test", 1, offset=4)[0]
    for method in METHODS:
        a = run(edge, draft, method, sample, max_new_tokens=32, temperature=1.0, top_p=0.9, seed=11)
        b = run(edge, draft, method, sample, max_new_tokens=32, temperature=1.0, top_p=0.9, seed=11)
        assert a.token_ids == b.token_ids and len(a.token_ids) > 0, method


def test_vanilla_bytes_match_the_formula():
    target, draft = tiny_llava(TINY_SPECS[0], 0), tiny_llava(TINY_SPECS[0], 9)
    edge = Edge(target)
    sample = load_split("test", 1)[0]
    v = target.vocab_size
    for temperature in (0.0, 1.0):
        for method in SPECULATIVE_METHODS:
            r = run(edge, draft, method, sample, max_new_tokens=20, gamma=3, temperature=temperature)
            formula = projected_decoding_bytes(method, r.round_log, target.vocab_size, sampling=temperature > 0,
                                               num_candidates=4, close=not r.closed_by_edge)  # fmt: skip
            counted = r.traffic.total("up", "decoding") + r.traffic.total("down", "decoding")
            assert counted == formula["total"], (method, temperature)  # the formula counts the Close frame too
            # the reported projection (the frames re-sized) equals the chain formulas at a real vocabulary
            projected = projected_decoding_bytes(method, r.round_log, PROJECTED_VOCAB, sampling=temperature > 0,
                                                 num_candidates=4, close=not r.closed_by_edge)  # fmt: skip
            assert r.metrics()["projected_bytes_decoding"] == projected["total"] > counted, (method, temperature)
            assert r.traffic.messages["up", "Close"] == (not r.closed_by_edge), (method, temperature)
            assert r.closed_by_edge or temperature > 0, method  # greedy: the edge knows every round's last token
            if method == "vanilla_sd":
                # the float32 distributions alone: k q-rows up and k+1 p-rows down per round
                floats = sum(4 * rnd.k * v + 4 * (rnd.k + 1) * v for rnd in r.round_log)
                assert floats < counted < floats + 96 * len(r.round_log) + 64  # + ids, headers, Close


# -- bad frames -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_edge():
    target = tiny_llava(TINY_SPECS[0], 0)
    return target, Edge(target)


def _open(edge, target, sample, method="covspec", temperature=0.0):
    sid = new_session_id()
    inputs = target.prepare(sample.image(), sample.question)
    msg = OpenSession(sid, method, inputs.input_ids.tolist(), png_bytes(sample.image()), "png", temperature, 1.0,
                      16, 0, 2)  # fmt: skip
    replies = [m for m, _ in edge.handle(encode(msg))]
    assert type(replies[0]).__name__ == "SessionOpened"
    return sid


def _reply(edge, frame: bytes):
    (msg, payload), *_ = list(edge.handle(frame))
    assert decode(payload) == msg
    return msg


def _snapshot(edge, sid):
    """A session's state; a session whose prefill waits for its first block (fused prefill) has no cache yet."""
    s = edge.sessions[sid]
    if s.state is None:
        return (s.seq, list(s.committed), s.length, None, torch.zeros(0))
    return (s.seq, list(s.committed), s.state.seq_len, s.state.cache_len, s.last_logits.clone())


BAD_REQUESTS = {
    "unknown session": lambda sid, v: VerifyRequest("A" * 16, 0, [5], committed_len=0, last_token=-1),
    "wrong seq": lambda sid, v: VerifyRequest(sid, 3, [5], committed_len=0, last_token=-1),
    "token outside vocab": lambda sid, v: VerifyRequest(sid, 0, [5, v], committed_len=0, last_token=-1),
    "wrong committed_len": lambda sid, v: VerifyRequest(sid, 0, [5], committed_len=2, last_token=-1),
    "last_token in round 0": lambda sid, v: VerifyRequest(sid, 0, [5], committed_len=0, last_token=6),
    "q for greedy": lambda sid, v: VerifyRequest(
        sid, 0, [5], committed_len=0, last_token=-1, draft_probs=probs_to_bytes(np.array([0.5]))
    ),
    "dists outside vanilla": lambda sid, v: VerifyRequest(
        sid, 0, [5], committed_len=0, last_token=-1, draft_dists=probs_to_bytes(np.ones(v) / v)
    ),
    "block beyond max_new_tokens": lambda sid, v: VerifyRequest(sid, 0, [5] * 17, committed_len=0, last_token=-1),
    "more candidates before any": lambda sid, v: MoreCandidates(sid, 0),
}


@pytest.mark.parametrize("prefill", ["fused", "separate"])
@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_error_reply_and_changes_nothing(tiny_edge, case, prefill):
    """Refused on a session whose prefill waits for the first block (the default) and on a prefilled one."""
    target, _ = tiny_edge
    edge = Edge(target, prefill=prefill)
    sample = load_split("test", 1)[0]
    sid = _open(edge, target, sample)
    before = _snapshot(edge, sid)
    reply = _reply(edge, encode(BAD_REQUESTS[case](sid, target.vocab_size)))
    assert isinstance(reply, ErrorReply), case
    after = _snapshot(edge, sid)
    assert before[:4] == after[:4] and torch.equal(before[4], after[4])
    ok = _reply(edge, encode(VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1)))
    assert isinstance(ok, VerifyResponse)


def test_bad_probabilities_and_raw_frames_are_refused(tiny_edge):
    target, edge = tiny_edge
    sample = load_split("test", 1)[0]
    sid = _open(edge, target, sample, temperature=1.0)
    before = _snapshot(edge, sid)
    for q in (math.nan, 0.0, -0.5, math.inf):
        frame = encode(
            VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1, draft_probs=probs_to_bytes(np.array([q])))
        )
        assert isinstance(_reply(edge, frame), ErrorReply), q
    short = encode(
        VerifyRequest(sid, 0, [5, 6], committed_len=0, last_token=-1, draft_probs=probs_to_bytes(np.array([0.5])))
    )
    assert _reply(edge, short).code == "length_mismatch"
    v = bytes([PROTOCOL_VERSION])
    for frame in (b"", v, b"\x07\x91\x02", v + b"\x93\x02\xa1x", v + b"\x92\x02" + b"\xc6\xff\xff\xff\xff"):
        assert isinstance(_reply(edge, frame), ErrorReply)
    huge = encode(VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1,
                                draft_dists=b"\x00" * (65 << 20)))  # fmt: skip
    assert _reply(edge, huge).code == "too_large"
    after = _snapshot(edge, sid)
    assert before[:4] == after[:4]


def test_reused_session_id_and_closed_session(tiny_edge):
    target, edge = tiny_edge
    sample = load_split("test", 1)[0]
    sid = _open(edge, target, sample)
    inputs = target.prepare(sample.image(), sample.question)
    again = OpenSession(sid, "covspec", inputs.input_ids.tolist(), png_bytes(sample.image()), "png", 0.0, 1.0, 8, 0, 2)
    assert _reply(edge, encode(again)).code == "session_exists"
    assert list(edge.handle(encode(Close(sid)))) == []
    reply = _reply(edge, encode(VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1)))
    assert reply.code == "unknown_session"


def test_wrong_correction_token_is_refused(tiny_edge):
    """A device cannot commit a token the edge did not allow (greedy: the target argmax)."""
    target, edge = tiny_edge
    sample = load_split("test", 1)[0]
    sid = _open(edge, target, sample)
    first = _reply(edge, encode(VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1)))
    wrong = (first.token + 1) % target.vocab_size
    bad = _reply(edge, encode(VerifyRequest(sid, 1, [5], committed_len=first.num_accepted + 1, last_token=wrong)))
    assert isinstance(bad, ErrorReply) and "last_token" in bad.message
    good = _reply(
        edge, encode(VerifyRequest(sid, 1, [5], committed_len=first.num_accepted + 1, last_token=first.token))
    )
    assert isinstance(good, VerifyResponse)


def test_edge_error_surfaces_on_device():
    """A pair whose prompt the edge cannot use ends the request with a clear error, not a hang."""
    target = tiny_llava(TinySpec(), 0)
    edge = Edge(target)
    sample = load_split("test", 1)[0]
    transport = InProcessTransport(edge.handle, Link(colocated_profile()))
    transport.send_raw(bytes([PROTOCOL_VERSION]) + b"\x91\x63")
    assert isinstance(transport.recv(timeout=5), ErrorReply)
    transport.close()
    r = run(edge, tiny_llava(TinySpec(), 1), "covspec", sample, max_new_tokens=4)
    assert len(r.token_ids) > 0
    assert r.round_log and isinstance(r.round_log[0], Round)


def test_every_session_is_closed_once_by_the_edge_or_the_device():
    """The verdict that ends an answer closes the session where the edge knows the round's last token (greedy, or a
    bonus it drew); otherwise the device sends Close. Device and edge apply the same rule: after requests of every
    method, greedy and sampling, token trees included, the edge holds no session and refused no frame."""
    target, draft = tiny_llava(TINY_SPECS[0], 0), tiny_llava(TINY_SPECS[0], 0, 0.6)
    edge = Edge(target)
    sample = load_split("test", 1)[0]
    by_edge = {True: 0, False: 0}
    for temperature in (0.0, 1.0):
        for method, extra in [*((m, {}) for m in SPECULATIVE_METHODS), ("covspec", {"tree": 2}),
                              ("target_only", {})]:  # fmt: skip
            for seed in range(3):
                r = run(edge, draft, method, sample, max_new_tokens=12, gamma=3, temperature=temperature, seed=seed,
                        **extra)  # fmt: skip
                by_edge[r.closed_by_edge] += method != "target_only"
    assert not edge.sessions and edge.stats.errors == 0
    assert by_edge[True] > 0 and by_edge[False] > 0, by_edge  # both ways were taken
