"""Emulated device-edge link: how long a frame of n bytes takes to arrive. Pure: it returns delays, the
transport sleeps them (``sleep_until`` is precise to ~0.1 ms).

Model of one message (a frame is lost or delivered whole; packets are not modelled):

    delivery = serialization + rtt/2 + jitter                      (the attempt that gets through)
             + lost_attempts × (serialization + rto)               (each lost attempt, detected by timeout)

- serialization = nbytes·8 / bandwidth of the direction (Mbps = 10^6 bit/s; ``inf``: no bandwidth term).
- jitter: per delivered message, ``uniform`` on [0, jitter_ms] (default; mean jitter_ms/2) or ``normal``:
  |N(0, jitter_ms)| capped at 4·jitter_ms. Always ≥ 0 and bounded: the one-way latency never drops below rtt/2.
- loss: each attempt is lost with probability ``loss`` (Bernoulli); the sender retransmits after
  rto = max(2·rtt, min_rto_ms). After ``max_retries`` lost attempts the next one is delivered regardless: the
  emulation models slowness, not a broken connection. Retransmissions are counted per direction.
- Messages in flight do not queue behind one another (no shared-bandwidth contention).

``rtt_ms=0`` with infinite bandwidth and no jitter or loss gives exactly 0 (co-located device and edge).
Each direction draws from its own seeded generator, so a direction's delays are reproducible even when the
transport sends up and down from different threads.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

from covspec.errors import ConfigError


@dataclass(frozen=True)
class LinkProfile:
    """A device's network and compute profile."""

    rtt_ms: float = 0.0
    """Round-trip time; each direction adds rtt/2."""
    jitter_ms: float = 0.0
    """Bound (uniform) or scale (normal) of the extra one-way delay per attempt."""
    up_mbps: float = math.inf
    """Device -> edge bandwidth, 10^6 bit/s; inf: unlimited."""
    down_mbps: float = math.inf
    """Edge -> device bandwidth, 10^6 bit/s; inf: unlimited."""
    loss: float = 0.0
    """Probability that one transmission attempt of a message is lost, in [0, 1)."""
    compute_slowdown: float = 1.0
    """Factor ≥ 1 applied to the device's compute time (a phone is slower than this machine)."""
    jitter: str = "uniform"
    """Jitter distribution: "uniform" or "normal"."""
    min_rto_ms: float = 10.0
    """Floor of the retransmission timeout, rto = max(2·rtt, min_rto_ms)."""
    max_retries: int = 10
    """Lost attempts after which a message is delivered anyway."""

    def __post_init__(self) -> None:
        def number(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)

        rules = (
            ("rtt_ms", number(self.rtt_ms) and 0 <= self.rtt_ms < math.inf, "a finite number ≥ 0"),
            ("jitter_ms", number(self.jitter_ms) and 0 <= self.jitter_ms < math.inf, "a finite number ≥ 0"),
            ("up_mbps", number(self.up_mbps) and self.up_mbps > 0, "> 0 (inf for unlimited)"),
            ("down_mbps", number(self.down_mbps) and self.down_mbps > 0, "> 0 (inf for unlimited)"),
            ("loss", number(self.loss) and 0 <= self.loss < 1, "in [0, 1)"),
            ("compute_slowdown", number(self.compute_slowdown) and 1 <= self.compute_slowdown < math.inf, "≥ 1"),
            ("jitter", self.jitter in ("uniform", "normal"), "'uniform' or 'normal'"),
            ("min_rto_ms", number(self.min_rto_ms) and 0 <= self.min_rto_ms < math.inf, "a finite number ≥ 0"),
            ("max_retries", type(self.max_retries) is int and self.max_retries >= 0, "an int ≥ 0"),
        )
        for name, ok, what in rules:
            if not ok:
                raise ConfigError(f"LinkProfile.{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def rto_s(self) -> float:
        return max(2 * self.rtt_ms, self.min_rto_ms) / 1e3


class Link:
    """One device's link to the edge, with a seeded generator per direction."""

    def __init__(self, profile: LinkProfile, seed: int = 0) -> None:
        self.profile = profile
        self._rng = {d: random.Random(f"covspec-link:{seed}:{d}") for d in ("up", "down")}
        self._bits_per_s = {"up": profile.up_mbps * 1e6, "down": profile.down_mbps * 1e6}
        self._lock = threading.Lock()
        self.messages = {"up": 0, "down": 0}
        self.retransmissions = {"up": 0, "down": 0}
        self.capped = {"up": 0, "down": 0}  # messages delivered after max_retries lost attempts

    def transfer_time(self, direction: str, nbytes: int) -> float:
        """Seconds from handing a frame of ``nbytes`` to the link until it is received."""
        if direction not in self._rng:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        p = self.profile
        serialization = nbytes * 8 / self._bits_per_s[direction]
        rng = self._rng[direction]
        with self._lock:
            lost = 0
            while p.loss and lost < p.max_retries and rng.random() < p.loss:
                lost += 1
            jitter = self._jitter(rng)
            self.messages[direction] += 1
            self.retransmissions[direction] += lost
            self.capped[direction] += int(p.loss > 0 and lost == p.max_retries > 0)
        return lost * (serialization + p.rto_s) + serialization + p.rtt_ms / 2e3 + jitter

    def _jitter(self, rng: random.Random) -> float:
        j = self.profile.jitter_ms / 1e3
        if not j:
            return 0.0
        if self.profile.jitter == "uniform":
            return rng.uniform(0.0, j)
        return min(abs(rng.gauss(0.0, j)), 4 * j)

    def compute_delay(self, compute_s: float) -> float:
        """Extra seconds to wait after ``compute_s`` of device compute, to emulate a ``compute_slowdown`` device."""
        return compute_s * (self.profile.compute_slowdown - 1)

    def stats(self) -> dict[str, int]:
        """Counters for logging: ``{dir}.messages``, ``{dir}.retransmissions``, ``{dir}.capped``."""
        tables = {"messages": self.messages, "retransmissions": self.retransmissions, "capped": self.capped}
        return {f"{d}.{name}": table[d] for name, table in tables.items() for d in ("up", "down")}


_SPIN_S = 2e-4  # time.sleep overshoots by ~50-100 µs on Linux; the last 0.2 ms are spun


def sleep_until(deadline: float) -> None:
    """Blocks until ``time.perf_counter() >= deadline``, to ~0.1 ms. Sleeps, then spins the last 0.2 ms
    yielding the GIL (``sleep(0)``) so other threads keep running."""
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        time.sleep(0)
