"""Disk cache of VAE latents and text embeddings: built once, reused across runs, invalidated when the model changes.

The diffusers DPO example VAE-encodes both images and runs the text encoders every step; here each group is
encoded once. Layout::

    {cache.dir}/latents-{vae fingerprint}-{resolution}-{crop}/{group content hash}.safetensors
    {cache.dir}/text-{text encoders fingerprint}/{prompt hash}.safetensors

The latent file stores the VAE posterior parameters (mean and log-variance, ``[K, 2C, h, w]``) so that training
draws a fresh posterior sample each step with its own generator, exactly like the official code's
``latent_dist.sample()``, at no encoding cost. The text file stores what the pipeline's own ``encode_prompt``
returns (SDXL: both encoders' penultimate hidden states concatenated, and the pooled output of the second), so
training and generation condition identically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workbench.batch import GroupBatch
from workbench.data import DataError, PreferenceRecord, ReadReport, load_image, preprocess_group
from workbench.models import fingerprint


def _hash_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:32]


def _image_bytes(src: Any) -> bytes:
    if isinstance(src, bytes):
        return src
    try:
        return Path(src).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image file {src}: {exc}") from exc


def group_key(record: PreferenceRecord, crop: str, hflip: bool) -> str:
    return _hash_bytes(*(_image_bytes(s) for s in record.images), f"{crop}:{hflip}".encode())


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str], family: str) -> dict[str, torch.Tensor]:
    """The pipeline's own ``encode_prompt`` (no classifier-free guidance), per prompt."""
    device = pipe.unet.device
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds.float().cpu(), "pooled_embeds": pooled.float().cpu()}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"prompt_embeds": embeds.float().cpu()}


@dataclass
class CachedItem:
    latent_file: Path
    prompt: str
    time_ids: tuple[int, int, int, int, int, int]


