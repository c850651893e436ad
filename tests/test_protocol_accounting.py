"""Byte accounting: the counter, and byte formulas equal to the real encoded frame sizes."""

import pickle

import pytest

from covspec.protocol import (
    Close,
    MoreCandidates,
    OpenSession,
    Round,
    SessionOpened,
    TokenChunk,
    TrafficCounter,
    VerifyRequest,
    VerifyResponse,
    encode,
    expected_bytes,
    new_session_id,
    projected_decoding_bytes,
)
from covspec.protocol.accounting import ids_bytes, int_bytes

QWEN_VOCAB = 151_936
SID = new_session_id()
MODES = ("vanilla_sd", "dssd", "covspec")


def f32s(n: int) -> bytes:
    return b"\x00\x00\x80\x3f" * n  # float32 1.0: sizes only, decode is not involved


def round_messages(mode, k, num_accepted, vocab, *, sampling, m, seq, committed, more=0, tok=None):
    """The frames of one verification round, built as the runtime will (the conventions in messages.py)."""
    tok = vocab - 1 if tok is None else tok
    rejected = num_accepted < k
    up = [
        VerifyRequest(
            session_id=SID,
            seq=seq,
            draft_ids=[tok] * k,
            draft_probs=f32s(k) if sampling else b"",
            draft_dists=f32s(k * vocab) if mode == "vanilla_sd" else b"",
            committed_len=committed,
            last_token=-1 if seq == 0 else tok,
        )
    ]
    if mode == "vanilla_sd":
        token, cands, rows = -1, 0, k + 1
    elif rejected and mode == "dssd":
        token, cands, rows = -1, 0, 1
    elif rejected and sampling:
        token, cands, rows = -1, m, 0
    else:
        token, cands, rows = tok, 0, 0

    def reply(token, cands, rows):
        return VerifyResponse(
            session_id=SID,
            seq=seq,
            num_accepted=num_accepted,
            token=token,
            candidate_ids=[tok] * cands,
            candidate_probs=f32s(cands),
            target_dists=f32s(rows * vocab),
        )

    down = [reply(token, cands, rows)]
    for _ in range(more):
        up.append(MoreCandidates(session_id=SID, seq=seq))
        down.append(reply(-1, m, 0))
    return up, down


@pytest.mark.parametrize("vocab", [50, 300, 70_000, QWEN_VOCAB])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sampling", [True, False])
def test_round_formulas_equal_encoded_sizes(vocab, mode, sampling):
    for k, num_accepted, seq, committed in [(1, 0, 0, 0), (5, 5, 130, 300), (5, 2, 7, 70_000), (16, 3, 300, 5)]:
        up, down = round_messages(mode, k, num_accepted, vocab, sampling=sampling, m=4, seq=seq, committed=committed)
        common = dict(sampling=sampling, seq=seq)
        assert len(encode(up[0])) == expected_bytes("VerifyRequest", mode, k, vocab, committed_len=committed, **common)
        assert len(encode(down[0])) == expected_bytes(
            "VerifyResponse", mode, k, num_accepted, vocab, num_candidates=4, **common
        )


@pytest.mark.parametrize("tok", [3, 200, 1000, 70_000])
def test_id_size_parameter(tok):
    up, down = round_messages("covspec", 5, 2, QWEN_VOCAB, sampling=True, m=4, seq=0, committed=0, tok=tok)
    kw = dict(sampling=True, id_bytes=int_bytes(tok))
    assert len(encode(up[0])) == expected_bytes("VerifyRequest", "covspec", 5, QWEN_VOCAB, **kw)
    assert len(encode(down[0])) == expected_bytes("VerifyResponse", "covspec", 5, 2, QWEN_VOCAB, num_candidates=4, **kw)


