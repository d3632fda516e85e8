"""Scorer throughput: our resident, batched HPS scorer vs an ``hpsv2.score``-style loop, on the same weights.

Baseline (a faithful re-statement of ``hpsv2.img_score.score`` in hpsv2 1.2.0, tgxs002/HPSv2): every call
``torch.load``s the checkpoint and runs ``load_state_dict``, builds the tokenizer, then scores its images one at a time
(batch size 1) with the PIL/torchvision ``preprocess_val``. One call per (image, prompt) pair, as a per-prompt
evaluation loop uses it. The model object itself is built once (``initialize_model``), as in hpsv2.

Ours: ``rewards.hps.HPSv21.from_pretrained`` loads the checkpoint once; images are scored in batches with the prompt
embeddings cached. The checkpoint is random full-size ``ViT-H-14`` weights saved in the HPS release format
(``{'state_dict': ...}``), so no download is needed; the architecture and tensor sizes are the real ones.

    nice -n 10 .venv/bin/python benchmarks/score_throughput.py                # full size, CPU (a few minutes)
    .venv/bin/python benchmarks/score_throughput.py --arch tiny --images 16   # smoke run (seconds)

Prints images/s for both and the ratio; also the one-off load time of our scorer (not included in its rate).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _arch(name: str, workdir: Path) -> str:
    import open_clip

    if name != "tiny":
        return name
    path = workdir / "Bench-Tiny-ViT.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return "Bench-Tiny-ViT"


RELOAD_SECONDS: list[float] = []


def hpsv2_style_score(
    model, checkpoint: Path, arch: str, pil_images, prompt: str, device: torch.device
) -> list[float]:
    """``hpsv2.img_score.score(img_path=list, prompt, cp=checkpoint)`` without the package (see module docstring)."""
    import open_clip
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    def resize_max_size(
        x: torch.Tensor, max_size: int = 224
    ) -> torch.Tensor:  # hpsv2 ResizeMaxSize on a tensor
        h, w = x.shape[1:]
        scale = max_size / float(max(h, w))
        new = tuple(round(d * scale) for d in (h, w))
        x = TF.resize(x, list(new), T.InterpolationMode.BICUBIC, antialias=True)
        ph, pw = max_size - new[0], max_size - new[1]
        return TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)

    preprocess_val = T.Compose(
        [
            T.ToTensor(),
            resize_max_size,
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    t0 = time.perf_counter()
    state = torch.load(checkpoint, map_location=device, weights_only=True)  # every call, as hpsv2 does
    model.load_state_dict(state["state_dict"])
    del state
    tokenizer = open_clip.get_tokenizer(arch)
    model = model.to(device).eval()
    RELOAD_SECONDS.append(time.perf_counter() - t0)
    result = []
    for im in pil_images:  # one image at a time
        with torch.no_grad():
            image = preprocess_val(im).unsqueeze(0).to(device)
            text = tokenizer([prompt]).to(device)
            out = model(image, text)
            image_features, text_features = out[0], out[1]
            result.append(float(torch.diagonal(image_features @ text_features.T)[0]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", default="ViT-H-14", help="open_clip arch of the random checkpoint ('tiny' for a smoke run)"
    )
    p.add_argument("--images", type=int, default=8, help="images scored by our scorer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--baseline-calls", type=int, default=3, help="hpsv2-style calls (one image each)")
    p.add_argument("--size", type=int, default=512, help="side of the square test images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="autocast dtype of our scorer (float32 | bfloat16)")
    args = p.parse_args()

    import open_clip
    from PIL import Image

    from rewards.hps import HPSv21

    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="score-bench-"))
    arch = _arch(args.arch, workdir)
    ckpt = workdir / "HPS_random.pt"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, ckpt)
    n_params = sum(q.numel() for q in model.parameters())
    del model
    gc.collect()
    print(f"arch {arch}: {n_params / 1e6:.1f} M params, checkpoint {ckpt.stat().st_size / 1e9:.2f} GB "
          f"written in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")  # fmt: skip

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(args.images, 3, args.size, args.size, generator=g) * 255).round() / 255
    prompts = [f"prompt number {i}" for i in range(args.images)]

    # ours: load once, score batched
    t0 = time.perf_counter()
    scorer = HPSv21.from_pretrained(
        str(ckpt), arch=arch, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        scorer(images[:1], prompts[:1])  # warm-up (first-call allocations)
        scorer.text_cache.clear()
        t0 = time.perf_counter()
        ours = scorer(images, prompts)
        ours_s = time.perf_counter() - t0
    ours_rate = args.images / ours_s
    print(f"ours:     {ours_rate:8.3f} images/s  ({args.images} images, batch {args.batch_size}, {ours_s:.1f} s; "
          f"one-off load {load_s:.1f} s)")  # fmt: skip

    # baseline: reuse the same model object as hpsv2's resident model (its weights are overwritten on every call)
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    n = min(args.baseline_calls, args.images)
    t0 = time.perf_counter()
    base = []
    for i in range(n):
        base += hpsv2_style_score(scorer.model, ckpt, arch, [pil[i]], prompts[i], device)
    base_s = time.perf_counter() - t0
    base_rate = n / base_s
    reload_s = sum(RELOAD_SECONDS) / len(RELOAD_SECONDS)
    print(f"baseline: {base_rate:8.3f} images/s  ({n} calls x 1 image, {base_s:.1f} s; of each call "
          f"{reload_s:.1f} s reload, {base_s / n - reload_s:.1f} s scoring)")  # fmt: skip
    diff = (ours[:n].cpu() - torch.tensor(base)).abs().max().item()
    print(f"max |score difference| on the shared images: {diff:.2e}")
    print(f"ratio ours / baseline: {ours_rate / base_rate:.1f}x")
    os.remove(ckpt)


if __name__ == "__main__":
    main()
