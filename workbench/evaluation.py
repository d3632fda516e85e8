"""Evaluation runs: checkpoints x prompts x seeds -> images (identical initial noise per (prompt, seed)) -> scorers
-> statistics (:mod:`workbench.stats`, clustered by prompt) -> JSON, HTML report and a grid PNG
(:mod:`workbench.report`).

This module keeps the running (:class:`EvalPlan`, :func:`run_eval`) and re-exports the statistics and report
functions it used to hold, so ``from workbench.evaluation import summarise, format_table`` keeps working.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.paths import writable_folder
from workbench.report import format_table, write_grid, write_html, write_text
from workbench.stats import (
    LEVEL,
    N_BOOTSTRAP,
    PER_ITEM,
    Interval,
    WinRate,
    compare_to_base,
    mean_difference,
    mean_interval,
    paired_bootstrap,
    prompt_win_rate,
    sign_test,
    summarise,
    wilson_interval,
    win_rate,
)

__all__ = [
    "LEVEL",
    "N_BOOTSTRAP",
    "PER_ITEM",
    "EvalPlan",
    "EvalResult",
    "Interval",
    "WinRate",
    "compare_to_base",
    "format_table",
    "mean_difference",
    "mean_interval",
    "paired_bootstrap",
    "prompt_win_rate",
    "run_eval",
    "sign_test",
    "summarise",
    "wilson_interval",
    "win_rate",
    "write_grid",
    "write_html",
]


ScorerFn = Callable[..., Any]  # scorer(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]


@dataclass
class EvalPlan:
    """What to evaluate. ``checkpoints`` holds the base first (name ``base``) when win rates are wanted."""

    base: str
    checkpoints: list[Any]  # samplers.Checkpoint
    prompts: list[str]
    seeds: list[int]
    sampling: Any  # samplers.SamplingConfig
    scorers: list[str]
    out_dir: Path
    prompt_set: str = "custom"
    batch_size: int = 16
    cache_dir: Path | None = None  # None: no generation cache
    device: str = "cpu"
    dtype: str = "fp32"
    grid_items: int = 16
    html_items: int = 48
    n_boot: int = N_BOOTSTRAP
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the JSON (e.g. the demo's training run)

    @property
    def items(self) -> list[tuple[str, int]]:
        """The fixed (prompt, seed) items, prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]