def test_control_message_formulas():
    assert len(encode(Close(session_id=SID))) == expected_bytes("Close")
    assert len(encode(MoreCandidates(session_id=SID, seq=300))) == expected_bytes("MoreCandidates", 300)
    msg = SessionOpened(session_id=SID, vocab_size=QWEN_VOCAB)
    assert len(encode(msg)) == expected_bytes("SessionOpened", QWEN_VOCAB)
    msg = SessionOpened(session_id=SID, vocab_size=QWEN_VOCAB, eos_ids=[151643, 151645])
    assert len(encode(msg)) == expected_bytes("SessionOpened", QWEN_VOCAB, [151643, 151645])
    chunk = TokenChunk(session_id=SID, seq=20, token_ids=[QWEN_VOCAB - 1] * 17, finished=True)
    assert len(encode(chunk)) == expected_bytes("TokenChunk", 17, QWEN_VOCAB, seq=20)
    prompt = [1, 200, 70_000] * 30
    msg = OpenSession(SID, "covspec", prompt, b"\x89PNG\r\n\x1a\n" + bytes(70_000), "png", 0.7, 0.9, 256, 12345, 4)
    assert len(encode(msg)) == expected_bytes(
        "OpenSession", prompt, 70_008, "covspec", max_new_tokens=256, seed=12345, num_candidates=4
    )


def test_ids_bytes_matches_msgpack():
    import msgspec

    for ids in ([], [0], [127, 128, 255, 256, 65535, 65536], list(range(20))):
        assert ids_bytes(ids) == len(msgspec.msgpack.encode(ids))


def simulate(mode, rounds, vocab, *, sampling, m=4):
    """Real encoded decoding traffic of a request with these rounds (worst-case ids for the vocabulary)."""
    counter = TrafficCounter()
    committed = 0
    for seq, r in enumerate(rounds):
        r = Round(*r)
        if mode == "target_only":
            counter.record("down", "TokenChunk", len(encode(TokenChunk(SID, seq, [vocab - 1] * r.k, False))))
            continue
        up, down = round_messages(
            mode, r.k, r.num_accepted, vocab, sampling=sampling, m=m, seq=seq, committed=committed, more=r.more_requests
        )
        for msg in up:
            counter.record("up", msg, len(encode(msg)))
        for msg in down:
            counter.record("down", msg, len(encode(msg)))
        committed += r.num_accepted + 1
    if mode != "target_only":  # a target_only stream ends at the edge
        counter.record("up", Close, len(encode(Close(session_id=SID))))
    return counter


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sampling", [True, False])
def test_projected_figure_equals_real_encoding_at_qwen_vocab(mode, sampling):
    more = (2, 1) if mode == "covspec" and sampling else (0, 0)
    rounds = [Round(5, 5), Round(4, 1, more[0]), Round(6, 0), Round(3, 2, more[1])]
    counter = simulate(mode, rounds, QWEN_VOCAB, sampling=sampling)
    projected = projected_decoding_bytes(mode, rounds, QWEN_VOCAB, sampling=sampling, num_candidates=4)
    assert projected == {
        "up": counter.total("up", "decoding"),
        "down": counter.total("down", "decoding"),
        "total": counter.decoding_bytes,
    }


@pytest.mark.parametrize("mode", (*MODES, "target_only"))
def test_projection_exact_over_long_requests(mode):
    """Hundreds of rounds: seq and committed_len cross the 1-, 2- and 3-byte msgpack int boundaries."""
    rounds = [Round(1 + i % 7, (i * 3) % (2 + i % 7), i % 3 == 0) for i in range(300)]
    rounds = [Round(r.k, min(r.num_accepted, r.k), int(r.more_requests and mode == "covspec")) for r in rounds]
    counter = simulate(mode, rounds, 60, sampling=True)
    assert projected_decoding_bytes(mode, rounds, 60, sampling=True, num_candidates=4)["total"] == counter.total()


