"""Reproducible CPU pretraining of the toy pipeline: VAE, then UNet (+ text encoders), on the world's train prompts.

Recipe (research/toyworld.md, part 1, with the fixes it recommends):

* VAE: AdamW lr 1e-3, batch 32, loss = MSE + 1e-4 * KL per latent element. Afterwards ``scaling_factor`` is set to
  1 / std of the scaled latents of 1,024 world images, so the UNet sees unit-variance latents.
* UNet: epsilon prediction, DDPM forward process with the pipeline's own betas (linear 1e-4..0.02, 1000 steps; the
  prototype's SDXL scaled_linear schedule left a non-zero terminal SNR at 16x16 latents and biased samples to grey).
  AdamW lr 1e-3 (linear warm-up), weight decay 0.01, batch 64, gradient clipping 1.0, EMA of the weights (decay
  min(ema_max, (1 + n) / (10 + n))).
* Strong text conditioning: the token embeddings of both CLIP text encoders are re-initialised at unit scale (std 1;
  CLIP's init is 0.02, which left the prototype's frozen encoders with a per-token std of 0.12-0.17) and both text
  encoders are trained jointly with the UNet. The EMA covers them too.
* Classifier-free guidance: 10 % of the rows drop the condition by zeroing *both* the prompt embeddings and the pooled
  embedding, which is what ``StableDiffusionXLPipeline`` feeds for an empty negative prompt
  (``force_zeros_for_empty_prompt=True``).
* Data: a fixed pool of train-split world images (held-out prompts are never drawn), VAE-encoded once; each step
  samples latents from the stored posterior.

Budgets: each phase stops at its step cap or its time budget, whichever comes first; the EMA pipeline is saved every
``checkpoint_minutes`` (``<out>/ema_latest``) so that a partial run is usable, and ``<out>/pretrain.json`` records
the config, the steps done and the wall time. With both time budgets set to 0, a run is a pure function of its step
counts and seed (on the same thread count), which is how the model card's command reproduces the committed weights.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from workbench.tiny import build_tiny_components
from workbench.toy.model import TIME_IDS, TOY_SPEC
from workbench.toy.world import TRAIN_PROMPTS, render_batch


@dataclass
class PretrainConfig:
    out: str = "runs/toy_pretrain"
    seed: int = 0
    vae_steps: int = 800
    vae_minutes: float = 8.0  #: time budget of the VAE phase; 0 = no limit (run all ``vae_steps``)
    vae_target_psnr: float = (
        30.0  #: stop the VAE once the mean train PSNR of the last 25 steps reaches this (dB)
    )
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    decoder_steps: int = (
        0  #: fine-tune the VAE decoder alone (encoder frozen, so the latent space is unchanged)
    )
    unet_steps: int = 3000
    unet_minutes: float = 0.0  #: time budget of the UNet phase; 0 = no limit
    total_minutes: float = (
        34.0  #: the UNet phase also stops when the whole run has taken this long; 0 = no limit
    )
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_max: float = 0.999
    cond_dropout: float = 0.1
    token_embedding_std: float = 1.0
    train_text_encoders: bool = True
    pool_size: int = 16384
    checkpoint_minutes: float = 5.0
    init: str | None = None  #: continue from this pipeline folder (skips the VAE phase)
    threads: int = 2
    log_every: int = 25


def _log(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with path.open("a") as f:
        f.write(line + "\n")


def _images(seeds: range | list[int]) -> torch.Tensor:
    images, _, _ = render_batch(list(seeds), split="train", resolution=TOY_SPEC.resolution)
    return torch.from_numpy(images) * 2 - 1  # [B, 3, H, W] in [-1, 1]


def train_vae(vae: Any, cfg: PretrainConfig, log: Path) -> dict[str, float]:
    """Phase 1: the KL autoencoder on fresh world images (seeds 10^9 + step * batch + i)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    t0, step, mse, psnrs = time.monotonic(), 0, float("nan"), []
    while step < cfg.vae_steps and (cfg.vae_minutes <= 0 or time.monotonic() - t0 < cfg.vae_minutes * 60):
        if len(psnrs) >= 25 and np.mean(psnrs[-25:]) >= cfg.vae_target_psnr:
            break
        x = _images(range(10**9 + step * cfg.vae_batch, 10**9 + (step + 1) * cfg.vae_batch))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        mse = rec.item()
        psnrs.append(10 * math.log10(4.0 / max(mse, 1e-12)))  # range [-1, 1] -> peak-to-peak 2
        if step % cfg.log_every == 0 or step == 1:
            _log(
                log,
                {
                    "phase": "vae",
                    "step": step,
                    "mse": mse,
                    "kl": kl.item(),
                    "psnr": psnrs[-1],
                    "wall_s": time.monotonic() - t0,
                },
            )
    vae.eval()
    with torch.no_grad():
        x = _images(range(2 * 10**9, 2 * 10**9 + 1024))
        z = torch.cat([vae.encode(x[i : i + 256]).latent_dist.sample() for i in range(0, 1024, 256)])
        recon = vae.decode(vae.encode(x[:256]).latent_dist.mode()).sample
        psnr = 10 * math.log10(4.0 / float(F.mse_loss(recon, x[:256])))
    scaling = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scaling)
    return {
        "vae_steps": step,
        "vae_wall_s": time.monotonic() - t0,
        "vae_psnr_db": psnr,
        "scaling_factor": scaling,
    }


