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
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

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
    """``w . standardise(features)``: population scores, optionally plus the top principal components of an image
    embedding (e.g. CLIP's); fitted with :meth:`fit`; saved as a small JSON file.

    The embedding components start at weight 0 (the prior is the population ensemble), so they only matter where the
    person's choices show a taste that the population scorers do not see; ``embed_dims`` (a handful) keeps the number of
    free weights in proportion to 4-20 choices.
    """

    description = (
        "personal Bradley-Terry reward over standardised population scores; logit units (diff = log-odds)"
    )

    # buffers (registered in __init__; declared so that they type as tensors, not Module.__getattr__'s union)
    weights: torch.Tensor  # [S + k]
    mean: torch.Tensor  # [S + k]
    std: torch.Tensor  # [S + k]
    basis: torch.Tensor  # [k, D], only with an embedder
    center: torch.Tensor  # [D], only with an embedder

    def __init__(
        self,
        members: Mapping[str, Scorer],
        weights: torch.Tensor | Sequence[float],
        mean: torch.Tensor | Sequence[float],
        std: torch.Tensor | Sequence[float],
        *,
        embedder: torch.nn.Module | None = None,
        basis: torch.Tensor | Sequence[Sequence[float]] | None = None,
        center: torch.Tensor | Sequence[float] | None = None,
        specs: Sequence[Mapping[str, Any]] | None = None,
        embedder_spec: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("personal scorer needs at least one feature scorer (members)")
        if (embedder is None) != (basis is None) or (basis is None) != (center is None):
            raise ValueError("personal scorer: embedder, basis and center go together (all or none)")
        # a ModuleList (not ModuleDict): member names such as "hpsv2.1" contain dots
        self.member_names = [str(k) for k in members]
        self.member_modules = torch.nn.ModuleList(members.values())
        self.embedder = embedder
        k = 0
        if basis is not None and center is not None:
            self.register_buffer("basis", torch.as_tensor(basis, dtype=torch.float32))  # [k, D]
            self.register_buffer("center", torch.as_tensor(center, dtype=torch.float32))  # [D]
            k = self.basis.shape[0]
        n = len(self.member_names) + k
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32).reshape(n))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(n))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(n))
        self.specs = [dict(x) for x in specs] if specs is not None else None
        self.embedder_spec = dict(embedder_spec) if embedder_spec is not None else None
        self.info = dict(info or {})
        self.needs_prompt = any(m.needs_prompt for m in self.members.values())

    @property
    def members(self) -> dict[str, Scorer]:
        # a ModuleList yields plain Modules; __init__ filled it from a Mapping[str, Scorer]
        return dict(zip(self.member_names, cast("list[Scorer]", list(self.member_modules))))

    @property
    def feature_names(self) -> list[str]:
        k = self.basis.shape[0] if self.embedder is not None else 0
        return self.member_names + [f"embedding/pc{i}" for i in range(k)]

    # -- features -----------------------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw features ``[B, S + k]``: member scores, then embedding coordinates on the fitted principal axes."""
        cols = [m(images, prompts).float().cpu()[:, None] for m in self.members.values()]
        if self.embedder is not None:
            emb = _embed(self.embedder, images)
            cols.append((emb - self.center.cpu()) @ self.basis.cpu().T)
        return torch.cat(cols, dim=1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        phi = (self.features(images, prompts) - self.mean.cpu()) / self.std.cpu()
        return (phi @ self.weights.cpu()).to(images.device)

    # -- fitting ------------------------------------------------------------------------------------------------------
    @staticmethod
    def prior(names: Sequence[str], anchor: str | None = None, extra: int = 0) -> torch.Tensor:
        """Equal weights ``1/S`` over the members (or 1 on ``anchor``), 0 on ``extra`` embedding features."""
        if anchor is None:
            w = [1.0 / len(names)] * len(names)
        elif anchor not in names:
            raise ValueError(f"anchor={anchor!r} is not a member; members are {list(names)}")
        else:
            w = [1.0 if n == anchor else 0.0 for n in names]
        return torch.tensor(w + [0.0] * extra)

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
        **embedding: Any,
    ) -> PersonalScorer:
        """Fit from precomputed ``features[M, S (+ k)]`` and choices ``(chosen, rejected)`` or
        ``(chosen, [rejected, ...])`` given as row indices into ``features``. ``embedding``: ``embedder``, ``basis``,
        ``center``, ``embedder_spec`` when the last k columns are embedding coordinates."""
        pairs = expand_choices(choices, features.shape[0])
        mean, std = standardise(features)
        phi = (features - mean) / std
        diff = phi[[a for a, _ in pairs]] - phi[[b for _, b in pairs]]
        prior = cls.prior(list(members), anchor, extra=features.shape[1] - len(members))
        w = fit_bradley_terry(diff, prior, l2)
        info: dict[str, Any] = {"n_choices": len(choices), "n_pairs": len(pairs), "l2": l2, "anchor": anchor}
        if len(pairs) >= 2:
            info["loo_accuracy"] = loo_accuracy(diff, prior, l2)
        return cls(members, w, mean, std, specs=specs, info=info, **embedding)

    @classmethod
    def fit(
        cls,
        members: Mapping[str, Scorer],
        images: torch.Tensor,
        prompts: Sequence[str],
        choices: Sequence[tuple[int, int]] | Sequence[tuple[int, Sequence[int]]],
        *,
        embedder: torch.nn.Module | None = None,
        embed_dims: int = 4,
        embedder_spec: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> PersonalScorer:
        """Score ``images[M]`` with every member (and embed them with ``embedder``, keeping the top ``embed_dims``
        principal components of these images), then :meth:`fit_features`; choices index into ``images``."""
        with torch.no_grad():
            cols = [m(images, prompts).float().cpu()[:, None] for m in members.values()]
            embedding: dict[str, Any] = {}
            if embedder is not None:
                emb = _embed(embedder, images)
                center = emb.mean(0)
                k = max(1, min(int(embed_dims), emb.shape[0] - 1, emb.shape[1]))
                basis = torch.linalg.svd(emb - center, full_matrices=False).Vh[:k]  # principal axes [k, D]
                cols.append((emb - center) @ basis.T)
                embedding = {
                    "embedder": embedder,
                    "basis": basis,
                    "center": center,
                    "embedder_spec": embedder_spec,
                }
        return cls.fit_features(members, torch.cat(cols, dim=1), choices, **embedding, **kwargs)

    def loo_accuracy(self) -> float | None:
        return self.info.get("loo_accuracy")

    # -- persistence --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a JSON file (a few floats; no pickle). Needs ``specs`` (and ``embedder_spec``) to rebuild scorers."""
        if self.specs is None or (self.embedder is not None and self.embedder_spec is None):
            raise ValueError(
                "this personal scorer was built from injected scorers; pass specs=[{'name': ..., **options}, ...] "
                "(and embedder_spec={'name': ..., **options} with an embedder) when fitting so that it can be saved"
            )
        path = Path(path)
        data: dict[str, Any] = {
            "format": FORMAT,
            "members": self.specs,
            "weights": self.weights.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "info": self.info,
        }
        if self.embedder is not None:
            data["embedder"] = self.embedder_spec
            data["basis"] = self.basis.tolist()
            data["center"] = self.center.tolist()
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, path: str | None = None) -> PersonalScorer:
        """Load a file written by :meth:`save`; its scorers are rebuilt with ``rewards.build_scorer``."""
        if path is None or not Path(path).is_file():
            where = "no path was given" if path is None else f"{path} does not exist"
            raise ValueError(
                f"personal scorer file not found ({where}): fit one and pass path=/path/to/personal.json"
            )
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}; refit and save again")
        members = {key: scorer for key, scorer in map(_build_spec, data["members"])}
        embedding: dict[str, Any] = {}
        if data.get("embedder") is not None:
            embedding = {
                "embedder": _build_spec(data["embedder"])[1],
                "basis": data["basis"],
                "center": data["center"],
                "embedder_spec": data["embedder"],
            }
        return cls(
            members,
            data["weights"],
            data["mean"],
            data["std"],
            specs=data["members"],
            info=data["info"],
            **embedding,
        )


