"""Preference data: one canonical record, readers for the formats users have, image preprocessing.

Canonical record (DESIGN.md "Contracts"): a prompt, K images, best-first (column 0 preferred; for rankings the full
order), the probability that image 0 is preferred over image 1 (soft labels; 1.0 for a hard label), optional
per-image captions, scores (higher = better) and a user id. Readers:

* Pick-a-Pic v2 parquet (``jpg_0``, ``jpg_1`` bytes, ``label_0``, ``label_1``, ``caption``), a file or a folder of
  shards. Ties (``label_0 == 0.5``) are dropped by default, as the official Diffusion-DPO code does; kept, they
  keep the file's image order with ``pref_prob = 0.5`` (a hard-label objective reads them as "image 0 wins", like
  the diffusers example; research/objectives.md section 3.3). ``score_0`` / ``score_1`` columns (what
  ``workbench synth`` adds) become the record's scores.
* Soft labels from a scorer (``data.sources[].labels: scorer``): the ``soft_label_0`` / ``soft_label_1`` columns
  (parquet) or keys (pair JSONL) that ``workbench relabel`` and ``workbench synth`` write (:mod:`samplers.relabel`)
  decide the order (the higher first) and ``pref_prob = max(s0, s1) / (s0 + s1)``, SmPO's rule; human ties are still
  dropped by ``drop_ties``, and rows without a soft label are skipped and reported.
* Image-pair JSONL (``image_0``, ``image_1``, ``prefer_0``, ``prefer_1``, ``prompt``), paths relative to the file.
  ``prefer_*`` may be soft (0.7 / 0.3, or unnormalised counts such as votes): the preferred image goes first and
  ``pref_prob = max(p0, p1) / (p0 + p1)``. Equal values are a tie (dropped by default; kept: 0.5, file order).
* Ranking JSONL (``prompt``, ``images`` best-first, optional ``scores`` best-first, i.e. non-increasing), what
  ``workbench synth`` writes. A ranking whose best and worst scores are equal (so all of them are) is a tie, dropped
  by default whether it is used whole or reduced to its (best, worst) pair. Partial ties (``[3, 1, 1]``) are kept:
  the order among tied images is arbitrary, and the scores carry the tie for an objective that reads them.
* The vote store of ``workbench app`` (``app_votes``, the SQLite file), read in place: its active votes as the pairs
  its Pick-a-Pic export holds (K-wise votes expanded as :mod:`apps.store` documents; ties at 0.5, dropped by default).

:func:`read_records` reads a list of sources and shapes the groups for the objective: ``group="pair"`` reduces each
ranking to (best, worst), ``group="ranking"`` keeps all K; groups smaller than ``min_k`` are skipped and reported.

Malformed rows are skipped, counted and reported by row id (``file:row``); images that do not decode are caught
later, when the cache is built, and reported the same way.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

ImageSource = bytes | str  # encoded bytes, or a file path
Grouping = Literal["pair", "ranking"]


@dataclass
class PreferenceRecord:
    prompt: str
    images: list[ImageSource]  # best-first: images[0] is preferred
    row_id: str
    captions: list[str] | None = None
    scores: list[float] | None = None  # per image, best-first (non-increasing), higher = better
    user_id: str | None = None
    #: P(images[0] preferred over images[1]) in [0.5, 1] (soft labels; 0.5 for a kept tie); None = hard (1.0)
    pref_prob: float | None = None

    @property
    def k(self) -> int:
        return len(self.images)


@dataclass
class ReadReport:
    """Rows a reader skipped, by row id, with the reason."""

    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ties_dropped: int = 0
    #: rows that were kept but changed or look suspect, by kind (one summary line per kind, not one per row)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, row_id: str, reason: str) -> None:
        self.skipped.append((row_id, reason))

    def note(self, kind: str, row_id: str) -> None:
        self.notes.setdefault(kind, []).append(row_id)

    def summary(self, limit: int = 10) -> str:
        lines = [f"{len(self.skipped)} of {self.total} rows skipped, {self.ties_dropped} ties dropped"]
        lines += [f"  {rid}: {why}" for rid, why in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        for kind, rows in self.notes.items():
            more = f", ... ({len(rows) - 3} more)" if len(rows) > 3 else ""
            lines.append(f"{len(rows)} rows kept with {kind}: {', '.join(rows[:3])}{more}")
        return "\n".join(lines)

    def nothing_usable(self) -> str:
        """Why no group is left, in words that match the counts (ties are dropped, not skipped)."""
        if self.total == 0:
            return "no preference groups: the data sources hold no rows (an empty file or folder?)"
        kept_ties = (
            " To train on ties, set data.drop_ties=false (kept ties get pref_prob 0.5; a hard-label objective "
            "reads them as 'image 0 wins')."
            if self.ties_dropped
            else ""
        )
        if self.ties_dropped == self.total:
            return (
                f"no preference groups: all {self.total} rows are ties (equal labels), and data.drop_ties=true "
                f"(the default) drops ties.{kept_ties}"
            )
        return (
            f"no preference groups: none of the {self.total} rows is usable ({len(self.skipped)} skipped, "
            f"{self.ties_dropped} ties dropped).{kept_ties}\n{self.summary()}"
        )

    def write_jsonl(self, path: str | Path) -> None:
        """Every skipped row (``{"row", "reason"}``), then every kept row with a note (``{"row", "note"}``)."""
        lines = [json.dumps({"row": rid, "reason": why}) for rid, why in self.skipped]
        lines += [json.dumps({"row": rid, "note": kind}) for kind, rows in self.notes.items() for rid in rows]
        Path(path).write_text("".join(line + "\n" for line in lines))


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
    path: str | Path,
    report: ReadReport,
    *,
    drop_ties: bool = True,
    labels: str = "human",
    allow_outside_paths: bool = False,
) -> Iterator[PreferenceRecord]:
    import pyarrow.parquet as pq

    for file in _parquet_files(Path(path)):
        try:
            pf = pq.ParquetFile(file)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{file}: not a readable parquet file ({exc}); re-export or remove it") from exc
        names = set(pf.schema_arrow.names)
        missing = {"jpg_0", "jpg_1", "label_0", "caption"} - names
        if missing:
            raise DataError(
                f"{file}: missing Pick-a-Pic columns {sorted(missing)}; expected jpg_0, jpg_1, label_0, label_1, caption"
            )
        wanted = ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "user_id", "score_0", "score_1")
        wanted += ("soft_label_0", "soft_label_1")
        cols = [c for c in wanted if c in names]
        if labels == "scorer" and not {"soft_label_0", "soft_label_1"} <= names:
            raise DataError(_no_soft_labels(file))
        has_scores = {"score_0", "score_1"} <= names
        row = 0
        for data, n_rows in _parquet_batches(pf, file, cols):
            for i in range(n_rows):
                rid = f"{file.name}:{row}"
                row += 1
                report.total += 1
                img0, img1, label0 = data["jpg_0"][i], data["jpg_1"][i], data["label_0"][i]
                if not isinstance(img0, bytes) or not isinstance(img1, bytes) or not img0 or not img1:
                    report.skip(rid, "jpg_0/jpg_1 is empty or not bytes")
                    continue
                if img0 == img1:
                    report.skip(rid, "jpg_0 and jpg_1 are the same image (no preference to learn)")
                    continue
                caption, why = _caption_text(data["caption"][i])
                if caption is None:
                    report.skip(rid, why)
                    continue
                if label0 not in (0, 0.5, 1):
                    report.skip(rid, f"label_0={label0!r} is not 0, 0.5 or 1")
                    continue
                if label0 == 0.5 and drop_ties:
                    report.ties_dropped += 1
                    continue
                swap = label0 == 0
                pref = 0.5 if label0 == 0.5 else 1.0
                if labels == "scorer":
                    soft = _soft_pref(data["soft_label_0"][i], data["soft_label_1"][i])
                    if soft is None:
                        report.skip(rid, "no soft label (its images did not score); rerun workbench relabel")
                        continue
                    swap, pref = soft
                images: list[ImageSource] = [img1, img0] if swap else [img0, img1]
                scores = None
                if has_scores and data["score_0"][i] is not None and data["score_1"][i] is not None:
                    s0, s1 = float(data["score_0"][i]), float(data["score_1"][i])
                    scores = [s1, s0] if swap else [s0, s1]
                user = data.get("user_id", [None] * n_rows)[i]
                yield PreferenceRecord(
                    caption,
                    images,
                    rid,
                    scores=scores,
                    user_id=None if user is None else str(user),
                    pref_prob=pref,
                )


def _parquet_batches(pf: Any, file: Path, cols: list[str]) -> Iterator[tuple[dict[str, list[Any]], int]]:
    """``pf``'s rows as column lists, 256 at a time; a shard that breaks mid-file is named with the first row it
    could not read, instead of pyarrow's bare error."""
    batches, row = pf.iter_batches(batch_size=256, columns=cols), 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{file}:{row}: the parquet file is damaged from this row on ({exc}); re-export or remove it"
            ) from exc
        row += batch.num_rows
        yield batch.to_pydict(), batch.num_rows


