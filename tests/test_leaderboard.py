"""The leaderboard (apps/leaderboard.py): Plackett-Luce / Bradley-Terry ratings (choix) with bootstrap intervals and
OpenSkill on simulated votes with planted strengths, how each outcome counts, the per-user view and the users
overview through the app's handlers and store, the Leaderboard tab through ``gradio_client``, and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("choix", reason="the leaderboard needs the 'app' extra: pip install -e '.[app]'")
pytest.importorskip("openskill", reason="the leaderboard needs the 'app' extra: pip install -e '.[app]'")

import choix
from app_fixtures import FakeRenderer

from apps.handlers import AppContext, AppSettings, ArenaState, act, new_round
from apps.leaderboard import (
    ELO_SCALE,
    Choice,
    fit_plackett_luce,
    leaderboard,
    store_leaderboard,
    user_overview,
    vote_choices,
    vote_match,
)
from apps.store import Round, RoundItem, Vote

#: planted log-strengths (Plackett-Luce theta); the true order is d > c > b > a
TRUE = {"a": 0.0, "b": 0.5, "c": 1.0, "d": 1.5}


def _vote(i: int, checkpoints: list[str], outcome: str, ranking: list[int], user: str = "u") -> Vote:
    items = [
        RoundItem(
            s, f"sha{i}-{s}", Path("unused.png"), {"checkpoint": c, "checkpoint_hash": f"h-{c}", "seed": i}
        )
        for s, c in enumerate(checkpoints)
    ]
    order = list(range(len(checkpoints)))
    rnd = Round(f"r{i}", user, f"prompt {i % 7}", items, order, True, "arena", float(i))
    return Vote(i, rnd, user, outcome, ranking, order, None, float(i))


def simulate(n: int, k: int, outcome: str, seed: int = 0, strengths: dict[str, float] = TRUE) -> list[Vote]:
    """``n`` rounds of ``k`` distinct checkpoints drawn at random; the voter's choice follows Plackett-Luce
    (Gumbel-max: sorting theta + Gumbel noise draws a PL ranking), so a pair follows Bradley-Terry."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    votes = []
    for i in range(n):
        shown = [str(x) for x in rng.choice(names, size=k, replace=False)]
        utility = np.array([strengths[c] for c in shown]) + rng.gumbel(size=k)
        order = [int(s) for s in np.argsort(-utility)]
        votes.append(_vote(i, shown, outcome, order if outcome == "rank" else order[:1]))
    return votes


def _ratings(board) -> dict[str, float]:
    return {s.checkpoint: s.rating for s in board.standings}


@pytest.mark.parametrize(("n", "k", "outcome"), [(800, 2, "best"), (300, 4, "rank"), (400, 4, "best")])
def test_ratings_recover_the_planted_order(n: int, k: int, outcome: str):
    board = leaderboard(simulate(n, k, outcome), n_boot=0)
    assert [s.checkpoint for s in board.standings] == ["d", "c", "b", "a"]
    assert [s.rank for s in board.standings] == [1, 2, 3, 4]
    ratings = _ratings(board)
    truth = {c: 1000 + ELO_SCALE * (t - np.mean(list(TRUE.values()))) for c, t in TRUE.items()}
    assert all(abs(ratings[c] - truth[c]) < 40 for c in TRUE), (ratings, truth)  # ~87 points per 0.5 of theta
    skill = sorted(board.standings, key=lambda s: -s.ordinal)
    assert [s.checkpoint for s in skill] == ["d", "c", "b", "a"]  # OpenSkill agrees
    assert board.rated == n and sum(s.first for s in board.standings) == n


def test_intervals_shrink_with_more_votes_and_cover_the_truth():
    few = leaderboard(simulate(50, 2, "best", seed=1), n_boot=100)
    many = leaderboard(simulate(800, 2, "best", seed=1), n_boot=100)
    width = lambda b: np.mean([s.high - s.low for s in b.standings])  # noqa: E731
    assert width(many) < 0.5 * width(few), (width(few), width(many))  # ~1/4 expected (sqrt(800 / 50))
    assert all(s.low <= s.rating <= s.high for s in many.standings)
    truth = {c: 1000 + ELO_SCALE * (t - 0.75) for c, t in TRUE.items()}
    assert all(s.low <= truth[s.checkpoint] <= s.high for s in many.standings)
    again = leaderboard(simulate(800, 2, "best", seed=1), n_boot=100)
    assert [(s.low, s.high) for s in again.standings] == [
        (s.low, s.high) for s in many.standings
    ]  # fixed seed


