"""Issue 14 parts 1 and 3, data side: image paths cannot escape the dataset's folder; every bad row is skipped and
reported by ``file:row`` or refused with a message naming the file, and nothing in the readers, preprocessing or
the cache dies on one; output folders and model sources are checked before a model loads."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from workbench.cli import main
from workbench.config import CacheSection, DataSection, DataSource
from workbench.data import DataError, ReadReport, read_pickapic_parquet, read_records

TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toy" / "dpo.yaml")


def _png(colour: str | tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(_png((40 * i % 256, 90, 200 - 30 * i)))


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pair(i0: str, i1: str, prompt: str = "a red square") -> dict[str, Any]:
    return {"prompt": prompt, "image_0": i0, "image_1": i1, "prefer_0": 1, "prefer_1": 0}


def _parquet(path: Path, rows: dict[str, list[Any]], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.table(rows, schema=schema), str(path))
    return path


def _source(fmt: str, path: Path, **kw: Any) -> list[dict[str, Any]]:
    return [{"format": fmt, "path": str(path), **kw}]


# ------------------------------------------------------------------------------------- part 1: path escapes
def test_image_paths_outside_the_dataset_folder_are_skipped_by_row(tmp_path: Path):
    """``../``, absolute paths elsewhere and symlinks pointing out are refused per row (before: read as given)."""
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    _images(data, "a.png", "b.png")
    _images(outside, "secret.png")
    (data / "link.png").symlink_to(outside / "secret.png")
    (data / "sub").mkdir()
    (data / "sub" / "inner.png").write_bytes(_png("green"))
    rows = [
        _pair("a.png", "b.png"),  # 1 fine
        _pair("a.png", "../elsewhere/secret.png"),  # 2 climbs out
        _pair(str(outside / "secret.png"), "b.png"),  # 3 absolute, elsewhere
        _pair("a.png", "link.png"),  # 4 a link inside that points out
        _pair("a.png", "/etc/passwd"),  # 5
        _pair(
            str(data / "a.png"), "sub/../sub/inner.png"
        ),  # 6 absolute but inside, and a detour inside: fine
    ]
    path = _jsonl(data / "pairs.jsonl", rows)
    records, report = read_records(_source("pair_jsonl", path))
    assert [r.row_id for r in records] == ["pairs.jsonl:1", "pairs.jsonl:6"]
    assert [rid for rid, _ in report.skipped] == [f"pairs.jsonl:{n}" for n in (2, 3, 4, 5)]
    assert all(
        "outside the dataset folder" in why and "allow_outside_paths" in why for _, why in report.skipped
    )

    ranking = _jsonl(
        data / "rank.jsonl", [{"prompt": "p", "images": ["a.png", "b.png", "../elsewhere/secret.png"]}]
    )
    records, report = read_records(_source("ranking_jsonl", ranking), group="ranking")
    assert not records and report.skipped[0][0] == "rank.jsonl:1"

    trusted, report = read_records(_source("pair_jsonl", path, allow_outside_paths=True))
    assert len(trusted) == 6 and not report.skipped


def test_image_folder_symlinks_out_are_skipped_and_non_utf8_captions_noted(tmp_path: Path):
    """An image_folder source read a symlink to a file outside, and decoded a Latin-1 caption with replacement
    characters without a word."""
    folder, outside = tmp_path / "imgs", tmp_path / "elsewhere"
    _images(folder, "a.png", "b.png")
    _images(outside, "secret.png")
    (folder / "c.png").symlink_to(outside / "secret.png")
    (folder / "a.txt").write_text("a red square")
    (folder / "b.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "c.txt").write_text("a stolen image")
    records, report = read_records(_source("image_folder", folder), group="ranking", min_k=1)
    assert [r.row_id for r in records] == ["a.png", "b.png"] and records[1].prompt == "caf\ufffd au lait"
    assert report.skipped[0][0] == "c.png" and "outside the dataset folder" in report.skipped[0][1]
    assert report.notes == {"a caption file that is not UTF-8 (read with replacement characters)": ["b.png"]}
    records, _ = read_records(
        _source("image_folder", folder, allow_outside_paths=True), group="ranking", min_k=1
    )
    assert len(records) == 3


def test_relabel_reads_no_image_outside_the_pair_files_folder(tmp_path: Path):
    """`workbench relabel pairs.jsonl` decoded (and scored) any path a row named; now it follows the trainer's rule:
    a row naming an image outside fails with that reason, and the scorer never sees it."""
    from samplers.relabel import relabel

    data = tmp_path / "data"
    _images(data, "a.png", "b.png")
    _images(tmp_path, "secret.png")
    path = _jsonl(data / "pairs.jsonl", [_pair("a.png", "b.png"), _pair("a.png", "../secret.png")])
    seen: list[int] = []

    def scorer(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        seen.append(images.shape[0])
        return images[:, 0].mean(dim=(1, 2))

    result = relabel(path, "pair_jsonl", scorer, "red", batch_size=4, max_failed=0.5)
    assert sum(seen) == 2 and len(result.failed) == 1
    assert "outside the dataset folder" in result.failed[0][1]
    relabel(path, "pair_jsonl", scorer, "red", batch_size=4, fresh=True, allow_outside_paths=True)
    assert sum(seen) == 6  # trusted: both rows scored


# ---------------------------------------------------------------------------------------- part 3: the rows
def test_bytes_captions_are_decoded_and_non_utf8_ones_skipped_by_row(tmp_path: Path):
    """A binary caption column arrived as the text "b'a red square'" (str of bytes); now it is decoded, and a caption
    that is not UTF-8 is skipped with its row."""
    a, b = _png("red"), _png("blue")
    captions = [b"a red square", "caf\xe9".encode("latin-1"), b"a blue square"]
    schema = pa.schema(
        [("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("caption", pa.binary())]
    )
    path = _parquet(
        tmp_path / "p.parquet",
        {"jpg_0": [a] * 3, "jpg_1": [b] * 3, "label_0": [1.0] * 3, "caption": captions},
        schema,
    )
    records, report = read_records(_source("pickapic_parquet", path))
    assert [r.prompt for r in records] == ["a red square", "a blue square"]
    assert report.skipped == [("p.parquet:1", report.skipped[0][1])] and "not UTF-8" in report.skipped[0][1]


def test_duplicate_images_in_a_group_are_dropped_or_the_row_skipped(tmp_path: Path):
    """A ranking that names one image twice trained it as a pair of identical images; now the lower copy is dropped
    (and noted), and a pair of one image is skipped, in every format."""
    _images(tmp_path, "a.png", "b.png", "c.png")
    rank = _jsonl(
        tmp_path / "rank.jsonl",
        [
            {"prompt": "p", "images": ["a.png", "b.png", "./a.png", "c.png"], "scores": [4, 3, 2, 1]},
            {"prompt": "q", "images": ["a.png", "a.png"]},
        ],
    )
    records, report = read_records(_source("ranking_jsonl", rank), group="ranking")
    assert len(records) == 1 and [Path(str(p)).name for p in records[0].images] == ["a.png", "b.png", "c.png"]
    assert records[0].scores == [4, 3, 1]
    assert report.notes == {"duplicate images dropped from the group": ["rank.jsonl:1"]}
    assert [rid for rid, _ in report.skipped] == ["rank.jsonl:2"]

    pairs = _jsonl(tmp_path / "pairs.jsonl", [_pair("a.png", "./a.png"), _pair("a.png", "b.png")])
    records, report = read_records(_source("pair_jsonl", pairs))
    assert len(records) == 1 and report.skipped[0][0] == "pairs.jsonl:1"

    img = _png("red")
    path = _parquet(
        tmp_path / "p.parquet",
        {"jpg_0": [img, img], "jpg_1": [img, _png("blue")], "label_0": [1.0, 1.0], "caption": ["x", "y"]},
    )
    records, report = read_records(_source("pickapic_parquet", path))
    assert (
        len(records) == 1 and report.skipped[0][0] == "p.parquet:0" and "same image" in report.skipped[0][1]
    )


def test_a_damaged_parquet_shard_is_named(tmp_path: Path):
    """A truncated shard was a bare pyarrow error (ArrowInvalid, no file name)."""
    path = _parquet(
        tmp_path / "p.parquet",
        {"jpg_0": [_png("red")], "jpg_1": [_png("blue")], "label_0": [1.0], "caption": ["x"]},
    )
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"p\.parquet: not a readable parquet file"):
        read_records(_source("pickapic_parquet", path))


def test_no_usable_rows_messages_agree_with_their_counts():
    """Before: "no usable preference groups: every row was skipped / 0 of 4 rows skipped, 4 ties dropped", with no
    word of data.drop_ties."""
    report = ReadReport(total=4, ties_dropped=4)
    msg = report.nothing_usable()
    assert "all 4 rows are ties" in msg and "data.drop_ties=false" in msg and "skipped" not in msg
    assert "no rows" in ReadReport().nothing_usable()
    mixed = ReadReport(total=3, ties_dropped=1, skipped=[("f:1", "bad"), ("f:2", "bad")])
    msg = mixed.nothing_usable()
    assert "2 skipped, 1 ties dropped" in msg and "data.drop_ties=false" in msg and "f:1: bad" in msg
    assert "drop_ties" not in ReadReport(total=1, skipped=[("f:1", "bad")]).nothing_usable()


# ------------------------------------------------------------------------------------------- the cache
def _cache_cfg(path: Path, cache_dir: Path, fmt: str = "pickapic_parquet", **kw: Any) -> DataSection:
    return DataSection(
        sources=[DataSource(format=fmt, path=str(path))],  # type: ignore[arg-type]
        resolution=32,
        cache=CacheSection(dir=str(cache_dir)),
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_pipe(tiny_fixtures: dict[str, Path]) -> Any:
    from workbench.models import load_pipeline

    return load_pipeline(str(tiny_fixtures["sdxl"]))


def _build(pipe: Any, cfg: DataSection, group: str = "pair") -> tuple[Any, ReadReport]:
    from workbench.cache import PreferenceCache

    records, report = read_records(cfg.sources, drop_ties=cfg.drop_ties, group=group)  # type: ignore[arg-type]
    cache = PreferenceCache(pipe, "sdxl", cfg)
    cache.build(records, report, show_progress=False)
    return cache, report


def test_tie_only_data_says_so_and_names_drop_ties(tiny_pipe: Any, tmp_path: Path):
    from workbench.tiny import write_tiny_pickapic

    path = write_tiny_pickapic(tmp_path / "ties.parquet", n=0, ties=3)
    with pytest.raises(DataError) as exc:
        _build(tiny_pipe, _cache_cfg(path, tmp_path / "c"))
    assert "all 3 rows are ties" in str(exc.value) and "data.drop_ties=false" in str(exc.value)
    assert "every row was skipped" not in str(exc.value)
    cache, _ = _build(tiny_pipe, _cache_cfg(path, tmp_path / "c", drop_ties=False))  # the way out works
    assert len(cache) == 3


def test_identical_images_under_two_names_are_one_image(tiny_pipe: Any, tmp_path: Path):
    _images(tmp_path, "a.png", "b.png")
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    rank = _jsonl(
        tmp_path / "rank.jsonl",
        [
            {"prompt": "p", "images": ["a.png", "b.png", "a_copy.png"], "scores": [3, 2, 1]},
            {"prompt": "q", "images": ["a.png", "a_copy.png"], "scores": [2, 1]},
        ],
    )
    cache, report = _build(
        tiny_pipe, _cache_cfg(rank, tmp_path / "c", "ranking_jsonl", max_bad_fraction=1.0), "ranking"
    )
    assert [item.k for item in cache.items] == [2] and cache.items[0].scores == (3.0, 2.0)
    assert report.notes["duplicate images dropped from the group"] == ["rank.jsonl:1"]
    assert [rid for rid, _ in report.skipped] == ["rank.jsonl:2"]


def test_empty_and_huge_captions_are_reported_once(
    tiny_pipe: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    """Each 100,000-character caption was logged in full by diffusers' encode_prompt (megabytes of stderr); now the
    summary counts them, and empty captions, in one line each with the first rows."""
    a, b = _png("red"), _png("blue")
    captions = ["", "a red square " * 8000, "a blue square " * 8000, "", "a green square " * 8000, "fine"]
    path = _parquet(
        tmp_path / "p.parquet",
        {"jpg_0": [a] * 6, "jpg_1": [b] * 6, "label_0": [1.0] * 6, "caption": captions},
    )
    capfd.readouterr()
    cache, report = _build(tiny_pipe, _cache_cfg(path, tmp_path / "c"))
    err = capfd.readouterr().err
    assert len(cache) == 6 and len(err) < 2000, err[:500]
    summary = report.summary()
    assert "2 rows kept with an empty caption" in summary and "p.parquet:0, p.parquet:3" in summary
    assert "3 rows kept with a caption longer than the text encoder reads" in summary
    assert len(summary) < 1000


def test_a_truncated_cache_file_is_encoded_again_or_named_with_the_fix(tiny_pipe: Any, tmp_path: Path):
    """A truncated latent or text file raised safetensors' "incomplete metadata" error, naming no file. At build time
    it is now encoded again (and said so); damaged under a running job, the error names it and how to clear the
    cache."""
    from workbench.cache import DamagedCacheError
    from workbench.tiny import write_tiny_pickapic

    path = write_tiny_pickapic(tmp_path / "p.parquet", n=3)
    cfg = _cache_cfg(path, tmp_path / "c")
    cache, _ = _build(tiny_pipe, cfg)
    latent = cache.items[0].latent_file
    good = latent.read_bytes()
    latent.write_bytes(good[: len(good) // 2])
    text = next(cache.text_dir.glob("*.safetensors"))
    text.write_bytes(text.read_bytes()[:10])
    again, _ = _build(tiny_pipe, cfg)
    assert latent.read_bytes() == good and len(again) == 3
    again.batch([0, 1, 2], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False)

    latent.write_bytes(good[:100])  # damaged while training
    with pytest.raises(DamagedCacheError) as exc:
        again.batch([0, 1], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False)
    assert str(latent) in str(exc.value) and f"rm -r {tmp_path / 'c'}" in str(exc.value)


# ------------------------------------------------------------------------------------------ commands
def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import samplers
    import workbench.models

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(workbench.models, "load_pipeline", boom)
    monkeypatch.setattr(samplers, "load_pipeline_for", boom)


@pytest.mark.parametrize("command", ["eval", "synth"])
def test_output_folder_is_checked_before_the_model_loads(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """-o a file, -o under a file, -o read-only (a write fails: simulated, as root can write anywhere)."""
    _no_model_load(monkeypatch)
    extra = ["-s", "toy/centering", "--prompt", "a red square"] + (["-k", "2"] if command == "synth" else [])
    file = tmp_path / "file.txt"
    file.write_text("x")
    for out, expected in ((file, "is a file"), (file / "sub", f"{file} is a file, not a folder")):
        assert main([command, "--base", "toy", *extra, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert (
            f"workbench {command}: error: -o {out}" in err and expected in err and "Traceback" not in err
        ), err

    import tempfile

    def read_only(*a: Any, **k: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main([command, "--base", "toy", *extra, "-o", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert f"-o {tmp_path / 'ro'} is not writable (Permission denied)" in err and "Traceback" not in err, err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_real_read_only_folder(tmp_path: Path):
    from workbench.paths import writable_folder

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            writable_folder(folder, "-o")
    finally:
        folder.chmod(0o755)


def test_model_sources_that_are_not_models(tiny_fixtures: dict[str, Path], tmp_path: Path):
    """A damaged .safetensors (was SafetensorError, a traceback), a LoRA or a tensor file given as the model, and a
    pipeline folder without unet/ (was "no file named config.json found in directory ...", naming no unet)."""
    import shutil

    from safetensors.torch import save_file

    from workbench.models import ModelLoadError, load_pipeline

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    for source, family, expected in (
        (damaged, None, "not a readable safetensors file"),
        (damaged, "sdxl", "not a readable safetensors file"),
        (lora, None, "is a LoRA, not a base model"),
        (lora, "sdxl", "is a LoRA, not a base model"),
        (other, None, r"neither an SDXL nor an SD1\.5/2\.x checkpoint \(first keys: weight\)"),
    ):
        with pytest.raises(ModelLoadError, match=expected):
            load_pipeline(str(source), family=family)
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_fixtures["sdxl"], folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoadError, match=r"has no unet/ \(model_index.json lists it\)"):
        load_pipeline(str(folder))


def test_validate_refuses_a_data_path_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """Before: `workbench validate` said ok, and train failed after loading the model."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", TOY]) == 2
    err = capsys.readouterr().err
    assert "data.sources[0].path: runs/toy_dpo_pairs does not exist" in err and "Traceback" not in err
    (tmp_path / "runs" / "toy_dpo_pairs").mkdir(parents=True)
    assert main(["validate", TOY]) == 2
    assert "is a folder without .parquet files" in capsys.readouterr().err
    (tmp_path / "runs" / "toy_dpo_pairs" / "a.parquet").write_bytes(b"")
    assert main(["validate", TOY, "data.sources=[{format: pair_jsonl, path: runs/toy_dpo_pairs}]"]) == 2
    assert "is not a file (a pair_jsonl source is one file)" in capsys.readouterr().err
    assert main(["validate", TOY]) == 0


