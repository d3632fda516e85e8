"""Soft labels (samplers.relabel): SmPO's rule, `workbench relabel` on Pick-a-Pic parquet and pair JSONL (in place,
batched, resumable), `workbench synth` writing them, the readers and SmPO training on them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from samplers.generate import png_bytes
from samplers.relabel import relabel, score_range, soft_label, soft_labels
from samplers.synth import write_pickapic_parquet
from workbench.data import ReadReport, read_pair_jsonl, read_pickapic_parquet, read_records


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A scorer: mean red minus mean blue, in [-1, 1]."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))


class Counting:
    """``redness`` that counts images and can fail after a number of calls (an interrupted run)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.images = 0
        self.fail_after = fail_after

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += images.shape[0]
        return redness(images, prompts)


def _image(red: float, blue: float, size: int = 8) -> np.ndarray:
    im = np.zeros((size, size, 3), dtype=np.uint8)
    im[..., 0], im[..., 2] = int(red * 255), int(blue * 255)
    return im


def _pickapic(path: Path, reds: list[tuple[float, float]], labels: list[float]) -> None:
    rows: dict[str, list] = {c: [] for c in ("jpg_0", "jpg_1", "label_0", "label_1", "caption")}
    for (r0, r1), lab in zip(reds, labels):
        rows["jpg_0"].append(png_bytes(_image(r0, 0.1)))
        rows["jpg_1"].append(png_bytes(_image(r1, 0.1)))
        rows["label_0"].append(lab)
        rows["label_1"].append(1.0 - lab)
        rows["caption"].append("a red thing")
    write_pickapic_parquet(path, rows)


def test_soft_label_rule():
    """p = exp(n_w) / (exp(n_w) + exp(n_l)) with n = (s - min) / (max - min) (SmPO train.py L741-747)."""
    lo, hi = 0.11543526500463486, 0.28201571106910706
    nw, nl = (0.27 - lo) / (hi - lo), (0.2 - lo) / (hi - lo)
    assert soft_label(0.27, 0.2, lo, hi) == pytest.approx(
        math.exp(nw) / (math.exp(nw) + math.exp(nl)), rel=1e-12
    )
    assert soft_label(hi, lo, lo, hi) == pytest.approx(1 / (1 + math.exp(-1)))  # the maximum, 0.731
    assert soft_label(0.2, 0.2, lo, hi) == 0.5
    assert score_range([3.0, None, 1.0, float("nan"), 2.0]) == (1.0, 3.0)  # type: ignore[list-item]
    assert soft_labels([1.0, None], [3.0, 2.0]) == [pytest.approx(1 / (1 + math.e)), None]
    with pytest.raises(ValueError, match="max > min"):
        soft_label(1.0, 0.0, 2.0, 2.0)


def test_relabel_pickapic_folder_in_place_with_global_min_max(tmp_path: Path):
    """Three shards (two of the same name, one in a subfolder); min / max over all; scorer order (not the human one);
    human ties still dropped when read."""
    data = tmp_path / "pap"
    # a.parquet: human labels disagree with the scorer; b.parquet: a human tie, an agreeing pair
    _pickapic(data / "a.parquet", [(0.9, 0.2), (0.3, 0.5)], [0.0, 1.0])
    _pickapic(data / "b.parquet", [(0.6, 0.6), (0.1, 0.8)], [0.5, 0.0])
    _pickapic(data / "sub" / "a.parquet", [(0.5, 0.4)], [1.0])
    scorer = Counting()
    result = relabel(data, "pickapic_parquet", scorer, "redness", batch_size=1)
    assert result.rows == 5 and result.scored_now == 5 and not result.failed
    assert scorer.calls == 5 and scorer.images == 10  # batch_size 1 -> 2 images per call
    import pyarrow.parquet as pq

    a = pq.read_table(data / "a.parquet").to_pydict()
    b = pq.read_table(data / "b.parquet").to_pydict()
    c = pq.read_table(data / "sub" / "a.parquet").to_pydict()
    assert c["score_0"][0] > c["score_1"][0] and c["score_0"] != a["score_0"][:1]
    scores = [*a["score_0"], *a["score_1"], *b["score_0"], *b["score_1"], *c["score_0"], *c["score_1"]]
    lo, hi = min(scores), max(scores)
    assert (result.score_min, result.score_max) == (lo, hi)
    for t in (a, b):
        for s0, s1, p0, p1 in zip(t["score_0"], t["score_1"], t["soft_label_0"], t["soft_label_1"]):
            assert p0 == pytest.approx(1 / (1 + math.exp(-(s0 - s1) / (hi - lo))), rel=1e-9)
            assert p0 + p1 == pytest.approx(1.0)
    assert a["label_0"] == [0.0, 1.0] and a["scorer"] == ["redness", "redness"]  # human labels kept
    assert len(a["jpg_0"]) == 2 and not list(data.glob("*.parquet.tmp"))

    records = list(read_pickapic_parquet(data, ReadReport(), labels="scorer"))
    assert len(records) == 4  # the human tie is dropped
    for rec in records:
        assert rec.scores is not None and rec.scores[0] >= rec.scores[1]  # scorer order
        assert rec.pref_prob == pytest.approx(
            1 / (1 + math.exp(-(rec.scores[0] - rec.scores[1]) / (hi - lo)))
        )
    human = list(read_pickapic_parquet(data, ReadReport()))
    assert [r.pref_prob for r in human] == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="workbench relabel"):  # a file never relabelled
        list(read_pickapic_parquet(_fresh_copy(tmp_path), ReadReport(), labels="scorer"))


