"""The app's Leaderboard tab: checkpoint ratings from the arena votes (:mod:`apps.leaderboard`), for all users or
one, and the users overview (votes per kind, last activity, what each user's folder holds).

:func:`leaderboard_tab` builds the tab and wires its own events; ``apps/app.py`` only calls it inside its
``gr.Tabs()``. The ratings are read from the store on Refresh and whenever the tab is opened.
"""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from apps.leaderboard import COLUMNS, USER_COLUMNS, Leaderboard, store_leaderboard, user_overview, user_rows
from apps.store import VoteStore

ALL_USERS = "all users"
#: bootstrap resamples behind the tab's 95% intervals
N_BOOT = 200


_cache: dict[tuple[Any, ...], Leaderboard] = {}
_cache_lock = threading.Lock()


def refresh(store: VoteStore, who: str | None, sort: str, ties: str) -> tuple[Any, str, list[list[Any]], Any]:
    """(user choices, summary, standings rows, users rows) for the chosen view. A view is refitted only when the
    store's vote or undo count changed since it was last shown (the bootstrap takes seconds on a few thousand
    votes)."""
    users = user_overview(store)
    user = None if not who or who == ALL_USERS else who
    counts = store.counts()
    key = (str(store.path), user, sort, ties, counts["votes"], counts["undos"])
    with _cache_lock:
        board = _cache.get(key)
    if board is None:
        board = store_leaderboard(store, user=user, sort=sort, ties=ties, n_boot=N_BOOT)
        with _cache_lock:
            if len(_cache) > 64:
                _cache.clear()
            _cache[key] = board
    choices = [ALL_USERS, *(u.user for u in users if u.pairwise + u.kwise + u.curate + u.undone)]
    summary = board.summary() if board.standings else board.summary() + ". No votes on checkpoints yet."
    return gr.update(choices=choices, value=who or ALL_USERS), summary, board.rows(), user_rows(users)


def leaderboard_tab(store: VoteStore) -> None:
    """Build the Leaderboard tab (call inside ``gr.Tabs()`` of a ``gr.Blocks``)."""
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        with gr.Row():
            who = gr.Dropdown(
                [ALL_USERS],
                value=ALL_USERS,
                label="votes of",
                allow_custom_value=True,  # a user who voted since the last refresh can be typed
                elem_id="leaderboard-user",
            )
            sort = gr.Radio(
                [("Plackett-Luce / Bradley-Terry rating", "rating"), ("OpenSkill mu - 3 sigma", "openskill")],
                value="rating",
                label="sort by",
            )
            ties = gr.Radio(
                [("half a win each way", "half"), ("left out", "drop")], value="half", label="ties"
            )
            button = gr.Button("Refresh", variant="primary", elem_id="leaderboard-refresh")
        summary = gr.Markdown(elem_id="leaderboard-summary")
        table = gr.Dataframe(
            headers=list(COLUMNS), label="checkpoints", interactive=False, elem_id="leaderboard-table"
        )
        gr.Markdown(
            "Rating: arena scale (400 points = 10x the odds, 1000 = the mean checkpoint) from a Plackett-Luce fit "
            "of every vote across checkpoints (a pair is Bradley-Terry; a full ranking counts as a whole). "
            "rank: 1 + checkpoints whose 95% interval lies wholly above. first: votes its image won. "
            "Both-bad votes and skips are counted, not rated; undone votes are left out."
        )
        with gr.Accordion("Users (admin)", open=False):
            users = gr.Dataframe(
                headers=list(USER_COLUMNS), label="users", interactive=False, elem_id="leaderboard-users"
            )

    def on_refresh(name: str | None, order: str, tie_rule: str) -> tuple[Any, str, list[list[Any]], Any]:
        try:
            return refresh(store, name, order, tie_rule)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    outputs = [who, summary, table, users]
    button.click(on_refresh, [who, sort, ties], outputs, api_name="leaderboard")
    tab.select(on_refresh, [who, sort, ties], outputs, api_visibility="private")
