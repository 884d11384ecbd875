from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.copy.variants import (
    BENCH_BATCH,
    BENCH_MAX_SAMPLES,
    BetaPrior,
    Experiment,
    Variant,
    VariantStats,
    _exact_p_best,
    _monte_carlo,
    _unit,
    assign,
    bench_table,
    decide,
    fixed_horizon_samples,
    simulate,
    thompson_shares,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
USERS = [f"user-{i}" for i in range(10_000)]


def variants(*ids: str, weights: list[float] | None = None) -> list[Variant]:
    return [Variant(id=i, weight=w) for i, w in zip(ids, weights or [1.0] * len(ids), strict=True)]


def stats(*rows: tuple[str, int, int], conversions: list[int] | None = None) -> list[VariantStats]:
    conv = conversions or [0] * len(rows)
    return [
        VariantStats(variant=v, exposures=n, clicks=c, conversions=x) for (v, n, c), x in zip(rows, conv, strict=True)
    ]


# (ids, weights, mode, expected share per id): 10,000 users, every one in the test, within 3 points.
BALANCE_CASES = [
    (["a", "b"], None, "test_then_winner", [0.5, 0.5]),
    (["a", "b", "c"], None, "test_then_winner", [1 / 3] * 3),
    (["a", "b", "c"], [2.0, 1.0, 1.0], "test_then_winner", [0.5, 0.25, 0.25]),
    (["a", "b"], None, "bandit", [0.5, 0.5]),
    (["a", "b", "c"], None, "bandit", [1 / 3] * 3),
]


@pytest.mark.parametrize(("ids", "weights", "mode", "expected"), BALANCE_CASES)
def test_assignment_is_balanced(ids, weights, mode, expected) -> None:
    experiment = Experiment(mode=mode, test_share=1.0, fallback=ids[0])
    counts = Counter(assign("spring", u, variants(*ids, weights=weights), experiment) for u in USERS)
    for i, share in zip(ids, expected, strict=True):
        assert counts[i] / len(USERS) == pytest.approx(share, abs=0.03)


def test_assignment_is_stable_across_calls() -> None:
    vs, experiment = variants("a", "b", "c"), Experiment(fallback="a", test_share=0.5)
    first = [assign("spring", u, vs, experiment) for u in USERS[:500]]
    assert first == [assign("spring", u, vs, experiment) for u in USERS[:500]]
    # Another campaign reshuffles: the draw is per (campaign, user), not per user.
    assert first != [assign("autumn", u, vs, experiment) for u in USERS[:500]]


def test_hash_draw_is_pinned() -> None:
    # sha256-based, so these hold in every process and Python version; a change here reassigns live users.
    assert _unit("variant", "spring-sale", "user-1") == 0.3957327770089104
    assert _unit("test", "spring-sale", "user-1") == 0.1782615585904126


def test_assignment_is_stable_across_processes() -> None:
    code = (
        "import json, sys\n"
        "from streams.copy.variants import Experiment, Variant, assign\n"
        "vs = [Variant(id=i) for i in 'abc']\n"
        "e = Experiment(fallback='a', test_share=0.5)\n"
        "print(json.dumps([assign('spring', f'user-{i}', vs, e) for i in range(300)]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    vs, experiment = variants("a", "b", "c"), Experiment(fallback="a", test_share=0.5)
    assert json.loads(out.stdout) == [assign("spring", f"user-{i}", vs, experiment) for i in range(300)]


@pytest.mark.parametrize("test_share", [0.1, 0.2, 0.5])
def test_test_share_is_respected(test_share: float) -> None:
    experiment = Experiment(fallback="a", test_share=test_share)
    assigned = [assign("spring", u, variants("a", "b"), experiment) for u in USERS]
    assert sum(a is not None for a in assigned) / len(USERS) == pytest.approx(test_share, abs=0.02)


def test_waiting_users_get_the_winner_and_test_users_keep_their_variant() -> None:
    vs, experiment = variants("a", "b", "c"), Experiment(fallback="a")
    before = {u: assign("spring", u, vs, experiment) for u in USERS[:2000]}
    after = {u: assign("spring", u, vs, experiment, winner="c") for u in USERS[:2000]}
    waiting = [u for u, v in before.items() if v is None]
    tested = [u for u, v in before.items() if v is not None]
    assert waiting and tested
    assert all(after[u] == "c" for u in waiting)
    assert all(after[u] == before[u] for u in tested)
    assert {before[u] for u in tested} == {"a", "b", "c"}


def test_bandit_assignment_follows_the_shares() -> None:
    vs, experiment = variants("a", "b"), Experiment(mode="bandit", fallback="a")
    counts = Counter(assign("spring", u, vs, experiment, bandit_shares={"a": 0.8, "b": 0.2}) for u in USERS)
    assert counts["a"] / len(USERS) == pytest.approx(0.8, abs=0.03)
    # Same allocation, same answer; a declared winner takes everyone.
    assert assign("spring", "u1", vs, experiment, bandit_shares={"a": 0.8, "b": 0.2}) == assign(
        "spring", "u1", vs, experiment, bandit_shares={"a": 0.8, "b": 0.2}
    )
    assert {assign("spring", u, vs, experiment, winner="b") for u in USERS[:200]} == {"b"}


def test_thompson_shares_follow_p_best_and_respect_the_floor() -> None:
    close = stats(("a", 1000, 50), ("b", 1000, 55), ("c", 1000, 45))
    shares = thompson_shares(close, "ctr", floor=0.05)
    p = decide(close, Experiment(fallback="a")).probabilities
    assert sum(shares.values()) == pytest.approx(1.0)
    assert sorted(shares, key=shares.__getitem__) == sorted(p, key=p.__getitem__) == ["c", "a", "b"]
    lopsided = thompson_shares(stats(("a", 5000, 250), ("b", 5000, 500)), "ctr", floor=0.05)
    assert lopsided["a"] == pytest.approx(0.05, abs=1e-6)
    assert lopsided["b"] == pytest.approx(0.95, abs=1e-6)
    fresh = thompson_shares(stats(("a", 0, 0), ("b", 0, 0)), "ctr")
    assert fresh == pytest.approx({"a": 0.5, "b": 0.5})


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 1)), min_size=2, max_size=5),
    floor=st.floats(0, 0.2),
)
def test_thompson_shares_always_sum_to_one_above_the_floor(counts, floor) -> None:
    rows = [VariantStats(variant=f"v{i}", exposures=n, clicks=int(n * r)) for i, (n, r) in enumerate(counts)]
    shares = thompson_shares(rows, "ctr", draws=2000, floor=floor)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert min(shares.values()) >= floor - 1e-9


