"""Wire messages: round trips, and every malformed frame refused with a named code."""

import math

import msgspec
import numpy as np
import pytest

from covspec.protocol import (
    PROTOCOL_VERSION,
    Close,
    ErrorCode,
    ErrorReply,
    Limits,
    MoreCandidates,
    OpenSession,
    ProtocolError,
    SessionOpened,
    TokenChunk,
    VerifyRequest,
    VerifyResponse,
    bytes_to_probs,
    check_against,
    decode,
    encode,
    error_reply,
    new_session_id,
    probs_to_bytes,
    validate_against,
)

V = 50
SID = new_session_id()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(40)


def f32(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def dists(rows: int, vocab: int = V) -> bytes:
    return probs_to_bytes(np.full((rows, vocab), 1 / vocab))


def open_session(**overrides) -> OpenSession:
    fields = dict(
        session_id=SID,
        method="covspec",
        prompt_ids=[1, 2, 3],
        image=PNG,
        image_format="png",
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=64,
        seed=3,
        num_candidates=4,
    )
    return OpenSession(**{**fields, **overrides})


def request(**overrides) -> VerifyRequest:
    fields = dict(
        session_id=SID,
        seq=2,
        draft_ids=[5, 6, 7],
        draft_probs=f32(0.5, 1.0, 0.25),
        draft_dists=b"",
        committed_len=9,
        last_token=4,
    )
    return VerifyRequest(**{**fields, **overrides})


def response(**overrides) -> VerifyResponse:
    fields = dict(
        session_id=SID,
        seq=2,
        num_accepted=1,
        token=-1,
        candidate_ids=[8, 9],
        candidate_probs=f32(0.3, 0.125),
        target_dists=b"",
    )
    return VerifyResponse(**{**fields, **overrides})


ALL_MESSAGES = [
    open_session(),
    request(),
    request(draft_probs=b"", draft_dists=dists(3)),
    MoreCandidates(session_id=SID, seq=2),
    Close(session_id=SID),
    SessionOpened(session_id=SID, vocab_size=V),
    response(),
    response(candidate_ids=[], candidate_probs=b"", token=4, target_dists=dists(1)),
    TokenChunk(session_id=SID, seq=0, token_ids=[1, 2, 49], finished=True),
    ErrorReply(session_id="", seq=-1, code="malformed", message="bad frame"),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert decode(data) == msg
    assert decode(data, expected=type(msg)) == msg


def test_session_ids_are_unique_and_url_safe():
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(s) == 16 and s.replace("-", "").replace("_", "").isalnum() for s in ids)


def test_probs_helpers_round_trip_float32():
    x = np.random.default_rng(0).random((3, 7))
    out = bytes_to_probs(probs_to_bytes(x), rows=3)
    assert out.dtype == np.float32 and out.shape == (3, 7)
    np.testing.assert_allclose(out, x, rtol=1e-6)


def test_probs_to_bytes_accepts_torch():
    torch = pytest.importorskip("torch")
    t = torch.tensor([[0.25, 0.75]], dtype=torch.bfloat16)
    assert probs_to_bytes(t) == f32(0.25, 0.75)


def assert_refused(data: bytes, code: str, *words: str, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, **kwargs)
    assert info.value.code == code, info.value
    for word in words:
        assert word in str(info.value)
    return info.value


def test_unknown_message_type():
    data = bytearray(encode(Close(session_id=SID)))
    data[2] = 99
    assert_refused(bytes(data), ErrorCode.UNKNOWN_TYPE, "99")


def test_wrong_version():
    data = bytearray(encode(Close(session_id=SID)))
    data[0] = 7
    assert_refused(bytes(data), ErrorCode.VERSION, "7")


@pytest.mark.parametrize("cut", [1, 2, 10])
def test_truncated(cut):
    assert_refused(encode(request())[:-cut], ErrorCode.TRUNCATED)


def test_too_short_and_not_a_message():
    assert_refused(bytes([PROTOCOL_VERSION]), ErrorCode.TRUNCATED)
    assert_refused(bytes([PROTOCOL_VERSION]) + msgspec.msgpack.encode({"a": 1}), ErrorCode.MALFORMED)
    assert_refused(encode(Close(session_id=SID)) + b"\x00", ErrorCode.MALFORMED, "trailing")


def test_unexpected_type():
    assert_refused(encode(Close(session_id=SID)), ErrorCode.UNEXPECTED_TYPE, "Close", expected=VerifyResponse)


def test_oversized_payload():
    data = encode(open_session())
    assert_refused(data, ErrorCode.TOO_LARGE, "OpenSession", limits=Limits(max_open_bytes=len(data) - 1))
    assert_refused(encode(request()), ErrorCode.TOO_LARGE, limits=Limits(max_verify_bytes=10))


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (request(seq=-1), "seq"),
        (request(draft_ids=[]), "draft_ids"),
        (request(draft_ids=[1, -2, 3]), "draft_ids[1]"),
        (open_session(session_id="not/url safe"), "session_id"),
        (open_session(method="warp_drive"), "method"),
        (open_session(temperature=math.inf), "temperature"),
        (open_session(top_p=0.0), "top_p"),
        (open_session(num_candidates=0), "num_candidates"),
        (response(token=-2), "token"),
    ],
)
def test_invalid_field_is_named(msg, field):
    assert_refused(encode(msg), ErrorCode.INVALID_FIELD, f"field {field}")


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -0.5, 1.5])
def test_bad_draft_probability(value):
    err = assert_refused(encode(request(draft_probs=f32(0.5, value, 0.5))), ErrorCode.BAD_PROBABILITY)
    assert "draft_probs[1]" in err.message


