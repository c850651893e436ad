"""Wire messages between a device (draft VLM) and the edge (target VLM): typed structs, one binary frame each.

Frame layout: one byte of protocol version, then one msgpack array ``[tag, *fields]``; trailing fields that hold
their default (empty payloads) are omitted, which is why the optional payloads come last. The structs are msgspec
``array_like`` structs with a small integer tag, so field names never travel; the field order *is* the wire
format (reordering, adding or removing a field means bumping ``PROTOCOL_VERSION``). The version byte sits outside
the msgpack body so that a peer speaking another version gets a clear ``version`` error before any field is read.

Encodings, chosen for size:

- Token ids travel as msgpack lists of ints. msgpack stores an int in 1 byte below 128, 2 below 256, 3 below
  65,536 and 5 below 2**32, against a flat 4 bytes each (plus a 2-byte header) for packed uint32: the list is
  smaller for every toy vocabulary and, since BPE vocabularies give frequent tokens low ids, for most tokens of
  real ones (Qwen2.5-VL's common text tokens are below 65,536: 3 bytes). The byte formulas in ``accounting``
  take the per-id size as a parameter and default to the worst case for the vocabulary.
- Probabilities (``q(x_i)``, candidate ``p(y)``) and whole distributions are raw little-endian float32 bytes
  (``numpy.ndarray.tobytes``): 4 bytes per value, no per-value header, decoded with one ``np.frombuffer``.
  Vanilla and DSSD-style baselines ship float32 distributions, as their papers do.

Message flow and conventions (the byte formulas in ``accounting`` rely on them):

- ``seq`` numbers the device's verification rounds from 0; ``MoreCandidates`` carries the seq of the round it
  extends; every reply echoes the seq it answers. ``committed_len`` counts the generated tokens (prompt
  excluded) the device holds as committed before the block.
- ``draft_probs`` holds q(x_i) when sampling (temperature > 0) and is empty for greedy decoding, where the
  accept test only compares ids. ``draft_dists`` holds the k×V draft distributions for ``vanilla_sd`` only.
- ``VerifyResponse.token`` is the bonus token (all accepted) or the corrected token (covspec greedy rejection), and -1
  when the device corrects itself: from ``candidate_ids`` (covspec, sampling), from ``target_dists`` (dssd,
  greedy or sampling: p at the rejected position, V floats), or always for ``vanilla_sd`` (p at the k+1 positions).
- A ``VerifyRequest`` with ``branches`` carries a token tree (covspec): the edge verifies every branch in one forward
  and answers with the accepted path's last node in ``leaf``. Under sampling the branches are guesses of the
  correction: when the main chain is rejected at depth n, ``alts`` holds one ``AltVerdict`` per alternative rooted
  at depth n (its continuation's accept test, then its bonus or candidates); if the device's correction is that
  alternative's token, it commits the alternative's verdict and names it in the next request's ``via``.
- A session ends with a ``Close`` from the device, or, without one, with the verdict that ends the answer where the
  edge knows the round's last token (greedy decoding, or a bonus it drew): an accepted EOS, that token being EOS, or
  the answer reaching ``max_new_tokens``. Both sides apply this rule (``Edge._verdict``, ``Device._settle_round``);
  a target_only stream ends with its last ``TokenChunk``.
- ``decode`` checks everything that needs no session state; ``check_against`` / ``validate_against`` check the
  rest (vocabulary, method, committed length). A receiver answers a bad message with an ``ErrorReply`` and
  changes no state.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

import msgspec
import numpy as np

from covspec.errors import CovspecError

PROTOCOL_VERSION = 6  # 4: token trees (branches, leaf); 5: sampling trees (alts, via); 6: the edge closes ended answers
_VERSION_BYTE = bytes([PROTOCOL_VERSION])
WIRE_MODES = ("target_only", "vanilla_sd", "dssd", "covspec")
"""How a method talks to the edge; covspec's ablations use the ``covspec`` mode."""
WireMode = Literal["target_only", "vanilla_sd", "dssd", "covspec"]

_PROB_TOL = 1e-5  # float32 softmax and renormalisation can land an ulp above 1
_MiB = 1 << 20


