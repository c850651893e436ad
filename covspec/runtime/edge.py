"""The Edge: the target VLM and one session per request, answering frames from devices.

One round of verification for a block x_1..x_k (p = target, q = draft):

1. Feed ``last_token`` (the previous round's bonus or correction, which the edge learns lazily so that
   every round costs exactly one target forward) and x_1..x_k in one forward; the rows give
   p_1..p_{k+1}.
2. Accept: greedy compares ids with the target argmax; sampling accepts x_i with min(1, p/q).
3. Answer with the accepted count and what the device needs to finish the round: the token (greedy,
   or the bonus), m candidates drawn from p at the rejected position (covspec), the full p row there
   (dssd) or all k+1 rows (vanilla_sd).
4. Crop the target cache to the accepted prefix.

Every check happens before any state changes: a bad frame gets an ``ErrorReply`` and the session is
exactly as it was.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from covspec.decoding.sampling import probs_from_logits, sample
from covspec.decoding.verify import sample_candidates, verify_greedy, verify_sampling
from covspec.models.base import DecodeState, VLMAdapter
from covspec.protocol import (
    UP_MESSAGES,
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
    bytes_to_probs,
    check_against,
    decode,
    encode,
    error_reply,
    probs_to_bytes,
)

CANDIDATE_ROUNDS_BEFORE_FULL_ROW = 8
"""After this many refused candidate batches the edge ships the full p row (still exact, see verify.py)."""


@dataclass
class Expected:
    """What the device may commit as ``last_token`` next round."""

    token: int = -1  # a token the edge chose (greedy, bonus)
    candidates: set[int] = field(default_factory=set)  # covspec: any candidate sent
    p_row: torch.Tensor | None = None  # [V] dssd / vanilla / fallback: any token with p > 0


@dataclass
class Session:
    """One request's state on the edge."""

    session_id: str
    method: str
    temperature: float
    top_p: float
    max_new_tokens: int
    num_candidates: int
    state: DecodeState
    last_logits: torch.Tensor  # [V] target logits at the end of the cache
    generator: torch.Generator
    committed: list[int] = field(default_factory=list)  # fed into the target cache
    seq: int = 0  # next expected VerifyRequest.seq
    expected: Expected | None = None  # None in round 0
    more_requests: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class EdgeStats:
    busy_s: float = 0.0
    forwards: int = 0
    verify_rounds: int = 0
    errors: int = 0


