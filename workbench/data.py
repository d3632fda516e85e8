"""Preference data: one canonical record, readers for the formats users have, image preprocessing.

Canonical record (DESIGN.md "Contracts"): a prompt, K images, best-first (column 0 preferred; for rankings the full
order), optional per-image captions, scores and a user id. Readers:

* Pick-a-Pic v2 parquet (``jpg_0``, ``jpg_1`` bytes, ``label_0``, ``label_1``, ``caption``), a file or a folder of
  shards. Ties (``label_0 == 0.5``) are dropped by default, as the official Diffusion-DPO code does; kept, they
  become "image 0 wins" pairs like the diffusers example (research/objectives.md section 3.3).
* Image-pair JSONL (``image_0``, ``image_1``, ``prefer_0``, ``prefer_1``, ``prompt``), paths relative to the file.
* Ranking JSONL (``prompt``, ``images`` best-first, optional ``scores``), what ``workbench synth`` writes.

Malformed rows are skipped, counted and reported by row id (``file:row``); images that do not decode are caught
later, when the cache is built, and reported the same way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ImageSource = bytes | str  # encoded bytes, or a file path


@dataclass
class PreferenceRecord:
    prompt: str
    images: list[ImageSource]  # best-first: images[0] is preferred
    row_id: str
    captions: list[str] | None = None
    scores: list[float] | None = None
    user_id: str | None = None

    @property
    def k(self) -> int:
        return len(self.images)


@dataclass
class ReadReport:
    """Rows a reader skipped, by row id, with the reason."""

    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ties_dropped: int = 0

    def skip(self, row_id: str, reason: str) -> None:
        self.skipped.append((row_id, reason))

    def summary(self, limit: int = 10) -> str:
        lines = [f"{len(self.skipped)} of {self.total} rows skipped, {self.ties_dropped} ties dropped"]
        lines += [f"  {rid}: {why}" for rid, why in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


class DataError(ValueError):
    """Bad preference data; the message names the file/row and the fix."""


# ----------------------------------------------------------------------------------------------------- readers
def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path}: folder contains no .parquet shards")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder (data.sources[].path)")
    return [path]


def read_pickapic_parquet(
    path: str | Path, report: ReadReport, *, drop_ties: bool = True
) -> Iterator[PreferenceRecord]:
    import pyarrow.parquet as pq

    for file in _parquet_files(Path(path)):
        pf = pq.ParquetFile(file)
        names = set(pf.schema_arrow.names)
        missing = {"jpg_0", "jpg_1", "label_0", "caption"} - names
        if missing:
            raise DataError(
                f"{file}: missing Pick-a-Pic columns {sorted(missing)}; expected jpg_0, jpg_1, label_0, label_1, caption"
            )
        cols = [c for c in ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "user_id") if c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                rid = f"{file.name}:{row}"
                row += 1
                report.total += 1
                img0, img1, label0 = data["jpg_0"][i], data["jpg_1"][i], data["label_0"][i]
                caption = data["caption"][i]
                if not isinstance(img0, bytes) or not isinstance(img1, bytes) or not img0 or not img1:
                    report.skip(rid, "jpg_0/jpg_1 is empty or not bytes")
                    continue
                if caption is None:
                    report.skip(rid, "caption is null")
                    continue
                if label0 not in (0, 0.5, 1):
                    report.skip(rid, f"label_0={label0!r} is not 0, 0.5 or 1")
                    continue
                if label0 == 0.5:
                    if drop_ties:
                        report.ties_dropped += 1
                        continue
                images: list[ImageSource] = [img1, img0] if label0 == 0 else [img0, img1]
                user = data.get("user_id", [None] * batch.num_rows)[i]
                yield PreferenceRecord(str(caption), images, rid, user_id=None if user is None else str(user))


def _read_jsonl(path: Path, report: ReadReport) -> Iterator[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.sources[].path)")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rid = f"{path.name}:{n}"
            report.total += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip(rid, f"not JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                report.skip(rid, "line is not a JSON object")
                continue
            yield rid, obj


def _resolve(base: Path, p: Any) -> str:
    q = Path(str(p))
    return str(q if q.is_absolute() else base / q)


def read_pair_jsonl(
    path: str | Path, report: ReadReport, *, drop_ties: bool = True
) -> Iterator[PreferenceRecord]:
    path = Path(path)
    for rid, obj in _read_jsonl(path, report):
        try:
            prompt, i0, i1 = obj["prompt"], obj["image_0"], obj["image_1"]
            p0, p1 = float(obj["prefer_0"]), float(obj["prefer_1"])
        except (KeyError, TypeError, ValueError) as exc:
            report.skip(rid, f"needs prompt, image_0, image_1, prefer_0, prefer_1 ({exc})")
            continue
        if p0 == p1:
            if drop_ties:
                report.ties_dropped += 1
                continue
        images = [_resolve(path.parent, i0), _resolve(path.parent, i1)]
        if p1 > p0:
            images.reverse()
        yield PreferenceRecord(str(prompt), list(images), rid, user_id=obj.get("user_id"))


def read_ranking_jsonl(path: str | Path, report: ReadReport, **_: Any) -> Iterator[PreferenceRecord]:
    path = Path(path)
    for rid, obj in _read_jsonl(path, report):
        images = obj.get("images")
        if not isinstance(obj.get("prompt"), str) or not isinstance(images, list) or len(images) < 2:
            report.skip(rid, "needs 'prompt' (str) and 'images' (list of >= 2 paths, best first)")
            continue
        scores = obj.get("scores")
        yield PreferenceRecord(
            obj["prompt"],
            [_resolve(path.parent, p) for p in images],
            rid,
            captions=obj.get("captions"),
            scores=[float(s) for s in scores] if isinstance(scores, list) else None,
            user_id=obj.get("user_id"),
        )


READERS = {
    "pickapic_parquet": read_pickapic_parquet,
    "pair_jsonl": read_pair_jsonl,
    "ranking_jsonl": read_ranking_jsonl,
}


def read_records(
    sources: Sequence[Any], *, drop_ties: bool = True, max_samples: int | None = None, pairwise: bool = True
) -> tuple[list[PreferenceRecord], ReadReport]:
    """Read every source (``DataSource`` models or dicts with format/path) into canonical records.

    ``pairwise``: reduce K-wise rankings to (best, worst) pairs, the usual choice for pairwise objectives.
    """
    report = ReadReport()
    records: list[PreferenceRecord] = []
    for src in sources:
        fmt = src["format"] if isinstance(src, dict) else src.format
        path = src["path"] if isinstance(src, dict) else src.path
        if fmt not in READERS:
            raise DataError(f"data.sources[].format {fmt!r} unknown; use one of {sorted(READERS)}")
        for rec in READERS[fmt](path, report, drop_ties=drop_ties):
            if pairwise and rec.k > 2:
                rec.images = [rec.images[0], rec.images[-1]]
                rec.scores = [rec.scores[0], rec.scores[-1]] if rec.scores else None
                rec.captions = [rec.captions[0], rec.captions[-1]] if rec.captions else None
            records.append(rec)
            if max_samples is not None and len(records) >= max_samples:
                return records, report
    return records, report


# ----------------------------------------------------------------------------------------------- preprocessing
def load_image(src: ImageSource) -> Any:
    """Decode to an RGB PIL image; raises ``DataError`` naming the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image does not decode: {exc}") from exc
    return img.convert("RGB")


