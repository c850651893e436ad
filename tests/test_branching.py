"""Parallel branching: bet bookkeeping, the pipelined loop against a scripted edge, greedy equality end to end.

The scripted tests use a fake draft whose KV cache is a real ``DynamicCache`` holding the token ids themselves, and
whose logits are computed from what the cache holds: any fork, crop or graft mistake changes the draft's tokens.
A scripted greedy edge verifies with a known target rule and answers after a fixed number of non-blocking polls,
so the amount of drafting done during each wait is deterministic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from covspec.data.shapes import load_split
from covspec.decoding.autoregressive import generate
from covspec.decoding.branching import Branch, DraftToken, match, plan_alternatives, reach_probabilities
from covspec.decoding.tree import parents_from_branches
from covspec.models.base import DecodeState, PromptInputs
from covspec.models.kvcache import graft, take_suffix
from covspec.models.tiny import TINY_SPECS, tiny_llava
from covspec.protocol import Link, LinkProfile, TrafficCounter, VerifyRequest, VerifyResponse
from covspec.runtime.device import Device, DeviceSettings
from covspec.runtime.edge import Edge
from covspec.runtime.engine import colocated_profile
from covspec.runtime.transport import InProcessTransport

V, EOS = 8, 7
PROMPT = [1, 2, 3]


def tok(i: int, conf: float = 0.9, second: int = 0, second_p: float = 0.05) -> DraftToken:
    return DraftToken(i, torch.zeros(V), conf, second, second_p)


# -- pure bookkeeping ---------------------------------------------------------------------------------


def test_alternatives_rank_unsure_reachable_positions_and_skip_eos():
    block = [tok(1, 0.9, 2, 0.05), tok(3, 0.4, 4, 0.5), tok(5, 0.5, EOS, 0.45), tok(6, 0.3, 2, 0.6)]
    reach = reach_probabilities(block)
    assert reach[0] == 1.0 and math.isclose(reach[4], 0.9 * 0.4 * 0.5 * 0.3)
    alts = plan_alternatives(block, 3, EOS)
    assert [(b.root, b.token) for b in alts] == [(1, 4), (3, 2), (0, 2)]  # position 2 bets on EOS: skipped
    assert math.isclose(alts[0].score, 0.9 * 0.5) and math.isclose(alts[1].score, 0.9 * 0.4 * 0.5 * 0.6)
    assert plan_alternatives(block, 0, EOS) == []
    assert [b.root for b in plan_alternatives(block, 3, EOS, max_root=1)] == [0]


def test_third_choices_are_bets_ranked_with_the_second_choices():
    torn = DraftToken(3, torch.zeros(V), 0.35, 4, 0.33, 6, 0.3)  # torn three ways
    block = [tok(1, 0.9, 2, 0.05), torn, DraftToken(5, torch.zeros(V), 0.9, 2, 0.06, EOS, 0.03)]
    alts = plan_alternatives(block, 5, EOS)
    # (1, 4) 0.9*0.33, (1, 6) 0.9*0.3, then (0, 2) 0.05 and (2, 2) 0.9*0.35*0.06; a third choice of EOS is skipped
    assert [(b.root, b.token) for b in alts] == [(1, 4), (1, 6), (0, 2), (2, 2)]
    assert math.isclose(alts[1].score, 0.9 * 0.3)
    assert [(b.root, b.token) for b in plan_alternatives(block, 2, EOS)] == [(1, 4), (1, 6)]


def test_match_needs_the_same_bet_and_a_started_branch():
    main = Branch(root=4, token=5, started=True)
    alt = Branch(root=1, token=6, started=True)
    idle = Branch(root=2, token=3)  # never fed: cannot be kept
    branches = [main, alt, idle]
    assert match(branches, 4, 5) is main  # all accepted, bonus as guessed
    assert match(branches, 4, 6) is None  # all accepted, another bonus
    assert match(branches, 1, 6) is alt  # partial acceptance, correction as guessed
    assert match(branches, 1, 5) is None
    assert match(branches, 2, 3) is None


def test_kv_suffix_round_trip_copies_only_the_suffix():
    state = DecodeState(DynamicCache(), 0, 0)
    adapter = FakeDraft(lambda h: (0, 1, 0.9))
    adapter.forward(state, torch.tensor([1, 2, 3, 4, 5]))
    suffix = take_suffix(state, 3)
    assert len(suffix) == 2 and suffix.keys[0].flatten().tolist() == [4, 5]
    adapter.rollback(state, 3)
    adapter.forward(state, torch.tensor([6]))
    adapter.rollback(state, 3)
    graft(state, suffix, 1)
    assert state.seq_len == 4 and adapter.history(state) == [1, 2, 3, 4]
    graft(state, suffix)
    assert adapter.history(state) == [1, 2, 3, 4, 4, 5]
    with pytest.raises(ValueError):
        take_suffix(state, 7)


# -- the pipelined loop against a scripted edge ------------------------------------------------------

Rule = Callable[[list[int]], tuple]  # history -> (top, second, confidence) or (top, second, confidence, third)


class FakeDraft:
    """A draft 'VLM' whose cache stores token ids and whose logits depend only on what the cache holds.

    ``rule(history)`` gives (top, second, confidence): q(top) = confidence, q(second) = (1 - confidence) / 2, the
    rest shared evenly (so a confidence above 1/3 keeps ``top`` on top).
    """

    vocab_size = V
    eos_token_id = EOS
    eos_token_ids = frozenset([EOS])

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.forwards = 0

    def prepare(self, image, question) -> PromptInputs:
        ids = torch.tensor(PROMPT)
        return PromptInputs(ids, torch.zeros(1, 3, 4, 4), torch.tensor([True, False, False]))

    def prefill(self, inputs, keep=None, counts=None):
        state = DecodeState(DynamicCache(), 0)
        return state, self.forward(state, inputs.input_ids)[-1]

    @staticmethod
    def history(state: DecodeState) -> list[int]:
        return [int(x) for x in state.cache.layers[0].keys.flatten().tolist()]

    def forward(self, state: DecodeState, token_ids: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        k = len(token_ids)
        kv = token_ids.float().view(1, 1, k, 1)
        state.cache.update(kv, kv.clone(), 0)
        state.seq_len += k
        hist = self.history(state)
        assert len(hist) == state.cache_len
        rows = []
        for i in range(k):
            top, second, conf, *third = self.rule(hist[: len(hist) - k + i + 1])
            p = torch.full((V,), (1 - conf - (1 - conf) / 2) / (V - 2))
            p[top], p[second] = conf, (1 - conf) / 2
            if third:  # a rule may name a third choice: most of the rest goes to it
                p[:] = 0.05 * (1 - conf) / (V - 3)
                p[top], p[second], p[third[0]] = conf, 0.5 * (1 - conf), 0.45 * (1 - conf)
            rows.append(p.log())
        return torch.stack(rows)

    def rollback(self, state: DecodeState, seq_len: int) -> None:
        drop = state.seq_len - seq_len
        assert drop >= 0
        if drop:
            state.cache.crop(-drop)
            state.seq_len = seq_len

    def decode(self, ids):
        return " ".join(map(str, ids))


class ScriptedEdge:
    """A greedy edge in the test's thread: target rule ``target``; a reply shows up after ``polls`` polls."""

    def __init__(self, target: Callable[[list[int]], int], polls: int) -> None:
        self.traffic = TrafficCounter()
        self.target = target
        self.polls = polls
        self.history = list(PROMPT)
        self.inbox: deque[tuple[int, VerifyResponse]] = deque()
        self.blocks: list[list[int]] = []
        self.trees: list[list[int]] = []  # parents of each block ([] for a chain)

    def send(self, msg) -> None:
        if not isinstance(msg, VerifyRequest):
            return
        if msg.last_token >= 0:
            self.history.append(msg.last_token)
        ids = list(msg.draft_ids)
        self.blocks.append(ids)
        parents = parents_from_branches(len(ids), msg.branches)
        self.trees.append(parents if msg.branches else [])
        children = {(p, t): i for i, (t, p) in enumerate(zip(ids, parents, strict=True))}
        path: list[int] = []
        while (child := children.get((path[-1] if path else -1, self.target(self.history + [ids[i] for i in path])))) \
                is not None:  # fmt: skip
            path.append(child)
            if ids[child] == EOS:
                break
        accepted = [ids[i] for i in path]
        token = self.target(self.history + accepted)
        self.history += accepted
        leaf = path[-1] if msg.branches and path else -1
        self.inbox.append([self.polls, VerifyResponse(msg.session_id, msg.seq, len(path), token, leaf=leaf)])

    def recv(self, timeout=None):
        if not self.inbox:
            raise TimeoutError("nothing sent")
        if timeout == 0 and self.inbox[0][0] > 0:
            self.inbox[0][0] -= 1
            raise TimeoutError("not yet")
        return self.inbox.popleft()[1]

    def close(self) -> None:
        pass


