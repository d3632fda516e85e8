"""Checkpoints of a run: the data cursor and counters, saving (atomic, multi-process safe), listing and checking.

Layout::

    checkpoints/step_XXXXXX/{lora/ | unet/, training_state/, manifest.json, COMPLETE}   final/{lora/ | unet/, COMPLETE}

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed when complete; ``COMPLETE`` is written last, so a
folder without it (a kill while saving) is never resumed from. Every process writes its own part of
``training_state`` (accelerate: optimizer shards, one RNG file per process); the main process alone writes the
weights, the trainer state and the manifest, and renames, after a barrier, so no process is still writing into the
folder when it is renamed.

Untrusted files (issue 14, part 1). The trainer's own state (data cursor, counters) is ``training_state/
trainer_state.json``, written and read here; nothing is registered with accelerate's ``register_for_checkpointing``,
whose ``load_custom_state`` unpickles ``custom_checkpoint_N.pkl`` with ``weights_only=False`` (accelerate 1.16
``checkpointing.py``), so a planted ``__reduce__`` would run on resume. Before accelerate's ``load_state`` sees a
checkpoint, :func:`verify_checkpoint` opens every pickle-format file in it (optimizer, scheduler, scaler, RNG states)
with :func:`workbench.untrusted.load_torch_file` (``weights_only=True``): pickled code is refused with a message
naming the file (:class:`~workbench.untrusted.UnsafeFileError`), never run. Checkpoints written before this change
hold ``custom_checkpoint_0.pkl`` (cursor) and ``custom_checkpoint_1.pkl`` (counters): they are read with the same
``weights_only`` load, which accepts their plain dicts of ints and refuses anything else, and accelerate is given a
view of the folder without them (it would otherwise count them against the registered objects).

Faults (issue 14, part 4). ``manifest.json`` records the size and SHA-256 of every file of the checkpoint;
:func:`verify_checkpoint` checks them, loads every state file and checks the RNG states and the trainer state, so a
truncated or damaged checkpoint (a corrupt RNG file included, which accelerate's ``load_accelerator_state`` skips
with an info log) is :class:`~workbench.untrusted.CorruptFileError`, and ``train.resume=latest`` falls back to the
previous checkpoint with a warning. A write that fails (disk full, read-only folder) removes the partial
``.tmp`` folder, leaves every earlier checkpoint as it was, and raises :class:`CheckpointWriteError`.
:func:`fault_point` marks the places where a test kills the process (``WORKBENCH_KILL_AT``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.untrusted import CorruptFileError, UnsafeFileError, load_torch_file

__all__ = [
    "COMPLETE",
    "MANIFEST",
    "TRAINER_STATE",
    "CheckpointWriteError",
    "CorruptFileError",
    "Counters",
    "DataCursor",
    "ResumeState",
    "UnsafeFileError",
    "accelerate_view",
    "fault_point",
    "list_checkpoints",
    "restore_rng",
    "save_checkpoint",
    "save_final",
    "trainer_state",
    "verify_checkpoint",
]

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_LEGACY_CUSTOM = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".ckpt")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder without COMPLETE was interrupted while saving; a ``.tmp``
    folder (killed between COMPLETE and the rename) is not a checkpoint either."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file())


def fault_point(name: str, step: int) -> None:
    """Fault injection for tests: ``WORKBENCH_KILL_AT=<name>@<step>`` SIGKILLs this process when the run reaches
    point ``name`` at ``step`` (``step``: after the optimizer step; ``save:begin`` / ``save:state`` /
    ``save:weights`` / ``save:complete`` / ``save:renamed``: inside a checkpoint write; ``final:weights``: inside
    the final save). Unset (always, outside tests), it only reads one environment variable."""
    if os.environ.get("WORKBENCH_KILL_AT") == f"{name}@{step}":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


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


# ------------------------------------------------------------------------------------------ the trainer state
def trainer_state(step: int, cursor: DataCursor, counters: Counters) -> dict[str, Any]:
    """What ``trainer_state.json`` holds: plain ints, the same on every process."""
    return {"format": 1, "step": step, "data_cursor": cursor.state_dict(), "counters": counters.state_dict()}


def read_trainer_state(training_state: Path, step: int) -> dict[str, Any]:
    """The trainer state of a checkpoint written at ``step``, validated; :class:`CorruptFileError` names the file.
    A checkpoint from before ``trainer_state.json`` has ``custom_checkpoint_0.pkl`` (cursor) and
    ``custom_checkpoint_1.pkl`` (counters): read with ``weights_only=True`` (plain dicts of ints pass)."""
    path = training_state / TRAINER_STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(
                f"trainer state {path}: not valid JSON ({exc}); the file is damaged"
            ) from exc
    else:
        legacy = [training_state / f"custom_checkpoint_{i}.pkl" for i in (0, 1)]
        if not all(p.is_file() for p in legacy):
            raise CorruptFileError(f"trainer state {path}: the file is missing; the checkpoint is incomplete")
        cursor, counters = (load_torch_file(p, what="trainer state (old format)") for p in legacy)
        state = {"format": 1, "step": step, "data_cursor": cursor, "counters": counters}
    schema = {"data_cursor": ("epoch", "position"), "counters": ("step", "nonfinite_total")}
    ok = isinstance(state, dict) and all(
        isinstance(state.get(part), dict) and all(_count(state[part].get(key)) for key in keys)  # pyright: ignore[reportUnknownMemberType]
        for part, keys in schema.items()
    )
    if not ok or state.get("step") != step or state["counters"]["step"] != step:
        where = path if path.is_file() else training_state / "custom_checkpoint_{0,1}.pkl"
        raise CorruptFileError(
            f"trainer state {where}: expected {{step: {step}, data_cursor: {{epoch, position}}, counters: {{step, "
            f"nonfinite_total}}}} with non-negative integers, found {str(state)[:200]}; the file is damaged"
        )
    return state  # pyright: ignore[reportUnknownVariableType]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----------------------------------------------------------------------------------------------- the manifest
def _files(folder: Path) -> Iterator[Path]:
    """Every file of a checkpoint folder but the manifest and COMPLETE themselves."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not (path.parent == folder and path.name in (MANIFEST, COMPLETE)):
            yield path


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every file of the checkpoint (hashing costs one read of it)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def _check_manifest(folder: Path) -> None:
    path = folder / MANIFEST
    if not path.is_file():
        return  # a checkpoint from before manifests: the loads below still catch truncated state files
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(v["size"]), str(v["sha256"])) for name, v in files.items()]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(
            f"checkpoint manifest {path}: cannot be read ({exc}); the file is damaged"
        ) from exc
    for name, size, digest in entries:
        file = folder / name
        if not file.is_file():
            raise CorruptFileError(f"checkpoint file {file}: missing (listed in {path})")
        if file.stat().st_size != size:
            raise CorruptFileError(
                f"checkpoint file {file}: {file.stat().st_size} bytes, {size} when written: the file is truncated "
                "or damaged"
            )
        if _sha256(file) != digest:
            raise CorruptFileError(
                f"checkpoint file {file}: its SHA-256 differs from {path}: the file is damaged"
            )


