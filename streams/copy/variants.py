"""A/B tests of a campaign's copy: who sees which variant, when a variant has won, and how often
that stopping rule is fooled (a vectorised simulation with known true rates). Pure logic, no I/O.
"""

from __future__ import annotations

import hashlib
import time
from bisect import bisect_right
from itertools import accumulate
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_VARIANTS = 2
MAX_VARIANTS = 5

Metric = Literal["ctr", "cvr"]


class BetaPrior(BaseModel):
    """What a variant's rate is believed to be before its own sends: Beta(alpha, beta), i.e. about
    alpha - 1 successes in alpha + beta - 2 pseudo-exposures (connectors.knowledge.prior_for derives
    one from similar copy). Beta(1, 1), no belief, is what a variant without a prior gets."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(default=1.0, gt=0)
    beta: float = Field(default=1.0, gt=0)


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    # Relative share of the test audience; the copy itself lives with the template.
    weight: float = Field(default=1.0, gt=0)


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["test_then_winner", "bandit"] = "test_then_winner"
    metric: Metric = "ctr"
    # test_then_winner: share of the audience in the test, split between the variants; the rest waits for the winner.
    test_share: float = Field(default=0.2, gt=0, le=1)
    # Posterior probability of being best needed to declare a winner. It is checked at every look, and each look
    # is a chance to be fooled: at 0.95 about 60 % of A/A tests over a 60k horizon end with a "winner"; 0.999 keeps
    # that under 5 % even when looked at every 100 exposures (bench_table and the module's tests measure it).
    threshold: float = Field(default=0.999, gt=0.5, lt=1)
    # Per variant before any decision: the earliest looks are the noisiest.
    min_exposures: int = Field(default=1000, ge=1)
    # Variant used when the deadline passes without a winner.
    fallback: str = Field(min_length=1)


class VariantStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str
    exposures: int = Field(ge=0)
    clicks: int = Field(default=0, ge=0)
    conversions: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _within_exposures(self) -> VariantStats:
        # Beta(1 + successes, 1 + exposures - successes) needs a non-negative failure count.
        if self.clicks > self.exposures or self.conversions > self.exposures:
            raise ValueError(f"variant {self.variant}: clicks and conversions cannot exceed exposures")
        return self

    def successes(self, metric: Metric) -> int:
        return self.clicks if metric == "ctr" else self.conversions


class Decision(BaseModel):
    status: Literal["continue", "winner", "fallback"]
    winner: str | None
    probabilities: dict[str, float]  # P(variant is best)
    # Expected shortfall of the metric if this variant were chosen: E[max_j rate_j - rate_i] under the posterior.
    expected_loss: dict[str, float] = Field(default_factory=dict)
    reason: str
    samples: int  # total exposures considered


class SimulationResult(BaseModel):
    true_rates: list[float]
    trials: int
    correct_winner_rate: float  # the truly best variant declared
    false_winner_rate: float  # a variant declared that is not truly best; with equal rates, any winner
    fallback_rate: float  # no winner by max_samples
    mean_samples_to_decision: float  # exposures per variant at the stop (a winner, or max_samples for a fallback)
    fixed_horizon_samples: int | None  # per variant, two-sided z-test alpha 0.05 power 0.8; None when rates are equal
    seconds: float


def check_variants(variant_ids: list[str], experiment: Experiment) -> None:
    """2..5 distinct variants, the fallback among them."""
    if not MIN_VARIANTS <= len(variant_ids) <= MAX_VARIANTS:
        raise ValueError(f"an experiment needs {MIN_VARIANTS} to {MAX_VARIANTS} variants, got {len(variant_ids)}")
    if len(set(variant_ids)) != len(variant_ids):
        raise ValueError(f"variant ids must be distinct: {variant_ids}")
    if experiment.fallback not in variant_ids:
        raise ValueError(f"fallback {experiment.fallback!r} is not one of the variants {variant_ids}")


# --- assignment -------------------------------------------------------------------------------------------------


def _unit(salt: str, campaign_id: str, user_id: str) -> float:
    """A uniform draw in [0, 1) fixed by (salt, campaign, user): sha256 is the same in every process and version."""
    digest = hashlib.sha256(f"{salt}\x00{campaign_id}\x00{user_id}".encode()).digest()
    # 53 bits: every value is an exact double, so the draw is bit-identical everywhere.
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def _pick(u: float, ids: list[str], weights: list[float]) -> str:
    total = sum(weights)
    bounds = list(accumulate(w / total for w in weights))
    return ids[min(bisect_right(bounds, u), len(ids) - 1)]  # min(): rounding may leave the last bound below 1


def assign(
    campaign_id: str,
    user_id: str,
    variants: list[Variant],
    experiment: Experiment,
    *,
    winner: str | None = None,
    bandit_shares: dict[str, float] | None = None,
) -> str | None:
    """The variant this user gets, or None while the user waits for a winner (test_then_winner, outside the test).

    Membership of the test and the variant use separate hash draws, so the split inside the test does not
    depend on the test share. Bandit mode reuses the variant draw against the current allocation: stable for a
    given allocation, and a user moves only when the allocation moves past their draw. Once a bandit has a
    winner, everyone gets it.
    """
    ids = [v.id for v in variants]
    check_variants(ids, experiment)
    if winner is not None and winner not in ids:
        raise ValueError(f"winner {winner!r} is not one of the variants {ids}")
    draw = _unit("variant", campaign_id, user_id)
    if experiment.mode == "bandit":
        if winner is not None:
            return winner
        shares = [max(0.0, (bandit_shares or {}).get(i, 0.0)) for i in ids]
        if sum(shares) <= 0:  # no allocation yet: the configured split
            shares = [v.weight for v in variants]
        return _pick(draw, ids, shares)
    if _unit("test", campaign_id, user_id) < experiment.test_share:
        # Test users keep their variant after the decision so their experience (and the stats) stay consistent.
        return _pick(draw, ids, [v.weight for v in variants])
    return winner


# --- posterior ----------------------------------------------------------------------------------------------------


def _lgamma(x: np.ndarray) -> np.ndarray:
    """log Gamma for x >= 1, vectorised: Stirling's series from 8 up (error < 1e-11), shifted below 8."""
    x = np.asarray(x, dtype=float)
    small = x < 8
    y = np.where(small, x + 8, x)
    series = 1 / (12 * y) - 1 / (360 * y**3) + 1 / (1260 * y**5) - 1 / (1680 * y**7)
    out = (y - 0.5) * np.log(y) - y + 0.5 * np.log(2 * np.pi) + series
    # lgamma(x) = lgamma(x + 8) - log(x (x + 1) ... (x + 7))
    shift = np.log(np.prod(x[..., None] + np.arange(8), axis=-1))
    return np.where(small, out - shift, out)