def target_rule(h: list[int]) -> int:
    """The target's greedy next token: a deterministic walk over 0..6, EOS once 20 tokens are generated."""
    if len(h) - len(PROMPT) >= 20:
        return EOS
    return (h[-1] * 3 + len(h)) % 7


def greedy_reference(max_new: int) -> list[int]:
    h = list(PROMPT)
    while len(h) - len(PROMPT) < max_new and (t := target_rule(h)) != EOS:
        h.append(t)
    return h[len(PROMPT) :]


def run_scripted(rule: Rule, polls: int, max_new: int = 24, **settings):
    draft = FakeDraft(rule)
    edge = ScriptedEdge(target_rule, polls)
    s = DeviceSettings(method="covspec", max_new_tokens=max_new, **settings)
    result = Device(draft, edge, s).run(Image.new("RGB", (4, 4)), "q")
    assert result.token_ids == greedy_reference(max_new)
    return result, edge


def agreeing(h):  # the draft is the target, sure of itself; its second choice is never the target's
    return target_rule(h), (target_rule(h) + 1) % 7, 0.9


def test_main_branch_hits_when_the_draft_always_agrees():
    r, edge = run_scripted(agreeing, polls=100, gamma=4, branch_budget=1)
    # Every block is accepted with its bonus as guessed: each later block was drafted during the previous wait.
    assert r.branch_misses == 0 and r.branch_hits == r.rounds - 1 > 0
    assert r.tokens_reused == sum(len(b) for b in edge.blocks[1:])  # every later block came from the main branch
    assert r.num_accepted == r.num_drafted
    assert [len(b) for b in edge.blocks] == [4] * (r.rounds - 1) + [len(edge.blocks[-1])]