def _fresh_copy(tmp_path: Path) -> Path:
    p = tmp_path / "plain.parquet"
    _pickapic(p, [(0.9, 0.2)], [1.0])
    return p


def test_relabel_resumes_an_interrupted_run_and_refuses_another_scorer(tmp_path: Path):
    data = tmp_path / "pairs.parquet"
    _pickapic(data, [(0.9, 0.2), (0.3, 0.5), (0.1, 0.8), (0.7, 0.4), (0.5, 0.45)], [1.0] * 5)
    reference = tmp_path / "ref.parquet"
    shutil.copy(data, reference)
    relabel(reference, "pickapic_parquet", redness, "redness", batch_size=2)

    interrupted = Counting(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        relabel(data, "pickapic_parquet", interrupted, "redness", batch_size=2)
    side = data.with_name(data.name + ".relabel") / f"{data.name}.scores.jsonl"
    assert len(side.read_text().splitlines()) == 4  # two batches of two kept
    rest = Counting()
    result = relabel(data, "pickapic_parquet", rest, "redness", batch_size=2)
    assert rest.images == 2 and result.scored_now == 1  # only the last row is scored again
    import pyarrow.parquet as pq

    got, want = pq.read_table(data).to_pydict(), pq.read_table(reference).to_pydict()
    assert got["soft_label_0"] == want["soft_label_0"] and got["score_0"] == want["score_0"]
    with pytest.raises(ValueError, match="another relabel run"):
        relabel(data, "pickapic_parquet", redness, "other", batch_size=2)
    relabel(data, "pickapic_parquet", redness, "other", batch_size=2, fresh=True)
    assert pq.read_table(data).to_pydict()["scorer"][0] == "other"


def test_relabel_pair_jsonl_and_a_corrupt_row(tmp_path: Path):
    from samplers.generate import save_png

    lines = []
    for i, (r0, r1) in enumerate([(0.2, 0.9), (0.8, 0.3), (0.4, 0.6)]):
        save_png(_image(r0, 0.0), tmp_path / f"{i}_0.png")
        save_png(_image(r1, 0.0), tmp_path / f"{i}_1.png")
        lines.append(
            {"prompt": "p", "image_0": f"{i}_0.png", "image_1": f"{i}_1.png", "prefer_0": 1, "prefer_1": 0}
        )
    lines.append(
        {"prompt": "p", "image_0": "missing.png", "image_1": "0_1.png", "prefer_0": 1, "prefer_1": 0}
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in lines))
    with pytest.raises(ValueError, match="failed to score"):
        relabel(path, "pair_jsonl", redness, "redness", batch_size=2)
    result = relabel(path, "pair_jsonl", redness, "redness", batch_size=2, max_failed=0.5)
    assert len(result.failed) == 1 and "missing.png" in result.failed[0][1]
    objs = [json.loads(line) for line in path.read_text().splitlines()]
    assert objs[3]["soft_label_0"] is None and objs[0]["prefer_0"] == 1  # human labels kept
    assert objs[0]["soft_label_0"] < 0.5 < objs[1]["soft_label_0"]
    report = ReadReport()
    records = list(read_pair_jsonl(path, report, labels="scorer"))
    assert len(records) == 3 and len(report.skipped) == 1
    assert all(Path(str(r.images[0])).name.endswith(("0_1.png", "1_0.png", "2_1.png")) for r in records)
    assert all(0.5 < (r.pref_prob or 0) < 0.74 for r in records)


