"""The personal fine-tune job (apps/jobs.py): progress read from the job folder, cancel by process group, a dead
process reported as failed, the votes export (ties and blind rounds left out, up-weighting by repetition), a failure's
message, and one real two-step job on the toy pipeline that a restarted server finds and offers as a checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from app_fixtures import FakeRenderer

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")

from apps.handlers import AppContext, AppSettings, ArenaState, InputError, act, new_round
from apps.jobs import (
    JobOptions,
    _export_votes,
    cancel_job,
    jobs_dir,
    list_jobs,
    read_job,
    register_finished,
    start_job,
    update_status,
    wait_for,
)

USER = "ann"
FEATURES = ["toy/fidelity", "toy/centering"]


def _ctx(tmp_path: Path, renderer: Any = None) -> AppContext:
    settings = AppSettings(
        db=str(tmp_path / "app" / "votes.sqlite"),
        cache_dir=str(tmp_path / "cache"),
        runs_dir=None,
        scorers=FEATURES,
        steps=2,
        seed=3,
    )
    return AppContext(settings, renderer=renderer or FakeRenderer(["base"]))


def _vote(
    ctx: AppContext, key: str, *, k: int = 2, prompt: str = "a red circle on a white background"
) -> None:
    state, _ = new_round(
        ctx,
        ArenaState(),
        user=USER,
        prompt=prompt,
        prompt_set=None,
        k=k,
        source="seeds",
        checkpoints=["base"],
    )
    state, _ = act(ctx, state, user=USER, key=key)
    assert state.voted


def _fake_job(ctx: AppContext, job_id: str = "20260101-000000-abcd", steps: int = 100) -> Path:
    job_dir = jobs_dir(ctx, USER) / job_id
    job_dir.mkdir(parents=True)
    spec = {
        "job_id": job_id,
        "user": USER,
        "checkpoint": f"personal-{USER}-{job_id}",
        "options": {"steps": steps},
    }
    (job_dir / "job.json").write_text(json.dumps(spec))
    return job_dir


def _sleeper(job_dir: Path) -> subprocess.Popen[bytes]:
    """A stand-in driver: a process in its own session whose command line names the job folder, as the real one."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(job_dir)], start_new_session=True
    )