def test_short_wait_reuses_what_was_drafted_and_drafts_the_rest():
    r, edge = run_scripted(agreeing, polls=2, gamma=4, branch_budget=1)  # feed x_k, feed the guess, 1 draft
    assert r.branch_hits == r.rounds - 1 and r.tokens_reused == r.rounds - 1
    assert all(len(b) == 4 for b in edge.blocks[:-1])


def test_all_accepted_but_another_bonus_is_a_miss():
    def guess_wrong_bonus(h):  # agrees inside each 4-token block, never on the token after it
        top = target_rule(h)
        return ((top + 1) % 7, top, 0.6) if (len(h) - len(PROMPT)) % 5 == 4 else (top, (top + 1) % 7, 0.9)

    r, _ = run_scripted(guess_wrong_bonus, polls=100, gamma=4, branch_budget=1)
    first_four = r.round_log[0]
    assert first_four.k == 4 and first_four.num_accepted == 4
    assert r.branch_hits == 0 and r.branch_misses == r.rounds - 1


def test_partial_acceptance_hits_the_alternative_at_the_rejection():
    def second_is_right(h):  # at every third position the draft is wrong but its second choice is the target's
        top = target_rule(h)
        if (len(h) - len(PROMPT)) % 3 == 2:
            return (top + 1) % 7, top, 0.5
        return top, (top + 2) % 7, 0.95

    r, _ = run_scripted(second_is_right, polls=100, gamma=4, branch_budget=3)
    assert r.num_accepted < r.num_drafted
    assert r.branch_hits == r.rounds - 1 and r.branch_misses == 0
    assert r.round_log[0].num_accepted == 2  # x_2 rejected, corrected to the alternative's bet
    assert r.tokens_reused > 0
    # Without alternatives the same draft misses every round.
    r1, _ = run_scripted(second_is_right, polls=100, gamma=4, branch_budget=1)
    assert r1.branch_hits == 0