# -------------------------------------------------------------------------------------------------- checking
@dataclass
class ResumeState:
    """A checked checkpoint: its folder, the trainer state and this process's RNG states (None: no file)."""

    path: Path
    trainer: dict[str, Any]
    rng: dict[str, Any] | None


def verify_checkpoint(path: Path, process_index: int = 0) -> ResumeState:
    """Check a checkpoint before anything is loaded from it: every pickle-format file loaded with
    ``weights_only=True`` (refused with :class:`UnsafeFileError` when it holds code; tensors of zip files are
    mapped, not read), every safetensors header, the RNG states (each applied to a fresh generator), the manifest
    (sizes, hashes) and the trainer state. Every process checks every file, so all reach the same verdict."""
    from safetensors import safe_open

    folder = path / "training_state"
    if not folder.is_dir():
        raise CorruptFileError(f"checkpoint {path}: no training_state/ folder; the checkpoint is incomplete")
    found = _STEP_DIR.match(path.name)
    step = int(found.group(1)) if found else None
    rng: dict[str, Any] | None = None
    for file in sorted(path.rglob("*")):
        if file.suffix in _PICKLE_SUFFIXES and file.is_file():
            legacy = _LEGACY_CUSTOM.match(file.name) is not None
            content = load_torch_file(
                file, what="trainer state (old format)" if legacy else "checkpoint file", mmap=True
            )
            if file.parent == folder and file.name.startswith("random_states_"):
                _check_rng(content, file)
                if file.name == f"random_states_{process_index}.pkl":
                    rng = content
        elif file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:  # pyright: ignore[reportUnknownVariableType]
                    f.keys()  # pyright: ignore[reportUnknownMemberType]
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CorruptFileError(
                    f"checkpoint file {file}: cannot be read ({exc}); the file is damaged"
                ) from exc
    _check_manifest(path)  # after the loads: a planted file is named as code, not only as a changed file
    if rng is None and process_index == 0:
        raise CorruptFileError(
            f"checkpoint {path}: training_state/random_states_0.pkl is missing; the checkpoint is incomplete"
        )
    if step is None:  # a folder named otherwise (train.resume=PATH): the step COMPLETE records
        text = (path / COMPLETE).read_text(encoding="utf-8", errors="replace").split()
        step = int(text[1]) if len(text) == 2 and text[1].isdigit() else -1
    return ResumeState(path, read_trainer_state(folder, step), rng)


