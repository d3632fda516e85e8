"""Soft preference labels from a scorer (SmPO's smoothing), for ``workbench synth`` and ``workbench relabel``.

The rule, as SmPO's preprocessing and data loader compute it (JaydenLyh/SmPO `` preprocessing.py`` L10-23: PickScore
of both images, ``ps_label_0 = 1 if ps_score_0 > ps_score_1 else 0``; ``train.py`` L739-747: the label)::

    n     = (score - min) / (max - min)              min / max: over every score of the data scored
    p     = exp(n_w) / (exp(n_w) + exp(n_l)) = sigmoid(n_w - n_l)                 in [0.5, 0.731]

Symbol map: ``score`` = the scorer's raw output (SmPO: raw PickScore cosine, without ``logit_scale``; this
workbench's ``pickscore`` scorer returns 100 x cosine, so SmPO's constants 0.11543526500463486 / 0.28201571106910706
read 11.5435 / 28.2016 in its units); ``_w`` / ``_l`` = the higher / lower scored image: the pair order is the
scorer's, not the human's. SmPO's min / max are global constants from the authors' scoring pass; here they are
recomputed from the data scored (``score_range=None``) or given explicitly. Human ties (``label_0 = 0.5``) are kept
in the files and still removed when the data is read (``data.drop_ties``), as SmPO's ``train.py`` L806-811 does.

Columns written (Pick-a-Pic parquet; the same keys per line in pair JSONL): ``score_0``, ``score_1`` (raw scores),
``soft_label_0`` = P(image 0 preferred) = ``sigmoid(n_0 - n_1)``, ``soft_label_1`` = 1 - ``soft_label_0``,
``scorer`` (its name). The human labels (``label_0`` / ``label_1``, ``prefer_0`` / ``prefer_1``) stay; readers use
the soft labels and the scorer's order with ``data.sources[].labels: scorer``.

Relabelling an existing dataset adds these columns to its files in place (no second copy of the images): scores are
appended batch by batch to a side folder (``PATH.relabel/`` beside a file, ``.relabel/`` inside a folder of shards),
so an interrupted run resumes where it stopped; when every row is scored, min / max are taken and each file is
rewritten atomically with the new columns.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data import OutsidePathError, resolve_image_path

ScoreFn = Callable[[Any, list[str]], Any]  # (images [B, 3, H, W] float in [0, 1], prompts) -> [B] scores
SOFT_COLUMNS = ("score_0", "score_1", "soft_label_0", "soft_label_1", "scorer")


# ----------------------------------------------------------------------------------------------------- pure rules
def soft_label(score_w: float, score_l: float, lo: float, hi: float) -> float:
    """SmPO's smoothed label ``sigmoid(n_w - n_l)`` with ``n = (score - lo) / (hi - lo)``: the probability that the
    image scored ``score_w`` is preferred over the one scored ``score_l`` (< 0.5 when ``score_w < score_l``)."""
    if not hi > lo:
        raise ValueError(f"score range needs max > min, got min {lo}, max {hi}")
    gap = (score_w - score_l) / (hi - lo)
    return 1.0 / (1.0 + math.exp(-gap))


def score_range(scores: Sequence[float]) -> tuple[float, float]:
    """Min and max of the finite scores (SmPO's normalisation constants, recomputed from the data)."""
    finite = [s for s in scores if s is not None and math.isfinite(s)]
    if not finite:
        raise ValueError("no finite scores to take a min / max from")
    lo, hi = min(finite), max(finite)
    if hi == lo:
        hi = lo + 1.0  # every score equal: every label is 0.5 whatever the scale
    return lo, hi


def soft_labels(
    scores_0: Sequence[float | None], scores_1: Sequence[float | None], rng: tuple[float, float] | None = None
) -> list[float | None]:
    """``soft_label_0`` per pair (None where a score is missing); ``rng`` = (min, max), default the data's own."""
    lo, hi = rng if rng is not None else score_range([*scores_0, *scores_1])  # pyright: ignore[reportArgumentType]
    return [
        None
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b))
        else soft_label(a, b, lo, hi)
        for a, b in zip(scores_0, scores_1)
    ]