@dataclass(frozen=True)
class CropInfo:
    """SDXL micro-conditioning: the real original size and the crop offset in the resized image."""

    original_size: tuple[int, int]  # (height, width) of the first image before resizing
    crop_top_left: tuple[int, int]  # (top, left)


def preprocess_group(
    images: Sequence[Any], resolution: int, *, crop: str = "center", rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, CropInfo]:
    """All images of a group get the same resize and the same crop (diffusers SDXL DPO example: ``jpg_1`` is resized
    to ``jpg_0``'s size, then the stack is cropped jointly). Returns ``[K, 3, res, res]`` in [-1, 1] and the crop."""
    from PIL import Image

    w0, h0 = images[0].size
    scale = resolution / min(w0, h0)
    new_w, new_h = max(resolution, round(w0 * scale)), max(resolution, round(h0 * scale))
    if crop == "random":
        gen = rng if rng is not None else np.random.default_rng(0)
        top = int(gen.integers(0, new_h - resolution + 1))
        left = int(gen.integers(0, new_w - resolution + 1))
    else:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    out = []
    for img in images:
        img = img.resize((w0, h0), Image.BICUBIC) if img.size != (w0, h0) else img
        img = img.resize((new_w, new_h), Image.BILINEAR)
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        out.append(arr)
    return torch.stack(out), CropInfo((h0, w0), (top, left))