class ErrorCode(StrEnum):
    """Codes carried by ``ProtocolError`` and ``ErrorReply``."""

    MALFORMED = "malformed"  # not a frame / not msgpack / trailing bytes
    TRUNCATED = "truncated"
    VERSION = "version"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_TYPE = "unexpected_type"  # a valid message the receiver does not accept here
    TOO_LARGE = "too_large"
    INVALID_FIELD = "invalid_field"  # a field of the wrong type or out of its static range
    BAD_PROBABILITY = "bad_probability"
    LENGTH_MISMATCH = "length_mismatch"
    OUT_OF_VOCAB = "out_of_vocab"
    VOCAB_MISMATCH = "vocab_mismatch"
    SESSION_EXISTS = "session_exists"
    UNKNOWN_SESSION = "unknown_session"  # for the edge: a session that expired or never existed
    UNAVAILABLE = "unavailable"  # made by a device's transport: the edge could not be reached or lost the call
    SEQ_MISMATCH = "seq_mismatch"
    COMMITTED_MISMATCH = "committed_mismatch"


class ProtocolError(CovspecError):
    """A message that breaks the protocol; ``code`` is an ``ErrorCode`` value, ``message`` says what and where."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message

    def __reduce__(self):  # pickle (Ray returns a device's errors to the driver) rebuilds it from both fields
        return type(self), (self.code, self.message)


@dataclass(frozen=True)
class Limits:
    """Sanity bounds applied by ``decode``; anything above them is refused before or right after parsing."""

    max_open_bytes: int = 64 * _MiB
    """OpenSession frames: the PNG image dominates."""
    max_verify_bytes: int = 64 * _MiB
    """VerifyRequest/VerifyResponse frames. vanilla_sd at V=151,936 ships (k+1)·V·4 bytes: 3.6 MB at k=5,
    9.7 MB at k=15, so 8 MiB would cap vanilla's draft length; 64 MiB still allows k≈100."""
    max_control_bytes: int = 1 * _MiB
    """Every other frame (ids, codes, token chunks)."""
    max_draft_len: int = 256
    max_candidates: int = 4096
    max_prompt_len: int = 1 << 20
    max_new_tokens: int = 1 << 20
    max_vocab_size: int = 1 << 24


DEFAULT_LIMITS = Limits()

# Static field ranges, checked by msgspec while parsing.
SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z")]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]


class _Message(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True):
    pass


# ---- device -> edge ("up")


class OpenSession(_Message, tag=1):
    """The one-time upload: prompt, image and sampling parameters. The device picks ``session_id``
    (``new_session_id()``); the edge refuses an id it has seen."""

    session_id: SessionId
    method: WireMode
    prompt_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1)]
    image: Annotated[bytes, msgspec.Meta(min_length=1)]
    """Encoded image (PNG: lossless, so the target sees the device's pixels)."""
    image_format: Literal["png", "jpeg"]
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1e3)]
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)]
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, lt=2**31)]
    seed: int
    num_candidates: Annotated[int, msgspec.Meta(ge=1, lt=2**31)]
    """m: candidates per covspec correction."""
    keep: list[Count] = []
    """Lossy ``pruning.prune_target`` mode only: sorted indices of the visual tokens (0..N-1, N the image placeholders
    in ``prompt_ids``) the target prefills with; empty (the default, omitted from the frame): every token."""
    committed: list[TokenId] = []
    """Reopening a session the edge lost (expired, or its replica restarted): the tokens generated so far, which the
    target prefills after the prompt. Empty (the default, omitted) for a new request."""
    seq: Count = 0
    """Reopening: the seq of the next ``VerifyRequest`` (speculative) or ``TokenChunk`` (target_only)."""


class VerifyRequest(_Message, tag=2):
    """A drafted block of k tokens to verify."""

    session_id: SessionId
    seq: Count
    draft_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1)]  # [k]
    committed_len: Count  # generated tokens the device holds as committed, last_token included
    last_token: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)]
    """The token the previous round committed after its accepted drafts (bonus or correction), which the edge
    feeds in front of this block; -1 in round 0. The edge checks it against what it sent (the token, one of the
    candidates, or a token with p > 0), so a device cannot commit a token the target could not have produced."""
    draft_probs: bytes = b""  # float32 [k]: q(x_i) when sampling; empty when greedy
    draft_dists: bytes = b""  # float32 [k, V]: vanilla_sd only; empty otherwise
    branches: list[Annotated[int, msgspec.Meta(ge=-1, lt=2**31)]] = []
    """A token tree (covspec): flat (attach, length) pairs, one per branch off the main chain
    (``covspec.decoding.tree.parents_from_branches``); empty: the block is a chain. Under sampling every branch
    attaches to the main chain (or the prefix)."""
    via: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)] = -1
    """Sampling trees: the previous round's correction was the token of the alternative whose root is node ``via``
    of that round's tree, so the edge commits that alternative's verdict (its root and accepted continuation)
    before ``last_token``, which is then the alternative's bonus or correction; -1 (omitted): no alternative."""


