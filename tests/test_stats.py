"""experiments/stats.py against scipy.stats (a test oracle only), hand-computed cases and simulations with known
parameters."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import stats  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 3, 7, 30])
def test_student_t_matches_scipy(df):
    for x in (-12.0, -2.5, -0.3, 0.0, 0.7, 1.9, 4.0):
        assert stats.t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), abs=1e-7)
    for q in (0.8, 0.975):
        assert stats.t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), abs=1e-6)


def test_seeds_needed_is_the_protocol_table():
    """docs/blockwise.md's table (delta 0.10, 64 prompts), which the approximate rule with scipy's quantiles gives
    too: the fewest S with delta / se >= t_0.975 + t_0.80 (S - 1 degrees of freedom)."""
    table = {(0.03, 0.30): 7, (0.05, 0.30): 8, (0.06, 0.40): 10, (0.08, 0.40): 12}
    for (sigma_s, p_d), seeds in table.items():
        assert stats.seeds_needed(sigma_s, p_d, 64) == seeds
        rule = next(s for s in range(2, 100) if 0.10 / stats.standard_error(sigma_s, p_d, s, 64)
                    >= scipy_stats.t.ppf(0.975, s - 1) + scipy_stats.t.ppf(0.80, s - 1))
        assert rule == seeds


def test_power_is_the_noncentral_t_power():
    """The t-test's power at a shift delta / se is the noncentral t's mass beyond the critical values."""
    for sigma_s, p_d, seeds in [(0.05, 0.3, 8), (0.1, 0.5, 4), (0.0, 0.2, 3), (0.01, 0.05, 2), (0.2, 0.6, 30)]:
        shift = 0.10 / stats.standard_error(sigma_s, p_d, seeds, 64)
        c = scipy_stats.t.ppf(0.975, seeds - 1)
        exact = scipy_stats.nct.sf(c, seeds - 1, shift) + scipy_stats.nct.cdf(-c, seeds - 1, shift)
        assert stats.power(sigma_s, p_d, seeds, 64) == pytest.approx(exact, abs=1e-6)
    # no discordant pair observed: the error is the least a true difference of 0.10 allows (a share 0.10 discordant)
    assert stats.standard_error(0.0, 0.0, 4, 64) == pytest.approx(((0.10 - 0.01) / (4 * 64)) ** 0.5)


def test_mcnemar_matches_scipy_binomtest():
    rng = np.random.default_rng(0)
    for n10, n01, same in [(18, 1, 30), (15, 0, 10), (5, 7, 40), (0, 0, 9), (3, 3, 0)]:
        a = np.array([1] * n10 + [0] * n01 + [1] * same, bool)
        b = np.array([0] * n10 + [1] * n01 + [1] * same, bool)
        order = rng.permutation(len(a))
        expected = 1.0 if n10 + n01 == 0 else scipy_stats.binomtest(n10, n10 + n01, 0.5).pvalue
        assert stats.mcnemar_p(a[order], b[order]) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_interval_on_known_cases():
    const = {s: np.full(64, 0.25) for s in range(5)}
    assert stats.bootstrap_interval(const, 2000) == pytest.approx((0.25, 0.25))
    # one seed: the mean of P independent +-1/0 differences, normal interval mean +- 1.96 sd / sqrt(P)
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], 4000, p=[0.2, 0.5, 0.3])
    low, high = stats.bootstrap_interval({0: d}, 4000)
    half = 1.96 * d.std() / np.sqrt(len(d))
    assert (low, high) == pytest.approx((d.mean() - half, d.mean() + half), abs=0.004)
    # images identical within a seed: only the seeds vary; the interval is the seed means' bootstrap
    means = rng.normal(0.1, 0.05, 40)
    low, high = stats.bootstrap_interval({s: np.full(16, m) for s, m in enumerate(means)}, 4000)
    half = 1.96 * means.std() / np.sqrt(len(means))
    assert (low, high) == pytest.approx((means.mean() - half, means.mean() + half), abs=0.004)


def simulated(sigma_s, p_d, delta, seeds, images, rng):
    """Paired 0/1 outcomes whose per-seed difference is N(delta, sigma_s) and whose discordant share is p_d."""
    a, b = {}, {}
    for s in range(seeds):
        d_s = rng.normal(delta, sigma_s)
        u = rng.random(images)
        up, down = u < (p_d + d_s) / 2, (u >= (p_d + d_s) / 2) & (u < p_d)  # a = 1, b = 0 / a = 0, b = 1
        same = rng.random(images) < 0.5
        a[s] = np.where(up, 1, np.where(down, 0, same)).astype(float)
        b[s] = np.where(up, 0, np.where(down, 1, same)).astype(float)
    return a, b


def test_variance_parts_recover_the_simulated_ones():
    a, b = simulated(0.05, 0.3, 0.1, 400, 64, np.random.default_rng(2))
    sigma_s, p_d = stats.variance_parts(stats.differences(a, b))
    assert sigma_s == pytest.approx(0.05, abs=0.012) and p_d == pytest.approx(0.3, abs=0.01)


def test_compare_reports_a_clear_effect_and_no_effect():
    rng = np.random.default_rng(3)
    a, b = simulated(0.02, 0.3, 0.15, 8, 64, rng)
    r = stats.compare(a, b, direction=+1, n_boot=2000)
    assert r["verdict"] == "holds" and r["low"] > 0 and r["seeds"] == 8 and len(r["mcnemar_p"]) == 8
    assert stats.compare(a, b, direction=-1, n_boot=2000)["verdict"] == "fails"
    a, b = simulated(0.02, 0.3, 0.0, 8, 64, rng)
    assert stats.compare(a, b, direction=+1, n_boot=2000)["verdict"] in ("fails", "inconclusive")


def test_a_verdict_is_printed_only_with_the_protocols_seeds():
    """8 seeds at sigma_s 0.02, p_d 0.3 have the power (the protocol's table: 7 needed at 0.03): the verdict stands;
    one seed, or 8 where the observed spread needs more, is 'not judged' with the numbers."""
    rng = np.random.default_rng(3)
    r = stats.compare(*simulated(0.02, 0.3, 0.15, 8, 64, rng), direction=+1, n_boot=2000)
    assert r["seeds_needed"] <= 8 and stats.judgement(r) == "holds"
    one = stats.compare(*simulated(0.02, 0.3, 0.15, 1, 64, rng), direction=+1, n_boot=2000)
    assert stats.judgement(one) == f"not judged: 1 of 8 seeds (interval alone: {one['verdict']})"
    wide = {**r, "seeds_needed": 12}
    assert stats.judgement(wide) == "not judged: 8 of 12 seeds (interval alone: holds)"
    assert stats.judgement({**r, "seeds_needed": None}) == "not judged: 8 of > 100 seeds (interval alone: holds)"


def test_verdicts_and_retention_by_hand():
    assert stats.verdict(0.02, 0.2, +1) == "holds"
    assert stats.verdict(-0.2, -0.02, -1) == "holds"
    assert stats.verdict(-0.2, -0.02, +1) == "fails"
    assert stats.verdict(-0.03, 0.06, +1) == "fails"  # excludes a difference of 0.10 in the paper's direction
    assert stats.verdict(-0.03, 0.15, +1) == "inconclusive"
    combined = {0: [1, 0, 1, 1], 1: [0, 0, 1, 0]}
    alone = {0: [1, 1, 0, 0], 1: [1, 1, 1, 1]}
    assert stats.retention(combined, alone) == pytest.approx((1 / 2 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="not paired"):
        stats.differences({0: [1, 0]}, {0: [1, 0, 1]})
