"""Same-seed validation during training: fixed prompts x seeds, base beside tuned, optional scorers.

Images come from the one renderer, :func:`samplers.sample`, with the samplers' noise rule (one generator per
``(prompt, seed)``, :mod:`samplers.noise`), so a validation grid shows exactly the images ``workbench generate`` and
``workbench eval`` make for that (prompt, seed) with the same sampler and steps. The policy renders in the dtype it
trains in (under the run's autocast); components of other dtypes (a bf16 reference, an fp16 VAE, bf16 text encoders)
are matched by :func:`samplers.generate.matched_dtypes`.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from workbench.config import ValidationSection


class Validator:
    """Renders and records validation images for a run; the base row is rendered once and reused."""

    def __init__(
        self,
        vcfg: ValidationSection,
        *,
        pipe: Any,
        resolution: int,
        autocast: Any,
        out_dir: Path,
        scorers: dict[str, Any],
        base_weights: Callable[[], Any] | None = None,
    ) -> None:
        self.vcfg, self.pipe, self.resolution, self.autocast = vcfg, pipe, resolution, autocast
        self.out_dir, self.scorers = out_dir, scorers
        self.base_weights = base_weights  # () -> theta_base (a state dict): negative-model guidance needs it
        self.items = [(p, s) for p in vcfg.prompts for s in vcfg.seeds]
        self.base: torch.Tensor | None = None
        self.errors: list[str] = []

    @property
    def enabled(self) -> bool:
        return bool(self.items)

    @torch.no_grad()
    def render(self, unet: Any, *, is_base: bool = False) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1], one image per validation item, drawn with ``unet`` in place of the UNet; with
        ``validation.negative``, under negative-model guidance (``unet`` in the conditional branch, the merged
        negative model in the unconditional one; ``is_base``: ``unet`` renders the base weights)."""
        from samplers import SamplingConfig, sample, with_sampler
        from samplers.guidance import guided_view, negative_unet_for

        vcfg = self.vcfg
        cfg = SamplingConfig(
            sampler=vcfg.sampler,
            steps=vcfg.num_inference_steps,
            guidance=vcfg.guidance_scale,
            height=self.resolution,
            width=self.resolution,
        )
        if vcfg.negative is None:
            view = with_sampler(self.pipe, vcfg.sampler, unet=unet)
        else:
            if self.base_weights is None:
                raise ValueError(
                    "validation.negative needs the base weights, which this run does not keep (a full fine-tune "
                    "whose reference is not the base); drop validation.negative or use a LoRA run"
                )
            wrapper = negative_unet_for(
                unet,
                self.base_weights(),
                vcfg.negative,
                vcfg.negative_merge,
                pipe=self.pipe,
                sampler=vcfg.sampler,
                positive_is_base=is_base,
            )
            view = guided_view(self.pipe, wrapper, vcfg.sampler)
        was_training = unet.training
        unet.eval()
        try:
            with self.autocast():
                return sample(view, [p for p, _ in self.items], [s for _, s in self.items], cfg)
        finally:
            unet.train(was_training)

    def render_base(self, base_unet: Any) -> None:
        if self.enabled and self.base is None:
            self.base = self.render(base_unet, is_base=True)

    def run(
        self, step: int, policy_unet: Any, base: Callable[[], AbstractContextManager[Any]] | None = None
    ) -> dict[str, Any] | None:
        """Render the tuned row (and the base row, once, from the UNet that ``base()`` yields when given: a reference's
        ``as_unet``), save the grid, score both.
        Returns the metrics record, or None when validation is off. Never raises: a failure is reported, kept in
        ``errors`` and in the record, and training goes on (the step's checkpoint is already saved)."""
        if not self.enabled:
            return None
        try:
            if base is not None and self.base is None:
                with base() as base_unet:
                    self.render_base(base_unet)
            tuned = self.render(policy_unet)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            labels = [f"{p[:24]} s{s}" for p, s in self.items]
            side_by_side_grid(self.base, tuned, labels).save(self.out_dir / f"step_{step:06d}.png")
            record: dict[str, Any] = {"step": step}
            prompts = [p for p, _ in self.items]
            for name, scorer in self.scorers.items():
                record[f"reward/{name}"] = float(scorer(tuned, prompts).float().mean())
                if self.base is not None:
                    record[f"reward_base/{name}"] = float(scorer(self.base, prompts).float().mean())
            return record
        except Exception as exc:  # a validation failure must never cost the run
            message = f"validation at step {step} failed: {type(exc).__name__}: {exc}"
            self.errors.append(message)
            print(f"[train] {message}; training continues\n{traceback.format_exc()}", file=sys.stderr)
            return {"step": step, "validation/error": message}


def side_by_side_grid(base: torch.Tensor | None, tuned: torch.Tensor, labels: list[str]) -> Any:
    """Two rows, base on top and tuned below (only the tuned row when no base is available), one column per
    (prompt, seed); labels under each column. Images ``[N, 3, H, W]`` in [0, 1]."""
    from PIL import Image, ImageDraw

    from samplers import to_uint8

    rows = [to_uint8(tuned)] if base is None else [to_uint8(base), to_uint8(tuned)]
    n, h, w = rows[0].shape[0], rows[0].shape[1], rows[0].shape[2]
    label_h = 12
    grid = Image.new("RGB", (w * n, len(rows) * h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for i in range(n):
            grid.paste(Image.fromarray(row[i]), (i * w, r * h))
    for i in range(n):
        draw.text((i * w + 1, len(rows) * h), labels[i][: max(1, w // 6)], fill="black")
    return grid
