"""Evaluation statistics: pure numpy/scipy functions of paired score arrays (higher is better for every scorer).

The unit of replication is the prompt. An evaluation scores P prompts x S seeds = N (prompt, seed) items, and the
seeds of one prompt are correlated (a prompt the model renders well scores high on every seed). Treating the N
items as independent shrinks every interval by about ``sqrt(1 + (S - 1) rho)`` for an intra-prompt correlation
``rho`` (Kish's design effect; Kish 1965, *Survey Sampling*), which is too narrow for a claim about prompts. So every
figure here is clustered by prompt unless the caller has no prompt labels (``clusters=None``: each item is its own
cluster):

* mean per checkpoint: the item mean with a cluster-robust (CR1) t interval, ``se^2 = G/(G-1) sum_g (sum_{i in g}
  (x_i - mean))^2 / N^2`` on ``G - 1`` degrees of freedom (Cameron & Miller 2015, "A practitioner's guide to
  cluster-robust inference", J. Human Resources 50(2)). With equal seeds per prompt it is the t interval over the
  G prompt means; with one item per cluster, the ordinary t interval.
* mean difference ``tuned - base``: a paired cluster bootstrap. Replicates draw G prompts with replacement, each with
  all its seeds and both checkpoints' scores (Davison & Hinkley 1997, *Bootstrap Methods and their Application*,
  section 3.8: resample the top-level units of hierarchical data); the statistic is the item mean
  ``sum_g S_g / sum_g n_g``, so each item weighs the same whatever its prompt's seed count.
* per-prompt win rate: a prompt's outcome is the sign of its mean difference over its seeds; rate = prompts won /
  (won + lost). A prompt ties only when its seeds' differences cancel (identical images, say): ties are excluded,
  as for items, and as the sign test drops them. Interval: bootstrap over prompts; the Wilson interval over prompt
  counts is valid too (prompts are independent) and is reported beside it.
* per-item win rate: wins / (wins + losses) over items (exact ties excluded), interval by the cluster bootstrap.
* sign test: on the per-prompt outcomes, exact Binomial(wins + losses, 1/2), two-sided. This is the cluster-level
  summary analysis of cluster-randomised trials (Hayes & Moulton 2009, *Cluster Randomised Trials*: reduce each
  cluster to one summary, then apply a test for independent observations). It tests what the per-prompt win rate
  claims (more than half the prompts improve) and needs no symmetry assumption; the alternative, a sign-flip
  permutation test of the prompt mean differences, tests the mean instead and assumes symmetric differences.

Bootstrap intervals are *expanded* percentile intervals (Hesterberg 2015, "What teachers should know about the
bootstrap", The American Statistician 69(4)): the quantiles are taken at ``Phi(-/+ sqrt(G/(G-1)) t_{(1+level)/2,
G-1})`` instead of ``(1 -/+ level)/2``, which corrects the plain percentile interval's narrowness with few resampled
units (24 prompts: nominal 95% gives about 93% coverage plain, about 95% expanded; at hundreds of units the two
agree). With fewer than 2 prompts nothing can be resampled between prompts: the estimates stand and the intervals
are NaN (printed ``n/a``), with a ``note`` saying so.

Item-level figures ("per item, seeds treated as independent") stay available as a secondary figure: every item its
own cluster. The bootstrap is seeded (``seed``), so a report is reproducible bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOTSTRAP = 5000
PER_ITEM = "per item, seeds treated as independent"

ClusterLabels = Sequence[Hashable] | np.ndarray  # one label per item, e.g. its prompt text
NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``; NaN bounds when undefined (e.g. one prompt)."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def fmt(self, digits: int = 3, *, sign: bool = False) -> str:
        f = f"{{:{'+' if sign else ''}.{digits}f}}"
        if math.isnan(self.estimate):
            return "n/a"  # e.g. a win rate when every item ties
        if math.isnan(self.low) or math.isnan(self.high):
            return f"{f.format(self.estimate)} [n/a]"
        return f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}]"


# ------------------------------------------------------------------------------------------------------ clusters
def cluster_index(clusters: ClusterLabels | None, n: int) -> np.ndarray:
    """``[n]`` integer cluster codes ``0 .. G-1`` from one label per item; ``None``: every item its own cluster."""
    if clusters is None:
        return np.arange(n)
    labels = np.asarray(clusters)
    got = labels.shape[0] if labels.ndim == 1 else labels.size
    if labels.ndim != 1 or got != n:
        raise ValueError(f"clusters: need one prompt label per item, got {got} labels for {n} items")
    _, codes = np.unique(labels, return_inverse=True)
    return codes.reshape(-1)


def cluster_sums(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``[n, k]`` item values -> ``[G, k]`` per-cluster sums."""
    g = int(codes.max()) + 1 if codes.size else 0
    return np.stack(
        [np.bincount(codes, weights=values[:, j], minlength=g) for j in range(values.shape[1])], 1
    )


