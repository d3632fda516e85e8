"""Tensor preprocessing equals the torchvision ops that HPS and CLIP run (research/rewards.md §1.4)."""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from rewards_fixtures import hps_resize_max_size, images
from torchvision.transforms import InterpolationMode

from rewards.preprocess import OPENAI_MEAN, OPENAI_STD, clip_pixels, resize_longest_pad, resize_shortest_crop


def test_longest_pad_matcheshps_resize_max_size():
    for h, w in [(64, 48), (300, 500), (512, 512), (100, 224)]:
        x = images(2, h, w)
        ours = resize_longest_pad(x, 224)
        ref = torch.stack([hps_resize_max_size(im, 224) for im in x])
        assert ours.shape == (2, 3, 224, 224)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_shortest_crop_matches_torchvision_resize_center_crop():
    for h, w in [(64, 48), (300, 500), (224, 224)]:
        x = images(2, h, w)
        ref = TF.center_crop(TF.resize(x, 224, InterpolationMode.BICUBIC, antialias=True), [224, 224])
        torch.testing.assert_close(resize_shortest_crop(x, 224), ref, atol=1e-5, rtol=0)


def test_clip_pixels_normalises_and_passes_gradients():
    x = images(2, 40, 30).requires_grad_(True)
    out = clip_pixels(x, size=224, mode="longest_pad")
    assert out.shape == (2, 3, 224, 224)
    # the zero padding is black before normalisation: (0 - mean) / std
    torch.testing.assert_close(out[0, :, 0, 0], -torch.tensor(OPENAI_MEAN) / torch.tensor(OPENAI_STD))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
