"""Checkpoint leaderboard from the arena votes in the store, and the per-user (admin) overview.

Two ratings, both from maintained libraries (no rating arithmetic is written here):

* **Plackett-Luce / Bradley-Terry** maximum likelihood via ``choix.ilsr_top1`` (I-LSR, Maystre & Grossglauser 2015,
  "Fast and Accurate Inference of Plackett-Luce Models", NeurIPS) with a small regularisation ``alpha`` (choix
  initialises every transition rate of the LSR Markov chain with ``alpha``: a pseudo-comparison between every two
  checkpoints, which keeps a checkpoint that never won finite). Every vote becomes the *choice events* of the PL
  likelihood, ``P(ranking) = prod_i w_{r_i} / sum_{j >= i} w_{r_j}``: a pair is one event (Bradley-Terry), a best-of-K
  vote one event (the best out of all K), a full K-ranking its K - 1 successive events, the whole ranking, not just
  its winner (this is exactly how ``choix.lsr_rankings`` decomposes a ranking; a test checks the two agree). Images
  of the same checkpoint in one round (other seeds) stay in the event as separate items sharing one strength, so a
  best-of-4 over [A, A, B, B] won by A has likelihood ``w_A / (2 w_A + 2 w_B)``; an event among images of one
  checkpoint only carries no information and is left out.
  Ratings are shown on the arena (Elo) scale of FastChat's ``compute_bt`` (``fastchat/serve/monitor/
  rating_systems.py``: base 10, scale 400, 1000 = the mean checkpoint): ``R = 1000 + 400 * theta / ln 10`` with
  ``theta`` choix's centred log-strength, so ``P(A beats B) = 1 / (1 + 10 ** ((R_B - R_A) / 400))``.
  95 % intervals are percentile bootstraps (``n_boot`` resamples of the rated votes, or of the prompts with all their
  votes, drawn with a fixed seed; FastChat's ``compute_bootstrap_bt`` resamples battles the same way); ``rank`` is
  FastChat's upper-bound rank: 1 + the number of checkpoints whose lower bound lies above this one's upper bound.
* **OpenSkill** (``openskill.models.PlackettLuce``, Weng & Lin 2011, "A Bayesian Approximation Method for Online
  Ranking", JMLR), the maintained TrueSkill-like online rating: each vote is one match with the whole ranking at
  once (as K-Sort Arena feeds ``trueskill.rate(groups, ranks)``), processed in the order the votes were cast. A
  checkpoint plays once per match, at the best place its images took. Shown as ``mu``, ``sigma`` and the
  conservative ``mu - 3 sigma`` (``rating.ordinal()``), the usual TrueSkill leaderboard order.

How each outcome counts (undone votes are never read; the store hands out active votes only):

=========  ===============================================  ==================================================
outcome    Plackett-Luce / Bradley-Terry                    OpenSkill match
=========  ===============================================  ==================================================
best       1 event: best over the other K - 1 images         best checkpoint rank 1, the others tied at rank 2
rank       K - 1 events (the whole ranking)                  ranks = places in the ranking
tie        ``ties="half"``: each pair of tied checkpoints    ``ties="half"``: all checkpoints tied at rank 1
           wins half a comparison each way (FastChat's BT    ``ties="drop"``: no match
           convention); ``ties="drop"``: nothing
both_bad   nothing (no preference between the images); counted per checkpoint
skip       nothing; counted per checkpoint
=========  ===============================================  ==================================================

Half-wins use the data-replication form of choix's input (decisive events twice, each half of a tie once, and
``alpha`` doubled, which leaves the estimator of tie-free data unchanged). Votes on rounds that show one checkpoint
only ("seeds of one checkpoint") and curated images (no checkpoint) are counted but carry no rating information.
A checkpoint name that was voted on under two different fingerprints (a retrained run under the same name) is
split into ``name@hash`` entries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apps.store import Vote, VoteStore

Ties = Literal["half", "drop"]
Resample = Literal["vote", "prompt"]
SortKey = Literal["rating", "openskill"]
TIES: tuple[str, ...] = ("half", "drop")
RESAMPLE: tuple[str, ...] = ("vote", "prompt")
SORT_KEYS: tuple[str, ...] = ("rating", "openskill")

#: FastChat's arena scale: 400 points = a factor 10 in odds; 1000 = the mean checkpoint.
ELO_SCALE = 400.0 / math.log(10.0)
ELO_BASE = 1000.0


@dataclass(frozen=True)
class Choice:
    """One Plackett-Luce choice event: ``winner`` preferred to every one of ``losers`` (checkpoint keys, repeated
    when a round showed several images of one checkpoint); ``half`` = half a tie (weight 1/2)."""

    winner: str
    losers: tuple[str, ...]
    half: bool = False


@dataclass(frozen=True)
class Standing:
    checkpoint: str
    rating: float  # arena (Elo) scale; nan when the checkpoint has no rated vote
    low: float
    high: float
    rank: int | None  # FastChat's upper-bound rank; None when unrated
    mu: float  # OpenSkill; nan when unrated
    sigma: float
    ordinal: float  # mu - 3 sigma
    votes: int  # active votes on rounds that showed it
    rated: int  # votes that entered its rating
    first: int  # votes where its image was chosen best / ranked first (rounds across checkpoints)
    ties: int
    both_bad: int
    skips: int


@dataclass
class Leaderboard:
    standings: list[Standing]
    user: str | None  # None = all users
    votes: int  # active votes read
    rated: int  # votes that entered the ratings
    not_rated: dict[str, int] = field(default_factory=dict)  # reason -> votes
    ties: str = "half"
    alpha: float = 0.01
    n_boot: int = 0
    resample: str = "vote"
    sort: str = "rating"

    def rows(self) -> list[list[Any]]:
        """The table the app and the CLI show (:data:`COLUMNS`), numbers rounded, missing values as None."""
        return [
            [
                s.rank,
                s.checkpoint,
                _round(s.rating, 1),
                _round(s.low, 1),
                _round(s.high, 1),
                _round(s.mu, 2),
                _round(s.sigma, 2),
                _round(s.ordinal, 2),
                s.votes,
                s.rated,
                s.first,
                s.ties,
                s.both_bad,
                s.skips,
            ]
            for s in self.standings
        ]

    def summary(self) -> str:
        who = "all users" if self.user is None else f"user {self.user!r}"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.not_rated.items()))
        return (
            f"{who}: {self.votes} active votes, {self.rated} rated"
            + (f" (not rated: {reasons})" if reasons else "")
            + f"; Plackett-Luce (choix I-LSR, alpha {self.alpha:g}) "
            + (
                f"with 95% intervals from {self.n_boot} bootstrap resamples of {self.resample}s"
                if self.n_boot
                else "without intervals"
            )
            + f"; ties {'half a win each way' if self.ties == 'half' else 'left out'}; "
            f"sorted by {'rating' if self.sort == 'rating' else 'OpenSkill mu - 3 sigma'}"
        )

    def format(self) -> str:
        if not self.standings:
            return self.summary() + "\nno checkpoint votes yet"
        widths = [max(len(str(c)), *(len(_cell(r[i])) for r in self.rows())) for i, c in enumerate(COLUMNS)]
        line = lambda cells: "  ".join(_cell(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([self.summary(), line(COLUMNS), *(line(r) for r in self.rows())])


COLUMNS: tuple[str, ...] = (
    "rank",
    "checkpoint",
    "rating",
    "95% low",
    "95% high",
    "OpenSkill mu",
    "sigma",
    "mu-3sigma",
    "votes",
    "rated",
    "first",
    "ties",
    "both bad",
    "skips",
)


# --------------------------------------------------------------------------------------------- votes -> events
def checkpoint_keys(votes: Sequence[Vote]) -> dict[tuple[str, str], str]:
    """(checkpoint name, fingerprint) -> the key the leaderboard shows: the name, or ``name@hash8`` when one name
    was voted on under several fingerprints."""
    hashes: dict[str, set[str]] = {}
    for v in votes:
        for item in v.round.items:
            name = item.params.get("checkpoint")
            if name:
                hashes.setdefault(str(name), set()).add(str(item.params.get("checkpoint_hash", "")))
    return {(name, h): name if len(hs) == 1 else f"{name}@{h[:8]}" for name, hs in hashes.items() for h in hs}


def _slot_keys(vote: Vote, keys: dict[tuple[str, str], str]) -> list[str | None]:
    out: list[str | None] = []
    for item in vote.round.items:
        name = item.params.get("checkpoint")
        out.append(keys[(str(name), str(item.params.get("checkpoint_hash", "")))] if name else None)
    return out


def vote_choices(vote: Vote, slot_keys: Sequence[str | None], *, ties: str = "half") -> list[Choice]:
    """The Plackett-Luce choice events of one vote (module docstring table), in checkpoint keys."""
    if any(k is None for k in slot_keys):
        return []  # curated images: no checkpoint
    keys = [str(k) for k in slot_keys]
    events: list[Choice] = []
    if vote.outcome == "best":
        best = vote.ranking[0]
        events = [Choice(keys[best], tuple(keys[s] for s in range(len(keys)) if s != best))]
    elif vote.outcome == "rank":
        r = vote.ranking
        events = [Choice(keys[r[i]], tuple(keys[s] for s in r[i + 1 :])) for i in range(len(r) - 1)]
    elif vote.outcome == "tie" and ties == "half":
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                if keys[a] != keys[b]:
                    events += [Choice(keys[a], (keys[b],), True), Choice(keys[b], (keys[a],), True)]
    # an event among images of one checkpoint has a constant likelihood (1 / number of images): no information
    return [e for e in events if any(loser != e.winner for loser in e.losers)]


def vote_match(vote: Vote, slot_keys: Sequence[str | None], *, ties: str = "half") -> list[tuple[str, int]]:
    """The OpenSkill match of one vote: (checkpoint, rank) with rank 1 = best and equal ranks tied; a checkpoint
    appears once, at its best place. Empty when the vote rates no two checkpoints."""
    if any(k is None for k in slot_keys):
        return []
    keys = [str(k) for k in slot_keys]
    place: dict[str, int] = {}
    if vote.outcome == "best":
        place[keys[vote.ranking[0]]] = 1
        for k in keys:
            place.setdefault(k, 2)
    elif vote.outcome == "rank":
        for i, s in enumerate(vote.ranking):
            place.setdefault(keys[s], i + 1)
    elif vote.outcome == "tie" and ties == "half":
        place = dict.fromkeys(keys, 1)
    if len(place) < 2:
        return []
    return sorted(place.items(), key=lambda kv: kv[1])


# ------------------------------------------------------------------------------------------------------ fits
def fit_plackett_luce(
    choices: Sequence[Choice],
    names: Sequence[str],
    *,
    alpha: float = 0.01,
    initial: np.ndarray | None = None,
    tol: float = 1e-8,
) -> np.ndarray:
    """Centred log-strengths ``theta`` (one per name) maximising the regularised PL likelihood of ``choices``
    (``choix.ilsr_top1``)."""
    import choix

    index = {n: i for i, n in enumerate(names)}
    reps = 2 if any(c.half for c in choices) else 1  # half-wins: decisive events twice, halves of ties once
    data: list[tuple[int, tuple[int, ...]]] = []
    for c in choices:
        event = (index[c.winner], tuple(index[x] for x in c.losers))
        data.extend([event] * (1 if c.half else reps))
    try:
        theta = choix.ilsr_top1(len(names), data, alpha=alpha * reps, initial_params=initial, tol=tol)
    except RuntimeError as exc:  # I-LSR did not converge (alpha = 0 on a disconnected comparison graph)
        raise ValueError(
            f"the Plackett-Luce fit did not converge ({exc}); use a larger alpha (> 0)"
        ) from None
    return np.asarray(theta, dtype=float)


def to_elo(theta: np.ndarray) -> np.ndarray:
    return ELO_BASE + ELO_SCALE * (theta - theta.mean())


def openskill_ratings(matches: Sequence[Sequence[tuple[str, int]]]) -> dict[str, tuple[float, float, float]]:
    """checkpoint -> (mu, sigma, mu - 3 sigma) after feeding the matches in order to OpenSkill's Plackett-Luce
    model (library defaults: mu 25, sigma 25/3)."""
    from openskill.models import PlackettLuce

    model = PlackettLuce()
    ratings: dict[str, Any] = {}
    for match in matches:
        teams = [[ratings[name] if name in ratings else model.rating(name=name)] for name, _ in match]
        new = model.rate(teams, ranks=[float(rank) for _, rank in match])
        for (name, _), (rating,) in zip(match, new):
            ratings[name] = rating
    return {n: (float(r.mu), float(r.sigma), float(r.ordinal())) for n, r in ratings.items()}


# ------------------------------------------------------------------------------------------------- leaderboard
def leaderboard(
    votes: Sequence[Vote],
    *,
    user: str | None = None,
    ties: str = "half",
    alpha: float = 0.01,
    n_boot: int = 200,
    resample: str = "vote",
    seed: int = 0,
    sort: str = "rating",
) -> Leaderboard:
    """Rate the checkpoints of ``votes`` (already filtered to ``user`` when given; ``user`` only labels the
    result). See the module docstring for the models and for how each outcome counts."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}: use one of {', '.join(TIES)}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}: use one of {', '.join(RESAMPLE)}")
    if sort not in SORT_KEYS:
        raise ValueError(f"sort={sort!r}: use one of {', '.join(SORT_KEYS)}")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha}: the regularisation must be > 0 (e.g. 0.01)")
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot}: use 0 (no intervals) or more resamples, e.g. 200")

    keys = checkpoint_keys(votes)
    counts: dict[str, dict[str, int]] = {}
    rated_votes: list[tuple[Vote, list[Choice]]] = []
    matches: list[list[tuple[str, int]]] = []
    not_rated: dict[str, int] = {}
    for v in votes:
        slot_keys = _slot_keys(v, keys)
        shown = {k for k in slot_keys if k is not None}
        choices = vote_choices(v, slot_keys, ties=ties)
        match = vote_match(v, slot_keys, ties=ties)
        for k in shown:
            c = counts.setdefault(
                k, dict.fromkeys(("votes", "rated", "first", "ties", "both_bad", "skips"), 0)
            )
            c["votes"] += 1
            c["rated"] += int(any(k == e.winner or k in e.losers for e in choices))
            c["ties"] += int(v.outcome == "tie")
            c["both_bad"] += int(v.outcome == "both_bad")
            c["skips"] += int(v.outcome == "skip")
        if choices:
            rated_votes.append((v, choices))
            if v.outcome in ("best", "rank"):
                counts[str(slot_keys[v.ranking[0]])]["first"] += 1
        else:
            reason = (
                "curated images"
                if not shown
                else "one checkpoint"
                if len(shown) < 2
                else {"tie": "ties left out", "both_bad": "both bad", "skip": "skips"}.get(
                    v.outcome, v.outcome
                )
            )
            not_rated[reason] = not_rated.get(reason, 0) + 1
        if match:
            matches.append(match)

    names = sorted({k for _, cs in rated_votes for e in cs for k in (e.winner, *e.losers)})
    rating = {n: math.nan for n in counts}
    low, high = dict(rating), dict(rating)
    if len(names) >= 2:
        all_choices = [e for _, cs in rated_votes for e in cs]
        theta = fit_plackett_luce(all_choices, names, alpha=alpha)
        rating.update(zip(names, to_elo(theta).tolist()))
        if n_boot > 0:
            boots = _bootstrap(
                rated_votes, names, theta, alpha=alpha, n_boot=n_boot, resample=resample, seed=seed
            )
            lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
            low.update(zip(names, lo.tolist()))
            high.update(zip(names, hi.tolist()))
    skill = openskill_ratings(matches) if matches else {}

    standings = []
    for name, c in counts.items():
        mu, sigma, ordinal = skill.get(name, (math.nan, math.nan, math.nan))
        standings.append(Standing(name, rating[name], low[name], high[name], None, mu, sigma, ordinal, **c))
    standings = _ranked(standings)
    key = (lambda s: s.rating) if sort == "rating" else (lambda s: s.ordinal)
    standings.sort(
        key=lambda s: (math.isnan(key(s)), -key(s) if not math.isnan(key(s)) else 0.0, s.checkpoint)
    )
    return Leaderboard(
        standings,
        user=user,
        votes=len(votes),
        rated=len(rated_votes),
        not_rated=not_rated,
        ties=ties,
        alpha=alpha,
        n_boot=n_boot if len(names) >= 2 else 0,
        resample=resample,
        sort=sort,
    )


