"""The app's durable vote store (SQLite) and its exports to the training formats ``workbench train`` reads.

Everything a person sees and decides is kept, append-only:

* ``images``: every shown image, content-addressed (``sha256`` of its PNG bytes) on disk under ``images/ab/<sha>.png``
  beside the database, with the parameters it was first stored with;
* ``rounds`` + ``round_items``: what one round showed: the prompt, K images by *slot* (slot = generation identity,
  with each slot's generation parameters: checkpoint and its fingerprint, seed, sampler, steps, guidance, size, or
  the curated file and its embedded metadata), and the *display order* (display position -> slot), shuffled and
  logged separately from slot identity (research/tools_and_ui.md section 2.6);
* ``votes``: one row per submitted decision, written in one transaction, with an idempotency key (a retried submit
  with the same key is stored once), the outcome (``best`` | ``rank`` | ``tie`` | ``both_bad`` | ``skip``), the
  slots best-first, the display order and the decision latency;
* ``undos``: an undo is a row that names the vote it withdraws; nothing is erased. Exports and statistics read the
  *active* votes (those without an undo).

The schema is versioned with ``PRAGMA user_version`` and upgraded by the ordered :data:`MIGRATIONS` on open; a
database written by a newer workbench is refused with a message instead of being misread. The database runs in WAL
mode with ``synchronous=FULL``: a vote that returned is on disk.

Exports (:func:`export_votes`) expand K-wise votes into pairs as research/tools_and_ui.md section 3.7 says:

============  =========================  ====================================================================
outcome       pairs (K images)           weight of each pair
============  =========================  ====================================================================
best          K - 1 (best > each other)  1 / (K - 1): the losers are unordered, no pair among them
rank          K (K - 1) / 2 (all pairs)  1 / (K - 1): pairs of one ranking share a judgment (not independent)
tie           K (K - 1) / 2, label 0.5   1 / (K - 1): kept as Pick-a-Pic ties; ``workbench train`` drops them
                                         unless ``data.drop_ties=false``
both_bad      none                       kept in the store (a quality floor for scorers), not a preference
skip          none
============  =========================  ====================================================================

The weight is written as a column (Pick-a-Pic parquet ``weight``, pair JSONL ``weight``); the trainer's readers
today treat every pair alike and ignore it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

UI_VERSION = "1"
Outcome = Literal["best", "rank", "tie", "both_bad", "skip"]
OUTCOMES: tuple[str, ...] = ("best", "rank", "tie", "both_bad", "skip")
EXPORT_FORMATS: tuple[str, ...] = ("pickapic", "pairs", "rankings")
#: Round source of the Personalise tab's blind before/after rounds: the evaluation set. Its votes measure a fine-tune
#: and are never training data (exports, ``app_votes`` sources and the personal fine-tune leave them out).
EVAL_SOURCE = "beforeafter"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def training_votes(store: VoteStore, user_id: str | None = None) -> tuple[list[Vote], int]:
    """The active votes that may become training data, and how many evaluation votes were left out."""
    votes = store.votes(user_id=user_id)
    kept = [v for v in votes if v.round.source != EVAL_SOURCE]
    return kept, len(votes) - len(kept)


#: Ordered schema migrations: ``MIGRATIONS[i]`` upgrades a database from ``user_version == i`` to ``i + 1``.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE images (
        sha256 TEXT PRIMARY KEY,
        relpath TEXT NOT NULL,          -- under the store's image folder
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        params TEXT NOT NULL,           -- JSON: generation parameters or curated-file metadata, as first stored
        created_at REAL NOT NULL
    );
    CREATE TABLE rounds (
        round_id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        user_id TEXT NOT NULL,
        session_id TEXT,
        source TEXT NOT NULL,           -- arena | curate | api
        prompt TEXT NOT NULL,
        k INTEGER NOT NULL,
        blind INTEGER NOT NULL,         -- 1: checkpoint names hidden until the vote
        display_order TEXT NOT NULL     -- JSON: display position -> slot
    );
    CREATE TABLE round_items (
        round_id TEXT NOT NULL REFERENCES rounds(round_id),
        slot INTEGER NOT NULL,
        image_sha256 TEXT NOT NULL REFERENCES images(sha256),
        params TEXT NOT NULL,           -- JSON: this slot's generation parameters
        PRIMARY KEY (round_id, slot)
    );
    CREATE TABLE votes (
        vote_id INTEGER PRIMARY KEY AUTOINCREMENT,
        idempotency_key TEXT NOT NULL UNIQUE,
        round_id TEXT NOT NULL REFERENCES rounds(round_id),
        user_id TEXT NOT NULL,
        session_id TEXT,
        created_at REAL NOT NULL,
        outcome TEXT NOT NULL,          -- best | rank | tie | both_bad | skip
        ranking TEXT NOT NULL,          -- JSON: slots best-first ([best] for best-of-K, all K for rank, [] else)
        display_order TEXT NOT NULL,    -- JSON: display position -> slot, as shown when voting
        latency_ms INTEGER,
        ui_version TEXT NOT NULL
    );
    CREATE INDEX votes_by_user ON votes(user_id, vote_id);
    CREATE TABLE undos (
        undo_id INTEGER PRIMARY KEY AUTOINCREMENT,
        vote_id INTEGER NOT NULL UNIQUE REFERENCES votes(vote_id),
        idempotency_key TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(ValueError):
    """A request the store refuses; the message says what and how to fix it."""


@dataclass(frozen=True)
class RoundItem:
    slot: int
    sha256: str
    path: Path
    params: dict[str, Any]


@dataclass(frozen=True)
class Round:
    round_id: str
    user_id: str
    prompt: str
    items: list[RoundItem]  # by slot
    display_order: list[int]  # display position -> slot
    blind: bool
    source: str
    created_at: float

    @property
    def k(self) -> int:
        return len(self.items)

    def shown(self) -> list[RoundItem]:
        """Items in display order (left to right, top to bottom)."""
        return [self.items[s] for s in self.display_order]


@dataclass(frozen=True)
class VoteResult:
    vote_id: int
    round_id: str
    duplicate: bool  # True: the idempotency key was already stored; nothing new was written


@dataclass(frozen=True)
class Vote:
    vote_id: int
    round: Round
    user_id: str
    outcome: str
    ranking: list[int]  # slots best-first
    display_order: list[int]
    latency_ms: int | None
    created_at: float


@dataclass
class PairRow:
    """One expanded pair: slots ``first`` and ``second`` in display order, ``label_first`` in {1, 0, 0.5}."""

    vote: Vote
    first: int
    second: int
    label_first: float
    weight: float


def png_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_id() -> str:
    return uuid.uuid4().hex


class VoteStore:
    """The SQLite store at ``path`` with its content-addressed images in ``image_dir`` (default: ``images/`` beside
    the database). Safe to use from several threads: each call opens its own connection."""

    def __init__(
        self, path: str | Path, image_dir: str | Path | None = None, *, migrations: Sequence[str] = MIGRATIONS
    ):
        self.path = Path(path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent / "images"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self._image_root = self.image_dir.resolve()
        self._migrate(tuple(migrations))

    # ------------------------------------------------------------------------------------------- connections
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit BEGIN / COMMIT
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken up front, so concurrent writers wait
        instead of failing half-way); rolled back on any error."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self, migrations: tuple[str, ...]) -> None:
        with self._connect() as conn:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch the database to WAL mode (got {mode!r})")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(migrations):
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this workbench knows "
                    f"({len(migrations)}); upgrade the workbench or use another --db"
                )
            for v in range(version, len(migrations)):
                conn.execute("BEGIN IMMEDIATE")  # each migration and its version bump commit together
                try:
                    for statement in _statements(migrations[v]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {v + 1}")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    def schema_version(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        with self._connect() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    # ------------------------------------------------------------------------------------------------ images
    def image_path(self, sha: str) -> Path:
        """``image_dir/ab/<sha>.png``. The id comes from the database, so it is checked: a name that is not a
        sha256 (``../../etc/passwd``, a hand-edited or corrupt row) and a file or folder that a symlink leads out of
        the image folder are refused; nothing outside it is read, written or served."""
        if not _SHA256.fullmatch(sha):
            raise StoreError(
                f"{self.path}: image id {sha[:80]!r} is not a sha256 hex digest; the database was edited or is "
                "corrupt (restore it from a copy)"
            )
        path = self.image_dir / sha[:2] / f"{sha}.png"
        if not path.resolve().is_relative_to(self._image_root):
            raise StoreError(
                f"{path}: a symlink leads outside the image folder {self.image_dir}; remove it (images are plain "
                "files written by the store)"
            )
        return path

    def add_image(self, png: bytes, params: dict[str, Any]) -> str:
        """Store PNG bytes content-addressed; returns the sha256. The file is written atomically before its row."""
        import io

        from PIL import Image

        sha = png_sha256(png)
        path = self.image_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(png)
            tmp.replace(path)
        with Image.open(io.BytesIO(png)) as im:
            width, height = im.size
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO images (sha256, relpath, width, height, params, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sha, str(path.relative_to(self.image_dir)), width, height, _dumps(params), time.time()),
            )
        return sha

    # ------------------------------------------------------------------------------------------------ rounds
    def new_round(
        self,
        *,
        user_id: str,
        prompt: str,
        items: Sequence[tuple[str, dict[str, Any]]],
        display_order: Sequence[int],
        blind: bool = False,
        source: str = "arena",
        session_id: str | None = None,
        round_id: str | None = None,
    ) -> Round:
        """Record what a round shows: ``items`` = (image sha256, generation params) by slot; ``display_order`` =
        display position -> slot (a permutation of the slots)."""
        k = len(items)
        if k < 2:
            raise StoreError(f"a round needs at least 2 images, got {k}")
        if sorted(display_order) != list(range(k)):
            raise StoreError(f"display_order {list(display_order)} is not a permutation of the {k} slots")
        if not user_id:
            raise StoreError("a round needs a user id (the auth user or a chosen name)")
        rid = round_id or new_id()
        now = time.time()
        with self._transaction() as conn:
            for sha, _ in items:
                if conn.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone() is None:
                    raise StoreError(f"image {sha[:12]} is not in the store; add_image() it first")
            conn.execute(
                "INSERT INTO rounds (round_id, created_at, user_id, session_id, source, prompt, k, blind, "
                "display_order) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rid,
                    now,
                    user_id,
                    session_id,
                    source,
                    prompt,
                    k,
                    int(blind),
                    json.dumps(list(display_order)),
                ),
            )
            for slot, (sha, params) in enumerate(items):
                conn.execute(
                    "INSERT INTO round_items (round_id, slot, image_sha256, params) VALUES (?, ?, ?, ?)",
                    (rid, slot, sha, _dumps(params)),
                )
        return self.get_round(rid)

    def get_round(self, round_id: str) -> Round:
        with self._connect() as conn:
            return self._round(conn, round_id)

    def _round(self, conn: sqlite3.Connection, round_id: str) -> Round:
        row = conn.execute("SELECT * FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        if row is None:
            raise StoreError(f"round {round_id!r} does not exist")
        items = [
            RoundItem(
                r["slot"], r["image_sha256"], self.image_path(r["image_sha256"]), json.loads(r["params"])
            )
            for r in conn.execute(
                "SELECT slot, image_sha256, params FROM round_items WHERE round_id = ? ORDER BY slot",
                (round_id,),
            )
        ]
        return Round(
            row["round_id"],
            row["user_id"],
            row["prompt"],
            items,
            json.loads(row["display_order"]),
            bool(row["blind"]),
            row["source"],
            row["created_at"],
        )

    # ------------------------------------------------------------------------------------------------- votes
    def record_vote(
        self,
        round_id: str,
        *,
        user_id: str,
        outcome: str,
        ranking: Sequence[int] = (),
        idempotency_key: str,
        latency_ms: int | None = None,
        session_id: str | None = None,
    ) -> VoteResult:
        """Store one decision in one transaction. ``ranking``: slots best-first (one slot for ``best``, all K, or
        K - 1 with the last one implied, for ``rank``; empty for tie / both_bad / skip). A retried submit with the
        same ``idempotency_key`` returns the stored vote (``duplicate=True``); the same key with a different
        decision is refused."""
        if outcome not in OUTCOMES:
            raise StoreError(f"outcome {outcome!r} unknown; use one of {', '.join(OUTCOMES)}")
        if not idempotency_key:
            raise StoreError("a vote needs an idempotency key")
        with self._transaction() as conn:
            rnd = self._round(conn, round_id)
            order = _check_ranking(outcome, list(ranking), rnd.k)
            old = conn.execute(
                "SELECT vote_id, round_id, outcome, ranking, user_id FROM votes WHERE idempotency_key = ?",
                (idempotency_key,),
            ).fetchone()
            if old is not None:
                same = (old["round_id"], old["outcome"], json.loads(old["ranking"]), old["user_id"]) == (
                    round_id,
                    outcome,
                    order,
                    user_id,
                )
                if not same:
                    raise StoreError(
                        f"idempotency key {idempotency_key!r} was already used for vote {old['vote_id']} with a "
                        "different decision; send a new key for a new vote"
                    )
                return VoteResult(int(old["vote_id"]), round_id, duplicate=True)
            cur = conn.execute(
                "INSERT INTO votes (idempotency_key, round_id, user_id, session_id, created_at, outcome, ranking, "
                "display_order, latency_ms, ui_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    idempotency_key,
                    round_id,
                    user_id,
                    session_id,
                    time.time(),
                    outcome,
                    json.dumps(order),
                    json.dumps(rnd.display_order),
                    latency_ms,
                    UI_VERSION,
                ),
            )
            return VoteResult(int(cur.lastrowid or 0), round_id, duplicate=False)

    def undo_last(self, user_id: str, *, idempotency_key: str) -> Vote | None:
        """Withdraw ``user_id``'s latest active vote by recording an undo (the vote row stays). Returns the
        withdrawn vote, or None when the user has none. A retried undo with the same key withdraws nothing more."""
        with self._transaction() as conn:
            old = conn.execute(
                "SELECT vote_id FROM undos WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
            if old is not None:
                return self._vote(conn, int(old["vote_id"]))
            row = conn.execute(
                "SELECT v.vote_id FROM votes v LEFT JOIN undos u ON u.vote_id = v.vote_id "
                "WHERE v.user_id = ? AND u.vote_id IS NULL ORDER BY v.vote_id DESC LIMIT 1",
                (user_id,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "INSERT INTO undos (vote_id, idempotency_key, user_id, created_at) VALUES (?, ?, ?, ?)",
                (row["vote_id"], idempotency_key, user_id, time.time()),
            )
            return self._vote(conn, int(row["vote_id"]))

    def _vote(self, conn: sqlite3.Connection, vote_id: int) -> Vote:
        row = conn.execute("SELECT * FROM votes WHERE vote_id = ?", (vote_id,)).fetchone()
        return self._vote_of(conn, row, {})

    def _vote_of(self, conn: sqlite3.Connection, row: sqlite3.Row, rounds: dict[str, Round]) -> Vote:
        rid = row["round_id"]
        if rid not in rounds:
            rounds[rid] = self._round(conn, rid)
        return Vote(
            int(row["vote_id"]),
            rounds[rid],
            row["user_id"],
            row["outcome"],
            json.loads(row["ranking"]),
            json.loads(row["display_order"]),
            row["latency_ms"],
            row["created_at"],
        )

    def votes(
        self, *, user_id: str | None = None, round_id: str | None = None, include_undone: bool = False
    ) -> list[Vote]:
        """Votes in the order they were cast (of one user, on one round); active ones only unless
        ``include_undone``."""
        where = [] if include_undone else ["u.vote_id IS NULL"]
        params: list[Any] = []
        for column, value in (("v.user_id", user_id), ("v.round_id", round_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT v.* FROM votes v LEFT JOIN undos u ON u.vote_id = v.vote_id"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._connect() as conn:
            rounds: dict[str, Round] = {}
            return [self._vote_of(conn, r, rounds) for r in conn.execute(sql + " ORDER BY v.vote_id", params)]

    def counts(self) -> dict[str, int]:
        with self._connect() as conn:
            one = lambda sql: int(conn.execute(sql).fetchone()[0])  # noqa: E731
            return {
                "images": one("SELECT COUNT(*) FROM images"),
                "rounds": one("SELECT COUNT(*) FROM rounds"),
                "votes": one("SELECT COUNT(*) FROM votes"),
                "undos": one("SELECT COUNT(*) FROM undos"),
                "active_votes": one(
                    "SELECT COUNT(*) FROM votes v LEFT JOIN undos u ON u.vote_id = v.vote_id WHERE u.vote_id IS NULL"
                ),
            }


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (``sqlite3.complete_statement`` finds the ends)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise StoreError(f"migration has an unterminated statement: {buf.strip()[:60]!r}")
    return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _check_ranking(outcome: str, ranking: list[int], k: int) -> list[int]:
    """Validate a decision against a round of ``k`` slots; a rank of K - 1 slots gets the last one appended."""
    bad = [s for s in ranking if not (isinstance(s, int) and 0 <= s < k)]
    if bad:
        raise StoreError(f"slots {bad} are out of range for a round of {k} images (0..{k - 1})")
    if len(set(ranking)) != len(ranking):
        raise StoreError(f"ranking {ranking} names a slot twice")
    if outcome == "best":
        if len(ranking) != 1:
            raise StoreError(f"a 'best' vote names exactly one slot, got {ranking}")
        return ranking
    if outcome == "rank":
        if len(ranking) == k - 1:
            ranking = [*ranking, *(s for s in range(k) if s not in ranking)]
        if len(ranking) != k:
            raise StoreError(
                f"a 'rank' vote orders all {k} slots (or {k - 1}, the last implied), got {ranking}"
            )
        return ranking
    if ranking:
        raise StoreError(f"a {outcome!r} vote names no slots, got {ranking}")
    return []


# ------------------------------------------------------------------------------------------------------ export
def expand_pairs(vote: Vote) -> list[PairRow]:
    """The pairs a vote implies (module docstring table), each in display order (the image shown first is
    ``first``), with its weight."""
    k = vote.round.k
    position = {slot: i for i, slot in enumerate(vote.display_order)}
    weight = 1.0 / (k - 1)
    pairs: list[tuple[int, int, float]] = []  # (a, b, P(a preferred over b))
    if vote.outcome == "best":
        best = vote.ranking[0]
        pairs = [(best, s, 1.0) for s in range(k) if s != best]
    elif vote.outcome == "rank":
        pairs = [(a, b, 1.0) for a, b in itertools.combinations(vote.ranking, 2)]
    elif vote.outcome == "tie":
        pairs = [(a, b, 0.5) for a, b in itertools.combinations(range(k), 2)]
    out = []
    for a, b, p in pairs:
        first, second, label = (a, b, p) if position[a] < position[b] else (b, a, 1.0 - p)
        out.append(PairRow(vote, first, second, label, weight))
    return out


def _pair_fields(row: PairRow) -> dict[str, Any]:
    items = row.vote.round.items
    a, b = items[row.first], items[row.second]
    return {
        "caption": row.vote.round.prompt,
        "label_0": row.label_first,
        "label_1": 1.0 - row.label_first,
        "weight": row.weight,
        "user_id": row.vote.user_id,
        "vote_id": row.vote.vote_id,
        "round_id": row.vote.round.round_id,
        "outcome": row.vote.outcome,
        "image_0_uid": a.sha256,
        "image_1_uid": b.sha256,
        "model_0": str(a.params.get("checkpoint", a.params.get("source", ""))),
        "model_1": str(b.params.get("checkpoint", b.params.get("source", ""))),
        "seed_0": _int_or_none(a.params.get("seed")),
        "seed_1": _int_or_none(b.params.get("seed")),
    }


def _int_or_none(x: Any) -> int | None:
    try:
        return None if x is None else int(x)
    except (TypeError, ValueError):
        return None


def ranking_row(vote: Vote, image_ref: Any) -> dict[str, Any] | None:
    """A ranking JSONL row (``prompt``, ``images`` best-first, ``scores`` non-increasing) for best / rank votes:
    rank -> scores K-1 .. 0; best-of-K -> 1 for the best, 0 for the unordered rest (a partial tie the readers keep)."""
    k = vote.round.k
    if vote.outcome == "rank":
        order, scores = vote.ranking, [float(k - 1 - i) for i in range(k)]
    elif vote.outcome == "best":
        best = vote.ranking[0]
        order = [best, *(s for s in vote.display_order if s != best)]
        scores = [1.0] + [0.0] * (k - 1)
    else:
        return None
    items = vote.round.items
    return {
        "prompt": vote.round.prompt,
        "images": [image_ref(items[s]) for s in order],
        "scores": scores,
        "user_id": vote.user_id,
        "vote_id": vote.vote_id,
        "outcome": vote.outcome,
        "checkpoints": [items[s].params.get("checkpoint") for s in order],
        "seeds": [items[s].params.get("seed") for s in order],
    }


@dataclass
class ExportResult:
    files: dict[str, Path] = field(default_factory=dict)
    votes: int = 0
    pairs: int = 0
    ties: int = 0
    rankings: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # outcome -> votes that imply no pair

    def summary(self) -> str:
        lines = [
            f"{self.votes} active votes -> {self.pairs} pairs ({self.ties} of them ties), {self.rankings} rankings"
        ]
        if self.skipped:
            lines.append(
                "votes with no pair: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
            )
        lines += [f"  {fmt}: {path}" for fmt, path in self.files.items()]
        return "\n".join(lines)


def export_votes(
    store: VoteStore,
    out: str | Path,
    *,
    formats: Sequence[str] = EXPORT_FORMATS,
    user_id: str | None = None,
) -> ExportResult:
    """Write the active votes to ``out/``: ``pickapic.parquet`` (Pick-a-Pic layout, image bytes inline),
    ``pairs.jsonl`` (image-pair JSONL) and ``rankings.jsonl`` (ranking JSONL), the two JSONL files referring to
    ``out/images/<sha>.png`` by relative path. Each is what ``workbench train`` reads as it is (``data.sources``
    format ``pickapic_parquet`` / ``pair_jsonl`` / ``ranking_jsonl``).

    Nothing is written outside ``out``: every file is first written into a fresh private folder inside it and then
    renamed into place, so a symlink planted at a file's name is replaced, not written through; an ``images`` that
    is a symlink or a file is refused, and an existing image is reused only when it is a plain file with the right
    content."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise StoreError(f"export format(s) {unknown} unknown; use {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images"
    if images_dir.is_symlink() or (images_dir.exists() and not images_dir.is_dir()):
        raise StoreError(
            f"{images_dir} is a symlink or a file, not the export's image folder; remove it or export into a "
            "fresh folder"
        )
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        return _export(store, out, staging, formats, user_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export(
    store: VoteStore, out: Path, staging: Path, formats: Sequence[str], user_id: str | None
) -> ExportResult:
    votes, held_out = training_votes(store, user_id)
    result = ExportResult(votes=len(votes))
    if held_out:
        result.skipped["blind before/after (evaluation, never exported)"] = held_out
    pairs = [p for v in votes for p in expand_pairs(v)]
    result.pairs = len(pairs)
    result.ties = sum(1 for p in pairs if p.label_first == 0.5)
    for v in votes:
        if v.outcome in ("both_bad", "skip"):
            result.skipped[v.outcome] = result.skipped.get(v.outcome, 0) + 1

    copied: set[str] = set()

    def image_ref(item: RoundItem) -> str:
        rel = f"images/{item.sha256}.png"
        if item.sha256 not in copied:
            target = out / rel
            if target.is_symlink() or not target.is_file() or png_sha256(target.read_bytes()) != item.sha256:
                target.parent.mkdir(exist_ok=True)
                tmp = staging / target.name
                tmp.write_bytes(item.path.read_bytes())
                os.replace(tmp, target)
            copied.add(item.sha256)
        return rel

    if "pickapic" in formats:
        from samplers.synth import write_pickapic_parquet

        cols: dict[str, list[Any]] = {}
        for p in pairs:
            fields = _pair_fields(p)
            fields["jpg_0"] = p.vote.round.items[p.first].path.read_bytes()
            fields["jpg_1"] = p.vote.round.items[p.second].path.read_bytes()
            for key, value in fields.items():
                cols.setdefault(key, []).append(value)
        if not cols:
            cols = {c: [] for c in ("jpg_0", "jpg_1", "label_0", "label_1", "caption")}
        path = out / "pickapic.parquet"
        write_pickapic_parquet(staging / path.name, cols)
        os.replace(staging / path.name, path)
        result.files["pickapic"] = path
    if "pairs" in formats:
        lines = []
        for p in pairs:
            fields = _pair_fields(p)
            items = p.vote.round.items
            lines.append(
                {
                    "image_0": image_ref(items[p.first]),
                    "image_1": image_ref(items[p.second]),
                    "prefer_0": fields["label_0"],
                    "prefer_1": fields["label_1"],
                    "prompt": fields["caption"],
                    **{k: v for k, v in fields.items() if k not in ("caption", "label_0", "label_1")},
                }
            )
        result.files["pairs"] = _write_jsonl(out / "pairs.jsonl", lines, staging)
    if "rankings" in formats:
        rows = [r for v in votes if (r := ranking_row(v, image_ref)) is not None]
        result.rankings = len(rows)
        result.files["rankings"] = _write_jsonl(out / "rankings.jsonl", rows, staging)
    else:
        result.rankings = sum(1 for v in votes if v.outcome in ("best", "rank"))
    return result


def _write_jsonl(path: Path, rows: list[dict[str, Any]], staging: Path) -> Path:
    tmp = staging / path.name
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------- stats
def vote_stats(store: VoteStore, *, user_id: str | None = None, n_boot: int = 2000) -> dict[str, Any]:
    """Counts by user / outcome / K / source, undos, decision latency, position bias (does the image shown first win
    its pairs more than half the time?) and, for rounds across checkpoints, each checkpoint's pairwise win rate over
    its decided pairs (ties and same-checkpoint pairs left out). Pairs of one vote share a prompt and a judgment, so
    the intervals are :func:`workbench.stats.cluster_ratio_bootstrap` over prompts (every pair of a prompt resampled
    together); with a single prompt they are undefined (n/a)."""
    import numpy as np

    from workbench.stats import cluster_ratio_bootstrap

    votes = store.votes(user_id=user_id)
    all_votes = store.votes(user_id=user_id, include_undone=True)
    by = lambda key: dict(sorted(_count(key(v) for v in votes).items()))  # noqa: E731
    latencies = sorted(v.latency_ms for v in votes if v.latency_ms is not None)
    pairs = [p for v in votes for p in expand_pairs(v) if p.label_first != 0.5]

    def rate(wins: list[float], prompts: list[str]) -> dict[str, float]:
        ci = cluster_ratio_bootstrap(np.asarray(wins), np.ones(len(wins)), prompts, n_boot=n_boot)
        return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "prompts": len(set(prompts))}

    position = (
        rate([float(p.label_first == 1.0) for p in pairs], [p.vote.round.prompt for p in pairs])
        if pairs
        else {"estimate": math.nan, "low": math.nan, "high": math.nan, "prompts": 0}
    )
    outcomes: dict[str, tuple[list[float], list[str]]] = {}
    for p in pairs:
        items = p.vote.round.items
        a, b = (str(items[s].params.get("checkpoint", "")) for s in (p.first, p.second))
        if not a or not b or a == b:
            continue
        for name, won in ((a, p.label_first == 1.0), (b, p.label_first == 0.0)):
            wins, prompts = outcomes.setdefault(name, ([], []))
            wins.append(float(won))
            prompts.append(p.vote.round.prompt)
    checkpoints = {}
    for name, (wins, prompts) in sorted(outcomes.items()):
        won = int(sum(wins))
        checkpoints[name] = {"wins": won, "losses": len(wins) - won, **rate(wins, prompts)}
    return {
        "votes": len(votes),
        "undone": len(all_votes) - len(votes),
        "by_user": by(lambda v: v.user_id),
        "by_outcome": by(lambda v: v.outcome),
        "by_k": by(lambda v: f"K={v.round.k}"),
        "by_source": by(lambda v: v.round.source),
        "latency_ms_median": latencies[len(latencies) // 2] if latencies else None,
        "pairs": len(pairs),
        "first_shown_win_rate": position,
        "checkpoints": checkpoints,
    }


def format_stats(stats: dict[str, Any]) -> str:
    def fmt(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    pos = stats["first_shown_win_rate"]
    lines = [
        f"votes: {stats['votes']} active, {stats['undone']} undone",
        "by user: " + _kv(stats["by_user"]),
        "by outcome: " + _kv(stats["by_outcome"]),
        "by K: " + _kv(stats["by_k"]) + "   by source: " + _kv(stats["by_source"]),
        f"median decision latency: {stats['latency_ms_median']} ms",
        f"decided pairs: {stats['pairs']}; image shown first wins {fmt(pos['estimate'])} "
        f"[{fmt(pos['low'])}, {fmt(pos['high'])}] (0.5 = no position bias; 95% interval over "
        f"{pos['prompts']} prompts)",
    ]
    if stats["checkpoints"]:
        lines.append(
            "checkpoint pairwise win rate (pairs across checkpoints; 95% interval resampling prompts):"
        )
        for name, c in stats["checkpoints"].items():
            lines.append(
                f"  {name:30s} {fmt(c['estimate'])} [{fmt(c['low'])}, {fmt(c['high'])}]  "
                f"({c['wins']} won, {c['losses']} lost, {c['prompts']} prompts)"
            )
    return "\n".join(lines)


def _kv(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def _count(values: Iterator[str] | Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