def test_bad_candidate_probability_and_dist_values():
    assert_refused(encode(response(candidate_probs=f32(0.3, 0.0))), ErrorCode.BAD_PROBABILITY, "candidate_probs[1]")
    bad = np.full(V, 1 / V, dtype="<f4")
    bad[7] = np.nan
    assert_refused(encode(response(target_dists=bad.tobytes())), ErrorCode.BAD_PROBABILITY, "target_dists[7]")
    bad[7] = -0.01
    assert_refused(encode(request(draft_dists=bad.tobytes() * 3)), ErrorCode.BAD_PROBABILITY, "draft_dists[7]")


def test_zero_entries_allowed_in_distributions():
    d = np.zeros((1, V), dtype="<f4")
    d[0, 3] = 1.0
    assert decode(encode(response(target_dists=d.tobytes()))).target_dists == d.tobytes()


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (request(draft_probs=f32(0.5, 0.5)), "draft_probs"),
        (request(draft_dists=dists(3)[:-4]), "draft_dists"),
        (response(candidate_probs=f32(0.3)), "candidate_probs"),
        (response(target_dists=b"\x00\x00\x80"), "target_dists"),
    ],
)
def test_length_mismatch(msg, field):
    assert_refused(encode(msg), ErrorCode.LENGTH_MISMATCH, field)


def test_count_limits():
    assert_refused(encode(request()), ErrorCode.INVALID_FIELD, "len(draft_ids)", limits=Limits(max_draft_len=2))
    assert_refused(encode(open_session()), ErrorCode.INVALID_FIELD, "num_candidates", limits=Limits(max_candidates=3))


def test_image_signature_checked():
    assert_refused(encode(open_session(image=b"GIF89a....")), ErrorCode.INVALID_FIELD, "png")


# ---- checks against the session's state


def refusal(msg, **state) -> ErrorReply:
    reply = validate_against(msg, V, **state)
    assert isinstance(reply, ErrorReply)
    assert decode(encode(reply)) == reply  # always sendable
    return reply


def test_valid_messages_pass_the_session_checks():
    assert validate_against(open_session(), V, open_sessions=set()) is None
    assert validate_against(request(), V, mode="covspec", sampling=True, committed_len=9, expected_seq=2) is None
    vanilla = request(draft_dists=dists(3))
    assert validate_against(vanilla, V, mode="vanilla_sd", sampling=True) is None
    assert validate_against(response(), V, mode="covspec", sampling=True, num_drafted=3, expected_seq=2) is None
    vanilla_reply = response(candidate_ids=[], candidate_probs=b"", target_dists=dists(4))
    assert validate_against(vanilla_reply, V, mode="vanilla_sd", num_drafted=3) is None
    assert validate_against(SessionOpened(session_id=SID, vocab_size=V), V) is None
    assert validate_against(SessionOpened(session_id=SID, vocab_size=V, eos_ids=[2, 7]), V) is None
    bad = validate_against(SessionOpened(session_id=SID, vocab_size=V, eos_ids=[2, V]), V)
    assert bad is not None and bad.code == ErrorCode.OUT_OF_VOCAB and "eos_ids" in bad.message


