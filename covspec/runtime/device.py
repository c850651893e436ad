"""The Device: the draft VLM, one request at a time, talking to the edge through a ``Transport``.

One speculative round (gpt-fast shape), for vanilla_sd, dssd and covspec:

1. Draft a block x_1..x_k from the draft's next-token logits, keeping each q row; x_k is not fed
   to the draft yet (it only matters if the whole block is accepted).
2. Send ``VerifyRequest`` (ids, q(x_i) when sampling, the full q rows for vanilla_sd) and wait.
3. Commit the n accepted drafts plus one more token: the edge's token (greedy, bonus), or a local
   correction from the candidates (covspec), from p at the rejected position (dssd) or from the k+1
   rows of p (vanilla_sd).
4. Crop the draft cache to the accepted prefix and feed the rest (x_k if all were accepted, and the
   new token) in one forward.

Visual token pruning: a ``Pruner`` (``covspec.pruning``) picks the visual tokens the draft prefills with, on the
device, timed as ``pruner_s`` (device busy time); ``run(..., keep=...)`` overrides it. With
``settings.prune_target`` the target prefills with the same tokens (lossy: results are labelled ``lossy``).
Adaptive block lengths and parallel branching (``settings.pipelined``) run in ``covspec.runtime.pipeline``, which
takes over after the prefill; the loop here is the fixed-γ baseline.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch
from PIL import Image

from covspec.decoding.autoregressive import generate
from covspec.decoding.sampling import probs_from_logits, sample
from covspec.decoding.tree import branches_from_parents
from covspec.decoding.verify import correct_from_candidates, correct_from_residual
from covspec.models.base import DecodeState, PromptInputs, VLMAdapter
from covspec.protocol import (
    PROJECTED_VOCAB,
    AltVerdict,
    Close,
    ErrorCode,
    ErrorReply,
    MoreCandidates,
    OpenSession,
    Projection,
    ProtocolError,
    Round,
    SessionOpened,
    TokenChunk,
    TrafficCounter,
    VerifyRequest,
    VerifyResponse,
    bytes_to_probs,
    check_against,
    new_session_id,
    probs_to_bytes,
)
from covspec.pruning import Pruner, choose
from covspec.runtime.transport import Transport

SPECULATIVE_METHODS = ("vanilla_sd", "dssd", "covspec")
ALL_METHODS = ("target_only", "draft_only", *SPECULATIVE_METHODS)
MAX_REOPENS = 5
"""Times in a row one request may reopen its edge session (lost to expiry or a restarted edge) without getting a
reply, before it gives up."""
_RECOVERABLE = (ErrorCode.UNKNOWN_SESSION, ErrorCode.UNAVAILABLE)


class EdgeError(RuntimeError):
    """The edge refused a frame of ours (a bug on one side), or a lost session could not be reopened."""


@dataclass
class EdgeSession:
    """The device's handle on its session at the edge, with what it needs to reopen it.

    A session can vanish (expired; its edge replica restarted; routed to a replica that never had it). The device
    then reopens it from its committed tokens: the same ``OpenSession`` with a fresh id, ``committed`` (the target
    prefills prompt + committed tokens) and the next ``seq``, and resends the block in flight with ``last_token=-1``
    (the edge has already fed every committed token). Greedy output is unchanged; sampling stays exact (the reopened
    session draws from a fresh random stream). A session lost while the device asks for more candidates (a covspec
    correction in progress) is reopened from the tokens committed through the accepted drafts, with ``seq`` = the
    next round, and the ``MoreCandidates`` is resent: the edge draws the candidates from p at that position, which
    the lost session held too, so the correction's rejection sampling goes on with fresh i.i.d. draws from p.
    """

    open_msg: OpenSession
    in_flight: tuple[VerifyRequest, list[int]] | None = None  # the block awaiting its verdict, committed tokens
    correcting: tuple[list[int], list[int], int] | None = None  # a correction in progress: committed, accepted, round
    reopens: int = 0  # in total
    failed: int = 0  # reopens since the last reply
    closed: bool = False  # the edge closed it after the verdict that ended the answer (no Close is sent)

    @property
    def sid(self) -> str:
        return self.open_msg.session_id


@dataclass
class DeviceSettings:
    """What the device needs to know about one request's decoding."""

    method: str = "covspec"
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    gamma: int = 5  # fixed draft length
    num_candidates: int = 4
    seed: int = 0
    compute_slowdown: float = 1.0  # >1 emulates a slower device: draft compute is stretched by this factor
    reply_timeout_s: float = 120.0
    # Adaptive drafting and parallel branching (covspec.runtime.pipeline; docs/drafting.md).
    policy: str = "fixed"  # fixed: gamma tokens per block; adaptive: confidence stop + cost-model controller
    gamma_min: int = 1
    gamma_max: int = 24
    threshold: float = 0.4  # confidence stop: end a block after a token drafted with top probability below this
    stop: str = "threshold"  # the stop's threshold: threshold (fixed) or cost (the cost model's, capped)
    branch_budget: int = 0  # branches drafted while a block is verified (main + budget - 1 alternatives); 0: off
    tree: int = 0  # alternative branches sent with each block and verified in the same round; 0: chains
    tree_continuation: int = 0  # most tokens drafted after a tree alternative's root; 0: as deep as the block
    prune_target: bool = False  # lossy: the edge prefills the target with the draft's kept visual tokens too
    projected_vocab: int = PROJECTED_VOCAB  # the vocabulary decoding traffic is also projected to (its frames)

    @property
    def pipelined(self) -> bool:
        """Whether requests go through the pipelined loop instead of the fixed-gamma one."""
        return self.policy == "adaptive" or self.branch_budget > 0 or self.tree > 0