# ------------------------------------------------------------------------------------------------------ scoring
def decode(img: bytes | str) -> np.ndarray:
    """Encoded bytes or a file path -> ``H x W x 3`` uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(img) if isinstance(img, bytes) else img) as im:
        return np.asarray(im.convert("RGB"))


def score_images(
    scorer: ScoreFn, images: Sequence[np.ndarray], prompts: Sequence[str], device: str
) -> list[float]:
    """Score uint8 images with their prompts, batching images of one size together (a scorer takes one tensor)."""
    import torch

    from samplers.generate import from_uint8

    out: list[float] = [math.nan] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    for idx in by_size.values():
        x = from_uint8([images[i] for i in idx]).to(device)
        with torch.no_grad():
            s = scorer(x, [prompts[i] for i in idx])
        for i, v in zip(idx, s.float().cpu().tolist()):
            out[i] = float(v)
    return out


# ------------------------------------------------------------------------------------------- relabel a dataset
@dataclass
class RelabelResult:
    files: list[Path]
    rows: int
    scored_now: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (row id, reason)
    score_min: float = math.nan
    score_max: float = math.nan
    seconds: float = 0.0


class _Sidecar:
    """Scores of one data file, appended per batch: ``{"row": i, "s": [score_0, score_1]}`` or ``{"row": i, "error":
    reason}``; what a resumed run reads back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[int, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from an interrupted append: rescored
                    continue
                self.rows[int(obj["row"])] = obj

    def append(self, entries: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())
        for e in entries:
            self.rows[int(e["row"])] = e


def _state_dir(path: Path) -> Path:
    return path / ".relabel" if path.is_dir() else path.with_name(path.name + ".relabel")


def _check_identity(state: Path, identity: dict[str, Any], fresh: bool) -> None:
    marker = state / "relabel.json"
    if fresh and state.is_dir():
        for p in state.glob("*"):
            p.unlink()
    if marker.is_file():
        existing = json.loads(marker.read_text(encoding="utf-8"))
        if existing != identity:
            raise ValueError(
                f"{state} holds scores from another relabel run ({existing}); rerun with the same scorer, or pass "
                "--fresh to discard them"
            )
    else:
        state.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(identity), encoding="utf-8")


def relabel(
    path: str | Path,
    fmt: str,
    scorer: ScoreFn,
    scorer_name: str,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    rng: tuple[float, float] | None = None,
    fresh: bool = False,
    max_failed: float = 0.01,
    progress: Callable[[str], None] | None = None,
    allow_outside_paths: bool = False,
) -> RelabelResult:
    """Add ``score_*`` / ``soft_label_*`` / ``scorer`` to a Pick-a-Pic parquet (a file or a folder of shards) or a
    pair JSONL file, in place, scoring ``batch_size`` pairs at a time and resuming from the side folder.

    Rows whose images do not decode get null scores and labels (skipped when read with ``labels: scorer``); more
    than ``max_failed`` of them (a fraction) is refused before anything is rewritten. Pair JSONL image paths must lie
    inside the file's folder, as the trainer reads them, unless ``allow_outside_paths``; a row naming one outside
    fails with that reason and nothing outside is read."""
    path = Path(path)
    if fmt not in ("pickapic_parquet", "pair_jsonl"):
        raise ValueError(f"relabel format {fmt!r}: use pickapic_parquet or pair_jsonl")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    state = _state_dir(path)
    _check_identity(state, {"scorer": scorer_name, "format": fmt}, fresh)
    files = _files(path, fmt)
    result = RelabelResult(files=files, rows=0, scored_now=0)
    sidecars: dict[Path, _Sidecar] = {}
    for file in files:
        key = file.relative_to(path).as_posix().replace("/", "__") if path.is_dir() else file.name
        side = _Sidecar(state / f"{key}.scores.jsonl")  # shards of the same name in subfolders stay apart
        sidecars[file] = side
        for rows in _batches(file, fmt, batch_size, allow_outside_paths):
            result.rows += len(rows)
            todo = [r for r in rows if r.index not in side.rows]
            if not todo:
                continue
            entries = _score_rows(todo, scorer, device, file)
            side.append(entries)
            result.scored_now += len(todo)
            if progress:
                progress(f"{file.name}: {max(side.rows) + 1} rows scored")
    all_scores: list[float] = []
    for file, side in sidecars.items():
        for e in side.rows.values():
            if "s" in e:
                all_scores.extend(e["s"])
            else:
                result.failed.append((f"{file.name}:{e['row']}", str(e.get("error"))))
    if result.rows and len(result.failed) > max_failed * result.rows:
        raise ValueError(
            f"{len(result.failed)} of {result.rows} rows failed to score (first: {result.failed[0]}); above the "
            f"{max_failed:.0%} threshold, nothing was rewritten. Fix or drop those rows and rerun (scores so far are kept)"
        )
    lo, hi = rng if rng is not None else score_range(all_scores)
    result.score_min, result.score_max = lo, hi
    for file, side in sidecars.items():
        _rewrite(file, fmt, side, scorer_name, (lo, hi))
    (state / "done.json").write_text(
        json.dumps({"rows": result.rows, "failed": len(result.failed), "score_min": lo, "score_max": hi}),
        encoding="utf-8",
    )
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class _Row:
    index: int
    images: tuple[bytes | str, bytes | str]
    prompt: str | None
    error: str | None = (
        None  # why the row cannot be scored, known before decoding (a path outside the folder)
    )


def _files(path: Path, fmt: str) -> list[Path]:
    if fmt == "pickapic_parquet" and path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if ".relabel" not in p.parts)
        if not files:
            raise ValueError(f"{path}: folder contains no .parquet shards")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    return [path]


