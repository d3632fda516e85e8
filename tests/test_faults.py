"""Faults during training (issue 14, part 4): kills, damaged checkpoints, failing writes. ``make test-faults``.

- SIGKILL at 10 points of a tiny LoRA DPO run (8 steps, a checkpoint every 2), drawn with a fixed seed from the
  optimizer steps and the phases of a checkpoint write (``workbench.checkpointing.fault_point``); after each kill,
  ``train.resume=latest`` must end with final weights bitwise equal to the uninterrupted run's.
- A damaged newest checkpoint (truncated optimizer state, a corrupt RNG state, a flipped byte in the weights) is
  detected, and the resume uses the previous checkpoint with a warning, again ending on the uninterrupted weights.
- A write that fails (disk full, read-only folder) stops the run with a message; the earlier checkpoints stay, the
  partial folder is removed, the weights are rescued, and a resume goes on from the last good checkpoint.

Runs that are killed go through a forkserver whose process has imported torch, diffusers and the trainer once
(``set_forkserver_preload``), so each of the ~25 training processes costs its setup and steps, not the imports.
Every one runs with one thread, the uninterrupted reference included, so their float results can be compared bit
for bit.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from workbench.checkpointing import (
    CheckpointWriteError,
    CorruptFileError,
    list_checkpoints,
    verify_checkpoint,
)
from workbench.config import load_config
from workbench.train import Trainer

pytestmark = pytest.mark.faults

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs/tiny/sdxl_dpo_lora.yaml")
STEPS, EVERY = 8, 2
RUN = [
    f"train.max_steps={STEPS}",
    f"train.checkpoint_every={EVERY}",
    "train.keep_last=2",
    "train.batch_size=2",
    "run.deterministic=true",
    "validation.prompts=[]",
    "logging.tensorboard=false",
]
SAVE_PHASES = ("save:begin", "save:adapter", "save:state", "save:weights", "save:complete", "save:renamed")


def kill_points(seed: int = 14, n: int = 10) -> list[str]:
    """``n`` points drawn with ``seed``: 3 after optimizer steps, the rest inside checkpoint or final writes."""
    steps = [f"step@{s}" for s in range(1, STEPS + 1)]
    writes = [f"{p}@{s}" for s in range(EVERY, STEPS, EVERY) for p in SAVE_PHASES] + [
        f"final:weights@{STEPS}"
    ]
    rng = random.Random(seed)
    return rng.sample(steps, 3) + rng.sample(writes, n - 3)


# ---------------------------------------------------------------------------------------- child processes
def _train_child(cwd: str, overrides: list[str], kill_at: str | None, log: str) -> None:
    """A training run in a process of its own (forked from the preloaded server); ``kill_at``: the fault point."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("WORKBENCH_KILL_AT", None)
    if kill_at is not None:
        os.environ["WORKBENCH_KILL_AT"] = kill_at
    torch.set_num_threads(1)
    trainer = Trainer(load_config(CONFIG, [*RUN, *overrides]), show_progress=False)
    trainer.setup()
    trainer.train()


_PRELOAD = ["torch", "numpy", "safetensors.torch", "accelerate", "diffusers", "transformers", "peft"]
_PRELOAD += ["workbench.train", "workbench.models", "workbench.cache", "workbench.data"]


@pytest.fixture(scope="module")
def spawn() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, _train_child.__module__])

    def run(cwd: Path, name: str, *overrides: str, kill_at: str | None = None) -> tuple[int | None, str]:
        log = cwd / "runs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = ctx.Process(
            target=_train_child, args=(str(cwd), [f"run.name={name}", *overrides], kill_at, str(log))
        )
        proc.start()
        proc.join(timeout=300)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        return proc.exitcode, log.read_text(errors="replace")

    return run


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "lora" / "pytorch_lora_weights.safetensors"))


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    a, b = _final(reference), _final(run_dir)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max((float((a[k] - b[k]).abs().max()) for k in differ), default=0.0)
    assert not differ, (
        f"{run_dir.name}: {len(differ)} tensors differ from the uninterrupted run (max {worst})"
    )


@pytest.fixture(scope="module")
def reference(spawn: Any, tiny_fixtures: dict[str, Path]) -> Path:
    """The uninterrupted run (one thread, in a child process like the killed ones)."""
    base = tiny_fixtures["sdxl"].parent.parent
    (base / ".cache").mkdir(exist_ok=True)
    link = base / ".cache" / "tiny"
    if not link.exists():
        link.symlink_to(tiny_fixtures["sdxl"].parent)
    shutil.rmtree(base / "runs" / "faults_reference", ignore_errors=True)
    code, log = spawn(base, "faults_reference")
    assert code == 0, log[-3000:]
    return base / "runs" / "faults_reference"


