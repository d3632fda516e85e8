"""PickScore through ``CLIPModel``/``AutoProcessor.from_pretrained`` on a tiny ``save_pretrained`` folder."""

from __future__ import annotations

import functools

import pytest
import torch
from rewards_fixtures import images, pickscore_folder, tiny_hf_clip_config
from transformers.modeling_outputs import BaseModelOutputWithPooling

import rewards
from rewards.pickscore import PickScore, _embedding
from rewards.preprocess import clip_pixels

PROMPTS = ["a cat", "a dog", "a cat", "a cat", "a dog"]


@functools.cache
def _pickscore() -> PickScore:
    s = rewards.build_scorer("pickscore", path=str(pickscore_folder()), device="cpu")
    assert isinstance(s, PickScore)
    return s


def test_pickscore_is_logit_scale_exp_times_cosine_as_the_model_computes_it():
    s = _pickscore()
    x = images(5)
    ours = s(x, PROMPTS)
    model = s.model
    tok = s.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = clip_pixels(x, size=224, mode="shortest_crop")
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    # CLIPModel.forward: logits_per_image = exp(logit_scale) * img_n @ txt_n.T; PickScore is its diagonal
    torch.testing.assert_close(ours, out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-5)


def test_probabilities_sum_to_one_per_prompt():
    p = _pickscore().probabilities(images(5), PROMPTS)
    assert p.shape == (5,) and (p > 0).all()
    torch.testing.assert_close(p[[0, 2, 3]].sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[[1, 4]].sum(), torch.tensor(1.0))


def test_transformers_5_feature_outputs_are_unwrapped():
    t = torch.randn(2, 4)
    assert _embedding(t) is t
    assert (
        _embedding(BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 3, 8), pooler_output=t)) is t
    )
    # and the installed transformers really returns an output object or a tensor we handle
    s = _pickscore()
    raw = s.model.get_image_features(pixel_values=torch.zeros(1, 3, 224, 224))
    assert _embedding(raw).shape == (1, 16)


def test_differentiable_mode_and_missing_weights():
    s = PickScore(_pickscore().model, _pickscore().tokenizer, differentiable=True)
    x = images(2).requires_grad_(True)
    s(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"PickScore_v1.*path="):
        rewards.build_scorer("pickscore")
    with pytest.raises(ValueError, match="PickScore weights not found at '/nowhere/PickScore_v1'"):
        rewards.build_scorer("pickscore", path="/nowhere/PickScore_v1")


def test_full_size_pickscore_clip_h_on_meta_has_the_released_size():
    """PickScore_v1 is CLIP-H/14 (3.94 GB fp32): the transformers config below has 986,109,441 parameters, the same
    as open_clip ViT-H-14 (research/rewards.md §2.1), and our tiny config differs only in sizes."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        projection_dim=1024,
        text_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        vision_config={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "hidden_act": "gelu",
        },
    )
    cfg.text_config.hidden_act = "gelu"
    with torch.device("meta"):
        model = CLIPModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == 986_109_441
    tiny_keys = set(CLIPModel(tiny_hf_clip_config()).state_dict())
    assert set(model.state_dict()) - tiny_keys == {
        k for k in model.state_dict() if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= 2
    }
