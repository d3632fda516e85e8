"""Votes under load and a server kill (issue 14, part 5).

20 clients (``gradio_client`` threads) send 50 votes each to a running ``workbench app`` through its ``/vote`` API.
The server is killed with SIGKILL twice while votes are in flight and started again on the same port and database;
each client resends a vote that got no answer with the same idempotency key (a fresh uuid4 per decision) until it is
acknowledged. Afterwards the store holds exactly the submitted votes (each key once, with its decision), and SQLite's
``PRAGMA integrity_check`` says ``ok``. The rounds are stored up front from four 8 x 8 images (the test is about the
votes; no model runs).
"""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")

from app_fixtures import FakeRenderer
from gradio_client import Client
from gradio_client.exceptions import AppError

from apps.handlers import AppContext, AppSettings, InputError, submit_vote
from apps.store import StoreError, VoteStore

CLIENTS = 20
VOTES_EACH = 50
KILLS = 2
ROUNDS_EACH = (
    3  # rounds shown to each client (K = 2, 4, 2): several votes per round, as an API client may send
)
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``workbench app`` in a child process (its own process group), started again on the same port after a kill."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.startup_s: list[float] = []  # seconds until each start answered
        config = root / "app.yaml"
        config.write_text(
            f"db: {root / 'votes.sqlite'}\ncache_dir: {root / 'cache'}\nruns_dir: null\nseed: 0\n",
            encoding="utf-8",
        )
        self.cmd = [
            sys.executable,
            "-m",
            "workbench",
            "app",
            "--config",
            str(config),
            "--port",
            str(self.port),
        ]

    def start(self, timeout: float = 120.0) -> None:
        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("wb")
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        t0 = time.monotonic()
        while time.monotonic() < t0 + timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s.append(time.monotonic() - t0)
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the app did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return (self.root / f"server-{self.starts}.log").read_text(errors="replace")[-chars:]


@dataclass
class Tally:
    """What the clients sent and what came back, shared by the threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, tuple[str, str, str, list[int]]] = field(default_factory=dict)  # stored key -> decision
    acked: int = 0
    duplicates: int = 0  # acknowledgements of a resent vote that the store already held
    retries: int = 0  # resends after an error or a timeout
    refused: list[str] = field(default_factory=list)  # AppError: the server refused a vote (must not happen)
    crashed: list[str] = field(default_factory=list)  # a client thread died


def _png(rgb: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _rounds(store: VoteStore) -> dict[str, list[tuple[str, int]]]:
    """Each client's rounds as (round id, K), stored before the server starts."""
    shas = [store.add_image(_png((60 * i, 255 - 60 * i, 0)), {"seed": i}) for i in range(4)]
    out: dict[str, list[tuple[str, int]]] = {}
    for c in range(CLIENTS):
        user = f"client{c:02d}"
        for k in (2, 4, 2)[:ROUNDS_EACH]:
            items = [(shas[(c + j) % 4], {"seed": (c + j) % 4}) for j in range(k)]
            rnd = store.new_round(
                user_id=user, prompt=f"prompt {c}", items=items, display_order=list(range(k))[::-1]
            )
            out.setdefault(user, []).append((rnd.round_id, k))
    return out


def _decision(rng: random.Random, k: int) -> tuple[str, list[int]]:
    outcome = rng.choice(("best", "best", "rank", "tie", "both_bad", "skip"))
    if outcome == "best":
        return outcome, [rng.randrange(k)]
    if outcome == "rank":
        return outcome, rng.sample(range(k), k)
    return outcome, []


def _connect(url: str, stop: threading.Event) -> Client | None:
    while not stop.is_set():
        try:
            return Client(url, verbose=False, download_files=False)
        except Exception:  # the server is down or still starting: try again
            time.sleep(0.3)
    return None


def _client(url: str, user: str, rounds: list[tuple[str, int]], tally: Tally, stop: threading.Event) -> None:
    """One voter: 50 decisions; each is resent with the same key until the server acknowledges it."""
    rng = random.Random(user)
    try:
        client = _connect(url, stop)
        for i in range(VOTES_EACH):
            round_id, k = rounds[i % len(rounds)]
            outcome, ranking = _decision(rng, k)
            key = uuid.uuid4().hex
            with tally.lock:
                tally.sent[f"api:{user}:{key}"] = (round_id, user, outcome, ranking)
            while client is not None and not stop.is_set():
                try:
                    job = client.submit(user, round_id, outcome, ranking, key, None, api_name="/vote")
                    result: dict[str, Any] = job.result(timeout=10)  # a killed server never answers
                except AppError as exc:  # a refusal is a bug here: every vote is valid
                    with tally.lock:
                        tally.refused.append(f"{user} vote {i}: {exc}")
                    return
                except (
                    Exception
                ):  # connection dropped, server down, timeout: reconnect and resend the same key
                    with tally.lock:
                        tally.retries += 1
                    time.sleep(0.2)
                    client = _connect(url, stop)
                    continue
                assert result["round_id"] == round_id
                with tally.lock:
                    tally.acked += 1
                    tally.duplicates += bool(result["duplicate"])
                break
    except Exception as exc:  # pragma: no cover - reported by the test
        with tally.lock:
            tally.crashed.append(f"{user}: {exc!r}")


