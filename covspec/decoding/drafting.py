"""How many tokens the device drafts per round: the confidence stop and the cost-model controller.

Pure Python: no model, no I/O. ``covspec.runtime.pipeline`` feeds a :class:`DraftPolicy` its measurements and
asks it for block lengths; everything here is unit-testable on given numbers.

**Confidence.** The draft's confidence at a position is its top probability there: max_v q(v) when sampling (q
is the warped distribution the token is drawn from), and max_v softmax(logits)_v when greedy (q is one-hot then,
so the model's own temperature-1 distribution stands in). The top probability is cheap (no extra pass over the
vocabulary) and is what the edge's accept test rewards: a greedy draft is accepted when its argmax is the
target's, which a peaked draft gets right more often.

**Confidence stop.** Drafting stops after the token at block position i (0-based) when its confidence is below
the stop's threshold and the block already holds at least γ_min tokens; it always stops at the controller's γ (at
most γ_max). The unsure token is kept: it is the block's most likely rejection site, so an alternative branch is
rooted right there (see ``covspec.decoding.branching``).

With ``stop="cost"`` the threshold comes from the same cost model as γ (``stop="threshold"``, the default, keeps
τ). Drafting one more token after a token of confidence p costs one step c and adds about p·α expected committed
tokens to the round (the next token counts only if the unsure one is accepted, and is itself accepted with
probability α). Spent on the round as a whole, the same c buys R·c tokens at the controller's expected rate
R = R(γ*). So the unsure token ends the block only when

    p·α < R·c,   i.e.   p < τ_cost = R·c / α,

and the threshold applied is min(τ, τ_cost): τ caps it, and applies alone until α, c and L are measured. A long
wait L makes R small next to 1/c, so the block drafts through tokens it is unsure of: verifying them in this round
is worth more than the few steps they cost. A fast link or a slow draft raises τ_cost and the stop cuts blocks at
unsure tokens again. Measured in docs/drafting.md: longer accepted runs at 50–100 ms, no faster overall.

**Controller.** With per-token acceptance rate α, draft step time c, verify time v and round-trip time r, all
running estimates (exponential moving averages), and L = r + v the wait for a verdict, a block of γ drafts
commits on average

    E(γ) = 1 + α + ... + α^γ = (1 − α^(γ+1)) / (1 − α)            tokens per round (accepted + correction/bonus)

and takes

    T(γ) = γ·c + L                                                 without branching (the device idles for L)
    T(γ) = L + (1 − h)·γ·c + h·max(0, (γ+1)·c − L)                 with branching

where h = α^(γ+1) + (1 − α^(γ+1))·β is the chance that the next block starts from a branch drafted during the
wait (the main branch matches when all γ drafts are accepted and the bonus is the draft's own guess, ≈ α^(γ+1);
β is the measured rate at which an alternative branch matches when the main one does not). On such a hit the
main branch had L of drafting time, of which one step went to the bonus guess, so only what does not fit,
max(0, (γ+1)·c − L), is left to draft after the reply. The controller picks

    γ* = argmax over γ_min ≤ γ ≤ γ_max of R(γ) = E(γ) / T(γ)        (expected committed tokens per second)

Longer blocks as r grows: at the optimum E'(γ)/E(γ) = T'(γ)/T(γ). E is log-concave, so the left side falls with
γ; the right side is c/(γ·c + L) without branching (and at most that with it), which falls as L grows. A longer
wait therefore moves the optimum to longer blocks, and a higher α raises E'(γ)/E(γ) for every γ, which does too.
The device cannot tell network time from the edge's compute time (both elapse between sending a block and its
verdict), so the runtime measures L directly; the functions take r and v apart for clarity and add them. The
device's own per-round work that is neither drafting nor waiting (checking the verdict, the correction, encoding
the next frame) is a fixed cost per round too, measured apart and added to L.
"""

from __future__ import annotations

from dataclasses import dataclass

from covspec.config import DRAFT_POLICIES, DRAFT_STOPS
from covspec.decoding.analysis import expected_tokens_per_round