def test_token_outside_vocabulary():
    reply = refusal(request(draft_ids=[5, V, 7]))
    assert (reply.code, reply.session_id, reply.seq) == (ErrorCode.OUT_OF_VOCAB, SID, 2)
    assert "draft_ids[1]" in reply.message
    assert refusal(open_session(prompt_ids=[1, V + 3])).code == ErrorCode.OUT_OF_VOCAB
    assert refusal(response(candidate_ids=[8, V])).code == ErrorCode.OUT_OF_VOCAB
    assert refusal(response(candidate_ids=[], candidate_probs=b"", token=V)).code == ErrorCode.OUT_OF_VOCAB
    assert refusal(TokenChunk(session_id=SID, seq=0, token_ids=[V], finished=False)).code == ErrorCode.OUT_OF_VOCAB


def test_reused_session_id_refused():
    reply = refusal(open_session(), open_sessions={SID})
    assert reply.code == ErrorCode.SESSION_EXISTS and SID in reply.message


def test_distributions_of_the_wrong_vocabulary():
    reply = refusal(request(draft_dists=dists(3, vocab=V + 1)), mode="vanilla_sd")
    assert reply.code == ErrorCode.VOCAB_MISMATCH and "V=50" in reply.message
    assert refusal(request(), mode="vanilla_sd").code == ErrorCode.LENGTH_MISMATCH  # dists missing
    assert refusal(request(draft_dists=dists(3)), mode="covspec").code == ErrorCode.LENGTH_MISMATCH
    short = response(candidate_ids=[], candidate_probs=b"", target_dists=dists(3))
    reply = refusal(short, mode="vanilla_sd", num_drafted=3)
    assert reply.code == ErrorCode.LENGTH_MISMATCH and "4 rows" in reply.message


def test_distribution_rows_must_sum_to_one():
    rows = np.full((3, V), 1 / V, dtype="<f4")
    rows[2] *= 0.5
    reply = refusal(request(draft_dists=rows.tobytes()), mode="vanilla_sd")
    assert reply.code == ErrorCode.BAD_PROBABILITY and "row 2" in reply.message


def test_session_state_mismatches():
    assert refusal(request(), committed_len=10).code == ErrorCode.COMMITTED_MISMATCH
    assert refusal(request(), expected_seq=3).code == ErrorCode.SEQ_MISMATCH
    assert refusal(request(), sampling=False).code == ErrorCode.LENGTH_MISMATCH  # greedy sends no q
    assert refusal(request(draft_probs=b""), sampling=True).code == ErrorCode.LENGTH_MISMATCH
    assert refusal(request(), mode="target_only").code == ErrorCode.UNEXPECTED_TYPE
    assert refusal(MoreCandidates(session_id=SID, seq=2), mode="dssd").code == ErrorCode.UNEXPECTED_TYPE
    assert refusal(SessionOpened(session_id=SID, vocab_size=V + 1)).code == ErrorCode.VOCAB_MISMATCH


def test_inconsistent_responses_refused_on_the_device():
    with pytest.raises(ProtocolError, match="num_accepted"):
        check_against(response(num_accepted=4), V, num_drafted=3)
    with pytest.raises(ProtocolError, match="must be -1"):
        check_against(response(token=3), V)
    with pytest.raises(ProtocolError, match="candidates in a dssd session"):
        check_against(response(), V, mode="dssd")


def test_error_reply_for_an_undecodable_frame():
    with pytest.raises(ProtocolError) as info:
        decode(bytes([PROTOCOL_VERSION, 0]))
    reply = error_reply(info.value)
    assert (reply.session_id, reply.seq, reply.code) == ("", -1, ErrorCode.TRUNCATED)
    assert decode(encode(reply)) == reply