# ------------------------------------------------------------------------------------------------- kills
def test_sigkill_at_10_points_then_resume_reaches_the_uninterrupted_weights(
    spawn: Any, reference: Path, workdir: Path
):
    points = kill_points()
    assert len(set(points)) == 10 and sum(not p.startswith("step@") for p in points) == 7
    for point in points:
        name = "killed_" + point.replace(":", "_").replace("@", "_")
        run_dir = workdir / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        code, log = spawn(workdir, name, kill_at=point)
        assert code == -signal.SIGKILL, f"{point}: the run was not killed there (exit {code})\n{log[-3000:]}"
        phase, step = point.split("@")
        tmp = run_dir / "checkpoints" / f"step_{int(step):06d}.tmp"
        if phase in ("save:begin", "save:adapter", "save:state", "save:weights", "save:complete"):
            assert tmp.is_dir() and not tmp.with_suffix("").exists(), f"{point}: not inside the write"
        if phase == "final:weights":
            assert (run_dir / "final.tmp").is_dir() and not (run_dir / "final").exists()
        assert not (run_dir / "final").exists()
        code, log = spawn(workdir, name, "train.resume=latest")
        assert code == 0, f"resume after {point} failed\n{log[-3000:]}"
        _assert_same_weights(run_dir, reference)


# --------------------------------------------------------------------------------------- damaged checkpoints
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the safetensors header still parses
    path.write_bytes(bytes(data))


def _bad_rng(path: Path) -> None:
    states = torch.load(path, weights_only=False)  # the test's own file
    states["torch_manual_seed"] = torch.zeros(7, dtype=torch.uint8)  # loads fine, is no generator state
    torch.save(states, path)


DAMAGE = {
    "optimizer.bin": ("training_state/optimizer.bin", _truncate, "truncated"),
    "random_states_0.pkl": ("training_state/random_states_0.pkl", _bad_rng, "not a valid random state"),
    "adapter.safetensors": ("training_state/adapter.safetensors", _flip_byte, "SHA-256 differs"),
}


