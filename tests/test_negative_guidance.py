"""Inference with a negative model (samplers.guidance): routing of the CFG halves, the weight merge, guidance off."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from samplers import SamplingConfig, sample, with_sampler
from samplers.guidance import (
    NegativeGuidanceUNet,
    merge_negative_state,
    negative_guidance_pipeline,
)

PROMPTS, SEEDS = ["a red circle", "a blue square"], [0, 1]
FAST = SamplingConfig(steps=2, guidance=5.0)
LAYER = "attn1.to_q"  # the layer whose merged weight is checked


@pytest.fixture(scope="module")
def toy() -> Any:
    from workbench.toy.model import load_toy_pipeline

    return load_toy_pipeline()


@pytest.fixture()
def base(toy: Any) -> Any:
    """A fresh base pipeline (its own UNet copy: LoRA adapters get loaded into it), sharing the toy's encoders."""
    return with_sampler(toy, "euler", unet=copy.deepcopy(toy.unet))


def _layer_name(unet: nn.Module) -> str:
    return next(n for n, _ in unet.named_modules() if n.endswith(LAYER))


def _write_lora(unet: nn.Module, directory: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A random-B LoRA (rank 2, alpha 4: scale 2) saved by the trainer's save_lora; returns (A, B, scale) of LAYER."""
    from workbench.models import add_lora, save_lora

    u = copy.deepcopy(unet)
    add_lora(
        u, rank=2, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"], dropout=0.0, init="default"
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in u.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora(u, directory, "sdxl")
    layer: Any = u.get_submodule(_layer_name(unet))
    return (
        layer.lora_A["default"].weight.detach().clone(),
        layer.lora_B["default"].weight.detach().clone(),
        2.0,
    )


def _write_full(unet: nn.Module, directory: Path, seed: int) -> dict[str, torch.Tensor]:
    u: Any = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    u.save_pretrained(str(directory))
    return {k: v.detach().clone() for k, v in u.state_dict().items()}


def _weight(unet: nn.Module, name: str) -> torch.Tensor:
    """Effective weight of a (possibly peft-wrapped) bias-free Linear, read off its forward: layer(I) = I @ W^T."""
    layer = unet.get_submodule(name)
    base_layer: Any = getattr(layer, "base_layer", layer)
    eye = torch.eye(base_layer.in_features)
    with torch.no_grad():
        return layer(eye).T


# ------------------------------------------------------------------------------------------------ CFG equivalence
def test_negative_equal_to_positive_reproduces_plain_cfg_bit_for_bit(toy: Any) -> None:
    plain = sample(with_sampler(toy, "euler"), PROMPTS, SEEDS, FAST)
    wrapper = NegativeGuidanceUNet(toy.unet, toy.unet)
    guided = sample(with_sampler(toy, "euler", unet=wrapper), PROMPTS, SEEDS, FAST)
    assert torch.equal(plain, guided)
    assert wrapper.calls == {"positive": FAST.steps, "negative": FAST.steps}
    # a distinct copy of the positive UNet: two half-batch calls, equal up to batched-kernel round-off only
    split = NegativeGuidanceUNet(toy.unet, copy.deepcopy(toy.unet))
    torch.testing.assert_close(
        sample(with_sampler(toy, "euler", unet=split), PROMPTS, SEEDS, FAST), plain, atol=1e-4, rtol=0
    )
    assert split.calls == {"positive": FAST.steps, "negative": FAST.steps}


# ---------------------------------------------------------------------------------------------------- routing
class _Recorder(nn.Module):
    """Records the inputs of each call and answers ``sample * 0 + tag`` (so the output order is visible)."""

    def __init__(self, tag: float) -> None:
        super().__init__()
        self.tag = tag
        self.config = {"tag": tag}
        self.seen: list[dict[str, Any]] = []

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        self.seen.append({"sample": sample, "timestep": timestep, **kwargs})
        return (sample * 0 + self.tag,)


def test_uncond_half_goes_to_the_negative_model_and_cond_half_to_the_positive() -> None:
    pos, neg = _Recorder(1.0), _Recorder(-1.0)
    wrapper = NegativeGuidanceUNet(pos, neg)
    wrapper.guided = True
    b = 2  # prompts; the UNet batch is [uncond b; cond b]
    latents = torch.randn(b, 4, 8, 8)
    ehs = torch.arange(2 * b, dtype=torch.float32).view(2 * b, 1, 1).expand(2 * b, 3, 5)
    text_embeds = torch.arange(2 * b, dtype=torch.float32).view(2 * b, 1) + 100
    time_ids = torch.arange(2 * b, dtype=torch.float32).view(2 * b, 1).repeat(1, 6) + 200
    timesteps = torch.tensor([10.0, 11.0, 12.0, 13.0])
    scale_only = torch.ones(3)  # not batch-sized: given whole to both
    out = wrapper(
        torch.cat([latents] * 2),
        timesteps,
        encoder_hidden_states=ehs,
        timestep_cond=scale_only,
        cross_attention_kwargs=None,
        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
        return_dict=False,
    )
    assert isinstance(out, tuple) and len(out) == 1
    assert torch.equal(
        out[0][:b], torch.full_like(latents, -1.0)
    )  # uncond slot answered by the negative model
    assert torch.equal(out[0][b:], torch.full_like(latents, 1.0))
    (n,), (p,) = neg.seen, pos.seen
    for seen, rows in ((n, slice(0, b)), (p, slice(b, 2 * b))):
        assert torch.equal(seen["sample"], latents)
        assert torch.equal(seen["timestep"], timesteps[rows])
        assert torch.equal(seen["encoder_hidden_states"], ehs[rows])
        assert torch.equal(seen["added_cond_kwargs"]["text_embeds"], text_embeds[rows])
        assert torch.equal(seen["added_cond_kwargs"]["time_ids"], time_ids[rows])
        assert seen["timestep_cond"] is scale_only and seen["cross_attention_kwargs"] is None
        assert seen["return_dict"] is False
    # a scalar timestep goes whole to both; return_dict=True gives a UNet output; attributes are the positive's
    res = wrapper(torch.cat([latents] * 2), 5, encoder_hidden_states=ehs)
    assert res.sample.shape == (2 * b, 4, 8, 8) and neg.seen[-1]["timestep"] == 5
    assert wrapper.config == {"tag": 1.0}


def test_sdxl_pipeline_halves_reach_the_right_unet(toy: Any) -> None:
    """Through the real SDXL pipeline: negative-prompt embeddings and pooled embeds go to the negative UNet, and
    the wrapper's output is exactly cat(negative(uncond half), positive(cond half))."""
    seen: dict[str, list[dict[str, Any]]] = {"pos": [], "neg": []}

    def recording(unet: nn.Module, key: str) -> nn.Module:
        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            seen[key].append(kwargs)

        unet.register_forward_pre_hook(hook, with_kwargs=True)
        return unet

    pos_unet = recording(copy.deepcopy(toy.unet), "pos")
    neg_unet = copy.deepcopy(toy.unet)
    with torch.no_grad():
        for p in neg_unet.parameters():
            p.mul_(1.01)
    recording(neg_unet, "neg")
    pipe = with_sampler(toy, "euler", unet=NegativeGuidanceUNet(pos_unet, neg_unet))
    cfg = SamplingConfig(steps=2, guidance=5.0, negative_prompt="green")
    sample(pipe, PROMPTS, SEEDS, cfg)
    emb, neg_emb, pooled, neg_pooled = toy.encode_prompt(
        PROMPTS, negative_prompt=["green"] * 2, do_classifier_free_guidance=True
    )
    assert len(seen["pos"]) == len(seen["neg"]) == cfg.steps
    for kw in seen["neg"]:
        assert torch.equal(kw["encoder_hidden_states"], neg_emb)
        assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], neg_pooled)
        assert kw["added_cond_kwargs"]["time_ids"].shape[0] == len(PROMPTS)
    for kw in seen["pos"]:
        assert torch.equal(kw["encoder_hidden_states"], emb)
        assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], pooled)
    # UNet level: exactly the two models' outputs on their halves, in order
    wrapper = NegativeGuidanceUNet(pos_unet, neg_unet)
    wrapper.guided = True
    x = torch.randn(2, 4, 4, 4)
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32], [32.0, 32, 0, 0, 32, 32]])
    cond = {"text_embeds": pooled, "time_ids": ids}
    uncond = {"text_embeds": neg_pooled, "time_ids": ids}
    with torch.no_grad():
        both = wrapper(
            torch.cat([x, x]),
            torch.tensor(500),
            encoder_hidden_states=torch.cat([neg_emb, emb]),
            added_cond_kwargs={k: torch.cat([uncond[k], cond[k]]) for k in cond},
        ).sample
        expect = torch.cat(
            [
                neg_unet(x, 500, encoder_hidden_states=neg_emb, added_cond_kwargs=uncond).sample,
                pos_unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample,
            ]
        )
    assert torch.equal(both, expect)