def round_time(
    gamma: int, alpha: float, draft_s: float, verify_s: float, rtt_s: float, branching: bool = False,
    alt_hit: float = 0.0,
) -> float:  # fmt: skip
    """Expected seconds per round T(γ) of the module docstring's cost model."""
    wait = rtt_s + verify_s
    if not branching:
        return gamma * draft_s + wait
    main_hit = min(max(alpha, 0.0), 1.0) ** (gamma + 1)
    hit = main_hit + (1 - main_hit) * alt_hit
    return wait + (1 - hit) * gamma * draft_s + hit * max(0.0, (gamma + 1) * draft_s - wait)


def throughput(
    gamma: int, alpha: float, draft_s: float, verify_s: float, rtt_s: float, branching: bool = False,
    alt_hit: float = 0.0,
) -> float:  # fmt: skip
    """Expected committed tokens per second R(γ) = E(γ) / T(γ)."""
    t = round_time(gamma, alpha, draft_s, verify_s, rtt_s, branching, alt_hit)
    return expected_tokens_per_round(min(max(alpha, 0.0), 1.0), gamma) / max(t, 1e-12)


def choose_block_length(
    alpha: float, draft_s: float, verify_s: float, rtt_s: float, gamma_min: int, gamma_max: int,
    branching: bool = False, alt_hit: float = 0.0,
) -> int:  # fmt: skip
    """γ* in [gamma_min, gamma_max] maximizing :func:`throughput` (the shortest one on ties)."""
    best, best_rate = gamma_min, -1.0
    for gamma in range(gamma_min, gamma_max + 1):
        rate = throughput(gamma, alpha, draft_s, verify_s, rtt_s, branching, alt_hit)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = gamma, rate
    return best


def stop_threshold(
    gamma: int, alpha: float, draft_s: float, wait_s: float, branching: bool = False, alt_hit: float = 0.0
) -> float:
    """τ_cost = R(γ)·c / α (module docstring): below this confidence, one more draft step adds fewer expected
    tokens (p·α) than the round's rate pays for its time (R·c). In [0, 1]; 1 when α is 0."""
    if alpha <= 0:
        return 1.0
    rate = throughput(gamma, alpha, draft_s, 0.0, wait_s, branching, alt_hit)
    return min(1.0, rate * draft_s / alpha)


class _Ema:
    """Exponential moving average; the first observation sets it."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.value: float | None = None

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x


@dataclass
class Estimates:
    """The controller's running estimates (None until measured)."""

    alpha: float | None
    draft_s: float | None
    wait_s: float | None  # rtt + verify: from sending a block to its verdict
    alt_hit: float | None
    overhead_s: float | None = None  # per-round device time that is neither drafting nor waiting