def test_covspec_messages_are_small_and_vocabulary_free():
    """k=5, m=4, sampling with a rejection: tens of bytes each way; vanilla ships megabytes at V=151,936."""
    up, down = round_messages("covspec", 5, 2, 64, sampling=True, m=4, seq=3, committed=12)
    assert len(encode(up[0])) < 64 and len(encode(down[0])) < 64
    covspec = projected_decoding_bytes("covspec", [Round(5, 2)] * 10, QWEN_VOCAB, sampling=True, num_candidates=4)
    vanilla = projected_decoding_bytes("vanilla_sd", [Round(5, 2)] * 10, QWEN_VOCAB, sampling=True)
    dssd = projected_decoding_bytes("dssd", [Round(5, 2)] * 10, QWEN_VOCAB, sampling=True)
    assert covspec["total"] < 2_000 < 6_000_000 < dssd["total"] < vanilla["total"]
    assert vanilla["total"] > 10 * 4 * 11 * QWEN_VOCAB  # 5 q rows up + 6 p rows down per round


def test_counter_separates_upload_from_decoding():
    c = TrafficCounter()
    c.record("up", "OpenSession", 10_000)
    c.record("down", SessionOpened, 30)
    c.record("up", VerifyRequest(SID, 0, [1], b"", b"", 0, -1), 50)
    c.record("down", "VerifyResponse", 40)
    c.record("down", "VerifyResponse", 45)
    c.record("up", "Close", 25)
    assert (c.upload_bytes, c.decoding_bytes, c.total()) == (10_030, 160, 10_190)
    assert (c.total("up", "decoding"), c.total("down", "decoding")) == (75, 85)
    d = c.to_dict()
    assert d["down.VerifyResponse.bytes"] == 85 and d["down.VerifyResponse.messages"] == 2
    assert d["up.VerifyRequest.bytes"] == 50
    assert (d["upload_bytes_up"], d["upload_bytes_down"], d["decoding_bytes"], d["total_bytes"]) == (
        10_000,
        30,
        160,
        10_190,
    )
    assert TrafficCounter.from_dict(d) == c
    with pytest.raises(ValueError, match="direction"):
        c.record("sideways", "Close", 1)


def test_counters_merge_and_pickle():
    a, b = TrafficCounter(), TrafficCounter()
    a.record("up", "VerifyRequest", 50)
    b.record("up", "VerifyRequest", 30)
    b.record("down", "TokenChunk", 7)
    total = a + b
    assert total.to_dict()["up.VerifyRequest.bytes"] == 80 and total.decoding_bytes == 87
    assert a.decoding_bytes == 50  # + leaves its operands alone
    a += b
    assert a == total
    assert pickle.loads(pickle.dumps(a)) == a


# -- frames projected to another vocabulary (what the runtime reports) ----------------------------------------------


def tree_frames(vocab: int) -> list:
    """One frame of every decoding type, token trees and sampling alternatives included, ids below ``vocab``."""
    from covspec.protocol import AltVerdict

    t = vocab - 1
    return [
        VerifyRequest(SID, 4, [t, 3, t, 5, 6], 12, t, f32s(5), b"", [0, 2, 1, 1], via=2),
        VerifyRequest(SID, 0, [t, 3], 0, -1, f32s(2), f32s(2 * vocab)),  # vanilla_sd: k rows of q
        VerifyResponse(
            SID,
            4,
            1,
            -1,
            [t, 2],
            f32s(2),
            b"",
            leaf=1,
            alts=[AltVerdict(3, 1, t, [], b""), AltVerdict(5, 0, -1, [t, 4, 0], f32s(3))],
        ),
        VerifyResponse(SID, 2, 0, -1, target_dists=f32s(3 * vocab)),  # vanilla_sd: k + 1 rows of p
        VerifyResponse(SID, 2, 3, t, leaf=4),
        MoreCandidates(SID, 4, via=5),
        TokenChunk(SID, 9, [t, 0, 7], True),
        Close(SID),
        SessionOpened(SID, vocab, [2, t]),
        OpenSession(SID, "covspec", [1, t, 4], b"png", "png", 1.0, 1.0, 48, 0, 4, committed=[t, 8], seq=3),
    ]