def test_submit_vote_is_stored_once_per_client_key(tmp_path: Path):
    """The ``/vote`` API's rules, without a server: a resent key is answered from the store; keys are per user."""
    store = VoteStore(tmp_path / "votes.sqlite")
    rounds = _rounds(store)
    ctx = AppContext(AppSettings(db=str(store.path), runs_dir=None), renderer=FakeRenderer(), store=store)
    (a_round, _), (a_round4, _) = rounds["client00"][:2]
    b_round, _ = rounds["client01"][0]
    key = uuid.uuid4().hex

    def vote(user: str, round_id: str, outcome: str = "best", ranking: list[int] | None = None, k: str = key):
        ranking = [1] if ranking is None else ranking
        return submit_vote(
            ctx, user=user, round_id=round_id, outcome=outcome, ranking=ranking, idempotency_key=k
        )

    first = vote("client00", a_round)
    assert first == {"vote_id": 1, "round_id": a_round, "duplicate": False}
    assert vote("client00", a_round) == {**first, "duplicate": True}
    assert vote("client01", b_round)["duplicate"] is False  # the same key from another user is another vote
    assert (
        vote("client00", a_round4, "rank", [3, 0, 2], uuid.uuid4().hex)["vote_id"] == 3
    )  # the last slot implied
    assert [v.ranking for v in store.votes(round_id=a_round4)] == [[3, 0, 2, 1]]

    with pytest.raises(StoreError, match="already used for vote 1 with a different decision"):
        vote("client00", a_round, "tie", [])
    with pytest.raises(InputError, match="was shown to another user"):
        vote("client00", b_round, k=uuid.uuid4().hex)
    with pytest.raises(StoreError, match="does not exist"):
        vote("client00", "nope", k=uuid.uuid4().hex)
    for bad in ("", "short", "has space in it", "../../etc/passwd", "x" * 129):
        with pytest.raises(InputError, match="idempotency_key: send 8-128 characters"):
            vote("client00", a_round, "skip", [], bad)
    with pytest.raises(StoreError, match="out of range"):
        vote("client00", a_round, "best", [2], "k" * 8)
    assert store.counts()["votes"] == 3


@pytest.mark.faults
# gradio_client's message-stream thread dies with a killed server, as it should; its traceback is not a failure
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_votes_survive_load_and_server_kills(tmp_path: Path):
    total = CLIENTS * VOTES_EACH
    store = VoteStore(tmp_path / "votes.sqlite")
    rounds = _rounds(store)
    server = Server(tmp_path)
    tally = Tally()
    stop = threading.Event()
    kills_in_flight = []  # acknowledged votes at each kill (strictly between 0 and the total)
    threads = [
        threading.Thread(target=_client, args=(server.url, user, rounds[user], tally, stop), daemon=True)
        for user in rounds
    ]
    try:
        server.start()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for n in range(1, KILLS + 1):
            target = total * n // (KILLS + 1)
            deadline = time.monotonic() + 120
            while tally.acked < target and time.monotonic() < deadline and not tally.refused:
                time.sleep(0.05)
            assert tally.acked >= target, f"only {tally.acked} votes acknowledged before kill {n}"
            server.kill()
            kills_in_flight.append(tally.acked)
            server.start()
        for t in threads:
            t.join(timeout=150)
        stop.set()
        assert not any(t.is_alive() for t in threads), f"clients still voting; acknowledged {tally.acked}"
        voting_s = time.monotonic() - t0
    finally:
        stop.set()
        server.stop()

    assert not tally.refused and not tally.crashed, (tally.refused[:3], tally.crashed[:3])
    assert tally.acked == total and len(tally.sent) == total
    assert all(0 < a < total for a in kills_in_flight), kills_in_flight  # each kill came mid-run

    with sqlite3.connect(tmp_path / "votes.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = conn.execute(
            "SELECT idempotency_key, round_id, user_id, outcome, ranking FROM votes"
        ).fetchall()
    import json

    stored = {key: (rid, user, outcome, json.loads(ranking)) for key, rid, user, outcome, ranking in rows}
    assert len(rows) == total  # none doubled (and the key is UNIQUE)
    assert stored == tally.sent  # none lost, each with the decision that was sent
    print(
        f"\nvotes: {total} sent by {CLIENTS} clients, {len(rows)} stored; {KILLS} SIGKILLs at "
        f"{kills_in_flight} acknowledged; {tally.retries} resends, {tally.duplicates} answered as already stored; "
        f"{voting_s:.0f} s of voting, server starts {', '.join(f'{s:.1f}' for s in server.startup_s)} s"
    )
