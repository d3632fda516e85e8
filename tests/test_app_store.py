"""The app's vote store: WAL, schema versions, one row per idempotency key, undo recorded, K-wise expansion, and
exports that the training readers load as they are."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from apps.store import (
    MIGRATIONS,
    StoreError,
    VoteStore,
    expand_pairs,
    export_votes,
    format_stats,
    vote_stats,
)
from samplers import png_bytes
from workbench.data import ReadReport, read_pair_jsonl, read_pickapic_parquet, read_ranking_jsonl


def _png(value: int) -> bytes:
    return png_bytes(np.full((8, 8, 3), value, dtype=np.uint8))


def _round(store: VoteStore, k: int, *, order: list[int] | None = None, user: str = "alice", ckpts=None):
    items = []
    for slot in range(k):
        params = {"checkpoint": (ckpts or ["base"] * k)[slot], "seed": 10 + slot, "steps": 4}
        items.append((store.add_image(_png(20 * slot + 1), params), params))
    return store.new_round(
        user_id=user, prompt="a red circle", items=items, display_order=order or list(range(k))[::-1]
    )


def test_store_is_wal_versioned_and_refuses_newer_schemas(tmp_path: Path):
    store = VoteStore(tmp_path / "v.sqlite")
    assert store.journal_mode() == "wal"
    assert store.schema_version() == len(MIGRATIONS)
    # a later workbench adds a column: the migration runs once, on the next open
    extra = (*MIGRATIONS, "ALTER TABLE votes ADD COLUMN note TEXT;")
    VoteStore(tmp_path / "v.sqlite", migrations=extra)
    with sqlite3.connect(tmp_path / "v.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
        assert "note" in [r[1] for r in conn.execute("PRAGMA table_info(votes)")]
    with pytest.raises(StoreError, match="newer than this workbench"):
        VoteStore(tmp_path / "v.sqlite")


def test_images_are_content_addressed_with_their_parameters(tmp_path: Path):
    store = VoteStore(tmp_path / "v.sqlite")
    sha = store.add_image(_png(7), {"checkpoint": "base", "seed": 3})
    assert store.add_image(_png(7), {"checkpoint": "other"}) == sha  # same bytes, one file
    assert store.image_path(sha).read_bytes() == _png(7)
    assert store.counts()["images"] == 1
    rnd = _round(store, 2, ckpts=["base", "tuned"])
    assert [i.params["checkpoint"] for i in rnd.items] == [
        "base",
        "tuned",
    ]  # per-slot params kept with the round
    assert rnd.shown()[0].slot == rnd.display_order[0]


def test_a_retried_submit_is_stored_once(tmp_path: Path):
    store = VoteStore(tmp_path / "v.sqlite")
    rnd = _round(store, 2)
    first = store.record_vote(
        rnd.round_id, user_id="alice", outcome="best", ranking=[1], idempotency_key="k1"
    )
    again = store.record_vote(
        rnd.round_id, user_id="alice", outcome="best", ranking=[1], idempotency_key="k1"
    )
    assert (first.duplicate, again.duplicate) == (False, True) and first.vote_id == again.vote_id
    assert store.counts()["votes"] == 1
    with pytest.raises(StoreError, match="different decision"):
        store.record_vote(rnd.round_id, user_id="alice", outcome="best", ranking=[0], idempotency_key="k1")
    with pytest.raises(StoreError, match="out of range"):
        store.record_vote(rnd.round_id, user_id="alice", outcome="best", ranking=[2], idempotency_key="k2")
    with pytest.raises(StoreError, match="names no slots"):
        store.record_vote(rnd.round_id, user_id="alice", outcome="tie", ranking=[0], idempotency_key="k3")
    assert store.counts()["votes"] == 1  # refused votes leave nothing behind


def test_undo_is_recorded_not_erased(tmp_path: Path):
    store = VoteStore(tmp_path / "v.sqlite")
    r1, r2 = _round(store, 2), _round(store, 2)
    store.record_vote(r1.round_id, user_id="alice", outcome="best", ranking=[0], idempotency_key="a")
    store.record_vote(r2.round_id, user_id="bob", outcome="tie", idempotency_key="b")
    undone = store.undo_last("alice", idempotency_key="u1")
    assert undone is not None and undone.round.round_id == r1.round_id
    assert store.undo_last("alice", idempotency_key="u1") == undone  # retried undo: nothing more withdrawn
    assert store.undo_last("alice", idempotency_key="u2") is None  # alice has nothing left; bob's vote is his
    assert store.counts() | {} == {"images": 2, "rounds": 2, "votes": 2, "undos": 1, "active_votes": 1}
    assert [v.user_id for v in store.votes()] == ["bob"]
    assert len(store.votes(include_undone=True)) == 2


def test_kwise_votes_expand_as_the_research_table_says(tmp_path: Path):
    """best-of-4: 3 pairs (best over each other); rank-4: all 6; tie: 6 at 0.5; both bad / skip: none; weight
    1/(K-1) each. Pairs are written in display order with the label of the image shown first."""
    store = VoteStore(tmp_path / "v.sqlite")
    outcomes = {"best": [2], "rank": [3, 1, 0, 2], "tie": [], "both_bad": [], "skip": []}
    for i, (outcome, ranking) in enumerate(outcomes.items()):
        rnd = _round(store, 4, order=[2, 0, 3, 1])
        store.record_vote(
            rnd.round_id, user_id="alice", outcome=outcome, ranking=ranking, idempotency_key=str(i)
        )
    votes = {v.outcome: v for v in store.votes()}
    pairs = {o: expand_pairs(v) for o, v in votes.items()}
    assert {o: len(p) for o, p in pairs.items()} == {"best": 3, "rank": 6, "tie": 6, "both_bad": 0, "skip": 0}
    assert all(p.weight == pytest.approx(1 / 3) for o in ("best", "rank", "tie") for p in pairs[o])
    position = {slot: i for i, slot in enumerate([2, 0, 3, 1])}
    for p in pairs["best"]:
        assert position[p.first] < position[p.second]
        winner = p.first if p.label_first == 1.0 else p.second
        assert winner == 2
    rank = [3, 1, 0, 2]
    for p in pairs["rank"]:
        winner, loser = (p.first, p.second) if p.label_first == 1.0 else (p.second, p.first)
        assert rank.index(winner) < rank.index(loser)
    assert {p.label_first for p in pairs["tie"]} == {0.5}
    # a rank of K - 1 presses implies the last place
    rnd = _round(store, 4)
    store.record_vote(rnd.round_id, user_id="alice", outcome="rank", ranking=[1, 0, 3], idempotency_key="r3")
    assert store.votes()[-1].ranking == [1, 0, 3, 2]


def test_exports_are_read_by_the_training_readers(tmp_path: Path):
    store = VoteStore(tmp_path / "v.sqlite")
    r_best = _round(store, 4, ckpts=["base", "tuned", "base", "tuned"])
    r_pair = _round(store, 2, ckpts=["base", "tuned"])
    r_tie = _round(store, 2, user="bob")
    store.record_vote(r_best.round_id, user_id="alice", outcome="best", ranking=[1], idempotency_key="1")
    store.record_vote(r_pair.round_id, user_id="alice", outcome="best", ranking=[0], idempotency_key="2")
    store.record_vote(r_tie.round_id, user_id="bob", outcome="tie", idempotency_key="3")
    result = export_votes(store, tmp_path / "out")
    assert (result.votes, result.pairs, result.ties, result.rankings) == (3, 5, 1, 2)

    report = ReadReport()
    records = list(read_pickapic_parquet(result.files["pickapic"], report))
    assert len(records) == 4 and report.ties_dropped == 1  # the tie is kept in the file, dropped by default
    winner_bytes = store.image_path(r_best.items[1].sha256).read_bytes()
    assert sum(r.images[0] == winner_bytes for r in records) == 3
    import pyarrow.parquet as pq

    table = pq.read_table(result.files["pickapic"]).to_pydict()
    assert sorted(table["weight"]) == pytest.approx([1 / 3] * 3 + [1.0] * 2)
    assert set(table["user_id"]) == {"alice", "bob"}

    report = ReadReport()
    pairs = list(read_pair_jsonl(result.files["pairs"], report))
    assert len(pairs) == 4 and all(Path(str(r.images[0])).is_file() for r in pairs)
    assert (
        Path(str(pairs[-1].images[0])).read_bytes() == store.image_path(r_pair.items[0].sha256).read_bytes()
    )

    report = ReadReport()
    rankings = list(read_ranking_jsonl(result.files["rankings"], report))
    assert [r.k for r in rankings] == [4, 2] and report.skipped == []
    assert rankings[0].scores == [1.0, 0.0, 0.0, 0.0]
    row = json.loads(result.files["rankings"].read_text().splitlines()[0])
    assert row["checkpoints"][0] == "tuned"

    # read in place (data.sources format app_votes): the same pairs as the export, winner first
    from workbench.data import read_records

    direct, report = read_records([{"format": "app_votes", "path": str(store.path)}])
    exported, _ = read_records([{"format": "pickapic_parquet", "path": str(result.files["pickapic"])}])
    assert report.ties_dropped == 1 and len(direct) == len(exported) == 4
    for d, e in zip(direct, exported):
        assert [Path(str(i)).read_bytes() for i in d.images] == e.images and d.prompt == e.prompt

    stats = vote_stats(store)
    assert stats["by_outcome"] == {"best": 2, "tie": 1}
    assert stats["checkpoints"]["tuned"]["wins"] == 2  # best-of-4: tuned beat the two base images
    assert stats["checkpoints"]["base"]["wins"] == 1  # pair: base won
    assert math.isnan(
        stats["checkpoints"]["tuned"]["low"]
    )  # one prompt: the prompt-clustered interval is n/a
    assert "position bias" in format_stats(stats)
    r4 = _round(store, 2, ckpts=["base", "tuned"])
    with sqlite3.connect(store.path) as conn:  # a second prompt makes the interval defined
        conn.execute("UPDATE rounds SET prompt = 'a blue square' WHERE round_id = ?", (r4.round_id,))
    store.record_vote(r4.round_id, user_id="alice", outcome="best", ranking=[1], idempotency_key="4")
    tuned = vote_stats(store)["checkpoints"]["tuned"]
    assert (tuned["wins"], tuned["losses"], tuned["prompts"]) == (3, 1, 2)
    assert tuned["low"] <= tuned["estimate"] == 0.75 <= tuned["high"]


def test_votes_command_exports_and_refuses_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from workbench.cli import main

    store = VoteStore(tmp_path / "v.sqlite")
    rnd = _round(store, 4)
    store.record_vote(
        rnd.round_id, user_id="alice", outcome="rank", ranking=[3, 2, 1, 0], idempotency_key="1"
    )
    out = tmp_path / "export"
    assert main(["votes", "export", "--db", str(store.path), "-o", str(out), "--format", "rankings"]) == 0
    assert "1 active votes -> 6 pairs" in capsys.readouterr().out
    assert [p.name for p in out.iterdir() if p.is_file()] == ["rankings.jsonl"]
    assert main(["votes", "stats", "--db", str(store.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_outcome"] == {"rank": 1}
    assert main(["votes", "stats", "--db", str(tmp_path / "missing.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "workbench votes: error:" in err and "no vote store there" in err and "Traceback" not in err
