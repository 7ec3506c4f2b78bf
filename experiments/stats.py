"""The statistics of docs/blockwise.md's protocol: paired comparisons of two settings, clustered by training seed.

Within a seed, two settings render the same prompts with the same noise, so an outcome (1 = the judge read it, e.g.
"both") comes in pairs, one per image; the difference of the two settings is taken image by image. Seeds are
independent clusters (each with its own adapters and its own prompts), images within a seed are not independent of
each other's seed effect. Everything here takes {seed: per-image values} for each setting.

    mean difference   the mean over seeds of each seed's mean difference (every seed weighs the same)
    interval          a two-stage paired bootstrap: seeds drawn with replacement, then images within each drawn seed
    McNemar           exact two-sided test on one seed's discordant pairs (a check of the bootstrap, seed by seed)
    sigma_s, p_d      the seed-to-seed standard deviation of the difference beyond image sampling, and the share of
                      discordant pairs: with S seeds of P images, var(mean) = sigma_s^2 / S + (p_d - delta^2) / (S P)
    power             of a t-test over seed means (S - 1 degrees of freedom, two-sided 5 %) to see a difference delta
    verdict           holds: the interval excludes 0 in the paper's direction; fails: it excludes 0 the other way, or
                      excludes differences >= delta in the paper's direction; inconclusive otherwise

No scipy: Student's t and the test's power are integrated numerically (tests check them against scipy.stats).
"""
import functools
import math

import numpy as np


def differences(a, b):
    """{seed: a - b per image} of two settings scored on the same images (same seeds, same number of images)."""
    if a.keys() != b.keys():
        raise ValueError(f"the settings have different seeds: {sorted(a)} vs {sorted(b)}")
    out = {}
    for s in a:
        x, y = np.asarray(a[s], np.float64), np.asarray(b[s], np.float64)
        if x.shape != y.shape:
            raise ValueError(f"seed {s}: {x.shape} vs {y.shape} images: not paired")
        out[s] = x - y
    return out


def mean_difference(diffs):
    return float(np.mean([d.mean() for d in diffs.values()]))


