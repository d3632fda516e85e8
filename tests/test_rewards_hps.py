"""HPSv2/2.1 through the production loader on tiny weights in the HPS ``.pt`` format; parity with hpsv2's math."""

from __future__ import annotations

import argparse

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from rewards_fixtures import hps_checkpoint, hps_resize_max_size, images, tiny_open_clip_arch, workdir

import rewards
from rewards.clip import create_open_clip
from rewards.hps import HPSv2, HPSv21

PROMPTS = ["a cat with two horns on its head", "a red circle", "a cat with two horns on its head"]


def _hps(**options):
    return rewards.build_scorer("hpsv2.1", path=str(hps_checkpoint()), arch=tiny_open_clip_arch(), **options)


def _hpsv2_reference(pil_images: list[Image.Image], prompt: str) -> list[float]:
    """``hpsv2.img_score.score`` (1.2.0) restated: its model (``create_model_and_transforms('ViT-H-14', ...)`` then
    ``load_state_dict(torch.load(cp)['state_dict'])``), ``preprocess_val`` (ToTensor, ResizeMaxSize(224), OpenAI
    Normalize), one image at a time, ``diag(image_features @ text_features.T)`` on L2-normalised features."""
    model = open_clip.create_model(tiny_open_clip_arch(), pretrained=None)
    model.load_state_dict(torch.load(hps_checkpoint(), map_location="cpu", weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(tiny_open_clip_arch())
    preprocess_val = T.Compose(
        [
            T.ToTensor(),
            lambda x: hps_resize_max_size(x, 224),
            T.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    result = []
    for im in pil_images:
        image = preprocess_val(im).unsqueeze(0)
        text = tokenizer([prompt])
        with torch.no_grad():
            out = model(image, text)
            image_features, text_features = out[0], out[1]  # normalised in CLIP.forward
            logits_per_image = image_features @ text_features.T
            result.append(float(torch.diagonal(logits_per_image)[0]))
    return result


def test_hps_matches_hpsv2_formula_on_shared_random_weights():
    x = images(3, 96, 64)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in x]
    ref = _hpsv2_reference(pil, PROMPTS[0])
    ours = _hps()(x, PROMPTS[0])
    torch.testing.assert_close(ours, torch.tensor(ref), atol=1e-5, rtol=0)


def test_benchmark_scale_is_100x_cosine_and_batched_equals_single():
    x = images(3)
    cos = _hps()(x, PROMPTS)
    assert cos.shape == (3,) and cos.abs().max() <= 1
    torch.testing.assert_close(_hps(scale="benchmark")(x, PROMPTS), 100 * cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(_hps(batch_size=1)(x, PROMPTS), cos, atol=1e-6, rtol=0)


def test_text_embeddings_are_cached_once_per_prompt():
    s = _hps()
    s(images(3), PROMPTS)
    assert len(s.text_cache) == 2
    calls = []
    s.text_cache._encode = lambda p: calls.append(p) or torch.zeros(len(p), 16)
    s(images(3), PROMPTS)
    assert calls == []


def test_differentiable_mode_passes_gradients_to_pixels():
    x = images(2).requires_grad_(True)
    _hps(differentiable=True)(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    y = images(2)
    assert not _hps()(y, PROMPTS[:2]).requires_grad


def test_bf16_autocast_stays_close():
    x = images(2)
    torch.testing.assert_close(
        _hps(dtype="bfloat16")(x, PROMPTS[:2]), _hps()(x, PROMPTS[:2]), atol=3e-2, rtol=0
    )


def test_missing_weights_name_the_file_and_option():
    with pytest.raises(ValueError, match=r"HPS_v2\.1_compressed\.pt.*path="):
        rewards.build_scorer("hpsv2.1")
    with pytest.raises(
        ValueError, match=r"/nowhere/HPS_v2_compressed\.pt does not exist.*HPS_v2_compressed\.pt"
    ):
        rewards.build_scorer("hpsv2", path="/nowhere/HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="accepted options"):
        rewards.build_scorer("hpsv2", checkpoint="x.pt")


def test_pickled_objects_are_refused_with_weights_only():
    path = workdir() / "HPS_pickled.pt"
    sd = torch.load(hps_checkpoint(), weights_only=True)["state_dict"]
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        rewards.build_scorer("hpsv2", path=str(path), arch=tiny_open_clip_arch())


def test_registered_versions():
    assert rewards.SCORERS.get("hpsv2") is HPSv2 and rewards.SCORERS.get("hpsv2.1") is HPSv21


def test_full_size_vit_h_14_matches_the_hps_release_architecture_on_meta():
    """The real HPS checkpoints load strictly into hpsv2's vendored open_clip 2.16 ``ViT-H-14``: 686 tensors,
    986,109,441 parameters (research/rewards.md §1.3, §6.1). The loader's architecture must be exactly that."""
    model, tokenizer = create_open_clip("ViT-H-14", None, device="meta")
    sd = model.state_dict()
    assert len(sd) == 686
    assert sum(p.numel() for p in model.parameters()) == 986_109_441
    assert tuple(sd["visual.conv1.weight"].shape) == (1280, 3, 14, 14)
    assert tuple(sd["text_projection"].shape) == (1024, 1024)
    assert tuple(sd["positional_embedding"].shape) == (77, 1024)
    assert "logit_scale" in sd
    assert tokenizer(["a cat"]).shape == (1, 77)
    # the scorer wraps it without allocating
    s = HPSv21(model, tokenizer, device="meta")
    assert s.image_size == 224 and s.resize_mode == "longest_pad"


def test_fp16_checkpoint_loads_into_the_fp32_model():
    """The released ``*_compressed.pt`` files are about half the fp32 size (1.97 GB for 986 M parameters), i.e.
    presumably fp16 tensors; open_clip casts them into the fp32 model on load."""
    sd = torch.load(hps_checkpoint(), weights_only=True)["state_dict"]
    path = workdir() / "HPS_fp16.pt"
    torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}, path)
    half = rewards.build_scorer("hpsv2", path=str(path), arch=tiny_open_clip_arch())
    x = images(2)
    torch.testing.assert_close(half(x, PROMPTS[:2]), _hps()(x, PROMPTS[:2]), atol=5e-3, rtol=0)
