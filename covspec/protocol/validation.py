"""Checks that need the session's state (vocabulary, method, counters), run after ``decode``.

The edge calls ``validate_against`` on every message it decoded and, when it returns an ``ErrorReply``, sends
it and changes no state. The device calls ``check_against``, which raises ``ProtocolError``.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

import numpy as np

from covspec.decoding.tree import check_tree, parents_from_branches
from covspec.protocol.messages import (
    Close,
    ErrorCode,
    ErrorReply,
    Message,
    MoreCandidates,
    OpenSession,
    ProtocolError,
    SessionOpened,
    TokenChunk,
    VerifyRequest,
    VerifyResponse,
)

_ROW_SUM_TOL = 1e-3  # float32 rows of up to ~10^5 entries, summed in float64


def validate_against(msg: Message, vocab_size: int, **state) -> ErrorReply | None:
    """``check_against`` that answers with the ``ErrorReply`` to send instead of raising; None when valid."""
    try:
        check_against(msg, vocab_size, **state)
    except ProtocolError as e:
        return error_reply(e, msg)
    return None


def error_reply(err: ProtocolError, msg: Message | None = None) -> ErrorReply:
    """The reply to a refused message; ``msg`` is None when the frame could not be decoded at all."""
    return ErrorReply(
        session_id=getattr(msg, "session_id", ""),
        seq=getattr(msg, "seq", -1),
        code=err.code,
        message=err.message[:4096],
    )


def check_against(
    msg: Message,
    vocab_size: int,
    *,
    mode: str | None = None,
    sampling: bool | None = None,
    expected_seq: int | None = None,
    committed_len: int | None = None,
    num_drafted: int | None = None,
    open_sessions: Container[str] | None = None,
) -> None:
    """Checks ``msg`` against the session's state; a keyword left None is not checked.

    Args:
        msg: a decoded message.
        vocab_size: V, the vocabulary shared by draft and target.
        mode: the session's wire mode (``OpenSession.method``).
        sampling: whether the session samples (temperature > 0) rather than decoding greedily.
        expected_seq: the seq the receiver expects (next round for a VerifyRequest, the answered round otherwise).
        committed_len: the edge's count of committed generated tokens (VerifyRequest).
        num_drafted: k of the block a VerifyResponse answers.
        open_sessions: ids the edge has already seen (OpenSession: an id is never reused).

    Raises:
        ProtocolError: naming the field and the values that disagree.
    """
    if expected_seq is not None and getattr(msg, "seq", expected_seq) != expected_seq:
        raise ProtocolError(ErrorCode.SEQ_MISMATCH, f"{type(msg).__name__}.seq = {msg.seq}, expected {expected_seq}")
    if isinstance(msg, OpenSession):
        if open_sessions is not None and msg.session_id in open_sessions:
            raise ProtocolError(ErrorCode.SESSION_EXISTS, f"session id {msg.session_id!r} is already in use")
        _check_ids("prompt_ids", msg.prompt_ids, vocab_size)
    elif isinstance(msg, VerifyRequest):
        _check_verify_request(msg, vocab_size, mode, sampling, committed_len)
    elif isinstance(msg, MoreCandidates):
        if mode is not None and mode != "covspec":
            raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, f"MoreCandidates in a {mode} session")
    elif isinstance(msg, SessionOpened):
        if msg.vocab_size != vocab_size:
            raise ProtocolError(ErrorCode.VOCAB_MISMATCH, f"edge vocab_size {msg.vocab_size}, device {vocab_size}")
        if any(t >= vocab_size for t in msg.eos_ids):
            raise ProtocolError(ErrorCode.OUT_OF_VOCAB, "eos_ids holds an id outside the vocabulary")
    elif isinstance(msg, VerifyResponse):
        _check_verify_response(msg, vocab_size, mode, sampling, num_drafted)
    elif isinstance(msg, TokenChunk):
        _check_ids("token_ids", msg.token_ids, vocab_size)
    else:
        assert isinstance(msg, Close | ErrorReply), type(msg)


def _check_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    if ids and max(ids) >= vocab_size:  # ids >= 0 is checked by decode
        i = next(i for i, t in enumerate(ids) if t >= vocab_size)
        raise ProtocolError(ErrorCode.OUT_OF_VOCAB, f"{name}[{i}] = {ids[i]} is outside the vocabulary of {vocab_size}")


def _check_rows(name: str, data: bytes, rows: int, vocab_size: int) -> None:
    """``data`` must be exactly ``rows`` float32 distributions over the vocabulary, each summing to 1."""
    if len(data) != 4 * rows * vocab_size:
        code = ErrorCode.VOCAB_MISMATCH if rows and data and len(data) % (4 * rows) == 0 else ErrorCode.LENGTH_MISMATCH
        raise ProtocolError(
            code, f"{name} has {len(data)} bytes, expected {rows} rows × V={vocab_size} × 4 = {4 * rows * vocab_size}"
        )
    if rows:
        sums = np.frombuffer(data, dtype="<f4").reshape(rows, vocab_size).sum(axis=1, dtype=np.float64)
        bad = np.flatnonzero(np.abs(sums - 1) > _ROW_SUM_TOL)
        if bad.size:
            raise ProtocolError(ErrorCode.BAD_PROBABILITY, f"{name} row {bad[0]} sums to {sums[bad[0]]:.6f}, not 1")


def _check_verify_request(
    msg: VerifyRequest, vocab_size: int, mode: str | None, sampling: bool | None, committed_len: int | None
) -> None:
    k = len(msg.draft_ids)
    _check_ids("draft_ids", msg.draft_ids, vocab_size)
    if committed_len is not None and msg.committed_len != committed_len:
        raise ProtocolError(
            ErrorCode.COMMITTED_MISMATCH, f"device has {msg.committed_len} committed tokens, edge {committed_len}"
        )
    if sampling is not None and bool(msg.draft_probs) != sampling:
        want = "q(x_i) for each drafted token when sampling" if sampling else "nothing when greedy"
        raise ProtocolError(
            ErrorCode.LENGTH_MISMATCH, f"draft_probs has {len(msg.draft_probs)} bytes, must hold {want}"
        )
    if mode == "target_only":
        raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, "VerifyRequest in a target_only session")
    if msg.via >= 0 and (sampling is False or not msg.draft_probs or (mode is not None and mode != "covspec")):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"via = {msg.via}: tree alternatives are taken only when "
                            "sampling in a covspec session")  # fmt: skip
    if msg.branches:
        if mode is not None and mode != "covspec":
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"branches (a token tree) in a {mode} session (covspec only)")
        try:
            parents = parents_from_branches(k, msg.branches)
            check_tree(msg.draft_ids, parents)
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, str(e)) from None
        main = k - sum(msg.branches[1::2])
        if msg.draft_probs and any(a >= main for a in msg.branches[0::2]):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "branches: under sampling every branch attaches to the main "
                                f"chain (nodes -1..{main - 1}), got {msg.branches}")  # fmt: skip
    if mode is not None:
        _check_rows("draft_dists", msg.draft_dists, k if mode == "vanilla_sd" else 0, vocab_size)


def _check_verify_response(
    msg: VerifyResponse, vocab_size: int, mode: str | None, sampling: bool | None, num_drafted: int | None
) -> None:
    _check_ids("candidate_ids", msg.candidate_ids, vocab_size)
    if msg.token >= vocab_size:
        raise ProtocolError(ErrorCode.OUT_OF_VOCAB, f"token = {msg.token} is outside the vocabulary of {vocab_size}")
    if num_drafted is not None and msg.num_accepted > num_drafted:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"num_accepted = {msg.num_accepted} > {num_drafted} drafted")
    if num_drafted is not None and msg.leaf >= num_drafted:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"leaf = {msg.leaf} is not one of the {num_drafted} drafted")
    if msg.leaf >= 0 and msg.num_accepted == 0:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"leaf = {msg.leaf} with num_accepted = {msg.num_accepted}")
    if msg.candidate_ids and msg.token != -1:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"token = {msg.token} alongside candidates (must be -1)")
    if msg.candidate_ids and (mode not in (None, "covspec") or sampling is False):
        raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, f"candidates in a {mode} session (sampling={sampling})")
    if msg.alts and (mode not in (None, "covspec") or sampling is False or msg.token >= 0 or msg.target_dists):
        raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, "alts (tree alternatives) outside a covspec sampling "
                            "correction")  # fmt: skip
    for i, alt in enumerate(msg.alts):
        _check_ids(f"alts[{i}].candidate_ids", alt.candidate_ids, vocab_size)
        if alt.token >= vocab_size:
            raise ProtocolError(ErrorCode.OUT_OF_VOCAB, f"alts[{i}].token = {alt.token} is outside the vocabulary")
        if num_drafted is not None and alt.node + alt.num_accepted >= num_drafted:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"alts[{i}] = node {alt.node} + {alt.num_accepted} "
                                f"accepted, beyond the {num_drafted} drafted")  # fmt: skip
    if mode is None:
        return
    if mode == "vanilla_sd":
        if num_drafted is not None:
            _check_rows("target_dists", msg.target_dists, num_drafted + 1, vocab_size)
    elif mode == "dssd" and msg.target_dists:
        _check_rows("target_dists", msg.target_dists, 1, vocab_size)
    else:
        _check_rows("target_dists", msg.target_dists, 0, vocab_size)
