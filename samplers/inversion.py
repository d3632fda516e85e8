"""Training-time noising by inversion: DDIM inversion (DDIM-InPO) and ReNoise inversion (SmPO), registered in
:data:`samplers.noising.NOISING` as ``ddim_inversion`` and ``renoise_inversion``.

Instead of ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with fresh Gaussian ``eps``, the clean latent is run
*up* a coarse DDIM grid by the trainable policy (prompt-conditioned, no guidance, no gradient), and the regression
target is the noise that the inverted latent implies at the sampled timestep (Lu et al., "InPO: Inversion
Preference Optimization with Reparametrized DDIM for Efficient Diffusion Model Alignment", CVPR 2025)::

    x_inv   = DDIMInvert_policy(x0, c, up to the grid level reached below t)     # no_grad
    eps~    = (x_inv - sqrt(abar_t) x0) / sqrt(1 - abar_t)                        # abar of the *sampled* t
    (x_t, eps) = (x_inv, eps~)   # so x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps holds exactly, as for forward

As the official code computes it (JaydenLyh/InPO ``train.py`` L866-867 ``inverse_scheduler.set_timesteps(10)``,
L995-1015 the loop below; JaydenLyh/SmPO ``train.py`` L872/L881 the grid, L1002-1028 the ReNoise loop)::

    times = inverse_scheduler.timesteps[inverse_scheduler.timesteps < timesteps[0]]
    for t in times:
        eps = unet(x, t, c)                                   # SmPO also: x1 = step(eps, t, x)
        x = inverse_scheduler.step(eps, t, x).prev_sample     #           eps = (eps + unet(x1, t, c)) / 2
        x += 0.1 * randn_like(x) * noise_scheduler._get_variance(t + 1000 // n, t) ** 0.5    # InPO only

Symbol map (diffusers ``DDIMInverseScheduler`` / DDIM paper, Song et al. 2021, Eq. 12):

* ``abar(level)`` = ``alphas_cumprod[level]``; a level below 0 has ``abar`` = ``initial_alpha`` (diffusers'
  ``initial_alpha_cumprod``: ``alphas_cumprod[0]`` for the SD / SDXL configs, whose ``set_alpha_to_one`` is false);
* one step from level ``src`` to ``dst > src`` with model noise ``eps``:
  ``x0_hat = (x - sqrt(1 - abar_src) eps) / sqrt(abar_src)``, ``x' = sqrt(abar_dst) x0_hat + sqrt(1 - abar_dst) eps``;
* ``sigma_step^2 = (1 - abar_src) / (1 - abar_dst) * (1 - abar_dst / abar_src)``, the DDPM posterior variance
  between the two levels (diffusers ``DDIMScheduler._get_variance(dst, src)``); InPO adds ``eta * sigma_step * z``.

Grid semantics depend on the diffusers version the scheduler class came from (research/objectives.md section 4.2,
pitfall 13); both are implemented here explicitly, not through ``DDIMInverseScheduler``:

* ``diffusers_0.20`` (0.20 / 0.21, what the official requirements.txt pins; the default): ``set_timesteps(n)`` gives
  the leading grid ``g_k = k * T // n + steps_offset``, rolled by one with the first entry ``g_1 - T // n``
  (n = 10: ``[-99, 1, 101, ..., 801]``); ``step(eps, g, x)`` moves from level ``g`` to ``g + T // n``, the model is
  queried at the latent's own level ``g`` (the first call with timestep -99). The latent ends at the smallest level
  in ``{g + T // n}`` that is ``>= t`` (capped at the top of the grid).
* ``diffusers_0.22`` (>= 0.22): grid ``g_k`` without the roll (``[1, 101, ..., 901]``); ``step(eps, g, x)`` moves
  from ``g - T // n`` to ``g`` and the model is queried at the *destination* level ``g``. The latent ends at the
  largest grid level ``< t``; for ``t <= steps_offset`` nothing is inverted (``x_t = x0``). InPO's eta term uses
  this step's own two levels here; the official line, ``_get_variance(g + T // n, g)``, would read one grid step
  too high under >= 0.22 (and index past ``alphas_cumprod`` for ``g = 901``).

In both, the mismatch between the grid level reached and the sampled ``t`` is absorbed into ``eps~``.

Differences from the official code, on purpose: timesteps are per sample (the official loop inverts the whole
micro-batch with ``timesteps[0]``, right only for one pair per device); every eta draw comes from the step's
generator (the official ``randn_like`` uses the global RNG); ``alphas_cumprod`` and the latents stay fp32 (the
official code casts ``alphas_cumprod`` to fp16 before deriving ``eps~``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from samplers.noising import (
    NOISING,
    Denoiser,
    Noised,
    NoiseFn,
    NoisingContext,
    NoisingMethod,
    group_randint,
    group_randn,
)

Semantics = Literal["diffusers_0.20", "diffusers_0.22"]


@dataclass(frozen=True)
class InversionStep:
    """One step of the inversion grid. ``grid``: the scheduler's timestep entry (a step runs for a sample when
    ``grid < t``); ``label``: the timestep the model is queried with; ``src`` / ``dst``: the noise levels before and
    after the step (a level < 0 is the initial level)."""

    grid: int
    label: int
    src: int
    dst: int


def inversion_grid(
    num_steps: int,
    *,
    semantics: Semantics = "diffusers_0.20",
    steps_offset: int = 1,
    num_train_timesteps: int = 1000,
) -> list[InversionStep]:
    """The steps of ``DDIMInverseScheduler.set_timesteps(num_steps)`` with leading spacing (the SD / SDXL scheduler
    configs), in either diffusers' semantics (module docstring)."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    leading = [k * ratio + steps_offset for k in range(num_steps)]
    if semantics == "diffusers_0.20":  # np.roll(timesteps, 1); timesteps[0] = timesteps[1] - step_ratio
        steps = [InversionStep(g, g, g, g + ratio) for g in [leading[0] - ratio, *leading[:-1]]]
    elif semantics == "diffusers_0.22":
        steps = [InversionStep(g, g, g - ratio, g) for g in leading]
    else:
        raise ValueError(f"semantics {semantics!r} unknown; use diffusers_0.20 or diffusers_0.22")
    if steps[-1].dst >= num_train_timesteps:
        raise ValueError(
            f"steps_offset {steps_offset} puts the top of the {num_steps}-step grid at {steps[-1].dst}, past the "
            f"last timestep {num_train_timesteps - 1}; use a smaller steps_offset"
        )
    return steps


