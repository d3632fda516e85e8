"""The Personalise tab on the toy world with a simulated user: does choosing the next pair by expected information
(BALD under the Laplace posterior) teach the personal scorer more per vote than random pairs, and how does
best-of-N reranking by the fitted scorer (the no-training baseline of the blind before/after) fare?

The simulated user's planted taste is ``toy/centering - 0.5 toy/fidelity`` (centred shapes, less literal renderings;
the population prior, equal weights on the app's four toy scorers, rewards fidelity). They choose by Bradley-Terry on
that taste with temperature ``--temperature``. Everything goes through the app's handlers on the committed toy
pipeline (``apps.personal.next_teaching_pair`` + ``apps.handlers.act``, ``fit_user_scorer``, ``new_baseline_round``,
``blind_win_rate``):

1. for each of ``--users`` simulated users (the app's draws seeded by the user index) and each arm (``random``,
   ``bald``): ``--votes`` teaching votes on ``toy:train`` prompts, ``--pool`` candidates per pair (the first 4 pairs
   are random in both arms, with the same draws), then ``fit_user_scorer``;
2. held-out agreement: on ``--eval-prompts`` ``toy:heldout`` prompts x ``--eval-seeds`` seeds, the share of
   same-prompt pairs that the fitted scorer orders as the planted taste does (noise-free), beside the population
   ensemble's share;
3. the baseline: for each user's ``bald`` scorer, ``--baseline-rounds`` blind rounds of best-of-``--best-of`` by the
   personal scorer against a plain base sample on held-out prompts, judged by the simulated user; the win rate with
   its 95% Wilson interval (all users' votes pooled) and the noise-free share of rounds the reranked image is better.

Usage: ``python benchmarks/personal_selection.py [--users 3] [--votes 10] [--out runs/personal_selection]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCORERS = ["toy/fidelity", "toy/centering", "toy/saturation", "toy/clean_background"]


def taste(images: Any, prompts: list[str]) -> Any:
    from rewards import build_scorer

    return build_scorer("toy/centering")(images, prompts) - 0.5 * build_scorer("toy/fidelity")(
        images, prompts
    )


def vote(ctx: Any, state: Any, user: str, rng: random.Random, temperature: float) -> None:
    import torch

    from apps.handlers import act
    from samplers import from_uint8, load_image

    rnd = ctx.store.get_round(state.round_id)
    x = from_uint8([load_image(i.path) for i in rnd.shown()])
    u = taste(x, [rnd.prompt] * rnd.k)
    p_first = float(torch.sigmoid((u[0] - u[1]) / temperature))
    act(ctx, state, user=user, key="1" if rng.random() < p_first else "2")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--votes", type=int, default=10)
    ap.add_argument("--pool", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (the app's default)")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--eval-prompts", type=int, default=12)
    ap.add_argument("--eval-seeds", type=int, default=6)
    ap.add_argument("--baseline-rounds", type=int, default=8, help="per user")
    ap.add_argument("--best-of", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for results.json (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from apps.handlers import AppContext, AppSettings
    from apps.personal import (
        baseline_arm,
        blind_win_rate,
        fit_user_scorer,
        load_user_scorer,
        new_baseline_round,
        next_teaching_pair,
        population_score,
    )
    from samplers import SamplingConfig, from_uint8, load_image
    from workbench.prompts import load_prompts

    out = Path(args.out or tempfile.mkdtemp(prefix="personal-selection-"))
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    t0 = time.time()

    def context(name: str, seed: int) -> Any:
        settings = AppSettings(
            db=str(out / name / "votes.sqlite"),
            cache_dir=str(cache),
            runs_dir=None,
            steps=args.steps,
            seed=seed,
            scorers=SCORERS,
        )
        return AppContext(settings)

    # the held-out evaluation images, rendered once (the generation cache serves them to every context)
    eval_prompts = load_prompts("toy:heldout")[: args.eval_prompts]
    seeds = list(range(args.eval_seeds))
    probe = context("probe", 0)
    cfg = SamplingConfig(sampler=probe.settings.sampler, steps=args.steps, guidance=probe.settings.guidance)
    eval_images = {p: probe.renderer.render("base", [p] * len(seeds), seeds, cfg) for p in eval_prompts}
    truth = {p: taste(from_uint8(imgs), [p] * len(imgs)) for p, imgs in eval_images.items()}
    print(
        f"rendered {len(eval_prompts) * len(seeds)} held-out images in {time.time() - t0:.0f} s", flush=True
    )

    def held_out_agreement(ctx: Any, user: str) -> tuple[float, float, int]:
        scorer = load_user_scorer(ctx, user)
        hits_p = hits_q = n = 0
        for p, imgs in eval_images.items():
            x = from_uint8(imgs)
            with torch.no_grad():
                personal = scorer(x, [p] * len(imgs))
                population = population_score(scorer, scorer.features(x, [p] * len(imgs)))
            u = truth[p]
            for i, j in itertools.combinations(range(len(imgs)), 2):
                if u[i] == u[j]:
                    continue
                n += 1
                hits_p += int((personal[i] - personal[j]) * (u[i] - u[j]) > 0)
                hits_q += int((population[i] - population[j]) * (u[i] - u[j]) > 0)
        return hits_p / n, hits_q / n, n

    rows: list[dict[str, Any]] = []
    baseline_ctxs = []
    for user_index in range(args.users):
        for arm in ("random", "bald"):
            ctx = context(f"u{user_index}-{arm}", seed=user_index)
            rng = random.Random(1000 + user_index)
            t = time.time()
            for _ in range(args.votes):
                state, _ = next_teaching_pair(
                    ctx,
                    user="sim",
                    checkpoint="base",
                    prompt=None,
                    prompt_set="toy:train",
                    pool=args.pool,
                    selection=arm,
                )
                vote(ctx, state, "sim", rng, args.temperature)
            fit = fit_user_scorer(ctx, "sim")
            personal, population, pairs = held_out_agreement(ctx, "sim")
            row = {
                "user": user_index,
                "selection": arm,
                "votes": fit.votes_used,
                "loo_agreement": fit.agreement.estimate,
                "loo_low": fit.agreement.low,
                "loo_high": fit.agreement.high,
                "population_agreement_on_votes": fit.population.estimate,
                "heldout_agreement": personal,
                "heldout_population_agreement": population,
                "heldout_pairs": pairs,
                "weights": dict(zip(fit.scorer.feature_names, fit.scorer.weights.tolist())),
                "seconds": time.time() - t,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if arm == "bald":
                baseline_ctxs.append(ctx)

    wins = []
    for user_index, ctx in enumerate(baseline_ctxs):
        rng = random.Random(2000 + user_index)
        for _ in range(args.baseline_rounds):
            state, _ = new_baseline_round(
                ctx, user="sim", checkpoint="base", n=args.best_of, prompt=None, prompt_set="toy:heldout"
            )
            rnd = ctx.store.get_round(state.round_id)
            by_arm = {i.params["arm"]: i for i in rnd.items}
            x = from_uint8([load_image(by_arm[a].path) for a in (baseline_arm("base", args.best_of), "base")])
            u = taste(x, [rnd.prompt] * 2)
            wins.append(float(u[0] > u[1]) + 0.5 * float(u[0] == u[1]))
            vote(ctx, state, "sim", rng, args.temperature)
    arm_name = baseline_arm("base", args.best_of)
    pooled = [blind_win_rate(c, arm_name, "base", user="sim") for c in baseline_ctxs]
    w, lo = sum(r.wins for r in pooled), sum(r.losses for r in pooled)
    from workbench.stats import wilson_interval

    baseline = {
        "comparison": f"{arm_name} vs base",
        "votes": w + lo,
        "wins": w,
        "win_rate": wilson_interval(w, w + lo).fmt(),
        "noise_free_share_better": statistics.fmean(wins) if wins else None,
    }
    print(json.dumps(baseline), flush=True)

    def mean(arm: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["selection"] == arm)

    summary: dict[str, dict[str, Any]] = {
        arm: {
            key: mean(arm, key)
            for key in (
                "loo_agreement",
                "population_agreement_on_votes",
                "heldout_agreement",
                "heldout_population_agreement",
            )
        }
        for arm in ("random", "bald")
    }
    from workbench.stats import mean_interval

    by = {(r["user"], r["selection"]): r["heldout_agreement"] for r in rows}
    paired = [by[(u, "bald")] - by[(u, "random")] for u in range(args.users)]
    gain = mean_interval(paired) if len(paired) > 1 else None  # Student t over users
    summary["bald_minus_random_heldout"] = {
        "mean": statistics.fmean(paired),
        "interval": gain.fmt(sign=True) if gain else "n/a",
        "users_better": sum(d > 0 for d in paired),
        "users": len(paired),
    }
    result = {
        "args": vars(args),
        "rows": rows,
        "summary": summary,
        "baseline": baseline,
        "seconds": time.time() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"\n{args.users} users x {args.votes} votes, pool {args.pool}, {args.steps} steps ({time.time() - t0:.0f} s)"
    )
    print(
        f"{'selection':10s} {'LOO on votes':>13s} {'pop. on votes':>14s} {'held-out':>9s} {'pop. held-out':>14s}"
    )
    for arm in ("random", "bald"):
        s = summary[arm]
        print(
            f"{arm:10s} {s['loo_agreement']:13.3f} {s['population_agreement_on_votes']:14.3f} "
            f"{s['heldout_agreement']:9.3f} {s['heldout_population_agreement']:14.3f}"
        )
    g = summary["bald_minus_random_heldout"]
    print(
        f"held-out agreement, bald - random (paired by user): {g['interval']}; {g['users_better']}/{g['users']} better"
    )
    print(
        f"baseline {baseline['comparison']}: win rate {baseline['win_rate']} over {baseline['votes']} blind votes; "
        f"noise-free share better {baseline['noise_free_share_better']:.3f}"
    )
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
