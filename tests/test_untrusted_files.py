"""Untrusted files never run code (issue 14, part 1: checkpoints and ``.pt`` files).

Every place a checkpoint part or a ``.pt``-style file is read gets a planted pickle whose ``__reduce__`` writes a
marker file when unpickled: the resume path (the trainer state in the old ``custom_checkpoint_N.pkl`` layout, the
optimizer, scheduler and RNG states), ``model.source`` single files, and the HPS, CLIP, aesthetic and PickScore
weights. Each must be refused with a ``ValueError`` that names the file, and the marker must not appear. Before the
fix, the resume ran the payload (accelerate's ``load_custom_state`` unpickles with ``weights_only=False``).
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from workbench.checkpointing import list_checkpoints
from workbench.config import load_config
from workbench.train import Trainer
from workbench.untrusted import CorruptFileError, UnsafeFileError, load_torch_file

ROOT = Path(__file__).parents[1]
SDXL_LORA = "configs/tiny/sdxl_dpo_lora.yaml"
RUN = [
    "train.max_steps=2",
    "train.checkpoint_every=1",
    "train.batch_size=2",
    "validation.prompts=[]",
    "logging.tensorboard=false",
]


class Payload:
    """Unpickling this writes ``marker``: the stand-in for any code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickled code ran"))


def plant(path: Path, marker: Path, *, torch_format: bool = True) -> None:
    """A file at ``path`` whose loading with full unpickling runs the payload (torch zip or plain pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [], "extra": Payload(marker)}
    if torch_format:
        torch.save(content, path)
    else:
        with path.open("wb") as f:
            pickle.dump(content, f)


def test_the_payload_runs_when_unpickled(tmp_path: Path):
    """The planted files are real attacks: a plain ``torch.load(weights_only=False)`` runs them."""
    marker = tmp_path / "marker"
    plant(tmp_path / "a.pt", marker)
    torch.load(tmp_path / "a.pt", weights_only=False)
    assert marker.read_text() == "pickled code ran"


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "plain-pickle"])
def test_load_torch_file_refuses_code_and_names_the_file(tmp_path: Path, torch_format: bool):
    marker = tmp_path / "marker"
    plant(tmp_path / "x.bin", marker, torch_format=torch_format)
    with pytest.raises(UnsafeFileError, match=r"x\.bin: refusing to load it: it holds pickled code \("):
        load_torch_file(tmp_path / "x.bin", what="test file")
    assert not marker.exists()
    torch.save({"w": torch.ones(100)}, tmp_path / "whole.bin")
    (tmp_path / "t.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:300])  # truncated
    with pytest.raises(CorruptFileError, match=r"t\.bin: cannot be read"):
        load_torch_file(tmp_path / "t.bin", what="test file")


# ----------------------------------------------------------------------------------------------------- resume
def _trainer(*overrides: str) -> Trainer:
    trainer = Trainer(load_config(ROOT / SDXL_LORA, [*RUN, *overrides]), show_progress=False)
    trainer.setup()
    return trainer


@pytest.fixture()
def run_copy(workdir: Path, request: pytest.FixtureRequest) -> Path:
    """A copy of a finished 2-step run without ``final/`` (so ``train.resume=latest`` resumes checkpoint 1)."""
    base = workdir / "runs" / "untrusted_base"
    if not (base / "final").is_dir():
        shutil.rmtree(base, ignore_errors=True)
        _trainer("run.name=untrusted_base").train()
    name = "untrusted_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    copy = workdir / "runs" / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(base, copy)
    shutil.rmtree(copy / "final")
    return copy


def _to_old_layout(checkpoint: Path, cursor: object, counters: object) -> None:
    """The layout written before trainer_state.json: accelerate's custom_checkpoint_N.pkl, no manifest."""
    state = checkpoint / "training_state"
    (state / "trainer_state.json").unlink()
    (checkpoint / "manifest.json").unlink()
    torch.save(cursor, state / "custom_checkpoint_0.pkl")
    torch.save(counters, state / "custom_checkpoint_1.pkl")


@pytest.mark.parametrize(
    "name",
    ["optimizer.bin", "random_states_0.pkl", "scheduler.bin", "scaler.pt", "custom_checkpoint_0.pkl"],
)
def test_resume_refuses_a_planted_pickle_in_the_checkpoint(run_copy: Path, tmp_path: Path, name: str):
    checkpoint = list_checkpoints(run_copy)[-1]
    counters = {"step": 1, "nonfinite_total": 0}
    if name.startswith("custom_checkpoint"):  # a checkpoint of the old layout, the cursor replaced
        _to_old_layout(checkpoint, {"epoch": 0, "position": 2}, counters)
    marker = tmp_path / "marker"
    plant(checkpoint / "training_state" / name, marker, torch_format=name != "scaler.pt")
    trainer = _trainer(f"run.name={run_copy.name}", "train.resume=latest")
    with pytest.raises(
        UnsafeFileError, match=rf"{checkpoint.name}/training_state/{re.escape(name)}: refusing to load it"
    ):
        trainer._maybe_resume()
    assert not marker.exists()
    assert trainer.counters.step == 0


