"""Diffusion-DPO on toy-world pairs fits its training pairs within a CI-sized budget (toyworld.md: 0.5 -> >= 0.9)."""

from __future__ import annotations

from pathlib import Path

from workbench.config import load_config
from workbench.toy.model import toy_pipeline_path
from workbench.train import Trainer

ROOT = Path(__file__).parents[1]


def test_dpo_raises_implicit_accuracy_on_its_training_pairs(tmp_path: Path):
    from workbench.commands.demo import render_pairs

    render_pairs(tmp_path / "pairs" / "pairs.parquet", n=16, seed=0)
    cfg = load_config(
        ROOT / "configs/toy/dpo.yaml",
        [
            f"model.source={toy_pipeline_path()}",
            f"data.sources.0.path={tmp_path / 'pairs'}",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}",
            "train.max_steps=60",
            "train.batch_size=16",
            "train.checkpoint_every=1000",
            "optimizer.lr=1e-3",
        ],
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    assert len(trainer.cache) == 16
    before = trainer.implicit_accuracy(draws=4)
    assert before == 0.5  # a fresh LoRA equals its reference: every margin is exactly 0
    trainer.train()
    after = trainer.implicit_accuracy(draws=4)
    assert after >= 0.9, f"implicit accuracy on the training pairs only reached {after:.2f}"
