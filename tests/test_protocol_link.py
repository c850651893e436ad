"""Link emulation: latency, bandwidth, jitter and loss terms; profile validation."""

import math
import time

import pytest

from covspec.errors import ConfigError
from covspec.protocol import Link, LinkProfile, sleep_until


def test_co_located_link_has_no_delay():
    link = Link(LinkProfile())
    assert link.transfer_time("up", 5_000_000) == 0.0
    assert link.transfer_time("down", 10) == 0.0


def test_latency_and_bandwidth_terms():
    link = Link(LinkProfile(rtt_ms=40, up_mbps=8, down_mbps=80))
    # 1 MB at 8 Mbps: 1 s serialization, plus rtt/2
    assert link.transfer_time("up", 1_000_000) == pytest.approx(1.0 + 0.020)
    assert link.transfer_time("down", 1_000_000) == pytest.approx(0.1 + 0.020)
    assert link.transfer_time("up", 0) == pytest.approx(0.020)


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_jitter_is_bounded_and_seeded(kind):
    profile = LinkProfile(rtt_ms=20, jitter_ms=5, jitter=kind)
    delays = [Link(profile, seed=1).transfer_time("up", 0) for _ in range(3)]
    assert len(set(delays)) == 1  # same seed, same first delay
    link = Link(profile, seed=1)
    delays = [link.transfer_time("up", 0) for _ in range(2000)]
    bound = 0.005 if kind == "uniform" else 0.020
    assert all(0.010 <= d <= 0.010 + bound for d in delays)
    assert max(delays) - min(delays) > 0.002  # it does vary
    assert Link(profile, seed=2).transfer_time("up", 0) != delays[0]


def test_loss_retransmits_with_timeout():
    profile = LinkProfile(rtt_ms=10, up_mbps=8, loss=0.3)
    link = Link(profile, seed=0)
    base = 0.005 + 1000 * 8 / 8e6
    delays = [link.transfer_time("up", 1000) for _ in range(1000)]
    retransmissions = link.retransmissions["up"]
    assert 300 < retransmissions < 560  # expected 1000 · 0.3/0.7 ≈ 429
    assert link.messages == {"up": 1000, "down": 0} and link.retransmissions["down"] == 0
    rto = max(2 * 10, 10) / 1e3
    # each lost attempt costs its serialization plus the timeout
    assert sum(delays) == pytest.approx(1000 * base + retransmissions * (0.001 + rto))
    assert min(delays) == pytest.approx(base) and max(delays) >= base + rto + 0.001
    assert link.stats()["up.retransmissions"] == retransmissions


def test_loss_is_reproducible_and_capped():
    a, b = Link(LinkProfile(loss=0.5), seed=7), Link(LinkProfile(loss=0.5), seed=7)
    assert [a.transfer_time("down", 100) for _ in range(50)] == [b.transfer_time("down", 100) for _ in range(50)]
    link = Link(LinkProfile(loss=0.999, max_retries=3, min_rto_ms=10))
    assert link.transfer_time("up", 0) == pytest.approx(3 * 0.010)
    assert link.capped["up"] == 1 and link.retransmissions["up"] == 3


def test_compute_slowdown():
    assert Link(LinkProfile(compute_slowdown=3)).compute_delay(0.5) == pytest.approx(1.0)
    assert Link(LinkProfile()).compute_delay(0.5) == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rtt_ms", -1.0),
        ("rtt_ms", math.nan),
        ("jitter_ms", math.inf),
        ("up_mbps", 0.0),
        ("down_mbps", -5.0),
        ("loss", 1.0),
        ("loss", -0.1),
        ("compute_slowdown", 0.5),
        ("jitter", "pareto"),
        ("max_retries", -1),
    ],
)
def test_invalid_profile_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"LinkProfile.{field} "):
        LinkProfile(**{field: value})


def test_direction_checked():
    with pytest.raises(ValueError, match="direction"):
        Link(LinkProfile()).transfer_time("left", 1)


def test_sleep_until_is_precise():
    errors = []
    for _ in range(20):
        deadline = time.perf_counter() + 0.002
        sleep_until(deadline)
        errors.append(time.perf_counter() - deadline)
    assert min(errors) >= 0
    assert sorted(errors)[len(errors) // 2] < 0.0005  # median; loose because the machine is shared