def test_a_ranking_counts_as_a_whole_not_just_its_winner():
    """d always wins; below it the voter always ranks c > b > a. As rankings, c > b > a clearly; read as best-of-4
    (winner only) b, c and a are indistinguishable."""
    votes = [_vote(i, ["a", "b", "c", "d"], "rank", [3, 2, 1, 0]) for i in range(20)]
    ranked = _ratings(leaderboard(votes, n_boot=0))
    assert ranked["d"] > ranked["c"] + 50 > ranked["b"] + 100 > ranked["a"] + 150
    winners = [_vote(i, ["a", "b", "c", "d"], "best", [3]) for i in range(20)]
    best = _ratings(leaderboard(winners, n_boot=0))
    assert best["a"] == pytest.approx(best["b"]) == pytest.approx(best["c"]) and best["d"] > best["c"] + 100
    assert [
        s.checkpoint for s in sorted(leaderboard(votes, n_boot=0).standings, key=lambda s: -s.ordinal)
    ] == [
        "d",
        "c",
        "b",
        "a",
    ]  # OpenSkill takes the whole ranking as one match too


def test_choice_events_are_the_plackett_luce_decomposition_of_rankings():
    """choix's own ranking estimator (ilsr_rankings) on the rankings equals the fit on our K - 1 choice events."""
    votes = simulate(200, 4, "rank", seed=3)
    names = sorted(TRUE)
    index = {n: i for i, n in enumerate(names)}
    rankings = [tuple(index[v.round.items[s].params["checkpoint"]] for s in v.ranking) for v in votes]
    expected = choix.ilsr_rankings(len(names), rankings, alpha=0.01)
    events = [e for v in votes for e in vote_choices(v, [i.params["checkpoint"] for i in v.round.items])]
    assert len(events) == 3 * len(votes)
    np.testing.assert_allclose(fit_plackett_luce(events, names, alpha=0.01), expected, atol=1e-6)


def test_images_of_one_checkpoint_share_its_strength():
    """A best-of-4 over [A, A, B, B] is one event with A's other image among the losers; the fit is the maximum of
    the likelihood with shared strengths: choix.log_likelihood_top1 has zero gradient there."""
    (event,) = vote_choices(_vote(0, ["A", "A", "B", "B"], "best", [1]), ["A", "A", "B", "B"])
    assert event == Choice("A", ("A", "B", "B"))
    rng = np.random.default_rng(0)
    events = []
    for _ in range(60):  # A has twice B's strength: P(best is an A image) = 2 * 2 / (2 * 2 + 2 * 1) = 2/3
        w = rng.random() < 2 / 3
        events.append(Choice("A", ("A", "B", "B")) if w else Choice("B", ("A", "A", "B")))
    theta = fit_plackett_luce(events, ["A", "B"], alpha=1e-9, tol=1e-12)
    data = [(0 if e.winner == "A" else 1, tuple(0 if x == "A" else 1 for x in e.losers)) for e in events]
    for i in range(2):
        step = np.zeros(2)
        step[i] = 1e-5
        grad = (
            choix.log_likelihood_top1(data, theta + step) - choix.log_likelihood_top1(data, theta - step)
        ) / 2e-5
        assert abs(grad) < 1e-3
    wins = sum(e.winner == "A" for e in events)  # closed form: 2 w_A / (2 w_A + 2 w_B) = wins / n
    assert theta[0] - theta[1] == pytest.approx(math.log(wins / (len(events) - wins)), abs=1e-6)
    one = _vote(1, ["A", "A"], "best", [0])  # seeds of one checkpoint: nothing to rate
    assert vote_choices(one, ["A", "A"]) == [] and vote_match(one, ["A", "A"]) == []