def _batches(file: Path, fmt: str, batch_size: int, allow_outside: bool = False) -> Iterator[list[_Row]]:
    if fmt == "pickapic_parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        missing = {"jpg_0", "jpg_1", "caption"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{file}: missing Pick-a-Pic columns {sorted(missing)} (jpg_0, jpg_1, caption)")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=["jpg_0", "jpg_1", "caption"]):
            d = batch.to_pydict()
            rows = [
                _Row(row + i, (d["jpg_0"][i], d["jpg_1"][i]), d["caption"][i]) for i in range(batch.num_rows)
            ]
            row += batch.num_rows
            yield rows
        return
    rows: list[_Row] = []
    for i, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
        try:
            obj = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            continue  # blank or malformed lines are left as they are (the reader reports them)
        try:  # the trainer's rule (resolve_image_path): images inside the file's folder unless trusted
            i0, i1 = (
                resolve_image_path(file.parent, obj.get(k), allow_outside=allow_outside)
                for k in ("image_0", "image_1")
            )
            rows.append(_Row(i, (i0, i1), obj.get("prompt")))
        except OutsidePathError as exc:
            rows.append(_Row(i, ("", ""), obj.get("prompt"), error=str(exc)))
        if len(rows) == batch_size:
            yield rows
            rows = []
    if rows:
        yield rows


def _score_rows(rows: list[_Row], scorer: ScoreFn, device: str, file: Path) -> list[dict[str, Any]]:
    good: list[tuple[_Row, np.ndarray, np.ndarray]] = []
    entries: list[dict[str, Any]] = []
    for r in rows:
        if r.error is not None:
            entries.append({"row": r.index, "error": r.error})
            continue
        if not isinstance(r.prompt, str):
            entries.append({"row": r.index, "error": "caption / prompt is missing"})
            continue
        try:
            good.append((r, decode(r.images[0]), decode(r.images[1])))
        except Exception as exc:  # corrupt bytes, missing file: counted, reported by row
            entries.append({"row": r.index, "error": f"image does not decode ({type(exc).__name__}: {exc})"})
    if good:
        images = [im for _, a, b in good for im in (a, b)]
        prompts = [str(r.prompt) for r, _, _ in good for _ in range(2)]
        s = score_images(scorer, images, prompts, device)
        for j, (r, _, _) in enumerate(good):
            pair = [s[2 * j], s[2 * j + 1]]
            if all(math.isfinite(v) for v in pair):
                entries.append({"row": r.index, "s": pair})
            else:
                entries.append({"row": r.index, "error": f"scorer returned {pair}"})
    return sorted(entries, key=lambda e: e["row"])


def _rewrite(file: Path, fmt: str, side: _Sidecar, scorer_name: str, rng: tuple[float, float]) -> None:
    def columns(n: int, index: Sequence[int]) -> dict[str, list[Any]]:
        s0 = [side.rows.get(i, {}).get("s", [None, None])[0] for i in index]
        s1 = [side.rows.get(i, {}).get("s", [None, None])[1] for i in index]
        p0 = soft_labels(s0, s1, rng)
        return {
            "score_0": s0,
            "score_1": s1,
            "soft_label_0": p0,
            "soft_label_1": [None if p is None else 1.0 - p for p in p0],
            "scorer": [scorer_name] * n,
        }

    tmp = file.with_name(file.name + ".tmp")
    if fmt == "pickapic_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(file)
        new = columns(table.num_rows, range(table.num_rows))
        for name in SOFT_COLUMNS:
            if name in table.column_names:
                table = table.drop_columns([name])
            typ = pa.string() if name == "scorer" else pa.float64()
            table = table.append_column(name, pa.array(new[name], typ))
        pq.write_table(table, tmp)
    else:
        lines = file.read_text(encoding="utf-8").splitlines()
        new = columns(len(lines), range(len(lines)))
        out = []
        for i, line in enumerate(lines):
            try:
                obj = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                obj.update({k: new[k][i] for k in SOFT_COLUMNS})
                line = json.dumps(obj)
            out.append(line)
        tmp.write_text("".join(line + "\n" for line in out), encoding="utf-8")
    tmp.replace(file)


def finalise_synth_pairs(pairs_dir: Path, scorer_name: str, rng: tuple[float, float] | None = None) -> int:
    """Soft labels for a ``workbench synth`` folder once every shard is written: min / max over all the pairs'
    scores (``score_0`` / ``score_1``, the synth scorer's), then ``soft_label_*`` added to each shard in place.
    Returns the number of pairs labelled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(pairs_dir.glob("shard-*.parquet"))
    tables = {f: pq.read_table(f) for f in files}
    scores = [
        v
        for t in tables.values()
        for c in ("score_0", "score_1")
        for v in t.column(c).to_pylist()
        if v is not None
    ]
    if not scores:
        return 0
    lo, hi = rng if rng is not None else score_range(scores)
    n = 0
    for f, table in tables.items():
        p0 = soft_labels(table.column("score_0").to_pylist(), table.column("score_1").to_pylist(), (lo, hi))
        for name, values in (
            ("soft_label_0", p0),
            ("soft_label_1", [None if p is None else 1.0 - p for p in p0]),
        ):
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, pa.array(values, pa.float64()))
        tmp = f.with_name(f.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(f)
        n += table.num_rows
    (pairs_dir.parent / "soft_labels.json").write_text(
        json.dumps({"scorer": scorer_name, "score_min": lo, "score_max": hi, "pairs": n}), encoding="utf-8"
    )
    return n
