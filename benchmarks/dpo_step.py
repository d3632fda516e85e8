"""Diffusion-DPO step time and peak memory: the workbench step against the diffusers example's step.

Both run on the same tiny SDXL-shaped model (LoRA r4 on attention, reference = adapters disabled), the same
batch of pairs and the same optimizer; each in its own child process of this run so that peak RSS is per variant.

* ``workbench``: the real ``workbench.train.Trainer`` step: cached VAE posterior + cached text embeddings, one
  batched forward over all K images, reference forward without gradients.
* ``baseline``: the step as ``train_diffusion_dpo_sdxl.py`` writes it: VAE-encode both images of every pair and run
  both text encoders on every step, then the same UNet forwards, loss, backward and optimizer step.

Usage: ``python benchmarks/dpo_step.py [--steps 20] [--batch 4] [--resolution 32]``; prints times, RSS and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _trainer(workdir: Path, batch: int, resolution: int):
    from workbench.config import load_config
    from workbench.tiny import write_tiny_fixtures
    from workbench.train import Trainer

    fx = write_tiny_fixtures(workdir / "tiny")
    cfg = load_config(
        ROOT / "configs/tiny/sdxl_dpo_lora.yaml",
        [
            f"model.source={fx['sdxl']}",
            f"data.sources=[{{format: pickapic_parquet, path: '{fx['pickapic']}'}}]",
            f"data.cache.dir={workdir / 'cache'}",
            f"data.resolution={resolution}",
            f"train.batch_size={batch}",
            "data.proportion_empty_prompts=0.0",
            f"run.output_dir={workdir / 'runs'}",
            "logging.tensorboard=false",
            "validation.prompts=[]",
        ],
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    return trainer


def _baseline_step(trainer, records, indices, gen) -> float:
    """One step written the way the diffusers SDXL DPO example does it (encode everything every step)."""
    import torch
    import torch.nn.functional as F

    from workbench.data import load_image, preprocess_group

    comps, acc = trainer.components, trainer.accelerator
    pipe, unet = comps.pipe, trainer.unet
    res = trainer.cfg.data.resolution
    groups = [preprocess_group([load_image(s) for s in records[i].images], res) for i in indices]
    pixels = torch.stack([g[0] for g in groups])  # [B, 2, 3, H, W]
    # the example's layout: [w_1..w_B, l_1..l_B]
    feed = torch.cat([pixels[:, 0], pixels[:, 1]]).to(acc.device)  # the example's .to(accelerator.device)
    with torch.no_grad():
        latents = pipe.vae.encode(feed.to(pipe.vae.dtype)).latent_dist.sample(generator=gen)
        latents = latents * pipe.vae.config.scaling_factor
        prompts = [records[i].prompt for i in indices]
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=acc.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    b = len(indices)
    noise = torch.randn(latents[:b].shape, generator=gen).to(acc.device).repeat(2, 1, 1, 1)
    t = torch.randint(0, 1000, (b,), generator=gen).to(acc.device).repeat(2)
    x_t = trainer.noise_scheduler.add_noise(latents, noise, t)
    time_ids = (
        torch.tensor(
            [[g[1].original_size[0], g[1].original_size[1], *g[1].crop_top_left, res, res] for g in groups]
        )
        .float()
        .to(acc.device)
    )
    cond = {
        "encoder_hidden_states": embeds.repeat(2, 1, 1),
        "added_cond_kwargs": {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids.repeat(2, 1)},
    }
    pred = unet(x_t, t, **cond).sample
    m = acc.unwrap_model(unet)
    m.disable_adapters()
    with torch.no_grad():
        ref = unet(x_t, t, **cond).sample
    m.enable_adapters()
    err = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    ref_err = (ref.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
    mw, ml = err.chunk(2)
    rw, rl = ref_err.chunk(2)
    loss = -F.logsigmoid(-0.5 * 5000 * ((mw - ml) - (rw - rl))).mean()
    acc.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def child(mode: str, steps: int, batch: int, resolution: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(Path(tmp), batch, resolution)  # cache built here, outside the timed loop
        from workbench.data import read_records

        records, _ = read_records(trainer.cfg.data.sources)
        gen = torch.Generator().manual_seed(0)
        times = []
        for step in range(steps + 2):
            indices = trainer.cursor.take(batch)
            t0 = time.perf_counter()
            if mode == "workbench":
                b = trainer.cache.batch(indices, trainer.noise_generator, empty_prompt_prob=0.0, hflip=False)
                loss, _ = trainer.compute_loss(b)
                trainer.accelerator.backward(loss)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
            else:
                _baseline_step(trainer, records, indices, gen)
            if step >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "median_step_s": statistics.median(times), "peak_rss_mb": rss_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument(
        "--rounds", type=int, default=2, help="alternate the variants this many times; keep the best"
    )
    p.add_argument("--child", choices=["workbench", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.resolution)))
        return
    results: dict[str, dict] = {}
    for mode in ("baseline", "workbench") * args.rounds:  # alternating, so a busy machine hurts both alike
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--resolution",
                    str(args.resolution),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        if mode not in results or r["median_step_s"] < results[mode]["median_step_s"]:
            results[mode] = r
    b, w = results["baseline"], results["workbench"]
    print(
        f"tiny SDXL-shaped model, {args.batch} pairs/step, {args.resolution} px, median of {args.steps} steps, "
        f"best of {args.rounds} alternating rounds"
    )
    print(f"{'variant':12s} {'step (s)':>10s} {'peak RSS (MB)':>14s}")
    for r in (b, w):
        print(f"{r['mode']:12s} {r['median_step_s']:10.4f} {r['peak_rss_mb']:14.0f}")
    print(f"speed-up (baseline / workbench step time): {b['median_step_s'] / w['median_step_s']:.2f}x")
    print(f"peak memory ratio (workbench / baseline):   {w['peak_rss_mb'] / b['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
