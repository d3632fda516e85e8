"""Checkpoints of a run: the data cursor and counters, saving (atomic, multi-process safe) and listing.

Layout::

    checkpoints/step_XXXXXX/{lora/ | unet/, training_state/, COMPLETE}   final/{lora/ | unet/, COMPLETE}

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed when complete; ``COMPLETE`` is written last, so a
folder without it (a kill while saving) is never resumed from. Every process writes its own part of
``training_state`` (accelerate: optimizer shards, one RNG file per process); the main process alone writes the
weights and renames, after a barrier, so no process is still writing into the folder when it is renamed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder without COMPLETE was interrupted while saving."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).is_file())


class DataCursor:
    """Deterministic, resumable data order: a fresh permutation per epoch from (seed, epoch), read as one global
    stream. Every process of a multi-process run holds the same cursor and takes the whole global batch from it; the
    trainer gives process ``r`` of ``n`` the rows ``[r * B, (r + 1) * B)`` of each global micro-batch of ``n * B``,
    so the processes see disjoint groups whose union is the batch one process would take, and the state (the same
    on every process) resumes under any number of processes. ``state_dict`` is saved with every checkpoint."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


class Counters:
    def __init__(self) -> None:
        self.step = 0
        self.nonfinite_total = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.nonfinite_total = int(state["step"]), int(state["nonfinite_total"])


def save_checkpoint(
    accelerator: Any, run_dir: Path, step: int, export: Callable[[Path], None], keep_last: int
) -> Path:
    """Save ``training_state`` (every process) and the weights (main process) as ``checkpoints/step_XXXXXX``."""
    acc = accelerator
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "training_state"))
    acc.wait_for_everyone()  # every process has finished writing its part before the folder is renamed
    if acc.is_main_process:
        export(tmp)
        (tmp / COMPLETE).write_text(f"step {step}\n")  # written last: a checkpoint without it is ignored
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def save_final(accelerator: Any, run_dir: Path, step: int, export: Callable[[Path], None]) -> Path:
    acc = accelerator
    final = run_dir / "final"
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        export(tmp)
        (tmp / COMPLETE).write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()
    return final
