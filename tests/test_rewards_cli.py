"""``workbench score`` in-process: folders + prompts, a generate-style manifest, corrupt files, scorer options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from rewards_fixtures import hps_checkpoint, tiny_open_clip_arch

from rewards import parse_scorer_spec
from workbench.cli import main


def _write_images(folder, n, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 255 * (i / max(n - 1, 1))).astype(np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_parse_scorer_spec():
    assert parse_scorer_spec("hpsv2.1") == ("hpsv2.1", {})
    name, opts = parse_scorer_spec("clipscore:arch=local-dir:/w/x,clamp=false,batch_size=8,dtype=none")
    assert name == "clipscore" and opts == {
        "arch": "local-dir:/w/x",
        "clamp": False,
        "batch_size": 8,
        "dtype": None,
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_scorer_spec("hpsv2.1:path")


def test_score_folder_with_one_prompt_and_a_corrupt_file(tmp_path, capsys):
    _write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "s.json"
    hps = f"hpsv2.1:path={hps_checkpoint()},arch={tiny_open_clip_arch()},scale=benchmark"
    rc = main(
        [
            "score",
            str(tmp_path / "imgs"),
            "--prompt",
            "a cat",
            "--scorer",
            "jpeg_incompressibility",
            "--scorer",
            hps,
            "--ensemble",
            "rank",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 3 and len(data["skipped"]) == 1 and "broken.png" in data["skipped"][0]["path"]
    row = data["rows"][0]
    assert set(row["scores"]) == {"jpeg_incompressibility", "hpsv2.1", "ensemble[rank]"}
    assert abs(row["scores"]["hpsv2.1"]) <= 100
    jpeg = [r["scores"]["jpeg_incompressibility"] for r in data["rows"]]
    assert jpeg == sorted(jpeg)  # later images are noisier
    assert data["summary"]["jpeg_incompressibility"]["n"] == 3
    printed = capsys.readouterr()
    assert "mean" in printed.out and "skipped 1" in printed.err


def test_score_generate_manifest_reports_per_checkpoint(tmp_path):
    paths = _write_images(tmp_path / "gen" / "base", 2) + _write_images(tmp_path / "gen" / "tuned", 2)
    manifest = tmp_path / "gen" / "manifest.jsonl"
    lines = [
        {
            "path": str(p.relative_to(tmp_path / "gen")),
            "prompt": f"prompt {i % 2}",
            "seed": i % 2,
            "checkpoint": c,
        }
        for i, (p, c) in enumerate(zip(paths, ["base", "base", "tuned", "tuned"]))
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["score", str(manifest), "--scorer", "jpeg_compressibility"]) == 0
    data = json.loads((tmp_path / "gen" / "scores.json").read_text())
    assert set(data["by_checkpoint"]) == {"base", "tuned"}
    assert data["rows"][0]["seed"] == 0 and data["rows"][0]["checkpoint"] == "base"


def test_prompt_count_mismatch_is_a_clear_error(tmp_path, capsys):
    _write_images(tmp_path, 3)
    argv = ["score", str(tmp_path), "--prompt", "a", "--prompt", "b", "--scorer", "jpeg_compressibility"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "workbench score: error:" in err and "3 images but 2 prompts" in err and "Traceback" not in err
    assert main(["score", str(tmp_path), "--prompt", "a"]) == 2
    assert "--scorer" in capsys.readouterr().err
