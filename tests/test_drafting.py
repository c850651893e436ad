"""The drafting policy: the cost-model controller's choices on given estimates, the confidence stop, the EMAs."""

from __future__ import annotations

import json
import math

import pytest

from covspec.decoding.drafting import DraftPolicy, choose_block_length, round_time, stop_threshold, throughput

MS = 1e-3
DRAFT_S, VERIFY_S = 1 * MS, 4 * MS


def lengths_over_rtt(alpha: float, branching: bool, alt_hit: float = 0.0) -> list[int]:
    return [
        choose_block_length(alpha, DRAFT_S, VERIFY_S, rtt * MS, 1, 32, branching, alt_hit) for rtt in (5, 20, 50, 100)
    ]


@pytest.mark.parametrize("branching", [False, True])
@pytest.mark.parametrize("alpha", [0.6, 0.8, 0.9])
def test_longer_blocks_at_higher_rtt(alpha, branching):
    gammas = lengths_over_rtt(alpha, branching, alt_hit=0.3)
    assert gammas == sorted(gammas) and gammas[-1] > gammas[0], gammas


@pytest.mark.parametrize("branching", [False, True])
@pytest.mark.parametrize("rtt_ms", [5, 50])
def test_longer_blocks_at_higher_acceptance(rtt_ms, branching):
    gammas = [choose_block_length(a, DRAFT_S, VERIFY_S, rtt_ms * MS, 1, 32, branching) for a in (0.3, 0.6, 0.8, 0.95)]
    assert gammas == sorted(gammas) and gammas[-1] > gammas[0], gammas


def test_choice_is_the_argmax_within_bounds():
    for alpha in (0.0, 0.4, 0.85, 1.0):
        for branching in (False, True):
            g = choose_block_length(alpha, DRAFT_S, VERIFY_S, 20 * MS, 2, 9, branching, 0.2)
            assert 2 <= g <= 9
            rates = [throughput(x, alpha, DRAFT_S, VERIFY_S, 20 * MS, branching, 0.2) for x in range(2, 10)]
            assert math.isclose(throughput(g, alpha, DRAFT_S, VERIFY_S, 20 * MS, branching, 0.2), max(rates))
    assert choose_block_length(0.0, DRAFT_S, VERIFY_S, 20 * MS, 2, 9) == 2  # nothing is ever accepted
    assert choose_block_length(1.0, DRAFT_S, VERIFY_S, 20 * MS, 2, 9) == 9  # everything is


def test_round_time_and_throughput_formulas():
    # E(3) at alpha 0.5 = 1 + .5 + .25 + .125; sequential T = 3c + r + v.
    assert math.isclose(throughput(3, 0.5, 0.002, 0.004, 0.010), 1.875 / 0.020)
    # Branching, the wait covers the next block: on a hit nothing is left to draft after the reply.
    h = 0.5**4 + (1 - 0.5**4) * 0.4
    assert math.isclose(round_time(3, 0.5, 0.002, 0.004, 0.010, True, 0.4), 0.014 + (1 - h) * 0.006)
    # A wait shorter than the next block: what does not fit is drafted after the reply.
    h = 0.9**5
    expected = 0.002 + (1 - h) * 4 * 0.001 + h * (5 * 0.001 - 0.002)
    assert math.isclose(round_time(4, 0.9, 0.001, 0.001, 0.001, True), expected)
    assert round_time(4, 0.9, 0.001, 0.001, 0.001, True) < round_time(4, 0.9, 0.001, 0.001, 0.001, False)


def test_fixed_policy_never_stops_early_and_ignores_measurements():
    policy = DraftPolicy("fixed", gamma=5, threshold=0.9)
    for _ in range(5):
        policy.observe_step(0.001)
        policy.observe_round(5, 5, 0.5)
    assert policy.block_length() == 5
    assert not policy.stop_after(0, 0.01)


def test_tree_alternatives_are_drafted_when_their_chance_times_the_wait_beats_their_cost():
    assert DraftPolicy("fixed").alternative_pays(0.0, 100)  # fixed policy: every planned alternative
    policy = DraftPolicy("adaptive", decay=0.0)
    assert not policy.alternative_pays(1.0, 1)  # nothing measured yet: no alternative
    policy.observe_step(1 * MS)
    policy.observe_round(drafted=5, accepted=3, wait_s=50 * MS)
    assert policy.alternative_pays(0.25, 10)  # 0.25 x 50 ms > 10 x 1 ms
    assert not policy.alternative_pays(0.15, 10)  # 7.5 ms < 10 ms
    policy.observe_step(5 * MS)  # a five times slower draft (a phone)
    assert not policy.alternative_pays(0.25, 10)
    policy.observe_overhead(160 * MS)  # per-round work counts like waiting: 0.25 x 210 ms > 10 x 5 ms
    assert policy.alternative_pays(0.25, 10)


