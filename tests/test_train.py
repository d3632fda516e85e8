"""End-to-end training on tiny models: what changes, what must not, what is written, and exact resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.config import load_config
from workbench.train import Trainer

ROOT = Path(__file__).parents[1]


def _run(config: str, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(ROOT / config, list(overrides)), show_progress=False)
    trainer.setup()
    return trainer


def _images(pipe, prompt: str = "a red square") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_sdxl_lora_dpo_end_to_end(workdir: Path):
    from diffusers import StableDiffusionXLPipeline

    trainer = _run(
        "configs/tiny/sdxl_dpo_lora.yaml",
        "run.name=e2e_lora",
        "logging.tensorboard=true",
        "validation.scorers=[toy/saturation, jpeg_compressibility]",
    )
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    run_dir = trainer.train()

    changed_lora = [n for n, p in unet.named_parameters() if "lora_" in n and not torch.equal(p, before[n])]
    changed_base = [
        n for n, p in unet.named_parameters() if "lora_" not in n and not torch.equal(p, before[n])
    ]
    assert changed_lora, "LoRA parameters did not change"
    assert not changed_base, f"base parameters changed: {changed_base[:3]}"

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    import json

    records = [json.loads(x) for x in lines if '"train/loss"' in x]
    assert len(records) == 20
    assert records[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA: policy == reference
    assert all(math.isfinite(r["train/loss"]) for r in records)
    rewards = [json.loads(x) for x in lines if '"reward/' in x]
    assert [r["step"] for r in rewards] == [10, 20]  # validation scores logged per step, tuned and base
    assert {"reward/toy/saturation", "reward_base/toy/saturation", "reward/jpeg_compressibility"} <= set(
        rewards[0]
    )
    assert (run_dir / "validation" / "step_000010.png").is_file()
    assert (run_dir / "validation" / "step_000020.png").is_file()
    assert (run_dir / "config.resolved.yaml").is_file() and (run_dir / "environment.json").is_file()
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert (run_dir / "final" / "COMPLETE").is_file()

    base_dir = str(workdir / ".cache" / "tiny" / "sdxl")
    base = _images(StableDiffusionXLPipeline.from_pretrained(base_dir))
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(str(run_dir / "final" / "lora"), weight_name="pytorch_lora_weights.safetensors")
    diffusers_fmt = _images(pipe)
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(str(run_dir / "final" / "lora"), weight_name="lora_kohya.safetensors")
    kohya_fmt = _images(pipe)
    kohya_keys = list(load_file(str(run_dir / "final" / "lora" / "lora_kohya.safetensors")))
    assert all(k.startswith("lora_unet_") for k in kohya_keys)
    assert np.abs(diffusers_fmt - base).max() > 1e-4, "the LoRA does not change the pipeline's output"
    assert np.abs(diffusers_fmt - kohya_fmt).max() < 1e-5, "kohya and diffusers formats disagree"


def test_sd15_full_dpo_end_to_end(workdir: Path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    trainer = _run("configs/tiny/sd15_dpo_full.yaml", "run.name=e2e_full", "logging.tensorboard=false")
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    assert trainer.reference is not None
    ref = trainer.reference.module
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    run_dir = trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in unet.named_parameters()), "UNet did not change"
    assert all(torch.equal(p, ref_before[n]) for n, p in ref.named_parameters()), "reference changed"
    assert not any(p.requires_grad for p in ref.parameters())
    assert (run_dir / "validation" / "step_000020.png").is_file()

    base_dir = str(workdir / ".cache" / "tiny" / "sd15")
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    base = _images(StableDiffusionPipeline.from_pretrained(base_dir, **kwargs))
    tuned_pipe = StableDiffusionPipeline.from_pretrained(base_dir, **kwargs)
    tuned_pipe.unet = UNet2DConditionModel.from_pretrained(str(run_dir / "final" / "unet"))
    assert np.abs(_images(tuned_pipe) - base).max() > 1e-4


def _final_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "lora" / "pytorch_lora_weights.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(workdir: Path):
    common = [
        "train.max_steps=16",
        "train.checkpoint_every=4",
        "train.keep_last=2",
        "run.deterministic=true",
        "validation.prompts=[]",
        "logging.tensorboard=false",
    ]
    cfg_path = str(ROOT / "configs/tiny/sdxl_dpo_lora.yaml")
    reference = _run("configs/tiny/sdxl_dpo_lora.yaml", *common, "run.name=uninterrupted").train()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "workbench", "train", cfg_path, *common, "run.name=killed", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = workdir / "runs" / "killed" / "checkpoints" / "step_000004" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = workdir / "runs" / "killed"
    assert not (run_dir / "final").exists()

    resumed = _run("configs/tiny/sdxl_dpo_lora.yaml", *common, "run.name=killed", "train.resume=latest")
    assert resumed.counters.step == 0  # state is restored inside train()
    resumed.train()
    assert resumed.counters.step == 16
    a, b = _final_lora(reference), _final_lora(run_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


def test_nonfinite_losses_skip_steps_then_stop_keeping_the_last_checkpoint(workdir: Path):
    from workbench.train import TrainingError

    trainer = _run(
        "configs/tiny/sdxl_dpo_lora.yaml",
        "run.name=nan_run",
        "train.checkpoint_every=2",
        "train.max_nonfinite_steps=3",
        "validation.prompts=[]",
        "logging.tensorboard=false",
    )
    real = trainer.loss_fn
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 4 else loss), metrics

    trainer.loss_fn = flaky
    with pytest.raises(TrainingError, match="3 non-finite losses in a row at step 4"):
        trainer.train()
    assert trainer.counters.nonfinite_total == 3
    ckpts = sorted(p.name for p in (workdir / "runs" / "nan_run" / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004"]  # the good steps before the losses went non-finite
    assert (workdir / "runs" / "nan_run" / "checkpoints" / "step_000004" / "COMPLETE").is_file()
    assert not (workdir / "runs" / "nan_run" / "final").exists()


def test_ctrl_c_saves_a_checkpoint_then_exits(workdir: Path):
    cfg_path = str(ROOT / "configs/tiny/sdxl_dpo_lora.yaml")
    args = ["train.max_steps=400", "train.checkpoint_every=1000", "validation.prompts=[]", "run.name=ctrl_c"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "workbench", "train", cfg_path, *args, "--no-progress"]
    # A shell's background job (CI) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler;
    # restore the default so the child behaves as in a terminal.
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = workdir / "runs" / "ctrl_c" / "metrics.jsonl"
    deadline = time.time() + 240
    while (
        (not metrics.exists() or metrics.stat().st_size == 0)
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "resume with train.resume=latest" in err.decode()
    ckpts = [p for p in (workdir / "runs" / "ctrl_c" / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()
