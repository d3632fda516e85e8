"""DDIM and ReNoise inversion (samplers.inversion): the grid in both diffusers semantics, oracle round trips, the
official loop through diffusers' own DDIMInverseScheduler, per-sample timesteps, explicit randomness."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from samplers.inversion import (
    DDIMInversion,
    ReNoiseInversion,
    ddim_step,
    implied_noise,
    inversion_grid,
    invert,
    posterior_std,
    steps_for,
)
from samplers.noising import NOISING, NoisingContext

SD_SCHEDULER = {  # the SD1.5 / SDXL scheduler config fields that matter here
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}


def _alphas() -> torch.Tensor:
    from diffusers import DDPMScheduler

    sched: Any = DDPMScheduler.from_config(SD_SCHEDULER)
    return sched.alphas_cumprod


def _visits(t: int, n: int, semantics: str) -> tuple[list[int], int]:
    steps = steps_for(t, inversion_grid(n, semantics=semantics))  # pyright: ignore[reportArgumentType]
    return [s.label for s in steps], (steps[-1].dst if steps else 0)


# --------------------------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize(
    ("t", "labels", "final"),
    [
        # diffusers 0.20/0.21, n = 10: grid [-99, 1, 101, ..., 801]; step g goes g -> g + 100, queried at g
        (0, [-99], 1),
        (2, [-99, 1], 101),
        (101, [-99, 1], 101),
        (102, [-99, 1, 101], 201),
        (550, [-99, 1, 101, 201, 301, 401, 501], 601),
        (601, [-99, 1, 101, 201, 301, 401, 501], 601),
        (602, [-99, 1, 101, 201, 301, 401, 501, 601], 701),
        (999, [-99, 1, 101, 201, 301, 401, 501, 601, 701, 801], 901),
    ],
)
def test_inpo_grid_diffusers_020(t: int, labels: list[int], final: int):
    assert _visits(t, 10, "diffusers_0.20") == (labels, final)


@pytest.mark.parametrize(
    ("t", "labels", "final"),
    [
        # diffusers >= 0.22, n = 10: grid [1, 101, ..., 901]; step g goes g - 100 -> g, queried at g (destination)
        (0, [], 0),  # nothing inverted: x_t = x0
        (1, [], 0),
        (2, [1], 1),
        (101, [1], 1),
        (102, [1, 101], 101),
        (550, [1, 101, 201, 301, 401, 501], 501),
        (999, [1, 101, 201, 301, 401, 501, 601, 701, 801, 901], 901),
    ],
)
def test_inpo_grid_diffusers_022(t: int, labels: list[int], final: int):
    assert _visits(t, 10, "diffusers_0.22") == (labels, final)


@pytest.mark.parametrize(
    ("t", "labels", "final"),
    [(0, [-199], 1), (2, [-199, 1], 201), (250, [-199, 1, 201], 401), (602, [-199, 1, 201, 401, 601], 801)],
)
def test_smpo_grid_diffusers_020(t: int, labels: list[int], final: int):
    """n = 5: [-199, 1, 201, 401, 601], +200 per step, top level 801."""
    assert _visits(t, 5, "diffusers_0.20") == (labels, final)


def test_grid_steps_and_levels():
    legacy = inversion_grid(10, semantics="diffusers_0.20")
    assert [(s.src, s.dst) for s in legacy[:2]] == [(-99, 1), (1, 101)]
    new = inversion_grid(10, semantics="diffusers_0.22")
    assert [(s.src, s.dst, s.label) for s in new[:2]] == [(-99, 1, 1), (1, 101, 101)]
    with pytest.raises(ValueError, match="steps_offset"):
        inversion_grid(10, steps_offset=100)


# ------------------------------------------------------------------------------------- against diffusers itself
def _linear_model(seed: int = 0):
    """A deterministic toy 'UNet': eps = tanh(W x) + 0.001 * label (depends on the latent and the label)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g) * 0.5

    def model(x: torch.Tensor, label: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.einsum("ij,...jhw->...ihw", w, x).tanh()
        return y + 0.001 * label.float().reshape(*label.shape, *([1] * (x.ndim - label.ndim)))

    return model


@pytest.mark.parametrize("semantics", ["diffusers_0.20", "diffusers_0.22"])
def test_matches_the_official_loop_through_diffusers(semantics: str):
    """The official loop (InPO train.py L995-1007, eta 0) with diffusers' DDIMInverseScheduler. The installed diffusers
    has the >= 0.22 step; the 0.20 step from g to g + 100 is the >= 0.22 step called with g + 100, the model queried
    at g, over the rolled grid [-99, 1, ..., 801]."""
    from diffusers import DDIMInverseScheduler

    sched: Any = DDIMInverseScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(10)
    model = _linear_model()
    x0 = torch.randn(1, 1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    alphas = sched.alphas_cumprod
    for t in (0, 2, 350, 999):
        x = x0[0].clone()
        if semantics == "diffusers_0.22":
            for g in sched.timesteps[sched.timesteps < t]:
                x = sched.step(model(x, g.view(1)), g, x).prev_sample
        else:
            rolled = [-99, *range(1, 900, 100)]
            for g in [g for g in rolled if g < t]:
                x = sched.step(model(x, torch.tensor([g])), g + 100, x).prev_sample
        ours = invert(
            x0,
            torch.tensor([[t]]),
            model,
            alphas,
            inversion_grid(10, semantics=semantics),  # pyright: ignore[reportArgumentType]
            initial_alpha=float(alphas[0]),
        )
        torch.testing.assert_close(ours[0], x, atol=1e-5, rtol=1e-5)


def test_eta_std_is_diffusers_get_variance():
    """InPO's noise scale: noise_scheduler._get_variance(t + 100, t) ** 0.5 (train.py L1008-1011)."""
    from diffusers import DDIMScheduler

    sched: Any = DDIMScheduler.from_config(SD_SCHEDULER)
    a = sched.alphas_cumprod
    for low, high in ((-99, 1), (1, 101), (401, 501), (801, 901)):
        expected = float(sched._get_variance(torch.tensor(high), torch.tensor(low))) ** 0.5
        a_low = float(a[0]) if low < 0 else float(a[low])
        assert posterior_std(a_low, float(a[high])) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------- oracle round trips
def _sample_back(x: torch.Tensor, steps, model, level) -> torch.Tensor:
    """Deterministic DDIM sampling down the levels the inversion went up, the model queried at the latent's level."""
    for s in reversed(steps):
        eps = model(x, torch.tensor([s.dst]))
        x = ddim_step(x, eps, level(s.dst), level(s.src))
    return x


@pytest.mark.parametrize("n", [5, 10])
def test_round_trip_with_an_oracle_epsilon_model(n: int):
    """eps(x, tau) = (x - sqrt(a_tau) x0) / sqrt(1 - a_tau), the true noise of the analytic trajectory through x0.
    Every step's x0 estimate is exact, so inversion lands on sqrt(a_L) x0 + sqrt(1 - a_L) e with e the noise at the
    start, and DDIM sampling back from there returns x0."""
    alphas = _alphas()
    initial = float(alphas[0])

    def level(v: int) -> float:
        return float(alphas[v]) if v >= 0 else initial

    x0 = torch.randn(1, 1, 4, 5, 5, generator=torch.Generator().manual_seed(3))

    def oracle(x: torch.Tensor, label: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        a = level(int(label.flatten()[0]))
        return (x - math.sqrt(a) * x0.reshape(x.shape)) / math.sqrt(1 - a)

    steps = inversion_grid(n)
    e = (x0 - math.sqrt(initial) * x0) / math.sqrt(1 - initial)
    for t in (0, 300, 999):
        visited = steps_for(t, steps)
        x_t = invert(x0, torch.tensor([[t]]), oracle, alphas, steps, initial_alpha=initial)
        a_l = level(visited[-1].dst)
        torch.testing.assert_close(x_t, math.sqrt(a_l) * x0 + math.sqrt(1 - a_l) * e, atol=1e-5, rtol=1e-5)
        back = _sample_back(x_t[0], visited, oracle, level)
        torch.testing.assert_close(back, x0[0], atol=1e-5, rtol=1e-5)


def test_round_trip_in_022_semantics_with_a_constant_noise_oracle():
    """Under >= 0.22 the model is queried at the destination level, where the latent is not; an oracle that returns
    the trajectory's (constant) noise whatever the label still round-trips exactly."""
    alphas = _alphas()
    initial = float(alphas[0])
    x0 = torch.randn(1, 1, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    e = torch.randn(1, 1, 4, 5, 5, generator=torch.Generator().manual_seed(5))

    def oracle(x: torch.Tensor, label: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        return e.reshape(x.shape)

    steps = inversion_grid(10, semantics="diffusers_0.22")
    visited = steps_for(700, steps)
    x_t = invert(x0, torch.tensor([[700]]), oracle, alphas, steps, initial_alpha=initial)
    x0_hat = (x0 - math.sqrt(1 - initial) * e) / math.sqrt(initial)  # the trajectory through x0 at level -99
    a_l = float(alphas[visited[-1].dst])
    torch.testing.assert_close(x_t, math.sqrt(a_l) * x0_hat + math.sqrt(1 - a_l) * e, atol=1e-5, rtol=1e-5)

    def level(v: int) -> float:
        return float(alphas[v]) if v >= 0 else initial

    torch.testing.assert_close(_sample_back(x_t[0], visited, oracle, level), x0[0], atol=1e-5, rtol=1e-5)


def test_implied_noise_reproduces_the_inverted_latent():
    alphas = _alphas()
    x0, x_t = torch.randn(2, 2, 4, 3, 3), torch.randn(2, 2, 4, 3, 3)
    t = torch.tensor([[5, 5], [870, 870]])
    eps = implied_noise(x_t, x0, t, alphas)
    a = alphas[t].view(2, 2, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x_t, atol=1e-5, rtol=1e-5)


def test_renoise_step_is_the_hand_derived_average():
    """One 0.20 step from level -99 (a0) to 1 (a1) with the model eps(x) = c * x, ReNoise once (SmPO L1008-1022):
    eps0 = c x; x1 = step(eps0); eps1 = c x1; x' = step((eps0 + eps1) / 2). With a model that ignores x, ReNoise
    equals plain DDIM."""
    alphas = _alphas()
    a0, a1 = float(alphas[0]), float(alphas[1])
    steps = inversion_grid(10)
    x0 = torch.randn(1, 1, 4, 2, 2)
    c = 0.3

    def model(x: torch.Tensor, label: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        return c * x

    eps0 = c * x0
    x1 = ddim_step(x0, eps0, a0, a1)
    expected = ddim_step(x0, (eps0 + c * x1) / 2, a0, a1)
    got = invert(x0, torch.tensor([[0]]), model, alphas, steps, initial_alpha=a0, renoise_steps=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    const = torch.randn(1, 1, 4, 2, 2)
    plain = invert(
        x0, torch.tensor([[900]]), lambda x, _, groups=None: const, alphas, steps, initial_alpha=a0
    )
    renoised = invert(
        x0,
        torch.tensor([[900]]),
        lambda x, _, groups=None: const,
        alphas,
        steps,
        initial_alpha=a0,
        renoise_steps=1,
    )
    torch.testing.assert_close(plain, renoised)


# ------------------------------------------------------------------------------- per-sample t, explicit randomness
class _Sched:
    def __init__(self) -> None:
        self.alphas_cumprod = _alphas()


def _per_group_model():
    model = _linear_model(7)

    def denoiser(x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        return model(x, t)

    return denoiser


def test_per_sample_timesteps_b3_equal_three_b1_runs():
    """Each group inverts to its own t (the official loop uses timesteps[0] for the whole micro-batch), eta noise
    included: the B = 3 result equals three B = 1 runs given the same per-group noise."""
    alphas = _alphas()
    steps = inversion_grid(10)
    x0 = torch.randn(3, 2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([[40, 40], [999, 999], [450, 450]])
    noise = torch.randn(3, len(steps), 2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    kwargs = {"initial_alpha": float(alphas[0]), "eta": 0.1, "renoise_steps": 1}
    batched = invert(x0, t, _per_group_model(), alphas, steps, eta_noise=noise, **kwargs)
    for b in range(3):
        single = invert(
            x0[b : b + 1],
            t[b : b + 1],
            _per_group_model(),
            alphas,
            steps,
            eta_noise=noise[b : b + 1],
            **kwargs,
        )
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-6, rtol=1e-6)


def test_only_running_groups_reach_the_model_with_their_own_conditioning():
    """A denoiser conditioned per group (as the trainer's is, by prompt): groups whose grid is done are not sent to
    the model, the others arrive with their batch positions, and the result equals B = 1 runs with that group's
    conditioning."""
    alphas = _alphas()
    steps = inversion_grid(10)
    base = _linear_model(3)
    sizes: list[list[int] | None] = []

    def conditioned(c: torch.Tensor):
        def denoiser(x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
            sizes.append(None if groups is None else groups.tolist())
            cc = c if groups is None else c[groups]
            return base(x, t) * cc.view(-1, 1, 1, 1, 1)

        return denoiser

    c = torch.tensor([0.5, 1.5, -1.0])
    x0 = torch.randn(3, 2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([[150, 150], [999, 999], [450, 450]])
    batched = invert(x0, t, conditioned(c), alphas, steps, initial_alpha=float(alphas[0]), renoise_steps=1)
    # grid [-99, 1, 101, ...]: t=150 runs 3 steps, t=450 runs 6, t=999 all 10 (x2 calls with ReNoise)
    assert sizes == [None] * 6 + [[1, 2]] * 6 + [[1]] * 8
    for b in range(3):
        single = invert(
            x0[b : b + 1],
            t[b : b + 1],
            conditioned(c[b : b + 1]),
            alphas,
            steps,
            initial_alpha=float(alphas[0]),
            renoise_steps=1,
        )
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["ddim_inversion", "renoise_inversion"])
def test_registered_method_per_sample_t_and_fixed_generator(name: str):
    """Through the registered noising function: a fixed generator gives identical x_t twice; with eta = 0 (no noise
    drawn after t) groups of a B = 3 batch equal B = 1 runs at the same t; x_t and eps satisfy the forward equation."""
    method = NOISING.get(name)
    fn = method.build(method.config_cls())
    ctx = NoisingContext(_Sched(), _per_group_model())
    x0 = torch.randn(3, 2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    a = fn(x0, torch.Generator().manual_seed(11), ctx)
    b = fn(x0, torch.Generator().manual_seed(11), ctx)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)
    assert (a.t[:, 0] == a.t[:, 1]).all()  # one t per pair (official)
    abar = _alphas()[a.t].view(3, 2, 1, 1, 1)
    torch.testing.assert_close(abar.sqrt() * x0 + (1 - abar).sqrt() * a.eps, a.x_t, atol=1e-5, rtol=1e-5)
    c = fn(x0, torch.Generator().manual_seed(12), ctx)
    assert not torch.equal(a.t, c.t)

    if name != "renoise_inversion":  # ddim_inversion draws eta noise after t; that case is the test above
        return
    cfg = ReNoiseInversion()
    steps = inversion_grid(cfg.num_steps)
    for i in range(
        3
    ):  # the noising function's x_t, group by group, against invert at that group's t (eta = 0)
        single = invert(
            x0[i : i + 1],
            a.t[i : i + 1],
            _per_group_model(),
            _alphas(),
            steps,
            initial_alpha=float(_alphas()[0]),
            renoise_steps=cfg.renoise_steps,
        )
        torch.testing.assert_close(a.x_t[i : i + 1], single, atol=1e-6, rtol=1e-6)


def test_no_gradient_flows_through_the_inversion():
    w = torch.nn.Parameter(torch.tensor(0.5))

    def denoiser(x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        return w * x

    method = NOISING.get("ddim_inversion")
    out = method.build(method.config_cls())(
        torch.randn(2, 2, 4, 3, 3), torch.Generator().manual_seed(0), NoisingContext(_Sched(), denoiser)
    )
    assert not out.x_t.requires_grad and not out.eps.requires_grad


def test_configs_and_errors():
    assert (
        DDIMInversion().num_steps == 10 and DDIMInversion().eta == 0.1 and DDIMInversion().renoise_steps == 0
    )
    r = ReNoiseInversion()
    assert (r.num_steps, r.eta, r.renoise_steps) == (5, 0.0, 1)
    with pytest.raises(ValueError, match="t_min"):
        DDIMInversion(t_min=5, t_max=5)
    fn = NOISING.get("ddim_inversion").build(DDIMInversion())
    with pytest.raises(ValueError, match="denoiser"):
        fn(torch.randn(1, 2, 4, 3, 3), torch.Generator(), NoisingContext(_Sched(), None))