class Edge:
    """Holds the target adapter and the sessions; ``handle`` turns one frame into reply frames.

    Thread-safe: one frame is processed at a time (one model, one compute stream).

    Args:
        target: the target VLM adapter.
        session_ttl_s: sessions idle for longer are dropped (the device reopens them).
        stream_chunk: target_only streams tokens in chunks of this many tokens.
    """

    def __init__(self, target: VLMAdapter, session_ttl_s: float = 600.0, stream_chunk: int = 1) -> None:
        self.target = target
        self.vocab_size = target.vocab_size
        self.sessions: dict[str, Session] = {}
        self.seen_ids: set[str] = set()
        self.session_ttl_s = session_ttl_s
        self.stream_chunk = stream_chunk
        self.stats = EdgeStats()
        self._lock = threading.Lock()

    # -- frame handling ------------------------------------------------------------------------

    def handle(self, payload: bytes) -> Iterator[tuple[Message, bytes]]:
        """Replies to one frame, as (message, encoded frame) pairs, in order."""
        with self._lock:
            start = time.perf_counter()
            try:
                msg = decode(payload, expected=UP_MESSAGES)
            except ProtocolError as err:
                self.stats.errors += 1
                yield from self._emit(error_reply(err))
                return
            try:
                for reply in self._dispatch(msg):
                    self.stats.busy_s += time.perf_counter() - start
                    yield from self._emit(reply)
                    start = time.perf_counter()
            except ProtocolError as err:
                self.stats.errors += 1
                yield from self._emit(error_reply(err, msg))
            self.stats.busy_s += time.perf_counter() - start

    @staticmethod
    def _emit(msg: Message) -> Iterator[tuple[Message, bytes]]:
        yield msg, encode(msg)

    def _dispatch(self, msg: Message) -> Iterator[Message]:
        self.expire_idle()
        if isinstance(msg, OpenSession):
            yield from self._open(msg)
            return
        session = self.sessions.get(msg.session_id)
        if session is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {msg.session_id!r} (expired or never opened)")
        session.last_used = time.monotonic()
        if isinstance(msg, VerifyRequest):
            yield self._verify(session, msg)
        elif isinstance(msg, MoreCandidates):
            yield self._more_candidates(session, msg)
        elif isinstance(msg, Close):
            del self.sessions[msg.session_id]

    def expire_idle(self) -> None:
        """Drop sessions idle for longer than ``session_ttl_s``."""
        now = time.monotonic()
        for sid in [s for s, sess in self.sessions.items() if now - sess.last_used > self.session_ttl_s]:
            del self.sessions[sid]

    # -- sessions ------------------------------------------------------------------------------

    def _open(self, msg: OpenSession) -> Iterator[Message]:
        check_against(msg, self.vocab_size, open_sessions=self.seen_ids)
        if msg.prompt_ids[-1] == self.target.eos_token_id:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "prompt_ids ends with EOS")
        try:
            with Image.open(io.BytesIO(msg.image)) as img:
                image = img.convert("RGB")
        except Exception as exc:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"image is not a readable {msg.image_format}") from exc
        inputs = self.target.prepare_from_ids(image, list(msg.prompt_ids))
        if inputs.num_visual_tokens == 0:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "prompt_ids hold no image placeholder tokens")
        keep = self._kept(msg, inputs.num_visual_tokens)
        try:
            state, logits = self.target.prefill(inputs, keep=keep)
        except (ValueError, RuntimeError) as exc:  # e.g. placeholder count != visual tokens
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"prompt does not fit the image: {exc}") from exc
        self.stats.forwards += 1
        self.seen_ids.add(msg.session_id)
        session = Session(
            session_id=msg.session_id,
            method=msg.method,
            temperature=msg.temperature,
            top_p=msg.top_p,
            max_new_tokens=msg.max_new_tokens,
            num_candidates=msg.num_candidates,
            state=state,
            last_logits=logits,
            generator=torch.Generator().manual_seed(msg.seed),
        )
        self.sessions[msg.session_id] = session
        yield SessionOpened(msg.session_id, self.vocab_size)
        if msg.method == "target_only":
            yield from self._stream(session)

    def _kept(self, msg: OpenSession, num_visual: int) -> torch.Tensor | None:
        """The target's kept visual tokens (lossy prune-target mode), or None for all; ``decode`` checked the order."""
        if not msg.keep:
            return None
        device_visual = sum(1 for t in msg.prompt_ids if t == self.target.image_token_id)
        if device_visual != num_visual:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"keep indexes the device's {device_visual} visual tokens, "
                                f"the target has {num_visual}")  # fmt: skip
        if msg.keep[-1] >= num_visual or any(b <= a for a, b in zip(msg.keep, msg.keep[1:], strict=False)):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"keep must be sorted distinct indices in [0, {num_visual})")
        return torch.tensor(msg.keep, dtype=torch.long)

    def _stream(self, s: Session) -> Iterator[Message]:
        """target_only: decode to EOS or max_new_tokens, streaming TokenChunks."""
        chunk: list[int] = []
        seq = 0
        for i in range(s.max_new_tokens):
            token = self._pick(s, s.last_logits)
            last = token == self.target.eos_token_id or i + 1 == s.max_new_tokens
            if token != self.target.eos_token_id:
                chunk.append(token)
            if last or len(chunk) >= self.stream_chunk:
                yield TokenChunk(s.session_id, seq, chunk, last)
                seq, chunk = seq + 1, []
            if last:
                break
            s.last_logits = self.target.forward(s.state, torch.tensor([token]))[-1]
            self.stats.forwards += 1
        del self.sessions[s.session_id]

    def _pick(self, s: Session, logits: torch.Tensor) -> int:
        if not s.sampling:
            return int(torch.argmax(logits))
        return int(sample(probs_from_logits(logits.float(), s.temperature, s.top_p), s.generator))

    # -- verification --------------------------------------------------------------------------

    def _check_last_token(self, s: Session, msg: VerifyRequest) -> None:
        tok, exp = msg.last_token, s.expected
        if exp is None:
            if tok != -1:
                raise ProtocolError(ErrorCode.INVALID_FIELD, f"last_token = {tok} in round 0 (must be -1)")
            return
        if tok < 0 or tok >= self.vocab_size:
            raise ProtocolError(ErrorCode.OUT_OF_VOCAB, f"last_token = {tok} is not a token id")
        ok = (
            tok == exp.token
            or tok in exp.candidates
            or (exp.p_row is not None and exp.token < 0 and float(exp.p_row[tok]) > 0)
        )
        if not ok:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"last_token = {tok} is not a token the edge allowed")

    def _verify(self, s: Session, msg: VerifyRequest) -> VerifyResponse:
        committed = len(s.committed) + (0 if s.expected is None else 1)
        check_against(msg, self.vocab_size, mode=s.method, sampling=s.sampling, expected_seq=s.seq,
                      committed_len=committed)  # fmt: skip
        self._check_last_token(s, msg)
        if committed + len(msg.draft_ids) > s.max_new_tokens:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"block of {len(msg.draft_ids)} exceeds max_new_tokens")
        eos = self.target.eos_token_id
        if eos in msg.draft_ids[:-1]:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "draft_ids continue after EOS")
        # -- all checks passed: from here on the session changes.
        draft_ids = torch.tensor(msg.draft_ids)
        prefix = [] if msg.last_token < 0 else [msg.last_token]
        base_len = s.state.seq_len
        logits = self.target.forward(s.state, torch.tensor(prefix + msg.draft_ids))  # [c + k, V]
        self.stats.forwards += 1
        self.stats.verify_rounds += 1
        rows = torch.cat([s.last_logits[None], logits])[len(prefix) :]  # [k + 1, V]: p_1 .. p_{k+1}
        p = probs_from_logits(rows.float(), s.temperature, s.top_p)  # [k + 1, V]
        if not s.sampling:
            num_accepted, rejected = verify_greedy(draft_ids, rows).num_accepted, None
        else:
            q = self._draft_probs(s, msg, draft_ids)
            result = verify_sampling(draft_ids, q, p, s.generator)
            num_accepted, rejected = result.num_accepted, result.rejected
        s.committed.extend(prefix + msg.draft_ids[:num_accepted])
        self.target.rollback(s.state, base_len + len(prefix) + num_accepted)
        s.last_logits = rows[num_accepted]
        s.seq += 1
        s.more_requests = 0
        return self._verdict(s, msg, p, num_accepted, rejected)

    def _draft_probs(self, s: Session, msg: VerifyRequest, draft_ids: torch.Tensor) -> torch.Tensor:
        if s.method == "vanilla_sd":
            dists = torch.from_numpy(np.array(bytes_to_probs(msg.draft_dists, rows=len(msg.draft_ids))))
            return dists[torch.arange(len(msg.draft_ids)), draft_ids]
        return torch.from_numpy(np.array(bytes_to_probs(msg.draft_probs)))

    def _verdict(
        self, s: Session, msg: VerifyRequest, p: torch.Tensor, n: int, rejected: bool | None
    ) -> VerifyResponse:
        """The reply for ``n`` accepted drafts; records what the device may commit next."""
        k = len(msg.draft_ids)
        row = p[n]  # [V] p at the position after the accepted drafts
        token, cand_ids, cand_probs, dists = -1, [], b"", b""
        expected = Expected()
        if s.method == "vanilla_sd":
            dists = probs_to_bytes(p)
            if s.sampling:
                expected.p_row = row
            else:
                expected.token = int(torch.argmax(row))
        elif not s.sampling:
            expected.token = int(torch.argmax(row))
            if s.method == "dssd" and n < k:
                dists = probs_to_bytes(row[None])  # dssd ships p at the rejected position, also when greedy
            else:
                token = expected.token
        elif not rejected:
            token = expected.token = int(sample(row, s.generator))  # bonus
        elif s.method == "dssd":
            dists, expected.p_row = probs_to_bytes(row[None]), row
        else:  # covspec: candidates from p at the rejected position
            ids, vals = sample_candidates(row, s.num_candidates, s.generator)
            cand_ids, cand_probs = ids.tolist(), probs_to_bytes(vals)
            expected.candidates, expected.p_row = set(cand_ids), row
        s.expected = expected
        return VerifyResponse(s.session_id, msg.seq, n, token, cand_ids, cand_probs, dists)

    def _more_candidates(self, s: Session, msg: MoreCandidates) -> VerifyResponse:
        check_against(msg, self.vocab_size, mode=s.method, expected_seq=s.seq - 1)
        exp = s.expected
        if exp is None or not exp.candidates or exp.p_row is None:
            raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, "MoreCandidates but no candidates are outstanding")
        s.more_requests += 1
        if s.more_requests >= CANDIDATE_ROUNDS_BEFORE_FULL_ROW:
            # Rare (q ~ p): ship the whole row so the device finishes with residual sampling.
            return VerifyResponse(s.session_id, msg.seq, 0, -1, [], b"", probs_to_bytes(exp.p_row[None]))
        ids, vals = sample_candidates(exp.p_row, s.num_candidates, s.generator)
        exp.candidates.update(ids.tolist())
        return VerifyResponse(s.session_id, msg.seq, 0, -1, ids.tolist(), probs_to_bytes(vals), b"")


def error_of(msg: Message) -> ErrorReply | None:
    """The message as an ErrorReply, or None."""
    return msg if isinstance(msg, ErrorReply) else None