def n_clusters(clusters: ClusterLabels | None, n: int) -> int:
    codes = cluster_index(clusters, n)
    return int(codes.max()) + 1 if codes.size else 0


# ------------------------------------------------------------------------------------------------------ intervals
def mean_interval(
    x: Sequence[float] | np.ndarray, level: float = LEVEL, *, clusters: ClusterLabels | None = None
) -> Interval:
    """Item mean with a cluster-robust t interval (CR1, ``G - 1`` degrees of freedom; see the module docstring).
    Unclustered it is the Student-t interval ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``."""
    from scipy import stats

    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError("cannot summarise zero scores")
    codes = cluster_index(clusters, a.size)
    g = int(codes.max()) + 1
    m = float(a.mean())
    if g < 2:
        return Interval(m, NAN, NAN, level)
    resid = np.bincount(codes, weights=a - m, minlength=g)  # [G] per-cluster sums of residuals
    se = math.sqrt(g / (g - 1) * float((resid**2).sum())) / a.size
    half = float(stats.t.ppf((1 + level) / 2, g - 1)) * se
    return Interval(m, m - half, m + half, level)


def expanded_tail(n_units: int, level: float = LEVEL) -> float:
    """Lower quantile of Hesterberg's expanded percentile interval: ``Phi(-sqrt(n/(n-1)) t_{(1+level)/2, n-1})``."""
    from scipy import stats

    z = math.sqrt(n_units / (n_units - 1)) * float(stats.t.ppf((1 + level) / 2, n_units - 1))
    return float(stats.norm.cdf(-z))


def paired_bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    values: np.ndarray,
    *,
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Expanded percentile bootstrap of ``statistic`` over rows. ``values`` is ``[n, ...]`` (one row per resampled
    unit: an item, or a prompt's sums; the columns of a row stay together); ``statistic`` maps ``[R, n, ...]``
    replicates to ``[R]`` and must accept ``[1, n, ...]`` for the point estimate. Non-finite replicates (e.g. a win
    rate of all ties) are dropped. Fewer than 2 rows: NaN bounds. Replicates are processed in chunks."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap zero items")
    estimate = float(statistic(v[None])[0])
    if n < 2:
        return Interval(estimate, NAN, NAN, level)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // v.size)  # replicates per chunk: bounds a [chunk, n, ...] copy to ~16 MB
    reps = np.concatenate(
        [statistic(v[rng.integers(0, n, size=(min(chunk, n_boot - i), n))]) for i in range(0, n_boot, chunk)]
    )
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Interval(estimate, NAN, NAN, level)
    tail = expanded_tail(n, level)
    low, high = np.quantile(reps, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), level)


def _ratio_of_totals(r: np.ndarray) -> np.ndarray:
    """``[R, G, 2]`` resampled per-cluster (numerator, denominator) sums -> ``[R]`` ratio of totals (NaN at 0/0)."""
    num, den = r[..., 0].sum(axis=1), r[..., 1].sum(axis=1)
    return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def cluster_ratio_bootstrap(
    numerator: np.ndarray,
    denominator: np.ndarray,
    clusters: ClusterLabels | None = None,
    *,
    n_boot: int = N_BOOTSTRAP,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """``sum(numerator) / sum(denominator)`` over items, with a bootstrap that resamples clusters (each with all its
    items). A mean is ``(x, 1)``, a win rate ``(win, decided)``. ``clusters=None``: every item its own cluster."""
    items = np.stack([np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)], axis=1)
    totals = cluster_sums(items, cluster_index(clusters, items.shape[0]))  # [G, 2]
    return paired_bootstrap(_ratio_of_totals, totals, n_boot=n_boot, level=level, seed=seed)


