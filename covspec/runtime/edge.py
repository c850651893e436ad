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

A session's first round can ride on its prefill: with the ``fused`` / ``idle`` prefill policies the target prefills
the prompt and scores the first block in one forward (``Edge`` below; docs/engine.md).

Batching: ``process`` takes a list of work items (frames from any devices, and ``Step``s that decode one more
token of a target_only stream) and runs **one batched target forward** (``adapter.forward_batch``) for every
verification and decode step among them, over sessions of different lengths. Each item is checked first, then the
forward runs, then each session is finished; a session named twice in one batch is handled in a second pass.
``handle`` is the single-frame path the in-process transport uses; the Ray Serve edge (``covspec.cluster``) groups
frames from all devices with ``@serve.batch`` and calls ``process``.

Every check happens before any state changes: a bad frame gets an ``ErrorReply`` and the session is
exactly as it was. A session belongs to the peer that opened it (the transport's identity of a device); a frame
from another peer naming it is refused as unknown, exactly like an expired session, and changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch
from PIL import Image

from covspec.decoding.sampling import probs_from_logits, sample
from covspec.decoding.tree import chain, depths, parents_from_branches, verify_greedy_tree
from covspec.decoding.verify import accept_drafts, sample_candidates, verify_greedy, verify_sampling
from covspec.models.base import DecodeState, PromptInputs, VLMAdapter
from covspec.models.kvcache import keep_nodes
from covspec.protocol import (
    UP_MESSAGES,
    AltVerdict,
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

Reply = tuple[Message, bytes]


@dataclass(frozen=True)
class Frame:
    """A frame from a device. ``peer``: the transport's identity of the sender ("" in one process)."""

    payload: bytes
    peer: str = ""


@dataclass(frozen=True)
class Step:
    """Decode (and stream) the next token of the target_only session ``session_id``."""

    session_id: str
    peer: str = ""


Work = Frame | Step


@dataclass
class Expected:
    """What the device may commit as ``last_token`` next round."""

    token: int = -1  # a token the edge chose (greedy, bonus)
    candidates: set[int] = field(default_factory=set)  # covspec: any candidate sent
    p_row: torch.Tensor | None = None  # [V] p at the position (covspec keeps it to draw more candidates)
    row_sent: bool = False  # the device got p itself (dssd, vanilla, covspec's fallback): any token with p > 0
    more: int = 0  # MoreCandidates answered for this position
    alts: dict[int, PendingAlt] = field(default_factory=dict)  # sampling trees: root node -> its verdict
    tree_base: int = 0  # with ``alts``: the cache length before the tree; the tree's entries are still all there
    path: list[int] = field(default_factory=list)  # with ``alts``: the committed path's entries, from ``tree_base``


@dataclass
class PendingAlt:
    """Sampling trees: an alternative rooted where the main chain was rejected, kept until the device's next frame
    says whether its correction took it (``VerifyRequest.via``)."""

    tokens: list[int]  # its root and accepted continuation: committed if taken
    entries: list[int]  # its cache entries (root, accepted continuation), counted from ``Expected.tree_base``
    last_logits: torch.Tensor  # [V] target logits after its last accepted token
    expected: Expected  # what the device may commit after it: its bonus, or one of its candidates


@dataclass
class Session:
    """One request's state on the edge."""

    session_id: str
    method: str
    temperature: float
    top_p: float
    max_new_tokens: int
    num_candidates: int
    state: DecodeState | None  # None while the prefill waits for the first block (``opening``)
    last_logits: torch.Tensor | None  # [V] target logits at the end of the cache (None with ``state``)
    generator: torch.Generator
    peer: str = ""
    committed: list[int] = field(default_factory=list)  # fed into the target cache
    seq: int = 0  # next expected VerifyRequest.seq (target_only: next TokenChunk.seq)
    expected: Expected | None = None  # None in round 0
    verified: int = 0  # rounds verified by this session (0 for a freshly reopened one)
    last_used: float = field(default_factory=time.monotonic)
    opening: PromptInputs | None = None  # fused prefill: the checked prompt, prefilled with the first block
    idle_refused: bool = False  # the model refused its idle prefill: not retried, its first block gets the error

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def length(self) -> int:
        """Positions in the target cache (or that the pending prefill will put there)."""
        return self.state.seq_len if self.state is not None else int(self.opening.input_ids.shape[0])


@dataclass
class EdgeStats:
    busy_s: float = 0.0  # wall time inside ``process`` (the edge's own clock)
    cpu_s: float = 0.0  # CPU time of the edge's process inside ``process`` (all its threads)
    thread_cpu_s: float = 0.0  # CPU time of the thread that calls ``process`` (with 1 torch thread: the compute)
    prefill_s: float = 0.0  # wall time of OpenSession prefills
    prefill_cpu_s: float = 0.0  # CPU time of the edge's process during those prefills (unstretched by co-location)
    prefill_thread_cpu_s: float = 0.0  # CPU time of the calling thread during those prefills
    forward_s: float = 0.0  # wall time of the (batched) verify / decode forwards
    forwards: int = 0  # target forwards (a batched forward counts once)
    fused_prefills: int = 0  # prefills that scored the session's first block in the same forward (in prefill_s)
    idle_prefills: int = 0  # sessions prefilled by ``prefill_idle`` (their first block came to a prefilled session)
    prefill_forwards: int = 0  # forwards that prefilled (a batched prefill counts once)
    prefills: int = 0  # sessions prefilled (prefills / prefill_forwards: the mean prefill batch)
    verify_rounds: int = 0
    decode_steps: int = 0  # target_only tokens decoded
    errors: int = 0
    batches: int = 0  # calls of ``process``
    batch_sizes: dict[int, int] = field(default_factory=dict)  # sessions in one batched forward -> how often

    def to_dict(self) -> dict:
        return {
            "busy_s": self.busy_s,
            "cpu_s": self.cpu_s,
            "thread_cpu_s": self.thread_cpu_s,
            "prefill_s": self.prefill_s,
            "prefill_cpu_s": self.prefill_cpu_s,
            "prefill_thread_cpu_s": self.prefill_thread_cpu_s,
            "forward_s": self.forward_s,
            "forwards": self.forwards,
            "fused_prefills": self.fused_prefills,
            "idle_prefills": self.idle_prefills,
            "prefill_forwards": self.prefill_forwards,
            "prefills": self.prefills,
            "verify_rounds": self.verify_rounds,
            "decode_steps": self.decode_steps,
            "errors": self.errors,
            "batches": self.batches,
            "batch_sizes": dict(self.batch_sizes),
        }


@dataclass
class _Open:
    """A checked OpenSession waiting for its (batched) prefill; ``out`` receives its replies."""

    msg: OpenSession
    peer: str
    inputs: PromptInputs
    keep: torch.Tensor | None
    out: list[Message]
    carry: list[int] = field(default_factory=list)  # reopened: committed tokens fed after the prefill (see _open_check)


@dataclass
class _Job:
    """A session's share of a batched forward: the tokens to score and what to do with the logits."""

    session: Session
    tokens: list[int]
    finish: Callable[[torch.Tensor], list[Message]]
    parents: list[int] | None = None  # a token tree over ``tokens`` (covspec.decoding.tree); None: a chain
    msg: Message | None = None  # the frame (error replies name its session and seq)


def prefill_policy(configured: str, shared: bool) -> str:
    """The edge's policy for ``verification.prefill``: ``auto`` is ``fused`` on an edge many devices share (the Ray
    Serve edge) and ``idle`` on one that serves one request at a time (in one process)."""
    if configured == "auto":
        return "fused" if shared else "idle"
    return configured


class Edge:
    """Holds the target adapter and the sessions; ``process`` answers a batch of work, ``handle`` one frame.

    Thread-safe: one batch is processed at a time (one model, one compute stream).

    **Prefill policy** (``prefill``; adapters with ``prefill_fused``, else always ``separate``):

    - ``fused``: a speculative session's OpenSession is checked and answered at once, and its prefill waits for the
      session's first block, which the target then scores in the same forward as the prompt. A device drafts its
      first block while its OpenSession travels, so the block follows within a draft's time; one forward instead of
      two saves the second forward's fixed cost (the edge's first verification round is nearly free), at the price
      of no longer overlapping the target prefill with that drafting.
    - ``idle`` (the default): as ``fused``, but whoever serves the edge calls ``prefill_idle`` when no frame is
      waiting, which prefills the sessions waiting for a block if no other session is mid-request: an edge serving
      one request overlaps the prefill with the device's drafting (latency); an edge serving many fuses, since any
      idle moment is short and a prefill started in it would hold up the next block (capacity, and latency too: in
      ``covspec run`` on this host, prefilling in every idle moment lost on system throughput, capacity and p50).
    - ``separate``: every session is prefilled when it opens.

    target_only streams and lossy prune-target sessions are always prefilled when they open; a session asked for
    candidates before any block (a reopened correction) is prefilled then.

    Args:
        target: the target VLM adapter (``forward_batch`` is used when it has one).
        session_ttl_s: sessions idle for longer are dropped (the device reopens them).
        prefill: ``idle``, ``fused`` or ``separate`` (above).
    """

    def __init__(self, target: VLMAdapter, session_ttl_s: float = 600.0, prefill: str = "idle") -> None:
        if prefill not in ("idle", "fused", "separate"):
            raise ValueError(f"prefill must be idle, fused or separate, got {prefill!r}")
        self.target = target
        self.vocab_size = target.vocab_size
        self.sessions: dict[str, Session] = {}
        self.seen_ids: set[str] = set()
        self.session_ttl_s = session_ttl_s
        self.defer_prefill = prefill != "separate" and hasattr(target, "prefill_fused")
        self.prefill_when_idle = prefill == "idle"
        self.stats = EdgeStats()
        self._lock = threading.Lock()

    # -- entry points --------------------------------------------------------------------------

    def handle(self, payload: bytes, peer: str = "") -> Iterator[Reply]:
        """Replies to one frame, in order; a target_only OpenSession streams its tokens one ``Step`` at a time."""
        replies = self.process([Frame(payload, peer)])[0]
        yield from replies
        sid = self.stream_opened(replies)
        while sid is not None:
            replies = self.process([Step(sid, peer)])[0]
            yield from replies
            if not self.stream_continues(replies):
                break

    @staticmethod
    def stream_continues(replies: list[Reply]) -> bool:
        """Whether a target_only stream goes on after ``replies`` (no error, no finished chunk)."""
        return bool(replies) and not any(
            isinstance(m, ErrorReply) or (isinstance(m, TokenChunk) and m.finished) for m, _ in replies
        )

    def stream_opened(self, replies: list[Reply]) -> str | None:
        """The session id when ``replies`` opened a target_only stream that still has tokens to decode."""
        for msg, _ in replies:
            if isinstance(msg, SessionOpened):
                s = self.sessions.get(msg.session_id)
                if s is not None and s.method == "target_only":
                    return msg.session_id
        return None

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Hold the edge and add the block's wall, process-CPU and thread-CPU time to its busy clocks."""
        with self._lock:
            start, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
            try:
                yield
            finally:
                self.stats.busy_s += time.perf_counter() - start
                self.stats.thread_cpu_s += time.thread_time() - thread  # read inside the process clock's interval
                self.stats.cpu_s += time.process_time() - cpu

    @contextlib.contextmanager
    def _prefilling(self) -> Iterator[None]:
        """Add the block's wall, process-CPU and thread-CPU time to the prefill clocks."""
        t, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        try:
            yield
        finally:
            self.stats.prefill_s += time.perf_counter() - t
            self.stats.prefill_thread_cpu_s += time.thread_time() - thread
            self.stats.prefill_cpu_s += time.process_time() - cpu

    def _idle_prefills(self) -> list[Session]:
        """The sessions ``prefill_idle`` would prefill: every live session, if all of them wait for their first block;
        else none (a prefilled session's next frame would wait behind the prefill)."""
        waiting = [s for s in self.sessions.values() if s.state is None and not s.idle_refused]
        return waiting if len(waiting) == len(self.sessions) else []

    def prefill_idle(self) -> int:
        """With the ``idle`` policy, when the caller has no frame waiting: prefill the sessions waiting for their first
        block (one batched forward when the adapter can), unless another live session is mid-request — its next
        block is on its way and would wait behind the prefill, so the waiting ones fuse with their blocks instead.
        Returns the sessions prefilled."""
        if not self.prefill_when_idle:
            return 0
        with self._lock:  # nothing to do costs no busy time
            if not self._idle_prefills():
                return 0
        with self._busy():
            waiting = self._idle_prefills()
            if not waiting:
                return 0
            done = 0
            with self._prefilling():
                for s, res in zip(waiting, self._prefill_all([s.opening for s in waiting]), strict=True):
                    if isinstance(res, Exception):  # it waits for its block, which gets the error reply
                        s.idle_refused = True
                        continue
                    self._prefilled(s, res[0], res[1].float().cpu())
                    self.stats.idle_prefills += 1
                    done += 1
            return done

    def process(self, work: list[Work]) -> list[list[Reply]]:
        """Answers every item of ``work``: the replies of item i (encoded) are ``result[i]``, in order."""
        with self._busy():
            self.expire_idle()
            self.stats.batches += 1
            replies: list[list[Message]] = [[] for _ in work]
            pending = list(range(len(work)))
            while pending:  # a session named twice in one batch waits for the next pass
                jobs: dict[int, _Job] = {}
                busy: set[str] = set()
                deferred: list[int] = []
                opens: list[_Open] = []
                for i in pending:
                    job = self._admit(work[i], replies[i], busy, deferred, i, opens)
                    if job is not None:
                        jobs[i] = job
                        busy.add(job.session.session_id)
                self._prefill(opens)
                self._run_jobs(jobs, replies)
                pending = deferred
            return [[(m, encode(m)) for m in msgs] for msgs in replies]

    # -- admission: checks, and the work that needs no target forward -------------------------------

    def _admit(
        self, item: Work, out: list[Message], busy: set[str], deferred: list[int], i: int, opens: list[_Open]
    ) -> _Job | None:
        """Checks ``item``; answers it at once, adds it to ``opens`` (prefilled together), or returns the job it
        adds to the batched forward."""
        msg: Message | None = None
        try:
            if isinstance(item, Step):
                return self._step_job(self._session(item.session_id, item.peer, busy, deferred, i, True), out)
            msg = decode(item.payload, expected=UP_MESSAGES)
            if isinstance(msg, OpenSession):
                opens.append(self._open_check(msg, item.peer, out))
                busy.add(msg.session_id)  # its first block, if in this batch, follows in the next pass
                return None
            session = self._session(msg.session_id, item.peer, busy, deferred, i)
            if session is None:
                return None
            session.last_used = time.monotonic()
            if isinstance(msg, VerifyRequest):
                return self._verify_job(session, msg)
            if isinstance(msg, MoreCandidates):
                out.append(self._more_candidates(session, msg))
            elif isinstance(msg, Close):
                del self.sessions[msg.session_id]
            return None
        except ProtocolError as err:
            self.stats.errors += 1
            out.append(error_reply(err, msg))
            return None

    def _session(
        self, sid: str, peer: str, busy: set[str], deferred: list[int], i: int, step: bool = False
    ) -> Session | None:
        """The live session ``sid`` of ``peer``; None (item deferred) when it is already in this pass's forward or
        opened in this pass."""
        if sid in busy:
            deferred.append(i)
            return None
        session = self.sessions.get(sid)
        if session is None or session.peer != peer:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {sid!r} (expired or never opened)")
        if step and session.method != "target_only":
            raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, f"session {sid!r} is not a target_only stream")
        return session

    def drop(self, session_id: str) -> None:
        """Forget a session (its caller went away)."""
        with self._lock:
            self.sessions.pop(session_id, None)

    def expire_idle(self) -> None:
        """Drop sessions idle for longer than ``session_ttl_s``."""
        now = time.monotonic()
        for sid in [s for s, sess in self.sessions.items() if now - sess.last_used > self.session_ttl_s]:
            del self.sessions[sid]

    def _run_jobs(self, jobs: dict[int, _Job], replies: list[list[Message]]) -> None:
        """One target forward for every job (batched when there are several), then each job's finish; sessions
        whose prefill waits for their first block get one fused forward of their own (``_run_fused``)."""
        fused = {i: jobs.pop(i) for i in [i for i, job in jobs.items() if job.session.state is None]}
        if fused:
            self._run_fused(fused, replies)
        if not jobs:
            return
        items = list(jobs.items())
        states = [job.session.state for _, job in items]
        tokens = [torch.tensor(job.tokens) for _, job in items]
        trees = [job.parents for _, job in items]
        t = time.perf_counter()
        if len(items) > 1 and hasattr(self.target, "forward_batch"):
            logits = self.target.forward_batch(states, tokens, trees if any(trees) else None)
        else:
            logits = [self.target.forward(st, tk, *([tr] if tr else []))
                      for st, tk, tr in zip(states, tokens, trees, strict=True)]  # fmt: skip
            self.stats.forwards += len(items) - 1
        self.stats.forward_s += time.perf_counter() - t
        self.stats.forwards += 1
        self.stats.batch_sizes[len(items)] = self.stats.batch_sizes.get(len(items), 0) + 1
        for (i, job), rows in zip(items, logits, strict=True):
            # Decisions run on the host, in float32 (CPU generators; the wire carries float32 anyway).
            replies[i].extend(job.finish(rows.float().cpu()))

    def _run_fused(self, jobs: dict[int, _Job], replies: list[list[Message]]) -> None:
        """Prefill pending sessions and score their first blocks: one forward for all of them when the adapter
        batches (``prefill_fused_batch``), else one each (``prefill_fused``); timed as prefill. A prompt the model
        refuses fails its session (error reply, session dropped), found one by one if the batch fails."""
        items = list(jobs.items())
        with self._prefilling():
            blocks = [(torch.tensor(job.tokens), job.parents) for _, job in items]
            results = self._prefill_all([job.session.opening for _, job in items], blocks=blocks)
        for n, (i, job) in enumerate(items):
            s = job.session
            if isinstance(results[n], Exception):  # e.g. placeholder count != visual tokens
                self.stats.errors += 1
                replies[i].append(error_reply(self._prefill_failed(s, results[n]), job.msg))
                continue
            self.stats.fused_prefills += 1
            state, rows = results[n]
            rows = rows.float().cpu()
            self._prefilled(s, state, rows[0])
            replies[i].extend(job.finish(rows[1:]))

    def _prefill_now(self, s: Session) -> None:
        """Prefill a pending session on its own (it needs its target row before any block arrives)."""
        with self._prefilling():
            (res,) = self._prefill_all([s.opening])
        if isinstance(res, Exception):
            raise self._prefill_failed(s, res) from res
        self._prefilled(s, res[0], res[1].float().cpu())

    def _prefilled(self, s: Session, state: DecodeState, logits: torch.Tensor) -> None:
        """A pending session's prefill is done: its cache and the target row after the prompt ([V], float32, host)."""
        s.state, s.last_logits, s.opening = state, logits, None
        self.stats.prefills += 1

    def _prefill_failed(self, s: Session, exc: Exception) -> ProtocolError:
        """A pending session whose prompt the model refused is dropped; the error to answer with."""
        self.sessions.pop(s.session_id, None)
        return _unfit(exc)

    # -- sessions ------------------------------------------------------------------------------

    def _open_check(self, msg: OpenSession, peer: str, out: list[Message]) -> _Open:
        """Every check of an OpenSession and its model inputs (prompt + ``committed`` for a reopened session)."""
        check_against(msg, self.vocab_size, open_sessions=self.seen_ids)
        eos = self.target.eos_token_ids
        if msg.prompt_ids[-1] in eos:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "prompt_ids ends with EOS")
        if any(t >= self.vocab_size for t in msg.committed):
            raise ProtocolError(ErrorCode.OUT_OF_VOCAB, "committed holds an id outside the vocabulary")
        if not eos.isdisjoint(msg.committed):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "committed holds EOS (a finished answer is not reopened)")
        if len(msg.committed) >= msg.max_new_tokens:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"committed holds {len(msg.committed)} tokens, "
                                f"max_new_tokens is {msg.max_new_tokens}")  # fmt: skip
        try:
            with Image.open(io.BytesIO(msg.image)) as img:
                image = img.convert("RGB")
        except Exception as exc:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"image is not a readable {msg.image_format}") from exc
        # A reopened session prefills its committed tokens with the prompt: one forward, positions continue. Unless
        # they hold the image placeholder id (a sampled answer can, where the target gives it mass): the prompt's
        # placeholders would then be miscounted, so those tokens are fed after the prefill, as plain tokens, exactly
        # as the lost session fed them.
        carry = list(msg.committed) if self.target.image_token_id in msg.committed else []
        inputs = self.target.prepare_from_ids(image, list(msg.prompt_ids) + ([] if carry else list(msg.committed)))
        if inputs.num_visual_tokens == 0:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "prompt_ids hold no image placeholder tokens")
        keep = self._kept(msg, inputs.num_visual_tokens)
        self.seen_ids.add(msg.session_id)  # never reused, even if the prefill fails
        return _Open(msg, peer, inputs, keep, out, carry)

    def _prefill(self, opens: list[_Open]) -> None:
        """Prefill every checked OpenSession: unpruned ones in one batched forward when the adapter can."""
        if not opens:
            return
        if self.defer_prefill:  # speculative sessions wait for their first block (see the class docstring)
            now = []
            for o in opens:
                if o.keep is None and o.msg.method != "target_only" and not o.carry:
                    self._open_session(o, None, None)
                else:
                    now.append(o)
            opens = now
            if not opens:
                return
        with self._prefilling():
            results = self._prefill_all([o.inputs for o in opens], keeps=[o.keep for o in opens])
            for o, res in zip(opens, results, strict=True):
                if isinstance(res, Exception):  # e.g. placeholder count != visual tokens
                    self.stats.errors += 1
                    o.out.append(error_reply(_unfit(res), o.msg))
                    continue
                self.stats.prefills += 1
                state, logits = res
                if o.carry:
                    try:
                        logits = self.target.forward(state, torch.tensor(o.carry))[-1]
                    except (ValueError, RuntimeError) as exc:
                        self.stats.errors += 1
                        o.out.append(error_reply(_unfit(exc), o.msg))
                        continue
                    self.stats.forwards += 1
                self._open_session(o, state, logits.float().cpu())

    def _prefill_all(
        self,
        inputs: list[PromptInputs],
        keeps: list[torch.Tensor | None] | None = None,
        blocks: list[tuple[torch.Tensor, list[int] | None]] | None = None,
    ) -> list[tuple[DecodeState, torch.Tensor] | Exception]:
        """Prefill each prompt (``keeps[i]``: its kept visual tokens, None for all), or with ``blocks`` each prompt
        and its first block (ids, tree) in one forward (``prefill_fused``): the unpruned ones in one batched forward
        when the adapter can, one by one if that fails; a prompt the model refuses gives its exception."""
        keeps = keeps or [None] * len(inputs)
        results: list[tuple[DecodeState, torch.Tensor] | Exception | None] = [None] * len(inputs)
        plain = [i for i, keep in enumerate(keeps) if keep is None]
        if len(plain) > 1 and hasattr(self.target, "prefill_fused_batch" if blocks else "prefill_batch"):
            try:
                if blocks:
                    batch = self.target.prefill_fused_batch([inputs[i] for i in plain], [blocks[i][0] for i in plain],
                                                            [blocks[i][1] for i in plain])  # fmt: skip
                else:
                    batch = self.target.prefill_batch([inputs[i] for i in plain])
                for i, res in zip(plain, batch, strict=True):
                    results[i] = res
                self.stats.forwards += 1
                self.stats.prefill_forwards += 1
            except (ValueError, RuntimeError):  # a prompt that does not fit its image: find it one by one below
                pass
        for i, keep in enumerate(keeps):
            if results[i] is None:
                try:
                    results[i] = (self.target.prefill_fused(inputs[i], *blocks[i]) if blocks
                                  else self.target.prefill(inputs[i], keep=keep))  # fmt: skip
                    self.stats.forwards += 1
                    self.stats.prefill_forwards += 1
                except (ValueError, RuntimeError) as exc:
                    results[i] = exc
        return results

    def _open_session(self, o: _Open, state: DecodeState | None, logits: torch.Tensor | None) -> None:
        """Register the session of a checked OpenSession (prefilled, or waiting for its first block: ``state``
        None) and answer it."""
        msg = o.msg
        self.sessions[msg.session_id] = Session(
            session_id=msg.session_id,
            method=msg.method,
            temperature=msg.temperature,
            top_p=msg.top_p,
            max_new_tokens=msg.max_new_tokens,
            num_candidates=msg.num_candidates,
            state=state,
            last_logits=logits,
            generator=torch.Generator().manual_seed(msg.seed + len(msg.committed)),
            peer=o.peer,
            committed=list(msg.committed),
            seq=msg.seq,
            opening=o.inputs if state is None else None,
        )
        o.out.append(SessionOpened(msg.session_id, self.vocab_size, sorted(self.target.eos_token_ids)))

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

    def _step_job(self, s: Session | None, out: list[Message]) -> _Job | None:
        """target_only: pick the next token from ``last_logits`` and stream it; feed it unless the stream ends."""
        if s is None:
            return None
        s.last_used = time.monotonic()
        token = self._pick(s, s.last_logits)
        ended = token in self.target.eos_token_ids
        last = ended or len(s.committed) + 1 >= s.max_new_tokens
        out.append(TokenChunk(s.session_id, s.seq, [] if ended else [token], last))
        s.seq += 1
        self.stats.decode_steps += 1
        if last:
            del self.sessions[s.session_id]
            return None

        def finish(rows: torch.Tensor) -> list[Message]:
            s.committed.append(token)
            s.last_logits = rows[-1]
            return []

        return _Job(s, [token], finish)

    def _pick(self, s: Session, logits: torch.Tensor) -> int:
        if not s.sampling:
            return int(torch.argmax(logits))
        return int(sample(probs_from_logits(logits.float(), s.temperature, s.top_p), s.generator))

    # -- verification --------------------------------------------------------------------------

    def _check_last_token(self, exp: Expected | None, msg: VerifyRequest) -> None:
        tok = msg.last_token
        if exp is None:
            if tok != -1:
                raise ProtocolError(ErrorCode.INVALID_FIELD, f"last_token = {tok} in round 0 (must be -1)")
            return
        if tok < 0 or tok >= self.vocab_size:
            raise ProtocolError(ErrorCode.OUT_OF_VOCAB, f"last_token = {tok} is not a token id")
        ok = (
            tok == exp.token
            or tok in exp.candidates
            or (exp.row_sent and exp.p_row is not None and exp.token < 0 and float(exp.p_row[tok]) > 0)
        )
        if not ok:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"last_token = {tok} is not a token the edge allowed")

    def _verify_job(self, s: Session, msg: VerifyRequest) -> _Job:
        """Checks a VerifyRequest (no state changes) and returns its share of the batched forward."""
        exp, alt = self._taken(s, msg.via)
        committed = len(s.committed) + (len(alt.tokens) if alt else 0) + (0 if exp is None else 1)
        check_against(msg, self.vocab_size, mode=s.method, sampling=s.sampling, expected_seq=s.seq,
                      committed_len=committed)  # fmt: skip
        self._check_last_token(exp, msg)
        # A chain is the tree whose nodes each follow the one before (the wire's branches are checked already).
        tree = parents_from_branches(len(msg.draft_ids), msg.branches) if msg.branches else None
        parents = tree or chain(len(msg.draft_ids))
        depth = max(depths(parents)) + 1
        if committed + depth > s.max_new_tokens:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"block of {depth} tokens exceeds max_new_tokens")
        if any(p >= 0 and msg.draft_ids[p] in self.target.eos_token_ids for p in parents):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "draft_ids continue after EOS")
        if s.sampling:  # decode the q values now: a malformed payload is refused before the forward
            q = self._draft_probs(s, msg, torch.tensor(msg.draft_ids))
        self._take(s, alt)  # every check passed: the previous round's tree alternatives are settled now
        prefix = [] if msg.last_token < 0 else [msg.last_token]
        base_len = s.length

        def finish(logits: torch.Tensor) -> list[Message]:  # [c + k, V]
            return [self._verify_finish(s, msg, tree, prefix, base_len, logits, q if s.sampling else None)]

        # A tree's job: the carried token (if any) first, the drafted tree hanging from it (-1 + c: after it).
        job_tree = None if tree is None else [*chain(len(prefix)), *(p + len(prefix) for p in tree)]
        return _Job(s, prefix + list(msg.draft_ids), finish, job_tree, msg)

    def _verify_finish(
        self, s: Session, msg: VerifyRequest, tree: list[int] | None, prefix: list[int], base_len: int,
        logits: torch.Tensor, q: torch.Tensor | None,
    ) -> VerifyResponse:  # fmt: skip
        """Accept/reject from the target rows; commit, crop the cache and build the verdict.

        A token tree (greedy) is walked with the target's argmax (``verify_greedy_tree``); its accepted path's
        rows then stand for the chain's, the cache keeps only the path's entries (``kvcache.keep_nodes``) and the
        verdict names the path's last node (``leaf``). Sampling trees: ``_verify_sampling_tree``."""
        self.stats.verify_rounds += 1
        rows = torch.cat([s.last_logits[None], logits])[len(prefix) :]  # [k + 1, V]: row i + 1 after node i
        if tree is not None and q is not None:
            return self._verify_sampling_tree(s, msg, tree, prefix, base_len, rows, q)
        rejected = None
        if tree is not None:
            nodes, _ = verify_greedy_tree(msg.draft_ids, tree, rows, self.target.eos_token_ids)
            rows = rows[[0] + [i + 1 for i in nodes]]  # [n + 1, V]: the chain's rows along the path
        p = probs_from_logits(rows.float(), s.temperature, s.top_p)
        if tree is None:
            draft_ids = torch.tensor(msg.draft_ids)
            if q is None:
                num_accepted = verify_greedy(draft_ids, rows).num_accepted
            else:
                num_accepted, rejected = verify_sampling(draft_ids, q, p, s.generator)
            nodes = list(range(num_accepted))
        c = len(prefix)
        s.committed.extend(prefix + [msg.draft_ids[i] for i in nodes])
        if tree is None:
            self.target.rollback(s.state, base_len + c + len(nodes))
        else:
            keep_nodes(s.state, base_len, [*range(c), *(c + i for i in nodes)])
        s.last_logits = rows[len(nodes)]
        s.seq += 1
        s.verified += 1
        verdict = self._verdict(s, msg, p, len(nodes), rejected)
        return verdict if tree is None else msgspec.structs.replace(verdict, leaf=nodes[-1] if nodes else -1)

    def _verify_sampling_tree(
        self, s: Session, msg: VerifyRequest, tree: list[int], prefix: list[int], base_len: int,
        rows: torch.Tensor, q: torch.Tensor,
    ) -> VerifyResponse:  # fmt: skip
        """A token tree under sampling: the main chain is verified as a chain (x_i accepted with min(1, p/q)); its
        alternatives are guesses of the correction, never accept-tested themselves.

        The correction at the rejected depth n is drawn by the device from r ∝ max(0, p − q), exactly as for a
        chain. For every alternative rooted at depth n the target rows of its continuation are already computed, so
        the edge also runs the continuation's accept test (its tokens were drawn from q after the root) and draws
        its bonus or candidates, all with fresh uniforms: if the device's correction is that root, committing the
        root, the accepted continuation and then the bonus or a correction from those candidates is one more exact
        speculative step after the root. Whichever token the correction is, its distribution is r: which
        alternatives were sent only decides how much of the next step is already verified. When there are such
        alternatives the tree's cache entries stay as they are until the next frame says which path was taken
        (``_take`` compacts them once)."""
        ids, c = msg.draft_ids, len(prefix)
        main = len(ids) - sum(msg.branches[1::2])
        p = probs_from_logits(rows.float(), s.temperature, s.top_p)  # [k + 1, V]
        n, rejected = verify_sampling(torch.tensor(ids[:main]), q[:main], p[: main + 1], s.generator)
        s.committed.extend(prefix + ids[:n])
        keep = [*range(c), *(c + i for i in range(n))]
        alts: dict[int, PendingAlt] = {}
        verdicts: list[AltVerdict] = []
        start = main
        for attach, length in zip(msg.branches[0::2], msg.branches[1::2], strict=True):
            root, cont = start, list(range(start + 1, start + length))
            start += length
            if not rejected or attach != n - 1:
                continue
            after = [root + 1, *(i + 1 for i in cont)]  # rows after the root and after each continuation token
            m = int(accept_drafts(torch.tensor([ids[i] for i in cont]), q[cont], p[after], s.generator)) if cont else 0
            row, exp = p[after[m]], Expected()
            token, cand_ids, cand_probs = -1, [], b""
            if m == len(cont):
                token = exp.token = int(sample(row, s.generator))  # bonus
            else:
                cand, vals = sample_candidates(row, s.num_candidates, s.generator)
                cand_ids, cand_probs = cand.tolist(), probs_to_bytes(vals)
                exp.candidates, exp.p_row = set(cand_ids), row
            nodes = [root, *cont[:m]]
            alts[root] = PendingAlt([ids[i] for i in nodes], [c + i for i in nodes], rows[after[m]], exp)
            verdicts.append(AltVerdict(root, m, token, cand_ids, cand_probs))
        if not alts:  # else the tree's entries stay until the next frame says which path to keep (one compaction)
            keep_nodes(s.state, base_len, keep)
        s.last_logits = rows[n]
        s.seq += 1
        s.verified += 1
        verdict = self._verdict(s, msg, p, n, rejected)
        s.expected.alts, s.expected.tree_base, s.expected.path = alts, base_len, keep
        return msgspec.structs.replace(verdict, leaf=n - 1, alts=verdicts)

    def _taken(self, s: Session, via: int) -> tuple[Expected | None, PendingAlt | None]:
        """What the device may commit as ``last_token`` and the alternative ``via`` names (no state changes)."""
        if via < 0:
            return s.expected, None
        alt = s.expected.alts.get(via) if s.expected is not None else None
        if alt is None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"via = {via} names no tree alternative of the last verdict")
        return alt.expected, alt

    def _take(self, s: Session, alt: PendingAlt | None) -> None:
        """Settle the previous round's tree alternatives: keep the committed path's cache entries, and the taken
        alternative's after them (one compaction of the tree's entries)."""
        exp = s.expected
        if exp is None or not exp.alts:
            return
        keep_nodes(s.state, exp.tree_base, exp.path + (alt.entries if alt is not None else []))
        if alt is not None:
            s.committed.extend(alt.tokens)
            s.last_logits, s.expected = alt.last_logits, alt.expected
        exp.alts = {}

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
                expected.p_row, expected.row_sent = row, True
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
            dists, expected.p_row, expected.row_sent = probs_to_bytes(row[None]), row, True
        else:  # covspec: candidates from p at the rejected position
            ids, vals = sample_candidates(row, s.num_candidates, s.generator)
            cand_ids, cand_probs = ids.tolist(), probs_to_bytes(vals)
            expected.candidates, expected.p_row = set(cand_ids), row
        s.expected = expected
        # A verdict that ends the answer closes the session, where the edge knows the round's last token (greedy, or a
        # bonus it drew): an accepted EOS, that token being EOS, or the answer reaching max_new_tokens with it. The
        # device applies the same rule and sends no Close (Device._settle_round).
        eos = self.target.eos_token_ids
        last = expected.token
        if (n > 0 and s.committed[-1] in eos) or (
            last >= 0 and (last in eos or len(s.committed) + 1 >= s.max_new_tokens)
        ):
            self.sessions.pop(s.session_id, None)
        return VerifyResponse(s.session_id, msg.seq, n, token, cand_ids, cand_probs, dists)

    def _more_candidates(self, s: Session, msg: MoreCandidates) -> VerifyResponse:
        """m more candidates for the pending covspec correction.

        A device that lost its session while correcting reopens it from the tokens committed up to the rejected
        position (``seq`` = the next round) and asks again: with nothing outstanding on a reopened covspec sampling
        session, the candidates are drawn from p at the next position, exactly the row the lost session held (the
        target's distribution after the same prefix), so the device's rejection sampling goes on with fresh i.i.d.
        draws and stays exact.
        """
        check_against(msg, self.vocab_size, mode=s.method, expected_seq=s.seq - 1)
        exp = self._taken(s, msg.via)[0]  # via: the correction after a tree alternative the device took
        if exp is None and s.sampling and s.seq > 0 and s.verified == 0:  # resuming a correction after a reopen
            if s.state is None:  # its prefill was waiting for a block: the row is needed now
                self._prefill_now(s)
            exp = Expected(p_row=probs_from_logits(s.last_logits.float(), s.temperature, s.top_p))
        if exp is None or exp.p_row is None:  # MoreCandidates is refused outside covspec sessions already
            raise ProtocolError(ErrorCode.UNEXPECTED_TYPE, "MoreCandidates but no candidates are outstanding")
        if s.expected is None:
            s.expected = exp
        exp.more += 1
        if exp.more >= CANDIDATE_ROUNDS_BEFORE_FULL_ROW:
            # Rare (q ~ p): ship the whole row so the device finishes with residual sampling.
            exp.row_sent = True
            return VerifyResponse(s.session_id, msg.seq, 0, -1, [], b"", probs_to_bytes(exp.p_row[None]))
        ids, vals = sample_candidates(exp.p_row, s.num_candidates, s.generator)
        exp.candidates.update(ids.tolist())
        return VerifyResponse(s.session_id, msg.seq, 0, -1, ids.tolist(), probs_to_bytes(vals), b"")


def _unfit(exc: Exception) -> ProtocolError:
    """The error of a prompt the target refused to prefill (e.g. placeholder count != visual tokens)."""
    return ProtocolError(ErrorCode.INVALID_FIELD, f"prompt does not fit the image: {str(exc).splitlines()[0]}")


def error_of(msg: Message) -> ErrorReply | None:
    """The message as an ErrorReply, or None."""
    return msg if isinstance(msg, ErrorReply) else None