@dataclass
class RequestResult:
    """One request's output and measurements."""

    method: str
    token_ids: list[int]
    text: str
    latency_s: float
    ttft_s: float
    rounds: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    more_candidate_requests: int = 0
    device_busy_s: float = 0.0
    device_idle_s: float = 0.0
    visual_tokens_kept: int = 0
    visual_tokens: int = 0
    draft_prefill_s: float = 0.0  # vision tower + draft LM prefill
    pruner_s: float = 0.0  # scoring and selection of the visual tokens (vision tower excluded: it is shared)
    lossy: bool = False  # the target saw a pruned image too (prune_target): output need not match target_only
    traffic: TrafficCounter = field(default_factory=TrafficCounter)
    round_log: list[Round] = field(default_factory=list)
    branch_hits: int = 0  # rounds whose next block started from a branch drafted during the wait
    branch_misses: int = 0  # rounds (with branching on) where no branch matched the verdict
    tokens_reused: int = 0  # drafts taken from matching branches into later blocks
    tree_rounds: int = 0  # rounds that sent a token tree (branching.tree > 0)
    tree_hits: int = 0  # tree rounds whose accepted path (sampling: correction) went through an alternative branch
    tree_nodes: int = 0  # alternative tokens sent in trees (not counted in num_drafted, which counts the blocks)
    controller_gammas: list[int] = field(default_factory=list)  # adaptive: the controller's gamma for each block
    session_reopens: int = 0  # times the edge session was lost and reopened from the committed tokens
    closed_by_edge: bool = False  # the verdict that ended the answer closed the session: no Close frame was sent

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def metrics(self) -> dict[str, Any]:
        """Flat per-request metrics (the JSONL fields besides ids and text)."""
        t = self.traffic
        rounds = max(self.rounds, 1)
        device_s = self.device_busy_s + self.device_idle_s
        branch_rounds = self.branch_hits + self.branch_misses
        return {
            "num_tokens": self.num_tokens,
            "latency_s": self.latency_s,
            "ttft_s": self.ttft_s,
            "rounds": self.rounds,
            "num_drafted": self.num_drafted,
            "num_accepted": self.num_accepted,
            "acceptance_rate": self.num_accepted / self.num_drafted if self.num_drafted else None,
            "mean_accepted_length": 1 + self.num_accepted / rounds if self.rounds else None,
            "more_candidate_requests": self.more_candidate_requests,
            "bytes_up": t.total("up", "decoding"),
            "bytes_down": t.total("down", "decoding"),
            "bytes_upload": t.total(None, "upload"),
            # the same frames re-sized for a real vocabulary (PROJECTED_VOCAB): ids, distribution rows
            "projected_bytes_decoding": t.projected_total(phase="decoding") if t.projection is not None else None,
            "bytes_by_type": {k: v for k, v in t.to_dict().items() if k.endswith(".bytes")},
            "device_busy_s": self.device_busy_s,
            "device_idle_s": self.device_idle_s,
            "device_idle_fraction": self.device_idle_s / device_s if device_s > 0 else None,
            "block_lengths": [r.k for r in self.round_log],
            "accepted_per_round": [r.num_accepted for r in self.round_log],
            "branch_hits": self.branch_hits,
            "branch_misses": self.branch_misses,
            "branch_hit_rate": self.branch_hits / branch_rounds if branch_rounds else None,
            "tokens_reused": self.tokens_reused,
            "tree_rounds": self.tree_rounds,
            "tree_hits": self.tree_hits,
            "tree_nodes": self.tree_nodes,
            "controller_gammas": self.controller_gammas,
            "session_reopens": self.session_reopens,
            "visual_tokens": self.visual_tokens,
            "visual_tokens_kept": self.visual_tokens_kept,
            "draft_prefill_s": self.draft_prefill_s,
            "pruner_s": self.pruner_s,
            "lossy": self.lossy,
        }


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Device:
    """A device with a draft model; ``run`` answers one question about one image with ``settings.method``."""

    def __init__(
        self,
        draft: VLMAdapter | None,
        transport: Transport | None,
        settings: DeviceSettings,
        pruner: Pruner | None = None,
    ) -> None:
        if settings.method not in ALL_METHODS:
            raise ValueError(f"method must be one of {', '.join(ALL_METHODS)}, got {settings.method!r}")
        self.draft = draft
        self.transport = transport
        self.settings = settings
        self.pruner = pruner
        self._busy = 0.0
        self._idle = 0.0
        self._timing = (0.0, 0.0)  # (pruner_s, vision tower share of the prefill) of the request in progress
        self._counts: torch.Tensor | None = None  # the pruner's merge counts for the request in progress
        self.draft_policy = None  # adaptive drafting: its estimates carry over to this device's next requests
        self.session: EdgeSession | None = None  # the request in progress's session at the edge
        self._streamed: list[int] = []  # target_only: tokens received so far
        self._chunks = 0  # target_only: TokenChunks received so far

    # -- plumbing ------------------------------------------------------------------------------

    def _compute(self, fn, *args):
        """Run draft compute, accounting it as busy time (stretched by the slow-down factor)."""
        t = time.perf_counter()
        out = fn(*args)
        spent = time.perf_counter() - t
        if self.settings.compute_slowdown > 1:
            time.sleep(spent * (self.settings.compute_slowdown - 1))
        self._busy += time.perf_counter() - t
        return out

    def _wait(self, kind: type) -> Any:
        t = time.perf_counter()
        while True:
            msg = self._accept(self.transport.recv(timeout=self.settings.reply_timeout_s), kind)
            if msg is not None:
                self._idle += time.perf_counter() - t
                return msg

    def _accept(self, msg: Any, kind: type) -> Any:
        """``msg`` if it is the awaited reply; None for frames to skip (stale, SessionOpened, a recovered loss)."""
        current = self.session.sid if self.session is not None else None
        if current is not None and getattr(msg, "session_id", "") not in ("", current):
            return None  # a late frame of a session this device already left (closed, or reopened under a new id)
        if isinstance(msg, ErrorReply):
            if msg.code in _RECOVERABLE and self._reopen(kind):
                return None
            raise EdgeError(f"edge refused a frame: {msg.code}: {msg.message}")
        if isinstance(msg, kind):
            if self.session is not None:
                self.session.failed = 0
            return msg
        if not isinstance(msg, SessionOpened):
            raise EdgeError(f"expected {kind.__name__}, got {type(msg).__name__}")
        check_against(msg, self.draft.vocab_size if self.draft else msg.vocab_size)
        draft_eos = self.draft.eos_token_ids if self.draft is not None else frozenset()
        if msg.eos_ids and self.settings.method in SPECULATIVE_METHODS and set(msg.eos_ids) != draft_eos:
            raise EdgeError(f"the target ends generation at EOS ids {sorted(msg.eos_ids)}, the draft at "
                            f"{sorted(draft_eos)}: draft and target must share them")  # fmt: skip
        return None

    def _reopen(self, kind: type) -> bool:
        """Reopen a lost session from the committed tokens and resend what was in flight; False if impossible."""
        sess = self.session
        if sess is None or sess.failed >= MAX_REOPENS:
            return False
        if kind is TokenChunk:
            committed, seq, block = list(self._streamed), self._chunks, None
        elif kind is VerifyResponse and sess.in_flight is not None:
            block, committed = sess.in_flight
            seq = block.seq
        elif kind is VerifyResponse and sess.correcting is not None:  # lost while asking for more candidates
            done, accepted, round_seq = sess.correcting
            committed, seq, block = [*done, *accepted], round_seq + 1, None
        else:
            return False
        if len(committed) >= sess.open_msg.max_new_tokens:
            return False
        sess.reopens += 1
        sess.failed += 1
        time.sleep(min(0.05 * 2 ** (sess.failed - 1), 1.0))  # give a restarting edge replica a moment (idle time)
        sess.open_msg = msgspec.structs.replace(sess.open_msg, session_id=new_session_id(), committed=committed,
                                                seq=seq)  # fmt: skip
        self.transport.send(sess.open_msg)
        if block is not None:
            block = msgspec.structs.replace(block, session_id=sess.sid, last_token=-1, via=-1)
            sess.in_flight = (block, committed)
            self.transport.send(block)
        elif kind is VerifyResponse:
            self.transport.send(MoreCandidates(sess.sid, seq - 1))
        return True

    def _prune(self, inputs: PromptInputs, keep: torch.Tensor | None) -> torch.Tensor | None:
        """``keep`` if given, else the pruner's choice. The vision tower, which the prefill needs anyway, runs first
        and is counted as prefill; the scoring and selection are the pruner's overhead. Both are busy time."""
        self._timing = (0.0, 0.0)
        self._counts = None
        if keep is not None or self.pruner is None:
            return keep  # a caller's keep is used as is (no merging)
        n = inputs.num_visual_tokens
        if self.pruner.count(n) >= n:
            return None
        t = time.perf_counter()
        self._compute(self.draft.visual_features, inputs)  # memoized on inputs: the pruned prefill reuses it
        vision = time.perf_counter() - t
        t = time.perf_counter()
        keep, self._counts = self._compute(choose, self.pruner, self.draft, inputs, self.settings.prune_target)
        self._timing = (time.perf_counter() - t, vision)
        return keep

    def _prefill(self, inputs: PromptInputs, keep: torch.Tensor | None) -> tuple[DecodeState, torch.Tensor, float]:
        t = time.perf_counter()
        state, logits = self._compute(self.draft.prefill, inputs, keep, self._counts)
        return state, logits, time.perf_counter() - t + self._timing[1]

    # -- methods -------------------------------------------------------------------------------

    def run(self, image: Image.Image, question: str, keep: torch.Tensor | None = None) -> RequestResult:
        """Answer ``question`` about ``image``. ``keep``: visual tokens kept for the draft prefill."""
        self._busy = self._idle = 0.0
        if self.transport is not None:
            wire = self.draft.vocab_size if self.draft is not None else None
            self.transport.traffic = TrafficCounter(Projection(self.settings.projected_vocab, wire))
        method = self.settings.method
        if method == "draft_only":
            return self._draft_only(image, question, keep)
        if method == "target_only":
            return self._target_only(image, question)
        return self._speculative(image, question, keep)

    def _draft_only(self, image: Image.Image, question: str, keep: torch.Tensor | None) -> RequestResult:
        s = self.settings
        inputs = self.draft.prepare(image, question)
        start = time.perf_counter()
        keep = self._prune(inputs, keep)
        pruning = time.perf_counter() - start  # part of this request's compute: latency counts it
        gen = torch.Generator().manual_seed(s.seed)
        out = self._compute(generate, self.draft, inputs, s.max_new_tokens, s.temperature, s.top_p, gen, keep,
                            self._counts)  # fmt: skip
        return RequestResult("draft_only", out.token_ids, self.draft.decode(out.token_ids), out.latency_s + pruning,
                             out.ttft_s + pruning, device_busy_s=self._busy, visual_tokens=inputs.num_visual_tokens,
                             visual_tokens_kept=inputs.num_visual_tokens if keep is None else len(keep),
                             pruner_s=self._timing[0])  # fmt: skip

    def _open(self, image: Image.Image, prompt_ids: list[int], method: str, keep: torch.Tensor | None = None) -> None:
        s = self.settings
        kept = [] if keep is None else keep.tolist()
        msg = OpenSession(new_session_id(), method, prompt_ids, png_bytes(image), "png", s.temperature, s.top_p,
                          s.max_new_tokens, s.seed, s.num_candidates, kept)  # fmt: skip
        self.session = EdgeSession(msg)
        self.transport.send(msg)

    def _target_only(self, image: Image.Image, question: str) -> RequestResult:
        start = time.perf_counter()
        prompt_ids = self._prompt_ids(image, question)
        self._open(image, prompt_ids, "target_only")
        tokens = self._streamed = []
        self._chunks = 0
        ttft = 0.0
        while True:
            chunk = self._wait(TokenChunk)
            self._chunks += 1
            if not tokens and chunk.token_ids:
                ttft = time.perf_counter() - start
            tokens.extend(chunk.token_ids)
            if chunk.finished:
                break
        reopens, self.session = self._reopens(), None  # the edge ends a finished stream's session itself
        return RequestResult("target_only", tokens, self._decode(tokens), time.perf_counter() - start, ttft,
                             device_idle_s=self._idle, traffic=self.transport.traffic,
                             session_reopens=reopens)  # fmt: skip

    def _reopens(self) -> int:
        return self.session.reopens if self.session is not None else 0

    def _prompt_ids(self, image: Image.Image, question: str) -> list[int]:
        if self.draft is None:
            raise ValueError("the device needs a draft adapter (its processor builds the prompt)")
        return self.draft.prepare(image, question).input_ids.tolist()

    def _decode(self, tokens: list[int]) -> str:
        return self.draft.decode(tokens) if self.draft is not None else ""

    def _speculative(self, image: Image.Image, question: str, keep: torch.Tensor | None) -> RequestResult:
        s = self.settings
        start = time.perf_counter()
        draft = self.draft
        gen = torch.Generator().manual_seed(s.seed + 1)
        inputs = draft.prepare(image, question)
        if s.prune_target:  # the edge needs the kept tokens in the upload
            keep = self._prune(inputs, keep)
            self._open(image, inputs.input_ids.tolist(), s.method, keep)
        else:  # upload first: pruning and prefill overlap with it
            self._open(image, inputs.input_ids.tolist(), s.method)
            keep = self._prune(inputs, keep)
        state, logits, prefill_s = self._prefill(inputs, keep)
        result = RequestResult(s.method, [], "", 0.0, 0.0, visual_tokens=inputs.num_visual_tokens,
                               visual_tokens_kept=inputs.num_visual_tokens if keep is None else len(keep),
                               draft_prefill_s=prefill_s, pruner_s=self._timing[0],
                               lossy=s.prune_target and keep is not None)  # fmt: skip
        if s.pipelined:  # adaptive drafting / parallel branching (covspec.runtime.pipeline); below: fixed gamma
            from covspec.runtime.pipeline import PipelinedLoop

            return PipelinedLoop(self, state, logits, gen).run(start, result)
        committed: list[int] = []
        last_token = -1
        seq = 0
        while True:
            k = min(s.gamma, s.max_new_tokens - len(committed))
            base = state.seq_len
            ids, q_rows, logits = self._compute(self._draft_block, state, logits, k, gen)
            self._send_block(seq, ids, q_rows, committed, last_token)
            reply = self._wait(VerifyResponse)
            n = reply.num_accepted
            token, done = self._settle_round(seq, reply, ids, q_rows, gen, result, committed, start)
            if done:
                break
            # Crop to the accepted prefix (x_k was never fed) and feed what the draft has not seen.
            fed = len(ids) - 1
            keep_n = min(n, fed)
            draft.rollback(state, base + keep_n)
            logits = self._compute(draft.forward, state, torch.tensor([*ids[keep_n:n], token]))[-1]
            last_token = token
            seq += 1
        return self._close(result, committed, start)

    def _send_block(
        self, seq: int, ids: list[int], q_rows: torch.Tensor, committed: list[int], last_token: int,
        parents: list[int] | None = None, via: int = -1,
    ) -> None:  # fmt: skip
        """VerifyRequest for a drafted block: ids, q(x_i) when sampling, all q rows for vanilla_sd; ``parents``
        make it a token tree (covspec); ``via``: the tree alternative the last correction took (sampling)."""
        s = self.settings
        block = VerifyRequest(
            self.session.sid, seq, ids, committed_len=len(committed), last_token=last_token,
            draft_probs=probs_to_bytes(q_rows[torch.arange(len(ids)), ids]) if s.temperature > 0 else b"",
            draft_dists=probs_to_bytes(q_rows) if s.method == "vanilla_sd" else b"",
            branches=branches_from_parents(parents) if parents else [], via=via,
        )  # fmt: skip
        self.session.in_flight = (block, list(committed))
        self.transport.send(block)

    def _settle_round(
        self, seq: int, reply: VerifyResponse, ids: list[int], q_rows: torch.Tensor,
        gen: torch.Generator, result: RequestResult, committed: list[int], start: float,
        tree: tuple[int, int] | None = None,
    ) -> tuple[int | None, bool]:  # fmt: skip
        """Check the verdict, commit the accepted drafts and the round's last token, record the round.

        ``ids``/``q_rows``: the drafted chain, or for a token tree (greedy) the accepted path, with ``tree`` = (nodes
        sent, block length): the block counts as drafted, the alternatives as ``tree_nodes``.
        Returns the committed bonus/correction (None when the round ended on EOS) and whether the request is done.
        """
        s = self.settings
        sent, drafted = (len(ids), len(ids)) if tree is None else tree
        check_against(reply, self.draft.vocab_size, mode=s.method, sampling=s.temperature > 0,
                      num_drafted=sent, expected_seq=seq)  # fmt: skip
        if reply.num_accepted > len(ids):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"num_accepted = {reply.num_accepted} beyond the path")
        n = reply.num_accepted
        more_before = result.more_candidate_requests
        self.session.in_flight = None
        self.session.correcting = (committed, ids[:n], seq)  # what a reopen needs if the session is lost now
        token = self._finish_round(seq, reply, ids, q_rows, gen, result)
        self.session.correcting = None
        if not result.token_ids and n + (token is not None) > 0:
            result.ttft_s = time.perf_counter() - start
        result.rounds += 1
        result.num_drafted += drafted
        result.tree_nodes += sent - drafted
        result.num_accepted += n
        result.round_log.append(Round(drafted, n, result.more_candidate_requests - more_before))
        hit_eos, done = self._commit(committed, ids[:n], token, result)
        # The edge closes the session after a verdict that ends the answer where it knows the round's last token:
        # an accepted EOS, or its own token (greedy, or a bonus it drew) that is EOS or the last one allowed.
        self.session.closed = done and (hit_eos or s.temperature == 0 or reply.token >= 0)
        return token, done

    def _close(self, result: RequestResult, committed: list[int], start: float) -> RequestResult:
        """Close the session (unless the edge did) and finish the request's result."""
        if not self.session.closed:
            self.transport.send(Close(self.session.sid))
        result.closed_by_edge = self.session.closed
        result.session_reopens = self._reopens()
        self.session = None
        result.token_ids = committed[: self.settings.max_new_tokens]
        result.text = self.draft.decode(result.token_ids)
        result.latency_s = time.perf_counter() - start
        result.device_busy_s, result.device_idle_s = self._busy, self._idle
        result.traffic = self.transport.traffic
        return result

    def _draft_block(
        self, state, logits: torch.Tensor, k: int, gen: torch.Generator
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Draft up to k tokens (stopping after EOS). Returns ids, q rows [len, V], the last logits."""
        s = self.settings
        ids: list[int] = []
        rows: list[torch.Tensor] = []
        for i in range(k):
            q = probs_from_logits(logits.float(), s.temperature, s.top_p)  # [V]
            x = int(torch.argmax(logits)) if s.temperature == 0 else int(sample(q, gen))
            ids.append(x)
            rows.append(q)
            if x in self.draft.eos_token_ids or i == k - 1:
                break
            logits = self.draft.forward(state, torch.tensor([x]))[-1]
        return ids, torch.stack(rows), logits

    def _settle_alt(
        self, seq: int, verdict: AltVerdict, ids: list[int], q_rows: torch.Tensor, gen: torch.Generator,
        result: RequestResult, committed: list[int],
    ) -> tuple[int | None, bool]:  # fmt: skip
        """Sampling trees: the round's correction was the root of the alternative ``verdict`` answers (committed
        already); commit its accepted continuation (``ids``/``q_rows``: the continuation as drafted) and the token
        after it, the bonus or a correction from its candidates. Returns what ``_settle_round`` returns."""
        m = verdict.num_accepted
        if m > len(ids):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"alts: num_accepted = {m} beyond the {len(ids)} drafted")
        reply = VerifyResponse(self.session.sid, seq, m, verdict.token, verdict.candidate_ids, verdict.candidate_probs)
        more_before = result.more_candidate_requests
        self.session.correcting = (list(committed), ids[:m], seq)
        token = self._finish_round(seq, reply, ids, q_rows, gen, result, via=verdict.node)
        self.session.correcting = None
        drafted, n, more = result.round_log[-1]
        result.round_log[-1] = Round(drafted, n + 1 + m, more + result.more_candidate_requests - more_before)
        result.num_accepted += 1 + m  # the root, drafted in the tree, and its continuation
        _, done = self._commit(committed, ids[:m], token, result)
        self.session.closed = False  # the edge learns that the alternative was taken only from a next frame
        return token, done

    def _commit(
        self, committed: list[int], accepted: list[int], token: int | None, result: RequestResult
    ) -> tuple[bool, bool]:
        """Append the accepted drafts and the round's last token to ``committed`` (an EOS ends the answer and is not
        part of it); returns (an accepted draft was EOS, the request is done)."""
        eos = self.draft.eos_token_ids
        hit_eos = bool(accepted) and accepted[-1] in eos
        committed.extend(accepted[:-1] if hit_eos else accepted)
        done = hit_eos or token is None or token in eos
        if not done:
            committed.append(token)
        result.token_ids = committed
        return hit_eos, done or len(committed) >= self.settings.max_new_tokens

    def _finish_round(
        self, seq: int, reply: VerifyResponse, ids: list[int], q_rows: torch.Tensor,
        gen: torch.Generator, result: RequestResult, via: int = -1,
    ) -> int | None:  # fmt: skip
        """The token committed after the accepted drafts, or None when the round ended on EOS; ``via``: the tree
        alternative whose correction this is (sampling trees)."""
        s = self.settings
        n, sid = reply.num_accepted, self.session.sid
        if n > 0 and ids[n - 1] in self.draft.eos_token_ids:
            return None
        if reply.token >= 0:
            return reply.token
        greedy = s.temperature == 0
        if reply.target_dists:
            p = torch.from_numpy(np.array(bytes_to_probs(reply.target_dists, rows=None)))
            p = p.view(-1, self.draft.vocab_size)
            row = p[n] if p.shape[0] > 1 else p[0]  # vanilla ships k+1 rows, dssd the rejected one
            if greedy:
                return int(torch.argmax(row))
            if n == len(ids):  # vanilla, all accepted: the bonus is a draw from p_{k+1}
                return int(sample(row, gen))
            return self._compute(correct_from_residual, row, q_rows[n], gen)
        # covspec sampling: accept candidate y with probability max(0, 1 - q(y)/p(y)); ask for more if all refused.
        while True:
            cand_p = torch.from_numpy(np.array(bytes_to_probs(reply.candidate_probs)))
            token = correct_from_candidates(torch.tensor(reply.candidate_ids), cand_p, q_rows[n], gen)
            if token is not None:
                return int(token)
            result.more_candidate_requests += 1
            # A session reopened meanwhile holds the alternative as committed: its candidates are its own.
            self.transport.send(MoreCandidates(self.session.sid, seq, via if self.session.sid == sid else -1))
            reply = self._wait(VerifyResponse)
            if reply.target_dists:  # the edge gave up on candidates and sent the full row
                row = torch.from_numpy(np.array(bytes_to_probs(reply.target_dists)))
                return self._compute(correct_from_residual, row, q_rows[n], gen)


def describe_error(err: Exception) -> str:
    if isinstance(err, ProtocolError):
        return f"{err.code}: {err.message}"
    return str(err)
