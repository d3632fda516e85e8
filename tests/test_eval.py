"""Evaluation statistics on known data, and ``run_eval`` / ``workbench eval`` end to end on tiny and toy models."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from samplers import Checkpoint, SamplingConfig, load_pipeline_for
from workbench.evaluation import (
    EvalPlan,
    format_table,
    mean_difference,
    mean_interval,
    run_eval,
    sign_test,
    summarise,
    wilson_interval,
    win_rate,
)


def test_mean_interval_matches_the_t_formula() -> None:
    """x = 1..5: mean 3, sd sqrt(2.5) = 1.5811, t_{0.975, 4} = 2.7764, half-width = 2.7764 * 1.5811 / sqrt(5)
    = 1.9632, so [1.0368, 4.9632]."""
    iv = mean_interval([1, 2, 3, 4, 5])
    assert iv.estimate == 3
    assert iv.low == pytest.approx(1.0368, abs=1e-4) and iv.high == pytest.approx(4.9632, abs=1e-4)


def test_bootstrap_interval_of_a_constant_difference_is_that_constant() -> None:
    base = np.linspace(0, 1, 50)
    iv = mean_difference(base + 0.25, base)
    assert (
        iv.estimate == pytest.approx(0.25)
        and iv.low == pytest.approx(0.25)
        and iv.high == pytest.approx(0.25)
    )


def test_bootstrap_interval_on_known_normal_data() -> None:
    """Differences ~ N(0.3, 1), n = 2000: the sample mean has standard error 1/sqrt(2000) = 0.02236, so the 95%
    interval is about mean +- 1.96 * 0.02236 = mean +- 0.0438; the percentile bootstrap must agree to ~10% and
    cover the true 0.3. It is seeded: the same call gives the same interval."""
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 2000)
    tuned = base + rng.normal(0.3, 1, 2000)
    iv = mean_difference(tuned, base)
    d = tuned - base
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert iv.estimate == pytest.approx(d.mean())
    assert iv.low == pytest.approx(d.mean() - 1.96 * se, abs=0.1 * 1.96 * se)
    assert iv.high == pytest.approx(d.mean() + 1.96 * se, abs=0.1 * 1.96 * se)
    assert iv.contains(0.3)
    assert mean_difference(tuned, base) == iv


def test_win_rate_on_known_counts() -> None:
    """160 wins, 40 losses, 10 ties: rate = 160/200 = 0.8 (ties excluded). Wilson with z = 1.96: centre
    (0.8 + 1.9208/200) / (1 + 3.8415/200) = 0.79427, half-width 1.96 * sqrt(0.0008 + 0.0000240) / 1.019207 = 0.05521,
    so [0.7391, 0.8495]. The sign test is Binomial(200, 1/2) two-sided."""
    base = np.zeros(210)
    tuned = np.concatenate([np.ones(160), -np.ones(40), np.zeros(10)])
    w = win_rate(tuned, base)
    assert (w.wins, w.losses, w.ties) == (160, 40, 10)
    assert w.rate == pytest.approx(0.8)
    assert w.wilson.low == pytest.approx(0.7391, abs=1e-4) and w.wilson.high == pytest.approx(
        0.8495, abs=1e-4
    )
    assert w.p_sign == pytest.approx(stats.binomtest(160, 200, 0.5).pvalue)
    # the paired bootstrap resamples items (ties included) and agrees with Wilson to about a hundredth
    assert w.bootstrap.low == pytest.approx(w.wilson.low, abs=0.015)
    assert w.bootstrap.high == pytest.approx(w.wilson.high, abs=0.015)
    assert sign_test(0, 0) == 1.0
    assert math.isnan(wilson_interval(0, 0).estimate)


def test_summary_and_table() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(100)
    prompts = np.repeat([f"p{i}" for i in range(10)], 10)
    s = summarise({"base": {"r": b}, "tuned": {"r": b + 0.1}}, prompts=prompts, n_boot=500)
    assert s["clustered_by"] == "prompt" and (s["n_prompts"], s["n_items"]) == (10, 100)
    v = s["vs_base"]["tuned"]["r"]
    assert v["item_win_rate"]["wins"] == 100 and v["prompt_win_rate"]["wins"] == 10
    assert v["delta"]["estimate"] == pytest.approx(0.1)
    text = format_table(s)
    assert "tuned" in text and "+0.100 [+0.100, +0.100]" in text and "10/0/0" in text and "100/0/0" in text
    # the prompt-clustered figures come first and are labelled; the per-item ones after, named as such
    assert "prompt-clustered" in text and "seeds treated as independent" in text
    assert text.index("prompt-clustered") < text.index("seeds treated as independent")
    with pytest.raises(ValueError, match="equal length"):
        win_rate(np.zeros(3), np.zeros(4))


def test_summary_without_prompts_says_items_are_treated_as_independent() -> None:
    b = np.random.default_rng(0).random(30)
    s = summarise({"base": {"r": b}, "tuned": {"r": b + 0.1}}, n_boot=200)
    assert s["clustered_by"] == "item" and s["n_prompts"] == 30
    assert "no prompt labels" in format_table(s)


def test_summary_and_table_with_one_prompt() -> None:
    """One prompt x 13 seeds: estimates, undefined clustered intervals, and a message pointing at the cause."""
    b = np.random.default_rng(0).random(13)
    s = summarise({"base": {"r": b}, "tuned": {"r": b + 0.1}}, prompts=["a cat"] * 13, n_boot=200)
    text = format_table(s)
    assert "+0.100 [n/a]" in text and "1 prompt" in text and "at least 2 prompts" in text


def _demo_like_summary(guard_shift: float) -> dict:
    """24 prompts x 13 seeds. The target gains 0.3 plus a prompt effect (sd 0.3: a few prompts lose) plus seed
    noise; the guard-rail moves by ``guard_shift`` plus a prompt effect built of +-v pairs, so its mean difference is
    exactly ``guard_shift``."""
    rng = np.random.default_rng(2)
    prompts = np.repeat([f"p{i}" for i in range(24)], 13)
    base_t, base_g = rng.random(312), rng.random(312)
    gain = 0.3 + np.repeat(rng.normal(0, 0.3, 24), 13) + rng.normal(0, 0.1, 312)
    v = rng.normal(0, 0.1, 12)
    guard = guard_shift + np.repeat(np.concatenate([v, -v]), 13)
    scores = {
        "base": {"toy/centering": base_t, "toy/fidelity": base_g},
        "dpo": {"toy/centering": base_t + gain, "toy/fidelity": base_g + guard},
    }
    return summarise(scores, prompts=prompts, n_boot=500)


def test_demo_claim_uses_the_prompt_clustered_figures() -> None:
    from workbench.commands.demo import format_claim

    s = _demo_like_summary(-0.12)
    v = s["vs_base"]["dpo"]["toy/centering"]
    d, w = v["delta"], v["prompt_win_rate"]
    text = format_claim(s, "dpo")
    assert (
        f"toy/centering: {d['estimate']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] (prompt-clustered 95% CI), "
        f"per-prompt win rate {w['rate']:.2f} [{w['bootstrap']['low']:.2f}, {w['bootstrap']['high']:.2f}]"
    ) in text
    assert f"sign test over 24 prompts p={w['p_sign']:.2g}" in text
    g = s["vs_base"]["dpo"]["toy/fidelity"]["delta"]
    assert f"guard-rail toy/fidelity: {g['estimate']:+.2f} [{g['low']:+.2f}, {g['high']:+.2f}]" in text
    assert "significant loss" in text and "NOT" not in text
    quiet = format_claim(_demo_like_summary(0.0), "dpo")
    assert "guard-rail toy/fidelity" in quiet and "no significant change" in quiet


def test_demo_claim_with_one_prompt_does_not_crash() -> None:
    from workbench.commands.demo import format_claim

    b = np.random.default_rng(0).random(13)
    scores = {
        "base": {"toy/centering": b, "toy/fidelity": b},
        "dpo": {"toy/centering": b + 0.1, "toy/fidelity": b},
    }
    text = format_claim(summarise(scores, prompts=["a cat"] * 13, n_boot=100), "dpo")
    assert "n/a" in text and "NOT established" in text


# ------------------------------------------------------------------------------------------------ end to end
def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_run_eval_reports_and_reuses_cached_base_images(
    tiny_fixtures: dict[str, Path], tmp_path: Path
) -> None:
    base = str(tiny_fixtures["sdxl"])
    loads: list[str] = []

    def load(ckpt: Checkpoint):
        loads.append(ckpt.name)
        return load_pipeline_for(base, Checkpoint("base"))  # "tuned" = base weights: every item ties

    def plan(out: Path) -> EvalPlan:
        return EvalPlan(
            base=base,
            checkpoints=[Checkpoint("base"), Checkpoint("same", base)],
            prompts=["a red circle", "a cat"],
            seeds=[0, 1, 2],
            sampling=SamplingConfig(steps=2),
            scorers=["brightness"],
            out_dir=out,
            batch_size=4,
            cache_dir=tmp_path / "cache",
            grid_items=4,
            n_boot=200,
        )

    first = run_eval(plan(tmp_path / "r1"), scorers={"brightness": brightness}, load=load)
    assert loads == ["base", "same"]
    report = json.loads(first.json_path.read_text())
    assert report["plan"]["n_items"] == 6
    v = report["vs_base"]["same"]["brightness"]
    assert (
        v["item_win_rate"]["ties"] == 6 and v["prompt_win_rate"]["ties"] == 2 and v["delta"]["estimate"] == 0
    )
    assert report["clustered_by"] == "prompt" and report["n_prompts"] == 2
    assert v["per_item"]["label"] == "per item, seeds treated as independent"
    assert report["plan"]["bootstrap"]["resamples"].startswith("prompts")
    page = first.html_path.read_text()
    assert first.grid_path.is_file() and "<table>" in page
    assert page.index("prompt-clustered") < page.index("Secondary: per item, seeds treated as independent")
    assert len((tmp_path / "r1" / "scores.jsonl").read_text().splitlines()) == 12
    # the second evaluation of the same base loads nothing for it and reproduces its numbers bit for bit
    second = run_eval(plan(tmp_path / "r2"), scorers={"brightness": brightness}, load=load)
    assert loads == ["base", "same"]  # "same" has a different model id, but the same weights path: cached too
    np.testing.assert_array_equal(second.scores["base"]["brightness"], first.scores["base"]["brightness"])
    assert json.loads(second.json_path.read_text())["means"] == report["means"]


def test_eval_command_on_partiprompts_with_the_toy_model(tmp_path: Path) -> None:
    from workbench.commands import evaluate
    from workbench.toy.model import toy_pipeline_path

    if not (toy_pipeline_path() / "model_index.json").is_file():
        pytest.skip("the pretrained toy pipeline is not committed yet")
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "eval"
    args = parser.parse_args(
        [
            "--prompts",
            "parti",
            "--max-prompts",
            "3",
            "--seeds",
            "0-1",
            "--steps",
            "2",
            "--device",
            "cpu",
            "-s",
            "toy/centering",
            "-s",
            "toy/fidelity",
            "--cache-dir",
            str(tmp_path / "cache"),
            "-o",
            str(out),
        ]
    )
    assert evaluate.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["plan"]["prompt_set"] == "parti" and report["plan"]["n_items"] == 6
    assert set(report["means"]["base"]) == {"toy/centering", "toy/fidelity"}
    assert (out / "report.html").is_file() and (out / "grid.png").is_file()
