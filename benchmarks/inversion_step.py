"""Step cost of the inversion noisings: a DDIM-InPO step and a SmPO step against the forward-noising Diffusion-DPO
step, in the same run, on the same model, data and batch.

All three are the real ``workbench.train.Trainer`` step (cached latents and text embeddings, one batched policy
forward over all K images, reference = LoRA disabled, backward, AdamW step) built from ``configs/toy/{dpo,inpo,
smpo}.yaml`` on the committed toy pipeline (the objective gym's model and recipe: LoRA r8, 16 pairs per step, 32 px).
They differ only in how ``x_t`` is made: ``forward`` (one Gaussian draw), ``ddim_inversion`` (10-step grid, eta 0.1:
up to 10 no-grad policy forwards), ``renoise_inversion`` (5-step grid, one ReNoise refinement: up to 10). The
variants alternate step by step for ``--rounds`` rounds of ``--steps`` steps, so a busy machine slows all of them
alike; the medians and their ratios to DPO are printed, with the mean no-grad inversion work per step in full-batch
forwards (each model call carries only the groups whose grid is not done: groups x calls / batch).

Usage: ``python benchmarks/inversion_step.py [--steps 10] [--rounds 2] [--batch 16] [--pairs 64]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"dpo": "configs/toy/dpo.yaml", "inpo": "configs/toy/inpo.yaml", "smpo": "configs/toy/smpo.yaml"}


def _trainers(workdir: Path, batch: int, pairs: int) -> dict:
    from samplers.relabel import relabel
    from workbench.commands.demo import render_pairs
    from workbench.config import load_config
    from workbench.train import Trainer

    data = workdir / "pairs.parquet"
    render_pairs(data, pairs, 0, split="gym_train")
    soft = workdir / "soft.parquet"
    render_pairs(soft, pairs, 0, split="gym_train")
    import rewards

    relabel(soft, "pickapic_parquet", rewards.build_scorer("toy/centering"), "toy/centering", batch_size=64)
    out = {}
    for name, config in VARIANTS.items():
        path = soft if name == "smpo" else data
        labels = ", labels: scorer" if name == "smpo" else ""
        cfg = load_config(
            ROOT / config,
            [
                f"data.sources=[{{format: pickapic_parquet, path: '{path}'{labels}}}]",
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


def _step(trainer, step: int, batch: int) -> float:
    """One optimizer step as the training loop runs it (batch, loss, backward, optimizer, the reference's
    ``on_optimizer_step`` hook when it has one, e.g. an EMA teacher), timed (CUDA synchronised)."""
    indices = trainer.cursor.take(batch)
    if trainer.accelerator.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.reseed(step)
    b = trainer.cache.batch(indices, trainer.noise_generator, empty_prompt_prob=0.0, hflip=False)
    loss, _ = trainer.compute_loss(b)
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    on_step = getattr(trainer.reference, "on_optimizer_step", None)
    if on_step is not None:
        on_step(trainer.accelerator.unwrap_model(trainer.unet))
    if trainer.accelerator.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=64, help="rendered toy pairs")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = _trainers(Path(tmp), args.batch, args.pairs)
        calls = {name: 0 for name in trainers}
        for name, trainer in trainers.items():  # count the no-grad policy forwards the noising makes
            fn = trainer.noise_fn

            def counted(x0, generator, ctx, _fn=fn, _name=name):
                inner = ctx.denoiser

                def denoiser(x_t, t, groups=None):
                    calls[_name] += x_t.shape[0]  # groups through the model in this call
                    return inner(x_t, t, groups)

                return _fn(x0, generator, dataclasses.replace(ctx, denoiser=denoiser))

            trainer.noise_fn = counted
        times: dict[str, list[float]] = {name: [] for name in trainers}
        step = 0
        for trainer in trainers.values():  # warm-up
            _step(trainer, step, args.batch)
        calls.update(dict.fromkeys(calls, 0))
        for _ in range(args.rounds):
            for _ in range(args.steps):
                step += 1
                for name, trainer in trainers.items():
                    times[name].append(_step(trainer, step, args.batch))
    n = args.rounds * args.steps
    med = {name: statistics.median(v) for name, v in times.items()}
    device = next(iter(trainers.values())).accelerator.device
    print(f"device {device}, {args.batch} pairs per step, {n} timed steps per variant (alternating)")
    print(
        "| variant | noising | median step (s) | ratio to DPO | inversion forwards / step (full-batch equivalents) |"
    )
    print("|---|---|---|---|---|")
    noising = {
        "dpo": "forward",
        "inpo": "ddim_inversion (10 steps, eta 0.1)",
        "smpo": "renoise_inversion (5 x 2)",
    }
    for name in trainers:
        print(
            f"| {name} | {noising[name]} | {med[name]:.4f} | {med[name] / med['dpo']:.2f}x | {calls[name] / (n * args.batch):.1f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": str(device), "batch": args.batch, "steps": n, "median_s": med, "calls": calls}
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