class MoreCandidates(_Message, tag=3):
    """covspec: the device refused all m candidates; asks for m more at the same position."""

    session_id: SessionId
    seq: Count
    via: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)] = -1
    """Sampling trees: the candidates of the alternative rooted at node ``via`` (its correction); -1 (omitted): the
    round's own correction."""


class Close(_Message, tag=4):
    """The device ends its session; not sent after a verdict that closed it (see the module docstring)."""

    session_id: SessionId


# ---- edge -> device ("down")


class SessionOpened(_Message, tag=5):
    session_id: SessionId
    vocab_size: Annotated[int, msgspec.Meta(ge=2, lt=2**31)]
    eos_ids: list[TokenId] = []  # every id that ends the target's generation: the device's draft must stop at the same


class AltVerdict(msgspec.Struct, array_like=True, frozen=True):
    """Sampling trees: the verdict on one alternative rooted where the main chain was rejected, used only if the
    device's correction there is the alternative's token: its continuation's accepted length, then the bonus
    (``token``) or candidates for the correction after them (as in ``VerifyResponse``)."""

    node: Count  # the alternative's root: its node index in the tree
    num_accepted: Count  # accepted tokens of its continuation (the root excluded)
    token: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)]  # bonus after the whole continuation; -1: candidates
    candidate_ids: list[TokenId]
    candidate_probs: bytes


class VerifyResponse(_Message, tag=6):
    """The verdict on one block (or, after MoreCandidates, m more candidates for the same position)."""

    session_id: SessionId
    seq: Count
    num_accepted: Count  # accepted draft tokens, the bonus/correction excluded
    token: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)]  # bonus or corrected token; -1: the device corrects
    candidate_ids: list[TokenId] = []  # [m] covspec: candidates drawn from p at the rejected position
    candidate_probs: bytes = b""  # float32 [m]: p(y) of each candidate
    target_dists: bytes = b""  # float32 [1, V] (dssd) or [k+1, V] (vanilla_sd); empty otherwise
    leaf: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)] = -1
    """Token trees: the last accepted node (its path from the prefix holds the num_accepted drafts); -1 for a chain
    or when nothing was accepted."""
    alts: list[AltVerdict] = []
    """Sampling trees, main chain rejected: one verdict per alternative rooted at the rejected depth."""


class TokenChunk(_Message, tag=7):
    """target_only: tokens streamed by the edge."""

    session_id: SessionId
    seq: Count
    token_ids: list[TokenId]
    finished: bool


class ErrorReply(_Message, tag=8):
    """A refused message. ``session_id`` is empty and ``seq`` -1 when the bad frame could not be parsed."""

    session_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,64}\Z")]
    seq: Annotated[int, msgspec.Meta(ge=-1, lt=2**31)]
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    message: Annotated[str, msgspec.Meta(max_length=4096)]


Message = (
    OpenSession | VerifyRequest | MoreCandidates | Close | SessionOpened | VerifyResponse | TokenChunk | ErrorReply
)
UP_MESSAGES: tuple[type, ...] = (OpenSession, VerifyRequest, MoreCandidates, Close)
DOWN_MESSAGES: tuple[type, ...] = (SessionOpened, VerifyResponse, TokenChunk, ErrorReply)
UPLOAD_MESSAGES: tuple[type, ...] = (OpenSession, SessionOpened)
"""The one-time upload and its answer; every other message is decoding traffic."""

_BY_TAG: dict[int, type] = {cls.__struct_config__.tag: cls for cls in UP_MESSAGES + DOWN_MESSAGES}
_DECODERS = {cls: msgspec.msgpack.Decoder(cls) for cls in _BY_TAG.values()}
_ENCODER = msgspec.msgpack.Encoder()


