"""``workbench demo`` end to end on a tiny untrained pipeline, shrunk to seconds (the real demo: `make demo`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from workbench.commands import demo


def test_rendered_pairs_are_pickapic_rows_the_trainer_reads(tmp_path: Path) -> None:
    from workbench.data import ReadReport, read_pickapic_parquet

    info = demo.render_pairs(tmp_path / "pairs.parquet", 20, seed=0)
    table = pq.read_table(tmp_path / "pairs.parquet").to_pydict()
    assert info["pairs"] == 20 and {0.0, 1.0} <= set(table["label_0"])
    records = list(read_pickapic_parquet(tmp_path / "pairs.parquet", ReadReport()))
    assert len(records) == 20
    # the preferred image (column 0 after reading) is the centred one: its toy/centering score is higher
    import numpy as np
    import torch

    from rewards.toy import ToyCentering
    from workbench.data import load_image

    score = ToyCentering()
    for rec in records[:5]:
        x = (
            torch.from_numpy(np.stack([np.asarray(load_image(i)) for i in rec.images])).permute(0, 3, 1, 2)
            / 255
        )
        s = score(x.float(), [rec.prompt] * 2)
        assert s[0] > s[1]


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_fixtures: dict[str, Path], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = tmp_path / "demo"
    args = parser.parse_args(
        [
            "-o",
            str(out),
            "--base",
            str(tiny_fixtures["sdxl"]),
            "--pairs",
            "16",
            "--eval-seeds",
            "1",
            "--eval-steps",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "train.max_steps=2",
            "train.batch_size=2",
            "data.cache.enabled=false",
        ]
    )
    assert demo.main(args) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["plan"]["n_items"] == 24 and report["plan"]["prompt_set"] == "toy:heldout"
    assert set(report["vs_base"]["dpo"]) == {"toy/centering", "toy/fidelity"}
    assert (out / "train" / "final" / "lora").is_dir()
    for name in ("grid.png", "centroids.png", "report.html"):
        assert (out / "eval" / name).is_file()
    assert "centroids.png" in (out / "eval" / "report.html").read_text()


def test_demo_config_is_the_measured_recipe() -> None:
    from workbench.config import load_config

    cfg = load_config(demo.DEFAULT_CONFIG, [])
    assert cfg.objective.name == "diffusion_dpo" and cfg.objective.beta == 2000
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (8, 8)
    assert cfg.optimizer.lr == pytest.approx(5e-4) and cfg.optimizer.weight_decay == 0
    assert (cfg.train.batch_size, cfg.train.max_steps) == (16, 200)  # the objective gym's validation choice