# ------------------------------------------------------------------------------------------------- weight merges
def test_merge_formula_on_known_tensors() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    npo = {"w": torch.tensor([0.1, -0.1])}  # delta_npo (no entry: zero delta)
    pos = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}  # theta_pos - theta_base
    out = merge_negative_state(base, npo, pos, 0.25)
    torch.testing.assert_close(out["w"], torch.tensor([1.0 + 0.1 + 0.75, 2.0 - 0.1 + 0.75]))
    torch.testing.assert_close(out["b"], torch.tensor([0.5 + 0.75 * 2.0]))


@pytest.mark.parametrize("with_positive", [False, True])
def test_lora_merge_uses_one_unet_and_equals_the_formula(
    base: Any, tmp_path: Path, with_positive: bool
) -> None:
    name = _layer_name(base.unet)
    w0 = base.unet.get_submodule(name).weight.detach().clone()
    a_n, b_n, s = _write_lora(base.unet, tmp_path / "npo", seed=1)
    a_p, b_p, _ = _write_lora(base.unet, tmp_path / "pos", seed=2)
    m = 0.3
    pipe = negative_guidance_pipeline(
        base, negative=tmp_path / "npo", positive=tmp_path / "pos" if with_positive else None, merge=m
    )
    wrapper = pipe.unet
    assert isinstance(wrapper, NegativeGuidanceUNet) and wrapper.shared and wrapper.positive is base.unet
    pos_delta = s * b_p @ a_p if with_positive else torch.zeros_like(w0)
    assert wrapper.before_negative is not None and wrapper.before_positive is not None
    wrapper.before_negative()
    torch.testing.assert_close(_weight(base.unet, name), w0 + s * b_n @ a_n + (1 - m) * pos_delta)
    wrapper.before_positive()
    torch.testing.assert_close(_weight(base.unet, name), w0 + pos_delta)
    images = sample(pipe, PROMPTS, SEEDS, FAST)
    assert images.shape == (2, 3, 32, 32) and wrapper.calls["negative"] == FAST.steps
    torch.testing.assert_close(_weight(base.unet, name), w0 + pos_delta)  # positive state left active


