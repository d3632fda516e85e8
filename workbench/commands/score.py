"""``workbench score``: score images with registered scorers; print a table and write JSON.

Inputs are image files and/or folders with ``--prompt`` (one for all images, or one per image in sorted order) or
``--prompts-file`` (one line per image), or a JSONL manifest as ``workbench generate`` writes it (``path`` relative to
the manifest's folder, ``prompt``, and optionally ``seed``, ``checkpoint``, ...; extra fields are carried through).

Scorers are given as ``NAME`` or ``NAME:key=value,key=value`` (the options of ``rewards.build_scorer``), e.g.::

    workbench score outputs/generate/manifest.jsonl \\
        --scorer hpsv2.1:path=/weights/HPS_v2.1_compressed.pt --scorer pickscore:path=/weights/PickScore_v1 \\
        --ensemble rank -o scores.json

Unreadable images are skipped and counted (listed under ``skipped`` in the JSON); the command fails when none is left.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="image files, folders of images, or one manifest .jsonl")
    parser.add_argument("--manifest", help="JSONL manifest with at least 'path' and 'prompt' per line")
    parser.add_argument(
        "--prompt", action="append", default=[], help="prompt for all images, or repeat: one each"
    )
    parser.add_argument(
        "--prompts-file", help="text file, one prompt per line, matched to the images in order"
    )
    parser.add_argument(
        "--scorer",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="registered scorer and its options (repeat for several); see `workbench ls scorers`",
    )
    parser.add_argument(
        "--ensemble", choices=("zscore", "rank", "winrate"), help="also report the scorers combined this way"
    )
    parser.add_argument("--device", help="device for scorers that take one (unless the scorer spec sets it)")
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded and scored per batch")
    parser.add_argument("--show", type=int, default=40, help="rows printed in the table (all go to the JSON)")
    parser.add_argument(
        "-o", "--out", help="JSON output path (default: scores.json beside the manifest, or ./)"
    )


def collect_items(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path | None]:
    """Rows ``{"path", "prompt", ...}`` from a manifest or from images + prompts; also the manifest path if any."""
    inputs = list(args.inputs)
    manifest = args.manifest
    if manifest is None and len(inputs) == 1 and inputs[0].endswith(".jsonl"):
        manifest = inputs.pop()
    if manifest is not None:
        if inputs:
            raise ValueError("give either a manifest or image paths, not both")
        return _read_manifest(Path(manifest)), Path(manifest)
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise ValueError(f"input {item!r} does not exist; pass image files, folders or a manifest .jsonl")
    if not paths:
        raise ValueError(
            "no images given: pass image files or folders, or a manifest (--manifest FILE.jsonl)"
        )
    prompts = list(args.prompt)
    if args.prompts_file:
        if prompts:
            raise ValueError("give --prompt or --prompts-file, not both")
        prompts_file = Path(args.prompts_file)
        if not prompts_file.is_file():
            raise ValueError(
                f"--prompts-file {args.prompts_file}: no such file; pass a text file with one prompt per line, "
                "in the images' sorted path order"
            )
        try:
            prompts = prompts_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            line = prompts_file.read_bytes()[: exc.start].count(b"\n") + 1
            raise ValueError(
                f"--prompts-file {prompts_file}:{line}: not UTF-8 text; re-save it as UTF-8"
            ) from None
    if len(prompts) == 1:
        prompts = prompts * len(paths)
    if len(prompts) != len(paths):
        raise ValueError(
            f"got {len(paths)} images but {len(prompts)} prompts: pass one --prompt for all, or one per image "
            "(in sorted path order), or --prompts-file"
        )
    return [{"path": str(p), "prompt": q} for p, q in zip(paths, prompts)], None


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"manifest {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}:{n}: not JSON ({e.msg}); each line must be an object with path and prompt"
            ) from e
        if not isinstance(row, dict) or "path" not in row or "prompt" not in row:
            raise ValueError(f"{path}:{n}: each line needs 'path' and 'prompt' keys")
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else path.parent / p)
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    return rows


def _load_image(path: str) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def main(args: argparse.Namespace) -> int:
    import torch

    from rewards import EnsembleScorer, build_scorer, parse_scorer_spec, scorer_options

    if not args.scorer:
        raise ValueError(
            "--scorer: name at least one scorer (see `workbench ls scorers`), e.g. --scorer clipscore"
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    items, manifest = collect_items(args)

    scorers: dict[str, Any] = {}
    specs: dict[str, dict[str, Any]] = {}
    for spec in args.scorer:
        name, options = parse_scorer_spec(spec)
        if args.device and "device" not in options and "device" in scorer_options(name):
            options["device"] = args.device
        label = name if name not in scorers else f"{name}#{len(scorers)}"
        scorers[label] = build_scorer(name, **options)
        specs[label] = {"name": name, "options": options}

    # decode in batches; images of one batch are scored together per (H, W) so any sizes mix
    scores: dict[str, list[float]] = {label: [] for label in scorers}
    kept: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for start in range(0, len(items), args.batch_size):
        batch = []
        for row in items[start : start + args.batch_size]:
            try:
                batch.append((row, _load_image(row["path"])))
            except Exception as e:  # corrupt or missing file: skip and count, keep going
                skipped.append({"path": row["path"], "error": f"{type(e).__name__}: {e}"})
        by_size: dict[tuple[int, int], list[tuple[dict[str, Any], Any]]] = {}
        for row, img in batch:
            by_size.setdefault(tuple(img.shape[-2:]), []).append((row, img))
        for group in by_size.values():
            x = torch.stack([img for _, img in group])
            prompts = [str(row["prompt"]) for row, _ in group]
            with torch.no_grad():
                for label, scorer in scorers.items():
                    scores[label] += scorer(x, prompts).float().cpu().tolist()
            kept += [row for row, _ in group]
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['path']}: {skipped[0]['error']}",
            file=sys.stderr,
        )
    if not kept:
        raise ValueError("no readable images; see the skipped list above")

    columns = dict(scores)
    if args.ensemble and len(scorers) > 1:
        ens = EnsembleScorer(scorers, method=args.ensemble)
        per = {label: torch.tensor(v) for label, v in scores.items()}
        columns[f"ensemble[{args.ensemble}]"] = ens.combine(per, [str(r["prompt"]) for r in kept]).tolist()

    rows = [{**row, "scores": {label: columns[label][i] for label in columns}} for i, row in enumerate(kept)]
    summary = {label: _stats(values) for label, values in columns.items()}
    result: dict[str, Any] = {"scorers": specs, "summary": summary, "rows": rows, "skipped": skipped}
    if any("checkpoint" in r for r in kept):
        by_ckpt: dict[str, dict[str, list[float]]] = {}
        for i, r in enumerate(kept):
            for label in columns:
                by_ckpt.setdefault(str(r.get("checkpoint")), {}).setdefault(label, []).append(
                    columns[label][i]
                )
        result["by_checkpoint"] = {c: {k: _stats(v) for k, v in d.items()} for c, d in by_ckpt.items()}

    _print_table(rows, list(columns), summary, result.get("by_checkpoint"), args.show)
    out = Path(args.out) if args.out else (manifest.parent if manifest else Path(".")) / "scores.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {out} ({len(rows)} images, {len(skipped)} skipped)")
    return 0


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _print_table(rows, labels, summary, by_checkpoint, show: int) -> None:
    widths = [max(10, len(label)) for label in labels]
    header = f"{'image':40s}  {'prompt':40s}  " + "  ".join(f"{lab:>{w}s}" for lab, w in zip(labels, widths))
    print(header)
    print("-" * len(header))
    for row in rows[:show]:
        cells = "  ".join(f"{row['scores'][lab]:>{w}.4f}" for lab, w in zip(labels, widths))
        prompt = str(row["prompt"])
        print(f"{_short(str(row['path']), 40):40s}  {prompt[:40]:40s}  {cells}")
    if len(rows) > show:
        print(f"... {len(rows) - show} more rows in the JSON")
    print("-" * len(header))
    mean = "  ".join(f"{summary[lab]['mean']:>{w}.4f}" for lab, w in zip(labels, widths))
    print(f"{'mean':40s}  {'(' + str(len(rows)) + ' images)':40s}  {mean}")
    for ckpt, stats in (by_checkpoint or {}).items():
        cells = "  ".join(f"{stats[lab]['mean']:>{w}.4f}" for lab, w in zip(labels, widths))
        print(
            f"{'mean ' + _short(ckpt, 35):40s}  {'(' + str(stats[labels[0]]['n']) + ' images)':40s}  {cells}"
        )
