"""Byte accounting: counters fed from real encoded frames, and exact byte formulas for each message type.

Every reported byte count comes from ``TrafficCounter``, fed with ``len(encode(msg))`` of each frame that crosses
the link. The figure *projected* for a real vocabulary (``PROJECTED_VOCAB``, Qwen2.5-VL's 151,936) comes from the
same frames: ``projected_frame_bytes`` re-sizes each one as it would be with ids of that vocabulary and distribution
rows of that width, and a counter given a ``Projection`` adds that up beside the real bytes, so every field a frame
carries (token trees, alternatives' verdicts, reopens, Close) is projected as it was sent. vanilla_sd and DSSD-style
methods ship float32 distributions, as their papers do, so their traffic grows linearly with V while covspec's does
not.

The per-type formulas below reproduce chain rounds' frame lengths exactly (msgpack header sizes included), and
``projected_decoding_bytes`` a chain request's traffic from its per-round record: they document what each method
sends, and the tests check the frames against them.

The formulas follow the conventions stated in ``covspec.protocol.messages`` (seq numbering, committed_len, when
``token`` is -1, ``draft_probs`` empty when greedy). Token ids cost ``id_bytes`` each; by default the worst case
for the vocabulary (5 bytes above 65,535), which overstates every method's id bytes and so understates covspec's
saving, whose traffic is mostly ids.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

DIRECTIONS = ("up", "down")
UPLOAD_TYPES = frozenset({"OpenSession", "SessionOpened"})
"""The one-time upload and its answer, reported apart from decoding traffic (every other message)."""
SESSION_ID_LEN = 16  # new_session_id(): token_urlsafe(12)
PROJECTED_VOCAB = 151_936
"""Qwen2.5-VL's vocabulary: decoding traffic is also reported as projected to it (``Projection``)."""


class Projection(NamedTuple):
    """Where a counter projects its frames: ids of a ``vocab_size`` vocabulary costing ``id_bytes`` each (default:
    the worst case for that vocabulary), distribution rows of ``vocab_size`` floats where the frames' rows had
    ``wire_vocab`` (the vocabulary the session ran with; None: no frame may carry distributions)."""

    vocab_size: int = PROJECTED_VOCAB
    wire_vocab: int | None = None
    id_bytes: int | None = None