def _check_rng(states: Any, file: Path) -> None:
    """An accelerate RNG file: Python, numpy and torch CPU states, each accepted by a fresh generator."""
    try:
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception as exc:  # TypeError, ValueError, KeyError, RuntimeError: whatever the damage gives
        raise CorruptFileError(
            f"RNG state {file}: not a valid random state ({type(exc).__name__}: {exc}); the file is damaged"
        ) from exc


def restore_rng(states: dict[str, Any]) -> None:
    """Set this process's Python, numpy, torch (and CUDA) RNGs from a checked RNG file. accelerate's own load of
    the same file swallows every error; here a state that does not apply is an error."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    cuda = states.get("torch_cuda_manual_seed")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def accelerate_view(training_state: Path) -> Iterator[Path]:
    """The folder to give ``accelerator.load_state``: ``training_state`` itself, or for an old checkpoint with
    ``custom_checkpoint_N.pkl`` files (read by :func:`read_trainer_state`), a temporary folder of links to every
    other file, so that accelerate neither unpickles them (``weights_only=False``) nor counts them."""
    names = [p.name for p in training_state.iterdir()]
    if not any(_LEGACY_CUSTOM.match(n) for n in names):
        yield training_state
        return
    with tempfile.TemporaryDirectory(prefix="training_state_view_") as tmp:
        for name in names:
            if not _LEGACY_CUSTOM.match(name):
                (Path(tmp) / name).symlink_to((training_state / name).resolve())
        yield Path(tmp)


# -------------------------------------------------------------------------------------------------- writing
class CheckpointWriteError(ValueError):
    """A checkpoint or the final weights could not be written (disk full, read-only folder); the partial folder
    was removed and every earlier checkpoint is intact. A ``ValueError``: the CLI shows its message (exit 2)."""


def _agree(acc: Any, error: BaseException | None, what: Path) -> None:
    """Raise :class:`CheckpointWriteError` on every process when any process failed its part of a write."""
    acc.wait_for_everyone()
    failed = error is not None
    if getattr(acc, "num_processes", 1) > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=acc.device)
        failed = float(torch.as_tensor(acc.reduce(flag, "sum")).item()) > 0
    if failed:
        why = (
            f"{error.filename or what}: {error.strerror or error}"
            if isinstance(error, OSError)
            else (str(error) if error is not None else "another process could not write its part")
        )
        raise CheckpointWriteError(f"could not write {what} ({why})") from error


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    step: int,
    export: Callable[[Path], None],
    keep_last: int,
    state: dict[str, Any] | None = None,
) -> Path:
    """Save ``training_state`` (every process; ``state``, the trainer's, as ``trainer_state.json`` by the main process: a checkpoint without it cannot be resumed), the
    weights and the manifest (main process) as ``checkpoints/step_XXXXXX``. On a failed write
    (:class:`CheckpointWriteError`) the ``.tmp`` folder is removed and earlier checkpoints stay as they were."""
    acc = accelerator
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")

    def begin() -> None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def training_state() -> None:
        acc.save_state(str(tmp / "training_state"))
        if acc.is_main_process and state is not None:
            (tmp / "training_state" / TRAINER_STATE).write_text(json.dumps(state, indent=1))

    def weights() -> None:
        if acc.is_main_process:
            export(tmp)
            fault_point("save:weights", step)
            write_manifest(tmp)
            (tmp / COMPLETE).write_text(f"step {step}\n")  # written last: a checkpoint without it is ignored

    acc.wait_for_everyone()
    try:
        for phase, name in (
            (begin, "save:begin"),
            (training_state, "save:state"),
            (weights, "save:complete"),
        ):
            error: BaseException | None = None
            try:
                phase()
            except OSError as exc:
                error = exc
            _agree(
                acc, error, tmp
            )  # also the barrier: every process has written its part before the next phase
            fault_point(name, step)
    except CheckpointWriteError:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial checkpoint took
        raise
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fault_point("save:renamed", step)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def save_final(accelerator: Any, run_dir: Path, step: int, export: Callable[[Path], None]) -> Path:
    """The final weights as ``final/`` (main process), written into ``final.tmp`` and renamed; on a failed write
    (:class:`CheckpointWriteError`) ``final.tmp`` is removed and the checkpoints stay as they were."""
    acc = accelerator
    final = run_dir / "final"
    tmp = final.with_name("final.tmp")
    acc.wait_for_everyone()
    error: BaseException | None = None
    if acc.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            export(tmp)
            fault_point("final:weights", step)
            (tmp / COMPLETE).write_text(f"step {step}\n")
        except OSError as exc:
            error = exc
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(acc, error, tmp)
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()
    return final