def steps_for(t: int, steps: list[InversionStep]) -> list[InversionStep]:
    """The steps the official loop runs for timestep ``t``: ``timesteps[timesteps < t]``."""
    return [s for s in steps if s.grid < t]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: float, abar_to: float) -> torch.Tensor:
    """One deterministic DDIM move of ``x`` from noise level ``abar_from`` to ``abar_to`` with noise estimate ``eps``
    (DDIM Eq. 12, eta = 0); up the grid for inversion, down for sampling."""
    x0_hat = (x - math.sqrt(1.0 - abar_from) * eps) / math.sqrt(abar_from)
    return math.sqrt(abar_to) * x0_hat + math.sqrt(1.0 - abar_to) * eps


def posterior_std(abar_low: float, abar_high: float) -> float:
    """DDPM posterior standard deviation between a lower noise level (``abar_low``, larger) and a higher one
    (diffusers ``DDIMScheduler._get_variance(high, low) ** 0.5``)."""
    var = (1.0 - abar_low) / (1.0 - abar_high) * (1.0 - abar_high / abar_low)
    return math.sqrt(max(var, 0.0))


@torch.no_grad()
def invert(
    x0: torch.Tensor,
    t: torch.Tensor,
    denoiser: Denoiser,
    alphas_cumprod: torch.Tensor,
    steps: list[InversionStep],
    *,
    initial_alpha: float,
    eta: float = 0.0,
    eta_noise: torch.Tensor | None = None,
    renoise_steps: int = 0,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Invert ``x0`` (``[B, K, C, h, w]``) up the grid, each sample to the levels its own ``t`` (``[B, K]``) calls
    for; returns the inverted latents in fp32.

    ``renoise_steps``: ReNoise refinements per step (Garibi et al. 2024; SmPO: 1): the model is queried again, with
    the same timestep label, at the provisional latent the step produced, and the step is redone with the mean of
    all estimates (one refinement = the official ``(eps + eps_1) / 2``). ``eta`` (InPO: 0.1) adds
    ``eta * sigma_step * eta_noise[:, j]`` after step ``j``; ``eta_noise`` is ``[B, len(steps), K, C, h, w]``.
    Only the groups whose grid is not exhausted go through the model (``denoiser(x, t, groups)``); an image of a
    running group whose own ``t`` is reached (per-image ``t``) is left unchanged.
    """
    if x0.ndim != 5 or t.shape != x0.shape[:2]:
        raise ValueError(
            f"invert expects x0 [B, K, C, h, w] and t [B, K]; got {tuple(x0.shape)}, {tuple(t.shape)}"
        )
    if eta and (eta_noise is None or eta_noise.shape[:2] != (x0.shape[0], len(steps))):
        raise ValueError("eta > 0 needs eta_noise of shape [B, len(steps), K, C, h, w]")
    abar = alphas_cumprod.double().cpu()

    def level(v: int) -> float:
        return float(abar[v]) if v >= 0 else initial_alpha

    def to_eps(out: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
        if prediction_type == "epsilon":
            return out.float()
        if (
            prediction_type == "v_prediction"
        ):  # eps = sqrt(a) v + sqrt(1 - a) x (diffusers DDIMInverseScheduler)
            return math.sqrt(a) * out.float() + math.sqrt(1.0 - a) * x
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")

    x = x0.float()
    t_dev = t.to(x0.device)
    for j, s in enumerate(steps):
        active = t_dev > s.grid  # [B, K]; monotone in j, so once False it stays False
        running = active.any(dim=1)  # [B]: groups with an image still to invert
        if not bool(running.any()):
            break
        a_src, a_dst = level(s.src), level(s.dst)
        # only the running groups go through the model (a batch's grid runs to its largest t)
        groups = None if bool(running.all()) else running.nonzero().flatten()
        xs = x if groups is None else x[groups]  # [G, K, C, h, w]
        label = torch.full(xs.shape[:2], s.label, dtype=t_dev.dtype, device=t_dev.device)

        estimates = [to_eps(denoiser(xs, label, groups), xs, a_src)]
        x_next = ddim_step(xs, estimates[0], a_src, a_dst)
        for _ in range(renoise_steps):
            estimates.append(to_eps(denoiser(x_next, label, groups), x_next, a_src))
            x_next = ddim_step(xs, torch.stack(estimates).mean(0), a_src, a_dst)
        if eta:
            assert eta_noise is not None
            z = eta_noise[:, j] if groups is None else eta_noise[groups.cpu(), j]
            x_next = x_next + eta * posterior_std(a_src, a_dst) * z.to(x.device, torch.float32)
        if groups is not None:
            x_next = x.index_copy(0, groups, x_next)
        x = torch.where(active[..., None, None, None], x_next, x)
    return x


def implied_noise(
    x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """``eps~ = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` in fp32 for ``[B, K, ...]`` latents and ``t`` ``[B, K]``
    (InPO ``train.py`` L1012-1014)."""
    a = alphas_cumprod.to(x0.device, torch.float32)[t.to(x0.device)]
    a = a.reshape(*t.shape, *([1] * (x0.ndim - t.ndim)))
    return (x_t.float() - a.sqrt() * x0.float()) / (1 - a).sqrt()


# ------------------------------------------------------------------------------------------------ noising methods
class _InversionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_steps: int = Field(default=10, ge=1, le=1000, description="Inversion grid steps (set_timesteps(n)).")
    eta: float = Field(
        default=0.1, ge=0, description="Noise added per step, in DDPM posterior standard deviations."
    )
    renoise_steps: int = Field(
        default=0, ge=0, description="ReNoise refinements per step (model calls per step - 1)."
    )
    semantics: Semantics = Field(
        default="diffusers_0.20",
        description="Grid semantics: diffusers_0.20 (0.20/0.21, the official pin) or diffusers_0.22 (>= 0.22).",
    )
    steps_offset: int = Field(
        default=1, ge=0, description="Leading-grid offset (SD / SDXL scheduler configs: 1)."
    )
    initial_alpha: Literal["alphas_cumprod_0", "one"] = Field(
        default="alphas_cumprod_0",
        description="abar below level 0: alphas_cumprod[0] (set_alpha_to_one: false, SD / SDXL) or 1.0.",
    )
    t_min: int = Field(default=0, ge=0)
    t_max: int = Field(default=1000, ge=1, description="Exclusive upper bound of t ~ U{t_min, t_max - 1}.")
    share_timestep: bool = Field(default=True, description="Same t for every image of a group (official).")

    @model_validator(mode="after")
    def _range(self) -> _InversionConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be < t_max ({self.t_max})")
        return self


class DDIMInversion(_InversionConfig):
    """DDIM inversion as DDIM-InPO runs it: 10-step grid, eta 0.1, no ReNoise (InPO train.py L866, L995-1011)."""

    name: Literal["ddim_inversion"] = "ddim_inversion"


class ReNoiseInversion(_InversionConfig):
    """ReNoise inversion as SmPO runs it for SD1.5: 5-step grid (SDXL: 10, train.py L872), one refinement averaging
    two estimates per step, no eta (SmPO train.py L881, L1002-1024)."""

    name: Literal["renoise_inversion"] = "renoise_inversion"
    num_steps: int = Field(
        default=5, ge=1, le=1000, description="Inversion grid steps (SmPO: 5 for SD1.5, 10 for SDXL)."
    )
    eta: float = Field(
        default=0.0, ge=0, description="Noise added per step, in DDPM posterior standard deviations."
    )
    renoise_steps: int = Field(
        default=1, ge=0, description="ReNoise refinements per step (model calls per step - 1)."
    )


def _build_inversion(cfg: _InversionConfig) -> NoiseFn:
    def noise(x0: torch.Tensor, generator: torch.Generator, ctx: NoisingContext) -> Noised:
        if ctx.denoiser is None:
            raise ValueError(
                f"noising {getattr(cfg, 'name', '?')} inverts with the policy: NoisingContext.denoiser is required"
            )
        alphas_cumprod = ctx.scheduler.alphas_cumprod
        n_train = len(alphas_cumprod)
        if cfg.t_max > n_train:
            raise ValueError(f"noising.t_max {cfg.t_max} exceeds the scheduler's {n_train} timesteps")
        steps = inversion_grid(
            cfg.num_steps, semantics=cfg.semantics, steps_offset=cfg.steps_offset, num_train_timesteps=n_train
        )
        b, k = x0.shape[:2]
        # draw order (t, then the eta noise) is fixed: exact resume depends on it
        t = group_randint(cfg.t_min, cfg.t_max, (b, 1 if cfg.share_timestep else k), generator, ctx.rows)
        t = t.expand(b, k).contiguous()
        eta_noise = None
        if cfg.eta:
            eta_noise = group_randn((b, len(steps), k, *x0.shape[2:]), generator, ctx.rows)
        initial = float(alphas_cumprod[0]) if cfg.initial_alpha == "alphas_cumprod_0" else 1.0
        x_inv = invert(
            x0,
            t,
            ctx.denoiser,
            alphas_cumprod,
            steps,
            initial_alpha=initial,
            eta=cfg.eta,
            eta_noise=eta_noise,
            renoise_steps=cfg.renoise_steps,
            prediction_type=ctx.prediction_type,
        )
        t = t.to(x0.device)
        return Noised(x_t=x_inv.to(x0.dtype), t=t, eps=implied_noise(x_inv, x0, t, alphas_cumprod))

    return noise


NOISING.register("ddim_inversion")(
    NoisingMethod(
        config_cls=DDIMInversion,
        build=_build_inversion,
        summary="DDIM inversion by the policy (DDIM-InPO: 10-step grid, eta 0.1), eps re-derived at t",
    )
)
NOISING.register("renoise_inversion")(
    NoisingMethod(
        config_cls=ReNoiseInversion,
        build=_build_inversion,
        summary="ReNoise inversion by the policy (SmPO: 5-step grid, 1 refinement), eps re-derived at t",
    )
)