def test_parquet_reader_accounts_for_every_row(tmp_path: Path):
    """Mistyped cells are skipped by row, never raised: ints for images, strings for labels, a list for a caption."""
    schema = pa.schema(
        [("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.string()), ("caption", pa.string())]
    )
    a, b = _png("red"), _png("blue")
    path = _parquet(
        tmp_path / "p.parquet",
        {
            "jpg_0": [a, None, a],
            "jpg_1": [b, b, b""],
            "label_0": ["1", "1", "0"],
            "caption": ["x", "y", None],
        },
        schema,
    )
    report = ReadReport()
    assert list(read_pickapic_parquet(path, report)) == []
    assert report.total == 3 and [rid for rid, _ in report.skipped] == [
        "p.parquet:0",
        "p.parquet:1",
        "p.parquet:2",
    ]


# ------------------------------------------------------------------------------------ the property test
_REFS = [
    "g0.png",  # three good images of different sizes (pairs of mismatched sizes)
    "g1.png",
    "g2.png",
    "trunc.png",  # a PNG cut in half
    "junk.png",  # bytes that are no image
    "empty.png",  # an empty file
    "sub",  # a folder
    "link.png",  # a symlink pointing out of the folder
    "missing.png",
    "../outside.png",
    "/etc/passwd",
    "",
    "g0.png\x00",
]


def _write_image_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([(16, 16), (24, 16), (16, 40)]):
        (folder / f"g{i}.png").write_bytes(_png(("red", "blue", "green")[i], size))
    (folder / "trunc.png").write_bytes(_png("red", (32, 32))[:60])
    (folder / "junk.png").write_bytes(b"\x89PNG not really")
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub").mkdir(exist_ok=True)
    (folder.parent / "outside.png").write_bytes(_png("white"))
    if not (folder / "link.png").is_symlink():
        (folder / "link.png").symlink_to(folder.parent / "outside.png")


def test_no_reader_preprocessing_or_cache_step_dies_on_a_bad_row(
    tiny_pipe: Any, tmp_path_factory: pytest.TempPathFactory
):
    """Property (hypothesis, derandomized): pair JSONL, ranking JSONL and Pick-a-Pic parquet rows with corrupt,
    truncated, missing, outside and duplicate images, missing and mistyped fields, empty / huge / non-UTF-8 / non-text
    prompts, mismatched image sizes and repeated rows. Each source is read alone: it is either refused with a
    DataError naming its file, or every row is accounted for (a record, a skip naming ``file:row``, or a dropped
    tie); then the cache (decode, resize, crop, encode) builds or says that nothing is usable, and every record it
    leaves out is reported. Nothing else is raised."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from workbench.cache import PreferenceCache

    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    _write_image_files(data)
    good = [(data / f"g{i}.png").read_bytes() for i in range(3)]

    # each field is good about three times in four or more (one_of picks a branch uniformly), so that most
    # examples hold rows that reach the cache beside the bad ones
    junk = st.one_of(st.integers(-2, 2), st.none(), st.booleans(), st.lists(st.integers(0, 1), max_size=2))
    good_refs = st.sampled_from(_REFS[:3])
    refs = st.one_of(good_refs, good_refs, good_refs, good_refs, good_refs, st.sampled_from(_REFS), junk)
    good_prompts = st.sampled_from(["a red square", "a blue circle", "caf\u00e9 \u2603"])
    prompts = st.one_of(
        good_prompts,
        good_prompts,
        good_prompts,
        good_prompts,
        st.sampled_from(["", "   ", "a blue square " * 8000]),
        st.text(max_size=12),
        junk,
    )
    good_prefs = st.sampled_from([0, 1, 0.7, 3, 0.5])
    prefs = st.one_of(
        good_prefs, good_prefs, good_prefs, st.floats(allow_nan=True, allow_infinity=True), junk
    )

    def maybe_drop(row: dict[str, Any], drop: list[str]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in drop}

    pair_row = st.builds(
        maybe_drop,
        st.fixed_dictionaries(
            {"prompt": prompts, "image_0": refs, "image_1": refs, "prefer_0": prefs, "prefer_1": prefs}
        ),
        st.one_of(
            st.just([]), st.just([]), st.lists(st.sampled_from(["prompt", "image_0", "prefer_1"]), max_size=1)
        ),
    )
    ranking_row = st.fixed_dictionaries(
        {
            "prompt": prompts,
            "images": st.one_of(st.lists(refs, min_size=2, max_size=4), st.lists(refs, max_size=4), junk),
        },
        optional={
            "scores": st.one_of(
                st.lists(st.floats(0, 1), min_size=2, max_size=4).map(lambda v: sorted(v, reverse=True)),
                st.lists(prefs, max_size=4),
                junk,
            ),
            "captions": st.one_of(st.lists(prompts, max_size=4), junk),
        },
    )
    raw_lines = st.sampled_from(
        [
            b'{"prompt": "caf\xe9"}',
            b"not json",
            b"[1, 2]",
            b'{"prompt": "a", "images": ["g0.png", ',
            b"\xff\xfe",
        ]
    )

    def jsonl(rows: list[Any], repeat: int) -> bytes:
        rows = rows + rows[:repeat]  # repeated rows
        lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
        return b"".join(line + b"\n" for line in lines)

    cells = st.one_of(
        st.sampled_from(good),
        st.sampled_from(good),
        st.sampled_from(good),
        st.sampled_from(good),
        st.sampled_from(good).map(lambda b: b[: len(b) // 2]),  # truncated
        st.binary(max_size=24),  # junk or empty
        st.none(),
    )
    captions = st.one_of(st.just("x"), st.just("y"), st.sampled_from(["", "a red square " * 8000]), st.none())
    byte_captions = st.one_of(
        st.just(b"a red square"),
        st.sampled_from([b"a red square", "caf\xe9".encode("latin-1"), b""]),
        st.none(),
    )
    parquet_rows = st.lists(
        st.tuples(
            cells, cells, st.sampled_from([0.0, 1.0, 0.0, 1.0, 0.5, 0.3, None]), captions, byte_captions
        ),
        max_size=6,
    )

    def parquet(rows: list[tuple[Any, ...]], layout: str, path: Path) -> None:
        cols: dict[str, list[Any]] = {
            "jpg_0": [r[0] for r in rows],
            "jpg_1": [r[1] for r in rows],
            "label_0": [r[2] for r in rows],
            "caption": [r[4] if layout == "binary captions" else r[3] for r in rows],
        }
        types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "caption": pa.string()}
        if layout == "binary captions":
            types["caption"] = pa.binary()
        if layout == "string labels":
            cols["label_0"] = [None if v is None else str(v) for v in cols["label_0"]]
            types["label_0"] = pa.string()
        if layout == "no caption column":
            del cols["caption"], types["caption"]
        pq.write_table(pa.table(cols, schema=pa.schema(list(types.items()))), str(path))

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: CI never turns red by chance
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(
        pairs=st.lists(st.one_of(pair_row, pair_row, pair_row, raw_lines), max_size=5),
        rankings=st.lists(st.one_of(ranking_row, ranking_row, ranking_row, raw_lines), max_size=5),
        repeat=st.integers(0, 2),
        rows=parquet_rows,
        layout=st.sampled_from(["plain", "plain", "binary captions", "string labels", "no caption column"]),
        drop_ties=st.booleans(),
        outside=st.booleans(),
    )
    def check(
        pairs: list[Any],
        rankings: list[Any],
        repeat: int,
        rows: list[tuple[Any, ...]],
        layout: str,
        drop_ties: bool,
        outside: bool,
    ) -> None:
        # a good row first and last in every file: the bad rows sit among rows that reach the cache
        good_pair = _pair("g0.png", "g1.png")
        good_ranking = {
            "prompt": "a green square",
            "images": ["g2.png", "g0.png", "g1.png"],
            "scores": [3, 2, 1],
        }
        good_cells = (good[0], good[2], 1.0, "a red square", b"a red square")
        (data / "pairs.jsonl").write_bytes(jsonl([good_pair, *pairs, good_pair], repeat))
        (data / "rank.jsonl").write_bytes(jsonl([good_ranking, *rankings, good_ranking], repeat))
        parquet([good_cells, *rows, good_cells], layout, data / "p.parquet")
        for fmt, name in (
            ("pair_jsonl", "pairs.jsonl"),
            ("ranking_jsonl", "rank.jsonl"),
            ("pickapic_parquet", "p.parquet"),
        ):
            source = _source(fmt, data / name, allow_outside_paths=outside)
            try:
                records, report = read_records(source, drop_ties=drop_ties, group="ranking")
            except DataError as exc:
                assert name in str(exc), str(exc)
                continue
            assert len(records) + len(report.skipped) + report.ties_dropped == report.total
            assert all(rid.startswith(f"{name}:") for rid, _ in report.skipped)
            assert all(isinstance(r.prompt, str) and not r.prompt.startswith("b'") for r in records)
            cfg = _cache_cfg(data / name, root / "cache", fmt, max_bad_fraction=1.0)
            cache, before = PreferenceCache(tiny_pipe, "sdxl", cfg), len(report.skipped)
            try:
                cache.build(records, report, show_progress=False)
            except DataError as exc:
                assert "no preference groups" in str(exc) and not cache.items, str(exc)
                continue
            assert len(cache.items) + len(report.skipped) - before == len(records)
            if len(cache):
                cache.batch(
                    list(range(len(cache))),
                    torch.Generator().manual_seed(0),
                    empty_prompt_prob=0.5,
                    hflip=True,
                )

    check()


def test_above_max_bad_fraction_the_run_still_lists_every_skipped_row(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Before: the DataError stopped the run before skipped_rows.jsonl was written (the message showed 10 rows)."""
    from workbench.tiny import write_tiny_pickapic

    bad = tuple(range(12))
    data = write_tiny_pickapic(tmp_path / "p.parquet", n=16, corrupt_rows=bad)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sdxl_dpo_lora.yaml")
    overrides = [f"data.sources=[{{format: pickapic_parquet, path: {data}}}]", f"run.output_dir={tmp_path}"]
    overrides += [
        "run.name=bad",
        "train.max_steps=1",
        "validation.every=0",
        f"data.cache.dir={tmp_path / 'c'}",
    ]
    assert main(["train", config, *overrides, "--no-progress"]) == 2
    err = capsys.readouterr().err
    listed = tmp_path / "bad" / "skipped_rows.jsonl"
    assert "12 of 16 rows are unusable (> data.max_bad_fraction=0.01)" in err and str(listed) in err, err[
        -2000:
    ]
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    assert [r["row"] for r in rows] == [f"p.parquet:{i}" for i in bad]
    assert all("does not decode" in r["reason"] for r in rows)
