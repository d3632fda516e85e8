"""Choose the personal fine-tune's recipe on the validation split (issue 12): the simulated user of
``tests/test_app_loop.py`` (taste ``toy/centering``, Bradley-Terry choices at temperature 0.05) casts the same 12
votes through the app's handlers, the Personalise tab fits their scorer, and each recipe variant runs as the app's
background job (:func:`apps.jobs.start_job`: synth labelled by the personal scorer, Diffusion-DPO LoRA). Each LoRA is
then rendered beside the base on the ``toy:val`` prompts x seeds 2000-2007 (identical initial noise; never the
held-out prompts the test's blind rounds use) and compared per item on the user's taste: win rate with ties left out
(Wilson 95 %), centring and fidelity differences with prompt-clustered intervals.

Usage::

    python benchmarks/personal_job_recipe.py --variants current,best-worst --out runs/personal_recipe

Finished jobs are reused (``OUT/jobs/<variant>/``); ``--fresh`` retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VAL_SEEDS = list(range(2000, 2008))


def variants() -> dict[str, Any]:
    from apps.jobs import JobOptions

    current = (
        JobOptions()
    )  # the test's recipe: 4 seed groups x K = 4 x 60 toy:train prompts, all pairs, 200 steps
    best_worst = replace(current, pairs="best-worst", seed_groups=3, broad_max=120)
    return {
        "current": current,
        "current+sft": replace(current, sft_weight=1.0),
        "best-worst": best_worst,
        "best-worst+sft": replace(best_worst, sft_weight=1.0),
        "best-worst 400 steps": replace(best_worst, steps=400),
        # one group of K = 16 per prompt: the best of 16 is far more centred than the best of 4, so each pair is a
        # cleaner lesson in the user's taste; DPO, and SFT on the winners alone (rejection-sampling fine-tuning)
        "k16 best-worst": replace(best_worst, samples=16, seed_groups=1),
        "k16 sft": replace(best_worst, samples=16, seed_groups=1, config="configs/toy/sft.yaml"),
    }


def run_variant(ctx: Any, user: str, name: str, options: Any, out: Path, fresh: bool) -> tuple[Path, float]:
    from apps.jobs import start_job, wait_for

    done = out / "jobs" / f"{name.replace(' ', '_')}.json"
    if done.is_file() and not fresh:
        info = json.loads(done.read_text())
        if info["options"] == asdict(options) and Path(info["final"], "COMPLETE").is_file():
            return Path(info["final"]), float(info["seconds"])
    t = time.perf_counter()
    view = start_job(ctx, user, options)
    job_dir = Path(ctx.settings.db).parent / "users" / user / "jobs" / view.job_id
    view = wait_for(job_dir, timeout=3600)
    if view.phase != "done":
        raise RuntimeError(f"{name}: job ended {view.phase}: {view.summary()}")
    seconds = time.perf_counter() - t
    final = job_dir / "run" / "final"
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(
        json.dumps(
            {"options": asdict(options), "final": str(final), "seconds": seconds, "counts": view.counts}
        )
    )
    print(f"[recipe] {name}: job {view.counts} in {seconds:.0f} s", flush=True)
    return final, seconds


def evaluate(finals: dict[str, Path], out: Path) -> dict[str, Any]:
    import numpy as np

    from samplers import Checkpoint, SamplingConfig, default_cache_dir, parse_checkpoints
    from workbench.commands.generate import resolve_base
    from workbench.evaluation import EvalPlan, run_eval
    from workbench.prompts import toy_prompts
    from workbench.stats import compare_to_base, wilson_interval

    slug = {n: "v" + "".join(ch if ch.isalnum() else "_" for ch in n) for n in finals}
    plan = EvalPlan(
        base=resolve_base("toy"),
        checkpoints=[Checkpoint("base"), *parse_checkpoints([f"{slug[n]}={p}" for n, p in finals.items()])],
        prompts=toy_prompts("val"),
        seeds=VAL_SEEDS,
        sampling=SamplingConfig(sampler="euler", steps=10, guidance=5.0),
        scorers=["toy/centering", "toy/fidelity"],
        out_dir=out / "eval",
        prompt_set="toy:val",
        batch_size=48,
        cache_dir=default_cache_dir(),
    )
    result = run_eval(plan)
    prompts = [p for p, _ in plan.items]
    base = result.scores["base"]
    table: dict[str, Any] = {}
    for n in finals:
        tuned = result.scores[slug[n]]
        d = np.asarray(tuned["toy/centering"]) - np.asarray(base["toy/centering"])
        wins, losses = int((d > 1e-6).sum()), int((d < -1e-6).sum())
        rate = wilson_interval(wins, wins + losses)
        table[n] = {
            "wins": wins,
            "losses": losses,
            "ties": len(d) - wins - losses,
            "win_rate": {"estimate": rate.estimate, "low": rate.low, "high": rate.high},
            **{
                s: compare_to_base(tuned[s], base[s], prompts)["delta"]
                for s in ("toy/centering", "toy/fidelity")
            },
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--variants", default=",".join(variants()), help=f"comma-separated: {', '.join(variants())}"
    )
    parser.add_argument("--out", default="runs/personal_recipe")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)

    import test_app_loop as loop
    import torch

    from apps.handlers import AppContext, AppSettings

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = Path(args.out).resolve()
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in variants()]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(variants())}")
    t0 = time.perf_counter()
    settings = AppSettings(
        db=str(out / "app" / "votes.sqlite"),
        cache_dir=str(out / "cache"),
        runs_dir=None,
        scorers=loop.FEATURES,
        steps=10,
        seed=7,
    )
    ctx = AppContext(settings)
    user = "sim"
    if not ctx.store.votes(user_id=user):  # the test's votes (same seeds), cast once
        loop.cast_votes(ctx, user, loop.VOTES, random.Random(12345))
    _, agreement = loop.fit_scorer(ctx, user)
    print(f"[recipe] {len(ctx.store.votes(user_id=user))} votes, agreement {agreement.fmt(3)}", flush=True)
    finals, seconds = {}, {}
    for name in chosen:
        finals[name], seconds[name] = run_variant(ctx, user, name, variants()[name], out, args.fresh)
    table = evaluate(finals, out)
    lines = [
        f"validation: toy:val x {len(VAL_SEEDS)} seeds, LoRA vs base on identical noise, taste toy/centering",
        "",
        "| variant | job s | win rate (ties out) [95% Wilson] | W/L/T | centring delta [95% CI] | fidelity delta |",
        "|---|---|---|---|---|---|",
    ]
    for n, r in table.items():
        w, c, f = r["win_rate"], r["toy/centering"], r["toy/fidelity"]
        lines.append(
            f"| {n} | {seconds[n]:.0f} | {w['estimate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] | "
            f"{r['wins']}/{r['losses']}/{r['ties']} | {c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | "
            f"{f['estimate']:+.3f} [{f['low']:+.3f}, {f['high']:+.3f}] |"
        )
    lines.append(f"\nwall time {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    (out / "recipe.md").write_text("\n".join(lines) + "\n")
    (out / "recipe.json").write_text(
        json.dumps({n: {**r, "seconds": seconds[n]} for n, r in table.items()}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