def test_the_cli_reports_a_planted_pickle_as_one_message(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """``workbench train ... train.resume=latest``: exit code 2 and one line naming the file, no traceback."""
    from workbench.cli import main

    checkpoint = list_checkpoints(run_copy)[-1]
    marker = tmp_path / "marker"
    plant(checkpoint / "training_state" / "optimizer.bin", marker)
    args = ["train", str(ROOT / SDXL_LORA), *RUN, f"run.name={run_copy.name}", "train.resume=latest"]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "workbench train: error: checkpoint file " in err and "optimizer.bin: refusing to load it" in err
    assert "Traceback" not in err and not marker.exists()


def test_a_checkpoint_of_the_old_layout_still_resumes(run_copy: Path):
    """custom_checkpoint_{0,1}.pkl holding plain dicts of ints pass the weights_only load; accelerate never sees
    them (it would count them against registered objects and unpickle them with weights_only=False)."""
    checkpoint = list_checkpoints(run_copy)[-1]
    _to_old_layout(checkpoint, {"epoch": 0, "position": 2}, {"step": 1, "nonfinite_total": 0})
    trainer = _trainer(f"run.name={run_copy.name}", "train.resume=latest")
    trainer._maybe_resume()
    assert trainer.counters.step == 1
    assert (trainer.cursor.epoch, trainer.cursor.position) == (0, 2)


def test_a_resume_from_trainer_state_json_restores_the_cursor(run_copy: Path):
    trainer = _trainer(f"run.name={run_copy.name}", "train.resume=latest")
    trainer._maybe_resume()
    assert trainer.counters.step == 1
    assert (trainer.cursor.epoch, trainer.cursor.position) == (0, 2)  # one step of batch_size 2
    names = {p.name for p in (list_checkpoints(run_copy)[-1] / "training_state").iterdir()}
    assert "trainer_state.json" in names and not any(n.startswith("custom_checkpoint") for n in names)


# -------------------------------------------------------------------------------------------- model.source
def test_model_source_single_file_with_code_is_refused(tmp_path: Path):
    from workbench.models import load_pipeline

    marker = tmp_path / "marker"
    path = tmp_path / "model.ckpt"
    plant(path, marker)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: refusing to load it: it holds pickled code"
    ):
        load_pipeline(str(path), family="sdxl")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ scorers
def test_hps_weights_with_code_are_refused(tmp_path: Path):
    from rewards_fixtures import tiny_open_clip_arch

    import rewards

    marker, path = tmp_path / "marker", tmp_path / "HPS_v2_compressed.pt"
    plant(path, marker)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*holds pickled"):
        rewards.build_scorer("hpsv2", path=str(path), arch=tiny_open_clip_arch(), device="cpu")
    assert not marker.exists()


def test_clip_weights_with_code_are_refused(tmp_path: Path):
    from rewards_fixtures import tiny_open_clip_arch

    import rewards

    marker, path = tmp_path / "marker", tmp_path / "clip.pt"
    plant(path, marker)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*holds pickled"):
        rewards.build_scorer("clipscore", arch=tiny_open_clip_arch(), pretrained=str(path), device="cpu")
    assert not marker.exists()


def test_aesthetic_weights_with_code_are_refused(tmp_path: Path):
    from rewards_fixtures import hps_checkpoint, tiny_open_clip_arch

    import rewards

    marker, path = tmp_path / "marker", tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    plant(path, marker)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: refusing to load it: it holds pickled code"
    ):
        rewards.build_scorer(
            "aesthetic",
            path=str(path),
            clip_arch=tiny_open_clip_arch(),
            clip_pretrained=str(hps_checkpoint()),
            device="cpu",
        )
    assert not marker.exists()


def test_pickscore_weights_with_code_are_refused(tmp_path: Path):
    from rewards_fixtures import pickscore_folder

    import rewards

    folder = tmp_path / "pickscore"
    shutil.copytree(pickscore_folder(), folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    marker, path = tmp_path / "marker", folder / "pytorch_model.bin"
    plant(path, marker)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: refusing to load it: it holds pickled code"
    ):
        rewards.build_scorer("pickscore", path=str(folder), device="cpu")
    assert not marker.exists()