def train_decoder(vae: Any, cfg: PretrainConfig, log: Path) -> dict[str, float]:
    """Optional phase: the decoder (and post_quant_conv) alone, MSE on fresh world images (seeds 4 * 10^9 + ...).

    The encoder is frozen, so latents, ``scaling_factor`` and any UNet trained on them stay valid: this sharpens the
    decoded images of an already trained pipeline (used with ``init``)."""
    if cfg.decoder_steps <= 0:
        return {}
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    t0 = time.monotonic()
    for step in range(1, cfg.decoder_steps + 1):
        x = _images(range(4 * 10**9 + step * cfg.vae_batch, 4 * 10**9 + (step + 1) * cfg.vae_batch))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == 1:
            psnr = 10 * math.log10(4.0 / max(loss.item(), 1e-12))
            _log(log, {"phase": "decoder", "step": step, "psnr": psnr, "wall_s": time.monotonic() - t0})
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        x = _images(range(2 * 10**9, 2 * 10**9 + 256))
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        psnr = 10 * math.log10(4.0 / float(F.mse_loss(recon, x)))
    return {
        "decoder_steps": cfg.decoder_steps,
        "decoder_wall_s": time.monotonic() - t0,
        "decoder_psnr_db": psnr,
    }


def _encode_pool(vae: Any, cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render and VAE-encode the training pool: (posterior mean, posterior std, prompt index) per image."""
    seeds = list(range(3 * 10**9, 3 * 10**9 + cfg.pool_size))
    index = {p: i for i, p in enumerate(TRAIN_PROMPTS)}
    means, stds, pidx = [], [], []
    with torch.no_grad():
        for i in range(0, len(seeds), 512):
            images, ps, _ = render_batch(seeds[i : i + 512], split="train", resolution=TOY_SPEC.resolution)
            dist = vae.encode(torch.from_numpy(images) * 2 - 1).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            pidx += [index[p] for p in ps]
    return torch.cat(means), torch.cat(stds), torch.tensor(pidx)


def _encode_prompts(components: dict[str, Any], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding, exactly as ``StableDiffusionXLPipeline.encode_prompt`` does it (clip_skip None):
    penultimate hidden states of both encoders concatenated, pooled = text_encoder_2's projected EOS embedding."""
    tok = components["tokenizer"]
    ids = tok(
        texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = ids.input_ids
    out1 = components["text_encoder"](ids, output_hidden_states=True)
    out2 = components["text_encoder_2"](ids, output_hidden_states=True)
    embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # [P, L, 2 * hidden]
    return embeds, out2.text_embeds  # [P, L, 64], [P, 32]


def _save_pipeline(components: dict[str, Any], ema: dict[str, Any], directory: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    parts = {**components, **ema}
    pipe = StableDiffusionXLPipeline(**parts)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def train_unet(
    components: dict[str, Any], cfg: PretrainConfig, log: Path, out: Path, deadline: float = math.inf
) -> dict[str, float]:
    """Phase 2: the UNet and both text encoders, with EMA copies that are what gets saved."""
    from diffusers import DDPMScheduler

    vae, unet = components["vae"], components["unet"]
    encoders = [components["text_encoder"], components["text_encoder_2"]]
    # from_config is inferred as ``Self | tuple[Self, dict]``; the tuple only comes with return_unused_kwargs=True
    scheduler = cast(DDPMScheduler, DDPMScheduler.from_config(components["scheduler"].config))
    alphas_cumprod = scheduler.alphas_cumprod  # [1000]
    t_pool = time.monotonic()
    means, stds, pidx = _encode_pool(vae, cfg)
    _log(log, {"phase": "pool", "images": len(pidx), "wall_s": time.monotonic() - t_pool})

    trainable = [unet] + (encoders if cfg.train_text_encoders else [])
    for m in encoders:
        m.requires_grad_(cfg.train_text_encoders)
    params = [p for m in trainable for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    ema_models = {"unet": copy.deepcopy(unet).eval()}
    ema_models["text_encoder"] = copy.deepcopy(encoders[0]).eval()
    ema_models["text_encoder_2"] = copy.deepcopy(encoders[1]).eval()
    live = [unet, encoders[0], encoders[1]]
    ema_params = [p for k in ("unet", "text_encoder", "text_encoder_2") for p in ema_models[k].parameters()]
    live_params = [p for m in live for p in m.parameters()]
    for p in ema_params:
        p.requires_grad_(False)

    g = torch.Generator().manual_seed(cfg.seed + 1)
    scale = vae.config.scaling_factor
    time_ids = torch.tensor([TIME_IDS] * cfg.unet_batch)
    prompt_list = list(TRAIN_PROMPTS)
    unet.train()
    for m in encoders:
        m.train(cfg.train_text_encoders)
    t0 = last_ckpt = time.monotonic()
    step, losses = 0, []
    while (
        step < cfg.unet_steps
        and (cfg.unet_minutes <= 0 or time.monotonic() - t0 < cfg.unet_minutes * 60)
        and time.monotonic() < deadline
    ):
        idx = torch.randint(len(pidx), (cfg.unet_batch,), generator=g)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale  # [B, 4, 16, 16]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas_cumprod), (cfg.unet_batch,), generator=g)
        a_t = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps  # q(x_t | x0), DDPM eq. 4
        keep = (torch.rand(cfg.unet_batch, generator=g) >= cfg.cond_dropout).float()  # [B]

        with torch.set_grad_enabled(cfg.train_text_encoders):
            embeds, pooled = _encode_prompts(components, prompt_list)  # all 120 train prompts, then index
        embeds = embeds[pidx[idx]] * keep.view(-1, 1, 1)  # [B, L, 64], zeros where dropped
        pooled = pooled[pidx[idx]] * keep.view(-1, 1)  # [B, 32]
        eps_pred = unet(
            x_t,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        loss = F.mse_loss(eps_pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(cfg.ema_max, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == 1:
            _log(
                log,
                {
                    "phase": "unet",
                    "step": step,
                    "loss": float(np.mean(losses[-cfg.log_every :])),
                    "lr": sched.get_last_lr()[0],
                    "wall_s": time.monotonic() - t0,
                },
            )
        if cfg.checkpoint_minutes > 0 and time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
            _save_pipeline(components, ema_models, out / "ema_latest")
            _log(log, {"phase": "checkpoint", "step": step, "path": str(out / "ema_latest")})
            (out / "ema_latest" / "STEP").write_text(str(step))
            last_ckpt = time.monotonic()
    _save_pipeline(components, ema_models, out / "pipeline")
    return {
        "unet_steps": step,
        "unet_wall_s": time.monotonic() - t0,
        "final_loss": float(np.mean(losses[-100:])),
    }


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run both phases; the final EMA pipeline is written to ``<out>/pipeline``. Returns the summary."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.jsonl"
    log.unlink(missing_ok=True)
    t0 = time.monotonic()
    summary: dict[str, Any] = {"config": asdict(cfg)}
    if cfg.init:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(cfg.init, torch_dtype=torch.float32)
        components = dict(pipe.components)
    else:
        components = build_tiny_components(TOY_SPEC, out / "_build")
        for name in ("text_encoder", "text_encoder_2"):
            emb = components[name].get_input_embeddings().weight
            with torch.no_grad():
                emb.normal_(
                    0.0, cfg.token_embedding_std, generator=torch.Generator().manual_seed(cfg.seed + 7)
                )
        summary.update(train_vae(components["vae"], cfg, log))
    summary.update(train_decoder(components["vae"], cfg, log))
    components["vae"].requires_grad_(False).eval()
    deadline = t0 + cfg.total_minutes * 60 if cfg.total_minutes > 0 else math.inf
    summary.update(train_unet(components, cfg, log, out, deadline))
    summary["total_wall_s"] = time.monotonic() - t0
    summary["torch_threads"] = torch.get_num_threads()
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out / "_build", ignore_errors=True)
    _log(log, {"phase": "done", **{k: v for k, v in summary.items() if k != "config"}})
    return summary
