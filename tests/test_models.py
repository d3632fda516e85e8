"""Production loaders on tiny models saved in the real on-disk formats: diffusers folders and single files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.cli import main as cli_main
from workbench.models import ModelLoadError, apply_checkpoint, detect_family, load_pipeline
from workbench.single_file import save_single_file
from workbench.tiny import TinySpec, save_tiny_pipeline


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red square",
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_diffusers_folder_and_single_file_round_trip(family: str, tmp_path: Path):
    # distinct encoder widths, as in real SDXL (768 / 1280): diffusers tells the encoders apart by shape
    folder = save_tiny_pipeline(TinySpec(family=family, text_hidden_2=48), tmp_path / family)
    assert detect_family(str(folder)) == family
    pipe = load_pipeline(str(folder))
    single = save_single_file(pipe, tmp_path / f"{family}.safetensors")
    assert detect_family(str(single)) == family
    again = load_pipeline(str(single), single_file_config=str(folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name, None), getattr(again, name, None)
        if a is None:
            continue
        sb = b.state_dict()
        for key, value in a.state_dict().items():
            assert not sb[key].is_meta and torch.equal(value, sb[key]), (
                f"{name}.{key} differs after the round trip"
            )
    assert np.abs(_images(pipe) - _images(again)).max() < 1e-5


def test_missing_and_unsupported_sources_are_clear_errors(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        load_pipeline(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match="not supported"):
        load_pipeline(str(tmp_path / "other"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        apply_checkpoint(None, tmp_path / "missing_lora")


def test_v_prediction_target_is_velocity():
    """v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 (Salimans & Ho 2022)."""
    from diffusers import DDPMScheduler

    from workbench.train import training_target

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(training_target(sched, x0, eps, t, "v_prediction"), expected, atol=1e-6)
    assert torch.equal(training_target(sched, x0, eps, t, "epsilon"), eps)


def test_export_command_fuses_a_lora_into_a_single_file(tiny_fixtures: dict[str, Path], tmp_path: Path):
    from workbench.config import ModelSection
    from workbench.models import save_lora, setup_training_components

    comps = setup_training_components(ModelSection(source=str(tiny_fixtures["sdxl"])))
    with torch.no_grad():
        for name, p in comps.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_lora(comps.unet, tmp_path / "lora", "sdxl")
    out = tmp_path / "merged.safetensors"
    args = [
        "export",
        str(tiny_fixtures["sdxl"]),
        str(out),
        "--checkpoint",
        str(tmp_path / "lora"),
        "--dtype",
        "fp32",
    ]
    assert cli_main(args) == 2  # a LoRA needs --fuse-lora
    assert cli_main([*args, "--fuse-lora"]) == 0
    merged = load_pipeline(str(out), single_file_config=str(tiny_fixtures["sdxl"]))
    with_lora = apply_checkpoint(load_pipeline(str(tiny_fixtures["sdxl"])), tmp_path / "lora")
    assert np.abs(_images(merged) - _images(with_lora)).max() < 1e-3


@pytest.mark.parametrize("weight_name", ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"])
def test_saved_lora_with_attention_projection_and_ff_targets_reloads_exactly(
    tiny_fixtures: dict[str, Path], tmp_path: Path, weight_name: str
):
    """Both files reproduce the in-memory adapter when LoRA targets more than attention (the toy demo's modules)."""
    from workbench.config import ModelSection
    from workbench.models import save_lora, setup_training_components

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    comps = setup_training_components(
        ModelSection(
            source=str(tiny_fixtures["sdxl"]), lora={"rank": 4, "alpha": 2, "target_modules": targets}
        )
    )
    with torch.no_grad():
        for name, p in comps.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_lora(comps.unet, tmp_path / "lora", "sdxl")
    comps.pipe.unet.eval()
    in_memory = _images(comps.pipe)
    reloaded = apply_checkpoint(load_pipeline(str(tiny_fixtures["sdxl"])), tmp_path / "lora" / weight_name)
    assert np.abs(_images(reloaded) - in_memory).max() < 1e-5