class DraftPolicy:
    """Block length and confidence stop for one request.

    Args:
        policy: ``fixed`` (always ``gamma`` tokens, no confidence stop) or ``adaptive``.
        gamma: the fixed length, and the adaptive policy's length before anything is measured.
        gamma_min, gamma_max: bounds of the adaptive length.
        threshold: τ of the confidence stop (adaptive only): the threshold with ``stop="threshold"``, its cap with
            ``stop="cost"``.
        branching: whether the device drafts branches while a block is verified (changes the round time model).
        decay: weight of the past in every moving average.
        stop: ``threshold`` (τ) or ``cost`` (min(τ, R·c/α), module docstring).
    """

    def __init__(
        self, policy: str = "fixed", gamma: int = 5, gamma_min: int = 1, gamma_max: int = 24, threshold: float = 0.4,
        branching: bool = False, decay: float = 0.8, stop: str = "threshold",
    ) -> None:  # fmt: skip
        if policy not in DRAFT_POLICIES:
            raise ValueError(f"drafting.policy must be one of {', '.join(DRAFT_POLICIES)}, got {policy!r}")
        if stop not in DRAFT_STOPS:
            raise ValueError(f"drafting.stop must be one of {', '.join(DRAFT_STOPS)}, got {stop!r}")
        if not 1 <= gamma_min <= gamma_max:
            raise ValueError(f"need 1 <= gamma_min <= gamma_max, got {gamma_min}, {gamma_max}")
        self.adaptive = policy == "adaptive"
        self.gamma = gamma if not self.adaptive else min(max(gamma, gamma_min), gamma_max)
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.threshold = threshold
        self.stop = stop
        self.stop_threshold = threshold
        """The confidence stop's threshold for the current round (set with its γ by ``start_round``)."""
        self.branching = branching
        self._accepted = _Ema(decay)  # accepted drafts per round
        self._trials = _Ema(decay)  # accepted drafts + 1 if the round had a rejection
        self._draft_s = _Ema(decay)
        self._wait_s = _Ema(decay)
        self._overhead_s = _Ema(decay)
        self._alt_hit = _Ema(decay)

    # -- measurements ----------------------------------------------------------------------------

    def observe_step(self, seconds: float) -> None:
        """One draft forward took ``seconds`` (device compute, slow-down included)."""
        self._draft_s.update(seconds)

    def observe_round(self, drafted: int, accepted: int, wait_s: float, unsure_last: bool = False) -> None:
        """A verdict: ``accepted`` of ``drafted`` tokens, ``wait_s`` after the block was sent.

        α is estimated as accepted / (accepted + rejections): the maximum-likelihood rate of i.i.d. acceptances
        observed until the first rejection or the end of the block. ``unsure_last``: the block ended at the
        confidence stop. A rejection of exactly that last token is not counted: α is the acceptance rate of the
        confident drafts that γ bounds, while the unsure ones end blocks through the stop whatever γ is (counting
        their rejections made the controller choose blocks shorter than the confident runs).
        """
        censored = unsure_last and accepted == drafted - 1
        self._accepted.update(accepted)
        self._trials.update(accepted + (accepted < drafted and not censored))
        self._wait_s.update(wait_s)

    def observe_overhead(self, seconds: float) -> None:
        """Device time of one round spent neither drafting nor waiting (bookkeeping, encoding, correction)."""
        self._overhead_s.update(max(seconds, 0.0))

    def observe_alternatives(self, hit: bool) -> None:
        """The main branch missed and alternative branches existed: did one of them match?"""
        self._alt_hit.update(float(hit))

    @property
    def estimates(self) -> Estimates:
        trials = self._trials.value
        alpha = None if not trials else self._accepted.value / trials
        return Estimates(alpha, self._draft_s.value, self._wait_s.value, self._alt_hit.value, self._overhead_s.value)

    # -- decisions -------------------------------------------------------------------------------

    def block_length(self) -> int:
        """γ for the next block: fixed, or the controller's choice once α, c and L are measured. No side effects
        (branching asks it to size the block it drafts during a wait)."""
        return self._plan()[0]

    def start_round(self) -> int:
        """γ for the block the device drafts now; also fixes the round's ``stop_threshold``."""
        gamma, self.stop_threshold = self._plan()
        return gamma

    def _plan(self) -> tuple[int, float]:
        """(γ, confidence-stop threshold) from the current estimates."""
        if not self.adaptive:
            return self.gamma, self.threshold
        e = self.estimates
        if e.alpha is None or e.draft_s is None or e.wait_s is None:
            return self.gamma, self.threshold
        # The fixed per-round costs (the wait and the device's own bookkeeping) enter the model as one L.
        wait = e.wait_s + (e.overhead_s or 0.0)
        alt_hit = e.alt_hit or 0.0
        gamma = choose_block_length(e.alpha, e.draft_s, 0.0, wait, self.gamma_min, self.gamma_max, self.branching,
                                    alt_hit)  # fmt: skip
        if self.stop == "threshold":
            return gamma, self.threshold
        return gamma, min(self.threshold, stop_threshold(gamma, e.alpha, e.draft_s, wait, self.branching, alt_hit))

    def alternative_pays(self, win: float, steps: int) -> bool:
        """Token trees: whether to draft an alternative branch before the block is sent.

        ``win`` is the draft's own estimate that the accepted path goes through the alternative (``Branch.score``:
        the chance of reaching its root times the probability of its token), ``steps`` the draft steps it costs
        (its token and continuation). If it wins, the round commits what would otherwise take another round, so
        it saves about one wait L; it always costs ``steps``·c before the send. Drafted when win·L > steps·c; with
        the fixed policy always; never before L and c are measured (the first round of a device's first request)."""
        if not self.adaptive:
            return True
        e = self.estimates
        if e.draft_s is None or e.wait_s is None:
            return False
        return win * (e.wait_s + (e.overhead_s or 0.0)) > steps * e.draft_s

    def stop_after(self, index: int, confidence: float) -> bool:
        """Confidence stop: end the block after position ``index`` (0-based) drafted with ``confidence``."""
        return self.adaptive and index + 1 >= self.gamma_min and confidence < self.stop_threshold
