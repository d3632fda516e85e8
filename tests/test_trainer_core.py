"""The trainer core's second pass: one test per defect a review found, the objective seam, the one renderer.

Each defect test failed on the code before its fix (the issue "Trainer core, second pass" lists the defects).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.config import load_config
from workbench.train import Trainer

ROOT = Path(__file__).parents[1]
SD15_FULL = "configs/tiny/sd15_dpo_full.yaml"
SDXL_LORA = "configs/tiny/sdxl_dpo_lora.yaml"
QUIET = ["logging.tensorboard=false"]
ONE_IMAGE = ["validation.prompts=[a red square]", "validation.seeds=[0]", "validation.num_inference_steps=2"]


def _trainer(config: str, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(ROOT / config, [*QUIET, *overrides]), show_progress=False)
    trainer.setup()
    return trainer


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- 1. validation under every dtype
# (train.mixed_precision, model.reference_dtype, vae_dtype, text_encoder_dtype): a covering set of the
# combinations, bf16 standing in for fp16 on CPU. The first one is the reported crash ("mat1 and mat2 must have the
# same dtype, but got Float and BFloat16" inside validate, before any checkpoint was written).
FULL_COMBOS = [
    ("no", "bf16", "fp32", "fp32"),
    ("no", "auto", "bf16", "bf16"),
    ("bf16", "auto", "fp32", "fp32"),
    ("bf16", "fp32", "bf16", "bf16"),
]
LORA_COMBOS = [("no", "bf16", "fp32"), ("bf16", "bf16", "bf16")]


def _assert_validation_rendered(trainer: Trainer, run_dir: Path, step: int) -> None:
    assert not trainer.validator.errors, trainer.validator.errors
    assert (run_dir / "validation" / f"step_{step:06d}.png").is_file()
    assert trainer.validator.base is not None and torch.isfinite(trainer.validator.base).all()


@pytest.mark.parametrize(("mixed", "ref", "vae", "text"), FULL_COMBOS)
def test_full_finetune_validates_under_mixed_dtypes(workdir: Path, mixed: str, ref: str, vae: str, text: str):
    name = f"dtype_full_{mixed}_{ref}_{vae}_{text}"
    trainer = _trainer(
        SD15_FULL,
        f"run.name={name}",
        f"train.mixed_precision={mixed}",
        f"model.reference_dtype={ref}",
        f"model.vae_dtype={vae}",
        f"model.text_encoder_dtype={text}",
        "train.max_steps=2",
        "train.checkpoint_every=1",
        "validation.every=1",
        *ONE_IMAGE,
    )
    run_dir = trainer.train()
    _assert_validation_rendered(trainer, run_dir, 1)
    assert (run_dir / "checkpoints" / "step_000001" / "COMPLETE").is_file()


@pytest.mark.parametrize(("mixed", "vae", "text"), LORA_COMBOS)
def test_lora_validates_under_mixed_dtypes(workdir: Path, mixed: str, vae: str, text: str):
    trainer = _trainer(
        SDXL_LORA,
        f"run.name=dtype_lora_{mixed}_{vae}_{text}",
        f"train.mixed_precision={mixed}",
        f"model.vae_dtype={vae}",
        f"model.text_encoder_dtype={text}",
        "train.max_steps=1",
        "validation.every=1",
        *ONE_IMAGE,
    )
    run_dir = trainer.train()
    _assert_validation_rendered(trainer, run_dir, 1)


def test_a_failing_validation_keeps_the_checkpoint_and_training_goes_on(workdir: Path):
    trainer = _trainer(
        SDXL_LORA,
        "run.name=val_fails",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "validation.every=2",
        *ONE_IMAGE,
    )

    def broken(unet, **_):
        raise RuntimeError("mat1 and mat2 must have the same dtype")

    trainer.validator.render = broken  # type: ignore[method-assign]
    run_dir = trainer.train()
    assert (run_dir / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert trainer.counters.step == 4
    errors = [r for r in _records(run_dir) if "validation/error" in r]
    assert [r["step"] for r in errors] == [2, 4] and "same dtype" in errors[0]["validation/error"]


# --------------------------------------------------------------------- 2. the reference as precise as the policy
def test_full_finetune_starts_at_ln2_with_the_default_reference(
    workdir: Path, capsys: pytest.CaptureFixture[str]
):
    """Policy == reference at step 0, so every logit is 0 and the loss is ln 2. With the old bf16 default reference
    (mixed_precision no, beta 5000) the tiny SD1.5 model gave |logit| ~ 0.7 and loss 0.85."""
    trainer = _trainer(
        SD15_FULL,
        "run.name=ln2_full",
        "train.max_steps=1",
        "validation.prompts=[]",
        "model.reference_dtype=auto",
    )
    assert trainer.reference.dtype == torch.float32
    trainer.train()
    first = next(r for r in _records(trainer.run_dir) if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["dpo/logit_mean"]) < 1e-3
    assert "less precise" not in capsys.readouterr().err


def test_a_lower_precision_reference_is_warned_about(workdir: Path, capsys: pytest.CaptureFixture[str]):
    trainer = _trainer(SD15_FULL, "run.name=bf16_ref", "model.reference_dtype=bf16", "validation.prompts=[]")
    assert trainer.reference.dtype == torch.bfloat16
    assert "model.reference_dtype=bf16 is less precise" in capsys.readouterr().err


def test_yaml_no_is_mixed_precision_no():
    """YAML 1.1 reads `train.mixed_precision=no` as false; it used to be refused as "Input should be 'no'"."""
    assert load_config(ROOT / SD15_FULL, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_default_reference_dtype_is_auto():
    from workbench.config import ModelSection

    assert ModelSection(source="x").reference_dtype == "auto"


# ------------------------------------------------------------------- 3 + 6. two processes (gloo): lr and saving
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_fixtures: dict[str, Path]) -> Path:
    """A 2-process CPU run through torchrun (gloo), as `accelerate launch` would start it: constant_with_warmup over
    4 steps, 3 steps, a checkpoint at step 2."""
    work = tmp_path_factory.mktemp("ddp")
    (work / ".cache").mkdir()
    (work / ".cache" / "tiny").symlink_to(tiny_fixtures["sdxl"].parent)
    import socket

    with socket.socket() as sock:  # torchrun's --master_port=0 hangs in the c10d rendezvous; take a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # ACCELERATE_USE_CPU: what `accelerate launch --cpu` sets; without it accelerate ignores torchrun on CPU.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "workbench",
        "train",
        str(ROOT / SDXL_LORA),
        "run.name=ddp",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "scheduler.warmup_steps=4",
        "validation.prompts=[]",
        "logging.tensorboard=false",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "ddp"


def test_lr_schedule_counts_optimizer_steps_not_processes(two_process_run: Path):
    """Warm-up 4 steps at lr 1e-3: steps 1, 2, 3 use 0.25e-3, 0.5e-3, 0.75e-3 whatever the number of processes.
    Through accelerate's prepared scheduler (stepped once per process) the second step used 0.75e-3."""
    lrs = [r["train/lr"] for r in _records(two_process_run) if "train/lr" in r]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3])


