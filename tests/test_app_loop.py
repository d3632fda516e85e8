"""The whole personal loop on the toy world, through the app's handlers, with a simulated user.

The user's planted taste is ``toy/centering`` (a shape in the middle of the image), a reward the toy pipeline was
never trained toward; they choose by Bradley-Terry with temperature ``TEMPERATURE`` (stochastic, a fixed seed):
``P(a chosen over b) = sigmoid((centering(a) - centering(b)) / TEMPERATURE)``, and press tie when the two images are
equal under it.

1. ``VOTES`` arena rounds (two seeds of the base on a ``toy:train`` prompt) voted through :func:`apps.handlers.act`;
2. the Personalise tab's Fit (:func:`apps.personal.fit_user_scorer`) over four population features
   (``toy/fidelity``, ``toy/centering``, ``toy/saturation``, ``toy/clean_background``; the scorer must find which
   one the user cares about), whose leave-one-vote-out agreement must be above chance (0.5);
3. the personal fine-tune as the app starts it (:func:`apps.jobs.start_job` with the app's default options: a
   separate process running synth on the user's prompts + 120 ``toy:train`` prompts, one group of K = 16 samples per
   prompt and its best/worst pair under the personal scorer where the margin exceeds 1 logit, the user's votes
   repeated 4 times, a Diffusion-DPO LoRA on ``configs/toy/dpo.yaml``, 200 steps), polled through its status file as
   the page does;
4. blind before/after rounds of the Personalise tab (:func:`apps.personal.new_blind_round`) on the 24
   ``toy:heldout`` prompts (never voted on, never in the synthetic data), ``BLIND_REPEATS`` each, LoRA vs base on one
   seed per round (identical noise), judged by the same simulated user; the LoRA's win rate
   (:func:`apps.personal.blind_win_rate`, ties left out) must have a 95% Wilson lower bound above 0.5;
5. Compare shows the LoRA beside the base with the personal scorer's values.

Recipe choice, on the validation split only (``toy:val`` prompts x seeds 2000-2007, 120 items, exact centring
comparisons, ties left out; the same votes and scorer as here; ``benchmarks/personal_job_recipe.py``, 200 steps):

| synthetic pairs | win rate [95% Wilson] | centring | fidelity |
|---|---|---|---|
| 4 seed groups x K = 4 x 60 prompts, all pairs (809; the previous default) | 0.58 | +0.045 | -0.080 |
| 3 seed groups x K = 4 x 120 prompts, best/worst (303) | 0.549 [0.447, 0.648] | +0.074 | -0.128 |
| the same + winner-MSE (sft_weight 1) | 0.552 [0.447, 0.652] | +0.086 | -0.125 |
| 1 group x K = 16 x 120 prompts, best/worst (120) | **0.650 [0.553, 0.736]** | +0.211 | -0.250 |
| the same, SFT on the winners alone | 0.511 [0.410, 0.611] | +0.035 | -0.072 |

K = 8 on all 120 prompts with all pairs (1,727) gave 0.51-0.53 at 100-300 steps. The test uses the K = 16 best/worst
recipe (now the app's default) and was not tuned on the held-out prompts. The best of 16 samples is far more centred
than the best of 4, so each pair is a cleaner lesson in the user's taste; the LoRA gives up prompt fidelity for it,
which this user does not weigh. The test prints the vote count, the numbers and the wall time.

Measured (2026-12-04, two shared CPU cores, ``make test-slow``): 12 votes, agreement 0.909 [0.623, 0.984]; the job
(120 synthetic pairs + 11 of the user's) in 394 s; with 4 blind rounds per held-out prompt (96) the LoRA won 46, lost
28, tied 22: 0.622 [0.508, 0.724], a pass, whole loop 506 s. A lower bound 0.008 above the line can flip on another
machine's floating point (every sample and vote depends on it), so the blind rounds were doubled to 8 per prompt
(192 votes): a tighter interval around the same rate, not a different model (the recipe was fixed on the
validation split before any held-out round). With 192: 97 wins, 56 losses, 39 ties, **0.634 [0.555, 0.706]** (job
381 s, whole loop 515 s, pytest 520 s). The K = 4 recipe before it: 0.559 [0.433, 0.678] over 96, which failed.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")

pytestmark = pytest.mark.slow

TASTE = "toy/centering"
FEATURES = ["toy/fidelity", "toy/centering", "toy/saturation", "toy/clean_background"]
TEMPERATURE = 0.05
VOTES = 12
BLIND_REPEATS = 8  # rounds per held-out prompt (192 blind votes; module docstring: why 8)


def taste(ctx: Any, image_paths: list[Path], prompt: str) -> list[float]:
    import torch

    from samplers import from_uint8, load_image

    with torch.no_grad():
        x = from_uint8([load_image(p) for p in image_paths])
        return ctx.scorer(TASTE)(x, [prompt] * len(image_paths)).float().tolist()


def choose(ctx: Any, state: Any, rng: random.Random) -> str:
    """The simulated user's key press for the two-image round on screen: ``t`` (tie) when the two images are equal
    under the taste (e.g. the LoRA left that sample unchanged), else 1 or 2 by Bradley-Terry."""
    rnd = ctx.store.get_round(state.round_id)
    a, b = taste(ctx, [i.path for i in rnd.shown()], rnd.prompt)
    if abs(a - b) < 1e-6:
        return "t"
    p_first = 1.0 / (1.0 + math.exp(-(a - b) / TEMPERATURE))
    return "1" if rng.random() < p_first else "2"


def cast_votes(ctx: Any, user: str, n: int, rng: random.Random) -> None:
    from apps.handlers import ArenaState, act, new_round

    for _ in range(n):
        state, _ = new_round(
            ctx,
            ArenaState(),
            user=user,
            prompt=None,
            prompt_set="toy:train",
            k=2,
            source="seeds",
            checkpoints=["base"],
        )
        state, _ = act(ctx, state, user=user, key=choose(ctx, state, rng))
        assert state.voted, state.message


def fit_scorer(ctx: Any, user: str) -> tuple[Path, Any]:
    """The user's personal scorer, fitted and saved where the job reads it (what the Personalise tab's Fit does);
    returns the path and the leave-one-vote-out agreement (an interval)."""
    from apps.personal import fit_user_scorer

    fit = fit_user_scorer(ctx, user)
    assert fit.path.is_file()
    return fit.path, fit.agreement


def blind_before_after(ctx: Any, user: str, lora: str, rng: random.Random) -> Any:
    """The Personalise tab's blind rounds, LoRA vs base on one seed (identical noise), on every held-out prompt
    ``BLIND_REPEATS`` times; returns :func:`apps.personal.blind_win_rate` (ties left out of the rate)."""
    from apps.handlers import act
    from apps.personal import blind_win_rate, new_blind_round

    for prompt in ctx.prompts("toy:heldout"):
        for _ in range(BLIND_REPEATS):
            state, view = new_blind_round(ctx, user=user, a=lora, b="base", prompt=prompt, prompt_set=None)
            assert not any(name in " ".join(view.labels) for name in (lora, "base"))  # hidden until the vote
            rnd = ctx.store.get_round(state.round_id)
            assert len({i.params["seed"] for i in rnd.items}) == 1  # identical initial noise
            state, _ = act(ctx, state, user=user, key=choose(ctx, state, rng))
            assert state.voted, state.message
    return blind_win_rate(ctx, lora, "base", user=user)


def test_whole_personal_loop(tmp_path: Path) -> None:
    from apps.handlers import AppContext, AppSettings, compare
    from apps.jobs import JobOptions, list_jobs, register_finished, start_job, wait_for

    t0 = time.perf_counter()
    settings = AppSettings(
        db=str(tmp_path / "app" / "votes.sqlite"),
        cache_dir=str(tmp_path / "cache"),
        runs_dir=None,
        scorers=FEATURES,
        steps=10,
        seed=7,
    )
    ctx = AppContext(settings)
    user = "sim"
    rng = random.Random(12345)

    cast_votes(ctx, user, VOTES, rng)
    n_votes = len(ctx.store.votes(user_id=user))
    assert n_votes >= 8
    path, agreement = fit_scorer(ctx, user)
    print(f"\n[loop] {n_votes} votes -> personal scorer leave-one-vote-out agreement {agreement.fmt(3)}")
    assert agreement.estimate > 0.5, f"leave-one-out agreement {agreement.fmt(3)} is not above chance"

    d = JobOptions()  # the app's defaults: the recipe chosen on the validation split (module docstring)
    options = JobOptions(
        steps=int(os.environ.get("LOOP_STEPS", d.steps)),
        samples=int(os.environ.get("LOOP_K", d.samples)),
        seed_groups=int(os.environ.get("LOOP_GROUPS", d.seed_groups)),
        broad_max=int(os.environ.get("LOOP_PROMPTS", d.broad_max)),
        min_margin=float(os.environ.get("LOOP_MARGIN", d.min_margin)),
    )
    view = start_job(ctx, user, options)
    t_job = time.perf_counter()
    seen_phases = {view.phase}
    while not view.finished:  # what the page's timer does
        time.sleep(1.0)
        (view,) = list_jobs(ctx, user)
        seen_phases.add(view.phase)
    view = wait_for(Path(settings.db).parent / "users" / user / "jobs" / view.job_id, timeout=1)
    assert view.phase == "done", view.summary()
    print(f"[loop] job {view.counts} in {time.perf_counter() - t_job:.0f} s; phases {sorted(seen_phases)}")
    print(f"[loop] final loss {view.loss:.4f}, implicit accuracy {view.implicit_acc}")
    (lora,) = register_finished(ctx, [view])
    assert lora in ctx.renderer.names()

    result = blind_before_after(ctx, user, lora, random.Random(999))
    rate = result.rate
    print(
        f"[loop] blind before/after on {len(ctx.prompts('toy:heldout'))} held-out prompts: LoRA {result.wins} wins, "
        f"{result.losses} losses, {result.ties} ties; win rate {rate.fmt(3)}"
    )
    assert rate.low > 0.5, f"win rate {rate.fmt(3)}: lower end not above 0.5"

    scorer_spec = f"personal:path={path}"
    _, cells = compare(
        ctx, ["base", lora], "a red circle on a white background", "0-1", scorers=[scorer_spec]
    )
    assert [c.checkpoint for c in cells] == ["base", "base", lora, lora]
    assert all(math.isfinite(c.scores[scorer_spec]) for c in cells)
    print(f"[loop] {n_votes} votes, whole loop {time.perf_counter() - t0:.0f} s")
