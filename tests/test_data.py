"""Preference data readers, joint cropping, bad rows, and the latent/text cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from workbench.config import CacheSection, DataSection, DataSource
from workbench.data import DataError, preprocess_group, read_records
from workbench.tiny import write_tiny_pickapic


def _data_cfg(path: Path, cache_dir: Path, **kw) -> DataSection:
    return DataSection(
        sources=[DataSource(format="pickapic_parquet", path=str(path))],
        resolution=32,
        cache=CacheSection(dir=str(cache_dir)),
        **kw,
    )


def test_pickapic_reader_orders_winner_first_and_drops_ties(tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=8, ties=3)
    records, report = read_records([{"format": "pickapic_parquet", "path": str(path)}])
    assert len(records) == 8 and report.ties_dropped == 3 and report.total == 11
    for rec in records:  # the preferred image is the bright square on a dark background: low pixel variance
        w = Image.open(__import__("io").BytesIO(rec.images[0]))
        assert w.getpixel((0, 0)) == (20, 20, 20)
    kept, report = read_records([{"format": "pickapic_parquet", "path": str(path)}], drop_ties=False)
    assert len(kept) == 11 and report.ties_dropped == 0


def test_folder_of_shards_and_missing_columns(tmp_path: Path):
    write_tiny_pickapic(tmp_path / "shards" / "a.parquet", n=4, seed=1)
    write_tiny_pickapic(tmp_path / "shards" / "b.parquet", n=5, seed=2)
    records, _ = read_records([{"format": "pickapic_parquet", "path": str(tmp_path / "shards")}])
    assert len(records) == 9
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpg_0": [b"x"], "caption": ["c"]}), str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="missing Pick-a-Pic columns"):
        read_records([{"format": "pickapic_parquet", "path": str(tmp_path / "bad.parquet")}])


def test_pair_jsonl_and_ranking_jsonl(tmp_path: Path):
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    lines = [
        {"prompt": "p1", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0, "prefer_1": 1},
        {"prompt": "p2", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0.5, "prefer_1": 0.5},
        {"prompt": "p3", "image_0": "a.png"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    records, report = read_records([{"format": "pair_jsonl", "path": str(tmp_path / "pairs.jsonl")}])
    assert len(records) == 1 and records[0].images[0].endswith("b.png")
    assert report.ties_dropped == 1
    assert [r for r, _ in report.skipped] == ["pairs.jsonl:3", "pairs.jsonl:4"]
    (tmp_path / "rank.jsonl").write_text(
        json.dumps({"prompt": "p", "images": ["c.png", "a.png", "b.png"]}) + "\n"
    )
    ranked, _ = read_records(
        [{"format": "ranking_jsonl", "path": str(tmp_path / "rank.jsonl")}], group="ranking"
    )
    assert ranked[0].k == 3
    pairs, _ = read_records([{"format": "ranking_jsonl", "path": str(tmp_path / "rank.jsonl")}], group="pair")
    assert [Path(p).name for p in pairs[0].images] == ["c.png", "b.png"]  # best vs worst


def test_both_images_get_the_same_crop_and_real_micro_conditioning():
    a = Image.new("RGB", (60, 40), "red")
    b = Image.new("RGB", (50, 50), "blue")  # a different size: resized to the first image's size first
    pixels, crop = preprocess_group([a, b], 32, crop="center")
    assert pixels.shape == (2, 3, 32, 32)
    assert crop.original_size == (40, 60)
    assert crop.crop_top_left == (0, 8)  # 60x40 -> 48x32, centre crop 8 px from the left
    assert pixels.min() >= -1 and pixels.max() <= 1


def _cache(tiny_fixtures: dict[str, Path], cfg: DataSection):
    from workbench.cache import PreferenceCache
    from workbench.models import load_pipeline

    pipe = load_pipeline(str(tiny_fixtures["sdxl"]))
    return PreferenceCache(pipe, "sdxl", cfg)


def test_corrupt_row_is_skipped_and_reported(tiny_fixtures: dict[str, Path], tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=12, corrupt_rows=(3,))
    cfg = _data_cfg(path, tmp_path / "cache", max_bad_fraction=0.2)
    records, report = read_records(cfg.sources)
    cache = _cache(tiny_fixtures, cfg)
    cache.build(records, report, show_progress=False)
    assert len(cache) == 11
    assert [r for r, _ in report.skipped] == ["p.parquet:3"]
    assert "does not decode" in report.skipped[0][1]


def test_too_many_bad_rows_stop_with_an_error(tiny_fixtures: dict[str, Path], tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=10, corrupt_rows=(0, 1, 2))
    cfg = _data_cfg(path, tmp_path / "cache", max_bad_fraction=0.1)
    records, report = read_records(cfg.sources)
    with pytest.raises(DataError, match=r"3 of 10 rows are unusable .*max_bad_fraction"):
        _cache(tiny_fixtures, cfg).build(records, report, show_progress=False)


def test_cache_is_reused_and_invalidated_when_the_model_changes(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=6)
    cfg = _data_cfg(path, tmp_path / "cache")
    records, report = read_records(cfg.sources)
    first = _cache(tiny_fixtures, cfg)
    first.build(records, report, show_progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in first.latent_dir.iterdir()}
    again = _cache(tiny_fixtures, cfg)
    again.build(records, report, show_progress=False)
    assert again.latent_dir == first.latent_dir
    assert {p: p.stat().st_mtime_ns for p in again.latent_dir.iterdir()} == stamps  # nothing re-encoded
    changed = _cache(tiny_fixtures, cfg)
    with torch.no_grad():
        next(changed.pipe.vae.parameters()).add_(0.01)
    changed.__init__(changed.pipe, "sdxl", cfg)
    assert changed.latent_dir != first.latent_dir
    g = torch.Generator().manual_seed(0)
    batch = first.batch([0, 1, 2], g, empty_prompt_prob=0.0, hflip=False)
    assert batch.latents.shape == (3, 2, 4, 16, 16)
    assert batch.prompt_embeds.shape[0] == 3 and batch.pooled_embeds is not None
    assert batch.time_ids is not None and batch.time_ids.shape == (3, 2, 6)  # per image


# --------------------------------------------------------------------------------- labels, scores and ties
def _pngs(folder: Path, *names: str) -> None:
    for i, name in enumerate(names):
        Image.new("RGB", (16 + 2 * i, 16), (40 * i % 256, 80, 120)).save(folder / name)


def _jsonl(path: Path, rows: list[dict]) -> list[dict]:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [{"format": "ranking_jsonl" if "rank" in path.name else "pair_jsonl", "path": str(path)}]


def test_pair_jsonl_soft_labels_become_pref_prob_with_the_preferred_image_first(tmp_path: Path):
    """pref_prob = max(p0, p1) / (p0 + p1) after ordering: 0.3/0.7 -> 0.7 (b first), 2/6 -> 0.75, 1/0 -> 1."""
    _pngs(tmp_path, "a.png", "b.png")
    src = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "p1", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0.3, "prefer_1": 0.7},
            {"prompt": "p2", "image_0": "a.png", "image_1": "b.png", "prefer_0": 2, "prefer_1": 6},
            {"prompt": "p3", "image_0": "a.png", "image_1": "b.png", "prefer_0": 1, "prefer_1": 0},
            {"prompt": "p4", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0.5, "prefer_1": 0.5},
            {"prompt": "p5", "image_0": "a.png", "image_1": "b.png", "prefer_0": -1, "prefer_1": 2},
        ],
    )
    records, report = read_records(src)
    assert [r.prompt for r in records] == ["p1", "p2", "p3"]
    assert [Path(str(r.images[0])).name for r in records] == ["b.png", "b.png", "a.png"]
    assert [r.pref_prob for r in records] == pytest.approx([0.7, 0.75, 1.0])
    assert report.ties_dropped == 1 and [r for r, _ in report.skipped] == ["pairs.jsonl:5"]
    kept, _ = read_records(src, drop_ties=False)
    assert kept[3].pref_prob == pytest.approx(0.5) and Path(str(kept[3].images[0])).name == "a.png"


def test_pickapic_labels_give_pref_prob_and_synth_scores_are_carried(tmp_path: Path):
    path = write_tiny_pickapic(tmp_path / "p.parquet", n=4, ties=2)
    records, _ = read_records([{"format": "pickapic_parquet", "path": str(path)}])
    assert [r.pref_prob for r in records] == [1.0] * 4 and all(r.scores is None for r in records)
    kept, _ = read_records([{"format": "pickapic_parquet", "path": str(path)}], drop_ties=False)
    assert [r.pref_prob for r in kept] == [1.0] * 4 + [0.5] * 2
    import pyarrow.parquet as pq

    raw = pq.read_table(path).to_pydict()
    ties = [i for i, lab in enumerate(raw["label_0"]) if lab == 0.5]
    assert [kept[i].images[0] for i in ties] == [raw["jpg_0"][i] for i in ties]  # tie order as in the file
    # the columns `workbench synth` adds: score_0 / score_1 follow their images to best-first
    from samplers.synth import write_pickapic_parquet

    write_pickapic_parquet(
        tmp_path / "s.parquet",
        {
            **{k: raw[k][:2] for k in ("jpg_0", "jpg_1", "caption")},
            "label_0": [0.0, 1.0],
            "label_1": [1.0, 0.0],
            "score_0": [0.1, 0.8],
            "score_1": [0.9, 0.2],
        },
    )
    synth, _ = read_records([{"format": "pickapic_parquet", "path": str(tmp_path / "s.parquet")}])
    assert [r.scores for r in synth] == [pytest.approx([0.9, 0.1]), pytest.approx([0.8, 0.2])]
    assert synth[0].images[0] == raw["jpg_1"][0]


def test_ranking_reader_honours_drop_ties(tmp_path: Path):
    """Best == worst score is a tie for both groupings (scores are best-first, so then every score is equal);
    partial ties are kept and carried in the scores."""
    _pngs(tmp_path, "a.png", "b.png", "c.png")
    rows = [
        {"prompt": "strict", "images": ["a.png", "b.png", "c.png"], "scores": [3, 2, 1]},
        {"prompt": "all tie", "images": ["a.png", "b.png", "c.png"], "scores": [2, 2, 2]},
        {"prompt": "bottom tie", "images": ["a.png", "b.png", "c.png"], "scores": [3, 1, 1]},
        {"prompt": "pair tie", "images": ["a.png", "b.png"], "scores": [0.5, 0.5]},
        {"prompt": "no scores", "images": ["a.png", "b.png", "c.png"]},
        {"prompt": "short", "images": ["a.png", "b.png", "c.png"], "scores": [3, 2]},
        {"prompt": "unsorted", "images": ["a.png", "b.png", "c.png"], "scores": [1, 2, 3]},
    ]
    src = _jsonl(tmp_path / "rank.jsonl", rows)
    ranked, report = read_records(src, group="ranking")
    assert [r.prompt for r in ranked] == ["strict", "bottom tie", "no scores"]
    assert ranked[1].scores == [3, 1, 1] and ranked[1].k == 3 and ranked[2].scores is None
    assert report.ties_dropped == 2
    assert [r for r, _ in report.skipped] == ["rank.jsonl:6", "rank.jsonl:7"]
    pairs, report = read_records(src, group="pair")
    assert [(r.prompt, r.scores, r.pref_prob) for r in pairs] == [
        ("strict", [3, 1], 1.0),
        ("bottom tie", [3, 1], 1.0),
        ("no scores", None, 1.0),
    ]
    assert [Path(str(p)).name for p in pairs[0].images] == ["a.png", "c.png"]
    assert report.ties_dropped == 2
    kept, report = read_records(src, group="pair", drop_ties=False)
    assert [(r.prompt, r.pref_prob) for r in kept][1:4] == [
        ("all tie", 0.5),
        ("bottom tie", 1.0),
        ("pair tie", 0.5),
    ]
    assert report.ties_dropped == 0


def test_read_records_group_and_min_k(tmp_path: Path):
    _pngs(tmp_path, "a.png", "b.png", "c.png")
    src = _jsonl(
        tmp_path / "rank.jsonl",
        [
            {"prompt": "three", "images": ["a.png", "b.png", "c.png"]},
            {"prompt": "two", "images": ["a.png", "b.png"]},
        ],
    )
    ranked, report = read_records(src, group="ranking", min_k=3)
    assert [r.k for r in ranked] == [3]
    assert report.skipped == [("rank.jsonl:2", "2 images; the objective needs groups of >= 3 (min_k)")]
    with pytest.raises(ValueError, match=r"min_k=3 with group='pair'"):
        read_records(src, group="pair", min_k=3)
    with pytest.raises(ValueError, match="group"):
        read_records(src, group="pairs")  # type: ignore[arg-type]
    legacy, _ = read_records(src, pairwise=False)  # the old spelling still works
    assert [r.k for r in legacy] == [3, 2]
