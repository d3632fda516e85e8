"""A personal scorer: a Bradley-Terry model fitted from one person's few choices, over features that population
scorers compute.

Model (Bradley & Terry 1952; the same pairwise likelihood that trains HPS, PickScore and ImageReward)::

    phi(x)      = (f(x) - mu) / sigma                    # f: the S population scores of image x; standardised
    r(x)        = w . phi(x)                             # personal reward
    P(a > b)    = sigmoid(r(a) - r(b))
    w_hat       = argmin_w  sum_n softplus(-w . (phi(a_n) - phi(b_n)))  +  (l2 / 2) ||w - w0||^2

``w0`` anchors the fit to the population: equal weights ``1/S`` (the z-score ensemble) by default, or all weight on one
``anchor`` scorer. With no choices the personal scorer *is* the population ensemble; each choice moves it toward the
person's taste, and ``l2`` (default 1.0) keeps 4-20 choices from overfitting (the objective is strictly convex, so the
Newton solve is exact and deterministic). A best-of-K choice counts as K - 1 pairwise wins of the chosen image.

Symbols: ``a_n``/``b_n`` chosen/rejected image of choice n; ``S`` features; ``mu``/``sigma`` feature statistics over the
images of the fit (stored with the weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rewards.base import SCORERS, Scorer

FORMAT = "workbench-personal-bt/1"


def fit_bradley_terry(
    diff: torch.Tensor, prior: torch.Tensor, l2: float = 1.0, iters: int = 50, tol: float = 1e-10
) -> torch.Tensor:
    """MAP Bradley-Terry weights from feature differences ``diff[N, S] = phi(winner) - phi(loser)``.

    Damped Newton on ``sum softplus(-diff @ w) + l2/2 ||w - prior||^2`` (gradient ``-diff.T sigmoid(-m) + l2 (w -
    prior)``, Hessian ``diff.T diag(sigmoid(m) sigmoid(-m)) diff + l2 I`` with margins ``m = diff @ w``), in float64.
    """
    if l2 <= 0:
        raise ValueError(
            f"l2={l2} must be > 0 (it is what makes a handful of choices give a sensible scorer)"
        )
    d = diff.double()
    w0 = prior.double()
    w = w0.clone()

    def objective(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-(d @ v)).sum() + 0.5 * l2 * ((v - w0) ** 2).sum()

    eye = torch.eye(w.shape[0], dtype=torch.float64)
    for _ in range(iters):
        m = d @ w
        grad = -(d * torch.sigmoid(-m)[:, None]).sum(0) + l2 * (w - w0)
        hess = d.T @ (d * (torch.sigmoid(m) * torch.sigmoid(-m))[:, None]) + l2 * eye
        step = torch.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(w)
        while objective(w - t * step) > f0 - 0.25 * t * (grad @ step) and t > 1e-6:
            t *= 0.5
        w = w - t * step
        if float(grad @ step) < tol:
            break
    return w.float()


def loo_accuracy(diff: torch.Tensor, prior: torch.Tensor, l2: float = 1.0) -> float:
    """Leave-one-out accuracy: refit without choice n, predict it (margin > 0 counts right, a tie 1/2)."""
    n = diff.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out accuracy needs at least 2 choices, got {n}")
    correct = 0.0
    for i in range(n):
        keep = torch.arange(n) != i
        w = fit_bradley_terry(diff[keep], prior, l2)
        margin = float(diff[i] @ w)
        correct += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    return correct / n


def standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over ``features[M, S]`` (std 1 where a feature is constant or M < 2)."""
    mean = features.mean(0)
    std = features.std(0) if features.shape[0] > 1 else torch.ones_like(mean)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@SCORERS.register("personal")
