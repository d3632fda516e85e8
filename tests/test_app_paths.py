"""The app's paths cannot leave their folders (issue 14, part 1): the store's images (ids from the database),
``votes export`` and the app's export, the Curate folder import, and the files the running app serves. Each case
plants ``..``, an absolute path or a symlink that leads out, and checks that nothing outside is read, written or
served, with a message naming the file and the fix."""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import FakeRenderer

from apps.handlers import AppContext, AppSettings, InputError, add_checkpoint, export, load_folder
from apps.store import StoreError, VoteStore, export_votes
from samplers import png_bytes
from workbench.cli import main


def _png(value: int) -> bytes:
    return png_bytes(np.full((8, 8, 3), value, dtype=np.uint8))


def _voted_store(root: Path) -> tuple[VoteStore, list[str]]:
    """A store with one K = 2 round and a 'best' vote on it; returns the store and the two image ids."""
    store = VoteStore(root / "votes.sqlite")
    shas = [store.add_image(_png(40 * i + 1), {"checkpoint": "base", "seed": i}) for i in range(2)]
    rnd = store.new_round(
        user_id="alice", prompt="a red circle", items=[(s, {}) for s in shas], display_order=[1, 0]
    )
    store.record_vote(rnd.round_id, user_id="alice", outcome="best", ranking=[0], idempotency_key="k1")
    return store, shas