def _differences(tuned: np.ndarray | Sequence[float], base: np.ndarray | Sequence[float]) -> np.ndarray:
    t, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if t.shape != b.shape or t.ndim != 1:
        raise ValueError(f"paired scores must be 1-D arrays of equal length, got {t.shape} and {b.shape}")
    if t.size == 0:
        raise ValueError("cannot compare zero items")
    return t - b


def mean_difference(
    tuned: np.ndarray,
    base: np.ndarray,
    *,
    clusters: ClusterLabels | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> Interval:
    """Mean paired difference ``tuned - base`` over items, with a paired bootstrap interval that resamples
    ``clusters`` (the items' prompts) with all their items; ``None``: items resampled as independent."""
    d = _differences(tuned, base)
    return cluster_ratio_bootstrap(d, np.ones_like(d), clusters, n_boot=n_boot, seed=seed)


# ------------------------------------------------------------------------------------------------------ win rates
def wilson_interval(successes: float, trials: float, level: float = LEVEL) -> Interval:
    """Wilson score interval for a binomial proportion (Wilson 1927): centre ``(p + z^2/2n) / (1 + z^2/n)``,
    half-width ``z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)`` with ``z`` the normal quantile at ``(1+level)/2``.
    Weighted counts (e.g. pairs of one K-wise vote weighing 1/(K-1) each) are accepted as they are."""
    from scipy import stats

    if trials == 0:
        return Interval(NAN, 0.0, 1.0, level)
    z = float(stats.norm.ppf((1 + level) / 2))
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` vs ``losses`` (ties dropped): Binomial(wins + losses, 1/2)."""
    from scipy import stats

    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


@dataclass(frozen=True)
class WinRate:
    """Wins, losses and ties of some unit (items or prompts). ``bootstrap`` resamples whatever the function was told
    to cluster by; ``wilson`` and ``p_sign`` treat the counted units as independent: right for prompts, for items
    only as the secondary "seeds treated as independent" figure."""

    wins: int
    losses: int
    ties: int
    bootstrap: Interval  # estimate = wins / (wins + losses)
    wilson: Interval
    p_sign: float

    @property
    def rate(self) -> float:
        return self.bootstrap.estimate


def _win_rate_of_signs(
    signs: np.ndarray, clusters: ClusterLabels | None, *, n_boot: int, seed: int
) -> WinRate:
    wins, losses = int((signs > 0).sum()), int((signs < 0).sum())
    boot = cluster_ratio_bootstrap(
        (signs > 0).astype(np.float64), (signs != 0).astype(np.float64), clusters, n_boot=n_boot, seed=seed
    )
    return WinRate(
        wins,
        losses,
        signs.size - wins - losses,
        boot,
        wilson_interval(wins, wins + losses),
        sign_test(wins, losses),
    )


def win_rate(
    tuned: np.ndarray,
    base: np.ndarray,
    *,
    clusters: ClusterLabels | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> WinRate:
    """Per-item win rate of ``tuned`` over ``base`` (exact ties excluded); the bootstrap interval resamples
    ``clusters`` (the items' prompts) with all their items, or items when ``None``."""
    return _win_rate_of_signs(np.sign(_differences(tuned, base)), clusters, n_boot=n_boot, seed=seed)


def prompt_outcomes(tuned: np.ndarray, base: np.ndarray, prompts: ClusterLabels | None) -> np.ndarray:
    """``[G]`` per-prompt outcomes: the sign of each prompt's mean difference over its seeds (+1 win, -1 loss, 0 tie;
    seeds that cancel to within float rounding, ``|sum| <= 1e-12 sum |d|``, tie)."""
    d = _differences(tuned, base)
    codes = cluster_index(prompts, d.size)
    sums = np.bincount(codes, weights=d)
    scale = np.bincount(codes, weights=np.abs(d))
    return np.where(np.abs(sums) <= 1e-12 * scale, 0.0, np.sign(sums))


def prompt_win_rate(
    tuned: np.ndarray,
    base: np.ndarray,
    prompts: ClusterLabels | None,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> WinRate:
    """Per-prompt win rate: prompts whose mean difference over their seeds is > 0, over prompts won or lost (ties
    excluded), with a bootstrap over prompts, the Wilson interval and the sign test over prompt outcomes."""
    return _win_rate_of_signs(prompt_outcomes(tuned, base, prompts), None, n_boot=n_boot, seed=seed)


# ------------------------------------------------------------------------------------------------------ summaries
def _win_rate_dict(w: WinRate, *, independent: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "wins": w.wins,
        "losses": w.losses,
        "ties": w.ties,
        "rate": w.rate,
        "bootstrap": asdict(w.bootstrap),
    }
    if independent:  # the Wilson interval and the sign test are valid only for independent units
        out.update(wilson=asdict(w.wilson), p_sign=w.p_sign)
    return out


def _note(n_prompts: int, labelled: bool) -> str | None:
    if not labelled:
        return f"no prompt labels: every item counts as its own prompt ({PER_ITEM})"
    if n_prompts < 2:
        return (
            f"{n_prompts} prompt: prompt-clustered intervals need at least 2 prompts (n/a); the per-item "
            f"figures ({PER_ITEM}) are no substitute for more prompts"
        )
    return None


def compare_to_base(
    tuned: np.ndarray,
    base: np.ndarray,
    prompts: ClusterLabels | None,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired per-item scores of a tuned checkpoint and the base, and each item's prompt -> JSON-ready figures, the
    prompt-clustered ones first::

        {"delta": interval,                                   # mean difference, prompt-clustered bootstrap
         "prompt_win_rate": {wins, losses, ties, rate, bootstrap, wilson, p_sign},   # per-prompt outcomes
         "item_win_rate": {wins, losses, ties, rate, bootstrap},                     # items, prompt-clustered
         "n_prompts": G, "n_items": N, "note": None or why an interval is missing,
         "per_item": {"label": PER_ITEM, "delta": interval, "win_rate": {bootstrap, wilson, p_sign}}}

    An interval is ``{"estimate", "low", "high", "level"}``. ``prompts=None``: items treated as independent."""
    d = _differences(tuned, base)
    g = n_clusters(prompts, d.size)
    kw: dict[str, Any] = {"n_boot": n_boot, "seed": seed}
    independent = win_rate(tuned, base, **kw)
    return {
        "delta": asdict(mean_difference(tuned, base, clusters=prompts, **kw)),
        "prompt_win_rate": _win_rate_dict(prompt_win_rate(tuned, base, prompts, **kw), independent=True),
        "item_win_rate": _win_rate_dict(win_rate(tuned, base, clusters=prompts, **kw), independent=False),
        "n_prompts": g,
        "n_items": int(d.size),
        "note": _note(g, prompts is not None),
        "per_item": {
            "label": PER_ITEM,
            "delta": asdict(mean_difference(tuned, base, **kw)),
            "win_rate": {
                "bootstrap": asdict(independent.bootstrap),
                "wilson": asdict(independent.wilson),
                "p_sign": independent.p_sign,
            },
        },
    }


def summarise(
    scores: dict[str, dict[str, np.ndarray]],
    base: str = "base",
    *,
    prompts: ClusterLabels | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """``scores[checkpoint][scorer] -> [N]`` (items aligned across checkpoints) and ``prompts`` (each item's prompt;
    ``None``: items independent) -> JSON-ready statistics, prompt-clustered first::

        {"clustered_by": "prompt" | "item", "n_prompts": G, "n_items": N, "note": None or str,
         "means": {ckpt: {scorer: interval}},                  # cluster-robust t interval
         "vs_base": {ckpt: {scorer: compare_to_base(...)}},
         "means_per_item": {ckpt: {scorer: interval}}}         # t interval, seeds treated as independent
    """
    n = next((len(v) for per in scores.values() for v in per.values()), 0)
    g = n_clusters(prompts, n)
    means = {
        c: {s: asdict(mean_interval(v, clusters=prompts)) for s, v in per.items()}
        for c, per in scores.items()
    }
    vs_base: dict[str, Any] = {}
    if base in scores:
        for c, per in scores.items():
            if c != base:
                vs_base[c] = {
                    s: compare_to_base(v, scores[base][s], prompts, n_boot=n_boot, seed=seed)
                    for s, v in per.items()
                }
    return {
        "clustered_by": "prompt" if prompts is not None else "item",
        "n_prompts": g,
        "n_items": n,
        "note": _note(g, prompts is not None),
        "means": means,
        "vs_base": vs_base,
        "means_per_item": {
            c: {s: asdict(mean_interval(v)) for s, v in per.items()} for c, per in scores.items()
        },
    }
