"""Training-time noising: how a clean group ``x0`` becomes the ``x_t`` the models see, registered by name.

Each method is a :class:`NoisingMethod`: a pydantic config model (``noising:`` in the YAML, discriminated by
``name``) and a builder that binds the config and returns a function ``(x0, generator, context) -> Noised``. The
training loop calls it with the step's generator and never names a method; an objective's spec names its default
(``ObjectiveSpec.noising``), and ``noising:`` in the config overrides it.

Registered here: ``forward``, the closed-form ``q(x_t | x_0)`` of DDPM (Ho et al. 2020, Eq. 4). Inversion-based
methods (DDIM inversion for InPO, ReNoise for SmPO) register in :mod:`samplers.inversion` and use
``NoisingContext.denoiser`` (the policy, without gradient).

Symbols: ``x0`` clean latents, ``eps`` unit Gaussian noise, ``t`` integer timesteps, ``alphas_cumprod[t]`` =
``abar_t``; ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. Returned ``eps`` is the noise the target is derived
from (for inversion: re-derived from ``x_t``), so ``x_t`` and ``eps`` always satisfy that equation, with ``x0`` the
batch's clean latents or, where a method returns its own (``Noised.x0``: Self-NPO's teacher estimate in
:mod:`samplers.truncated`), that one; the target is derived from the same pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.registry import Registry


class Denoiser(Protocol):
    """``(x_t [G, K, C, h, w], t [G, K], groups) -> model output [G, K, C, h, w]``, no gradient: the model on G of
    the batch's B groups, ``groups`` (``[G]``, long) their positions in the batch so that each keeps its own prompt
    conditioning; ``groups=None``: all B, in order (an inversion runs only the groups whose grid is not done)."""

    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, groups: torch.Tensor | None = None, /
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Noised:
    """``x_t``, ``t`` (``[B, K]``) and ``eps`` of one batch, in the group layout ``[B, K, ...]``."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor | None = (
        None  # the clean latent eps is derived from, when not the batch's (Self-NPO: a teacher's)
    )


#: ``(x_t [B, K, C, h, w], t [B, K]) -> (prompt-conditioned, unconditional)`` reference outputs, no gradient.
GuidedDenoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BatchRows:
    """The groups ``[start, start + B)`` of a global batch of ``total`` groups that one process of a multi-process
    run holds. Every per-group random draw is made for the whole global batch and sliced to these rows
    (:func:`group_randn` and friends), so a group's noise and timestep depend on its place in the global batch, never
    on how the batch is split over processes: N processes draw what one process with the global batch draws."""

    start: int
    total: int


def _rows_of(
    draw: Callable[[tuple[int, ...]], torch.Tensor], shape: tuple[int, ...], rows: BatchRows | None
) -> torch.Tensor:
    """``draw(shape)``, or, for a process holding ``rows`` of a global batch, rows ``rows`` of ``draw`` over the
    global batch (dim 0 = groups). With ``rows`` None or covering the whole batch, exactly ``draw(shape)``."""
    if rows is None or (rows.start == 0 and rows.total == shape[0]):
        return draw(shape)
    if rows.start < 0 or rows.start + shape[0] > rows.total:
        raise ValueError(
            f"rows [{rows.start}, {rows.start + shape[0]}) lie outside a global batch of {rows.total}"
        )
    return draw((rows.total, *shape[1:]))[rows.start : rows.start + shape[0]]


def group_randn(
    shape: tuple[int, ...], generator: torch.Generator, rows: BatchRows | None = None
) -> torch.Tensor:
    """``torch.randn(shape)`` over groups (dim 0), drawn for the global batch when ``rows`` is given."""
    return _rows_of(lambda s: torch.randn(s, generator=generator), tuple(shape), rows)


def group_rand(
    shape: tuple[int, ...], generator: torch.Generator, rows: BatchRows | None = None
) -> torch.Tensor:
    """``torch.rand(shape)`` over groups (dim 0), drawn for the global batch when ``rows`` is given."""
    return _rows_of(lambda s: torch.rand(s, generator=generator), tuple(shape), rows)


def group_randint(
    low: int, high: int, shape: tuple[int, ...], generator: torch.Generator, rows: BatchRows | None = None
) -> torch.Tensor:
    """``torch.randint(low, high, shape)`` over groups (dim 0), drawn for the global batch when ``rows`` is given."""
    return _rows_of(lambda s: torch.randint(low, high, s, generator=generator), tuple(shape), rows)