# (stats, metric, deadline passed, status, winner, reason contains)
DECIDE_CASES = [
    (stats(("a", 2000, 100), ("b", 2000, 200)), "ctr", False, "winner", "b", "threshold"),
    (stats(("a", 150, 5), ("b", 150, 30)), "ctr", False, "continue", None, "min_exposures"),
    (stats(("a", 2000, 100), ("b", 2000, 104)), "ctr", False, "continue", None, "threshold"),
    (stats(("a", 2000, 100), ("b", 2000, 104)), "ctr", True, "fallback", "a", "deadline"),
    (stats(("a", 150, 5), ("b", 150, 30)), "ctr", True, "fallback", "a", "min_exposures"),
    (stats(("a", 2000, 100), ("b", 2000, 200)), "ctr", True, "winner", "b", "threshold"),
    # Clicks favour a, conversions favour b: the metric decides which count counts.
    (stats(("a", 3000, 300), ("b", 3000, 150), conversions=[30, 90]), "cvr", False, "winner", "b", "cvr"),
    (stats(("a", 3000, 150), ("b", 3000, 150), ("c", 3000, 260)), "ctr", False, "winner", "c", "threshold"),
]


@pytest.mark.parametrize(("rows", "metric", "deadline", "status", "winner", "reason"), DECIDE_CASES)
def test_decide(rows, metric, deadline, status, winner, reason) -> None:
    experiment = Experiment(fallback="a", metric=metric)
    decision = decide(rows, experiment, deadline_passed=deadline)
    assert (decision.status, decision.winner) == (status, winner)
    assert reason in decision.reason
    assert decision.samples == sum(s.exposures for s in rows)
    assert sum(decision.probabilities.values()) == pytest.approx(1.0)
    if status == "winner":
        assert decision.probabilities[winner] >= experiment.threshold
        assert decision.expected_loss[winner] < min(v for k, v in decision.expected_loss.items() if k != winner)


