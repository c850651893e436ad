"""The pipelined speculative loop: adaptive block lengths and parallel branching (drafting while verifying).

``Device._speculative`` hands a request over here, once the session is open and the draft prefilled, when
``drafting.policy`` is ``adaptive`` or ``branching.budget > 0``; its own fixed-γ loop stays the baseline. One round:

1. Block: the drafts of the branch that matched last round (if any) come first, then the device drafts until the
   policy's length γ, the confidence stop (``covspec.decoding.drafting``), EOS or ``max_new_tokens``.
2. Send it. With branching the device keeps drafting, one forward at a time, and polls the link between forwards:
   first the main branch (feed x_k, guess the bonus, draft the next block after the guess), then the alternative
   branches (``covspec.decoding.branching``). With nothing left worth drafting it waits (idle time).
3. Verdict: the accepted drafts and one more token are committed exactly as in the fixed loop
   (``Device._finish_round`` does the correction). The policy gets its measurements. The matching branch's cache
   becomes the live path and its drafts open the next block; on a miss the cache is cropped to the accepted prefix
   and the rest is fed in one forward, as in the fixed loop.

The draft cache during a round (positions relative to ``base``, the end of the committed prefix): the live path
is the main path (block, then the main branch) until an alternative is drafted. Then the cache is cut at ``split``
(the smallest root among the alternatives), the main path's entries from there are kept as one suffix, and each
alternative at root j is drafted on prefix + main[split:j] + its own tokens, then stored as its suffix from j.
Only suffixes are ever copied (``covspec.models.kvcache``), never the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from covspec.decoding.branching import Branch, DraftToken, match, plan_alternatives
from covspec.decoding.drafting import DraftPolicy
from covspec.decoding.sampling import probs_from_logits, sample
from covspec.decoding.tree import chain, path_to
from covspec.models.kvcache import KVSuffix, graft, take_suffix
from covspec.protocol import ErrorCode, ProtocolError, VerifyResponse
from covspec.runtime.device import Device, DeviceSettings, RequestResult

if TYPE_CHECKING:
    from covspec.models.base import DecodeState


def draft_policy(settings: DeviceSettings) -> DraftPolicy:
    """The drafting policy of one request's settings."""
    return DraftPolicy(settings.policy, settings.gamma, settings.gamma_min, settings.gamma_max, settings.threshold,
                       branching=settings.branch_budget > 0, stop=settings.stop)  # fmt: skip


@dataclass
class _Round:
    """One block in flight and the branches drafted while it is verified."""

    base: int  # seq_len of the committed prefix
    block: list[DraftToken]
    block_fed: int  # block tokens in the cache (k - 1 when x_k was not fed yet)
    main: Branch  # root k; started once its guess of the bonus is fed
    alts: list[Branch] = field(default_factory=list)
    split: int | None = None  # where the cache was cut to draft alternatives
    main_tail: KVSuffix | None = None  # the main path's cache entries from ``split`` on
    live_alt: Branch | None = None  # the alternative whose tokens are in the cache now
    tree: list[Branch] = field(default_factory=list)  # alternatives sent with the block (token-tree verification)

    def wire(self) -> tuple[list[int], list[int] | None, list[DraftToken]]:
        """The drafted tokens as sent: ids, parents (None for a chain) and the tokens, block first, then each
        tree alternative's bet and drafts (``covspec.decoding.tree``)."""
        tokens = list(self.block)
        if not self.tree:
            return [t.id for t in tokens], None, tokens
        parents = chain(len(self.block))
        for alt in self.tree:
            alt.node = len(tokens)
            q = torch.zeros_like(self.block[alt.root].q)
            q[alt.token] = 1.0  # greedy: q is one-hot on what was drafted
            head = DraftToken(alt.token, q, 0.0, -1, 0.0)
            tokens += [head, *alt.drafts]
            parents += [alt.root - 1, *range(alt.node, alt.node + len(alt.drafts))]
        return [t.id for t in tokens], parents, tokens


def _fed(drafts: list[DraftToken], eos: frozenset[int]) -> int:
    """Drafts of a branch that are in the cache: all but a final EOS."""
    return len(drafts) - (1 if drafts and drafts[-1].id in eos else 0)


