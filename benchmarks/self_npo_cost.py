"""Training cost of Self-NPO against Diffusion-DPO (the training step Diffusion-NPO runs: NPO is DPO on swapped
pairs, same cost), in the same run, on the same model and batch size.

Both are the real ``workbench.train.Trainer`` step (cached latents and text embeddings, LoRA r8 on the committed toy
pipeline, AdamW, 32 px) built from ``configs/toy/dpo.yaml`` and ``configs/toy/self_npo.yaml``:

* ``dpo``: B pairs; one batched policy forward + backward over 2B images and a reference forward (LoRA disabled);
* ``self_npo``: B images; the EMA teacher's truncated chain (up to 5 guided DDIM steps and the x0 estimate at the
  truncated point, each a batched conditional + unconditional forward over 2B inputs, no gradient), then one policy
  forward + backward over B images, then the EMA update.

The two alternate step by step for ``--rounds`` rounds of ``--steps`` steps (a busy machine slows both alike); the
medians, their ratio, and the totals of the shipped toy recipes (steps x median step) are printed, with the mean
number of teacher forwards per step. The paper's claim (Self-NPO, arXiv 2505.11777: "2 A800 GPU-hours" against
Diffusion-NPO's 384 A100 GPU-hours, [2ND] in research/objectives.md section 7.2) compares whole recipes, so the
totals of the shipped SDXL configs are also printed as an estimate from the measured per-image costs.

Usage: ``python benchmarks/self_npo_cost.py [--steps 10] [--rounds 2] [--batch 16] [--pairs 64]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from inversion_step import _step  # the loop's optimizer step, timed  # noqa: E402

VARIANTS = {"dpo": "configs/toy/dpo.yaml", "self_npo": "configs/toy/self_npo.yaml"}


def _trainers(workdir: Path, batch: int, pairs: int) -> dict:
    from workbench.commands.demo import render_pairs
    from workbench.config import load_config
    from workbench.train import Trainer

    data = workdir / "pairs.parquet"
    render_pairs(data, pairs, 0, split="gym_train")
    out = {}
    for name, config in VARIANTS.items():
        cfg = load_config(
            ROOT / config,
            [
                f"data.sources=[{{format: pickapic_parquet, path: '{data}'}}]",
                f"data.cache.dir={workdir / 'cache'}",
                f"train.batch_size={batch}",
                f"run.output_dir={workdir / 'runs'}",
                f"run.name={name}",
            ],
        )
        trainer = Trainer(cfg, show_progress=False)
        trainer.setup()
        out[name] = trainer
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="pairs (dpo) / images (self_npo) per step")
    parser.add_argument("--pairs", type=int, default=64, help="rendered toy pairs")
    args = parser.parse_args(argv)

    import torch

    from workbench.config import load_config

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    teacher_calls = 0
    with tempfile.TemporaryDirectory() as tmp:
        trainers = _trainers(Path(tmp), args.batch, args.pairs)
        snpo = trainers["self_npo"]
        fn = snpo.noise_fn

        def counted(x0, generator, ctx):
            inner = ctx.teacher

            def teacher(x_t, t):
                nonlocal teacher_calls
                teacher_calls += 1
                return inner(x_t, t)

            return fn(x0, generator, type(ctx)(ctx.scheduler, ctx.denoiser, ctx.prediction_type, teacher))

        snpo.noise_fn = counted
        times: dict[str, list[float]] = {name: [] for name in trainers}
        step = 0
        for trainer in trainers.values():  # warm-up
            _step(trainer, step, args.batch)
        teacher_calls = 0
        for _ in range(args.rounds):
            for _ in range(args.steps):
                step += 1
                for name, trainer in trainers.items():
                    times[name].append(_step(trainer, step, args.batch))
    n = args.rounds * args.steps
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = med["self_npo"] / med["dpo"]
    print(
        f"{args.batch} pairs (dpo) / images (self_npo) per step, toy pipeline 32 px, {n} timed steps per variant"
    )
    print("| variant | median step (s) | ratio to DPO | teacher forwards / step (cond + uncond batched) |")
    print("|---|---|---|---|")
    print(f"| dpo | {med['dpo']:.4f} | 1.00x | - |")
    print(f"| self_npo | {med['self_npo']:.4f} | {ratio:.2f}x | {teacher_calls / n:.1f} |")
    toy_dpo, toy_snpo = (load_config(ROOT / VARIANTS[v]) for v in ("dpo", "self_npo"))
    total_dpo = toy_dpo.train.max_steps * med["dpo"]
    total_snpo = toy_snpo.train.max_steps * med["self_npo"]
    print(
        f"toy recipes (same batch): dpo/npo {toy_dpo.train.max_steps} steps = {total_dpo:.0f} s, self_npo "
        f"{toy_snpo.train.max_steps} steps = {total_snpo:.0f} s: ratio {total_snpo / total_dpo:.2f}"
    )
    # Shipped SDXL recipes, from the measured per-image step costs (cost taken as linear in the batch):
    npo, snpo_cfg = (load_config(ROOT / f"configs/sdxl/{v}.yaml") for v in ("npo", "self_npo"))
    per_pair = med["dpo"] / args.batch
    per_image = med["self_npo"] / args.batch
    npo_total = npo.train.max_steps * npo.train.batch_size * npo.train.gradient_accumulation_steps * per_pair
    snpo_total = (
        snpo_cfg.train.max_steps
        * snpo_cfg.train.batch_size
        * snpo_cfg.train.gradient_accumulation_steps
        * per_image
    )
    print(
        f"shipped SDXL recipes, estimated per device from these per-pair / per-image costs: npo "
        f"{npo.train.max_steps} steps x {npo.train.batch_size * npo.train.gradient_accumulation_steps} pairs, "
        f"self_npo {snpo_cfg.train.max_steps} steps x {snpo_cfg.train.batch_size} images: self_npo / npo = "
        f"{snpo_total / npo_total:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