def test_decide_is_reproducible() -> None:
    rows = stats(("a", 1500, 70), ("b", 1500, 80), ("c", 1500, 75))
    assert decide(rows, Experiment(fallback="a")) == decide(rows, Experiment(fallback="a"))


def test_exact_p_best_agrees_with_monte_carlo() -> None:
    successes = np.array([[0, 0], [3, 9], [100, 130], [2500, 2580], [30000, 30300], [9, 1]])
    exposures = np.array([[0, 0], [40, 40], [2000, 2100], [50000, 50000], [60000, 60000], [10, 10]])
    exact = _exact_p_best(successes, exposures)
    sampled, _ = _monte_carlo(successes, exposures, 100_000, np.random.default_rng(1))
    assert np.allclose(exact.sum(axis=1), 1.0)
    assert np.abs(exact - sampled).max() < 0.006  # ~4 standard errors of 100k draws


# (bad input, message)
INVALID_CASES = [
    (lambda: assign("c", "u", variants("a"), Experiment(fallback="a")), "2 to 5"),
    (lambda: assign("c", "u", variants(*"abcdef"), Experiment(fallback="a")), "2 to 5"),
    (lambda: assign("c", "u", variants("a", "b"), Experiment(fallback="z")), "fallback"),
    (lambda: assign("c", "u", variants("a", "a"), Experiment(fallback="a")), "distinct"),
    (lambda: assign("c", "u", variants("a", "b"), Experiment(fallback="a"), winner="z"), "winner"),
    (lambda: decide(stats(("a", 10, 1), ("b", 10, 1)), Experiment(fallback="c")), "fallback"),
    (lambda: VariantStats(variant="a", exposures=10, clicks=11), "exceed"),
    (lambda: thompson_shares(stats(("a", 1, 0), ("b", 1, 0)), "ctr", floor=0.6), "floor"),
]


@pytest.mark.parametrize(("call", "message"), INVALID_CASES)
def test_invalid_input_is_refused(call, message) -> None:
    with pytest.raises((ValueError, ValidationError), match=message):
        call()


@pytest.mark.parametrize(("p1", "p2", "n"), [(0.05, 0.055, 31234), (0.05, 0.065, 3780), (0.1, 0.12, 3841)])
def test_fixed_horizon_samples(p1: float, p2: float, n: int) -> None:
    assert fixed_horizon_samples(p1, p2) == n == fixed_horizon_samples(p2, p1)
    assert fixed_horizon_samples(p1, p1) is None


def test_default_rule_keeps_a_peeked_a_a_test_honest() -> None:
    result = simulate(
        [0.05, 0.05], Experiment(fallback="a"), trials=200, batch=BENCH_BATCH, max_samples=BENCH_MAX_SAMPLES, seed=1
    )
    assert result.false_winner_rate <= 0.05
    assert result.correct_winner_rate == 0
    assert result.fixed_horizon_samples is None
    assert result.mean_samples_to_decision > BENCH_MAX_SAMPLES * 0.9  # almost all run to the deadline


def test_a_naive_threshold_is_fooled_by_peeking() -> None:
    # Why the default is 0.999: "95 % sure", checked at every look, crowns a winner in most A/A tests.
    naive = Experiment(fallback="a", threshold=0.95, min_exposures=200)
    result = simulate([0.05, 0.05], naive, trials=200, batch=BENCH_BATCH, max_samples=BENCH_MAX_SAMPLES, seed=1)
    assert result.false_winner_rate > 0.3


def test_three_variant_a_a_test_stays_honest() -> None:
    result = simulate([0.05] * 3, Experiment(fallback="a"), trials=100, batch=1000, max_samples=30_000, seed=2)
    assert result.false_winner_rate <= 0.05


def test_a_b_test_finds_the_better_variant() -> None:
    result = simulate(
        [0.05, 0.055], Experiment(fallback="a"), trials=200, batch=BENCH_BATCH, max_samples=BENCH_MAX_SAMPLES, seed=3
    )
    assert result.correct_winner_rate > 0.6 > result.false_winner_rate
    assert result.fixed_horizon_samples == 31234
    assert result.correct_winner_rate + result.false_winner_rate + result.fallback_rate == pytest.approx(1.0)