@dataclass
class EvalResult:
    out_dir: Path
    summary: dict[str, Any]
    report: dict[str, Any]  # what report.json holds
    scores: dict[str, dict[str, np.ndarray]]
    image_paths: dict[str, list[Path]]
    json_path: Path
    html_path: Path
    grid_path: Path


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_eval(
    plan: EvalPlan,
    *,
    scorers: dict[str, ScorerFn] | None = None,
    load: Callable[[Any], Any] | None = None,
    process_index: int = 0,
    num_processes: int = 1,
) -> EvalResult:
    """Generate, score, summarise and report. ``scorers`` (name -> scorer) defaults to
    ``rewards.build_scorer`` of each ``NAME[:key=value,...]`` spec; ``load(checkpoint) -> pipeline`` defaults to
    :func:`samplers.load_pipeline_for` on ``plan.base`` (both injectable for tests).

    Under ``accelerate launch`` (``num_processes`` > 1), the items are cut into batches of ``plan.batch_size`` as one
    process would cut them and process ``i`` generates and scores the batches ``j`` with ``j % n == i`` (the same
    batches, so the same images); the scores are gathered, every process summarises them (the same numbers) and
    the main process alone writes the report, grid and ``scores.jsonl``, in the canonical item order."""
    import torch

    from samplers import ImageCache, from_uint8, generate_images, load_pipeline_for, model_id, save_png
    from workbench.models import DTYPES

    if not plan.checkpoints:
        raise ValueError("nothing to evaluate: pass at least one checkpoint (e.g. base)")
    if scorers is None:
        from rewards import build_scorer, parse_scorer_spec

        specs = [parse_scorer_spec(spec) for spec in plan.scorers]  # "NAME" or "NAME:key=value,..."
        scorers = {name: build_scorer(name, **options) for name, options in specs}
    for s in scorers.values():
        if isinstance(s, torch.nn.Module):
            s.to(plan.device).eval()

    def load_default(ckpt: Any) -> Any:
        return load_pipeline_for(plan.base, ckpt, device=plan.device, dtype=DTYPES[plan.dtype])

    loader = load or load_default

    out = writable_folder(plan.out_dir, "out_dir")
    cache = ImageCache(plan.cache_dir) if plan.cache_dir is not None else None
    items = plan.items
    prompts = [p for p, _ in items]
    seeds = [s for _, s in items]
    batch = max(1, plan.batch_size)
    mine = [i for i in range(len(items)) if (i // batch) % num_processes == process_index]
    scores: dict[str, dict[str, np.ndarray]] = {}
    paths: dict[str, list[Path]] = {}
    timings: dict[str, float] = {}
    for ckpt in plan.checkpoints:
        t0 = time.perf_counter()
        per = {name: np.full(len(items), np.nan) for name in scorers}
        ckpt_paths = [out / "images" / _slug(ckpt.name) / f"{i:05d}.png" for i in range(len(items))]
        mid = model_id(plan.base, ckpt, dtype=plan.dtype, device=plan.device)
        batches = generate_images(
            lambda c=ckpt: loader(c),
            [prompts[i] for i in mine],
            [seeds[i] for i in mine],
            plan.sampling,
            batch_size=plan.batch_size,
            cache=cache,
            model_id=mid,
            desc=f"eval {ckpt.name}",
        )
        for rows, images in batches:
            idx = [mine[r] for r in rows]
            for i, image in zip(idx, images):
                save_png(image, ckpt_paths[i])
            x = from_uint8(images).to(plan.device)
            with torch.no_grad():
                for name, scorer in scorers.items():
                    per[name][idx] = scorer(x, [prompts[i] for i in idx]).float().cpu().numpy()
        scores[ckpt.name] = per
        paths[ckpt.name] = ckpt_paths
        timings[ckpt.name] = round(time.perf_counter() - t0, 2)
    if num_processes > 1:
        _gather_scores(scores, mine)
        if process_index != 0:  # the main process writes every file
            summary = summarise(
                scores, plan.checkpoints[0].name, prompts=prompts, n_boot=plan.n_boot, seed=plan.seed
            )
            return EvalResult(
                out, summary, {}, scores, paths, out / "report.json", out / "report.html", out / "grid.png"
            )

    summary = summarise(scores, plan.checkpoints[0].name, prompts=prompts, n_boot=plan.n_boot, seed=plan.seed)
    grid_path = write_grid(out / "grid.png", plan, paths, scores)
    report = {
        "plan": {
            "base": plan.base,
            "checkpoints": [{"name": c.name, "path": c.path} for c in plan.checkpoints],
            "prompt_set": plan.prompt_set,
            "n_prompts": len(plan.prompts),
            "seeds": plan.seeds,
            "n_items": len(items),
            "sampling": plan.sampling.to_dict(),
            "scorers": list(scorers),
            "device": plan.device,
            "dtype": plan.dtype,
            "processes": num_processes,
            "bootstrap": {
                "n": plan.n_boot,
                "seed": plan.seed,
                "level": LEVEL,
                "resamples": "prompts, each with all its seeds (paired: base and tuned together)",
            },
            **plan.extra,
        },
        **summary,
        "seconds": timings,
        "files": {"grid": "grid.png", "html": "report.html", "images": "images/", "scores": "scores.jsonl"},
    }
    json_path = out / "report.json"
    write_text(json_path, json.dumps(report, indent=2, default=_json_default))
    lines = []
    for i, (p, s) in enumerate(items):
        for c in plan.checkpoints:
            row = {
                "item": i,
                "prompt": p,
                "seed": s,
                "checkpoint": c.name,
                "path": os.path.relpath(paths[c.name][i], out),
            }
            row.update({f"score/{n}": float(scores[c.name][n][i]) for n in scorers})
            lines.append(json.dumps(row))
    write_text(out / "scores.jsonl", "\n".join(lines) + "\n")
    html_path = write_html(out / "report.html", report, plan, paths, scores)
    return EvalResult(out, summary, report, scores, paths, json_path, html_path, grid_path)


def _gather_scores(scores: dict[str, dict[str, np.ndarray]], mine: list[int]) -> None:
    """Fill ``scores`` (checkpoint -> scorer -> ``[items]``, this process's items ``mine`` filled) with every
    process's items, in place (``accelerate.utils.gather_object``: every process receives all of them)."""
    from accelerate.utils import gather_object

    part = [(c, n, i, float(v[i])) for c, per in scores.items() for n, v in per.items() for i in mine]
    for c, n, i, value in gather_object(part):
        scores[c][n][i] = value


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