def test_miss_when_neither_branch_bets_right_then_rebuilds_the_cache():
    def both_wrong(h):  # so is the third choice
        top = target_rule(h)
        if (len(h) - len(PROMPT)) % 3 == 2:
            return (top + 1) % 7, (top + 2) % 7, 0.5, (top + 4) % 7
        return top, (top + 3) % 7, 0.95

    r, _ = run_scripted(both_wrong, polls=100, gamma=4, branch_budget=4)
    assert r.branch_hits == 0 and r.branch_misses == r.rounds - 1
    assert r.tokens_reused == 0


def test_alternative_hit_after_the_wait_was_cut_short():
    def second_is_right(h):
        top = target_rule(h)
        return ((top + 1) % 7, top, 0.5) if (len(h) - len(PROMPT)) % 3 == 2 else (top, (top + 2) % 7, 0.95)

    for polls in range(0, 12):  # the verdict interrupts the main branch, the alternative, or nothing
        run_scripted(second_is_right, polls=polls, gamma=4, branch_budget=3)


def test_eos_inside_a_branch():
    def eos_early(h):  # the draft believes the answer ends after 6 tokens; the target ends it after 20
        top = EOS if len(h) - len(PROMPT) == 6 else target_rule(h)
        return top, (top + 1) % 7 if top != EOS else target_rule(h), 0.9

    r, edge = run_scripted(eos_early, polls=100, gamma=4, branch_budget=2)
    assert EOS in edge.blocks[1]  # the main branch drafted EOS and its block was sent as it was
    assert r.round_log[1].num_accepted == edge.blocks[1].index(EOS)

    def eos_agreed(h):  # both end the answer at 20 tokens: EOS is drafted inside the main branch and accepted
        return target_rule(h), (target_rule(h) + 1) % 7, 0.9

    r, edge = run_scripted(eos_agreed, polls=100, max_new=40, gamma=5, branch_budget=2)
    assert edge.blocks[-1][-1] == EOS and r.round_log[-1].num_accepted == len(edge.blocks[-1])
    assert r.branch_hits == r.rounds - 1


def test_adaptive_confidence_stop_and_branches_together():
    def unsure_every_fourth(h):
        top = target_rule(h)
        return ((top + 1) % 7, top, 0.45) if (len(h) - len(PROMPT)) % 4 == 3 else (top, (top + 2) % 7, 0.95)

    r, edge = run_scripted(unsure_every_fourth, polls=100, gamma=6, gamma_min=2, gamma_max=8, branch_budget=2,
                           policy="adaptive", threshold=0.5)  # fmt: skip
    assert len(edge.blocks[0]) == 4  # gamma is 6 but x_3 was drafted unsure: the block stops after it
    assert all(len(b) <= 8 for b in edge.blocks)
    assert r.round_log[0].num_accepted == 3 and r.branch_hits > 0  # the alternative at x_3 bet on the correction


# -- token trees: alternatives verified in the same round -------------------------------------------------


def second_right_every_third(h):  # at every third position the draft is wrong but its second choice is the target's
    top = target_rule(h)
    if (len(h) - len(PROMPT)) % 3 == 2:
        return (top + 1) % 7, top, 0.5
    return top, (top + 2) % 7, 0.95


def test_tree_alternative_is_accepted_in_the_same_round():
    chain_r, _ = run_scripted(second_right_every_third, polls=0, gamma=6, tree=0, branch_budget=1)
    r, edge = run_scripted(second_right_every_third, polls=0, gamma=6, tree=2)
    assert r.tree_rounds == r.rounds and r.tree_hits > 0
    first = edge.blocks[0]
    parents = edge.trees[0]
    assert parents[:6] == list(range(-1, 5)) and len(first) > 6  # the block, then the alternatives
    # the block fails at x_2; the alternative rooted there holds the target's token and its continuation is right
    # up to position 5, where the draft is wrong again: 5 accepted where the chain gets 2
    assert r.round_log[0].num_accepted == 5 and r.round_log[0].k == 6
    assert chain_r.round_log[0].num_accepted == 2
    assert r.rounds < chain_r.rounds
    assert r.num_drafted + r.tree_nodes == sum(len(b) for b in edge.blocks)