def test_confidence_stop_respects_threshold_and_gamma_min():
    policy = DraftPolicy("adaptive", gamma=6, gamma_min=3, gamma_max=10, threshold=0.4)
    assert not policy.stop_after(0, 0.1) and not policy.stop_after(1, 0.1)  # fewer than gamma_min drafted
    assert policy.stop_after(2, 0.39) and not policy.stop_after(2, 0.4) and not policy.stop_after(7, 0.95)


def test_adaptive_policy_starts_at_gamma_then_follows_the_controller():
    policy = DraftPolicy("adaptive", gamma=20, gamma_min=2, gamma_max=8)
    assert policy.block_length() == 8  # the starting length, clamped to the bounds
    policy.observe_step(DRAFT_S)
    policy.observe_round(drafted=4, accepted=4, wait_s=100 * MS)
    assert policy.estimates.alpha == 1.0 and policy.block_length() == 8
    for _ in range(30):  # a link that became fast and a draft that is now always refused at once
        policy.observe_round(drafted=4, accepted=0, wait_s=1 * MS)
    assert policy.estimates.alpha < 0.01 and policy.block_length() == 2


def test_acceptance_estimate_is_accepted_over_trials():
    policy = DraftPolicy("adaptive", decay=0.0)  # no memory: the last round alone
    policy.observe_round(drafted=5, accepted=2, wait_s=0.01)  # 2 accepted, then a rejection
    assert math.isclose(policy.estimates.alpha, 2 / 3)
    policy.observe_round(drafted=3, accepted=3, wait_s=0.01)  # all accepted: no rejection observed
    assert policy.estimates.alpha == 1.0
    policy = DraftPolicy("adaptive", decay=0.5)
    policy.observe_round(drafted=4, accepted=1, wait_s=0.01)
    policy.observe_round(drafted=4, accepted=3, wait_s=0.03)
    assert math.isclose(policy.estimates.alpha, (0.5 * 1 + 0.5 * 3) / (0.5 * 2 + 0.5 * 4))
    assert math.isclose(policy.estimates.wait_s, 0.02)


def test_a_rejected_unsure_last_token_is_not_a_rejection_of_the_confident_run():
    policy = DraftPolicy("adaptive", decay=0.0)
    policy.observe_round(drafted=4, accepted=3, wait_s=0.01, unsure_last=True)  # the stop's token rejected
    assert policy.estimates.alpha == 1.0
    policy.observe_round(drafted=4, accepted=1, wait_s=0.01, unsure_last=True)  # a confident draft rejected
    assert math.isclose(policy.estimates.alpha, 1 / 2)
    policy.observe_round(drafted=4, accepted=3, wait_s=0.01)  # no stop: the last rejection counts
    assert math.isclose(policy.estimates.alpha, 3 / 4)


def test_controller_lengthens_blocks_when_the_measured_rtt_grows():
    chosen = []
    for rtt_ms in (5, 20, 50, 100):
        policy = DraftPolicy("adaptive", gamma=4, gamma_min=1, gamma_max=16, branching=True)
        for _ in range(10):
            policy.observe_step(DRAFT_S)
            policy.observe_round(drafted=6, accepted=4, wait_s=(rtt_ms + 4) * MS)
            policy.observe_alternatives(False)
        chosen.append(policy.block_length())
    assert chosen == sorted(chosen) and chosen[-1] > chosen[0], chosen


def _measured(stop: str, wait_ms: float, draft_ms: float = 1.0, threshold: float = 0.4) -> DraftPolicy:
    policy = DraftPolicy("adaptive", gamma=4, gamma_min=1, gamma_max=16, threshold=threshold, stop=stop, decay=0.0)
    policy.observe_step(draft_ms * MS)
    policy.observe_round(drafted=6, accepted=4, wait_s=wait_ms * MS)  # alpha = 4 / 5
    return policy


def test_cost_stop_drafts_through_unsure_tokens_when_the_round_is_slow():
    # Before anything is measured the stop uses tau.
    assert DraftPolicy("adaptive", threshold=0.4).stop_threshold == 0.4
    for wait_ms in (5, 50, 200):
        policy = _measured("cost", wait_ms)
        gamma = policy.start_round()
        rate = throughput(gamma, 0.8, DRAFT_S, 0.0, wait_ms * MS)
        assert math.isclose(stop_threshold(gamma, 0.8, DRAFT_S, wait_ms * MS), rate * DRAFT_S / 0.8)
        assert math.isclose(policy.stop_threshold, min(0.4, rate * DRAFT_S / 0.8))
    # p * alpha < R * c: a token of confidence p ends the block only if one more step is worth less than its time.
    slow, fast = _measured("cost", 200), _measured("cost", 2)
    slow.start_round(), fast.start_round()
    assert slow.stop_threshold < 0.05 and not slow.stop_after(3, 0.1)  # a long wait: draft on
    assert fast.stop_threshold == 0.4 and fast.stop_after(3, 0.3)  # capped at tau
    slow_draft = _measured("cost", 50, draft_ms=20.0, threshold=0.9)
    slow_draft.start_round()
    assert slow_draft.stop_threshold > 0.2  # a slow draft stops at unsure tokens sooner
    fixed_tau = _measured("threshold", 200)
    fixed_tau.start_round()
    assert fixed_tau.stop_threshold == 0.4 and fixed_tau.stop_after(3, 0.3)
    planned = _measured("cost", 200)  # planning a length (as branching does mid-round) leaves the round's stop alone
    assert planned.block_length() >= 1 and planned.stop_threshold == 0.4
    assert stop_threshold(4, 0.0, DRAFT_S, 0.05) == 1.0  # nothing is accepted: every unsure token stops


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match=r"drafting\.policy"):
        DraftPolicy("greedy")
    with pytest.raises(ValueError, match=r"drafting\.stop"):
        DraftPolicy("adaptive", stop="never")
    with pytest.raises(ValueError):
        DraftPolicy("adaptive", gamma_min=5, gamma_max=3)