ID_COUNTS = [6, 2, 6, 0, 1, 0, 3, 0, 2, 5]
"""Token ids (not -1) in each of ``tree_frames``: draft_ids and last_token; candidate_ids, token and each
alternative's; token_ids; eos_ids; prompt_ids and committed."""


@pytest.mark.parametrize("vocab", [50, 120])
def test_a_frame_projected_to_its_own_vocabulary_is_its_frame(vocab):
    """Every field is kept as sent (trees, via, leaf, alternatives, seqs), so at the wire vocabulary, with ids of the
    size they had, the projection is the frame's own length."""
    from covspec.protocol import projected_frame_bytes

    for msg in tree_frames(vocab):
        assert projected_frame_bytes(msg, vocab, vocab) == len(encode(msg)), type(msg).__name__


def test_projection_resizes_every_id_and_every_distribution_row():
    """From a 50-token wire vocabulary to 151,936: each id grows from 1 to 5 bytes, each float32 row from 50 to
    151,936 values (with its bin header), SessionOpened's vocab_size from 1 to 5 bytes; nothing else changes."""
    from covspec.protocol import projected_frame_bytes
    from covspec.protocol.accounting import bin_bytes

    for msg, ids in zip(tree_frames(50), ID_COUNTS, strict=True):
        name = type(msg).__name__
        field = {"VerifyRequest": "draft_dists", "VerifyResponse": "target_dists"}.get(name, "")
        rows = len(getattr(msg, field, b"")) // 200 if field else 0
        dists = bin_bytes(4 * rows * QWEN_VOCAB) - bin_bytes(200 * rows) if rows else 0
        grow = 4 * ids + dists + (4 if name == "SessionOpened" else 0)
        assert projected_frame_bytes(msg, QWEN_VOCAB, 50) == len(encode(msg)) + grow, name
        assert projected_frame_bytes(msg, QWEN_VOCAB, 50, id_bytes=3) == len(encode(msg)) + grow - 2 * ids, name
    with pytest.raises(ValueError, match="not float32 rows of 64"):
        projected_frame_bytes(tree_frames(50)[1], QWEN_VOCAB, 64)
    with pytest.raises(ValueError, match="id_bytes"):
        projected_frame_bytes(Close(SID), QWEN_VOCAB, 50, id_bytes=4)


def test_a_projecting_counter_adds_up_the_projected_frames():
    from covspec.protocol import Projection, projected_frame_bytes

    c = TrafficCounter(Projection(QWEN_VOCAB, 50))
    frames = tree_frames(50)
    for msg in frames:
        c.record(
            "down" if isinstance(msg, VerifyResponse | TokenChunk | SessionOpened) else "up", msg, len(encode(msg))
        )
    c.record("down", "undecodable", 13)  # a frame that did not decode counts as it came
    bad = VerifyResponse(SID, 2, 0, -1, target_dists=f32s(7))  # not rows of 50: the device refuses it, counted as sent
    c.record("down", bad, len(encode(bad)))
    want = sum(projected_frame_bytes(m, QWEN_VOCAB, 50) for m in frames) + 13 + len(encode(bad))
    assert c.projected_total() == want
    upload = sum(projected_frame_bytes(m, QWEN_VOCAB, 50) for m in frames if isinstance(m, OpenSession | SessionOpened))
    assert c.projected_total(phase="decoding") == want - upload
    assert c.total() < c.projected_total()
    assert TrafficCounter.from_dict(c.to_dict()).projected == c.projected
    back = pickle.loads(pickle.dumps(c))
    assert back == c and back.projection == c.projection
    assert (c + TrafficCounter()).projected_total() == want
    with pytest.raises(TypeError, match="needs the message"):
        c.record("up", Close, 10)