def test_ties_both_bad_and_skips():
    """A beats B 3 times, B beats A once, 2 ties. Ties as half-wins: A 3 + 1 = 4, B 1 + 1 = 2, so the
    Bradley-Terry MLE is theta_A - theta_B = ln 2 (120.4 arena points); ties left out: 3 to 1, ln 3 (190.8)."""
    ab = ["A", "B"]
    votes = [_vote(i, ab, "best", [0]) for i in range(3)] + [_vote(3, ab, "best", [1])]
    votes += [_vote(4, ab, "tie", []), _vote(5, ab, "tie", [])]
    votes += [_vote(6, ab, "both_bad", []), _vote(7, ab, "skip", []), _vote(8, ab, "skip", [])]
    half = leaderboard(votes, alpha=1e-9, n_boot=0)
    r = _ratings(half)
    assert r["A"] - r["B"] == pytest.approx(ELO_SCALE * math.log(2), abs=0.01)
    drop = _ratings(leaderboard(votes, alpha=1e-9, n_boot=0, ties="drop"))
    assert drop["A"] - drop["B"] == pytest.approx(ELO_SCALE * math.log(3), abs=0.01)
    a = next(s for s in half.standings if s.checkpoint == "A")
    assert (a.votes, a.rated, a.first, a.ties, a.both_bad, a.skips) == (9, 6, 3, 2, 1, 2)
    assert half.rated == 6 and half.not_rated == {"both bad": 1, "skips": 2}
    assert leaderboard(votes, n_boot=0, ties="drop").not_rated == {
        "both bad": 1,
        "skips": 2,
        "ties left out": 2,
    }
    assert vote_match(votes[4], ab) == [("A", 1), ("B", 1)]  # OpenSkill: a draw
    assert vote_match(_vote(9, ["A", "B", "C", "B"], "best", [1]), ["A", "B", "C", "B"]) == [
        ("B", 1),
        ("A", 2),
        ("C", 2),
    ]  # best-of-K: the unordered losers tied; a checkpoint plays once, at its best place


def test_a_checkpoint_name_with_two_fingerprints_is_split():
    votes = simulate(40, 2, "best", seed=2)
    retrained = _vote(99, ["a", "b"], "best", [0])
    retrained.round.items[0].params["checkpoint_hash"] = "h-a-retrained"
    names = {s.checkpoint for s in leaderboard([*votes, retrained], n_boot=0).standings}
    assert {"a@h-a", "a@h-a-retr", "b", "c", "d"} == names


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ties": "coin"}, "ties="),
        ({"alpha": 0.0}, "alpha="),
        ({"sort": "elo"}, "sort="),
        ({"n_boot": -1}, "n_boot="),
    ],
)
def test_bad_options_get_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        leaderboard(simulate(5, 2, "best"), **kwargs)


# -------------------------------------------------------------------------------------- through the app's handlers
@pytest.fixture()
def ctx(tmp_path: Path) -> AppContext:
    settings = AppSettings(db=str(tmp_path / "votes.sqlite"), runs_dir=None, seed=0, scorers=[])
    return AppContext(settings, renderer=FakeRenderer(["base", "tuned", "run@100"]))


def _vote_for(ctx: AppContext, user: str, favourite: str, k: int = 2) -> None:
    """A blind round across checkpoints; the user presses the key of the position showing ``favourite`` if it is
    shown, else of the first position."""
    state, _ = new_round(
        ctx,
        ArenaState(),
        user=user,
        prompt="a red circle",
        prompt_set=None,
        k=k,
        source="checkpoints",
        checkpoints=["base", "tuned", "run@100"],
    )
    assert state.round_id is not None
    rnd = ctx.store.get_round(state.round_id)
    shown = [i.params["checkpoint"] for i in rnd.shown()]
    act(ctx, state, user=user, key=str(shown.index(favourite) + 1 if favourite in shown else 1))


def _votes_by_two_users(ctx: AppContext) -> None:
    for _ in range(8):
        _vote_for(ctx, "alice", "tuned")
        _vote_for(ctx, "bob", "base")
    state, _ = new_round(
        ctx, ArenaState(), user="bob", prompt="x", prompt_set=None, k=4, source="seeds", checkpoints=["base"]
    )
    state, _ = act(ctx, state, user="bob", key="2")  # seeds of one checkpoint: counted, not rated
    act(ctx, state, user="bob", key="u")  # ... and undone