class PreferenceCache:
    """Builds (once) and serves cached groups. ``items`` are in record order, failed records removed."""

    def __init__(self, pipe: Any, family: str, data_cfg: Any) -> None:
        self.pipe, self.family, self.cfg = pipe, family, data_cfg
        root = Path(data_cfg.cache.dir)
        vae_fp = fingerprint(pipe.vae, extra=str(pipe.vae.dtype))
        text_fp = fingerprint(pipe.text_encoder) + (
            fingerprint(pipe.text_encoder_2) if family == "sdxl" else ""
        )
        text_fp = hashlib.sha256((text_fp + str(len(pipe.tokenizer))).encode()).hexdigest()[:16]
        self.latent_dir = root / f"latents-{vae_fp}-{data_cfg.resolution}-{data_cfg.crop}"
        self.text_dir = root / f"text-{text_fp}"
        self.items: list[CachedItem] = []
        self._text: dict[str, dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------------------- building
    def build(
        self, records: list[PreferenceRecord], report: ReadReport, *, show_progress: bool = True
    ) -> None:
        from tqdm.auto import tqdm

        self.latent_dir.mkdir(parents=True, exist_ok=True)
        self.text_dir.mkdir(parents=True, exist_ok=True)
        hflip = self.cfg.hflip
        todo: list[tuple[PreferenceRecord, Path]] = []
        keyed: list[tuple[PreferenceRecord, Path]] = []
        for rec in records:
            try:
                key = group_key(rec, self.cfg.crop, hflip)
            except DataError as exc:
                report.skip(rec.row_id, str(exc))
                continue
            path = self.latent_dir / f"{key}.safetensors"
            keyed.append((rec, path))
            if not path.is_file():
                todo.append((rec, path))
        rng = np.random.default_rng(0)
        failed: set[str] = set()
        batch: list[tuple[PreferenceRecord, Path, torch.Tensor, tuple[int, ...]]] = []
        bar = tqdm(
            total=len(todo), desc="caching VAE latents", disable=not show_progress or not todo, unit="group"
        )
        for rec, path in todo:
            try:
                images = [load_image(s) for s in rec.images]
                pixels, crop = preprocess_group(images, self.cfg.resolution, crop=self.cfg.crop, rng=rng)
            except DataError as exc:
                report.skip(rec.row_id, str(exc))
                failed.add(rec.row_id)
                bar.update(1)
                continue
            res = self.cfg.resolution
            time_ids = (*crop.original_size, *crop.crop_top_left, res, res)
            batch.append((rec, path, pixels, time_ids))
            if len(batch) >= 8:
                self._encode_and_save(batch, hflip)
                bar.update(len(batch))
                batch = []
        if batch:
            self._encode_and_save(batch, hflip)
            bar.update(len(batch))
        bar.close()
        self._check_bad_fraction(report)
        prompts = sorted({r.prompt for r, _ in keyed if r.row_id not in failed} | {""})
        self._build_text(prompts)
        for rec, path in keyed:
            if rec.row_id in failed:
                continue
            meta = _read_meta(path)
            self.items.append(CachedItem(path, rec.prompt, meta))
        if not self.items:
            raise DataError("no usable preference groups: every row was skipped\n" + report.summary())

    def _check_bad_fraction(self, report: ReadReport) -> None:
        if report.total and len(report.skipped) / report.total > self.cfg.max_bad_fraction:
            raise DataError(
                f"{len(report.skipped)} of {report.total} rows are unusable (> data.max_bad_fraction="
                f"{self.cfg.max_bad_fraction}); fix the data or raise the threshold.\n{report.summary()}"
            )

    @torch.no_grad()
    def _encode_and_save(self, batch: list[Any], hflip: bool) -> None:
        vae = self.pipe.vae
        k_per = [b[2].shape[0] for b in batch]
        pixels = torch.cat([b[2] for b in batch]).to(vae.device, vae.dtype)  # [sum K, 3, H, W]
        views = [pixels, pixels.flip(-1)] if hflip else [pixels]
        params = [vae.encode(v).latent_dist.parameters.float().cpu() for v in views]  # [N, 2C, h, w]
        start = 0
        for (_, path, _, time_ids), k in zip(batch, k_per):
            tensors = {f"params_{i}": p[start : start + k].contiguous() for i, p in enumerate(params)}
            tensors["time_ids"] = torch.tensor(time_ids, dtype=torch.int64)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)  # atomic: a half-written file never looks cached
            start += k

    def _build_text(self, prompts: list[str]) -> None:
        missing = [p for p in prompts if not (self.text_dir / f"{prompt_key(p)}.safetensors").is_file()]
        for i in range(0, len(missing), 64):
            chunk = missing[i : i + 64]
            enc = encode_prompts(self.pipe, chunk, self.family)
            for j, p in enumerate(chunk):
                path = self.text_dir / f"{prompt_key(p)}.safetensors"
                save_file({k: v[j].contiguous() for k, v in enc.items()}, str(path))
        for p in prompts:
            self._text[p] = load_file(str(self.text_dir / f"{prompt_key(p)}.safetensors"))

    # ---------------------------------------------------------------------------------------------- serving
    def __len__(self) -> int:
        return len(self.items)

    def batch(
        self, indices: list[int], generator: torch.Generator, *, empty_prompt_prob: float, hflip: bool
    ) -> GroupBatch:
        """Assemble a :class:`GroupBatch`; every random draw comes from ``generator`` (exact resume)."""
        latents, embeds, pooled, time_ids = [], [], [], []
        for idx in indices:
            item = self.items[idx]
            tensors = load_file(str(item.latent_file))
            view = 0
            if hflip and "params_1" in tensors:
                view = int(torch.randint(0, 2, (1,), generator=generator))
            mean, logvar = tensors[f"params_{view}"].chunk(2, dim=1)  # [K, C, h, w] each
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator)
            latents.append(mean + std * noise)
            drop = float(torch.rand((), generator=generator)) < empty_prompt_prob
            text = self._text["" if drop else item.prompt]
            embeds.append(text["prompt_embeds"])
            if "pooled_embeds" in text:
                pooled.append(text["pooled_embeds"])
            time_ids.append(tensors["time_ids"])
        scaling = float(self.pipe.vae.config.scaling_factor)
        shift = getattr(self.pipe.vae.config, "shift_factor", None) or 0.0
        x0 = (torch.stack(latents) - shift) * scaling  # [B, K, C, h, w]
        return GroupBatch(
            latents=x0,
            prompt_embeds=torch.stack(embeds),
            pooled_embeds=torch.stack(pooled) if pooled else None,
            time_ids=torch.stack(time_ids).float() if self.family == "sdxl" else None,
            indices=torch.tensor(indices),
        )


def _read_meta(path: Path) -> tuple[int, int, int, int, int, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor("time_ids")
    return tuple(int(v) for v in t.tolist())  # type: ignore[return-value]