class TrafficCounter:
    """Bytes and message counts per direction and message type, from the real encoded frames.

    Thread-safe; picklable (Ray); ``a + b`` and ``a += b`` merge counters across requests or devices.
    """

    def __init__(self, projection: Projection | None = None) -> None:
        self.bytes: Counter[tuple[str, str]] = Counter()  # (direction, msg_type) -> bytes
        self.messages: Counter[tuple[str, str]] = Counter()  # (direction, msg_type) -> frames
        self.projection = projection
        self.projected: Counter[tuple[str, str]] = Counter()  # (direction, msg_type) -> bytes at the projection
        self._lock = threading.Lock()

    def record(self, direction: str, msg_type: str | type | object, nbytes: int) -> None:
        """Counts one frame of ``nbytes`` (``len(encode(msg))``); ``msg_type`` is a name, class or message.

        With a ``projection``, the message's projected size is counted too; a frame known only by a name (one that
        did not decode), or one whose distributions are not rows of the wire vocabulary (the receiver refuses it), is
        counted as it was."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        projected = None
        if self.projection is not None:
            if isinstance(msg_type, type):
                raise TypeError("a projecting counter needs the message, not its type")
            projected = nbytes
            if not isinstance(msg_type, str):
                with contextlib.suppress(ValueError):  # counted on the transport's thread: a bad frame must not end it
                    projected = projected_frame_bytes(msg_type, *self.projection, nbytes=nbytes)
        if not isinstance(msg_type, str):
            msg_type = (msg_type if isinstance(msg_type, type) else type(msg_type)).__name__
        with self._lock:
            self.bytes[direction, msg_type] += nbytes
            self.messages[direction, msg_type] += 1
            if projected is not None:
                self.projected[direction, msg_type] += projected

    def total(self, direction: str | None = None, phase: str | None = None) -> int:
        """Bytes in ``direction`` ("up", "down", None: both) and ``phase`` ("upload", "decoding", None: both)."""
        return _select(self.bytes, direction, phase)

    def projected_total(self, direction: str | None = None, phase: str | None = None) -> int:
        """As ``total``, for the frames as projected (``projection``; 0 without one)."""
        return _select(self.projected, direction, phase)

    @property
    def upload_bytes(self) -> int:
        return self.total(phase="upload")

    @property
    def decoding_bytes(self) -> int:
        return self.total(phase="decoding")

    def merge(self, other: TrafficCounter) -> TrafficCounter:
        """Adds ``other`` into this counter; returns self."""
        with self._lock:
            self.bytes.update(other.bytes)
            self.messages.update(other.messages)
            self.projected.update(other.projected)
        return self

    def __iadd__(self, other: TrafficCounter) -> TrafficCounter:
        return self.merge(other)

    def __add__(self, other: TrafficCounter) -> TrafficCounter:
        return TrafficCounter(self.projection).merge(self).merge(other)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrafficCounter) and (self.bytes, self.messages, self.projected) == (
            other.bytes, other.messages, other.projected)  # fmt: skip

    def __getstate__(self) -> dict:
        return {"bytes": self.bytes, "messages": self.messages, "projection": self.projection,
                "projected": self.projected}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.get("projection"))
        self.bytes.update(state["bytes"])
        self.messages.update(state["messages"])
        self.projected.update(state.get("projected", {}))

    def to_dict(self) -> dict[str, int]:
        """Flat metrics: ``{dir}.{type}.bytes``, ``{dir}.{type}.messages`` and the totals
        ``upload_bytes[_up|_down]``, ``decoding_bytes[_up|_down]``, ``total_bytes``."""
        out = {f"{d}.{t}.bytes": n for (d, t), n in sorted(self.bytes.items())}
        out.update({f"{d}.{t}.messages": n for (d, t), n in sorted(self.messages.items())})
        for phase in ("upload", "decoding"):
            out[f"{phase}_bytes"] = self.total(phase=phase)
            for d in DIRECTIONS:
                out[f"{phase}_bytes_{d}"] = self.total(d, phase)
        out["total_bytes"] = self.total()
        out.update({f"projected.{d}.{t}.bytes": n for (d, t), n in sorted(self.projected.items())})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> TrafficCounter:
        """Inverse of ``to_dict`` (the totals are recomputed, not read)."""
        counter = cls()
        for key, n in data.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] in DIRECTIONS:
                table = {"bytes": counter.bytes, "messages": counter.messages}.get(parts[2])
                if table is not None:
                    table[parts[0], parts[1]] += n
            elif len(parts) == 4 and parts[0] == "projected" and parts[1] in DIRECTIONS and parts[3] == "bytes":
                counter.projected[parts[1], parts[2]] += n
        return counter


def _select(table: Counter[tuple[str, str]], direction: str | None, phase: str | None) -> int:
    if phase not in (None, "upload", "decoding"):
        raise ValueError(f"phase must be 'upload', 'decoding' or None, got {phase!r}")
    return sum(
        n
        for (d, t), n in table.items()
        if direction in (None, d) and phase in (None, "upload" if t in UPLOAD_TYPES else "decoding")
    )


# ---- msgpack sizes (msgspec always picks the shortest form)


def int_bytes(v: int) -> int:
    """Encoded size of an int."""
    if v >= 0:
        return 1 if v < 128 else 2 if v < 256 else 3 if v < 65536 else 5 if v < 2**32 else 9
    return 1 if v >= -32 else 2 if v >= -128 else 3 if v >= -32768 else 5 if v >= -(2**31) else 9


def str_bytes(n: int) -> int:
    """Encoded size of a str of ``n`` UTF-8 bytes."""
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def bin_bytes(n: int) -> int:
    """Encoded size of ``n`` raw bytes."""
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def array_header_bytes(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def ids_bytes(ids: Iterable[int]) -> int:
    """Encoded size of a list of token ids, header included."""
    ids = list(ids)
    return array_header_bytes(len(ids)) + sum(int_bytes(t) for t in ids)


def _frame(num_fields: int) -> int:
    return 1 + array_header_bytes(num_fields + 1) + 1  # version byte, array header, tag


def _id_bytes(id_bytes: int | None, vocab_size: int) -> int:
    return int_bytes(vocab_size - 1) if id_bytes is None else id_bytes


# ---- one formula per message type


def open_session_bytes(
    prompt_ids: Iterable[int],
    image_nbytes: int,
    method: str,
    *,
    image_format: str = "png",
    max_new_tokens: int,
    seed: int,
    num_candidates: int,
    keep: Iterable[int] = (),
    session_id_len: int = SESSION_ID_LEN,
) -> int:
    """OpenSession (temperature and top_p are float64 on the wire: 9 bytes each); ``keep``: the kept visual token
    indices of the lossy prune-target mode (an empty list is omitted from the frame)."""
    keep = list(keep)
    return (
        _frame(11 if keep else 10)
        + str_bytes(session_id_len)
        + str_bytes(len(method))
        + ids_bytes(prompt_ids)
        + bin_bytes(image_nbytes)
        + str_bytes(len(image_format))
        + 9
        + 9
        + int_bytes(max_new_tokens)
        + int_bytes(seed)
        + int_bytes(num_candidates)
        + (ids_bytes(keep) if keep else 0)
    )


def session_opened_bytes(vocab_size: int, eos_ids: Iterable[int] = (), session_id_len: int = SESSION_ID_LEN) -> int:
    eos_ids = list(eos_ids)
    if not eos_ids:  # a trailing default is omitted
        return _frame(2) + str_bytes(session_id_len) + int_bytes(vocab_size)
    return _frame(3) + str_bytes(session_id_len) + int_bytes(vocab_size) + ids_bytes(eos_ids)


def verify_request_bytes(
    mode: str,
    k: int,
    vocab_size: int,
    *,
    sampling: bool,
    seq: int = 0,
    committed_len: int = 0,
    id_bytes: int | None = None,
    session_id_len: int = SESSION_ID_LEN,
) -> int:
    """VerifyRequest of k drafted ids; q(x_i) when sampling; vanilla_sd adds the k×V float32 draft distributions.

    Trailing empty payloads are omitted from the frame (``omit_defaults``)."""
    ib = _id_bytes(id_bytes, vocab_size)
    tail = [4 * k if sampling else 0, 4 * k * vocab_size if mode == "vanilla_sd" else 0]
    while tail and tail[-1] == 0:
        tail.pop()
    return (
        _frame(5 + len(tail))
        + str_bytes(session_id_len)
        + int_bytes(seq)
        + array_header_bytes(k)
        + k * ib
        + int_bytes(committed_len)
        + (1 if seq == 0 else ib)  # last_token: -1 in round 0, else a token id
        + sum(bin_bytes(n) for n in tail)
    )


def verify_response_bytes(
    mode: str,
    k: int,
    num_accepted: int,
    vocab_size: int,
    *,
    sampling: bool,
    num_candidates: int = 0,
    more: bool = False,
    seq: int = 0,
    id_bytes: int | None = None,
    session_id_len: int = SESSION_ID_LEN,
) -> int:
    """VerifyResponse to a block of k with ``num_accepted`` accepted (``more``: the answer to MoreCandidates).

    What it carries follows the conventions: vanilla_sd always k+1 rows of p and token -1; otherwise the bonus
    when all are accepted; on a rejection dssd sends token -1 plus p at the rejected position (V floats, greedy or
    not, as DSSD does); covspec sends the corrected token (greedy) or token -1 plus ``num_candidates`` candidates
    with their p. Trailing empty fields are omitted from the frame.
    """
    if more and mode != "covspec":
        raise ValueError(f"MoreCandidates exists in covspec mode only, not {mode}")
    rejected = num_accepted < k
    ib = _id_bytes(id_bytes, vocab_size)
    token_bytes, rows, m = ib, 0, 0
    if mode == "vanilla_sd":
        token_bytes, rows = 1, k + 1
    elif mode == "dssd" and rejected:
        token_bytes, rows = 1, 1
    elif more or (rejected and sampling):
        token_bytes, m = 1, num_candidates
    # optional fields in order: candidate_ids, candidate_probs, target_dists (None = default, omitted)
    tail = [
        array_header_bytes(m) + m * ib if m else None,
        bin_bytes(4 * m) if m else None,
        bin_bytes(4 * rows * vocab_size) if rows else None,
    ]
    while tail and tail[-1] is None:
        tail.pop()
    defaults = [array_header_bytes(0), bin_bytes(0), bin_bytes(0)]
    return (
        _frame(4 + len(tail))
        + str_bytes(session_id_len)
        + int_bytes(seq)
        + int_bytes(num_accepted)
        + token_bytes
        + sum(defaults[i] if v is None else v for i, v in enumerate(tail))
    )


def more_candidates_bytes(seq: int = 0, session_id_len: int = SESSION_ID_LEN) -> int:
    return _frame(2) + str_bytes(session_id_len) + int_bytes(seq)


def close_bytes(session_id_len: int = SESSION_ID_LEN) -> int:
    return _frame(1) + str_bytes(session_id_len)


def token_chunk_bytes(
    n_tokens: int, vocab_size: int, *, seq: int = 0, id_bytes: int | None = None, session_id_len: int = SESSION_ID_LEN
) -> int:
    return (
        _frame(4)
        + str_bytes(session_id_len)
        + int_bytes(seq)
        + array_header_bytes(n_tokens)
        + n_tokens * _id_bytes(id_bytes, vocab_size)
        + 1
    )


EXPECTED_BYTES = {
    "OpenSession": open_session_bytes,
    "SessionOpened": session_opened_bytes,
    "VerifyRequest": verify_request_bytes,
    "VerifyResponse": verify_response_bytes,
    "MoreCandidates": more_candidates_bytes,
    "Close": close_bytes,
    "TokenChunk": token_chunk_bytes,
}


def expected_bytes(msg_type: str, *args, **kwargs) -> int:
    """The exact frame size of a ``msg_type`` message; arguments as in the per-type formula above."""
    return EXPECTED_BYTES[msg_type](*args, **kwargs)


# ---- any frame, projected to another vocabulary

_ID_FIELDS: dict[str, tuple[str, ...]] = {
    "OpenSession": ("prompt_ids", "committed"),
    "VerifyRequest": ("draft_ids", "last_token"),
    "VerifyResponse": ("token", "candidate_ids"),
    "AltVerdict": ("token", "candidate_ids"),
    "TokenChunk": ("token_ids",),
    "SessionOpened": ("eos_ids",),
}
"""The fields holding token ids (-1, "none", is kept as it is); every other int is a count, index or seq."""
_DIST_FIELDS: dict[str, str] = {"VerifyRequest": "draft_dists", "VerifyResponse": "target_dists"}
"""The fields holding float32 rows over the vocabulary."""


def _growth(msg, vocab_size: int, wire_vocab: int | None, id_size: int) -> int:
    """Bytes ``msg``'s frame gains when every id (not -1) costs ``id_size`` and every distribution row holds
    ``vocab_size`` floats. msgpack sizes each int and each bin on its own and no list changes length, so the
    frame's other bytes stay as they are."""
    name = type(msg).__name__
    grow = 0
    for f in _ID_FIELDS.get(name, ()):
        v = getattr(msg, f)
        grow += sum(id_size - int_bytes(x) for x in (v if isinstance(v, list) else [v]) if x >= 0)
    if name == "SessionOpened":
        grow += int_bytes(vocab_size) - int_bytes(msg.vocab_size)
    if name in _DIST_FIELDS and (data := getattr(msg, _DIST_FIELDS[name])):
        if wire_vocab is None or len(data) % (4 * wire_vocab):
            raise ValueError(f"{name}.{_DIST_FIELDS[name]} holds {len(data)} bytes: not float32 rows of "
                             f"{wire_vocab} (the projection's wire_vocab)")  # fmt: skip
        grow += bin_bytes(4 * (len(data) // (4 * wire_vocab)) * vocab_size) - bin_bytes(len(data))
    if name == "VerifyResponse":
        grow += sum(_growth(a, vocab_size, wire_vocab, id_size) for a in msg.alts)
    return grow


def projected_frame_bytes(msg, vocab_size: int = PROJECTED_VOCAB, wire_vocab: int | None = None,
                          id_bytes: int | None = None, nbytes: int | None = None) -> int:  # fmt: skip
    """The size ``msg``'s frame would have with a ``vocab_size`` vocabulary: every token id costing ``id_bytes``
    (default: the worst case for ``vocab_size``) and every distribution row ``vocab_size`` float32s instead of
    ``wire_vocab``; every other field (counts, seqs, trees, flags, the image) as sent. ``nbytes``: the frame's
    length when the caller has it (``len(encode(msg))``, computed otherwise)."""
    from covspec.protocol.messages import encode

    largest = int_bytes(vocab_size - 1)
    if id_bytes is None:
        id_bytes = largest
    elif id_bytes not in (1, 2, 3, 5, 9):
        raise ValueError(f"id_bytes must be one of [1, 2, 3, 5, 9] (a msgpack int's sizes), got {id_bytes}")
    elif id_bytes > largest:
        raise ValueError(f"a vocabulary of {vocab_size} has no id of {id_bytes} bytes")
    return (len(encode(msg)) if nbytes is None else nbytes) + _growth(msg, vocab_size, wire_vocab, id_bytes)


# ---- a request's decoding traffic from its per-round record


class Round(NamedTuple):
    """What one verification round exchanged (target_only: one TokenChunk of ``k`` tokens)."""

    k: int  # drafted tokens
    num_accepted: int
    more_requests: int = 0  # covspec: MoreCandidates sent after all candidates were refused


def projected_decoding_bytes(
    mode: str,
    rounds: Iterable[Round | tuple[int, ...]],
    vocab_size: int,
    *,
    sampling: bool,
    num_candidates: int = 0,
    id_bytes: int | None = None,
    session_id_len: int = SESSION_ID_LEN,
    close: bool = True,
) -> dict[str, int]:
    """A request's decoding traffic (everything after the upload, the Close frame included) for a given vocabulary.

    Exact for the vocabulary the request ran with (given its ids' sizes); for another vocabulary it is the
    *projected* figure: the same rounds, with distributions of the new size and ids costing ``id_bytes``
    (default: the worst case for ``vocab_size``).

    Args:
        mode: wire mode (``WIRE_MODES``).
        rounds: one ``Round(k, num_accepted, more_requests)`` per verification round (per TokenChunk).
        vocab_size: the vocabulary to project to.
        sampling: temperature > 0.
        num_candidates: m (covspec).
        close: the device sent a Close frame (False when the verdict that ended the answer closed the session:
            ``RequestResult.closed_by_edge``).

    Returns:
        ``{"up": bytes, "down": bytes, "total": bytes}``.
    """
    up = close_bytes(session_id_len) if close and mode != "target_only" else 0
    down = committed = 0
    for seq, r in enumerate(rounds):
        r = Round(*r)
        if mode == "target_only":
            down += token_chunk_bytes(r.k, vocab_size, seq=seq, id_bytes=id_bytes, session_id_len=session_id_len)
            continue
        common = dict(sampling=sampling, seq=seq, id_bytes=id_bytes, session_id_len=session_id_len)
        up += verify_request_bytes(mode, r.k, vocab_size, committed_len=committed, **common)
        down += verify_response_bytes(mode, r.k, r.num_accepted, vocab_size, num_candidates=num_candidates, **common)
        if r.more_requests:
            up += r.more_requests * more_candidates_bytes(seq, session_id_len)
            down += r.more_requests * verify_response_bytes(
                mode, r.k, r.num_accepted, vocab_size, num_candidates=num_candidates, more=True, **common
            )
        committed += r.num_accepted + 1
    return {"up": up, "down": down, "total": up + down}