def new_session_id() -> str:
    """An unguessable session id (96 random bits, 16 url-safe characters)."""
    return secrets.token_urlsafe(12)


def probs_to_bytes(x) -> bytes:
    """float32 little-endian bytes of a numpy array or torch tensor (any shape, row-major)."""
    if hasattr(x, "detach"):  # torch, without importing it here
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def bytes_to_probs(data: bytes, rows: int | None = None) -> np.ndarray:
    """A read-only float32 view of ``data``: shape [n], or [rows, n / rows]. Copy it before writing to it."""
    a = np.frombuffer(data, dtype="<f4")
    return a if rows is None else a.reshape(rows, -1)


def _defaults(cls: type) -> tuple:
    cfg = cls.__struct_fields__
    defaults = [d.factory() if isinstance(d, msgspec._core.Factory) else d for d in cls.__struct_defaults__]
    return (msgspec.NODEFAULT,) * (len(cfg) - len(defaults)) + tuple(defaults)


_DEFAULTS = {cls: _defaults(cls) for cls in _BY_TAG.values()}


def encode(msg: Message) -> bytes:
    """One frame: the version byte then the msgpack body ``[tag, *fields]`` with trailing default fields left
    out (msgspec fills them back in on decode). Not validated: the receiver's ``decode`` does that."""
    fields = list(msgspec.structs.astuple(msg))
    defaults = _DEFAULTS[type(msg)]
    while fields and defaults[len(fields) - 1] is not msgspec.NODEFAULT and fields[-1] == defaults[len(fields) - 1]:
        fields.pop()
    return _VERSION_BYTE + _ENCODER.encode([msg.__struct_config__.tag, *fields])