def test_progress_is_read_from_the_status_and_metrics_files(tmp_path: Path):
    ctx = _ctx(tmp_path)
    job_dir = _fake_job(ctx)
    child = _sleeper(job_dir)
    try:
        update_status(
            job_dir, phase="train", pid=child.pid, started=time.time() - 30, message="training the LoRA"
        )
        run = job_dir / "run"
        run.mkdir()
        rows = [
            {
                "step": s,
                "train/loss": 0.7 - 0.01 * s,
                "dpo/implicit_acc": 0.5 + 0.02 * s,
                "train/steps_per_s": 2.0,
            }
            for s in range(1, 13)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "tr')
        view = read_job(job_dir)
        assert view.alive and view.phase == "train" and not view.finished
        assert (view.step, view.max_steps) == (12, 100)  # the half-written line is ignored
        last = rows[-10:]
        assert view.loss == pytest.approx(sum(r["train/loss"] for r in last) / 10)
        assert view.implicit_acc == pytest.approx(sum(r["dpo/implicit_acc"] for r in last) / 10)
        assert view.seconds_left == pytest.approx(88 * 0.5)  # 88 steps left at 2 steps/s
        text = view.summary()
        assert "step 12/100" in text and "implicit accuracy" in text and "left" in text

        with pytest.raises(InputError, match="still train"):  # one running job per user
            (tmp_path / "app" / "users" / USER / "scorer.json").write_text("{}")
            _vote(ctx, "1")
            start_job(ctx, USER)

        view = cancel_job(ctx, USER, view.job_id, wait=10)
        assert view.phase == "cancelled" and not view.alive
        assert child.wait(timeout=10) == -signal.SIGTERM  # through its process group
    finally:
        if child.poll() is None:
            child.kill()


def test_a_job_whose_process_died_is_reported_failed(tmp_path: Path):
    ctx = _ctx(tmp_path)
    job_dir = _fake_job(ctx)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    update_status(job_dir, phase="synth", pid=gone.pid, started=time.time())
    (job_dir / "log.txt").write_text("rendering\r50%\r100%\nTraceback ...\nRuntimeError: out of memory\n")
    (view,) = list_jobs(ctx, USER)
    assert view.phase == "failed" and "ended without finishing" in (view.error or "")
    assert view.log_tail.splitlines()[-1] == "RuntimeError: out of memory"
    assert "100%" in view.log_tail and "50%" not in view.log_tail  # progress-bar redraws collapsed
    assert json.loads((job_dir / "status.json").read_text())["phase"] == "failed"  # written back


def test_start_job_refuses_without_a_scorer_votes_or_a_plain_user_name(tmp_path: Path):
    ctx = _ctx(tmp_path)
    with pytest.raises(InputError, match="fit it on the Personalise tab"):
        start_job(ctx, USER)
    (tmp_path / "app" / "users" / USER).mkdir(parents=True)
    (tmp_path / "app" / "users" / USER / "scorer.json").write_text("{}")
    with pytest.raises(InputError, match="no votes"):
        start_job(ctx, USER)
    with pytest.raises(InputError, match="cannot name a folder"):
        start_job(ctx, "../eve")
    with pytest.raises(InputError, match="steps"):
        start_job(ctx, USER, JobOptions(steps=0))


def test_votes_export_leaves_out_ties_and_blind_rounds_and_repeats_pairs(tmp_path: Path):
    from apps.personal import new_blind_round

    ctx = _ctx(tmp_path, FakeRenderer(["base", "other"]))
    _vote(ctx, "1")  # 1 pair
    _vote(ctx, "2", k=4)  # best of 4: 3 pairs
    _vote(ctx, "t")  # tie: no DPO pair
    _vote(ctx, "b")  # both bad: none
    state, _ = new_blind_round(ctx, user=USER, a="other", b="base", prompt="a blue square", prompt_set=None)
    act(ctx, state, user=USER, key="1")  # an evaluation vote: never trained on
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    spec = {"db": ctx.settings.db, "user": USER}
    assert _export_votes(job_dir, spec, JobOptions(vote_repeat=3)) == 4
    pairs = [json.loads(line) for line in (job_dir / "votes" / "pairs.jsonl").read_text().splitlines()]
    weighted = (job_dir / "votes" / "weighted.jsonl").read_text().splitlines()
    assert len(pairs) == 4 and len(weighted) == 12
    assert all(p["prefer_0"] + p["prefer_1"] == 1 and p["prefer_0"] in (0, 1) for p in pairs)
    assert all(Path(p["image_0"]).is_file() and Path(p["image_1"]).is_file() for p in pairs)

    from workbench.data import read_records  # what the trainer reads: 12 records, the winner first

    source = {"format": "pair_jsonl", "path": str(job_dir / "votes" / "weighted.jsonl")}
    records, report = read_records([{**source, "allow_outside_paths": True}])  # as the job's _train passes it
    assert len(records) == 12 and not report.skipped
    _, report = read_records([source])  # the store's images lie outside the job folder: refused by default
    assert len(report.skipped) == 12 and "outside the dataset folder" in report.skipped[0][1]


def _fit(ctx: AppContext) -> None:
    from apps.personal import fit_user_scorer

    for key in "1212":
        _vote(ctx, key)
    fit_user_scorer(ctx, USER)


def test_a_failing_job_shows_its_message(tmp_path: Path):
    ctx = _ctx(tmp_path)
    _fit(ctx)
    (tmp_path / "app" / "users" / USER / "scorer.json").write_text('{"format": "something else"}')
    view = start_job(ctx, USER, JobOptions(steps=1, broad_max=0, samples=2, seed_groups=1))
    view = wait_for(jobs_dir(ctx, USER) / view.job_id, timeout=300, poll=0.5)
    assert view.phase == "failed"
    assert "refit and save again" in (view.error or "") or "refit and save again" in view.log_tail
    assert view.log_tail and "**error:**" in view.summary()


def test_a_short_real_job_trains_and_a_restarted_server_offers_it(tmp_path: Path):
    """Two steps on the committed toy pipeline through the real driver (votes -> synth -> train)."""
    ctx = _ctx(tmp_path)
    _fit(ctx)
    options = JobOptions(
        steps=2, broad_max=1, samples=2, seed_groups=2, min_margin=0.0, vote_repeat=2, batch_size=2
    )
    view = start_job(ctx, USER, options)
    job_dir = jobs_dir(ctx, USER) / view.job_id
    view = wait_for(job_dir, timeout=600, poll=0.5)
    assert view.phase == "done", view.summary()
    assert (view.step, view.max_steps) == (2, 2) and view.loss is not None
    assert view.counts["your_pairs"] == 4 and view.counts["repeat"] == 2
    assert len((job_dir / "votes" / "weighted.jsonl").read_text().splitlines()) == 8
    assert (job_dir / "run" / "final" / "COMPLETE").is_file()
    assert sorted(p.name for p in (job_dir / "synth").iterdir()) == [
        "g0",
        "g1",
    ]  # one synth run per seed group
    assert json.loads((job_dir / "job.json").read_text())["options"]["steps"] == 2

    restarted = _ctx(tmp_path)  # a new server on the same store: the job is found on disk
    (found,) = list_jobs(restarted, USER)
    assert found.phase == "done" and found.checkpoint == f"personal-{USER}-{view.job_id}"
    assert register_finished(restarted) == [found.checkpoint]
    assert found.checkpoint in restarted.renderer.names()
    assert register_finished(restarted) == []  # offered once


def test_cancel_of_a_finished_job_changes_nothing(tmp_path: Path):
    ctx = _ctx(tmp_path)
    job_dir = _fake_job(ctx)
    update_status(job_dir, phase="done", pid=None, started=time.time(), result=str(tmp_path))
    assert cancel_job(ctx, USER, job_dir.name).phase == "done"
    with pytest.raises(InputError, match="no job"):
        cancel_job(ctx, USER, "nope")


def test_a_running_job_under_a_relative_store_path_is_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The app's default ``db`` is relative (runs/app/votes.sqlite); the driver gets the job folder's resolved path."""
    monkeypatch.chdir(tmp_path)
    settings = AppSettings(db="app/votes.sqlite", cache_dir=str(tmp_path / "cache"), runs_dir=None, seed=3)
    ctx = AppContext(settings, renderer=FakeRenderer(["base"]))
    job_dir = _fake_job(ctx)
    assert not job_dir.is_absolute()
    child = _sleeper(job_dir.resolve())  # as start_job passes it
    try:
        update_status(job_dir, phase="synth", pid=child.pid, started=time.time())
        time.sleep(0.5)  # past the child's exec
        view = read_job(job_dir)
        assert view.phase == "synth" and view.alive
    finally:
        child.kill()
        child.wait()


def test_a_child_just_started_counts_as_alive_before_its_exec(tmp_path: Path):
    """Right after Popen the child's command line may still be the server's; the Popen handle decides (this race once
    marked a fresh job failed)."""
    from apps import jobs

    ctx = _ctx(tmp_path)
    job_dir = _fake_job(ctx)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"]
    )  # no job folder in its argv
    jobs._CHILDREN[child.pid] = child
    try:
        update_status(job_dir, phase="queued", pid=child.pid, started=time.time())
        view = read_job(job_dir)
        assert view.phase == "queued" and view.alive
        child.kill()
        child.wait()
        assert read_job(job_dir).phase == "failed"  # and once it is gone, it is reported
    finally:
        jobs._CHILDREN.pop(child.pid, None)
        if child.poll() is None:
            child.kill()