def test_bench_table_rows() -> None:
    rows = bench_table(trials=40)
    assert [r["scenario"] for r in rows] == ["A/A 5%", "A/B +10% lift", "A/B +30% lift"]
    assert all(r["trials"] == 40 for r in rows)
    assert rows[0]["fixed-horizon samples"] is None and rows[0]["correct winner"] == 0
    assert rows[2]["correct winner"] > 0.9


# --- priors from the knowledge base -------------------------------------------------------------------------------


def _prior(rate: float, weight: int = 100) -> BetaPrior:
    return BetaPrior(alpha=1 + weight * rate, beta=1 + weight * (1 - rate))


def test_a_strong_prior_moves_early_traffic_and_washes_out() -> None:
    priors = {"a": _prior(0.08), "b": _prior(0.04)}  # similar copy: a's kind of copy clicked twice as often
    fresh = stats(("a", 0, 0), ("b", 0, 0))
    assert thompson_shares(fresh, "ctr") == pytest.approx({"a": 0.5, "b": 0.5})
    early = thompson_shares(fresh, "ctr", priors=priors)
    assert early["a"] > 0.8 and sum(early.values()) == pytest.approx(1.0)
    # Once b's own sends show it is the better copy, they outweigh the 100 pseudo-sends.
    later = stats(("a", 5000, 250), ("b", 5000, 330))
    assert thompson_shares(later, "ctr", priors=priors)["b"] > 0.9
    # Only the variants named get a prior; fractional alphas take the Monte Carlo path.
    partial = thompson_shares(stats(("a", 10, 1), ("b", 10, 1), ("c", 10, 1)), "ctr", priors={"c": _prior(0.5, 7)})
    assert max(partial, key=partial.__getitem__) == "c" and sum(partial.values()) == pytest.approx(1.0)


def test_exact_p_best_with_integer_priors_agrees_with_monte_carlo() -> None:
    successes, exposures = np.array([[3, 9], [40, 44]]), np.array([[40, 40], [1000, 1000]])
    prior_a, prior_b = np.array([[9, 1]]), np.array([[93, 1]])
    exact = _exact_p_best(successes, exposures, prior_a, prior_b)
    sampled, _ = _monte_carlo(successes, exposures, 100_000, np.random.default_rng(1), prior_a, prior_b)
    assert np.abs(exact - sampled).max() < 0.006


def test_priors_never_decide_a_winner() -> None:
    """A/A data at every look: a campaign whose variants carry a strong, misleading prior gets exactly the
    decisions of one without priors (the peeked A/A false-winner rate is decide()'s, measured above), while
    the bandit's shares do follow the prior."""
    import datetime as dt

    from schemas.config import Campaign
    from streams.experiments import evaluate

    def campaign(mode: str, with_priors: bool) -> Campaign:
        prior = {"prior": {"alpha": 31, "beta": 71}} if with_priors else {}
        return Campaign(
            id="aa", name="aa", trigger={"event_type": "t"}, channel="sms",
            variants=[{"id": "a", "template_id": "ta"}, {"id": "b", "template_id": "tb", **prior}],
            experiment={"mode": mode, "fallback": "a", "min_exposures": 100},
        )  # fmt: skip

    rng = np.random.default_rng(4)
    now = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    clicks = np.zeros(2, dtype=int)
    for look in range(1, 41):
        clicks += rng.binomial(250, 0.05, size=2)
        rows = stats(("a", look * 250, int(clicks[0])), ("b", look * 250, int(clicks[1])))
        for mode in ("test_then_winner", "bandit"):
            plain, plain_state = evaluate(campaign(mode, False), rows, now)
            primed, primed_state = evaluate(campaign(mode, True), rows, now)
            assert primed == plain
            if mode == "bandit" and plain.status == "continue":
                assert primed_state["shares"]["b"] >= plain_state["shares"]["b"]
    early, _ = evaluate(campaign("bandit", True), stats(("a", 0, 0), ("b", 0, 0)), now)
    assert early.status == "continue"
