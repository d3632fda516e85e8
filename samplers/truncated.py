"""Self-NPO's training noising: a truncated DDIM chain of a guided teacher from a forward-noised real latent, then a
variance-preserving re-noising to a later timestep (registered in ``NOISING`` as ``truncated_teacher``).

As the official code computes it (G-U-N/Diffusion-NPO ``Self-NPO/train.py`` L984-1133, ``train_xl.py`` L1120-1260;
research/objectives.md section 7.1), per sample::

    index ~ U{0, .., N-1};  t0 = grid[index]            # grid = (1..N) * (T // N) - 1 = 39, 79, .., 999 for N = 25
    x = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps         # a forward-noised *real* latent
    repeat at most `max_steps` times while index >= 0:   # the EMA teacher, no gradient
        x0_c, eps_c = teacher(x, t, prompt);  x0_u, eps_u = teacher(x, t, uncond)
        x0^ = x0_c + w (x0_c - x0_u);  eps^ = eps_c + w (eps_c - eps_u)      # w = -1 (SD1.5), -5 (SDXL)
        x = sqrt(abar_prev) x0^ + sqrt(1 - abar_prev) eps^                   # deterministic DDIM to grid[index-1]
        t = grid[index - 1] (0 below the grid);  index -= 1
    x0^ = the guided teacher x0 at the truncated point (x, t_trunc)          # the regression target
    s ~ U{t_trunc + 1, .., T - 1}
    x_s = (x / alpha_t + sqrt(sigma_s^2 / alpha_s^2 - sigma_t^2 / alpha_t^2) z) alpha_s   # q(x_s | x_t), z ~ N(0, I)

Symbols: ``abar_t`` = ``alphas_cumprod[t]``, ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``; ``T`` = 1000.
With ``w = -1`` the guided prediction is the unconditional one; ``w = -5`` is strong anti-prompt guidance.

One difference from the official loop, on purpose: the official code evaluates the teacher once more at the
truncated point only while some sample of the micro-batch is still stepping; when every sample of a batch ran out of
grid early (all ``index < max_steps``), it keeps the x0 estimate from *before* the last step, so a sample's target
depends on its batch-mates. Here every sample's target is the teacher's x0 at its own truncated point, which is what
the official code computes in any batch with one sample that starts at ``index >= max_steps`` (at batch 20 and 25
grid points, all but a 0.2^20 fraction of its batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from samplers.noising import (
    NOISING,
    Noised,
    NoisingContext,
    NoisingMethod,
    group_rand,
    group_randint,
    group_randn,
)

#: ``(x_t [B, K, C, h, w], t [B, K]) -> (conditional, unconditional)`` outputs of the teacher, no gradient.
Teacher = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def ddim_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """``(1..N) * (T // N) - 1``: the official ``DDIMSolver`` grid (Self-NPO ``train.py`` L58-63); ``[N]`` long."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(
            f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}"
        )
    ratio = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * ratio - 1


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` (fp32) broadcast to ``like``'s shape: ``t`` ``[B, K]`` -> ``[B, K, 1, 1, 1]``."""
    out = values.to(like.device, torch.float32)[t.to(like.device)]
    return out.reshape(*t.shape, *([1] * (like.ndim - t.ndim)))


def origin_and_noise(
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's x0 and epsilon estimates from its output: epsilon models ``x0 = (x_t - sigma eps) / alpha``
    (Self-NPO ``predicted_origin``); v models (Salimans & Ho 2022) ``x0 = alpha x_t - sigma v``,
    ``eps = sigma x_t + alpha v``."""
    abar = _gather(alphas_cumprod, t, x_t)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    out, x = output.float(), x_t.float()
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, sigma * x + alpha * out
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


@torch.no_grad()
def truncated_chain(
    x_start: torch.Tensor,
    index: torch.Tensor,
    teacher: Teacher,
    alphas_cumprod: torch.Tensor,
    grid: torch.Tensor,
    *,
    max_steps: int,
    guidance: float,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At most ``max_steps`` guided DDIM steps of ``teacher`` from ``x_start`` at ``grid[index]`` (per sample,
    ``index`` ``[B, K]``), stopping at the grid's lower end (``t = 0``). Returns ``(x_trunc, t_trunc, x0_hat,
    steps)``: the latent where the chain stopped, its timestep, the guided teacher's x0 estimate there, and the
    number of steps each sample took (``min(max_steps, index + 1)``)."""
    grid = grid.to(index.device)
    # grid point below each index: grid[index - 1], or 0 below the grid (Self-NPO's ddim_timesteps_prev)
    prev = torch.cat([grid.new_zeros(1), grid[:-1]])

    def guided(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_c, out_u = teacher(x, t)
        x0_c, eps_c = origin_and_noise(out_c, x, t, alphas_cumprod, prediction_type)
        x0_u, eps_u = origin_and_noise(out_u, x, t, alphas_cumprod, prediction_type)
        return x0_c + guidance * (x0_c - x0_u), eps_c + guidance * (eps_c - eps_u)

    x = x_start.float()
    t = grid[index]
    idx = index.clone()
    active = torch.ones_like(idx, dtype=torch.bool)
    steps = torch.zeros_like(idx)
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        x0_hat, eps_hat = guided(x, t)
        t_prev = prev[idx]
        abar_prev = _gather(alphas_cumprod, t_prev, x)
        x_prev = abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat  # DDIM, eta = 0
        keep = active.reshape(*active.shape, *([1] * (x.ndim - active.ndim)))
        x = torch.where(keep, x_prev, x)
        t = torch.where(active, t_prev, t)
        steps = steps + active.long()
        idx = torch.where(active, idx - 1, idx)
        active = active & (idx >= 0)
    x0_hat, _ = guided(x, t)
    return x, t, x0_hat, steps


def renoise(
    x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, z: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The variance-preserving forward transition ``q(x_s | x_t)`` for ``s > t`` (Self-NPO ``train.py`` L1130-1133):
    ``x_s = (x_t / alpha_t + sqrt(sigma_s^2 / alpha_s^2 - sigma_t^2 / alpha_t^2) z) alpha_s``, i.e. mean
    ``(alpha_s / alpha_t) x_t`` and variance ``sigma_s^2 - abar_s sigma_t^2 / abar_t``; so if
    ``x_t ~ q(x_t | x0)`` then ``x_s ~ N(alpha_s x0, sigma_s^2)``."""
    if bool((s <= t).any()):
        raise ValueError("renoise needs s > t for every sample")
    abar_t, abar_s = _gather(alphas_cumprod, t, x_t), _gather(alphas_cumprod, s, x_t)
    nsr_t2, nsr_s2 = (1 - abar_t) / abar_t, (1 - abar_s) / abar_s  # (sigma / alpha)^2
    return (x_t.float() / abar_t.sqrt() + (nsr_s2 - nsr_t2).sqrt() * z.float()) * abar_s.sqrt()


class TruncatedTeacher(BaseModel):
    """Self-NPO's noising (see the module docstring). Defaults quote the official SD1.5 launcher (``train.py``:
    25-step grid, 5 teacher steps, w = -1); the SDXL script uses ``guidance: -5``."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["truncated_teacher"] = "truncated_teacher"
    num_ddim_timesteps: int = Field(25, ge=1, description="DDIM grid of the teacher chain (official: 25).")
    max_steps: int = Field(5, ge=1, description="Teacher DDIM steps at most (official K = 5).")
    guidance: float = Field(
        -1.0,
        description="Teacher CFG w in x0_c + w (x0_c - x0_u): -1 (SD1.5 script) = unconditional, -5 (SDXL script).",
    )


def _build(cfg: TruncatedTeacher) -> Callable[[torch.Tensor, torch.Generator, NoisingContext], Noised]:
    def noise(x0: torch.Tensor, generator: torch.Generator, ctx: NoisingContext) -> Noised:
        if ctx.teacher is None:
            raise ValueError(
                "noising truncated_teacher needs a teacher (a reference model); the objective's spec must name one"
            )
        abar = ctx.scheduler.alphas_cumprod.to(torch.float32)
        n_train = int(abar.shape[0])
        grid = ddim_grid(n_train, cfg.num_ddim_timesteps)
        b, k = x0.shape[0], x0.shape[1]
        # draw order (exact resume depends on it): start noise, grid index, s, re-noising noise
        eps = group_randn(tuple(x0.shape), generator, ctx.rows).to(x0.device)
        index = group_randint(0, cfg.num_ddim_timesteps, (b, k), generator, ctx.rows)
        t0 = grid[index]
        abar0 = _gather(abar, t0, x0)
        x_start = abar0.sqrt() * x0.float() + (1 - abar0).sqrt() * eps.float()
        x_trunc, t_trunc, x0_hat, _ = truncated_chain(
            x_start,
            index.to(x0.device),
            ctx.teacher,
            abar,
            grid,
            max_steps=cfg.max_steps,
            guidance=cfg.guidance,
            prediction_type=ctx.prediction_type,
        )
        t_trunc = t_trunc.cpu()
        # s ~ U{t_trunc + 1, .., T - 1} per sample (official: t + randint(1, T - 1 - t + 1))
        u = group_rand((b, k), generator, ctx.rows)
        s = t_trunc + 1 + (u * (n_train - 1 - t_trunc).float()).long().clamp(max=n_train - 2 - t_trunc)
        z = group_randn(tuple(x0.shape), generator, ctx.rows).to(x0.device)
        x_s = renoise(x_trunc, t_trunc, s, z, abar)
        abar_s = _gather(abar, s, x_s)
        eps_s = (x_s - abar_s.sqrt() * x0_hat) / (1 - abar_s).sqrt()  # the noise that takes x0_hat to x_s
        return Noised(x_t=x_s.to(x0.dtype), t=s.to(x0.device), eps=eps_s.to(x0.dtype), x0=x0_hat.to(x0.dtype))

    return noise


NOISING.register("truncated_teacher")(
    NoisingMethod(
        config_cls=TruncatedTeacher,
        build=_build,
        summary="Self-NPO: truncated guided DDIM chain of the EMA teacher, then q(x_s | x_t) re-noising",
    )
)