def _bootstrap(
    rated_votes: Sequence[tuple[Vote, list[Choice]]],
    names: Sequence[str],
    theta: np.ndarray,
    *,
    alpha: float,
    n_boot: int,
    resample: str,
    seed: int,
) -> np.ndarray:
    """[n_boot, len(names)] arena-scale ratings refitted on resampled votes (or prompts with all their votes)."""
    groups: dict[Any, list[Choice]] = {}
    for v, choices in rated_votes:
        key = v.vote_id if resample == "vote" else v.round.prompt
        groups.setdefault(key, []).extend(choices)
    units = list(groups.values())
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(names)))
    for b in range(n_boot):
        picked = rng.integers(0, len(units), size=len(units))
        sample = [e for i in picked for e in units[i]]
        out[b] = to_elo(fit_plackett_luce(sample, names, alpha=alpha, initial=theta, tol=1e-6))
    return out


def _ranked(standings: list[Standing]) -> list[Standing]:
    """FastChat's upper-bound rank: 1 + the number of checkpoints whose interval lies wholly above this one's
    (without intervals: 1 + the number of higher ratings)."""
    import dataclasses

    rated = [s for s in standings if not math.isnan(s.rating)]
    with_intervals = all(not math.isnan(s.low) for s in rated)
    out = []
    for s in standings:
        if math.isnan(s.rating):
            out.append(s)
            continue
        above = sum(1 for o in rated if (o.low > s.high if with_intervals else o.rating > s.rating))
        out.append(dataclasses.replace(s, rank=1 + above))
    return out


