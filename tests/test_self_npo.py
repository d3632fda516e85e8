"""Self-NPO: the truncated teacher chain, the VP re-noising, the pseudo-Huber x0 loss, and training through the seam
(EMA teacher, unconditional inputs per family, only the preferred column run through the models)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from samplers.noising import NOISING, NoisingContext
from samplers.truncated import TruncatedTeacher, ddim_grid, origin_and_noise, renoise, truncated_chain
from trainers.self_npo import self_npo_loss
from workbench.config import load_config
from workbench.train import Trainer

ROOT = Path(__file__).parents[1]
SDXL_LORA = "configs/tiny/sdxl_dpo_lora.yaml"
SD15_FULL = "configs/tiny/sd15_dpo_full.yaml"


def _abar() -> torch.Tensor:
    """SD's scaled-linear schedule (beta 0.00085 -> 0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _oracle(x0: torch.Tensor, abar: torch.Tensor):
    """A teacher that knows x0: eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), the same with or
    without the prompt. It also counts its calls."""
    calls = []

    def teacher(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(t.clone())
        a = abar[t].reshape(*t.shape, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps, eps

    return teacher, calls


def test_ddim_grid_is_the_official_solver_grid():
    """Self-NPO DDIMSolver: (1..25) * 40 - 1."""
    grid = ddim_grid(1000, 25)
    assert grid[:3].tolist() == [39, 79, 119] and grid[-1] == 999 and len(grid) == 25
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        ddim_grid(1000, 0)


def test_truncated_chain_stops_at_the_grid_lower_end_and_takes_at_most_max_steps():
    """Start indices 0, 2, 7, 24 with 5 steps at most: 1, 3, 5, 5 steps; the first two stop at t = 0 (below the
    grid) and stay there; index 7 (t = 319) ends at grid[2] = 119, index 24 (t = 999) at grid[19] = 799. With an
    oracle teacher the deterministic DDIM steps stay on x0's trajectory, so the chain ends at
    sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and the teacher's x0 there is x0 itself."""
    abar, grid = _abar(), ddim_grid(1000, 25)
    x0 = torch.randn(4, 1, 2, 3, 3)
    eps = torch.randn(4, 1, 2, 3, 3)
    index = torch.tensor([[0], [2], [7], [24]])
    a0 = abar[grid[index]].reshape(4, 1, 1, 1, 1)
    x_start = a0.sqrt() * x0 + (1 - a0).sqrt() * eps
    teacher, calls = _oracle(x0, abar)
    x, t, x0_hat, steps = truncated_chain(x_start, index, teacher, abar, grid, max_steps=5, guidance=-5.0)
    assert steps.flatten().tolist() == [1, 3, 5, 5]
    assert t.flatten().tolist() == [0, 0, 119, 799]
    assert len(calls) == 6  # 5 steps + the x0 estimate at the truncated point
    a = abar[t].reshape(4, 1, 1, 1, 1)
    assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-4)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    # every sample ran out of grid before max_steps: the loop stops early and still evaluates the end point
    teacher, calls = _oracle(x0[:1], abar)
    _, t1, _, s1 = truncated_chain(x_start[:1], index[:1], teacher, abar, grid, max_steps=5, guidance=-1.0)
    assert s1.item() == 1 and t1.item() == 0 and len(calls) == 2


def test_teacher_guidance_w_minus_one_is_the_unconditional_prediction():
    """x0^ = x0_c + w (x0_c - x0_u): at w = -1 only the unconditional branch matters (Self-NPO's SD1.5 setting)."""
    abar, grid = _abar(), ddim_grid(1000, 25)
    x_start, index = torch.randn(3, 1, 2, 4, 4), torch.tensor([[3], [10], [20]])

    def teacher(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sin(x_t) + 1.0, 0.5 * x_t  # cond, uncond

    def uncond_only(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 0.5 * x_t, 0.5 * x_t

    guided = truncated_chain(x_start, index, teacher, abar, grid, max_steps=5, guidance=-1.0)
    plain = truncated_chain(x_start, index, uncond_only, abar, grid, max_steps=5, guidance=0.0)
    for a, b in zip(guided, plain):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_renoising_is_the_variance_preserving_forward_transition():
    """If x_t ~ q(x_t | x0) then x_s = (x_t / alpha_t + sqrt(sigma_s^2/alpha_s^2 - sigma_t^2/alpha_t^2) z) alpha_s is
    distributed as q(x_s | x0) = N(alpha_s x0, 1 - abar_s): checked on 200,000 samples per (t, s)."""
    abar = _abar()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t_, s_ in ((0, 500), (119, 120), (399, 999), (799, 900)):
        x0 = torch.full((n, 1, 1, 1, 1), 0.7)
        t, s = torch.full((n, 1), t_), torch.full((n, 1), s_)
        a_t = abar[t_]
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=g)
        x_s = renoise(x_t, t, s, torch.randn(x0.shape, generator=g), abar)
        a_s = abar[s_]
        assert x_s.mean().item() == pytest.approx(0.7 * a_s.sqrt().item(), abs=0.01)
        assert x_s.var().item() == pytest.approx(1 - a_s.item(), rel=0.02, abs=2e-4)
    with pytest.raises(ValueError, match="s > t"):
        renoise(x0[:1], torch.tensor([[5]]), torch.tensor([[5]]), x0[:1], abar)


class _Scheduler:
    alphas_cumprod = _abar()


def test_noising_method_draws_s_after_the_truncated_point_and_is_reproducible():
    """The registered truncated_teacher noising: s in [t_trunc + 1, 999]; eps is the noise that takes the teacher's
    x0 to x_s; the same generator seed gives the same draws; no teacher is a clear error."""
    abar = _abar()
    x0 = torch.randn(64, 1, 2, 3, 3)
    cfg = TruncatedTeacher(guidance=-5.0)
    fn = NOISING.get("truncated_teacher").build(cfg)
    teacher, calls = _oracle(x0, abar)
    out = fn(x0, torch.Generator().manual_seed(1), NoisingContext(_Scheduler(), teacher=teacher))
    assert out.x0 is not None and torch.allclose(out.x0, x0, atol=1e-4)  # oracle: the teacher's x0 is x0
    t_trunc = calls[-1]  # the last call is at the truncated point
    assert bool((out.t > t_trunc).all()) and int(out.t.max()) <= 999
    a = abar[out.t].reshape(64, 1, 1, 1, 1)
    assert torch.allclose(out.x_t, a.sqrt() * out.x0 + (1 - a).sqrt() * out.eps, atol=1e-4)
    again = fn(
        x0, torch.Generator().manual_seed(1), NoisingContext(_Scheduler(), teacher=_oracle(x0, abar)[0])
    )
    assert torch.equal(again.x_t, out.x_t) and torch.equal(again.t, out.t)
    with pytest.raises(ValueError, match="needs a teacher"):
        fn(x0, torch.Generator().manual_seed(1), NoisingContext(_Scheduler()))


def test_pseudo_huber_hand_value_and_batch_mean():
    """d = 0.3 everywhere, c = 0.001: sqrt(0.09 + 1e-6) - 0.001 = 0.299001666...; l2: 0.09. The batch loss is the
    mean of the single-sample losses at B = 1, 3, 8."""
    a = torch.full((1, 1, 2, 2, 2), 0.3)
    loss, _ = self_npo_loss(a, torch.zeros_like(a), huber_c=0.001)
    assert loss.item() == pytest.approx(math.sqrt(0.09 + 1e-6) - 0.001, rel=1e-6)
    assert self_npo_loss(a, torch.zeros_like(a), loss_type="l2")[0].item() == pytest.approx(0.09, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    for b in (1, 3, 8):
        p, q = torch.randn(b, 1, 4, 8, 8, generator=g), torch.randn(b, 1, 4, 8, 8, generator=g)
        whole = self_npo_loss(p, q)[0]
        singles = torch.stack([self_npo_loss(p[i : i + 1], q[i : i + 1])[0] for i in range(b)]).mean()
        assert whole.item() == pytest.approx(singles.item(), rel=1e-6)


def test_x0_from_v_and_epsilon_outputs_agree():
    """A v model and an epsilon model describing the same (x0, eps) give the same x0 and eps estimates."""
    abar = _abar()
    x0, eps, t = torch.randn(2, 1, 2, 3, 3), torch.randn(2, 1, 2, 3, 3), torch.tensor([[100], [900]])
    a = abar[t].reshape(2, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        x0_hat, eps_hat = origin_and_noise(out, x_t, t, abar, kind)
        assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-4)


# --------------------------------------------------------------------------------------------- through the seam
def _trainer(config: str, *overrides: str) -> Trainer:
    cfg = load_config(
        ROOT / config,
        [
            "logging.tensorboard=false",
            "objective={name: self_npo}",
            "noising={name: truncated_teacher, guidance: -5.0}",
            "validation.prompts=[]",
            "train.max_steps=2",
            "train.checkpoint_every=1",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    return trainer


@pytest.mark.parametrize(("config", "name"), [(SDXL_LORA, "snpo_lora"), (SD15_FULL, "snpo_full")])
def test_self_npo_trains_two_steps_with_an_ema_teacher(workdir: Path, config: str, name: str):
    """LoRA (tiny SDXL) and full fine-tune (tiny SD1.5): finite losses, only column 0 run through the models, the
    unconditional input per family (SDXL zeros, SD1.5 the encoded empty prompt), the EMA teacher moved by the
    optimizer steps and saved with each checkpoint and the final weights."""
    trainer = _trainer(config, f"run.name={name}")
    assert trainer.spec.reference == "ema" and trainer.reference.decay == 0.999
    seen = []
    noise_fn = trainer.noise_fn

    def spy(x0, generator, ctx):
        seen.append((x0.shape[1], ctx.teacher is not None))
        return noise_fn(x0, generator, ctx)

    trainer.noise_fn = spy
    batch = trainer.cache.batch([0, 1], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False)
    uncond = trainer._unconditional(batch)
    if trainer.components.family == "sdxl":
        assert (
            not uncond["encoder_hidden_states"].any() and not uncond["added_cond_kwargs"]["text_embeds"].any()
        )
    else:
        empty = trainer.cache.text_embedding("")["prompt_embeds"]
        assert torch.equal(uncond["encoder_hidden_states"][0], empty) and empty.any()
    name_ = trainer.reference.trained[0]
    before = dict(trainer.reference.module.named_parameters())[name_].detach().clone()
    run_dir = trainer.train()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert seen and all(k == 1 and has_teacher for k, has_teacher in seen)
    after = dict(trainer.reference.module.named_parameters())[name_].detach()
    assert not torch.equal(before, after)
    assert (run_dir / "checkpoints" / "step_000001" / "reference" / "ema.safetensors").is_file()
    assert (run_dir / "final" / "reference" / "ema.safetensors").is_file()


def _image_folder(folder: Path, n: int) -> Path:
    """n random 40x36 PNGs with captions, plus one image without a caption and one with an empty caption."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n + 2):
        pixels = (torch.rand(36, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        if i < n:
            (folder / f"img{i:02d}.txt").write_text(f"a {'red' if i % 2 else 'blue'} square\n")
    (folder / f"img{n + 1:02d}.txt").write_text("  \n")
    return folder


def test_image_folder_reader_reads_captioned_images_and_reports_the_rest(tmp_path: Path):
    from workbench.data import DataError, ReadReport, read_image_folder

    folder = _image_folder(tmp_path / "imgs", 3)
    report = ReadReport()
    records = list(read_image_folder(folder, report))
    assert [r.k for r in records] == [1, 1, 1] and records[1].prompt == "a red square"
    assert [row for row, _ in report.skipped] == ["img03.png", "img04.png"]
    assert "no caption file img03.txt" in report.skipped[0][1] and "empty" in report.skipped[1][1]
    with pytest.raises(DataError, match="not a folder"):
        list(read_image_folder(tmp_path / "missing", ReadReport()))


def test_image_folder_is_refused_for_preference_objectives(tmp_path: Path):
    with pytest.raises(ValueError, match=r"needs pairs; data.sources\[0\] is image_folder"):
        load_config(ROOT / SDXL_LORA, [f"data.sources=[{{format: image_folder, path: '{tmp_path}'}}]"])


def test_self_npo_trains_on_a_captioned_image_folder(workdir: Path, tmp_path: Path):
    """The official data layout (images + .txt captions, no labels): two Self-NPO steps on K = 1 groups."""
    folder = _image_folder(tmp_path / "imgs", 6)
    trainer = _trainer(
        SDXL_LORA,
        "run.name=snpo_folder",
        f"data.sources=[{{format: image_folder, path: '{folder}'}}]",
        f"data.cache.dir={tmp_path / 'cache'}",
        "data.max_bad_fraction=0.5",  # two of the eight files have no usable caption
    )
    assert len(trainer.cache) == 6 and trainer.cache.batch(
        [0, 1], torch.Generator().manual_seed(0), empty_prompt_prob=0.0, hflip=False
    ).shape == (2, 1)
    run_dir = trainer.train()
    losses = [json.loads(x).get("train/loss") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([v for v in losses if v is not None]) == 2
    skipped = (run_dir / "skipped_rows.jsonl").read_text()
    assert "img06.png" in skipped and "img07.png" in skipped


def test_the_official_launch_seed_does_not_overflow_the_step_generator(workdir: Path):
    """The Self-NPO launchers' seed 453645634 (configs/*/self_npo.yaml) made reseed's combined seed exceed int64
    ("Overflow when unpacking long long" at step 0); it is reduced modulo 2^63, and small seeds keep their draws."""
    trainer = _trainer(SDXL_LORA, "run.name=bigseed", "run.seed=453645634")
    trainer.reseed(3)
    first = torch.rand(3, generator=trainer.noise_generator)
    trainer.reseed(3)
    assert torch.equal(first, torch.rand(3, generator=trainer.noise_generator))
    small = _trainer(SDXL_LORA, "run.name=smallseed", "run.seed=7")
    small.reseed(5)
    assert small.noise_generator.initial_seed() == (7 * 1_000_003) * 1_000_033 + 5