class PipelinedLoop:
    """One request through the pipelined loop; ``run`` returns its ``RequestResult``."""

    def __init__(self, device: Device, state: DecodeState, logits: torch.Tensor, gen: torch.Generator) -> None:
        self.device = device
        self.draft = device.draft
        self.s = device.settings
        self.eos = self.draft.eos_token_ids
        if device.draft_policy is None:  # a device keeps its estimates (link, draft speed, acceptance) across requests
            device.draft_policy = draft_policy(self.s)
        self.policy: DraftPolicy = device.draft_policy
        self.branching = self.s.branch_budget > 0
        self.tree_width = self.s.tree
        self.state = state  # the draft's cache, prefilled
        self.logits = logits  # [V] after the last fed token of the live path
        self.gen = gen  # the device's randomness: drafts and corrections, as in the fixed loop
        self.hits = self.misses = self.reused = 0
        self._pick_s = 0.0  # time of the last token choice, counted into the next draft step
        self._tree_block: list[DraftToken] | None = None  # the block being drafted (see _ends)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, start: float, result: RequestResult) -> RequestResult:
        """Decode the device's session (opened, draft prefilled) into ``result``; ``start``: the request's start."""
        d, s = self.device, self.s
        committed: list[int] = []
        live: list[DraftToken] = []  # drafted during the last wait by the branch that matched
        last_token, seq, via = -1, 0, -1
        replied = accounted = 0.0  # when the last verdict arrived; device busy + idle time then
        while True:
            if seq > 0:  # per-round time that is neither drafting nor waiting: bookkeeping, frames, threads
                self.policy.observe_overhead(time.perf_counter() - replied - (d._busy + d._idle - accounted))
            gamma = self.policy.start_round()
            if self.policy.adaptive:
                result.controller_gammas.append(gamma)
            rnd = self._block(live, min(gamma, s.max_new_tokens - len(committed)))
            if self.tree_width:
                self._grow_tree(rnd, len(committed))
                result.tree_rounds += bool(rnd.tree)
            ids, parents, drafts = rnd.wire()
            q_rows = torch.stack([t.q for t in drafts])  # [k, V]
            d._send_block(seq, ids, q_rows, committed, last_token, parents, via)
            sent = time.perf_counter()
            reply = self._overlap(rnd, len(committed)) if self.branching else d._wait(VerifyResponse)
            replied, accounted = time.perf_counter(), d._busy + d._idle
            wait = replied - sent
            n = reply.num_accepted
            via = -1
            if parents is None:
                alt = None
                token, done = d._settle_round(seq, reply, ids, q_rows, self.gen, result, committed, start)
            elif self.s.temperature == 0:  # the path's tokens are what is committed (no q row for the correction)
                alt, path = self._path(rnd, reply, parents)
                token, done = d._settle_round(seq, reply, [ids[i] for i in path], q_rows[path], self.gen, result,
                                              committed, start, tree=(len(ids), len(rnd.block)))  # fmt: skip
            else:
                alt, n, via, token, done = self._settle_sampling_tree(seq, rnd, reply, parents, q_rows, result,
                                                                      committed, start)  # fmt: skip
            unsure_last = self.policy.adaptive and alt is None and rnd.block[-1].conf < self.policy.stop_threshold
            self.policy.observe_round(len(rnd.block) if alt is None else alt.root + 1 + len(alt.drafts), n, wait,
                                      unsure_last)  # fmt: skip
            result.tree_hits += alt is not None
            if done:
                break
            live = self._resolve(rnd, n, token, alt)
            last_token = token
            seq += 1
        result.branch_hits, result.branch_misses, result.tokens_reused = self.hits, self.misses, self.reused
        return d._close(result, committed, start)

    # -- drafting ------------------------------------------------------------------------------

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` to the draft; the next-token logits [V]. Single steps time the controller's c."""
        t = time.perf_counter()
        logits = self.device._compute(self.draft.forward, self.state, torch.tensor(ids))[-1]
        if len(ids) == 1:
            self.policy.observe_step(time.perf_counter() - t + self._pick_s)
        self._pick_s = 0.0
        return logits

    def _draft_token(self, logits: torch.Tensor) -> DraftToken:
        """Draw one token from ``logits`` [V] (device compute, timed with the next forward as one draft step)."""
        t = time.perf_counter()
        tok = self.device._compute(self._pick, logits)
        self._pick_s = time.perf_counter() - t
        return tok

    def _pick(self, logits: torch.Tensor) -> DraftToken:
        """One token from ``logits`` [V] (argmax when greedy) with its q row, confidence and second choice."""
        s = self.s
        q = probs_from_logits(logits.float(), s.temperature, s.top_p)  # [V]
        dist = q if s.temperature > 0 else torch.softmax(logits.float(), -1)  # confidence: see drafting.py
        top_p, top_i = torch.topk(dist, 3)
        x = top_i[:1] if s.temperature == 0 else sample(q, self.gen)[None]
        *top, x_id = torch.cat([top_i, x]).tolist()  # one host sync for the ids
        probs = top_p.tolist()
        (second, p2), (third, p3) = [(i, p) for i, p in zip(top, probs, strict=True) if i != x_id][:2]  # best first
        return DraftToken(x_id, q, probs[0], second, p2, third, p3)

    def _ends(self, drafts: list[DraftToken], gamma: int, stop: bool = True) -> bool:
        """Whether a block (or a branch drafting the next block) ends after its last token; ``stop``: the
        confidence stop applies. A token tree's block and alternatives do not stop at unsure tokens: the tree
        branches there instead (``_grow_tree``)."""
        tok = drafts[-1]
        if tok.id in self.eos or len(drafts) >= gamma:
            return True
        tree_block = self.tree_width > 0 and drafts is self._tree_block
        return stop and not tree_block and self.policy.stop_after(len(drafts) - 1, tok.conf)

    def _block(self, live: list[DraftToken], gamma: int) -> _Round:
        """The next block of at most ``gamma`` tokens: ``live`` drafts first, then new ones; what ``live`` holds
        beyond the block seeds the main branch."""
        live_fed = _fed(live, self.eos)
        base = self.state.seq_len - live_fed
        block: list[DraftToken] = []
        self._tree_block = block  # _ends: the block of a tree may branch at unsure tokens instead of stopping
        for tok in live:
            block.append(tok)
            if self._ends(block, gamma):
                break
        rest = live[len(block) :]
        fed = min(len(block), live_fed)
        if not block or not self._ends(block, gamma):
            while True:  # live is used up and fully fed: the frontier follows its last token
                block.append(self._draft_token(self.logits))
                if self._ends(block, gamma):
                    break
                self.logits = self._feed([block[-1].id])
                fed += 1
        main = Branch(root=len(block), token=-1)
        if rest:  # the old branch went on past this block: its next token is a guess of this block's bonus
            main.token, main.drafts, main.started, main.logits = rest[0].id, rest[1:], True, self.logits
            main.done = rest[0].id in self.eos
        return _Round(base=base, block=block, block_fed=fed, main=main)

    # -- while the block is verified -----------------------------------------------------------

    def _overlap(self, rnd: _Round, committed_len: int) -> VerifyResponse:
        """Draft branches one forward at a time until the verdict arrives; then wait (idle) for it."""
        for _ in self._branch_work(rnd, committed_len):
            reply = self._poll()
            if reply is not None:
                return reply
        return self.device._wait(VerifyResponse)

    def _poll(self) -> VerifyResponse | None:
        """The verdict if it has arrived, else None (never blocks)."""
        while True:
            try:
                msg = self.device.transport.recv(timeout=0)
            except TimeoutError:
                return None
            reply = self.device._accept(msg, VerifyResponse)
            if reply is not None:
                return reply

    def _branch_work(self, rnd: _Round, committed_len: int) -> Iterator[None]:
        """The drafting done during a wait, most valuable first; yields after every forward."""
        max_new = self.s.max_new_tokens
        depth = self.policy.block_length()

        def room(root: int) -> int:  # how long the block after a bet at ``root`` may be
            return max_new - (committed_len + root + 1)

        k, main = len(rnd.block), rnd.main
        if rnd.block[-1].id not in self.eos and room(k) > 0:
            if not main.started:
                if rnd.block_fed < k:
                    self.logits = self._feed([rnd.block[-1].id])
                    rnd.block_fed = k
                    yield
                guess = int(torch.argmax(self.logits))
                if guess not in self.eos:
                    main.token, main.logits, main.started = guess, self._feed([guess]), True
                    yield
            if main.started and main.token not in self.eos:
                yield from self._extend(main, min(depth, room(k)))
        # A tree's alternatives are verified in this round already: the wait's bets are the next ones.
        count, sent = self.s.branch_budget - 1, {(a.root, a.token) for a in rnd.tree}
        planned = plan_alternatives(rnd.block, count + len(sent), self.eos, max_root=max_new - committed_len - 1)
        rnd.alts = [a for a in planned if (a.root, a.token) not in sent][:count]  # branching on: budget >= 1
        if not rnd.alts:
            return
        rnd.split = min(a.root for a in rnd.alts)
        rnd.main_tail = take_suffix(self.state, rnd.base + rnd.split)
        self.draft.rollback(self.state, rnd.base + rnd.split)
        for alt in rnd.alts:
            rnd.live_alt = alt
            yield from self._draft_alternative(rnd.base, rnd.split, rnd.main_tail, alt, min(depth, room(alt.root)))
            rnd.live_alt = None

    def _draft_alternative(self, base: int, split: int, tail: KVSuffix, alt: Branch, cap: int,
                           stop: bool = True) -> Iterator[None]:  # fmt: skip
        """Draft ``alt`` on prefix + main[split:alt.root] (from ``tail``, the main path's entries from ``split``):
        its bet, then up to ``cap`` drafts; keep its cache suffix from its root as ``alt.kv`` and crop the cache back
        to ``split``. Yields after every forward."""
        graft(self.state, tail, alt.root - split)
        alt.logits, alt.started = self._feed([alt.token]), True
        yield
        yield from self._extend(alt, cap, stop)
        alt.kv = take_suffix(self.state, base + alt.root)
        self.draft.rollback(self.state, base + split)

    def _extend(self, branch: Branch, cap: int, stop: bool = True) -> Iterator[None]:
        """Draft the next block after ``branch``'s bet, up to ``cap`` tokens, feeding each (not EOS)."""
        while not branch.done and len(branch.drafts) < cap:
            tok = self._draft_token(branch.logits)
            branch.drafts.append(tok)
            branch.done = self._ends(branch.drafts, cap, stop)
            if tok.id not in self.eos:
                branch.logits = self._feed([tok.id])
                yield
        branch.done = True

    def _grow_tree(self, rnd: _Round, committed_len: int) -> None:
        """Draft the tree's alternatives before the block is sent: at the block's least confident positions j, the
        draft's second choice and a continuation after it (``plan_alternatives``, as branches during a wait). Each
        is drafted on prefix + block[:j] + its own tokens and kept as its cache suffix from j; the live cache is
        the block's again afterwards."""
        max_new = self.s.max_new_tokens
        depth = len(rnd.block)
        caps = {}  # per alternative: its continuation's length cap (the tree is as deep as the block)
        alts = []
        for alt in plan_alternatives(rnd.block, self.tree_width, self.eos, max_root=max_new - committed_len - 1):
            caps[alt.root] = min(depth - alt.root - 1, max_new - committed_len - alt.root - 1)
            if self.s.tree_continuation:  # under sampling, continuations are rarely accepted far (docs/drafting.md)
                caps[alt.root] = min(caps[alt.root], self.s.tree_continuation)
            if self.policy.alternative_pays(alt.score, 1 + caps[alt.root]):
                alts.append(alt)
        if not alts:
            return
        split = min(a.root for a in alts)
        tail = take_suffix(self.state, rnd.base + split)
        self.draft.rollback(self.state, rnd.base + split)
        for alt in alts:
            for _ in self._draft_alternative(rnd.base, split, tail, alt, caps[alt.root], stop=False):
                pass
        graft(self.state, tail)
        rnd.tree = alts

    # -- the verdict ---------------------------------------------------------------------------

    def _path(self, rnd: _Round, reply: VerifyResponse, parents: list[int] | None) -> tuple[Branch | None, list[int]]:
        """For a token tree, the accepted path's node indices and the alternative it went through (None: along the
        block); for a chain, (None, [])."""
        n = reply.num_accepted
        if parents is None:
            return None, []
        if n and not 0 <= reply.leaf < len(parents):
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"leaf = {reply.leaf} for a tree of {len(parents)}")
        path = path_to(parents, reply.leaf if n else -1)
        if len(path) != n:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"leaf = {reply.leaf} is at depth {len(path)}, not {n}")
        last = path[-1] if path else -1
        return next((a for a in rnd.tree if a.node <= last <= a.node + len(a.drafts)), None), path

    def _settle_sampling_tree(
        self, seq: int, rnd: _Round, reply: VerifyResponse, parents: list[int], q_rows: torch.Tensor,
        result: RequestResult, committed: list[int], start: float,
    ) -> tuple[Branch | None, int, int, int | None, bool]:  # fmt: skip
        """A token tree under sampling: settle the main chain as a chain (the correction drawn from the residual, as
        always); if that correction is an alternative's root, the edge's verdict on the alternative's continuation
        (``reply.alts``) commits it and the token after it. Returns the alternative taken (None: none), the drafts
        committed before the round's last token (along the block, or to the alternative's root and through its
        continuation), the next request's ``via``, the round's last committed token and whether the request is
        done."""
        d, k = self.device, len(rnd.block)
        if reply.num_accepted and reply.leaf != reply.num_accepted - 1:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"leaf = {reply.leaf} is not main-chain node "
                                f"{reply.num_accepted - 1}")  # fmt: skip
        sid = d.session.sid
        main_ids = [t.id for t in rnd.block]
        token, done = d._settle_round(seq, reply, main_ids, q_rows[:k], self.gen, result, committed, start,
                                      tree=(len(parents), k))  # fmt: skip
        n = reply.num_accepted
        alt = next((a for a in rnd.tree if a.root == n and a.token == token), None)
        if done or alt is None or n == k or d.session.sid != sid:  # a reopened session has no alternatives
            return None, n, -1, token, done
        verdict = next((v for v in reply.alts if v.node == alt.node), None)
        if verdict is None:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"no verdict in alts for the alternative at node {alt.node}")
        drafts = alt.drafts
        q = torch.stack([t.q for t in drafts]) if drafts else q_rows[:0]
        token, done = d._settle_alt(seq, verdict, [t.id for t in drafts], q, self.gen, result, committed)
        # The edge settles the alternative when the next block names it; a session reopened meanwhile holds it.
        return alt, alt.root + 1 + verdict.num_accepted, alt.node if d.session.sid == sid else -1, token, done

    def _resolve(self, rnd: _Round, n: int, token: int, alt: Branch | None = None) -> list[DraftToken]:
        """Make the cache hold the committed prefix (+ the matching branch); returns the branch's drafts."""
        base, main = rnd.base, rnd.main
        if alt is not None:  # the accepted path left the block at alt.root: its cache suffix holds the rest
            if self.branching:
                self.misses += 1
            if rnd.split is not None and alt.root > rnd.split:  # the wait's alternatives cut the block at split
                self.draft.rollback(self.state, base + rnd.split)
                graft(self.state, rnd.main_tail, alt.root - rnd.split)
            else:
                self.draft.rollback(self.state, base + alt.root)
            graft(self.state, alt.kv, n - alt.root)
            self.logits = self._feed([token])
            return []
        hit = match([main, *rnd.alts], n, token)
        if self.branching:
            self.hits += hit is not None
            self.misses += hit is None
            if rnd.alts and not (main.started and n == main.root and token == main.token):
                self.policy.observe_alternatives(hit is not None)
        if hit is main:
            if rnd.split is not None:
                self.draft.rollback(self.state, base + rnd.split)
                graft(self.state, rnd.main_tail)
        elif hit is not None:
            if rnd.live_alt is not hit:
                self.draft.rollback(self.state, base + rnd.split)
                graft(self.state, rnd.main_tail, hit.root - rnd.split)
                graft(self.state, hit.kv)
        else:
            keep = min(n, rnd.block_fed)
            if rnd.split is not None and keep > rnd.split:
                self.draft.rollback(self.state, base + rnd.split)
                graft(self.state, rnd.main_tail, keep - rnd.split)
            else:
                self.draft.rollback(self.state, base + keep)
            self.logits = self._feed([t.id for t in rnd.block[keep:n]] + [token])
            return []
        self.logits = hit.logits
        self.reused += len(hit.drafts)
        return hit.drafts