def test_full_checkpoints_merge_by_state_dict_arithmetic(base: Any, tmp_path: Path) -> None:
    theta_base = {k: v.detach().clone() for k, v in base.unet.state_dict().items()}
    theta_pos = _write_full(base.unet, tmp_path / "pos", seed=3)
    theta_npo = _write_full(base.unet, tmp_path / "npo", seed=4)
    m = 0.4
    pipe = negative_guidance_pipeline(base, negative=tmp_path / "npo", positive=tmp_path / "pos", merge=m)
    wrapper = pipe.unet
    assert isinstance(wrapper, NegativeGuidanceUNet) and not wrapper.shared
    neg, pos = wrapper.negative.state_dict(), wrapper.positive.state_dict()
    for k, b in theta_base.items():
        torch.testing.assert_close(neg[k], theta_npo[k] + (1 - m) * (theta_pos[k] - b))
        assert torch.equal(pos[k], theta_pos[k])
        assert torch.equal(base.unet.state_dict()[k], b)  # the base is untouched


def test_mixed_lora_and_full_checkpoints_follow_the_formula(base: Any, tmp_path: Path) -> None:
    name = _layer_name(base.unet)
    key = f"{name}.weight"
    theta_base = {k: v.detach().clone() for k, v in base.unet.state_dict().items()}
    a, b, s = _write_lora(base.unet, tmp_path / "lora", seed=5)
    theta_full = _write_full(base.unet, tmp_path / "full", seed=6)
    m = 0.2
    # positive LoRA (kept as an adapter on the base UNet), NPO full: a second UNet
    fresh = with_sampler(base, "euler", unet=copy.deepcopy(base.unet))
    pipe = negative_guidance_pipeline(
        fresh, negative=tmp_path / "full", positive=tmp_path / "lora" / "lora_kohya.safetensors", merge=m
    )
    neg = pipe.unet.negative.state_dict()
    torch.testing.assert_close(neg[key], theta_full[key] + (1 - m) * s * b @ a)
    other = next(k for k in theta_base if "lora" not in k and k != key)
    torch.testing.assert_close(neg[other], theta_full[other])
    torch.testing.assert_close(_weight(pipe.unet.positive, name), theta_base[key] + s * b @ a)
    # positive full, NPO LoRA
    pipe = negative_guidance_pipeline(base, negative=tmp_path / "lora", positive=tmp_path / "full", merge=m)
    neg = pipe.unet.negative.state_dict()
    assert not any("lora" in k for k in neg)
    expect = theta_base[key] + s * b @ a + (1 - m) * (theta_full[key] - theta_base[key])
    torch.testing.assert_close(neg[key], expect)
    torch.testing.assert_close(
        neg[other], theta_base[other] + (1 - m) * (theta_full[other] - theta_base[other])
    )
    assert sample(pipe, PROMPTS[:1], SEEDS[:1], FAST).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------- guidance off