def test_relabel_command_and_config_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from workbench.cli import main as cli
    from workbench.config import ConfigError, load_config

    data = tmp_path / "pairs.parquet"
    _pickapic(data, [(0.9, 0.2), (0.3, 0.5)], [1.0, 1.0])
    assert (
        cli(["relabel", str(data), "--scorer", "toy/saturation", "--device", "cpu", "--batch-size", "1"]) == 0
    )
    assert "labels: scorer" in capsys.readouterr().out
    import pyarrow.parquet as pq

    assert pq.read_table(data).to_pydict()["scorer"] == ["toy/saturation"] * 2
    base = ["model.source=x", "objective={name: smpo}"]
    with pytest.raises((ConfigError, ValueError), match="relabel"):
        load_config(
            Path("configs/toy/smpo.yaml"),
            [*base, f"data.sources=[{{format: pickapic_parquet, path: {data}}}]"],
        )
    cfg = load_config(
        Path("configs/toy/smpo.yaml"),
        [*base, f"data.sources=[{{format: pickapic_parquet, path: {data}, labels: scorer}}]"],
    )
    assert cfg.data.sources[0].labels == "scorer"
    records, _ = read_records(cfg.data.sources)
    assert all(r.pref_prob is not None and 0.5 <= r.pref_prob < 0.74 for r in records)


def test_synth_writes_soft_labels(tiny_fixtures: dict[str, Path], tmp_path: Path):
    from samplers import Checkpoint, SamplingConfig, load_pipeline_for
    from samplers.synth import SynthPlan, run_synth

    base = str(tiny_fixtures["sdxl"])
    plan = SynthPlan(
        base=base,
        checkpoints=[Checkpoint("base")],
        prompts=["a red circle", "a blue square", "a green triangle"],
        k=3,
        sampling=SamplingConfig(steps=2),
        scorer="redness",
        out_dir=tmp_path / "syn",
        pairs="all",
        shard_size=2,
        batch_size=6,
    )
    run_synth(plan, redness, lambda c: load_pipeline_for(base, Checkpoint("base")))
    import pyarrow.parquet as pq

    table = pq.read_table(plan.out_dir / "pairs").to_pydict()
    lo, hi = score_range([*table["score_0"], *table["score_1"]])
    for s0, s1, p0 in zip(table["score_0"], table["score_1"], table["soft_label_0"]):
        assert p0 == pytest.approx(soft_label(s0, s1, lo, hi), rel=1e-9)
    records = list(read_pickapic_parquet(plan.out_dir / "pairs", ReadReport(), labels="scorer"))
    assert len(records) == len(table["score_0"]) and all(
        r.scores and r.scores[0] > r.scores[1] for r in records
    )
    assert json.loads((plan.out_dir / "soft_labels.json").read_text())["pairs"] == len(records)


def test_smpo_trains_two_steps_on_relabelled_pairs(workdir: Path):
    """The tiny Pick-a-Pic file relabelled, then SmPO through the loop: per-pair soft labels reach the loss, the
    first loss is ln 2 (fresh LoRA = reference)."""
    from workbench.config import load_config
    from workbench.train import Trainer

    data = workdir / "relabelled.parquet"
    shutil.copy(workdir / ".cache" / "tiny" / "pickapic.parquet", data)
    relabel(data, "pickapic_parquet", redness, "redness", batch_size=8)
    cfg = load_config(
        Path(__file__).parents[1] / "configs/tiny/sdxl_dpo_lora.yaml",
        [
            "logging.tensorboard=false",
            "run.name=smpo_two",
            "objective={name: smpo, beta: 5000}",
            f"data.sources=[{{format: pickapic_parquet, path: {data}, labels: scorer}}]",
            "train.max_steps=2",
            "train.batch_size=2",
            "noising={name: renoise_inversion, num_steps: 3}",  # fewer model calls: the test checks the plumbing
            "validation.prompts=[]",
        ],
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    batch = trainer.cache.batch(
        [0, 1, 2], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False
    )
    assert batch.pref_prob is not None and (batch.pref_prob < 1).all() and (batch.pref_prob >= 0.5).all()
    run_dir = trainer.train()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(v) for v in losses)