def bootstrap_interval(diffs, n_boot=10_000, level=0.95, seed=0):
    """(low, high) of the mean difference: each replicate draws S seeds with replacement and, for each drawn seed,
    its P images with replacement (a seed drawn twice gets two independent image draws)."""
    d = np.stack(list(diffs.values()))  # (S, P): every seed has the same number of images
    S, P = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, (n_boot, S))
    replicate = np.zeros(n_boot)
    for j in range(S):  # slot j of every replicate: its seed's images, resampled
        images = rng.integers(0, P, (n_boot, P))
        replicate += d[seeds[:, j, None], images].mean(1)
    replicate /= S
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicate, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_p(a, b):
    """Exact two-sided McNemar p-value of paired 0/1 outcomes: the discordant pairs split as Binomial(n, 1/2)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n = n10 + n01
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n10, n01) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def variance_parts(diffs):
    """(sigma_s, p_d): the seed-level standard deviation of the difference (its spread over seeds beyond what P
    images explain; 0 when there is one seed or none to explain) and the share of discordant image pairs."""
    d = np.stack(list(diffs.values()))
    S, P = d.shape
    p_d = float(np.mean(d != 0))
    if S < 2:
        return 0.0, p_d
    within = (p_d - d.mean() ** 2) / P  # the variance of one seed's mean from its images alone
    return float(math.sqrt(max(0.0, d.mean(1).var(ddof=1) - within))), p_d


def t_cdf(x, df):
    """Student's t distribution function: 1/2 + the density's integral from 0 to x (Simpson's rule, 2000 steps)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    u = np.linspace(0.0, abs(x), 2001)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df))
    area = (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=None)
def t_quantile(q, df):
    """The x with t_cdf(x, df) = q, by bisection (to 1e-9); cached: reports ask for the same few quantiles often."""
    low, high = -1e3, 1e3
    while high - low > 1e-9:
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
    return (low + high) / 2


def standard_error(sigma_s, p_d, seeds, images, delta=0.10):
    """Of the mean difference under a true difference delta, which needs at least a share delta of discordant pairs
    (so an observed p_d below delta, even 0, still gives a positive error)."""
    return math.sqrt(sigma_s ** 2 / seeds + (max(p_d, delta) - delta ** 2) / (seeds * images))


def power(sigma_s, p_d, seeds, images, delta=0.10):
    """The chance that a two-sided 5 % t-test over `seeds` seed means sees a true difference `delta`: the noncentral
    t's mass beyond +-c, written as an integral over w = sqrt(chi-square_df) of the normal tails at (+-c w / sqrt(df)
    - shift) (Simpson's rule on the chi density)."""
    df = seeds - 1
    shift = delta / standard_error(sigma_s, p_d, seeds, images, delta)
    c = t_quantile(0.975, df)
    w = np.linspace(1e-12, math.sqrt(df) + 12.0, 4001)
    chi = np.exp((df - 1) * np.log(w) - w * w / 2 - (df / 2 - 1) * math.log(2) - math.lgamma(df / 2))
    normal_cdf = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2)))
    f = chi * (normal_cdf(shift - c * w / math.sqrt(df)) + normal_cdf(-c * w / math.sqrt(df) - shift))
    return float((w[1] - w[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def seeds_needed(sigma_s, p_d, images, delta=0.10, target=0.80, most=100):
    """The fewest seeds (>= 2) whose power reaches `target`; None beyond `most`."""
    return next((s for s in range(2, most + 1) if power(sigma_s, p_d, s, images, delta) >= target), None)


def verdict(low, high, direction, delta=0.10):
    """'holds', 'fails' or 'inconclusive' for an interval of (setting - reference); direction +1 when the paper
    predicts a positive difference, -1 a negative one."""
    low, high = sorted((direction * low, direction * high))
    if low > 0:
        return "holds"
    return "fails" if high < 0 or high < delta else "inconclusive"


PROTOCOL_SEEDS = 8  # docs/blockwise.md: at least 8 training seeds, more where the observed sigma_s and p_d need more


def judgement(r):
    """What a report may say of a compare() result: its verdict once the run has the protocol's seeds (8, or as many
    as power 0.8 needs at the observed sigma_s and p_d), else 'not judged' with the seeds run and needed, and what
    the interval alone reads."""
    needed = PROTOCOL_SEEDS if r["seeds"] < 2 else max(PROTOCOL_SEEDS, r["seeds_needed"] or 101)
    if r["seeds"] >= needed:
        return r["verdict"]
    return f"not judged: {r['seeds']} of {needed if needed <= 100 else '> 100'} seeds (interval alone: {r['verdict']})"


def retention(combined, alone):
    """The identity's rate in the combination among the images whose identity-only render succeeded (same prompt and
    noise), averaged over seeds; nan for a seed where nothing succeeded alone."""
    rates = []
    for s in alone:
        ok = np.asarray(alone[s], bool)
        rates.append(float(np.asarray(combined[s], np.float64)[ok].mean()) if ok.any() else float("nan"))
    return float(np.nanmean(rates)) if not all(map(math.isnan, rates)) else float("nan")


def compare(a, b, direction, delta=0.10, n_boot=10_000):
    """Everything the report shows for a - b: mean, interval, verdict, sigma_s, p_d, power at the observed sigma_s and
    p_d, the seeds that power 0.8 needs, and McNemar's p per seed (0/1 outcomes only)."""
    diffs = differences(a, b)
    low, high = bootstrap_interval(diffs, n_boot)
    sigma_s, p_d = variance_parts(diffs)
    S, P = len(diffs), len(next(iter(diffs.values())))
    binary = all(set(np.unique(np.asarray(a[s], np.float64))) <= {0.0, 1.0} for s in a)
    return {"mean": mean_difference(diffs), "low": low, "high": high, "verdict": verdict(low, high, direction, delta),
            "seeds": S, "images": P, "sigma_s": sigma_s, "p_d": p_d,
            "power": power(sigma_s, p_d, S, P, delta) if S > 1 else float("nan"),
            "seeds_needed": seeds_needed(sigma_s, p_d, P, delta) if S > 1 else None,  # one seed cannot tell sigma_s
            "mcnemar_p": {str(s): mcnemar_p(a[s], b[s]) for s in a} if binary else {}}
