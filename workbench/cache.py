"""Disk cache of VAE latents and text embeddings: built once, reused across runs, invalidated when the model changes.

The diffusers DPO example VAE-encodes both images and runs the text encoders every step; here each group is
encoded once. Layout::

    {cache.dir}/latents-{vae fingerprint}-{resolution}-{crop}/{group key}.safetensors
    {cache.dir}/text-{text encoders fingerprint}/{prompt hash}.safetensors

The group key hashes the image bytes (in group order), the crop mode, the number of crops, whether flipped views
are stored, and the file layout. A latent file holds, for each crop ``c`` and view ``v`` (0 = as is, 1 = flipped
horizontally, stored when ``data.hflip``), the VAE posterior parameters ``params_{c}_{v}`` (mean and log-variance,
``[K, 2C, h, w]``), so that training draws a fresh posterior sample each step with its own generator, exactly like
the official code's ``latent_dist.sample()``, at no encoding cost; and ``time_ids`` ``[n_crops, n_views, 6]``, the
SDXL micro-conditioning of each crop and view (the flipped view's crop offset is measured in the flipped image).

Random crops (``data.crop: random``): ``data.random_crops`` crops per group are cut and encoded when the cache is
built (their offsets drawn from a generator seeded by the group key, so they do not depend on which other groups
are cached), and every step draws one of them, and the flip, from the batch generator (exact resume).

What a record says about preference (prompt, ``pref_prob``, per-image ``scores``) is not part of the key: it lives
in the in-memory :class:`CachedItem`, so relabelled data reuses its latents.

Latents are scaled for the UNet as the family's diffusers pipeline undoes when it decodes: SDXL with
``latents_mean`` / ``latents_std`` in the VAE config, ``x0 = (z - mean) * scaling_factor / std``
(StableDiffusionXLPipeline decodes ``x0 * std / scaling_factor + mean``); otherwise
``x0 = (z - shift_factor) * scaling_factor``. The text file stores what the pipeline's own ``encode_prompt``
returns (SDXL: both encoders' penultimate hidden states concatenated, and the pooled output of the second), so
training and generation condition identically.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.batch import GroupBatch
from workbench.data import (
    DataError,
    PreferenceRecord,
    ReadReport,
    dedupe_group,
    load_image,
    preprocess_crops,
)
from workbench.models import fingerprint


def _image_bytes(src: Any) -> bytes:
    if isinstance(src, bytes):
        return src
    try:
        return Path(src).read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise DataError(f"cannot read image file {src}: {exc}") from exc


#: bump when the latent file layout changes, so that files of an older layout are never read as this one
LAYOUT = "v2"  # v2: params_{crop}_{view} and time_ids [n_crops, n_views, 6]


def group_key(record: PreferenceRecord, crop: str, hflip: bool, n_crops: int = 1) -> str:
    return _group_key([hashlib.sha256(_image_bytes(s)).digest() for s in record.images], crop, hflip, n_crops)


def _group_key(digests: list[bytes], crop: str, hflip: bool, n_crops: int) -> str:
    """:func:`group_key` from the images' SHA-256 digests: SHA-256 over each image's digest and the settings'."""
    h = hashlib.sha256()
    for d in [*digests, hashlib.sha256(f"{LAYOUT}:{crop}:{n_crops}:{hflip}".encode()).digest()]:
        h.update(d)
    return h.hexdigest()[:32]


class DamagedCacheError(DataError):
    """A cache file that does not read back (truncated by a full disk or a kill, or edited)."""

    def __init__(self, path: Path, exc: BaseException, cache_dir: Path | str) -> None:
        super().__init__(
            f"cache file {path} is damaged ({exc}). Delete it (rm {path}) or clear the cache (rm -r {cache_dir}, "
            "data.cache.dir): the next run encodes what is missing again."
        )


def _cache_read_errors() -> tuple[type[BaseException], ...]:
    return (SafetensorError, OSError, KeyError, RuntimeError)


@contextlib.contextmanager
def _quiet_text_truncation() -> Iterator[None]:
    """diffusers' ``encode_prompt`` logs every truncated caption in full (one 100,000-character caption is a
    100,000-character warning) and transformers warns about long token sequences; the cache notes such captions once
    in the data summary instead (``PreferenceCache.build``)."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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


def truncated_prompts(pipe: Any, prompts: set[str]) -> set[str]:
    """The prompts longer than the pipeline's tokenizers read (``model_max_length`` tokens, BOS and EOS included):
    ``encode_prompt`` truncates them."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]
    out: set[str] = set()
    with _quiet_text_truncation():
        for tok in tokenizers:
            limit = int(tok.model_max_length)
            for p in prompts:  # a token covers at least one UTF-8 byte: only longer prompts can be cut
                if p not in out and len(p.encode()) + 2 > limit and len(tok(p).input_ids) > limit:
                    out.add(p)
    return out


