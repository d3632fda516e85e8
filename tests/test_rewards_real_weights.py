"""Golden values on real weights: opt-in (``-m slow``), skipped unless ``REWARD_WEIGHTS_DIR`` holds the files.

Expected values are published ones (research/rewards.md §6.5): HPS v2.0 gives 0.2876 on hpsv2's demo image
(``hpsv2/assets/demo_image.jpg`` in the hpsv2 wheel) with the prompt "A cat with two horns on its head"
(tgxs002/HPSv2 issue #27); the tolerance covers preprocessing and torchvision-version differences.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards

pytestmark = pytest.mark.slow
WEIGHTS = Path(os.environ.get("REWARD_WEIGHTS_DIR", "/nonexistent"))


def _need(*names: str) -> list[Path]:
    paths = [WEIGHTS / n for n in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"REWARD_WEIGHTS_DIR lacks {', '.join(missing)}")
    return paths


def _load(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def test_hpsv2_demo_image_golden_value():
    ckpt, image = _need("HPS_v2_compressed.pt", "demo_image.jpg")
    hps = rewards.build_scorer("hpsv2", path=str(ckpt), dtype="float32")
    score = float(hps(_load(image), "A cat with two horns on its head"))
    assert score == pytest.approx(0.2876, abs=2e-3)


def test_pickscore_prefers_matching_prompt():
    (model,) = _need("PickScore_v1")
    (image,) = _need("demo_image.jpg")
    ps = rewards.build_scorer("pickscore", path=str(model))
    s = ps(_load(image).repeat(2, 1, 1, 1), ["A cat with two horns on its head", "a bowl of soup"])
    assert s[0] > s[1]
