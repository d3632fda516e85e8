"""The app in real headless Chromium (Debian's ``chromium`` driven by Playwright): log in, generate a round, vote
with the keyboard shortcuts, undo, curate a folder of ComfyUI / A1111 PNGs, check the SQLite rows, and save a
screenshot of every tab under the test's output folder (copied to ``$APP_SCREENSHOTS`` when that is set).

``make test`` installs chromium when it is missing (root + apt-get); where it cannot, this test is skipped with the
reason. Playwright cannot download its own browsers here, so it is pointed at ``/usr/bin/chromium``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from app_fixtures import write_curate_folder

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e '.[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
AUTH = ("alice", "wonderland")
WAIT = 180_000  # ms: a round renders on a shared CPU


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from apps.app import launch
    from apps.handlers import AppContext, AppSettings

    root = tmp_path_factory.mktemp("browser_app")
    settings = AppSettings(
        db=str(root / "votes.sqlite"),
        cache_dir=str(root / "cache"),
        runs_dir=None,
        steps=int(os.environ.get("APP_TEST_STEPS", "2")),  # the README screenshot: APP_TEST_STEPS=10
        seed=1,
        scorers=["toy/fidelity"],
        curate_root=str(root),
    )
    ctx = AppContext(settings)
    demo, url = launch(ctx, auth=[AUTH], block=False)
    try:
        yield ctx, url
    finally:
        demo.close()


def _votes(db: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT v.vote_id, v.user_id, v.outcome, r.source, r.k, u.vote_id IS NOT NULL "
            "FROM votes v JOIN rounds r USING (round_id) LEFT JOIN undos u USING (vote_id) ORDER BY v.vote_id"
        ).fetchall()


def test_browser_votes_with_shortcuts_and_curates(app_url: tuple[Any, str], tmp_path: Path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM}: install Debian's chromium (make test does, as root)")
    ctx, url = app_url
    db = ctx.settings.db
    shots = tmp_path / "screenshots"
    shots.mkdir()
    folder = Path(ctx.settings.curate_root) / "my_images"
    write_curate_folder(folder)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        expect = sync_api.expect
        page.goto(url)
        page.get_by_label("username").fill(AUTH[0])
        page.get_by_label("password").fill(AUTH[1])
        page.get_by_role("button", name="Login").click()

        # ---- Arena: 4 images, keyboard only
        page.get_by_role("tab", name="Arena").click()
        page.locator("#arena-k").get_by_text("4", exact=True).click()
        page.locator("#arena-prompt textarea").fill("a large red circle on a white background")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("n")
        status = page.locator("#arena-status")
        expect(status).to_contain_text("best of 4", timeout=WAIT)
        expect(page.locator("#arena-image-4 img")).to_be_visible(timeout=WAIT)
        page.keyboard.press("3")
        expect(status).to_contain_text("stored vote #1", timeout=WAIT)
        page.screenshot(path=str(shots / "arena.png"), full_page=True)
        page.keyboard.press("u")
        expect(status).to_contain_text("undid vote #1", timeout=WAIT)
        page.keyboard.press("1")
        expect(status).to_contain_text("stored vote #2", timeout=WAIT)
        # keys typed into a text box are text, not votes
        prompt_box = page.locator("#arena-prompt textarea")
        prompt_box.fill("")
        prompt_box.press_sequentially("a red circle on a white background 1 t b")
        assert len(_votes(db)) == 2
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("n")
        expect(status).to_contain_text("best of 4", timeout=WAIT)
        page.keyboard.press("t")
        expect(status).to_contain_text("stored vote #3: tie", timeout=WAIT)

        # ---- Curate: a folder of ComfyUI / A1111 PNGs
        page.get_by_role("tab", name="Curate").click()
        page.locator("#curate-folder").locator("input, textarea").first.fill(str(folder))
        page.locator("#curate-prompt textarea").fill("a black square on a black background")
        page.locator("#curate-load").click()
        expect(page.get_by_text("6 images from")).to_be_visible(timeout=WAIT)
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("n")
        cstatus = page.locator("#curate-status")
        expect(cstatus).to_contain_text("best of 2", timeout=WAIT)
        page.keyboard.press("2")
        expect(cstatus).to_contain_text("stored vote #4", timeout=WAIT)
        page.keyboard.press("n")
        expect(cstatus).to_contain_text("best of 2", timeout=WAIT)
        page.keyboard.press("1")
        expect(cstatus).to_contain_text("stored vote #5", timeout=WAIT)
        page.screenshot(path=str(shots / "curate.png"), full_page=True)

        # ---- Compare
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-run").click()
        expect(page.locator("#compare-gallery img").first).to_be_visible(timeout=WAIT)
        page.screenshot(path=str(shots / "compare.png"), full_page=True)

        # ---- Votes
        page.get_by_role("tab", name="Votes").click()
        page.locator("#votes-stats").click()
        expect(page.get_by_text("4 active, 1 undone")).to_be_visible(timeout=WAIT)
        page.locator("#votes-export").click()
        # best of 4 -> 3 pairs, a 4-way tie -> 6 tie pairs, two curate pairs -> 2
        expect(page.get_by_text("4 active votes -> 11 pairs (6 of them ties)")).to_be_visible(timeout=WAIT)
        page.screenshot(path=str(shots / "votes.png"), full_page=True)
        browser.close()

    rows = _votes(db)
    assert [(r[1], r[2], r[3], r[4], bool(r[5])) for r in rows] == [
        ("alice", "best", "arena", 4, True),
        ("alice", "best", "arena", 4, False),
        ("alice", "tie", "arena", 4, False),
        ("alice", "best", "curate", 2, False),
        ("alice", "best", "curate", 2, False),
    ]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        formats = {
            json.loads(p).get("format")
            for (p,) in conn.execute(
                "SELECT params FROM round_items JOIN rounds USING (round_id) WHERE rounds.source = 'curate'"
            )
        }
        imported = {json.loads(p).get("format") for (p,) in conn.execute("SELECT params FROM images")}
    assert formats <= {"comfyui", "a1111", "sidecar", "none"}
    assert {"comfyui", "a1111"} <= imported
    for name in ("arena", "curate", "compare", "votes"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
    target = os.environ.get("APP_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for f in shots.iterdir():
            shutil.copy(f, Path(target) / f.name)


JOB_AUTH = ("bob", "builder")


@pytest.fixture(scope="module")
def job_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """A second app (its own store) whose user already has 4 votes, cast through the handlers."""
    from apps.app import launch
    from apps.handlers import AppContext, AppSettings, ArenaState, act, new_round

    root = tmp_path_factory.mktemp("browser_job_app")
    settings = AppSettings(
        db=str(root / "votes.sqlite"),
        cache_dir=str(root / "cache"),
        runs_dir=None,
        steps=2,
        seed=2,
        scorers=["toy/fidelity", "toy/centering"],
    )
    ctx = AppContext(settings)
    for key in "1221":
        state, _ = new_round(
            ctx,
            ArenaState(),
            user=JOB_AUTH[0],
            prompt=None,
            prompt_set="toy:train",
            k=2,
            source="seeds",
            checkpoints=["base"],
        )
        act(ctx, state, user=JOB_AUTH[0], key=key)
    demo, url = launch(ctx, auth=[JOB_AUTH], block=False)
    try:
        yield ctx, url
    finally:
        demo.close()


def test_browser_fits_the_scorer_runs_a_job_and_compares_its_lora(job_app: tuple[Any, str], tmp_path: Path):
    """Personalise: Fit, then a short personal fine-tune (2 steps) whose progress streams into the page; the LoRA
    then appears among Compare's checkpoints and renders beside the base."""
    from apps.jobs import list_jobs

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM}: install Debian's chromium (make test does, as root)")
    ctx, url = job_app
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        expect = sync_api.expect
        page.goto(url)
        page.get_by_label("username").fill(JOB_AUTH[0])
        page.get_by_label("password").fill(JOB_AUTH[1])
        page.get_by_role("button", name="Login").click()

        page.get_by_role("tab", name="Personalise").click()
        status = page.locator("#job-status")
        expect(status).to_contain_text("no personal fine-tune for bob yet", timeout=WAIT)  # the timer polls
        page.locator("#personal-fit").click()
        expect(page.locator("#personal-fit-summary")).to_contain_text("4 votes", timeout=WAIT)
        for field, value in (
            ("job-steps", "2"),
            ("job-samples", "2"),
            ("job-groups", "1"),
            ("job-prompts", "1"),
        ):
            page.locator(f"#{field} input").fill(value)
        page.locator("#job-start").click()
        expect(status).to_contain_text("job ", timeout=WAIT)
        phases = set()
        deadline = 600  # s: the job starts a process, renders, trains on a shared CPU
        for _ in range(deadline):
            text = status.inner_text()
            phases |= {p for p in ("queued", "votes", "synth", "train", "done", "failed") if f"· {p}" in text}
            if "· done" in text or "· failed" in text:
                break
            page.wait_for_timeout(1000)
        assert "· done" in status.inner_text(), status.inner_text()
        assert phases & {"queued", "votes", "synth", "train"}, phases  # progress was seen before the end
        expect(status).to_contain_text("step 2/2")
        page.screenshot(path=str(shots / "personal_job.png"), full_page=True)
        (view,) = list_jobs(ctx, JOB_AUTH[0])
        name = view.checkpoint
        assert name and name in ctx.renderer.names()

        page.get_by_role("tab", name="Compare").click()
        page.get_by_label(name).check()
        page.locator("#compare-run").click()
        expect(page.locator("#compare-gallery")).to_contain_text(name, timeout=WAIT)
        page.screenshot(path=str(shots / "compare_personal.png"), full_page=True)
        browser.close()
    target = os.environ.get("APP_SCREENSHOTS")
    if target:
        for f in shots.iterdir():
            shutil.copy(f, Path(target) / f.name)