def _p_second_beats_first(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """P(theta2 > theta1) for theta_j ~ Beta(a_j, b_j) with integer a2, exactly (Evan Miller's sum):

        sum_{i < a2} B(a1 + i, b1 + b2) / ((b2 + i) B(1 + i, b2) B(a1, b1))

    computed as a first term times a running product of term ratios, row by row, a2 terms per row.
    """
    p = np.zeros(len(a1))
    if len(a1) == 0:
        return p
    chunk = max(1, 4_000_000 // max(1, int(a2.max())))  # rows x terms stays around 32 MB
    for start in range(0, len(a1), chunk):
        sl = slice(start, start + chunk)
        x1, y1, x2, y2 = (v[sl, None].astype(float) for v in (a1, b1, a2, b2))
        i = np.arange(int(x2.max()))[None, :]
        log_first = _lgamma(y1 + y2) - _lgamma(x1 + y1 + y2) - _lgamma(y1) + _lgamma(x1 + y1)
        log_ratio = np.log(x1 + i) - np.log(x1 + y1 + y2 + i) + np.log(y2 + i) - np.log(1 + i)
        log_terms = log_first + np.cumsum(log_ratio, axis=1) - log_ratio
        p[sl] = np.where(i < x2, np.exp(log_terms), 0.0).sum(axis=1)
    return np.clip(p, 0.0, 1.0)


def _exact_p_best(
    successes: np.ndarray, exposures: np.ndarray, prior_a: np.ndarray | float = 1, prior_b: np.ndarray | float = 1
) -> np.ndarray:
    """P(best) for two variants, exactly: the sum needs an integer alpha for the variant put second, which
    Beta(1 + s, 1 + n - s) always has (a prior with fractional alpha goes to Monte Carlo instead)."""
    a, b = prior_a + successes, prior_b + exposures - successes
    # The sum runs over the second variant's successes: put the variant with fewer of them second.
    swap = a[:, 1] > a[:, 0]
    first, second = np.where(swap, 1, 0), np.where(swap, 0, 1)
    rows = np.arange(len(a))
    q = _p_second_beats_first(a[rows, first], b[rows, first], a[rows, second], b[rows, second])
    p = np.empty(a.shape)
    p[rows, second] = q
    p[rows, first] = 1 - q
    return p


def _monte_carlo(
    successes: np.ndarray,
    exposures: np.ndarray,
    draws: int,
    rng: np.random.Generator,
    prior_a: np.ndarray | float = 1,
    prior_b: np.ndarray | float = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """P(best) and expected loss per row of (rows, k) counts, Beta(1, 1) priors unless given, by Monte Carlo.

    Rows are chunked so the (rows, k, draws) sample array stays around 32 MB.
    """
    rows, k = successes.shape
    p_best = np.zeros((rows, k))
    loss = np.zeros((rows, k))
    chunk = max(1, 4_000_000 // (k * draws))
    a0 = np.broadcast_to(np.asarray(prior_a, dtype=float), (rows, k))[..., None]
    b0 = np.broadcast_to(np.asarray(prior_b, dtype=float), (rows, k))[..., None]
    for start in range(0, rows, chunk):
        s = successes[start : start + chunk, :, None].astype(float)
        n = exposures[start : start + chunk, :, None].astype(float)
        a, b = a0[start : start + chunk], b0[start : start + chunk]
        theta = rng.beta(a + s, b + n - s, size=(s.shape[0], k, draws))
        best = theta.argmax(axis=1)
        p_best[start : start + chunk] = (best[:, None, :] == np.arange(k)[None, :, None]).mean(axis=2)
        loss[start : start + chunk] = (theta.max(axis=1, keepdims=True) - theta).mean(axis=2)
    return p_best, loss


def _posterior(
    successes: np.ndarray,
    exposures: np.ndarray,
    draws: int,
    rng: np.random.Generator,
    *,
    loss: bool = True,
    prior_a: np.ndarray | float = 1,
    prior_b: np.ndarray | float = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """P(best) (exact for two variants with integer alphas, Monte Carlo otherwise) and, if asked, the Monte Carlo
    expected loss."""
    exact = successes.shape[1] == 2 and bool(np.all(np.mod(prior_a, 1) == 0))
    if exact and not loss:
        return _exact_p_best(successes, exposures, prior_a, prior_b), None
    p, expected_loss = _monte_carlo(successes, exposures, draws, rng, prior_a, prior_b)
    if exact:
        p = _exact_p_best(successes, exposures, prior_a, prior_b)
    return p, expected_loss


def _counts(stats: list[VariantStats], metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    successes = np.array([[s.successes(metric) for s in stats]], dtype=np.int64)
    exposures = np.array([[s.exposures for s in stats]], dtype=np.int64)
    return successes, exposures


def decide(
    stats: list[VariantStats],
    experiment: Experiment,
    *,
    deadline_passed: bool = False,
    draws: int = 20000,
    seed: int = 0,
) -> Decision:
    """Winner when every variant has min_exposures and one has P(best) >= threshold; after the deadline, the
    fallback unless that holds. P(best) is exact for two variants and seeded Monte Carlo for more, and the
    expected loss is seeded Monte Carlo: the same stats always give the same decision."""
    ids = [s.variant for s in stats]
    check_variants(ids, experiment)
    successes, exposures = _counts(stats, experiment.metric)
    p, loss = _posterior(successes, exposures, draws, np.random.default_rng(seed))
    probabilities = {i: float(x) for i, x in zip(ids, p[0], strict=True)}
    expected_loss = {i: float(x) for i, x in zip(ids, loss[0], strict=True)}
    samples = int(exposures.sum())
    leader = max(probabilities, key=probabilities.__getitem__)
    fewest = min(stats, key=lambda s: s.exposures)
    best = f"{leader} leads with P(best) {probabilities[leader]:.4f}"
    if fewest.exposures < experiment.min_exposures:
        why = f"{fewest.variant} has {fewest.exposures} of min_exposures {experiment.min_exposures} per variant"
    elif probabilities[leader] < experiment.threshold:
        why = f"{best} < threshold {experiment.threshold}"
    else:
        reason = (
            f"{best} >= threshold {experiment.threshold} on {experiment.metric} after {samples} exposures"
            f" (expected loss {expected_loss[leader]:.5f})"
        )
        return Decision(
            status="winner",
            winner=leader,
            probabilities=probabilities,
            expected_loss=expected_loss,
            reason=reason,
            samples=samples,
        )
    if deadline_passed:
        return Decision(
            status="fallback",
            winner=experiment.fallback,
            probabilities=probabilities,
            expected_loss=expected_loss,
            reason=f"deadline passed without a winner ({why}): fallback {experiment.fallback}",
            samples=samples,
        )
    return Decision(
        status="continue",
        winner=None,
        probabilities=probabilities,
        expected_loss=expected_loss,
        reason=f"no winner yet: {why}",
        samples=samples,
    )


def thompson_shares(
    stats: list[VariantStats],
    metric: Metric,
    *,
    draws: int = 20000,
    seed: int = 0,
    floor: float = 0.05,
    priors: dict[str, BetaPrior] | None = None,
) -> dict[str, float]:
    """Traffic per variant: floor + (1 - k * floor) * P(best), so every variant keeps at least `floor`
    (no variant starves of the data that could change its estimate) and the shares sum to 1.

    `priors` (by variant; Beta(1, 1) for the others) shape only this allocation: a variant that similar copy
    says is strong gets more early traffic, and its own sends soon outweigh the capped pseudo-count.
    decide() keeps flat priors, because its 0.999 threshold is calibrated for them: a prior there would
    let a belief, not the test's data, declare a winner (tests check A/A stays honest)."""
    ids = [s.variant for s in stats]
    if not MIN_VARIANTS <= len(ids) <= MAX_VARIANTS or len(set(ids)) != len(ids):
        raise ValueError(f"a bandit needs {MIN_VARIANTS} to {MAX_VARIANTS} distinct variants, got {ids}")
    if not 0 <= floor * len(ids) <= 1:
        raise ValueError(f"floor {floor} times {len(ids)} variants must lie in [0, 1]")
    successes, exposures = _counts(stats, metric)
    chosen = [(priors or {}).get(i) or BetaPrior() for i in ids]
    prior_a = np.array([[prior.alpha for prior in chosen]])
    prior_b = np.array([[prior.beta for prior in chosen]])
    rng = np.random.default_rng(seed)
    p, _ = _posterior(successes, exposures, draws, rng, loss=False, prior_a=prior_a, prior_b=prior_b)
    shares = floor + (1 - floor * len(ids)) * p[0]
    return {i: float(x) for i, x in zip(ids, shares / shares.sum(), strict=True)}


# --- simulation ---------------------------------------------------------------------------------------------------


def fixed_horizon_samples(p1: float, p2: float, *, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Per-variant sample size of a two-sided two-proportion z-test; None when there is no effect to detect."""
    if p1 == p2:
        return None
    z = NormalDist()
    za, zb = z.inv_cdf(1 - alpha / 2), z.inv_cdf(power)
    pooled = (p1 + p2) / 2
    root = za * (2 * pooled * (1 - pooled)) ** 0.5 + zb * (p1 * (1 - p1) + p2 * (1 - p2)) ** 0.5
    return int(np.ceil(root**2 / (p1 - p2) ** 2))


SCREEN_DRAWS = 2000


def _screen(successes: np.ndarray, n: int, threshold: float) -> np.ndarray:
    """Rows whose leader could plausibly reach the threshold, by a normal approximation of the Beta posteriors.

    Monte Carlo on every row at every look is what makes a naive simulation slow; the 1-sigma margin in z
    keeps rows the approximation misjudges (skewed posteriors at low counts) in the exact check.
    """
    a, b = 1 + successes, 1 + n - successes
    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    lead = mean.argmax(axis=1)
    rows = np.arange(len(mean))
    diff = mean[rows, lead][:, None] - mean
    sd = np.sqrt(var[rows, lead][:, None] + var)
    diff[rows, lead] = np.inf  # the leader against itself
    z_min = (diff / sd).min(axis=1)
    return z_min >= NormalDist().inv_cdf(threshold) - 1.0


def simulate(
    true_rates: list[float],
    experiment: Experiment,
    *,
    trials: int,
    batch: int,
    max_samples: int,
    seed: int,
    draws: int = 20000,
) -> SimulationResult:
    """`trials` experiments with known rates, looked at after every `batch` exposures per variant (continuous
    peeking), each stopping at its first winner or at max_samples (fallback). All trials advance together.

    Each look applies decide()'s rule, but only to the rows that could pass a normal-approximation screen.
    Two variants use the exact P(best), as decide() does; three or more take a cheap Monte Carlo pass first and
    then `draws` draws near the threshold. Fewer draws would not do: Monte Carlo noise alone crosses a 0.999
    threshold now and then, and over a hundred looks that shows in the false-winner rate.
    """
    started = time.perf_counter()
    k = len(true_rates)
    if not MIN_VARIANTS <= k <= MAX_VARIANTS:
        raise ValueError(f"simulate {MIN_VARIANTS} to {MAX_VARIANTS} variants, got {k}")
    if batch < 1 or max_samples < 1 or trials < 1:
        raise ValueError("trials, batch and max_samples must be positive")
    rates = np.asarray(true_rates, dtype=float)
    rng = np.random.default_rng(seed)
    threshold = experiment.threshold
    # A row whose cheap estimate is this far below the threshold is > 5 standard errors away from passing.
    margin = max(0.01, 5 * (threshold * (1 - threshold) / SCREEN_DRAWS) ** 0.5)
    successes = np.zeros((trials, k), dtype=np.int64)
    winner = np.full(trials, -1)
    stopped_at = np.full(trials, max_samples)
    active = np.ones(trials, dtype=bool)
    looks = list(range(batch, max_samples, batch)) + [max_samples]
    n = 0
    for look in looks:
        live = np.flatnonzero(active)
        successes[live] += rng.binomial(look - n, rates, size=(len(live), k))
        n = look
        if n < experiment.min_exposures:
            continue
        rows = live[_screen(successes[live], n, threshold)]
        if len(rows) and k > 2:
            rough, _ = _monte_carlo(successes[rows], np.full((len(rows), k), n), min(draws, SCREEN_DRAWS), rng)
            rows = rows[rough.max(axis=1) >= threshold - margin]
        if len(rows) == 0:
            continue
        p, _ = _posterior(successes[rows], np.full((len(rows), k), n), draws, rng, loss=False)
        won = p.max(axis=1) >= threshold
        winner[rows[won]] = p[won].argmax(axis=1)
        stopped_at[rows[won]] = n
        active[rows[won]] = False
        if not active.any():
            break
    all_equal = bool(np.all(rates == rates[0]))
    truly_best = np.flatnonzero(rates == rates.max())
    declared = winner >= 0
    correct = declared & np.isin(winner, truly_best) & (not all_equal)
    ranked = sorted(set(true_rates), reverse=True)
    return SimulationResult(
        true_rates=list(true_rates),
        trials=trials,
        correct_winner_rate=float(correct.mean()),
        false_winner_rate=float((declared & ~correct).mean()),
        fallback_rate=float((~declared).mean()),
        mean_samples_to_decision=float(stopped_at.mean()),
        fixed_horizon_samples=None if all_equal else fixed_horizon_samples(ranked[1], ranked[0]),
        seconds=round(time.perf_counter() - started, 2),
    )


# The standard set behind `loopcast bench ab`: 5 % base CTR, looked at every 500 exposures per variant up to
# 60,000 per variant (about twice what a fixed-horizon test needs for a 10 % relative lift), i.e. 120 looks.
BENCH_BASE_RATE = 0.05
BENCH_BATCH = 500
BENCH_MAX_SAMPLES = 60_000
BENCH_SCENARIOS: list[tuple[str, list[float]]] = [
    ("A/A 5%", [BENCH_BASE_RATE, BENCH_BASE_RATE]),
    ("A/B +10% lift", [BENCH_BASE_RATE, BENCH_BASE_RATE * 1.1]),
    ("A/B +30% lift", [BENCH_BASE_RATE, BENCH_BASE_RATE * 1.3]),
]


def bench_table(
    trials: int = 1000,
    *,
    experiment: Experiment | None = None,
    batch: int = BENCH_BATCH,
    max_samples: int = BENCH_MAX_SAMPLES,
    seed: int = 0,
) -> list[dict[str, object]]:
    """One row per standard scenario, ready for a rich table; sample counts are per variant."""
    experiment = experiment or Experiment(fallback="a")
    rows: list[dict[str, object]] = []
    for i, (scenario, rates) in enumerate(BENCH_SCENARIOS):
        r = simulate(rates, experiment, trials=trials, batch=batch, max_samples=max_samples, seed=seed + i)
        rows.append(
            {
                "scenario": scenario,
                "trials": r.trials,
                "correct winner": r.correct_winner_rate,
                "false winner": r.false_winner_rate,
                "fallback": r.fallback_rate,
                "mean samples to decision": round(r.mean_samples_to_decision),
                "fixed-horizon samples": r.fixed_horizon_samples,
                "seconds": r.seconds,
            }
        )
    return rows
