"""Token-tree verification: the pure walk, the adapters' tree forward, the wire fields and the edge's verdict."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from covspec.data.shapes import load_split
from covspec.decoding.autoregressive import generate
from covspec.decoding.tree import (
    ancestors,
    branches_from_parents,
    chain,
    check_tree,
    depths,
    is_chain,
    parents_from_branches,
    path_to,
    verify_greedy_tree,
)
from covspec.models import checks as C
from covspec.models.tiny import TINY_SPECS, TinySpec, tiny_llava
from covspec.protocol import (
    AltVerdict,
    ErrorReply,
    OpenSession,
    ProtocolError,
    VerifyRequest,
    VerifyResponse,
    decode,
    encode,
    new_session_id,
    probs_to_bytes,
)
from covspec.protocol.validation import check_against
from covspec.runtime.device import png_bytes
from covspec.runtime.edge import Edge

EOS = 2
#        0  1  2  3  4  5  6      node
IDS = [10, 11, 12, 20, 21, 30, 31]
PARENTS = [-1, 0, 1, 0, 3, -1, 5]  # 10-11-12, 10-20-21, 30-31


def rows_for(picks: dict[int, int], k: int = len(IDS), v: int = 40) -> torch.Tensor:
    """Target logits [k + 1, V] whose argmax after node i (row i + 1; -1 → row 0) is ``picks[i]`` (0 otherwise)."""
    rows = torch.zeros(k + 1, v)
    for node in range(-1, k):
        rows[node + 1, picks.get(node, 0)] = 1.0
    return rows


# -- pure -------------------------------------------------------------------------------------------


def test_tree_helpers():
    assert chain(3) == [-1, 0, 1] and is_chain(chain(4)) and not is_chain(PARENTS)
    assert depths(PARENTS) == [0, 1, 2, 1, 2, 0, 1]
    assert path_to(PARENTS, 4) == [0, 3, 4] and path_to(PARENTS, -1) == []
    anc = ancestors(PARENTS)
    assert anc[4].nonzero().flatten().tolist() == [0, 3, 4] and anc[6].nonzero().flatten().tolist() == [5, 6]
    assert torch.equal(ancestors(chain(4)), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    ("ids", "parents", "message"),
    [
        ([1, 2], [-1], "parents has 1 entries for 2"),
        ([1, 2], [-1, 1], r"parents\[1\] = 1:"),
        ([1, 2], [-1, -2], r"parents\[1\] = -2:"),
        ([1, 1], [-1, -1], "repeats token 1"),
        ([EOS, 5], [-1, 0], "continues after EOS"),
    ],
)
def test_bad_trees_are_refused_by_name(ids, parents, message):
    with pytest.raises(ValueError, match=message):
        check_tree(ids, parents, {EOS})


def test_greedy_walk_follows_the_target_through_the_tree():
    # the target goes 10 → 20 → 21, then says 7: the second branch is accepted whole, 7 is the bonus
    path, token = verify_greedy_tree(IDS, PARENTS, rows_for({-1: 10, 0: 20, 3: 21, 4: 7}))
    assert (path, token) == ([0, 3, 4], 7)
    # 10 → 11, then 5 (not a child of 11): correction 5 after two accepted
    assert verify_greedy_tree(IDS, PARENTS, rows_for({-1: 10, 0: 11, 1: 5})) == ([0, 1], 5)
    # a root alternative: 30 → 31 → bonus 9
    assert verify_greedy_tree(IDS, PARENTS, rows_for({-1: 30, 5: 31, 6: 9})) == ([5, 6], 9)
    # nothing accepted
    assert verify_greedy_tree(IDS, PARENTS, rows_for({-1: 33})) == ([], 33)
    # an accepted EOS ends the walk, even where the rows would go on
    ids, parents = [10, EOS, 13], [-1, 0, 0]
    assert verify_greedy_tree(ids, parents, rows_for({-1: 10, 0: EOS, 1: 4}, k=3), {EOS})[0] == [0, 1]


def test_a_chain_verifies_as_before():
    from covspec.decoding.verify import verify_greedy

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 6, (5,), generator=gen)
        rows = torch.randn(6, 6, generator=gen)
        n, token = verify_greedy(ids, rows)
        path, tok = verify_greedy_tree(ids.tolist(), chain(5), rows)
        assert (path, tok) == (list(range(n)), token)


# -- adapters: the toy family (the others in test_models_families) ----------------------------------


def test_tiny_llava_scores_a_tree_as_its_chains():
    torch.set_num_threads(1)
    target = tiny_llava(TINY_SPECS[0], 0)
    a, b = load_split("test", 2)
    C.check_tree_verify(target, target.prepare(a.image(), a.question), target.prepare(b.image(), b.question))


# -- wire --------------------------------------------------------------------------------------------


def test_branches_encode_any_tree():
    assert branches_from_parents(PARENTS) == [0, 2, -1, 2]  # 10-11-12 main; 20-21 off node 0; 30-31 off the prefix
    assert parents_from_branches(len(IDS), [0, 2, -1, 2]) == PARENTS
    assert branches_from_parents(chain(4)) == [] and parents_from_branches(4, []) == chain(4)
    deep = [-1, 0, 1, 1, 3, 0, 5, 6]  # a branch off a branch: node 5 attaches to node 0, after the branch at 1
    assert parents_from_branches(len(deep), branches_from_parents(deep)) == deep
    bushy = [-1, -1, 0, 1]  # no node continues the one before it: every node but the first is a branch of one
    assert branches_from_parents(bushy) == [-1, 1, 0, 1, 1, 1]
    assert parents_from_branches(4, [-1, 1, 0, 1, 1, 1]) == bushy
    for bad, message in [([0], "pairs"), ([0, 0], "length"), ([0, 7], "main chain"), ([6, 1], "attaches")]:
        with pytest.raises(ValueError, match=message):
            parents_from_branches(7, bad)


def test_tree_fields_round_trip_and_cost_two_bytes_per_branch():
    branches = branches_from_parents(PARENTS)
    tree = VerifyRequest("s1", 0, IDS, committed_len=0, last_token=-1, branches=branches)
    assert decode(encode(tree)) == tree
    plain = VerifyRequest("s1", 0, IDS, committed_len=0, last_token=-1)
    assert len(encode(tree)) == len(encode(plain)) + 2 + 2 + 1 + 2 * 2  # two empty bins, a list header, 2 pairs
    reply = VerifyResponse("s1", 0, 3, 7, leaf=4)
    assert decode(encode(reply)) == reply
    assert len(encode(VerifyResponse("s1", 0, 3, 7))) < len(encode(reply))


def test_tree_fields_are_checked_against_the_session():
    tree = VerifyRequest("s1", 0, IDS, committed_len=0, last_token=-1, branches=[0, 2, -1, 2])
    check_against(tree, 40, mode="covspec", sampling=False)
    for kwargs, code in [(dict(sampling=True), "length_mismatch"), (dict(mode="dssd"), "invalid_field")]:
        with pytest.raises(ProtocolError) as err:
            check_against(tree, 40, **{"mode": "covspec", "sampling": False, **kwargs})
        assert err.value.code == code, kwargs
    with pytest.raises(ProtocolError, match="main chain"):
        check_against(VerifyRequest("s1", 0, [1, 2, 3], committed_len=0, last_token=-1, branches=[-1, 3]), 40)
    with pytest.raises(ProtocolError, match="repeats token"):
        check_against(VerifyRequest("s1", 0, [1, 2, 1], committed_len=0, last_token=-1, branches=[-1, 1]), 40)
    with pytest.raises(ProtocolError, match="leaf = 7"):
        check_against(VerifyResponse("s1", 0, 3, 7, leaf=7), 40, num_drafted=7)
    with pytest.raises(ProtocolError, match="num_accepted = 0"):
        check_against(VerifyResponse("s1", 0, 0, 7, leaf=2), 40, num_drafted=7)


# -- the edge ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_and_target():
    torch.set_num_threads(1)
    target = tiny_llava(TINY_SPECS[0], 0)
    return Edge(target), target


def _open(edge: Edge, target, sample, temperature: float = 0.0) -> str:
    sid = new_session_id()
    inputs = target.prepare(sample.image(), sample.question)
    msg = OpenSession(sid, "covspec", inputs.input_ids.tolist(), png_bytes(sample.image()), "png", temperature, 1.0,
                      16, 0, 2)  # fmt: skip
    assert type(next(iter(edge.handle(encode(msg))))[0]).__name__ == "SessionOpened"
    return sid


def _ask(edge: Edge, msg):
    (reply, payload), *_ = list(edge.handle(encode(msg)))
    assert decode(payload) == reply
    return reply


def test_edge_accepts_the_targets_branch_and_keeps_only_its_path(edge_and_target):
    """Trees whose second branch is the target's continuation: the edge accepts it and its cache is then that of
    the chain, so the next rounds (chains and trees) still reproduce target greedy decoding."""
    edge, target = edge_and_target
    sample = load_split("test", 1, offset=2)[0]
    expected = generate(target, target.prepare(sample.image(), sample.question), 16).token_ids
    assert len(expected) >= 6, "the tiny target must generate enough to test"
    sid = _open(edge, target, sample)
    wrong = [(t + 1) % target.vocab_size for t in expected]
    committed: list[int] = []
    last, seq = -1, 0
    while len(committed) < len(expected):
        at = len(committed)
        right = expected[at : at + 3]
        # a dead branch (a wrong root and a child), then the target's next tokens as a second root branch
        ids = [wrong[at], expected[at], *right]
        parents = [-1, 0, -1, *range(2, 1 + len(right))]
        reply = _ask(edge, VerifyRequest(sid, seq, ids, committed_len=len(committed), last_token=last,
                                         branches=branches_from_parents(parents)))  # fmt: skip
        assert isinstance(reply, VerifyResponse), reply
        assert reply.num_accepted == len(right) and reply.leaf == len(ids) - 1
        committed += right
        if len(committed) >= len(expected):
            break
        assert reply.token == expected[len(committed)]
        last, seq = reply.token, seq + 1
        committed.append(last)
        if sid not in edge.sessions:  # the verdict that ended the answer closed the session
            assert len(committed) >= 16 or last == target.eos_token_id
            break
        assert edge.sessions[sid].state.seq_len == edge.sessions[sid].state.cache_len  # compacted, no holes
    assert committed[: len(expected)] == expected


def test_bad_trees_get_an_error_reply_and_change_nothing(edge_and_target):
    edge, target = edge_and_target
    sample = load_split("test", 1)[0]
    sid = _open(edge, target, sample)
    eos = target.eos_token_id
    s = edge.sessions[sid]
    before = (s.seq, list(s.committed), s.length, s.state)  # the prefill waits for the first block (fused prefill)
    assert s.state is None
    bad = {
        "attach after": VerifyRequest(sid, 0, [5, 6], committed_len=0, last_token=-1, branches=[1, 1]),
        "siblings": VerifyRequest(sid, 0, [5, 5], committed_len=0, last_token=-1, branches=[-1, 1]),
        "after EOS": VerifyRequest(sid, 0, [eos, 6, 7], committed_len=0, last_token=-1, branches=[0, 1]),
        "too deep": VerifyRequest(sid, 0, list(range(3, 21)), committed_len=0, last_token=-1, branches=[-1, 1]),
        "no main chain": VerifyRequest(sid, 0, [5, 6, 7], committed_len=0, last_token=-1, branches=[-1, 3]),
        "odd": VerifyRequest(sid, 0, [5, 6, 7], committed_len=0, last_token=-1, branches=[-1]),
    }
    for name, msg in bad.items():
        reply = _ask(edge, msg)
        assert isinstance(reply, ErrorReply), name
        assert (s.seq, list(s.committed), s.length, s.state) == before, name
    wide = VerifyRequest(sid, 0, list(range(3, 20)), committed_len=0, last_token=-1, branches=[-1, 1] * 16)
    assert isinstance(_ask(edge, wide), VerifyResponse)  # 17 nodes but depth 1: within max_new_tokens = 16


def _sampling_round0(edge: Edge, target, sample):
    """A sampling session and a first tree whose main chain is the target's least likely token (rejected unless
    p(x) = 1) with two alternatives at the prefix: the two most likely tokens, each with a continuation of two. The
    continuations' q values make the first alternative accept one token and correct the second (q = 1), and the
    second accept both (q = 0.001) and send a bonus, unless p is below 0.001."""
    sid = _open(edge, target, sample, temperature=1.0)
    inputs = target.prepare(sample.image(), sample.question)
    _, logits = target.prefill(inputs)
    p = torch.softmax(logits.double(), -1)
    worst, (a, b) = int(p.argmin()), torch.topk(p, 2).indices.tolist()
    conts = [torch.topk(target.forward(target.prefill(inputs)[0], torch.tensor([r]))[-1], 2).indices.tolist()
             for r in (a, b)]  # fmt: skip
    ids = [worst, a, *conts[0], b, *conts[1]]
    q = np.array([0.9, 1.0, 1e-3, 1.0, 1.0, 1e-3, 1e-3])
    return sid, VerifyRequest(sid, 0, ids, committed_len=0, last_token=-1, draft_probs=probs_to_bytes(q),
                              branches=[-1, 3, -1, 3])  # fmt: skip


def _reference_logits(target, sample, tokens: list[int]) -> torch.Tensor:
    state, logits = target.prefill(target.prepare(sample.image(), sample.question))
    return target.forward(state, torch.tensor(tokens))[-1] if tokens else logits


def test_sampling_tree_alternative_taken_commits_its_verdict_and_its_cache(edge_and_target):
    """Under sampling the alternatives are guesses of the correction. The edge answers the rejected main chain with
    candidates and, per alternative at the rejected depth, the accept test of its continuation and its bonus or
    candidates. A block naming one of them in ``via`` commits its root and accepted continuation: the session's
    tokens and cache are then exactly those of that path (the next logits equal a fresh prefill's)."""
    edge, target = edge_and_target
    sample = load_split("test", 1, offset=1)[0]
    for take in (0, 1, None):
        sid, tree = _sampling_round0(edge, target, sample)
        reply = _ask(edge, tree)
        assert isinstance(reply, VerifyResponse) and reply.num_accepted == 0 and reply.candidate_ids, reply
        assert [(v.node, v.num_accepted, v.token >= 0) for v in reply.alts] == [(1, 1, False), (4, 2, True)]
        s = edge.sessions[sid]
        if take is None:  # the correction was none of the roots: the alternatives' entries are dropped
            last, via, committed = reply.candidate_ids[0], -1, []
        else:
            v = reply.alts[take]
            path = tree.draft_ids[v.node : v.node + 1 + v.num_accepted]
            last = v.token if v.token >= 0 else v.candidate_ids[0]
            via, committed = v.node, path
        bad = VerifyRequest(sid, 1, [7], committed_len=len(committed) + 1, last_token=last,
                            draft_probs=probs_to_bytes(np.array([0.5])), via=2)  # fmt: skip
        # (node 2 is no alternative's root)
        before = (s.seq, list(s.committed), s.state.seq_len, dict(s.expected.alts))
        assert isinstance(_ask(edge, bad), ErrorReply)
        assert (s.seq, list(s.committed), s.state.seq_len, dict(s.expected.alts)) == before
        nxt = msgspec.structs.replace(bad, via=via)
        assert isinstance(_ask(edge, nxt), VerifyResponse)
        done = [*committed, last]
        assert s.committed[: len(done)] == done
        ref = _reference_logits(target, sample, s.committed)
        assert torch.allclose(s.last_logits, ref, atol=1e-4), take
        assert s.state.seq_len == s.state.cache_len


def test_sampling_tree_fields_are_checked(edge_and_target):
    edge, target = edge_and_target
    sample = load_split("test", 1)[0]
    sid, tree = _sampling_round0(edge, target, sample)
    nested = msgspec.structs.replace(tree, branches=[-1, 3, 1, 3])  # the second branch hangs off the first
    reply = _ask(edge, nested)
    assert isinstance(reply, ErrorReply) and "main chain" in reply.message
    early = msgspec.structs.replace(tree, via=1)  # round 0: nothing to take
    assert isinstance(_ask(edge, early), ErrorReply)
    greedy = VerifyRequest(sid, 0, [5], committed_len=0, last_token=-1, via=0)
    with pytest.raises(ProtocolError, match="via = 0"):
        check_against(greedy, 40, mode="covspec", sampling=False)
    alt = AltVerdict(1, 0, 5, [], b"")
    reply = VerifyResponse(sid, 0, 0, -1, [3], probs_to_bytes(np.array([0.5])), alts=[alt])
    assert decode(encode(reply)) == reply
    check_against(reply, 40, mode="covspec", sampling=True, num_drafted=7)
    for bad, message in [
        (msgspec.structs.replace(reply, alts=[AltVerdict(1, 0, 5, [3], probs_to_bytes(np.array([0.5])))]), "either"),
        (msgspec.structs.replace(reply, alts=[AltVerdict(1, 0, -1, [], b"")]), "either"),
        (msgspec.structs.replace(reply, alts=[AltVerdict(1, 0, 5, [3], b"")]), "candidate_probs"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            decode(encode(bad))
    for kwargs in (dict(sampling=False), dict(mode="dssd"), dict(num_drafted=1)):
        with pytest.raises(ProtocolError):
            check_against(reply, 40, **{"mode": "covspec", "sampling": True, "num_drafted": 7, **kwargs})


def test_sampling_trees_run_through_the_device_and_are_seeded():
    """covspec with token trees under sampling, device and edge over the in-process link: trees are sent, corrections
    take alternatives, and a seed gives the same answer."""
    from covspec.protocol import Link
    from covspec.runtime.device import Device, DeviceSettings
    from covspec.runtime.engine import colocated_profile
    from covspec.runtime.transport import InProcessTransport

    spec = TinySpec(
        image_size=16, patch_size=8, vision_hidden=16, hidden=32, layers=1, heads=2, kv_heads=2, init_scale=0.5
    )  # peaked distributions: the residual's mass sits on few tokens
    target, draft = tiny_llava(spec, 0), tiny_llava(spec, 0)
    edge = Edge(target)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the target with noise on its language model: corrections are common
        for w in draft.model.model.language_model.parameters():
            if w.dim() > 1:
                w += 0.3 * w.std() * torch.randn(w.shape, generator=gen)
    sample = load_split("test", 1)[0]
    transport = InProcessTransport(edge.handle, Link(colocated_profile()))
    results = []
    for seed in [*range(12), 0]:
        s = DeviceSettings(method="covspec", max_new_tokens=10, temperature=1.0, seed=seed, policy="fixed", gamma=3,
                           tree=2)  # fmt: skip
        results.append(Device(draft, transport, s).run(sample.image(), sample.question))
    transport.close()
    assert sum(r.tree_rounds for r in results) > 12 and sum(r.tree_hits for r in results) > 0
    assert results[-1].token_ids == results[0].token_ids
    # projected to the wire vocabulary, the frames (trees, via, leaf, alternatives' verdicts) are exactly what was sent
    transport = InProcessTransport(edge.handle, Link(colocated_profile()))
    for seed in range(4):
        s = DeviceSettings(method="covspec", max_new_tokens=10, temperature=1.0, seed=seed, policy="fixed", gamma=3,
                           tree=2, projected_vocab=target.vocab_size)  # fmt: skip
        r = Device(draft, transport, s).run(sample.image(), sample.question)
        assert r.tree_rounds and r.traffic.projected_total(phase="decoding") == r.traffic.decoding_bytes
        assert r.metrics()["projected_bytes_decoding"] == r.traffic.decoding_bytes
    transport.close()
    # tree_continuation caps what is drafted after each alternative's root (2 alternatives: at most 4 nodes a round)
    transport = InProcessTransport(edge.handle, Link(colocated_profile()))
    nodes = {}
    for cap in (0, 1):
        rs = [Device(draft, transport, DeviceSettings(method="covspec", max_new_tokens=10, temperature=1.0, seed=seed,
                                                      policy="fixed", gamma=6, tree=2, tree_continuation=cap)
                     ).run(sample.image(), sample.question) for seed in range(6)]  # fmt: skip
        nodes[cap] = (sum(r.tree_nodes for r in rs), sum(r.tree_rounds for r in rs))
    transport.close()
    assert nodes[1][0] <= 4 * nodes[1][1] and nodes[0][0] > nodes[1][0], nodes


def test_sampling_tree_refills_and_full_row_fallback_for_the_round_and_an_alternative(edge_and_target):
    """MoreCandidates refills the round's correction (``via`` omitted) or a taken alternative's (``via``: its root),
    each from its own row; after 8 refills the edge ships that row itself, and the next block may then commit any
    token with p > 0 there."""
    from covspec.protocol import MoreCandidates, bytes_to_probs

    edge, target = edge_and_target
    sample = load_split("test", 1, offset=1)[0]
    inputs = target.prepare(sample.image(), sample.question)
    _, logits = target.prefill(inputs)
    p = torch.softmax(logits.double(), -1)
    worst, best = int(p.argmin()), int(p.argmax())
    after_best = torch.softmax(target.forward(target.prefill(inputs)[0], torch.tensor([best]))[-1].double(), -1)
    bad_cont = int(after_best.argmin())  # drafted with q = 1: rejected unless p(x) = 1
    for via in (-1, 1):
        sid = _open(edge, target, sample, temperature=1.0)
        tree = VerifyRequest(sid, 0, [worst, best, bad_cont], committed_len=0, last_token=-1,
                             draft_probs=probs_to_bytes(np.array([1.0, 1.0, 1.0])), branches=[-1, 2])  # fmt: skip
        reply = _ask(edge, tree)
        assert reply.num_accepted == 0 and [(v.node, v.num_accepted, v.token) for v in reply.alts] == [(1, 0, -1)]
        rows = [bytes_to_probs(_ask(edge, MoreCandidates(sid, 0, via)).target_dists) for _ in range(8)]
        assert all(len(r) == 0 for r in rows[:7]) and len(rows[7]) == target.vocab_size
        want = p if via < 0 else after_best
        assert np.allclose(rows[7], want.numpy(), atol=1e-5)
        middling = [int(t) for t in np.argsort(rows[7])[len(rows[7]) // 2 :] if t != target.eos_token_id]
        anything = middling[0]  # a token with p > 0 that no candidate need have been
        committed = 1 if via < 0 else 2
        nxt = VerifyRequest(sid, 1, [5], committed_len=committed, last_token=anything,
                            draft_probs=probs_to_bytes(np.array([0.5])), via=via)  # fmt: skip
        assert isinstance(_ask(edge, nxt), VerifyResponse)
        assert edge.sessions[sid].committed[:committed] == ([anything] if via < 0 else [best, anything])


def test_trees_under_sampling_are_configured():
    """``branching.tree`` applies to greedy decoding, and under sampling with ``branching.sampling_trees``, whose
    alternatives' continuations ``branching.sampling_continuation`` caps."""
    from covspec.config import load_config
    from covspec.errors import ConfigError
    from covspec.runtime.engine import device_settings

    greedy = device_settings(load_config(None, []), "covspec")
    assert (greedy.tree, greedy.tree_continuation) == (2, 0)
    sampling = load_config(None, ["generation.temperature=1.0"])
    assert (device_settings(sampling, "covspec").tree, device_settings(sampling, "covspec").tree_continuation) == (2, 4)
    assert device_settings(sampling, "covspec_no_tree").tree == 0
    off = load_config(None, ["generation.temperature=1.0", "branching.sampling_trees=false"])
    assert device_settings(off, "covspec").tree == 0
    for bad, key in [("branching.sampling_trees=maybe", "sampling_trees"),
                     ("branching.sampling_continuation=-1", "sampling_continuation")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"branching\\.{key}"):
            load_config(None, [bad])