def decode(data: bytes, expected: type | tuple[type, ...] | None = None, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parses and validates one frame.

    Args:
        data: the frame as received.
        expected: the message class(es) the receiver accepts here; others raise ``unexpected_type``.
        limits: size and count bounds.

    Returns:
        The message; every check that needs no session state has passed.

    Raises:
        ProtocolError: with an ``ErrorCode`` and a message naming the field.
    """
    if len(data) < 3:
        raise ProtocolError(ErrorCode.TRUNCATED, f"frame of {len(data)} bytes is shorter than its 3-byte header")
    if data[0] != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"protocol version {data[0]}, this peer speaks {PROTOCOL_VERSION}")
    if not 0x91 <= data[1] <= 0x9F:  # every message is a msgpack fixarray [tag, *fields] of <16 entries
        raise ProtocolError(ErrorCode.MALFORMED, f"body does not start with a message array (byte 0x{data[1]:02x})")
    cls = _BY_TAG.get(data[2])
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message tag {data[2]}")
    if expected is not None and not issubclass(cls, expected):
        names = [c.__name__ for c in (expected if isinstance(expected, tuple) else (expected,))]
        raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, f"got {cls.__name__}, expected one of {names}")
    max_bytes = _max_bytes(cls, limits)
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{cls.__name__} of {len(data)} bytes exceeds the {max_bytes} limit")
    try:
        msg = _DECODERS[cls].decode(memoryview(data)[1:])
    except msgspec.ValidationError as e:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{cls.__name__}: {_name_field(cls, str(e))}") from None
    except msgspec.DecodeError as e:
        code = ErrorCode.TRUNCATED if "truncated" in str(e) else ErrorCode.MALFORMED
        raise ProtocolError(code, f"{cls.__name__}: {e}") from None
    _CHECKS[cls](msg, limits)
    return msg


def _max_bytes(cls: type, limits: Limits) -> int:
    if cls is OpenSession:
        return limits.max_open_bytes
    if cls in (VerifyRequest, VerifyResponse):
        return limits.max_verify_bytes
    return limits.max_control_bytes


def _name_field(cls: type, text: str) -> str:
    """Rewrites msgspec's ``at `$[3]...``` (array index; 0 is the tag) into the field's name."""
    head, sep, path = text.rpartition(" - at `$[")
    if not sep:
        return text
    index, _, rest = path.partition("]")
    if not index.isdigit() or not 1 <= int(index) <= len(cls.__struct_fields__):
        return text
    return f"field {cls.__struct_fields__[int(index) - 1]}{rest.rstrip('`')}: {head}"


# ---- stateless checks (run by decode)


def _check_probs(name: str, data: bytes, count: int) -> None:
    """``data`` must hold ``count`` float32 probabilities in (0, 1]: each is the probability of a sampled token."""
    if len(data) != 4 * count:
        raise ProtocolError(
            ErrorCode.LENGTH_MISMATCH, f"{name} has {len(data)} bytes, expected 4 × {count} = {4 * count}"
        )
    if count:
        a = np.frombuffer(data, dtype="<f4")
        if not (a.min() > 0 and a.max() <= 1 + _PROB_TOL):  # NaN fails both comparisons
            i = int(np.flatnonzero(~((a > 0) & (a <= 1 + _PROB_TOL)))[0])
            raise ProtocolError(ErrorCode.BAD_PROBABILITY, f"{name}[{i}] = {a[i]!r}, must be in (0, 1]")


def _check_dists(name: str, data: bytes, row_len_multiple: int = 1) -> None:
    """``data`` must hold float32 values in [0, 1], a whole number of rows."""
    if len(data) % (4 * row_len_multiple):
        raise ProtocolError(
            ErrorCode.LENGTH_MISMATCH, f"{name} has {len(data)} bytes, not a multiple of 4 × {row_len_multiple}"
        )
    if data:
        a = np.frombuffer(data, dtype="<f4")
        if not (a.min() >= 0 and a.max() <= 1 + _PROB_TOL):
            i = int(np.flatnonzero(~((a >= 0) & (a <= 1 + _PROB_TOL)))[0])
            raise ProtocolError(ErrorCode.BAD_PROBABILITY, f"{name}[{i}] = {a[i]!r}, must be in [0, 1]")


def _check_count(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"{name} = {value} exceeds the limit {limit}")


def _check_open(msg: OpenSession, limits: Limits) -> None:
    _check_count("len(prompt_ids)", len(msg.prompt_ids), limits.max_prompt_len)
    _check_count("max_new_tokens", msg.max_new_tokens, limits.max_new_tokens)
    _check_count("num_candidates", msg.num_candidates, limits.max_candidates)
    magic = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}[msg.image_format]
    if not msg.image.startswith(magic):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"image does not start with the {msg.image_format} signature")
    _check_count("len(keep)", len(msg.keep), limits.max_prompt_len)
    bad = next((i for i in range(1, len(msg.keep)) if msg.keep[i] <= msg.keep[i - 1]), None)
    if bad is not None:
        pair = list(msg.keep[bad - 1 : bad + 1])
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"keep must be strictly increasing, got {pair} at index {bad - 1}")


def _check_verify_request(msg: VerifyRequest, limits: Limits) -> None:
    k = len(msg.draft_ids)
    _check_count("len(draft_ids)", k, limits.max_draft_len)
    if msg.draft_probs:  # empty when greedy
        _check_probs("draft_probs", msg.draft_probs, k)
    _check_dists("draft_dists", msg.draft_dists, row_len_multiple=k)


def _check_verify_response(msg: VerifyResponse, limits: Limits) -> None:
    _check_count("num_accepted", msg.num_accepted, limits.max_draft_len)
    _check_count("len(candidate_ids)", len(msg.candidate_ids), limits.max_candidates)
    _check_probs("candidate_probs", msg.candidate_probs, len(msg.candidate_ids))
    _check_dists("target_dists", msg.target_dists)
    _check_count("len(alts)", len(msg.alts), limits.max_draft_len)
    for i, alt in enumerate(msg.alts):
        _check_count(f"alts[{i}].num_accepted", alt.num_accepted, limits.max_draft_len)
        _check_count(f"len(alts[{i}].candidate_ids)", len(alt.candidate_ids), limits.max_candidates)
        _check_probs(f"alts[{i}].candidate_probs", alt.candidate_probs, len(alt.candidate_ids))
        if bool(alt.candidate_ids) == (alt.token >= 0):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"alts[{i}] must hold either a token or candidates")


def _check_nothing(msg: Message, limits: Limits) -> None:
    pass


_CHECKS = {
    OpenSession: _check_open,
    VerifyRequest: _check_verify_request,
    MoreCandidates: _check_nothing,
    Close: _check_nothing,
    SessionOpened: lambda msg, limits: _check_count("vocab_size", msg.vocab_size, limits.max_vocab_size),
    VerifyResponse: _check_verify_response,
    TokenChunk: _check_nothing,
    ErrorReply: _check_nothing,
}