def store_leaderboard(store: VoteStore, *, user: str | None = None, **kwargs: Any) -> Leaderboard:
    """:func:`leaderboard` over the store's active votes (of one user, or all)."""
    return leaderboard(store.votes(user_id=user), user=user, **kwargs)


# ----------------------------------------------------------------------------------------------------- users
@dataclass(frozen=True)
class UserRow:
    user: str
    pairwise: int  # active arena votes on rounds of 2 images
    kwise: int  # active arena votes on rounds of more than 2
    curate: int  # active votes on curated images
    undone: int
    last_activity: float | None  # unix time of the user's last vote (undone ones included)
    folder: list[str]  # entries of <store dir>/users/<user>/ ("name/ (N)" for folders), empty when absent


USER_COLUMNS: tuple[str, ...] = (
    "user",
    "pairwise",
    "K-wise",
    "curate",
    "undone",
    "last activity (UTC)",
    "files",
)


def users_root(store: VoteStore) -> Path:
    """Where each user's own scorer and LoRA live: ``<store dir>/users/<user>/``."""
    return store.path.parent / "users"


def user_overview(store: VoteStore) -> list[UserRow]:
    """One row per user who voted or has a folder under :func:`users_root`, most recently active first."""
    everything = store.votes(include_undone=True)
    active = {v.vote_id for v in store.votes()}
    tallies: dict[str, dict[str, Any]] = {}
    for v in everything:
        t = tallies.setdefault(v.user_id, {"pairwise": 0, "kwise": 0, "curate": 0, "undone": 0, "last": None})
        t["last"] = v.created_at if t["last"] is None else max(t["last"], v.created_at)
        if v.vote_id not in active:
            t["undone"] += 1
        elif v.round.source == "curate":
            t["curate"] += 1
        else:
            t["pairwise" if v.round.k == 2 else "kwise"] += 1
    root = users_root(store)
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
    rows = []
    for name in sorted(set(tallies) | set(folders)):
        t = tallies.get(name, {"pairwise": 0, "kwise": 0, "curate": 0, "undone": 0, "last": None})
        entries = [_entry(p) for p in sorted(folders[name].iterdir())] if name in folders else []
        rows.append(UserRow(name, t["pairwise"], t["kwise"], t["curate"], t["undone"], t["last"], entries))
    rows.sort(key=lambda r: (r.last_activity is None, -(r.last_activity or 0.0), r.user))
    return rows


def user_rows(rows: Sequence[UserRow]) -> list[list[Any]]:
    return [
        [
            r.user,
            r.pairwise,
            r.kwise,
            r.curate,
            r.undone,
            _utc(r.last_activity),
            ", ".join(r.folder) if r.folder else "",
        ]
        for r in rows
    ]


def format_users(rows: Sequence[UserRow]) -> str:
    if not rows:
        return "no users yet"
    table = user_rows(rows)
    widths = [max(len(c), *(len(_cell(r[i])) for r in table)) for i, c in enumerate(USER_COLUMNS)]
    line = lambda cells: "  ".join(_cell(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(USER_COLUMNS), *(line(r) for r in table)])


# ----------------------------------------------------------------------------------------------------- helpers
def _entry(path: Path) -> str:
    """``name`` for a file, ``name/ (N)`` for a folder of N entries (e.g. the user's jobs)."""
    return f"{path.name}/ ({sum(1 for _ in path.iterdir())})" if path.is_dir() else path.name


def _round(x: float, digits: int) -> float | None:
    return None if math.isnan(x) else round(x, digits)


def _cell(x: Any) -> str:
    return "-" if x is None or x == "" else str(x)


def _utc(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