class PersonalScorer(Scorer):
    """``w . standardise(population scores)``, fitted with :meth:`fit`; saved as a small JSON file."""

    description = (
        "personal Bradley-Terry reward over standardised population scores; logit units (diff = log-odds)"
    )

    def __init__(
        self,
        members: Mapping[str, Scorer],
        weights: torch.Tensor | Sequence[float],
        mean: torch.Tensor | Sequence[float],
        std: torch.Tensor | Sequence[float],
        *,
        specs: Sequence[Mapping[str, Any]] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("personal scorer needs at least one feature scorer (members)")
        # a ModuleList (not ModuleDict): member names such as "hpsv2.1" contain dots
        self.member_names = [str(k) for k in members]
        self.member_modules = torch.nn.ModuleList(members.values())
        s = len(self.members)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32).reshape(s))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(s))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(s))
        self.specs = [dict(x) for x in specs] if specs is not None else None
        self.info = dict(info or {})
        self.needs_prompt = any(m.needs_prompt for m in self.members.values())

    # -- features -----------------------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw population scores ``[B, S]`` (columns in member order)."""
        return torch.stack([m(images, prompts).float().cpu() for m in self.members.values()], dim=1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        phi = (self.features(images, prompts) - self.mean.cpu()) / self.std.cpu()  # pyright: ignore[reportOperatorIssue]
        return (phi @ self.weights.cpu()).to(images.device)  # pyright: ignore[reportOperatorIssue]

    # -- fitting ------------------------------------------------------------------------------------------------------

    @property
    def members(self) -> dict[str, Scorer]:
        return dict(zip(self.member_names, self.member_modules))  # pyright: ignore[reportReturnType]

    @staticmethod
    def prior(names: Sequence[str], anchor: str | None = None) -> torch.Tensor:
        if anchor is None:
            return torch.full((len(names),), 1.0 / len(names))
        if anchor not in names:
            raise ValueError(f"anchor={anchor!r} is not a member; members are {list(names)}")
        return torch.tensor([1.0 if n == anchor else 0.0 for n in names])

    @classmethod
    def fit_features(
        cls,
        members: Mapping[str, Scorer],
        features: torch.Tensor,
        choices: Sequence[tuple[int, int]] | Sequence[tuple[int, Sequence[int]]],
        *,
        anchor: str | None = None,
        l2: float = 1.0,
        specs: Sequence[Mapping[str, Any]] | None = None,
    ) -> PersonalScorer:
        """Fit from precomputed ``features[M, S]`` and choices ``(chosen, rejected)`` or ``(chosen, [rejected...])``
        given as row indices into ``features``."""
        pairs = expand_choices(choices, features.shape[0])
        mean, std = standardise(features)
        phi = (features - mean) / std
        diff = phi[[a for a, _ in pairs]] - phi[[b for _, b in pairs]]
        names = list(members)
        prior = cls.prior(names, anchor)
        w = fit_bradley_terry(diff, prior, l2)
        info: dict[str, Any] = {"n_choices": len(choices), "n_pairs": len(pairs), "l2": l2, "anchor": anchor}
        if len(pairs) >= 2:
            info["loo_accuracy"] = loo_accuracy(diff, prior, l2)
        return cls(members, w, mean, std, specs=specs, info=info)

    @classmethod
    def fit(
        cls,
        members: Mapping[str, Scorer],
        images: torch.Tensor,
        prompts: Sequence[str],
        choices: Sequence[tuple[int, int]] | Sequence[tuple[int, Sequence[int]]],
        **kwargs: Any,
    ) -> PersonalScorer:
        """Score ``images[M]`` with every member, then :meth:`fit_features` (choices index into ``images``)."""
        with torch.no_grad():
            feats = torch.stack([m(images, prompts).float().cpu() for m in members.values()], dim=1)
        return cls.fit_features(members, feats, choices, **kwargs)

    def loo_accuracy(self) -> float | None:
        return self.info.get("loo_accuracy")

    # -- persistence --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a JSON file (weights are a few floats; no pickle). Needs ``specs`` to rebuild the members."""
        if self.specs is None:
            raise ValueError(
                "this personal scorer was built from injected scorers; pass specs=[{'name': ..., **options}, ...] "
                "when fitting so that it can be saved and rebuilt"
            )
        path = Path(path)
        data = {
            "format": FORMAT,
            "members": self.specs,
            "weights": self.weights.tolist(),  # pyright: ignore[reportCallIssue]
            "mean": self.mean.tolist(),  # pyright: ignore[reportCallIssue]
            "std": self.std.tolist(),  # pyright: ignore[reportCallIssue]
            "info": self.info,
        }
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | None = None) -> PersonalScorer:
        """Load a file written by :meth:`save`; its member scorers are rebuilt with ``rewards.build_scorer``."""
        from rewards import build_scorer

        if path is None or not Path(path).is_file():
            where = "no path was given" if path is None else f"{path} does not exist"
            raise ValueError(
                f"personal scorer file not found ({where}): fit one and pass path=/path/to/personal.json"
            )
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}; refit and save again")
        members: dict[str, Scorer] = {}
        for spec in data["members"]:
            opts = dict(spec)
            name = str(opts.pop("name"))
            key = str(opts.pop("as", name))
            members[key] = build_scorer(name, **opts)
        return cls(
            members, data["weights"], data["mean"], data["std"], specs=data["members"], info=data["info"]
        )


def expand_choices(
    choices: Sequence[tuple[int, int]] | Sequence[tuple[int, Sequence[int]]], n_items: int
) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` or ``(chosen, [rejected, ...])`` -> list of (winner, loser) index pairs."""
    pairs: list[tuple[int, int]] = []
    for i, (win, lose) in enumerate(choices):
        losers = [lose] if isinstance(lose, int) else list(lose)
        for loser in losers:
            if not (0 <= win < n_items and 0 <= loser < n_items) or win == loser:
                raise ValueError(
                    f"choice {i} = ({win}, {lose}) must index two different images among {n_items}"
                )
            pairs.append((int(win), int(loser)))
    if not pairs:
        raise ValueError("no choices given; record at least one (chosen, rejected) pair")
    return pairs
