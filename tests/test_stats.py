"""Prompt-clustered evaluation statistics (``workbench.stats``) on synthetic data with known answers.

The seeds of one prompt share the prompt: their scores are correlated, so the unit of replication for a claim about
prompts is the prompt, not the (prompt, seed) item. The data sets below have a dominant prompt-level random effect.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from workbench.stats import (
    compare_to_base,
    mean_difference,
    mean_interval,
    prompt_win_rate,
    win_rate,
)

N_PROMPTS, N_SEEDS = 24, 13  # the demo's held-out layout: 312 items


def prompt_effect_differences(
    rng: np.random.Generator,
    n_sets: int,
    *,
    mu: float = 0.3,
    sd_prompt: float = 1.0,
    sd_seed: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """``n_sets`` data sets of paired differences ``d = mu + u_prompt + e_item`` (``u ~ N(0, sd_prompt^2)`` shared
    by the seeds of a prompt, ``e ~ N(0, sd_seed^2)``), prompt-major: ``[n_sets, 24 * 13]`` and the labels ``[312]``.
    """
    u = rng.normal(0, sd_prompt, (n_sets, N_PROMPTS, 1))
    e = rng.normal(0, sd_seed, (n_sets, N_PROMPTS, N_SEEDS))
    d = (mu + u + e).reshape(n_sets, N_PROMPTS * N_SEEDS)
    return d, np.repeat(np.arange(N_PROMPTS), N_SEEDS)


def test_cluster_bootstrap_covers_the_true_difference_and_the_item_bootstrap_does_not() -> None:
    """200 simulated data sets, true mean difference 0.3. The standard error of the mean is
    sqrt(1/24 + 0.09/312) = 0.205 (the prompt effect dominates); treating the 312 items as independent estimates
    about sqrt(1.09/312) = 0.059, 3.5x too small, so its 95% interval covers only about P(|Z| < 1.96/3.5) = 0.43 of
    the time. The prompt-clustered percentile bootstrap should cover about 93-95% (percentile intervals with 24
    clusters are slightly liberal: z instead of t_23 and a (G-1)/G variance factor)."""
    rng = np.random.default_rng(7)
    d, prompts = prompt_effect_differences(rng, 200)
    base = np.zeros(d.shape[1])
    cover_cluster = cover_item = 0
    for row in d:
        cover_cluster += mean_difference(row, base, clusters=prompts, n_boot=400, seed=1).contains(0.3)
        cover_item += mean_difference(row, base, n_boot=400, seed=1).contains(0.3)
    assert 0.89 <= cover_cluster / 200 <= 0.99
    assert cover_item / 200 < 0.65


def test_cluster_interval_is_much_wider_than_the_item_interval_and_matches_prompt_means() -> None:
    """One data set: the clustered interval is about as wide as the t-interval over the 24 prompt means
    (+- t_{0.975, 23} sd(means) / sqrt(24)), several times the item-level one."""
    d, prompts = prompt_effect_differences(np.random.default_rng(3), 1)
    row, base = d[0], np.zeros(d.shape[1])
    clustered = mean_difference(row, base, clusters=prompts, n_boot=2000)
    items = mean_difference(row, base, n_boot=2000)
    assert clustered.estimate == pytest.approx(row.mean()) and items.estimate == pytest.approx(row.mean())
    assert (clustered.high - clustered.low) > 2.5 * (items.high - items.low)
    means = row.reshape(N_PROMPTS, N_SEEDS).mean(axis=1)
    half_t = sps.t.ppf(0.975, N_PROMPTS - 1) * means.std(ddof=1) / math.sqrt(N_PROMPTS)
    assert (clustered.high - clustered.low) == pytest.approx(2 * half_t, rel=0.15)


def test_each_item_its_own_cluster_is_the_item_bootstrap() -> None:
    rng = np.random.default_rng(0)
    tuned, base = rng.normal(0.1, 1, 60), rng.normal(0, 1, 60)
    a = mean_difference(tuned, base, n_boot=300, seed=5)
    b = mean_difference(tuned, base, clusters=np.arange(60), n_boot=300, seed=5)
    assert a.estimate == pytest.approx(b.estimate)
    assert a.low == pytest.approx(b.low) and a.high == pytest.approx(b.high)


def test_unequal_prompts_weigh_items_equally() -> None:
    """Prompt "a" has 3 items with difference 1, prompt "b" one item with difference 5: the mean difference is the
    item mean (3 + 5) / 4 = 2, not the mean of the prompt means (1 + 5) / 2 = 3."""
    tuned, base = np.array([1.0, 1.0, 1.0, 5.0]), np.zeros(4)
    iv = mean_difference(tuned, base, clusters=["a", "a", "a", "b"], n_boot=200)
    assert iv.estimate == pytest.approx(2.0)
    assert 1.0 <= iv.low <= iv.high <= 5.0


def test_clustered_mean_interval_is_the_t_interval_over_prompt_means() -> None:
    """Prompts of two seeds each: [1, 3], [2, 2], [6, 4]. Prompt means 2, 2, 5; mean 3; sd of the means
    sqrt((1 + 1 + 4) / 2) = sqrt(3); t_{0.975, 2} = 4.3027; half-width 4.3027 * sqrt(3) / sqrt(3) = 4.3027, so
    [-1.3027, 7.3027]. (The cluster-robust standard error equals the prompt-means one when prompts have equal
    seeds.) Unclustered, the six items give the narrower t_{0.975, 5} * sd / sqrt(6) = 2.5706 * 1.7889 / 2.4495
    = 1.8773."""
    x = np.array([1, 3, 2, 2, 6, 4], dtype=float)
    iv = mean_interval(x, clusters=[0, 0, 1, 1, 2, 2])
    assert iv.estimate == pytest.approx(3.0)
    assert iv.low == pytest.approx(-1.3027, abs=1e-4) and iv.high == pytest.approx(7.3027, abs=1e-4)
    items = mean_interval(x)
    assert items.high - items.estimate == pytest.approx(1.8773, abs=1e-4)


def test_prompt_win_rate_on_hand_counted_outcomes() -> None:
    """Six prompts of three seeds (differences tuned - base; a prompt's outcome is the sign of its mean):

    =====  ==============  ====  =======  ===================
    prompt differences     mean  outcome  item wins/losses/ties
    =====  ==============  ====  =======  ===================
    A      +1, +1, +1      +1    win      3 / 0 / 0
    B      +3, -1, -1      +1/3  win      1 / 2 / 0
    C      +1, -2, -2      -1    loss     1 / 2 / 0
    D       0,  0,  0       0    tie      0 / 0 / 3
    E      +1, +1, -5      -1    loss     2 / 1 / 0
    F      +1,  0, +1      +2/3  win      2 / 0 / 1
    =====  ==============  ====  =======  ===================

    Per prompt: 3 wins, 2 losses, 1 tie -> rate 3/5 = 0.6 (ties excluded), sign test Binomial(5, 1/2) two-sided
    p = 1.0. Per item: 9 wins, 5 losses, 4 ties -> 9/14. Items are shuffled: only the labels group them."""
    table = {
        "A": [1, 1, 1],
        "B": [3, -1, -1],
        "C": [1, -2, -2],
        "D": [0, 0, 0],
        "E": [1, 1, -5],
        "F": [1, 0, 1],
    }
    labels = np.array([p for p, ds in table.items() for _ in ds])
    d = np.array([x for ds in table.values() for x in ds], dtype=float)
    order = np.random.default_rng(0).permutation(d.size)
    labels, d = labels[order], d[order]
    base = np.linspace(0, 1, d.size)
    p = prompt_win_rate(base + d, base, labels, n_boot=500)
    assert (p.wins, p.losses, p.ties) == (3, 2, 1)
    assert p.rate == pytest.approx(0.6)
    assert p.p_sign == pytest.approx(sps.binomtest(3, 5, 0.5).pvalue)
    assert 0.0 <= p.bootstrap.low <= 0.6 <= p.bootstrap.high <= 1.0
    w = win_rate(base + d, base, clusters=labels, n_boot=500)
    assert (w.wins, w.losses, w.ties) == (9, 5, 4) and w.rate == pytest.approx(9 / 14)


def test_item_win_rate_interval_widens_when_prompts_are_resampled() -> None:
    d, prompts = prompt_effect_differences(np.random.default_rng(11), 1, mu=0.2, sd_prompt=1.0, sd_seed=0.5)
    base = np.zeros(d.shape[1])
    clustered = win_rate(d[0], base, clusters=prompts, n_boot=1000).bootstrap
    items = win_rate(d[0], base, n_boot=1000).bootstrap
    assert clustered.estimate == items.estimate
    assert (clustered.high - clustered.low) > 2 * (items.high - items.low)


def test_compare_to_base_reports_clustered_figures_first_and_items_as_secondary() -> None:
    d, prompts = prompt_effect_differences(np.random.default_rng(5), 1)
    base = np.random.default_rng(6).random(d.shape[1])
    out = compare_to_base(base + d[0], base, prompts, n_boot=500)
    assert list(out)[:3] == ["delta", "prompt_win_rate", "item_win_rate"]
    assert out["n_prompts"] == N_PROMPTS and out["n_items"] == N_PROMPTS * N_SEEDS
    assert out["delta"]["estimate"] == pytest.approx(d[0].mean())
    per_item = out["per_item"]
    assert per_item["label"] == "per item, seeds treated as independent"
    width = out["delta"]["high"] - out["delta"]["low"]
    assert width > 2.5 * (per_item["delta"]["high"] - per_item["delta"]["low"])
    w = out["prompt_win_rate"]
    assert w["wins"] + w["losses"] + w["ties"] == N_PROMPTS and 0 <= w["p_sign"] <= 1
    assert w["bootstrap"]["low"] <= w["rate"] <= w["bootstrap"]["high"]
    # reproducible bit for bit
    assert compare_to_base(base + d[0], base, prompts, n_boot=500) == out


def test_one_prompt_gives_a_degenerate_interval_and_a_note_not_a_crash() -> None:
    """With one prompt there is nothing to resample between prompts: the estimates stand, the clustered intervals
    are undefined (NaN bounds) and the result says why."""
    rng = np.random.default_rng(0)
    base = rng.random(13)
    out = compare_to_base(base + 0.1, base, ["a cat"] * 13, n_boot=200)
    assert out["delta"]["estimate"] == pytest.approx(0.1)
    assert math.isnan(out["delta"]["low"]) and math.isnan(out["delta"]["high"])
    assert out["prompt_win_rate"]["wins"] == 1 and out["prompt_win_rate"]["p_sign"] == 1.0
    assert "1 prompt" in out["note"] and "at least 2 prompts" in out["note"]
    assert math.isnan(mean_interval(base, clusters=["a cat"] * 13).low)


def test_cluster_labels_must_match_the_items() -> None:
    with pytest.raises(ValueError, match="one prompt label per item"):
        mean_difference(np.zeros(4), np.zeros(4), clusters=["a", "b"])