@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_guidance_off_never_calls_the_negative_model(base: Any, tmp_path: Path, guidance: float) -> None:
    cfg = SamplingConfig(steps=2, guidance=guidance)
    plain = sample(with_sampler(base, "euler"), PROMPTS, SEEDS, cfg)
    _write_lora(base.unet, tmp_path / "npo", seed=7)
    pipe = negative_guidance_pipeline(base, negative=tmp_path / "npo")
    switched: list[int] = []
    wrapper = pipe.unet
    to_negative = wrapper.before_negative
    assert to_negative is not None
    wrapper.before_negative = lambda: (switched.append(1), to_negative())[1]
    images = sample(pipe, PROMPTS, SEEDS, cfg)
    assert wrapper.calls == {"positive": cfg.steps, "negative": 0} and not switched
    assert torch.equal(images, plain)  # all of it is the positive (= base) model
    # a batch whose halves are identical (one prompt and seed twice) is still not taken for [uncond; cond], also
    # after with_sampler (what generate/eval do with a loaded pipeline): the pipeline tells the wrapper
    again = with_sampler(pipe, "ddim")
    assert again.unet is wrapper
    sample(again, ["a red circle"] * 2, [0, 0], SamplingConfig(sampler="ddim", steps=2, guidance=guidance))
    assert wrapper.calls["negative"] == 0 and not switched
    # the same pipeline with guidance on does use the negative model, and it changes the images
    guided = sample(pipe, PROMPTS, SEEDS, FAST)
    assert wrapper.calls["negative"] == FAST.steps and len(switched) == FAST.steps
    assert not torch.allclose(guided, sample(with_sampler(base, "euler"), PROMPTS, SEEDS, FAST), atol=1e-3)


# -------------------------------------------------------------------------------------------- the CLI wiring
def test_checkpoint_specs_carry_a_negative_model(toy: Any, tmp_path: Path) -> None:
    from samplers.checkpoints import model_id, parse_checkpoints, with_negative

    _write_lora(toy.unet, tmp_path / "npo", seed=3)
    npo = str(tmp_path / "npo")
    ckpts = parse_checkpoints(["base", f"cfg_npo=base,negative={npo},merge=0.5"])
    assert [(c.name, c.path, c.negative, c.negative_merge) for c in ckpts] == [
        ("base", None, None, 0.0),
        ("cfg_npo", None, npo, 0.5),
    ]
    assert model_id(str(tmp_path), ckpts[0], dtype="fp32", device="cpu") != model_id(
        str(tmp_path), ckpts[1], dtype="fp32", device="cpu"
    )  # NPO-CFG images never come from plain CFG's cache entries
    twins = with_negative(parse_checkpoints(["base"]), npo, 0.25)
    assert [(c.name, c.negative_merge) for c in twins] == [("base", 0.0), ("base+npo", 0.25)]
    with pytest.raises(ValueError, match=r"merge=2.0 is outside \[0, 1\]"):
        parse_checkpoints([f"x=base,negative={npo},merge=2"])


def test_eval_compares_plain_and_npo_cfg_on_identical_noise(tmp_path: Path) -> None:
    """`workbench eval --negative NPO`: base and base+npo rendered from the same (prompt, seed) noise; the NPO LoRA
    changes only the unconditional branch, so the images differ but the comparison is paired."""
    import json

    from workbench.cli import main
    from workbench.toy.model import load_toy_pipeline

    _write_lora(load_toy_pipeline().unet, tmp_path / "npo", seed=4)
    args = ["eval", "--base", "toy", "--negative", str(tmp_path / "npo"), "--prompts", "toy:heldout"]
    args += [
        "--max-prompts",
        "2",
        "--seeds",
        "0",
        "--steps",
        "2",
        "-s",
        "toy/centering",
        "-o",
        str(tmp_path / "ev"),
    ]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(report["means"]) == {"base", "base+npo"}
    dirs = sorted(d for d in (tmp_path / "ev" / "images").iterdir() if d.is_dir())
    assert len(dirs) == 2  # base and base+npo (folder names slugged)
    a, b = ([p.read_bytes() for p in sorted(d.glob("*.png"))] for d in dirs)
    assert len(a) == len(b) == 2 and a != b


def test_checkpoint_identity_is_unchanged_without_a_negative() -> None:
    """Synth plans written before negative guidance existed still match (they stored only name and path)."""
    from samplers.checkpoints import Checkpoint

    assert Checkpoint("x", "runs/a").identity() == {"name": "x", "path": "runs/a"}
    assert Checkpoint("y", None, "runs/npo", 0.5).identity()["negative_merge"] == 0.5