def _caption_text(value: Any) -> tuple[str | None, str]:
    """A caption cell as text, or ``(None, why)``: UTF-8 bytes (a binary column) are decoded, not turned into the
    text ``"b'...'"``; bytes that are not UTF-8 and values that are not text are refused."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            return None, (
                f"caption is not UTF-8 text (byte {exc.start + 1} of {len(value)}); re-encode the caption column "
                "as UTF-8 strings"
            )
    if isinstance(value, str):
        return value, ""
    if value is None:
        return None, "caption is null"
    return None, f"caption is {type(value).__name__} {value!r:.40}, not text"


def _no_soft_labels(file: Path) -> str:
    return (
        f"{file}: data.sources[].labels is scorer, but it has no soft_label_0 / soft_label_1; add them with "
        f"`workbench relabel {file} --scorer NAME` (or read the human labels: labels: human)"
    )


def _soft_pref(s0: Any, s1: Any) -> tuple[bool, float] | None:
    """(swap, pref_prob) from a row's soft labels: the higher first; None when they are missing or invalid."""
    try:
        a, b = float(s0), float(s1)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b < 0 or a + b <= 0:
        return None
    return b > a, max(a, b) / (a + b)


def _read_jsonl(path: Path, report: ReadReport) -> Iterator[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.sources[].path)")
    with path.open("rb") as f:  # decoded line by line: one non-UTF-8 row is skipped, not the whole file
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            rid = f"{path.name}:{n}"
            report.total += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.skip(
                    rid, f"not UTF-8 text (byte {exc.start + 1} of the line); re-save the file as UTF-8"
                )
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip(rid, f"not JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                report.skip(rid, "line is not a JSON object")
                continue
            yield rid, obj


class OutsidePathError(ValueError):
    """An image path of a data row that is not a path inside the dataset's folder (the row is skipped)."""


def resolve_image_path(base: Path, p: Any, *, allow_outside: bool = False) -> str:
    """The path of an image named in a JSONL file in folder ``base``: relative paths are relative to ``base``.

    Unless ``allow_outside`` (``data.sources[].allow_outside_paths``), the path must resolve inside ``base``, with
    symlinks followed: ``../../etc/passwd``, an absolute path elsewhere, or a link pointing out are refused, so a
    downloaded dataset file cannot make the trainer read (and cache, and show) files outside its folder.
    """
    if not isinstance(p, str) or not p:
        raise OutsidePathError(f"image path {p!r} is not a non-empty string")
    q = Path(p)
    path = q if q.is_absolute() else base / q
    if allow_outside:
        return str(path)
    try:
        inside = path.resolve().is_relative_to(base.resolve())
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise OutsidePathError(f"image path {p!r} is not a usable path ({exc})") from exc
    if not inside:
        raise OutsidePathError(
            f"image path {p!r} resolves outside the dataset folder {base} (symlinks are followed); move the images "
            "into that folder, or set data.sources[].allow_outside_paths=true for a file you trust"
        )
    return str(path)


def dedupe_group(rec: PreferenceRecord, keys: Sequence[Any], report: ReadReport) -> PreferenceRecord | None:
    """``rec`` without the images whose ``keys`` (paths, bytes or content digests) repeat an earlier image of the
    group: a ranking keeps the first (better-ranked) copy and notes the row; a group left with fewer than two images
    (a "pair" of one image twice) is skipped and reported."""
    keep: list[int] = []
    seen: set[Any] = set()
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == len(keys):
        return rec
    if len(keep) < 2 <= len(keys):
        report.skip(rec.row_id, "its images are all the same image (no preference to learn)")
        return None
    report.note("duplicate images dropped from the group", rec.row_id)
    out = replace(
        rec,
        images=[rec.images[i] for i in keep],
        captions=[rec.captions[i] for i in keep] if rec.captions else None,
        scores=[rec.scores[i] for i in keep] if rec.scores else None,
    )
    # only groups of K > 2 get here (rankings): their pref_prob is that of their first two images
    return replace(out, pref_prob=_pref_prob_of_order(out.scores, 1))


def read_pair_jsonl(
    path: str | Path,
    report: ReadReport,
    *,
    drop_ties: bool = True,
    labels: str = "human",
    allow_outside_paths: bool = False,
) -> Iterator[PreferenceRecord]:
    path = Path(path)
    for rid, obj in _read_jsonl(path, report):
        try:
            prompt, i0, i1 = obj["prompt"], obj["image_0"], obj["image_1"]
            p0, p1 = float(obj["prefer_0"]), float(obj["prefer_1"])
        except (KeyError, TypeError, ValueError) as exc:
            report.skip(rid, f"needs prompt, image_0, image_1, prefer_0, prefer_1 ({exc})")
            continue
        if not isinstance(prompt, str):
            report.skip(rid, f"'prompt' is {type(prompt).__name__}, not a string")
            continue
        try:
            images: list[ImageSource] = [
                resolve_image_path(path.parent, i, allow_outside=allow_outside_paths) for i in (i0, i1)
            ]
        except OutsidePathError as exc:
            report.skip(rid, str(exc))
            continue
        if os.path.normpath(images[0]) == os.path.normpath(images[1]):
            report.skip(rid, "image_0 and image_1 are the same file (no preference to learn)")
            continue
        if not (math.isfinite(p0) and math.isfinite(p1)) or p0 < 0 or p1 < 0:
            report.skip(rid, f"prefer_0={p0!r}, prefer_1={p1!r}: need finite values >= 0")
            continue
        if p0 == p1 and drop_ties:
            report.ties_dropped += 1
            continue
        swap, pref_prob = p1 > p0, (max(p0, p1) / (p0 + p1) if p0 + p1 > 0 else 0.5)
        if labels == "scorer":
            if "soft_label_0" not in obj:
                raise DataError(_no_soft_labels(path))
            soft = _soft_pref(obj.get("soft_label_0"), obj.get("soft_label_1"))
            if soft is None:
                report.skip(rid, "no soft label (its images did not score); rerun workbench relabel")
                continue
            swap, pref_prob = soft
        if swap:
            images.reverse()
        yield PreferenceRecord(prompt, images, rid, user_id=_user_id(obj), pref_prob=pref_prob)


def _user_id(obj: dict[str, Any]) -> str | None:
    user = obj.get("user_id")
    return None if user is None else str(user)


def read_ranking_jsonl(
    path: str | Path,
    report: ReadReport,
    *,
    drop_ties: bool = True,
    labels: str = "human",
    allow_outside_paths: bool = False,
) -> Iterator[PreferenceRecord]:
    path = Path(path)
    if labels != "human":
        raise DataError(f"{path}: ranking_jsonl orders its images by its own scores; use labels: human")
    for rid, obj in _read_jsonl(path, report):
        images = obj.get("images")
        if not isinstance(obj.get("prompt"), str) or not isinstance(images, list) or len(images) < 2:
            report.skip(rid, "needs 'prompt' (str) and 'images' (list of >= 2 paths, best first)")
            continue
        scores, captions = obj.get("scores"), obj.get("captions")
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != len(images):
                report.skip(rid, f"'scores' must be a list of {len(images)} numbers, one per image")
                continue
            try:
                scores = [float(v) for v in scores]
            except (TypeError, ValueError):
                report.skip(rid, "'scores' holds a value that is not a number")
                continue
            if not all(math.isfinite(v) for v in scores):
                report.skip(rid, "'scores' holds a NaN or infinite value")
                continue
            if any(b > a for a, b in itertools.pairwise(scores)):
                report.skip(rid, f"'scores' {scores} are not best-first (non-increasing) like 'images'")
                continue
            if scores[0] == scores[-1] and drop_ties:  # best == worst: every image ties
                report.ties_dropped += 1
                continue
        if captions is not None and (not isinstance(captions, list) or len(captions) != len(images)):
            report.skip(rid, f"'captions' must be a list of {len(images)} strings, one per image")
            continue
        try:
            resolved: list[ImageSource] = [
                resolve_image_path(path.parent, p, allow_outside=allow_outside_paths) for p in images
            ]
        except OutsidePathError as exc:
            report.skip(rid, str(exc))
            continue
        rec = PreferenceRecord(
            obj["prompt"],
            resolved,
            rid,
            captions=[str(c) for c in captions] if captions is not None else None,
            scores=scores,
            user_id=_user_id(obj),
            pref_prob=_pref_prob_of_order(scores, 1),
        )
        deduped = dedupe_group(
            rec, [os.path.normpath(p) for p in resolved], report
        )  # the same file twice: the better-ranked copy stays
        if deduped is not None:
            yield deduped


def _pref_prob_of_order(scores: list[float] | None, second: int) -> float:
    """A ranking is a hard preference of images[0] over images[second], unless their scores tie."""
    return 0.5 if scores is not None and scores[0] == scores[second] else 1.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_image_folder(
    path: str | Path,
    report: ReadReport,
    *,
    drop_ties: bool = True,
    labels: str = "human",
    allow_outside_paths: bool = False,
) -> Iterator[PreferenceRecord]:
    """Captioned images without preferences: every image in the folder (not recursive, sorted by name) with a
    same-name ``.txt`` caption beside it, one ``K = 1`` record each (row id = the file name). The layout of
    LAION-style folders and of Self-NPO's ``CustomImageDataset`` (G-U-N/Diffusion-NPO ``Self-NPO/train.py`` L91-133,
    which keeps ``.png``/``.jpg`` files that have a ``.txt``). For objectives that need no preference (``self_npo``)
    or only the preferred images (``sft``). An image without a caption, or an empty caption, is skipped and reported;
    so is a symlink leading out of the folder (unless ``allow_outside_paths``). A caption that is not UTF-8 is read
    with replacement characters and noted. ``drop_ties`` / ``labels`` do not apply (no labels)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (data.sources[].path of an image_folder source)")
    if labels != "human":
        raise DataError(
            f"{folder}: labels: {labels} does not apply to image_folder (its images carry no labels)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    for file in files:
        report.total += 1
        caption_file = file.with_suffix(".txt")
        if not caption_file.is_file():
            report.skip(file.name, f"no caption file {caption_file.name} beside it")
            continue
        try:
            resolve_image_path(folder, file.name, allow_outside=allow_outside_paths)
            resolve_image_path(folder, caption_file.name, allow_outside=allow_outside_paths)
        except OutsidePathError as exc:  # a symlink leading out of the folder
            report.skip(file.name, str(exc))
            continue
        raw = caption_file.read_bytes()
        caption = raw.decode("utf-8", errors="replace").strip()
        if not caption:
            report.skip(file.name, f"{caption_file.name} is empty")
            continue
        if "\ufffd" in caption and "\ufffd".encode() not in raw:
            report.note("a caption file that is not UTF-8 (read with replacement characters)", file.name)
        yield PreferenceRecord(caption, [str(file)], file.name)


def read_app_votes(
    path: str | Path,
    report: ReadReport,
    *,
    drop_ties: bool = True,
    labels: str = "human",
    allow_outside_paths: bool = False,
) -> Iterator[PreferenceRecord]:
    """The vote store of ``workbench app`` (SQLite), read in place: its active votes (undone ones left out) expanded
    into pairs exactly as its Pick-a-Pic export is (:func:`apps.store.expand_pairs`: best-of-K gives the best over
    each other image, a ranking all its pairs, a tie pairs at 0.5; both-bad and skip give none)."""
    from apps.store import VoteStore, expand_pairs, training_votes

    db = Path(path)
    if not db.is_file():
        raise DataError(f"{db}: no vote store there (data.sources[].path of an app_votes source)")
    if labels != "human":
        raise DataError(f"{db}: labels: {labels} does not apply to app_votes (the votes are the labels)")
    votes, _ = training_votes(
        VoteStore(db)
    )  # blind before/after votes are the evaluation set: never trained on
    for vote in votes:
        for pair in expand_pairs(vote):
            rid = f"{db.name}:vote{vote.vote_id}:{pair.first}-{pair.second}"
            report.total += 1
            if pair.label_first == 0.5 and drop_ties:
                report.ties_dropped += 1
                continue
            first, second = (vote.round.items[s].path for s in (pair.first, pair.second))
            images: list[ImageSource] = [str(first), str(second)]
            if pair.label_first == 0.0:
                images.reverse()
            yield PreferenceRecord(
                vote.round.prompt,
                images,
                rid,
                user_id=vote.user_id,
                pref_prob=0.5 if pair.label_first == 0.5 else 1.0,
            )


READERS = {
    "pickapic_parquet": read_pickapic_parquet,
    "pair_jsonl": read_pair_jsonl,
    "ranking_jsonl": read_ranking_jsonl,
    "image_folder": read_image_folder,
    "app_votes": read_app_votes,
}


def read_records(
    sources: Sequence[Any],
    *,
    drop_ties: bool = True,
    max_samples: int | None = None,
    group: Grouping = "pair",
    min_k: int = 2,
    pairwise: bool | None = None,
) -> tuple[list[PreferenceRecord], ReadReport]:
    """Read every source (``DataSource`` models or dicts with format/path) into canonical records.

    ``group="pair"`` reduces K-wise rankings to their (best, worst) pair, the usual choice for pairwise objectives;
    ``group="ranking"`` keeps all K images. Groups with fewer than ``min_k`` images are skipped and reported.
    ``drop_ties``: see the module docstring (per format). ``pairwise`` is the old spelling of ``group``.
    """
    if pairwise is not None:
        group = "pair" if pairwise else "ranking"
    if group not in ("pair", "ranking"):
        raise ValueError(f"group={group!r}: use 'pair' (best vs worst) or 'ranking' (all K images)")
    if min_k < 1 or (group == "pair" and min_k > 2):
        raise ValueError(
            f"min_k={min_k} with group={group!r}: a pair has 2 images; min_k > 2 needs 'ranking'"
        )
    report = ReadReport()
    records: list[PreferenceRecord] = []
    for src in sources:
        fmt = src["format"] if isinstance(src, dict) else src.format
        path = src["path"] if isinstance(src, dict) else src.path
        if fmt not in READERS:
            raise DataError(f"data.sources[].format {fmt!r} unknown; use one of {sorted(READERS)}")
        labels = (src.get("labels") if isinstance(src, dict) else getattr(src, "labels", None)) or "human"
        outside = bool(
            src.get("allow_outside_paths")
            if isinstance(src, dict)
            else getattr(src, "allow_outside_paths", False)
        )
        reader = READERS[fmt](path, report, drop_ties=drop_ties, labels=labels, allow_outside_paths=outside)
        for rec in reader:
            if group == "pair" and rec.k > 2:
                rec = _best_vs_worst(rec)
            if rec.k < min_k:
                report.skip(rec.row_id, f"{rec.k} images; the objective needs groups of >= {min_k} (min_k)")
                continue
            _note_caption(rec, report)
            records.append(rec)
            if max_samples is not None and len(records) >= max_samples:
                return records, report
    return records, report


def _note_caption(rec: PreferenceRecord, report: ReadReport) -> None:
    """An empty caption is kept (trained as the unconditional prompt) and noted once in the summary, not once per
    row; captions longer than the text encoder reads are noted by the cache, which knows the tokenizer."""
    if not rec.prompt.strip():
        report.note("an empty caption (trained as the unconditional prompt)", rec.row_id)


def _best_vs_worst(rec: PreferenceRecord) -> PreferenceRecord:
    """A ranking reduced to its first and last image (and their captions and scores)."""
    ends = (0, rec.k - 1)
    return replace(
        rec,
        images=[rec.images[i] for i in ends],
        captions=[rec.captions[i] for i in ends] if rec.captions else None,
        scores=[rec.scores[i] for i in ends] if rec.scores else None,
        pref_prob=_pref_prob_of_order(rec.scores, -1),
    )


# ----------------------------------------------------------------------------------------------- preprocessing
def load_image(src: ImageSource) -> Any:
    """Decode to an RGB PIL image; raises ``DataError`` naming the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.load()
        return img.convert("RGB")
    except UnidentifiedImageError as exc:
        what = "its bytes" if isinstance(src, bytes) else src
        raise DataError(f"image does not decode: {what} is not an image format Pillow reads") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image does not decode: {exc}") from exc


@dataclass(frozen=True)
class CropInfo:
    """SDXL micro-conditioning: the real original size and the crop offset in the resized image."""

    original_size: tuple[int, int]  # (height, width) of the first image before resizing
    crop_top_left: tuple[int, int]  # (top, left)
    resized_size: tuple[int, int]  # (height, width) after resizing, before cropping
    target_size: tuple[int, int]  # (height, width) of the crop

    def flipped(self) -> CropInfo:
        """The same crop of the horizontally flipped image: cropping columns ``[left, left + w)`` and then flipping
        equals cropping the flipped image at ``new_w - w - left``, and that is the offset the flipped view was cut
        at."""
        top, left = self.crop_top_left
        left = self.resized_size[1] - self.target_size[1] - left
        return replace(self, crop_top_left=(top, left))

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL ``add_time_ids``: original size + crop top-left + target size (diffusers ``_get_add_time_ids``)."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def _resized(images: Sequence[Any], resolution: int) -> tuple[list[Any], tuple[int, int]]:
    """Every image resized to the first one's size, then (shorter side) to ``resolution``; and the original size."""
    from PIL import Image

    w0, h0 = images[0].size
    scale = resolution / min(w0, h0)
    new_w, new_h = max(resolution, round(w0 * scale)), max(resolution, round(h0 * scale))
    out = []
    for img in images:
        img = img.resize((w0, h0), Image.Resampling.BICUBIC) if img.size != (w0, h0) else img
        out.append(img.resize((new_w, new_h), Image.Resampling.BILINEAR))
    return out, (h0, w0)


def preprocess_crops(
    images: Sequence[Any],
    resolution: int,
    *,
    crop: str = "center",
    n_crops: int = 1,
    rng: np.random.Generator | None = None,
) -> list[tuple[torch.Tensor, CropInfo]]:
    """``n_crops`` joint crops of a group (one resize): each ``[K, 3, res, res]`` in [-1, 1] with its crop.
    ``crop="random"`` draws each offset from ``rng``; ``"center"`` repeats the one centre crop."""
    resized, original = _resized(images, resolution)
    new_w, new_h = resized[0].size
    gen = rng if rng is not None else np.random.default_rng(0)
    out = []
    for _ in range(n_crops):
        if crop == "random":
            top = int(gen.integers(0, new_h - resolution + 1))
            left = int(gen.integers(0, new_w - resolution + 1))
        else:
            top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
        arrays = [
            torch.from_numpy(
                np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
                / 127.5
                - 1.0
            ).permute(2, 0, 1)
            for img in resized
        ]
        info = CropInfo(original, (top, left), (new_h, new_w), (resolution, resolution))
        out.append((torch.stack(arrays), info))
    return out


def preprocess_group(
    images: Sequence[Any], resolution: int, *, crop: str = "center", rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, CropInfo]:
    """All images of a group get the same resize and the same crop (diffusers SDXL DPO example: ``jpg_1`` is resized
    to ``jpg_0``'s size, then the stack is cropped jointly). Returns ``[K, 3, res, res]`` in [-1, 1] and the crop."""
    return preprocess_crops(images, resolution, crop=crop, n_crops=1, rng=rng)[0]