def _outside(tmp_path: Path) -> Path:
    """A file outside every folder the app owns; its content must stay as it is."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    victim = tmp_path / "outside" / "secret.txt"
    victim.write_text("do not touch", encoding="utf-8")
    return victim


# ------------------------------------------------------------------------------------------------- store images
@pytest.mark.parametrize("bad_id", ["../../outside/secret", "/etc/passwd", "ab/../../x", "A" * 64])
def test_image_ids_from_the_database_never_leave_the_image_folder(tmp_path: Path, bad_id: str):
    store, shas = _voted_store(tmp_path / "store")
    with sqlite3.connect(store.path) as conn:  # a hand-edited or corrupt database (foreign keys off here)
        conn.execute("UPDATE round_items SET image_sha256 = ? WHERE image_sha256 = ?", (bad_id, shas[0]))
    with pytest.raises(StoreError, match="is not a sha256 hex digest; the database was edited or is corrupt"):
        store.votes()
    with pytest.raises(StoreError, match="not a sha256"):
        export_votes(store, tmp_path / "out")
    with pytest.raises(StoreError, match="not a sha256"):
        store.image_path(bad_id)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_symlink_out_of_the_image_folder_is_refused(tmp_path: Path, what: str):
    store, shas = _voted_store(tmp_path / "store")
    victim = _outside(tmp_path)
    path = store.image_path(shas[0])
    if what == "file":
        path.unlink()
        path.symlink_to(victim)
    else:  # images/ab -> a folder outside holding a file of the expected name
        (victim.parent / path.name).write_bytes(path.read_bytes())
        for p in path.parent.iterdir():
            p.unlink()
        path.parent.rmdir()
        path.parent.symlink_to(victim.parent)
    with pytest.raises(StoreError, match="a symlink leads outside the image folder"):
        store.votes()
    with pytest.raises(StoreError, match="a symlink leads outside the image folder"):
        export_votes(store, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------ exports
def test_export_replaces_planted_symlinks_instead_of_writing_through_them(tmp_path: Path):
    store, shas = _voted_store(tmp_path / "store")
    victim = _outside(tmp_path)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    planted = [
        out / "pairs.jsonl",
        out / "rankings.jsonl",
        out / "pickapic.parquet",
        out / "pairs.jsonl.tmp",  # the temporary names of earlier versions
        out / "pickapic.parquet.tmp",
        out / "images" / f"{shas[0]}.png",  # an existing link: would be referenced by the JSONL
    ]
    for p in planted:
        p.symlink_to(victim)
    (out / "images" / f"{shas[1]}.png").symlink_to(
        tmp_path / "outside" / "new.png"
    )  # dangling: written through

    result = export_votes(store, out)

    assert victim.read_text(encoding="utf-8") == "do not touch"
    assert not (tmp_path / "outside" / "new.png").exists()
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret.txt"]
    for name in ("pairs.jsonl", "rankings.jsonl", "pickapic.parquet"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert result.pairs == len(rows) == 1
    for rel in (rows[0]["image_0"], rows[0]["image_1"]):
        image = out / rel
        assert not image.is_symlink() and image.resolve().is_relative_to(out.resolve())
        assert image.read_bytes() == store.image_path(Path(rel).stem).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]  # the staging folder is gone


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_export_refuses_an_images_entry_that_is_not_its_folder(tmp_path: Path, capsys, kind: str):
    store, _ = _voted_store(tmp_path / "store")
    victim = _outside(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    if kind == "symlink":
        (out / "images").symlink_to(victim.parent)
    else:
        (out / "images").write_text("x", encoding="utf-8")
    code = main(["votes", "export", "--db", str(store.path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{out / 'images'} is a symlink or a file" in err and "export into a fresh folder" in err, err
    assert sorted(p.name for p in victim.parent.iterdir()) == ["secret.txt"]


def test_app_export_stays_in_the_export_folder(tmp_path: Path):
    store, _ = _voted_store(tmp_path / "store")
    ctx = AppContext(AppSettings(db=str(store.path), runs_dir=None), renderer=FakeRenderer(), store=store)
    summary, parquet = export(ctx, user="../../outside")  # a user filter is a value, never a path
    assert parquet.resolve().is_relative_to(ctx.export_dir.resolve()) and "0 active votes" in summary
    summary, parquet = export(ctx)
    assert parquet.resolve().is_relative_to(ctx.export_dir.resolve()) and "1 active votes" in summary


# ------------------------------------------------------------------------------------------ Curate folder import
def _image_folder(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(_png(30 * i + 5))


def test_curate_import_stays_inside_its_root_and_folder(tmp_path: Path):
    root = tmp_path / "root"
    _image_folder(root / "mine")
    _image_folder(tmp_path / "outside" / "theirs", 3)
    (root / "mine" / "sub").symlink_to(tmp_path / "outside" / "theirs")  # a folder inside leading out
    (root / "linked").symlink_to(tmp_path / "outside" / "theirs")  # a folder under the root leading out
    store = VoteStore(tmp_path / "store" / "votes.sqlite")
    settings = AppSettings(db=str(store.path), runs_dir=None, curate_root=str(root))
    ctx = AppContext(settings, renderer=FakeRenderer(), store=store)

    state, _ = load_folder(ctx, str(root / "mine"), "a prompt")
    assert sorted(im.params["source_file"] for im in state.images) == ["0.png", "1.png"]
    for folder in (root / "linked", root / ".." / "outside" / "theirs", tmp_path / "outside" / "theirs"):
        with pytest.raises(InputError, match="outside the allowed root"):
            load_folder(ctx, str(folder), "a prompt")
    assert store.counts()["images"] == 2  # nothing from outside entered the store


# ------------------------------------------------------------------------------------ checkpoints added in the app
def _lora(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return folder


def test_checkpoints_added_in_the_app_stay_inside_the_checkpoint_root(tmp_path: Path):
    root = tmp_path / "ckpts"
    _lora(root / "run" / "final" / "lora")
    outside = _lora(tmp_path / "outside" / "lora")
    (root / "linked").symlink_to(outside)  # a folder under the root leading out
    _lora(root / "mixed")
    (root / "mixed" / "pytorch_lora_weights.safetensors").unlink()  # the weights file itself leads out
    (root / "mixed" / "pytorch_lora_weights.safetensors").symlink_to(
        outside / "pytorch_lora_weights.safetensors"
    )
    store = VoteStore(tmp_path / "store" / "votes.sqlite")
    settings = AppSettings(db=str(store.path), runs_dir=None, checkpoint_root=str(root))
    ctx = AppContext(settings, renderer=FakeRenderer(), store=store)

    assert add_checkpoint(ctx, f"mine={root / 'run'}") == "mine"
    for spec in (
        f"a={outside}",
        f"b={root / '..' / 'outside' / 'lora'}",
        f"c={root / 'linked'}",
        f"d={root / 'mixed'}",
        f"e={root / 'run'},negative={outside}",  # the NPO model of negative guidance
    ):
        with pytest.raises(
            InputError, match=r"is outside the allowed root .* \(--checkpoint-root\); copy it there"
        ):
            add_checkpoint(ctx, spec)
    assert ctx.renderer.names() == ["base", "tuned", "mine"]
    ctx.settings.checkpoint_root = None  # without a root any readable path is taken, as on the command line
    assert add_checkpoint(ctx, f"a={outside}") == "a"


def test_app_warns_when_bound_beyond_this_machine_without_roots(
    capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")
    import apps.app

    monkeypatch.setattr(apps.app, "launch", lambda *a, **k: None)  # the warnings come before the launch
    monkeypatch.chdir(tmp_path)
    argv = [
        "app",
        "--host",
        "0.0.0.0",
        "--auth",
        "a:b",
        "--db",
        str(tmp_path / "v.sqlite"),
        "--curate-root",
        ".",
    ]
    assert main([*argv, "--runs-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert (
        "users can add checkpoints from any path on this machine; confine them with --checkpoint-root" in err
    )


# --------------------------------------------------------------------------------------------- files it serves
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppContext, str]]:
    pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")
    from apps.app import launch

    root = tmp_path_factory.mktemp("served")
    store, _ = _voted_store(root)
    ctx = AppContext(AppSettings(db=str(store.path), runs_dir=None), renderer=FakeRenderer(), store=store)
    demo, url = launch(ctx, block=False)
    try:
        yield ctx, url
    finally:
        demo.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_app_serves_only_files_it_created(served: tuple[AppContext, str], tmp_path: Path):
    from gradio_client import Client

    ctx, url = served
    _, file = Client(url, verbose=False, download_files=False).predict("", api_name="/export")
    created = file["url"] if isinstance(file, dict) else file
    assert _status(created) == 200  # the control: the export it returned is served (from Gradio's cache)

    victim = _outside(tmp_path)
    store_image = next(ctx.store.image_dir.rglob("*.png"))
    exported = next(ctx.export_dir.rglob("pickapic.parquet"))
    for path in (victim, Path("/etc/passwd"), ctx.store.path, store_image, exported):
        assert _status(f"{url}gradio_api/file={path}") in (403, 404), path
    cached = Path(urllib.parse.unquote(created.split("/gradio_api/file=")[1]))
    ups = "/".join([".."] * len(cached.parent.parts))
    for path in (f"{cached.parent}/{ups}{victim}", f"{cached.parent}/{ups.replace('..', '%2e%2e')}{victim}"):
        assert _status(f"{url}gradio_api/file={path}") in (400, 403, 404), path
    quoted = urllib.parse.quote(str(victim), safe="")
    assert _status(f"{url}gradio_api/file={quoted}") in (403, 404)
