"""CLIP score and the LAION aesthetic predictor through the production loaders (open_clip folder / file formats)."""

from __future__ import annotations

import pytest
import torch
from rewards_fixtures import hps_checkpoint, images, open_clip_folder, tiny_open_clip_arch, workdir

import rewards
from rewards.aesthetic import AestheticMLP, AestheticScorer
from rewards.clip import create_open_clip


def _clip(**options):
    return rewards.build_scorer(
        "clipscore", arch=f"local-dir:{open_clip_folder()}", pretrained=None, **options
    )


def test_clipscore_from_open_clip_folder_is_100_cos_clamped():
    x = images(4)
    prompts = ["a cat", "a dog", "a red circle", "a cat"]
    s = _clip(clamp=False)
    raw = s(x, prompts)
    torch.testing.assert_close(raw, 100 * s.cosine(x, prompts))
    torch.testing.assert_close(_clip()(x, prompts), raw.clamp_min(0))
    assert s.resize_mode == "shortest_crop"  # from the folder's preprocess_cfg


def test_clipscore_from_checkpoint_file_and_arch_name():
    s = rewards.build_scorer("clipscore", arch=tiny_open_clip_arch(), pretrained=str(hps_checkpoint()))
    assert s(images(2), "a cat").shape == (2,)


def test_clipscore_needs_weights_and_offline_tags_fail_clearly():
    with pytest.raises(ValueError, match=r"pretrained="):
        rewards.build_scorer("clipscore", pretrained=None)
    with pytest.raises(ValueError, match=r"no open_clip_config\.json"):
        rewards.build_scorer("clipscore", arch=f"local-dir:{workdir()}", pretrained=None)
    with pytest.raises(ValueError, match="file not found"):
        rewards.build_scorer("clipscore", pretrained="/nowhere/clip.pt")


def _aesthetic_mlp_path(input_size: int = 16):
    torch.manual_seed(0)
    mlp = AestheticMLP(input_size)
    path = workdir() / f"aesthetic-{input_size}.pth"
    torch.save(mlp.state_dict(), path)
    return path, mlp


def test_aesthetic_mlp_has_the_released_key_layout():
    keys = set(AestheticMLP(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_aesthetic_scores_mlp_of_normalised_clip_embedding_and_ignores_prompt():
    path, mlp = _aesthetic_mlp_path()
    s = rewards.build_scorer(
        "aesthetic", path=str(path), clip_arch=f"local-dir:{open_clip_folder()}", clip_pretrained=None
    )
    assert isinstance(s, AestheticScorer) and not s.needs_prompt
    x = images(3)
    out = s(x, ["a", "b", "c"])
    emb = s.encode_images(x)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(out, mlp.eval()(emb))
    torch.testing.assert_close(s(x, ["x", "y", "z"]), out)


def test_aesthetic_refuses_mismatched_mlp_and_missing_file():
    path, _ = _aesthetic_mlp_path(768)  # released size, but the tiny backbone has 16-d embeddings
    with pytest.raises(ValueError, match="not a LAION aesthetic v2 MLP for 16-d"):
        rewards.build_scorer(
            "aesthetic", path=str(path), clip_arch=f"local-dir:{open_clip_folder()}", clip_pretrained=None
        )
    with pytest.raises(ValueError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        rewards.build_scorer("aesthetic")


def test_full_size_openai_vit_l_14_on_meta_feeds_the_768_d_aesthetic_mlp():
    """OpenAI CLIP ViT-L/14 (open_clip ``ViT-L-14-quickgelu``): 427,616,513 parameters, 768-d embedding."""
    model, _ = create_open_clip("ViT-L-14-quickgelu", None, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 427_616_513
    assert tuple(model.text_projection.shape) == (768, 768)
    assert tuple(model.visual.proj.shape) == (1024, 768)
    assert AestheticMLP(768).layers[0].in_features == model.text_projection.shape[1]