def test_tree_with_branching_during_the_wait_and_an_always_right_draft():
    for polls in (0, 3, 100):  # the verdict interrupts the main branch, or not
        run_scripted(second_right_every_third, polls=polls, gamma=5, tree=2, branch_budget=3, policy="adaptive",
                     threshold=0.6, gamma_max=8)  # fmt: skip
    r, edge = run_scripted(agreeing, polls=100, gamma=4, tree=2, branch_budget=1)

    def main_length(parents: list[int]) -> int:
        return next((i for i, p in enumerate(parents) if p != i - 1), len(parents))

    # an always-right draft: every block is accepted whole, never an alternative; the wait's main branch hits
    assert r.tree_hits == 0 and r.num_accepted == sum(main_length(t) for t in edge.trees)
    assert r.branch_hits == r.rounds - 1


def _first_block(unsure: int, wrong: int, unsure_conf: float, wrong_conf: float):
    """A draft that is sure and right except, in the first block, at ``unsure`` (right, but unsure; its second
    choice is wrong) and at ``wrong`` (wrong; its second choice is the target's)."""

    def rule(h):
        top, i = target_rule(h), len(h) - len(PROMPT)
        if i == unsure:
            return top, (top + 1) % 7, unsure_conf
        if i == wrong:
            return (top + 1) % 7, top, wrong_conf
        return top, (top + 2) % 7, 0.95

    return rule


def test_a_tree_round_drafts_the_bets_it_did_not_send_during_the_wait():
    # The tree's one alternative goes to the unsure position 1 (bet score 0.95 * 0.3, the highest), where the block
    # is right; the wait's alternative to position 3 (0.95 * 0.4 * 0.95 * 0.25), where the target takes the second
    # choice: the round accepts 3 along the block, and the branch drafted during the wait opens the next block.
    r, edge = run_scripted(_first_block(1, 3, 0.4, 0.5), polls=100, gamma=6, tree=1, branch_budget=2)
    main_only, _ = run_scripted(_first_block(1, 3, 0.4, 0.5), polls=100, gamma=6, tree=1, branch_budget=1)
    assert edge.trees[0] and len(edge.blocks[0]) > 6  # a tree was sent
    assert r.round_log[0].num_accepted == 3 and r.tree_hits == 0
    assert r.branch_hits == main_only.branch_hits + 1 and r.tokens_reused > main_only.tokens_reused
    # Now the tree's alternative is the right one (position 3: 0.95 * 0.7 * 0.95 * 0.32 against 0.95 * 0.15) and
    # the wait's is at position 1, before it: the wait cut the cache there, and the accepted path through the tree
    # must be rebuilt from the block's saved entries (run_scripted checks every token against the target's).
    r, edge = run_scripted(_first_block(1, 3, 0.7, 0.36), polls=100, gamma=6, tree=1, branch_budget=2)
    assert r.round_log[0].num_accepted > 4 and r.tree_hits >= 1


def test_a_bet_on_the_third_choice_hits_in_the_wait_and_in_a_tree():
    def torn_at_2(h):  # at position 2 the draft's first two choices are wrong, its third is the target's
        top, i = target_rule(h), len(h) - len(PROMPT)
        if i == 2:
            return (top + 1) % 7, (top + 2) % 7, 0.4, top
        return top, (top + 3) % 7, 0.95

    # the wait's bets at position 2: its second choice (0.95^2 * 0.3), then its third (0.95^2 * 0.27)
    r, _ = run_scripted(torn_at_2, polls=100, gamma=5, branch_budget=3)
    second_only, _ = run_scripted(torn_at_2, polls=100, gamma=5, branch_budget=2)
    assert r.round_log[0].num_accepted == 2
    assert r.branch_hits == second_only.branch_hits + 1
    # a tree of two alternatives sends both bets: the target follows the third choice in the same round
    r, edge = run_scripted(torn_at_2, polls=0, gamma=5, tree=2)
    assert r.round_log[0].num_accepted > 3 and r.tree_hits >= 1
    assert sum(p == 1 for p in edge.trees[0]) == 3  # after x_1: the block's x_2 and both bets