def test_per_round_overhead_counts_like_waiting():
    def chosen(overhead_s):
        policy = DraftPolicy("adaptive", gamma=4, gamma_min=1, gamma_max=16)
        for _ in range(5):
            policy.observe_step(DRAFT_S)
            policy.observe_round(drafted=6, accepted=4, wait_s=5 * MS)
            policy.observe_overhead(overhead_s)
        return policy.block_length()

    assert chosen(20 * MS) > chosen(0.0)
    expected = choose_block_length(0.8, DRAFT_S, 0.0, 25 * MS, 1, 16)
    assert chosen(20 * MS) == expected


@pytest.mark.slow
def test_drafting_bench_runs_every_variant_and_writes_its_outputs(tmp_path, capsys, monkeypatch):
    """The benchmark end to end on one sample and one RTT: every variant's greedy output equals target-only."""
    import json
    import sys

    from covspec.runtime.transport import LINK_SWITCH_INTERVAL_S
    from pipelines import drafting_bench

    intervals, before, real = [], sys.getswitchinterval(), sys.setswitchinterval
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: (intervals.append(s), real(s))[1])
    argv = ["data.limit=1", "tracking.enabled=false", "threads=1", "--rtts", "5", "--out", str(tmp_path)]
    assert drafting_bench.main(argv) == 0
    # the links' delivery threads get the GIL within 0.5 ms while the bench runs; the interpreter's value after
    assert intervals == [LINK_SWITCH_INTERVAL_S, before] and sys.getswitchinterval() == before
    doc = json.loads((tmp_path / "drafting_bench.json").read_text())
    assert doc["edge"] == "process"  # the default: the edge verifies in a process of its own
    assert {row["variant"] for row in doc["summary"]} == set(drafting_bench.VARIANTS)
    assert "adaptive+branching+tree" in drafting_bench.VARIANTS
    assert all(row["identical_to_target_only"] == 1.0 for row in doc["summary"]), doc["summary"]
    assert (tmp_path / "drafting_bench.png").stat().st_size > 0
    assert "1samplesofshapes/test" in "".join(capsys.readouterr().out.split())  # rich wraps the title


def test_draft_coverage_pipeline_on_a_self_draft_and_its_summary(tmp_path, capsys):
    from pipelines import draft_coverage

    # The toy draft verifying itself: it always agrees, so every bound is one round per answer.
    argv = ["data.limit=1", "generation.max_new_tokens=8", "models.target.path=toy-draft", "pruning.method=none",
            "--topk", "2", "--out", str(tmp_path)]  # fmt: skip
    assert draft_coverage.main(argv) == 0
    report = json.loads((tmp_path / "draft_coverage.json").read_text())
    s = report["summary"]
    assert s["agreement"] == 1.0 and s["rounds_per_answer"] == {"chain": 1.0, "tree top2": 1.0}
    assert "agreement 1.000" in capsys.readouterr().out
    # The summary's arithmetic on constructed ranks: 0 = the draft's argmax, k = outside its top k.
    rows = [{"answer": [1, 2, 3, 4], "rank": [0, 1, 0, 3], "confidence": [0.95, 0.3, 0.8, 0.6]},
            {"answer": [5, 6], "rank": [2, 0], "confidence": [0.4, 0.99]}]  # fmt: skip
    s = draft_coverage.summarize(rows, topk=3)
    assert s["agreement"] == 3 / 6 and s["coverage_at_disagreements"] == {"top2": 1 / 3, "top3": 2 / 3}
    assert s["rounds_per_answer"] == {"chain": (3 + 2) / 2, "tree top2": (2 + 2) / 2, "tree top3": (2 + 1) / 2}
    assert s["tokens_per_round"]["chain"] == 6 / 5
    bands = {b["band"]: (b["positions"], b["draft_right"]) for b in s["calibration"]}
    assert bands["[0.25, 0.5)"] == (2, 0.0) and bands["[0.9, 1]"] == (2, 1.0) and bands["[0.75, 0.9)"] == (1, 1.0)
    assert draft_coverage.main(["--topk", "1"]) == 2
