"""``workbench demo``: the main job end to end on CPU in a few minutes, in the toy world.

1. preference data: >= 1000 off-policy pairs rendered by the toy world (winner = the prompt's shape centred,
   loser = the same scene off-centre; training prompts only), written in the Pick-a-Pic parquet layout;
2. Diffusion-DPO with a LoRA on the committed toy pipeline: ``workbench.train.train`` on ``configs/toy/dpo.yaml``;
3. evaluation of base vs tuned on the 24 held-out prompts x held-out seeds (>= 300 images, identical noise per
   (prompt, seed)): the target reward ``toy/centering`` and ``toy/fidelity`` beside it as a guard-rail; a grid, an
   HTML report, JSON, and a heat-map of shape centroids before/after.

The data recipe comes from research/toyworld.md part 2 (run C); the step count from the objective gym
(docs/objectives.md). Measured: centring +0.16 [+0.11, +0.22] on held-out prompts, 23 of 24 prompts won.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "toy" / "dpo.yaml"
TARGET, GUARD = "toy/centering", "toy/fidelity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--out", default="runs/demo", help="demo folder (its train/ and eval/ are replaced)"
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="training YAML (default configs/toy/dpo.yaml)"
    )
    parser.add_argument("--base", default="toy", help="base pipeline ('toy' = the committed toy pipeline)")
    parser.add_argument("--pairs", type=int, default=1000, help="rendered preference pairs")
    parser.add_argument("--pair-seed", type=int, default=0)
    parser.add_argument(
        "--eval-seeds", type=int, default=13, help="held-out seeds per held-out prompt (24 prompts)"
    )
    parser.add_argument(
        "--eval-steps", type=int, default=10, help="Euler steps for evaluation (toyworld: 10 = 20)"
    )
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=48, help="generation batch size")
    parser.add_argument(
        "--cache-dir", default=None, help="generation cache (default $WORKBENCH_CACHE/generations)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")


def render_pairs(
    path: Path, n: int, seed: int, resolution: int = 32, *, split: str = "train"
) -> dict[str, Any]:
    """Render ``n`` centring pairs from the prompts of ``split`` (the toy world's training prompts by default; the
    objective gym uses ``gym_train``) into one Pick-a-Pic parquet file."""
    from samplers import png_bytes
    from samplers.synth import winner_first, write_pickapic_parquet
    from workbench.toy.world import render_centering_pairs

    winners, losers, prompts, _ = render_centering_pairs(n, seed, split=split, resolution=resolution)
    cols: dict[str, list[Any]] = {c: [] for c in ("jpg_0", "jpg_1", "label_0", "label_1", "caption")}
    for i, (w, lo, prompt) in enumerate(zip(winners, losers, prompts)):
        w8, l8 = (_to_hwc_uint8(x) for x in (w, lo))
        first = winner_first(prompt, i, -1)
        cols["jpg_0"].append(png_bytes(w8 if first else l8))
        cols["jpg_1"].append(png_bytes(l8 if first else w8))
        cols["label_0"].append(1.0 if first else 0.0)
        cols["label_1"].append(0.0 if first else 1.0)
        cols["caption"].append(prompt)
    write_pickapic_parquet(path, cols)
    return {"pairs": n, "prompts": len(set(prompts)), "path": str(path)}


def _to_hwc_uint8(x: Any) -> Any:
    import numpy as np

    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def centroid_heatmap(path: Path, panels: dict[str, Any], bins: int = 16, cell: int = 16) -> Path:
    """Side-by-side 2-D histograms of foreground-box centres (one panel per checkpoint), the image centre marked, and
    each panel's mean distance to the centre. ``panels``: name -> ``[N, 3, H, W]`` images in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from rewards.toy import analyse

    hists, notes = {}, {}
    for name, images in panels.items():
        a = analyse(images)
        cx, cy = a.cx.numpy(), a.cy.numpy()
        ok = np.isfinite(cx) & np.isfinite(cy)
        h, _, _ = np.histogram2d(cy[ok], cx[ok], bins=bins, range=[[0, 1], [0, 1]])
        hists[name] = h
        d = np.sqrt((cx[ok] - 0.5) ** 2 + (cy[ok] - 0.5) ** 2)
        notes[name] = f"{name}: mean dist to centre {d.mean():.3f} (n={ok.sum()})"
    top = max(float(h.max()) for h in hists.values()) or 1.0
    side, pad, head = bins * cell, 12, 18
    canvas = Image.new("RGB", (pad + len(hists) * (side + pad), head + side + pad + 14), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, (name, h) in enumerate(hists.items()):
        v = (h / top) ** 0.5  # square root: small counts stay visible
        rgb = np.stack([1 - 0.9 * v, 1 - 0.75 * v, 1 - 0.2 * v], axis=-1)  # white -> deep blue
        panel = Image.fromarray((rgb * 255).astype(np.uint8)).resize((side, side), Image.Resampling.NEAREST)
        x0 = pad + j * (side + pad)
        canvas.paste(panel, (x0, head))
        c = side // 2
        draw.line([(x0 + c - 6, head + c), (x0 + c + 6, head + c)], fill="red")
        draw.line([(x0 + c, head + c - 6), (x0 + c, head + c + 6)], fill="red")
        draw.rectangle([x0, head, x0 + side - 1, head + side - 1], outline="gray")
        draw.text((x0, 2), name, fill="black", font=font)
        draw.text((x0, head + side + 2), notes[name].split(": ", 1)[1], fill="black", font=font)
    canvas.save(path)
    return path


def format_claim(summary: dict[str, Any], checkpoint: str, target: str = TARGET, guard: str = GUARD) -> str:
    """The demo's closing claim from the prompt-clustered figures (``workbench.stats.summarise``): the target's mean
    difference with its interval, the per-prompt win rate with its interval and the sign test over prompts; then
    the guard-rail's mean difference and whether its interval excludes 0. A gain "holds across prompts" when the
    interval of the mean difference is above 0 and that of the per-prompt win rate above 0.5."""
    from workbench.stats import Interval

    vs = summary["vs_base"][checkpoint]
    t = vs[target]
    delta, w = Interval(**t["delta"]), t["prompt_win_rate"]
    rate = Interval(**w["bootstrap"])
    decided = w["wins"] + w["losses"]
    lines = [
        f"[demo] {target}: {delta.fmt(2, sign=True)} (prompt-clustered 95% CI), per-prompt win rate "
        f"{rate.fmt(2)} ({w['wins']}/{w['losses']}/{w['ties']} prompts won/lost/tied), sign test over {decided} "
        f"prompts p={w['p_sign']:.2g}"
    ]
    if delta.low > 0 and rate.low > 0.5:
        lines.append(
            "[demo] the gain holds across prompts: the mean difference's interval is above 0 and the "
            "per-prompt win rate's above 0.5"
        )
    else:
        lines.append(
            "[demo] a gain across prompts is NOT established: an interval's lower end is not above 0 (mean "
            "difference) or 0.5 (per-prompt win rate), or is undefined"
        )
    if guard in vs:
        g = Interval(**vs[guard]["delta"])
        if g.high < 0:
            verdict = "a significant loss (the interval is below 0)"
        elif g.low > 0:
            verdict = "a significant gain (the interval is above 0)"
        elif g.low <= 0 <= g.high:
            verdict = "no significant change (the interval contains 0)"
        else:
            verdict = "significance undefined (no interval)"
        lines.append(f"[demo] guard-rail {guard}: {g.fmt(2, sign=True)} (prompt-clustered 95% CI): {verdict}")
    if summary.get("note"):
        lines.append(f"[demo] note: {summary['note']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from samplers import (
        Checkpoint,
        SamplingConfig,
        default_cache_dir,
        from_uint8,
        load_image,
        parse_checkpoints,
    )
    from workbench.commands.generate import resolve_base
    from workbench.config import load_config
    from workbench.evaluation import EvalPlan, format_table, run_eval, write_html
    from workbench.prompts import toy_prompts
    from workbench.train import train

    t_start = time.perf_counter()
    out = Path(args.out)
    base = resolve_base(args.base)
    if not Path(base).exists():
        raise FileNotFoundError(
            f"base pipeline {base} not found; run `workbench toy pretrain` or pass --base"
        )
    timings: dict[str, float] = {}

    # 1. preference data ------------------------------------------------------------------------------------------
    t = time.perf_counter()
    pairs_path = out / "pairs" / "centering_pairs.parquet"
    data = render_pairs(pairs_path, args.pairs, args.pair_seed)
    timings["pairs"] = time.perf_counter() - t
    print(
        f"[demo] {data['pairs']} off-policy centring pairs over {data['prompts']} training prompts "
        f"in {timings['pairs']:.1f} s -> {pairs_path}"
    )

    # 2. Diffusion-DPO --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    shutil.rmtree(out / "train", ignore_errors=True)  # a demo always trains fresh
    overrides = [
        f"model.source={json.dumps(str(Path(base).resolve()))}",
        f"data.sources=[{{format: pickapic_parquet, path: {json.dumps(str(pairs_path.resolve()))}}}]",
        f"run.output_dir={json.dumps(str(out.resolve()))}",
        "run.name=train",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    print(
        f"[demo] training {cfg.objective.name} ({cfg.model.finetune}, {cfg.train.max_steps} steps of "
        f"{cfg.train.batch_size} pairs) from {args.config}"
    )
    run_dir = train(cfg)
    timings["train"] = time.perf_counter() - t
    print(f"[demo] trained in {timings['train']:.0f} s -> {run_dir}")

    # 3. evaluation on held-out prompts and seeds -----------------------------------------------------------------
    t = time.perf_counter()
    prompts = toy_prompts("heldout")
    seeds = list(range(1000, 1000 + args.eval_seeds))
    (tuned,) = parse_checkpoints([f"dpo={run_dir / 'final'}"])
    plan = EvalPlan(
        base=base,
        checkpoints=[Checkpoint("base"), tuned],
        prompts=prompts,
        seeds=seeds,
        sampling=SamplingConfig(sampler="euler", steps=args.eval_steps, guidance=args.guidance),
        scorers=[TARGET, GUARD],
        out_dir=out / "eval",
        prompt_set="toy:heldout",
        batch_size=args.batch_size,
        cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        extra={
            "demo": {"pairs": data, "train_run": str(run_dir), "config": args.config, "overrides": overrides}
        },
    )
    result = run_eval(plan)
    heatmap = centroid_heatmap(
        out / "eval" / "centroids.png",
        {name: from_uint8([load_image(p) for p in paths]) for name, paths in result.image_paths.items()},
    )
    write_html(
        result.html_path,
        result.report,
        plan,
        result.image_paths,
        result.scores,
        figures={"Shape centroids, base vs tuned (red cross: image centre)": heatmap.name},
    )
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    # 4. the table --------------------------------------------------------------------------------------------------
    n = len(plan.items)
    print(
        f"\n[demo] base vs Diffusion-DPO LoRA on {len(prompts)} held-out prompts x {len(seeds)} held-out seeds "
        f"= {n} image pairs (Euler {args.eval_steps} steps, CFG {args.guidance}); target {TARGET}, "
        f"guard-rail {GUARD}\n"
    )
    print(format_table(result.summary))
    print("\n" + format_claim(result.summary, tuned.name))
    print(
        f"[demo] times: pairs {timings['pairs']:.0f} s, train {timings['train']:.0f} s, eval {timings['eval']:.0f} s, "
        f"total {timings['total']:.0f} s ({timings['total'] / 60:.1f} min)"
    )
    print(
        f"[demo] grid:     {result.grid_path}\n[demo] heat-map: {heatmap}\n[demo] report:   {result.html_path}"
        f"\n[demo] json:     {result.json_path}\n[demo] LoRA:     {tuned.path}"
    )
    summary = {
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "n_items": n,
        "report": str(result.json_path),
        "threads": torch.get_num_threads(),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    if not all(
        math.isfinite(v["estimate"]) for per in result.summary["means"].values() for v in per.values()
    ):
        print("[demo] warning: some means are not finite")
        return 1
    return 0
