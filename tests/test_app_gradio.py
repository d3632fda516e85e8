"""The launched app driven through ``gradio_client`` on the real toy pipeline: generate, vote, undo, export; then
``workbench train`` runs two steps on the export."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")

from gradio_client import Client

from apps.handlers import AppContext, AppSettings

AUTH = ("alice", "wonderland")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppContext, str]]:
    from apps.app import launch

    root = tmp_path_factory.mktemp("app")
    settings = AppSettings(
        db=str(root / "votes.sqlite"),
        cache_dir=str(root / "cache"),
        runs_dir=None,
        steps=2,
        seed=0,
        scorers=["toy/fidelity"],
    )
    ctx = AppContext(settings)
    demo, url = launch(ctx, auth=[AUTH], block=False)
    assert url.startswith("http://127.0.0.1:") and not demo.share and demo.share_url is None  # local only
    try:
        yield ctx, url
    finally:
        demo.close()


def _next(client: Client, k: str, mode: str = "best") -> tuple[Any, ...]:
    return client.predict(
        "",
        "a red circle on a white background",
        "toy:heldout",
        k,
        "seeds",
        mode,
        ["base"],
        api_name="/arena_next",
    )


def test_client_generates_votes_undoes_and_exports(launched: tuple[AppContext, str], tmp_path: Path):
    ctx, url = launched
    client = Client(url, auth=AUTH, verbose=False)
    out = _next(client, "2")
    images, status = out[:4], out[-3]  # (state and button updates are not API outputs)
    assert [bool(i.get("visible")) for i in images] == [True, True, False, False]
    assert Path(images[0]["value"]).is_file() and "best of 2" in status

    assert "stored vote #1" in client.predict("someone else", api_name="/arena_2")[-3]
    assert "already voted" in client.predict("", api_name="/arena_1")[-3]
    assert "undid vote #1" in client.predict("", api_name="/arena_undo")[-3]
    assert "stored vote #2" in client.predict("", api_name="/arena_1")[-3]

    _next(client, "4", mode="rank")
    for key in ("3", "1"):
        assert "ranked so far" in client.predict("", api_name=f"/arena_{key}")[-3]
    assert "ranking" in client.predict("", api_name="/arena_4")[-3]

    with sqlite3.connect(ctx.settings.db) as conn:
        rows = conn.execute("SELECT user_id, outcome, ranking FROM votes ORDER BY vote_id").fetchall()
        undos = conn.execute("SELECT vote_id, user_id FROM undos").fetchall()
    assert [(u, o) for u, o, _ in rows] == [("alice", "best"), ("alice", "best"), ("alice", "rank")]
    assert undos == [(1, "alice")]  # the login, not the typed name, is the voter

    summary, parquet = client.predict("", api_name="/export")
    assert "2 active votes -> 7 pairs" in summary  # a pair (1) + a 4-way ranking (6)
    assert Path(parquet).is_file()
    stats = client.predict("", api_name="/stats")
    assert "2 active, 1 undone" in stats


def test_compare_shows_scored_images_and_a_grid(launched: tuple[AppContext, str]):
    _, url = launched
    client = Client(url, auth=AUTH, verbose=False)
    cells_md, gallery, slider, grid = client.predict(
        ["base"],
        "a blue square on a white background",
        "toy:heldout",
        "0-1",
        "euler",
        2,
        5.0,
        "",
        ["toy/fidelity"],
        api_name="/compare",
    )
    assert "a blue square" in cells_md
    assert len(gallery) == 2 and "toy/fidelity" in gallery[0]["caption"]
    assert len(slider) == 2 and Path(grid).is_file()


def test_login_is_required(launched: tuple[AppContext, str]):
    _, url = launched
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        Client(url, verbose=False)
    with pytest.raises(Exception, match=r"(?i)could not login"):
        Client(url, auth=("alice", "wrong"), verbose=False)


def test_training_reads_the_export_of_app_votes(launched: tuple[AppContext, str], tmp_path: Path):
    """Votes captured through the app -> `workbench votes export` -> `workbench train` (2 DPO steps)."""
    from workbench.cli import main
    from workbench.toy.model import toy_pipeline_path

    ctx, url = launched
    client = Client(url, auth=AUTH, verbose=False)
    _next(client, "4")
    client.predict("", api_name="/arena_2")
    assert main(["votes", "export", "--db", ctx.settings.db, "-o", str(tmp_path / "export")]) == 0
    assert main(["votes", "stats", "--db", ctx.settings.db]) == 0
    parquet = tmp_path / "export" / "pickapic.parquet"
    runs = tmp_path / "runs"
    code = main(
        [
            "train",
            str(Path(__file__).parents[1] / "configs/toy/dpo.yaml"),
            f"model.source={toy_pipeline_path()}",
            f"data.sources=[{{format: pickapic_parquet, path: {parquet}}}]",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"run.output_dir={runs}",
            "run.name=app_votes",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.checkpoint_every=1000",
            "--no-progress",
        ]
    )
    assert code == 0
    assert (runs / "app_votes" / "final" / "COMPLETE").is_file()
    import json
    import math

    losses = [
        json.loads(line)["train/loss"]
        for line in (runs / "app_votes" / "metrics.jsonl").read_text().splitlines()
        if '"train/loss"' in line
    ]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    # `workbench train` also reads the store itself, in place
    code = main(
        [
            "train",
            str(Path(__file__).parents[1] / "configs/toy/dpo.yaml"),
            f"model.source={toy_pipeline_path()}",
            f"data.sources=[{{format: app_votes, path: {ctx.settings.db}}}]",
            f"data.cache.dir={tmp_path / 'cache'}",
            f"run.output_dir={runs}",
            "run.name=app_store",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.checkpoint_every=1000",
            "--no-progress",
        ]
    )
    assert code == 0 and (runs / "app_store" / "final" / "COMPLETE").is_file()

    # the tuned run comes back into the app: a blind round of base against it, on identical noise
    compare_value, arena_value, _ = client.predict(
        f"voted={runs / 'app_votes'}", ["base"], ["base"], api_name="/add_checkpoint"
    )
    assert compare_value["value"] == ["base", "voted"] and arena_value["choices"][-1][0] == "voted"
    out = client.predict(
        "",
        "a red circle on a white background",
        "toy:heldout",
        "2",
        "checkpoints",
        "best",
        ["base", "voted"],
        api_name="/arena_next",
    )
    assert all("hidden" in image["label"] for image in out[:2])
    reveal = client.predict("", api_name="/arena_1")[-2]
    assert "voted" in reveal and "base" in reveal
    rnd = ctx.store.votes()[-1].round
    assert rnd.blind and {i.params["checkpoint"] for i in rnd.items} == {"base", "voted"}
    assert len({i.params["seed"] for i in rnd.items}) == 1
    with pytest.raises(Exception, match="already there"):
        client.predict(f"voted={runs / 'app_votes'}", ["base"], ["base"], api_name="/add_checkpoint")


def test_bad_input_comes_back_as_a_message(launched: tuple[AppContext, str], tmp_path: Path):
    _, url = launched
    client = Client(url, auth=AUTH, verbose=False)
    with pytest.raises(Exception, match="limit is 500"):
        client.predict("", "x" * 600, "toy:heldout", "2", "seeds", "best", ["base"], api_name="/arena_next")
    with pytest.raises(Exception, match="does not exist"):
        client.predict(str(tmp_path / "nope"), "", "swiss", api_name="/curate_load")
    with pytest.raises(Exception, match="at most 16"):
        client.predict(["base"], "p", "toy:heldout", "0-99", "euler", 2, 5.0, "", [], api_name="/compare")