def test_two_process_checkpoint_is_complete(two_process_run: Path):
    state = two_process_run / "checkpoints" / "step_000002" / "training_state"
    assert (state.parent / "COMPLETE").is_file()
    assert sorted(p.name for p in state.glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (state / "adapter.safetensors").is_file()
    assert not list((two_process_run / "checkpoints").glob("*.tmp"))


def test_lr_schedule_is_a_function_of_the_step():
    from workbench.config import ConstantWithWarmup, Cosine
    from workbench.optim import lr_factor

    assert [lr_factor(ConstantWithWarmup(warmup_steps=4), s, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1, 1]
    cos = Cosine(warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(cos, 0, 10) == pytest.approx(1.0) and lr_factor(cos, 10, 10) == pytest.approx(0.0)


def test_save_hook_writes_the_adapter_only_on_the_main_process(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """accelerate runs save-state pre-hooks on every process; every rank used to write adapter.safetensors."""
    trainer = _trainer(SDXL_LORA, "run.name=hook", "validation.prompts=[]")
    acc = trainer.accelerator
    hook = next(iter(acc._save_model_state_pre_hook.values()))
    with monkeypatch.context() as m:
        m.setattr(type(acc), "is_main_process", property(lambda self: False))
        hook([trainer.unet], [{}], str(tmp_path))
    assert not (tmp_path / "adapter.safetensors").exists()
    hook([trainer.unet], [{}], str(tmp_path))
    assert (tmp_path / "adapter.safetensors").is_file()


def test_checkpoint_folder_is_renamed_only_after_every_process_saved(tmp_path: Path):
    """Barrier between save_state (every process writes its part) and the main process's rename."""
    from workbench.checkpointing import save_checkpoint

    events: list[str] = []

    class FakeAccelerator:
        is_main_process = True

        def wait_for_everyone(self) -> None:
            events.append("barrier")

        def save_state(self, path: str) -> None:
            Path(path).mkdir(parents=True)
            events.append("save_state")

    def export(directory: Path) -> None:
        events.append("export")

    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        events.append("rename")
        return real_rename(self, target)

    Path.rename = rename  # type: ignore[method-assign]
    try:
        save_checkpoint(FakeAccelerator(), tmp_path, 3, export, keep_last=2)
    finally:
        Path.rename = real_rename  # type: ignore[method-assign]
    after_save = events[events.index("save_state") + 1 :]
    assert after_save[0] == "barrier" and after_save.index("rename") > 0
    assert (tmp_path / "checkpoints" / "step_000003" / "COMPLETE").is_file()


# --------------------------------------------------------------------------- 4. clipping with Adafactor (SDXL)
def test_adafactor_runs_are_clipped_like_the_salesforce_sdxl_launcher(workdir: Path):
    """Salesforce train.py clips unless --use_adafactor; --sdxl picks Adafactor without setting that flag, so the
    published SDXL run clips (max_grad_norm 1.0). The workbench used to skip clipping for every Adafactor run."""
    trainer = _trainer(
        SD15_FULL,
        "run.name=adafactor",
        "optimizer={name: adafactor, lr: 1.0e-5}",
        "train.max_steps=1",
        "train.max_grad_norm=1.0",
        "validation.prompts=[]",
    )
    trainer.train()
    record = next(r for r in _records(trainer.run_dir) if "train/loss" in r)
    assert "train/grad_norm" in record
    sdxl = load_config(ROOT / "configs/sdxl/dpo.yaml")
    assert sdxl.optimizer.name == "adafactor" and sdxl.train.max_grad_norm == 1.0


# ----------------------------------------------------------------------------------------- 5. train mode
def test_policy_is_in_train_mode_from_setup_through_validation_and_resume(workdir: Path):
    overrides = ["train.max_steps=2", "train.checkpoint_every=1", "validation.every=1", *ONE_IMAGE]
    trainer = _trainer(SDXL_LORA, "run.name=modes", "model.lora.dropout=0.1", *overrides)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    dropouts = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts and unet.training and all(m.training for m in dropouts)
    trainer.validate(0)
    assert unet.training and all(m.training for m in dropouts)
    trainer.train()
    assert unet.training
    resumed = _trainer(
        SDXL_LORA,
        "run.name=modes",
        "model.lora.dropout=0.1",
        *overrides[:-4],
        "train.max_steps=3",
        "train.resume=latest",
    )
    resumed._maybe_resume()
    assert resumed.accelerator.unwrap_model(resumed.unet).training


# ------------------------------------------------------------------------------------------- the one renderer
def test_validation_images_are_the_samplers_images(workdir: Path):
    """The same (prompt, seed) is the same image in a validation grid and in `workbench generate` / `eval`."""
    from samplers import SamplingConfig, sample, with_sampler

    trainer = _trainer(SDXL_LORA, "run.name=renderer", *ONE_IMAGE, "validation.seeds=[0, 5]")
    with trainer.reference.as_unet() as base_unet:
        got = trainer.validator.render(base_unet)
    pipe = trainer.components.pipe
    cfg = SamplingConfig(sampler="euler", steps=2, guidance=3.0, height=32, width=32)
    with trainer.reference.as_unet():
        expected = sample(with_sampler(pipe, "euler"), ["a red square"] * 2, [0, 5], cfg)
    assert torch.allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------- the seam
def test_a_new_objective_is_one_registration_and_trains_without_touching_the_loop(workdir: Path):
    """A throw-away objective registered here (a margin loss on the K = 2 group that needs per-pair soft labels it
    ignores, the LoRA-disabled reference and forward noising) trains two steps; nothing in workbench/ changes."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict

    from trainers.base import OBJECTIVES, Needs, ObjectiveSpec, dpo_margin, per_sample_error

    class ThrowAwayConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["throw_away"] = "throw_away"
        scale: float = 1.0

    seen: dict[str, object] = {}

    def build(cfg: ThrowAwayConfig, ctx):
        seen["latent_shape"] = ctx.latent_shape

        def loss(pred, batch):
            seen["k"] = pred.policy.shape[1]
            err = per_sample_error(pred.policy, pred.target)  # [B, K]
            value = cfg.scale * (err[:, 0] - err[:, 1]).sigmoid().mean()
            return value, {"throw_away/err_w": err[:, 0].mean().detach()}

        return loss

    spec = ObjectiveSpec(
        config_cls=ThrowAwayConfig, build=build, needs=Needs(data="pairs"), margin=dpo_margin
    )
    OBJECTIVES.register("throw_away")(spec)  # registration is all: the config schema follows the registry
    try:
        trainer = _trainer(
            SDXL_LORA,
            "run.name=throw_away",
            "objective={name: throw_away, scale: 2.0}",
            "train.max_steps=2",
            "validation.prompts=[]",
        )
        run_dir = trainer.train()
    finally:
        OBJECTIVES.unregister("throw_away")
    records = [r for r in _records(run_dir) if "train/loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["train/loss"]) for r in records)
    assert "throw_away/err_w" in records[0]
    assert seen["k"] == 2 and seen["latent_shape"] == (4, 16, 16)
    assert 0.0 <= trainer.implicit_accuracy(draws=1) <= 1.0


def test_train_module_names_no_objective():
    assert "diffusion_dpo" not in (ROOT / "workbench" / "train.py").read_text()


def test_objective_needs_are_checked_against_the_data_formats():
    """A ranking objective refuses pair data when the config is validated, naming the source and the fix."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict

    from trainers.base import OBJECTIVES, Needs, ObjectiveSpec
    from workbench.config import ConfigError

    class ProbeConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["ranked_probe"] = "ranked_probe"

    base = OBJECTIVES.get("diffusion_dpo")
    OBJECTIVES.register("ranked_probe")(
        ObjectiveSpec(config_cls=ProbeConfig, build=base.build, needs=Needs(data="rankings", min_k=3))
    )
    try:
        with pytest.raises(
            ConfigError,
            match=r"needs rankings \(groups of K >= 3 images, best first\); data.sources\[0\] is pickapic_parquet",
        ):
            load_config(ROOT / SDXL_LORA, ["objective={name: ranked_probe}"])
    finally:
        OBJECTIVES.unregister("ranked_probe")


def test_rankings_reduced_to_pairs_for_pairwise_objectives_and_k_checked(tmp_path: Path):
    from trainers.base import Needs
    from workbench.data import DataError, PreferenceRecord
    from workbench.train import check_needs

    pairs = [PreferenceRecord("p", [b"a", b"b"], "f:1"), PreferenceRecord("q", [b"a", b"b"], "f:2")]
    check_needs("diffusion_dpo", Needs(data="pairs"), pairs)
    with pytest.raises(DataError, match="K >= 3; row f:1 has K = 2"):
        check_needs("rankdpo", Needs(data="rankings", min_k=3), pairs)
    mixed = [PreferenceRecord("p", [b"a"] * 3, "f:1"), PreferenceRecord("q", [b"a"] * 4, "f:2")]
    with pytest.raises(DataError, match=r"groups of K = \[3, 4\]"):
        check_needs("fixed", Needs(data="rankings", min_k=3), mixed)
    check_needs("variable", Needs(data="rankings", min_k=3, variable_k=True), mixed)
    with pytest.raises(DataError, match="needs a score per image; row f:1"):
        check_needs("scored", Needs(data="rankings", min_k=3, variable_k=True, scores=True), mixed)


def test_forward_noising_matches_diffusers_add_noise():
    from diffusers import DDPMScheduler

    from samplers.noising import NOISING, ForwardNoising, NoisingContext

    sched = DDPMScheduler()
    x0 = torch.randn(3, 2, 4, 8, 8)
    noised = NOISING.get("forward").build(ForwardNoising())(
        x0, torch.Generator().manual_seed(0), NoisingContext(sched)
    )
    assert noised.t.shape == (3, 2) and torch.equal(noised.t[:, 0], noised.t[:, 1])  # one t per group
    assert torch.equal(noised.eps[:, 0], noised.eps[:, 1])  # shared noise
    flat = sched.add_noise(x0.reshape(6, 4, 8, 8), noised.eps.reshape(6, 4, 8, 8), noised.t.reshape(6))
    assert torch.allclose(noised.x_t.reshape(6, 4, 8, 8), flat, atol=1e-6)
    independent = NOISING.get("forward").build(ForwardNoising(share_noise=False, share_timestep=False))
    other = independent(x0, torch.Generator().manual_seed(0), NoisingContext(sched))
    assert not torch.equal(other.eps[:, 0], other.eps[:, 1])


def test_references_registry():
    from workbench.references import REFERENCES, reference_dtype, reference_for

    assert set(REFERENCES.names()) >= {"frozen_copy", "lora_disabled"}
    assert reference_for("base", "lora") == "lora_disabled" and reference_for("base", "full") == "frozen_copy"
    assert reference_for(None, "full") is None
    assert (
        reference_dtype("auto", "no") == torch.float32 and reference_dtype("auto", "bf16") == torch.bfloat16
    )


@pytest.mark.parametrize("name", ["diffusion_dpo", "npo", "sft"])
def test_every_registered_objective_trains_two_steps(workdir: Path, name: str):
    from trainers import OBJECTIVES

    # rankdpo reads ranking data: tests/test_rankdpo.py trains it two steps on mixed-K rankings; inpo:
    # tests/test_inpo_smpo.py trains it two steps (ln 2 at step 0); smpo needs soft labels: tests/test_relabel.py
    # trains it two steps on relabelled pairs; self_npo (an EMA teacher, LoRA and full): tests/test_self_npo.py
    assert set(OBJECTIVES.names()) == {
        "diffusion_dpo",
        "inpo",
        "npo",
        "rankdpo",
        "self_npo",
        "sft",
        "smpo",
    }, "add new objectives to this test"
    trainer = _trainer(
        SDXL_LORA,
        f"run.name=two_{name}",
        f"objective={{name: {name}}}",
        "train.max_steps=2",
        "validation.prompts=[]",
    )
    run_dir = trainer.train()
    records = [r for r in _records(run_dir) if "train/loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["train/loss"]) for r in records)
    if OBJECTIVES.get(name).reference is not None:
        assert records[0]["train/loss"] == pytest.approx(
            math.log(2), abs=1e-6
        )  # fresh LoRA: policy == reference
    assert (run_dir / "final" / "COMPLETE").is_file()


# ------------------------------------------------------------------------------------------- the EMA reference
def test_ema_teacher_update_and_checkpoint_round_trip(tmp_path: Path):
    """theta_ema <- d theta_ema + (1 - d) theta for the trained weights only; save/load restores it exactly."""
    from contextlib import nullcontext

    from workbench.references import EMATeacher

    policy = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    policy[1].requires_grad_(False)  # a frozen part: its EMA must stay equal to it
    teacher = EMATeacher(unet=policy, dtype=torch.float32, autocast=nullcontext, decay=0.9)
    start = policy[0].weight.detach().clone()
    with torch.no_grad():
        policy[0].weight.add_(1.0)
        policy[1].weight.add_(5.0)  # not trained: ignored by the EMA
    teacher.on_optimizer_step(policy)
    ema = dict(teacher.module.named_parameters())
    assert torch.allclose(ema["0.weight"], 0.9 * start + 0.1 * (start + 1.0), atol=1e-6)
    assert not torch.equal(ema["1.weight"], policy[1].weight)
    teacher.save(tmp_path / "reference")
    other = EMATeacher(unet=policy, dtype=torch.float32, autocast=nullcontext, decay=0.9)
    other.load(tmp_path / "reference")
    assert torch.equal(dict(other.module.named_parameters())["0.weight"], ema["0.weight"])
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMATeacher(unet=policy, dtype=torch.float32, autocast=nullcontext, decay=1.0)


def test_an_ema_reference_follows_the_policy_and_resumes(workdir: Path):
    """An objective asking for the "ema" reference (with its decay from the objective's config) gets it updated after
    every optimizer step, saved in each checkpoint, and restored on resume; the loop names neither."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict

    from trainers.base import OBJECTIVES, Needs, ObjectiveSpec, per_sample_error

    class EmaProbe(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: Literal["ema_probe"] = "ema_probe"
        decay: float = 0.5

    def build(cfg, ctx):
        def loss(pred, batch):
            assert pred.reference is not None  # the EMA teacher predicted
            return per_sample_error(pred.policy, pred.target).mean(), {}

        return loss

    spec = ObjectiveSpec(
        config_cls=EmaProbe,
        build=build,
        needs=Needs(data="winners", min_k=1),
        reference="ema",
        reference_options=lambda cfg: {"decay": cfg.decay},
    )
    OBJECTIVES.register("ema_probe")(spec)
    try:
        common = [
            "objective={name: ema_probe, decay: 0.5}",
            "validation.prompts=[]",
            "train.checkpoint_every=1",
        ]
        trainer = _trainer(SDXL_LORA, "run.name=ema", *common, "train.max_steps=2")
        assert trainer.reference.decay == 0.5
        lora = next(n for n in trainer.reference.trained if "lora_B" in n)
        before = dict(trainer.reference.module.named_parameters())[lora].detach().clone()
        run_dir = trainer.train()
        after = dict(trainer.reference.module.named_parameters())[lora].detach().clone()
        assert not torch.equal(before, after)  # the teacher moved with the policy
        saved = run_dir / "checkpoints" / "step_000001" / "reference" / "ema.safetensors"
        assert saved.is_file() and (run_dir / "final" / "reference" / "ema.safetensors").is_file()
        resumed = _trainer(
            SDXL_LORA,
            "run.name=ema",
            *common,
            "train.max_steps=2",
            "train.resume=" + str(saved.parent.parent),
        )
        resumed._maybe_resume()
        from safetensors.torch import load_file

        restored = dict(resumed.reference.module.named_parameters())[lora]
        assert torch.equal(restored.detach(), load_file(str(saved))[lora])
    finally:
        OBJECTIVES.unregister("ema_probe")