@dataclass(frozen=True)
class NoisingContext:
    """What a noising method may use: the training scheduler (``alphas_cumprod``, ``add_noise``); for inversion, the
    policy as a denoiser conditioned on the batch's prompts; for teacher chains (Self-NPO), the reference model's
    conditional and unconditional outputs (``teacher``); in a multi-process run, the rows of the global batch this
    process holds (``rows``: draw through :func:`group_randn` and friends)."""

    scheduler: Any
    denoiser: Denoiser | None = None
    prediction_type: str = "epsilon"
    teacher: GuidedDenoiser | None = None
    rows: BatchRows | None = None


NoiseFn = Callable[[torch.Tensor, torch.Generator, NoisingContext], Noised]


@dataclass(frozen=True)
class NoisingMethod:
    config_cls: type[BaseModel]
    build: Callable[[Any], NoiseFn]
    summary: str = ""


NOISING: Registry[NoisingMethod] = Registry("noising")


class ForwardNoising(BaseModel):
    """q(x_t | x_0): one timestep per group and, by default, one noise draw shared by its K images (Diffusion-DPO:
    Salesforce train.py repeats the noise and timestep of the winner for the loser)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["forward"] = "forward"
    t_min: int = Field(0, ge=0)
    t_max: int = Field(1000, ge=1, description="Exclusive upper bound of t ~ U{t_min, t_max - 1}.")
    share_noise: bool = Field(True, description="Same epsilon for every image of a group (official DPO).")
    share_timestep: bool = Field(True, description="Same t for every image of a group (official DPO).")

    @model_validator(mode="after")
    def _range(self) -> ForwardNoising:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be < t_max ({self.t_max})")
        return self


def group_draws(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    t_min: int,
    t_max: int,
    share_noise: bool,
    share_t: bool,
    rows: BatchRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps ``[B, K]`` and noise ``[B, K, C, h, w]`` for groups of ``shape``; shared within a group on request.
    Draw order (t first, then eps) is fixed: exact resume depends on it. ``rows``: see :class:`BatchRows`."""
    b, k = shape[0], shape[1]
    t = group_randint(t_min, t_max, (b, 1 if share_t else k), generator, rows).expand(b, k)
    if share_noise:
        eps = group_randn((b, 1, *shape[2:]), generator, rows).expand(-1, k, *shape[2:])
    else:
        eps = group_randn(tuple(shape), generator, rows)
    return t.contiguous(), eps.contiguous()


def forward_noise(
    x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, Eq. 4), computed in fp32 for ``[B, K, ...]``
    tensors; ``t`` is ``[B, K]``. Identical to diffusers' ``DDPMScheduler.add_noise``."""
    abar = alphas_cumprod.to(x0.device, torch.float32)[t.to(x0.device)]  # [B, K]
    abar = abar.reshape(*t.shape, *([1] * (x0.ndim - t.ndim)))
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()).to(x0.dtype)


def _build_forward(cfg: ForwardNoising) -> NoiseFn:
    def noise(x0: torch.Tensor, generator: torch.Generator, ctx: NoisingContext) -> Noised:
        t, eps = group_draws(
            tuple(x0.shape),
            generator,
            t_min=cfg.t_min,
            t_max=cfg.t_max,
            share_noise=cfg.share_noise,
            share_t=cfg.share_timestep,
            rows=ctx.rows,
        )
        eps = eps.to(x0.device)
        return Noised(x_t=forward_noise(x0, t, eps, ctx.scheduler.alphas_cumprod), t=t.to(x0.device), eps=eps)

    return noise


NOISING.register("forward")(
    NoisingMethod(config_cls=ForwardNoising, build=_build_forward, summary="q(x_t | x_0), DDPM Eq. 4")
)


def noising_config(
    default: str, options: dict[str, Any] | None = None, explicit: BaseModel | None = None
) -> BaseModel:
    """The noising config a run uses: ``explicit`` (the config's ``noising:`` section) or, when it is None, the
    default method ``default`` (an objective spec's ``noising``). ``options`` (the spec's ``noising_options`` of the
    objective config, e.g. RankDPO's ``{"share_noise": False}``) fill the fields ``noising:`` leaves unset; a field
    it sets to another value is a contradiction and an error naming both. Options the chosen method does not have
    (an inversion method has no ``share_noise``) do not apply to it."""
    cfg = explicit if explicit is not None else NOISING.get(default).config_cls()
    fields = type(cfg).model_fields
    applicable = {k: v for k, v in (options or {}).items() if k in fields}
    given = cfg.model_fields_set if explicit is not None else set[str]()
    clash = {k: v for k, v in applicable.items() if k in given and getattr(cfg, k) != v}
    if clash:
        k, v = next(iter(clash.items()))
        raise ValueError(
            f"noising.{k}: {getattr(cfg, k)!r} contradicts the objective's setting ({k} = {v!r}, e.g. "
            f"objective.noise); drop noising.{k} or change the objective's option"
        )
    return cfg.model_copy(update={k: v for k, v in applicable.items() if k not in given})
