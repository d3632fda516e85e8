"""Synthetic preference data: pair/ranking rules, process sharding, and a dataset that the trainer's readers read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samplers import Checkpoint, SamplingConfig, load_pipeline_for
from samplers.synth import SynthPlan, preference_pairs, ranking, run_synth, shards_of
from workbench.data import ReadReport, load_image, read_pickapic_parquet, read_ranking_jsonl, read_records


def test_pairs_and_rankings() -> None:
    s = [0.2, 0.9, 0.5, 0.9]
    assert ranking(s) == [1, 3, 2, 0]  # equal scores keep sample order
    assert preference_pairs(s, "best-worst") == [(1, 0)]
    assert preference_pairs(s, "all") == [
        (1, 2),
        (1, 0),
        (3, 2),
        (3, 0),
        (2, 0),
    ]  # the 0.9/0.9 tie is no pair
    assert preference_pairs(s, "all", min_gap=0.45) == [(1, 0), (3, 0)]
    assert preference_pairs([0.5, 0.5], "best-worst") == []
    with pytest.raises(ValueError, match="best-worst"):
        preference_pairs(s, "some")  # type: ignore[arg-type]


def test_shards_split_prompts_across_processes_exactly_once() -> None:
    owned = [shards_of(10, 3, i, 3) for i in range(3)]
    assert [len(o) for o in owned] == [2, 1, 1]
    covered = sorted(p for o in owned for r in o for p in r)
    assert covered == list(range(10))


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_synth_writes_pickapic_shards_and_rankings_that_the_trainer_reads(
    tiny_fixtures: dict[str, Path], tmp_path: Path
) -> None:
    base = str(tiny_fixtures["sdxl"])
    loads: list[str] = []

    def load(ckpt: Checkpoint):
        loads.append(ckpt.name)
        return load_pipeline_for(base, Checkpoint("base"))

    prompts = ["a red circle", "a blue square", "a green triangle"]
    plan = SynthPlan(
        base=base,
        checkpoints=[Checkpoint("base"), Checkpoint("other", base)],
        prompts=prompts,
        k=3,
        sampling=SamplingConfig(steps=2),
        scorer="brightness",
        out_dir=tmp_path / "syn",
        pairs="all",
        shard_size=2,
        batch_size=6,
    )
    result = run_synth(plan, brightness, load)
    assert (result.shards_done, result.shards_skipped) == (2, 0)
    assert sorted(loads) == ["base", "other"]  # each checkpoint loaded once for all shards

    report = ReadReport()
    records = list(read_pickapic_parquet(plan.out_dir / "pairs", report))
    assert len(records) == result.pairs > 0 and not report.skipped
    # every record is best-first: its first image is brighter than its second
    for rec in records:
        a, b = (np.asarray(load_image(x), dtype=np.float64).mean() for x in rec.images)
        assert a > b
    import pyarrow.parquet as pq

    table = pq.read_table(plan.out_dir / "pairs").to_pydict()
    assert {0.0, 1.0} <= set(table["label_0"])  # winners appear in both columns
    assert all(
        s0 > s1 if lab == 1.0 else s1 > s0
        for s0, s1, lab in zip(table["score_0"], table["score_1"], table["label_0"])
    )

    ranked = list(read_ranking_jsonl(plan.out_dir / "rankings.jsonl", ReadReport()))
    assert [r.prompt for r in ranked] == prompts
    assert all(r.k == 3 and Path(str(r.images[0])).is_file() for r in ranked)
    assert all(r.scores is not None and len(r.scores) == 3 for r in ranked)
    assert all(r.scores == sorted(r.scores or [], reverse=True) for r in ranked)
    # through read_records as the trainer reads it: whole rankings, or (best, worst) pairs with their scores
    source = [{"format": "ranking_jsonl", "path": str(plan.out_dir / "rankings.jsonl")}]
    whole, report = read_records(source, group="ranking", min_k=3)
    assert [r.scores for r in whole] == [r.scores for r in ranked] and not report.skipped
    pairs, _ = read_records(source, group="pair")
    assert [r.scores for r in pairs] == [[r.scores[0], r.scores[-1]] for r in ranked if r.scores]
    assert all(r.pref_prob == 1.0 and r.k == 2 for r in pairs)
    assert all(r.scores is not None and r.scores[0] > r.scores[1] for r in records)  # parquet score_0/1

    # resume: finished shards are skipped and no model is loaded; a different plan refuses the folder
    loads.clear()
    again = run_synth(plan, brightness, load)
    assert (again.shards_done, again.shards_skipped, loads) == (0, 2, [])
    plan.k = 4
    with pytest.raises(ValueError, match=r"different plan.*k"):
        run_synth(plan, brightness, load)


def test_synth_resumes_an_interrupted_run(tiny_fixtures: dict[str, Path], tmp_path: Path) -> None:
    base = str(tiny_fixtures["sdxl"])
    plan = SynthPlan(
        base=base,
        checkpoints=[Checkpoint("base")],
        prompts=["a", "b", "c"],
        k=2,
        sampling=SamplingConfig(steps=1),
        scorer="brightness",
        out_dir=tmp_path / "syn",
        shard_size=1,
    )
    pipe = load_pipeline_for(base, Checkpoint("base"))
    run_synth(plan, brightness, lambda c: pipe)
    (plan.out_dir / "done" / "shard-00001.json").unlink()  # as if killed while writing shard 1
    (plan.out_dir / "rankings.jsonl").unlink()
    result = run_synth(plan, brightness, lambda c: pipe)
    assert (result.shards_done, result.shards_skipped) == (1, 2)
    assert len((plan.out_dir / "rankings.jsonl").read_text().splitlines()) == 3
    assert json.loads((plan.out_dir / "synth.json").read_text())["identity"]["k"] == 2