def _build_spec(spec: Mapping[str, Any]) -> tuple[str, Scorer]:
    from rewards import build_scorer

    opts = dict(spec)
    name = str(opts.pop("name"))
    key = str(opts.pop("as", name))
    return key, build_scorer(name, **opts)


def _embed(embedder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    encode = getattr(embedder, "encode_images", None)
    if encode is None:
        raise ValueError(
            f"embedder {type(embedder).__name__} has no encode_images(); use a CLIP-family scorer"
        )
    with torch.no_grad():
        return encode(images).float().cpu()


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


# -- evaluation and active selection (pure functions of the BT fit) ---------------------------------------------------
def leave_one_group_out(
    diff: torch.Tensor, groups: Sequence[int], prior: torch.Tensor, l2: float = 1.0
) -> torch.Tensor:
    """Held-out margins ``[N]``: for each group (e.g. the K - 1 pairs of one best-of-K vote), refit without all of its
    pairs and predict them, so that pairs of one judgment never vouch for each other."""
    labels = torch.as_tensor(list(groups))
    if labels.shape[0] != diff.shape[0]:
        raise ValueError(f"groups: {labels.shape[0]} labels for {diff.shape[0]} pairs")
    unique = labels.unique()
    if unique.numel() < 2:
        raise ValueError(f"leave-one-group-out needs at least 2 groups (votes), got {unique.numel()}")
    margins = torch.zeros(diff.shape[0])
    for g in unique:
        out = labels == g
        w = fit_bradley_terry(diff[~out], prior, l2)
        margins[out] = diff[out].float() @ w
    return margins


def laplace_covariance(diff: torch.Tensor, w: torch.Tensor, l2: float = 1.0) -> torch.Tensor:
    """Laplace posterior covariance ``[S, S]`` of the weights at the MAP ``w``: the inverse of the objective's Hessian
    ``diff.T diag(sigmoid(m) sigmoid(-m)) diff + l2 I`` (``m = diff @ w``; :func:`fit_bradley_terry`'s objective).
    With no choices (``diff`` of 0 rows) it is the prior's ``I / l2``."""
    d, wd = diff.double(), w.double()
    m = d @ wd
    hess = d.T @ (d * (torch.sigmoid(m) * torch.sigmoid(-m))[:, None]) + l2 * torch.eye(
        wd.shape[0], dtype=torch.float64
    )
    return torch.linalg.inv(hess)


def pair_information(
    dphi: torch.Tensor, w: torch.Tensor, cov: torch.Tensor, nodes: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictive ``P(a > b)`` and expected information (bits) of the answer for candidate pairs
    ``dphi[P, S] = phi(a) - phi(b)`` under the Laplace posterior ``w ~ N(w, cov)``.

    The margin of a pair is Gaussian, ``m ~ N(mu = dphi . w, v = dphi' cov dphi)``; with ``p(m) = sigmoid(m)`` and
    ``H`` the binary entropy, the information is BALD (Houlsby et al. 2011, "Bayesian active learning for
    classification and preference learning", Eq. 2): ``I = H(E[p(m)]) - E[H(p(m))]``, the expectations taken by
    Gauss-Hermite quadrature with ``nodes`` points (deterministic). Unlike ``|P - 0.5|`` it is ~0 for two near
    identical images (``mu ~ 0`` but also ``v ~ 0``: the answer is a coin flip that teaches nothing).
    """
    import numpy as np

    x, wq = np.polynomial.hermite.hermgauss(nodes)
    x_t = torch.as_tensor(x, dtype=torch.float64)
    wq_t = torch.as_tensor(wq, dtype=torch.float64) / math.sqrt(math.pi)
    d = dphi.double()
    mu = d @ w.double()  # [P]
    var = ((d @ cov.double()) * d).sum(1).clamp_min(0)  # [P]
    m = mu[:, None] + torch.sqrt(2 * var)[:, None] * x_t[None, :]  # [P, nodes]
    p = torch.sigmoid(m)
    p_mean = (p * wq_t).sum(1)
    info = _entropy_bits(p_mean) - (_entropy_bits(p) * wq_t).sum(1)
    return p_mean.float(), info.clamp_min(0).float()


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    q = p.clamp(1e-12, 1 - 1e-12)
    return -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