def test_eos_inside_a_tree_alternative():
    def wrong_before_the_end(h):  # wrong (second choice right) two tokens before the target's EOS, else right
        top = target_rule(h)
        if len(h) - len(PROMPT) == 18:
            return (top + 1) % 7, top, 0.5
        return top, (top + 1) % 7 if top != EOS else 0, 0.9

    r, edge = run_scripted(wrong_before_the_end, polls=0, max_new=30, gamma=7, tree=2)
    ids, parents = edge.blocks[-1], edge.trees[-1]
    assert parents and EOS in ids[7:]  # the last tree's alternative drafted the end of the answer
    assert r.round_log[-1].num_accepted > 0 and r.tree_hits >= 1  # and the answer ended inside it


# -- greedy equality through the engine with branching on ----------------------------------------------


PAIRS = {
    "always-agrees": ((TINY_SPECS[0], 3), (TINY_SPECS[0], 3)),
    "never-agrees": ((TINY_SPECS[1], 0), (TINY_SPECS[0], 7)),
    "partial": ((TINY_SPECS[1], 0), (TINY_SPECS[1], 0, 0.6)),  # the target with noise on its LM head
}


def make_pair(name):
    (tspec, tseed), dspec = PAIRS[name]
    target = tiny_llava(tspec, tseed)
    draft = tiny_llava(dspec[0], dspec[1])
    if len(dspec) == 3:
        gen = torch.Generator().manual_seed(11)
        head = draft.model.lm_head.weight
        with torch.no_grad():
            head += dspec[2] * head.std() * torch.randn(head.shape, generator=gen)
    return target, draft


VARIANTS = {
    "branching": dict(gamma=4, branch_budget=3),
    "adaptive+branching": dict(gamma=3, gamma_max=8, policy="adaptive", threshold=0.2, branch_budget=4),
    "branching+tree": dict(gamma=4, branch_budget=2, tree=2),  # fixed policy: every planned alternative is drafted
    # the stop's threshold from the cost model after the first round (capped at a high tau, so that it binds)
    "adaptive+branching, cost stop": dict(
        gamma=3, gamma_max=8, policy="adaptive", threshold=0.9, stop="cost", branch_budget=4
    ),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_greedy_equals_target_with_branching(pair):
    torch.set_num_threads(1)
    target, draft = make_pair(pair)
    edge = Edge(target)
    rates, tree_hits = [], []
    for sample in load_split("test", 2, offset=1):
        expected = generate(target, target.prepare(sample.image(), sample.question), 32).token_ids
        for name, settings in VARIANTS.items():
            for rtt in (0.0, 4.0):
                link = Link(colocated_profile() if rtt == 0 else LinkProfile(rtt_ms=rtt, jitter_ms=1.0))
                transport = InProcessTransport(edge.handle, link)
                try:
                    r = Device(draft, transport, DeviceSettings(max_new_tokens=32, **settings)).run(
                        sample.image(), sample.question
                    )
                finally:
                    transport.close()
                assert r.token_ids == expected, (pair, name, rtt)
                if r.tree_rounds:
                    tree_hits.append(r.tree_hits)
                rates.append(r.num_accepted / max(r.num_drafted, 1))  # blocks only: alternatives are tree_nodes
    assert not edge.sessions
    assert len(tree_hits) == 4  # the tree variant sent trees in every run (greedy)
    if pair == "always-agrees":
        assert not any(tree_hits)  # the block itself is always accepted
    if pair == "always-agrees":
        assert min(rates) == 1.0
    elif pair == "never-agrees":
        assert max(rates) < 0.2
    else:
        assert 0.1 < sum(rates) / len(rates) < 0.95