@pytest.mark.parametrize("damaged", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(
    spawn: Any, reference: Path, workdir: Path, damaged: str
):
    name = "damaged_" + damaged.replace(".", "_")
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    code, log = spawn(workdir, name, kill_at="step@5")  # checkpoints 2 and 4, no final
    assert code == -signal.SIGKILL, log[-3000:]
    newest = list_checkpoints(run_dir)[-1]
    assert newest.name == "step_000004"
    relative, damage, reason = DAMAGE[damaged]
    damage(newest / relative)
    code, log = spawn(workdir, name, "train.resume=latest")
    assert code == 0, log[-3000:]
    assert "warning: skipping checkpoint step_000004: " in log and reason in log and relative in log
    assert "resuming from the previous checkpoint, step_000002" in log
    assert f"resumed from {Path('runs') / name / 'checkpoints' / 'step_000002'} at step 2" in log
    _assert_same_weights(run_dir, reference)


def test_verify_checkpoint_names_each_kind_of_damage(reference: Path, tmp_path: Path):
    """Each damage is CorruptFileError naming the file; the intact checkpoint passes."""
    source = list_checkpoints(reference)[-1]
    assert verify_checkpoint(source).trainer["counters"]["step"] == 6
    cases = {
        "training_state/optimizer.bin": (_truncate, "optimizer.bin"),
        "training_state/random_states_0.pkl": (_bad_rng, "random_states_0.pkl: not a valid random state"),
        "training_state/trainer_state.json": (_truncate, "trainer_state.json: 68 bytes, 136 when written"),
        "lora/pytorch_lora_weights.safetensors": (
            _flip_byte,
            "pytorch_lora_weights.safetensors: its SHA-256",
        ),
        "training_state/adapter.safetensors": (lambda p: p.unlink(), "adapter.safetensors: missing"),
    }
    for i, (relative, (damage, message)) in enumerate(cases.items()):
        copy = tmp_path / str(i) / source.name
        shutil.copytree(source, copy)
        damage(copy / relative)
        with pytest.raises(CorruptFileError, match=message):
            verify_checkpoint(copy)
    # without a manifest (a checkpoint from before manifests), the trainer state is still checked
    for i, (text, message) in enumerate([("{", "not valid JSON"), ('{"step": 6}', "expected {step: 6")]):
        copy = tmp_path / f"no-manifest-{i}" / source.name
        shutil.copytree(source, copy)
        (copy / "manifest.json").unlink()
        (copy / "training_state" / "trainer_state.json").write_text(text)
        with pytest.raises(CorruptFileError, match=rf"trainer_state\.json: {re.escape(message)}"):
            verify_checkpoint(copy)


def test_no_usable_checkpoint_is_an_error_listing_each(workdir: Path, reference: Path):
    run_dir = workdir / "runs" / "all_damaged"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    for ckpt in list_checkpoints(run_dir):
        _truncate(ckpt / "training_state" / "optimizer.bin")
    trainer = Trainer(
        load_config(CONFIG, [*RUN, "run.name=all_damaged", "train.resume=latest"]), show_progress=False
    )
    trainer.setup()
    with pytest.raises(CorruptFileError, match=r"no usable checkpoint(.|\n)*step_000006(.|\n)*step_000004"):
        trainer._maybe_resume()


# ------------------------------------------------------------------------------------------ failing writes
def _enospc(path: Any) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _inject(fault: str, trainer: Trainer, step: int, patch: pytest.MonkeyPatch) -> str:
    """Make the write at ``step`` fail as ``fault`` does; returns the reason the message must give."""
    import accelerate.checkpointing

    if fault == "disk-full-in-optimizer-state":  # accelerate's save of optimizer.bin fails half written
        real_save = accelerate.checkpointing.save

        def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            if trainer.counters.step == step:
                Path(path).write_bytes(b"partial")  # what a full disk leaves behind
                raise _enospc(path)
            real_save(obj, path, *args, **kwargs)

        patch.setattr(accelerate.checkpointing, "save", save)
        return "No space left on device"
    if fault == "read-only-checkpoints-folder":  # the checkpoint folder cannot be created
        real_mkdir = Path.mkdir

        def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
            if self.name == f"step_{step:06d}.tmp":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            real_mkdir(self, *args, **kwargs)

        patch.setattr(Path, "mkdir", mkdir)
        return "Permission denied"
    real_export = trainer._export_weights  # final: the disk fills while the final weights are written

    def export(directory: Path) -> None:
        real_export(directory)
        if directory.name == "final.tmp":
            raise _enospc(directory / "lora" / "lora_kohya.safetensors")

    patch.setattr(trainer, "_export_weights", export)
    return "No space left on device"


@pytest.mark.parametrize("fault", ["disk-full-in-optimizer-state", "read-only-checkpoints-folder", "final"])
def test_a_failing_write_keeps_the_last_checkpoint_and_stops_with_a_message(workdir: Path, fault: str):
    name = f"write_{fault.replace('-', '_')}"
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*RUN, f"run.name={name}", "train.max_steps=6"]
    trainer = Trainer(load_config(CONFIG, overrides), show_progress=False)
    trainer.setup()
    failing_step = 6 if fault == "final" else 4
    with pytest.MonkeyPatch.context() as patch:  # undone before the resume below
        reason = _inject(fault, trainer, failing_step, patch)
        with pytest.raises(CheckpointWriteError) as info:
            trainer.train()
    message = str(info.value)
    what = "final.tmp" if fault == "final" else f"step_{failing_step:06d}.tmp"
    rel = Path("runs") / name  # the run directory as the config names it
    assert f"could not write {rel / ('' if fault == 'final' else 'checkpoints') / what}" in message
    assert reason in message and "continue with train.resume=latest" in message
    kept = list_checkpoints(run_dir)
    assert [p.name for p in kept] == (["step_000002", "step_000004"] if fault == "final" else ["step_000002"])
    assert f"The last good checkpoint, {rel / 'checkpoints' / kept[-1].name}, is intact" in message
    for ckpt in kept:
        verify_checkpoint(ckpt)
    assert not list((run_dir / "checkpoints").glob("*.tmp")) and not (run_dir / "final.tmp").exists()
    assert not (run_dir / "final").exists()
    rescued = run_dir / "rescued" / f"step_{failing_step:06d}" / "lora" / "pytorch_lora_weights.safetensors"
    assert rescued.is_file() and f"saved in {rel / 'rescued' / rescued.parents[1].name}" in message
    resumed = Trainer(load_config(CONFIG, [*overrides, "train.resume=latest"]), show_progress=False)
    resumed.setup()
    resumed.train()
    assert resumed.counters.step == 6 and (run_dir / "final" / "COMPLETE").is_file()