def test_per_user_views_and_the_users_overview(ctx: AppContext):
    _votes_by_two_users(ctx)
    alice = store_leaderboard(ctx.store, user="alice", n_boot=50)
    bob = store_leaderboard(ctx.store, user="bob", n_boot=50)
    everyone = store_leaderboard(ctx.store, n_boot=50)
    assert alice.standings[0].checkpoint == "tuned" and bob.standings[0].checkpoint == "base"
    assert alice.votes == 8 and bob.votes == 8 and everyone.votes == 16  # bob's undone vote is left out
    tuned = next(s for s in alice.standings if s.checkpoint == "tuned")
    assert tuned.rated > 0 and tuned.first == tuned.rated  # alice picked it whenever it was shown

    users_dir = Path(ctx.settings.db).parent / "users"
    (users_dir / "alice" / "jobs" / "job1").mkdir(parents=True)
    (users_dir / "alice" / "scorer.json").write_text("{}")
    (users_dir / "carol").mkdir()
    rows = {r.user: r for r in user_overview(ctx.store)}
    assert (rows["alice"].pairwise, rows["alice"].kwise, rows["alice"].undone) == (8, 0, 0)
    assert (rows["bob"].pairwise, rows["bob"].kwise, rows["bob"].undone) == (8, 0, 1)
    assert rows["alice"].folder == ["jobs/ (1)", "scorer.json"] and rows["bob"].folder == []
    assert rows["carol"].last_activity is None and rows["carol"].pairwise == 0
    assert rows["bob"].last_activity is not None


def test_the_leaderboard_tab_renders_in_the_launched_app(ctx: AppContext):
    pytest.importorskip("gradio")
    from gradio_client import Client

    from apps.app import launch

    _votes_by_two_users(ctx)
    demo, url = launch(ctx, block=False)
    try:
        assert "Leaderboard" in [getattr(b, "label", None) for b in demo.blocks.values()]
        client = Client(url, verbose=False)
        _, summary, table, users = client.predict("alice", "rating", "half", api_name="/leaderboard")
        assert "user 'alice': 8 active votes, 8 rated" in summary
        assert table["headers"][:3] == ["rank", "checkpoint", "rating"]
        assert table["data"][0][1] == "tuned" and table["data"][0][8] > 0
        assert {row[0] for row in users["data"]} == {"alice", "bob"}
        _, summary, table, _ = client.predict("all users", "openskill", "drop", api_name="/leaderboard")
        assert "all users: 16 active votes" in summary and "OpenSkill" in summary
    finally:
        demo.close()


def test_cli_leaderboard_and_users(ctx: AppContext, capsys: pytest.CaptureFixture[str]):
    from workbench.cli import main

    _votes_by_two_users(ctx)
    assert main(["votes", "leaderboard", "--db", ctx.settings.db, "--user", "bob", "--boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "user 'bob': 8 active votes" in out and "95% low" in out
    assert out.splitlines()[2].split()[1] == "base"  # header, then the best checkpoint
    assert main(["votes", "users", "--db", ctx.settings.db]) == 0
    assert "alice" in capsys.readouterr().out


def test_the_tab_refits_only_when_votes_change(ctx: AppContext):
    pytest.importorskip("gradio")
    from apps.tabs_leaderboard import refresh

    _votes_by_two_users(ctx)
    _, first, rows, _ = refresh(ctx.store, "alice", "rating", "half")
    _, again, same, _ = refresh(ctx.store, "alice", "rating", "half")
    assert "8 active votes" in first and again == first and same == rows
    _vote_for(ctx, "alice", "tuned")
    _, after, _, _ = refresh(ctx.store, "alice", "rating", "half")
    assert "9 active votes" in after


def test_prompt_bootstrap_resamples_whole_prompts():
    """Resampling prompts (7 here, every vote of a prompt together) keeps the point estimates and gives intervals
    around them that differ from the vote bootstrap's."""
    votes = simulate(200, 2, "best", seed=4)
    by_vote = leaderboard(votes, n_boot=60)
    by_prompt = leaderboard(votes, n_boot=60, resample="prompt")
    assert [s.rating for s in by_prompt.standings] == [s.rating for s in by_vote.standings]
    assert all(s.low <= s.rating <= s.high for s in by_prompt.standings)
    assert [(s.low, s.high) for s in by_prompt.standings] != [(s.low, s.high) for s in by_vote.standings]
    assert "resamples of prompts" in by_prompt.summary()