@dataclass
class CachedItem:
    latent_file: Path
    prompt: str
    time_ids: torch.Tensor  # [n_crops, n_views, 6] int64 SDXL micro-conditioning; view 1 = flipped
    k: int  # images in the group
    pref_prob: float = 1.0  # P(image 0 preferred over image 1)
    scores: tuple[float, ...] | None = None  # per image, best-first

    @property
    def n_crops(self) -> int:
        return int(self.time_ids.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.time_ids.shape[1])


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
        self.has_scores = False  # any item with per-image scores: then every batch carries a scores tensor
        self._text: dict[str, dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------------------- building
    def build(
        self, records: list[PreferenceRecord], report: ReadReport, *, show_progress: bool = True
    ) -> None:
        from tqdm.auto import tqdm

        self.latent_dir.mkdir(parents=True, exist_ok=True)
        self.text_dir.mkdir(parents=True, exist_ok=True)
        hflip, crop, n_crops = self.cfg.hflip, self.cfg.crop, self.cfg.n_crops
        todo: dict[Path, PreferenceRecord] = {}  # one encode per file, even if several records share it
        keyed: list[tuple[PreferenceRecord, Path]] = []
        time_ids: dict[Path, torch.Tensor] = {}  # of the files already cached (and readable)
        damaged: list[str] = []
        for rec in records:
            try:
                digests = [hashlib.sha256(_image_bytes(s)).digest() for s in rec.images]
            except DataError as exc:
                report.skip(rec.row_id, str(exc))
                continue
            deduped = dedupe_group(rec, digests, report)  # the same image under two names
            if deduped is None:
                continue
            if deduped is not rec:
                digests = list(dict.fromkeys(digests))
            rec = deduped
            path = self.latent_dir / f"{_group_key(digests, crop, hflip, n_crops)}.safetensors"
            keyed.append((rec, path))
            if path in time_ids or path in todo:
                continue
            if path.is_file():
                try:  # readable: its header, its time_ids and its last tensor's entry
                    time_ids[path] = _read_time_ids(path)
                    _params_shape(path, n_crops - 1, 1 if hflip else 0, half=False)
                    continue
                except _cache_read_errors() as exc:
                    damaged.append(f"{path.name} ({exc})")
            todo[path] = rec
        if damaged:
            print(
                f"[cache] {len(damaged)} damaged file(s) in {self.latent_dir} encoded again, e.g. {damaged[0]}",
                file=sys.stderr,
            )
        failed: set[Path] = set()
        pending: list[tuple[Path, list[tuple[torch.Tensor, Any]]]] = []
        bar = tqdm(
            total=len(todo), desc="caching VAE latents", disable=not show_progress or not todo, unit="group"
        )
        for path, rec in todo.items():
            try:
                images = [load_image(s) for s in rec.images]
                rng = np.random.default_rng(int(path.stem[:16], 16))  # crops depend on the group only
                crops = preprocess_crops(images, self.cfg.resolution, crop=crop, n_crops=n_crops, rng=rng)
            except DataError as exc:
                report.skip(rec.row_id, str(exc))
                failed.add(path)
                bar.update(1)
                continue
            pending.append((path, crops))
            if sum(p.shape[0] for _, cs in pending for p, _ in cs) >= 16:
                self._encode_and_save(pending, hflip)
                bar.update(len(pending))
                pending = []
        if pending:
            self._encode_and_save(pending, hflip)
            bar.update(len(pending))
        bar.close()
        for rec, path in keyed:  # a record sharing a file with a failed one fails too
            if path in failed and rec is not todo[path]:
                report.skip(rec.row_id, "its images do not decode (see the row with the same images)")
        self._check_bad_fraction(report)
        usable = [(rec, path) for rec, path in keyed if path not in failed]
        prompts = {r.prompt for r, _ in usable}
        cut = truncated_prompts(self.pipe, prompts)
        for rec, _ in usable:
            if rec.prompt in cut:
                report.note(
                    "a caption longer than the text encoder reads (truncated, as the pipeline does)",
                    rec.row_id,
                )
        self._build_text(sorted(prompts | {""}))
        for rec, path in usable:
            if path not in time_ids:
                time_ids[path] = _read_time_ids(path)
            self.items.append(
                CachedItem(
                    path,
                    rec.prompt,
                    time_ids[path],
                    rec.k,
                    1.0 if rec.pref_prob is None else float(rec.pref_prob),
                    tuple(rec.scores) if rec.scores is not None else None,
                )
            )
        self.has_scores = any(item.scores is not None for item in self.items)
        if not self.items:
            raise DataError(report.nothing_usable())

    def _check_bad_fraction(self, report: ReadReport) -> None:
        if report.total and len(report.skipped) / report.total > self.cfg.max_bad_fraction:
            raise DataError(
                f"{len(report.skipped)} of {report.total} rows are unusable (> data.max_bad_fraction="
                f"{self.cfg.max_bad_fraction}); fix the data or raise the threshold.\n{report.summary()}"
            )

    @torch.no_grad()
    def _encode_and_save(
        self, pending: list[tuple[Path, list[tuple[torch.Tensor, Any]]]], hflip: bool
    ) -> None:
        # every crop of every pending group in one stack: [sum over groups of n_crops * K, 3, H, W]
        pixels = torch.cat([p for _, crops in pending for p, _ in crops])
        views = [pixels, pixels.flip(-1)] if hflip else [pixels]
        params = [self._posterior(v) for v in views]  # [N, 2C, h, w] each
        start = 0
        for path, crops in pending:
            tensors: dict[str, torch.Tensor] = {}
            time_ids = []
            for c, (pix, info) in enumerate(crops):
                k = pix.shape[0]
                for v, p in enumerate(params):
                    tensors[f"params_{c}_{v}"] = p[start : start + k].contiguous()
                time_ids.append([info.time_ids()] + ([info.flipped().time_ids()] if hflip else []))
                start += k
            tensors["time_ids"] = torch.tensor(time_ids, dtype=torch.int64)  # [n_crops, n_views, 6]
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(path)  # atomic: a half-written file never looks cached

    def _posterior(self, pixels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        vae = self.pipe.vae
        out = [
            vae.encode(pixels[i : i + chunk].to(vae.device, vae.dtype)).latent_dist.parameters.float().cpu()
            for i in range(0, pixels.shape[0], chunk)
        ]
        return torch.cat(out)

    def _build_text(self, prompts: list[str]) -> None:
        missing, damaged = [], []
        for p in prompts:
            path = self.text_dir / f"{prompt_key(p)}.safetensors"
            if not path.is_file():
                missing.append(p)
                continue
            try:
                self._text[p] = load_file(str(path))
            except _cache_read_errors() as exc:
                damaged.append(f"{path.name} ({exc})")
                missing.append(p)
        if damaged:
            print(
                f"[cache] {len(damaged)} damaged file(s) in {self.text_dir} encoded again, e.g. {damaged[0]}",
                file=sys.stderr,
            )
        for i in range(0, len(missing), 64):
            chunk = missing[i : i + 64]
            with _quiet_text_truncation():
                enc = encode_prompts(self.pipe, chunk, self.family)
            for j, p in enumerate(chunk):
                path = self.text_dir / f"{prompt_key(p)}.safetensors"
                self._text[p] = {k: v[j].contiguous() for k, v in enc.items()}
                tmp = path.with_suffix(".tmp")
                save_file(self._text[p], str(tmp))
                tmp.replace(path)  # atomic, as the latent files

    # ---------------------------------------------------------------------------------------------- serving
    def __len__(self) -> int:
        return len(self.items)

    def text_embedding(self, prompt: str) -> dict[str, torch.Tensor]:
        """The cached text embeddings of ``prompt`` (a prompt of the data, or ``""``): ``prompt_embeds [L, D]`` and,
        for SDXL, ``pooled_embeds [P]``."""
        if prompt not in self._text:
            raise KeyError(f"prompt {prompt!r} is not in the text cache (only the data's prompts and '' are)")
        return self._text[prompt]

    def batch(
        self,
        indices: list[int],
        generator: torch.Generator,
        *,
        empty_prompt_prob: float,
        hflip: bool,
        rows: range | None = None,
    ) -> GroupBatch:
        """Assemble a :class:`GroupBatch`; every random draw comes from ``generator`` (exact resume).

        Per group, in this order: the crop (when more than one is cached), the flip (``hflip`` and flipped views
        cached), the posterior sample, the empty-prompt draw. Groups smaller than the largest K in the batch are
        padded with zero latents (``mask`` False there; ``mask`` is None when every group has the same K).

        ``rows`` (a multi-process run): ``indices`` is the global batch and only its groups ``rows`` are loaded and
        returned; the draws of every group are still made, in order, and K is padded to the global batch's largest,
        so the rows are exactly those of the one-process batch.
        """
        rows = range(len(indices)) if rows is None else rows
        if rows.step != 1 or rows.start < 0 or rows.stop > len(indices) or not len(rows):
            raise ValueError(f"rows {rows} is not a contiguous part of a batch of {len(indices)} groups")
        items = [self.items[i] for i in indices]
        k_max = max(item.k for item in items)
        latents, embeds, pooled, time_ids = [], [], [], []
        for row, item in enumerate(items):
            crop = int(torch.randint(0, item.n_crops, (1,), generator=generator)) if item.n_crops > 1 else 0
            view = int(torch.randint(0, 2, (1,), generator=generator)) if hflip and item.n_views > 1 else 0
            if row not in rows:  # another process's group: make its draws (same shapes), load nothing
                torch.randn(self._params_shape(item.latent_file, crop, view), generator=generator)
                torch.rand((), generator=generator)
                continue
            mean, logvar = self._load_params(item.latent_file, crop, view).chunk(
                2, dim=1
            )  # [K, C, h, w] each
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator)
            x0 = self._unet_latents(mean + std * noise)
            latents.append(torch.cat([x0, x0.new_zeros(k_max - item.k, *x0.shape[1:])]))  # [K_max, C, h, w]
            drop = float(torch.rand((), generator=generator)) < empty_prompt_prob
            text = self._text["" if drop else item.prompt]
            embeds.append(text["prompt_embeds"])
            if "pooled_embeds" in text:
                pooled.append(text["pooled_embeds"])
            # the K images of a group share their crop and flip, so their micro-conditioning: [K_max, 6]
            time_ids.append(item.time_ids[crop, view].expand(k_max, 6))
        items, indices = items[rows.start : rows.stop], indices[rows.start : rows.stop]
        sizes = torch.tensor([item.k for item in items])
        mask = torch.arange(k_max)[None, :] < sizes[:, None]  # [B, K_max]
        scores = None
        if self.has_scores:
            scores = torch.full((len(items), k_max), float("nan"))
            for b, item in enumerate(items):
                if item.scores is not None:
                    scores[b, : item.k] = torch.tensor(item.scores)
        return GroupBatch(
            latents=torch.stack(latents),  # [B, K, C, h, w]
            prompt_embeds=torch.stack(embeds),
            pooled_embeds=torch.stack(pooled) if pooled else None,
            time_ids=torch.stack(time_ids).float() if self.family == "sdxl" else None,  # [B, K, 6]
            indices=torch.tensor(indices),
            mask=None if bool(mask.all()) else mask,
            pref_prob=torch.tensor([item.pref_prob for item in items], dtype=torch.float32),
            scores=scores,
        )

    def _load_params(self, path: Path, crop: int, view: int) -> torch.Tensor:
        try:
            return _load_params(path, crop, view)
        except _cache_read_errors() as exc:  # damaged or deleted under a running job
            raise DamagedCacheError(path, exc, self.cfg.cache.dir) from exc

    def _params_shape(self, path: Path, crop: int, view: int) -> tuple[int, ...]:
        try:
            return _params_shape(path, crop, view, half=True)
        except _cache_read_errors() as exc:
            raise DamagedCacheError(path, exc, self.cfg.cache.dir) from exc

    def _unet_latents(self, z: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample ``[..., C, h, w]`` scaled for the UNet: the inverse of the pipeline's decode."""
        config = self.pipe.vae.config
        scaling = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if self.family == "sdxl" and mean is not None and std is not None:
            shape = (-1, 1, 1)  # per channel
            m = torch.tensor(mean, dtype=z.dtype).view(shape)
            s = torch.tensor(std, dtype=z.dtype).view(shape)
            return (z - m) * scaling / s
        shift = getattr(config, "shift_factor", None) or 0.0
        return (z - shift) * scaling


def _load_params(path: Path, crop: int, view: int) -> torch.Tensor:
    """One crop and view of a group's posterior parameters ``[K, 2C, h, w]`` (only that tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(f"params_{crop}_{view}")


def _params_shape(path: Path, crop: int, view: int, *, half: bool) -> tuple[int, ...]:
    """The shape of :func:`_load_params`'s tensor (``half``: of its mean, ``[K, C, h, w]``), from the header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shape = [int(n) for n in f.get_slice(f"params_{crop}_{view}").get_shape()]
    if half:
        shape[1] //= 2
    return tuple(shape)


def _read_time_ids(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("time_ids")