# ------------------------------------------------------------------------------- an in-memory positive (validation)
@pytest.mark.parametrize("merge", [0.0, 0.25])
def test_negative_for_an_in_memory_lora_policy_follows_the_formula(
    base: Any, tmp_path: Path, merge: float
) -> None:
    """Training validation's negative: theta_neg = theta_base + delta_npo + (1 - m) delta_pos with the positive a
    LoRA-carrying UNet in memory (the policy); with positive_is_base the positive delta is left out."""
    from samplers.guidance import base_state, negative_unet_for
    from workbench.models import add_lora

    a_n, b_n, s_n = _write_lora(base.unet, tmp_path / "npo", seed=1)
    policy: Any = copy.deepcopy(base.unet)
    add_lora(
        policy, rank=2, alpha=2.0, target_modules=["to_q", "to_k"], dropout=0.0, init="default"
    )  # scale 1
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    layer = _layer_name(base.unet)
    lora: Any = policy.get_submodule(layer)
    delta_pos = lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    theta = _weight(base.unet, layer)
    wrapper = negative_unet_for(policy, base_state(policy), tmp_path / "npo", merge, pipe=base)
    expected = theta + s_n * (b_n @ a_n) + (1 - merge) * delta_pos
    assert torch.allclose(_weight(wrapper.negative_model, layer), expected, atol=1e-5)
    assert wrapper.positive is policy and not any(p.is_meta for p in wrapper.negative_model.parameters())
    as_base = negative_unet_for(
        policy, base_state(policy), tmp_path / "npo", merge, pipe=base, positive_is_base=True
    )
    assert torch.allclose(_weight(as_base.negative_model, layer), theta + s_n * (b_n @ a_n), atol=1e-5)
    assert torch.equal(_weight(base.unet, layer), theta)  # nothing wrote the base weights


def test_training_validation_renders_with_a_negative_model(workdir: Path) -> None:
    """validation.negative: both validation rows render under negative-model guidance (a LoRA checkpoint in the
    unconditional branch: here the first run's own LoRA, standing in for an NPO model), so both rows differ from
    plain CFG's from identical noise; validation reports no error."""
    from workbench.config import load_config
    from workbench.train import Trainer

    root = Path(__file__).parents[1]

    def run(name: str, *extra: str) -> Trainer:
        cfg = load_config(
            root / "configs/tiny/sdxl_dpo_lora.yaml",
            [
                "logging.tensorboard=false",
                f"run.name={name}",
                "train.max_steps=1",
                "optimizer.lr=0.05",  # a LoRA far enough from zero to change the images
                "validation.prompts=[a red square]",
                "validation.seeds=[0]",
                "validation.num_inference_steps=2",
                *extra,
            ],
        )
        trainer = Trainer(cfg, show_progress=False)
        trainer.setup()
        trainer.train()
        assert not trainer.validator.errors, trainer.validator.errors
        return trainer

    plain = run("val_plain")
    guided = run("val_npo", f"validation.negative={plain.run_dir / 'final'}", "validation.negative_merge=0.5")
    assert plain.validator.base is not None and guided.validator.base is not None
    assert not torch.allclose(plain.validator.base, guided.validator.base, atol=1e-3)
    assert (guided.run_dir / "validation" / "step_000001.png").is_file()


def test_the_app_renders_a_checkpoint_with_a_negative_model(toy: Any, tmp_path: Path) -> None:
    """The app's checkpoint list takes the same NAME=PATH,negative=NPO spec as generate / eval: its renderer loads a
    negative-guidance pipeline for it, and its images differ from plain CFG's on identical noise."""
    from apps.handlers import PipelineRenderer
    from samplers import parse_checkpoints

    _write_lora(toy.unet, tmp_path / "npo", seed=4)
    renderer = PipelineRenderer(
        "toy",
        parse_checkpoints(["base", f"npo=base,negative={tmp_path / 'npo'}"]),
        device="cpu",
        dtype="fp32",
        cache_dir=str(tmp_path / "cache"),
    )
    plain = renderer.render("base", PROMPTS[:1], SEEDS[:1], FAST)
    guided = renderer.render("npo", PROMPTS[:1], SEEDS[:1], FAST)
    assert isinstance(renderer._load("npo").unet, NegativeGuidanceUNet)
    assert renderer.identity("npo")["model_id"] != renderer.identity("base")["model_id"]
    assert plain[0].shape == guided[0].shape and (plain[0] != guided[0]).any()
