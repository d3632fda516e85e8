"""Nothing finished is overwritten (issue 14 part 2): a run directory that holds a run is refused without
``train.resume``, ``train.overwrite=true`` clears it, a failed command keeps ``config.resolved.yaml``, a resume with
a changed config is refused (safe keys are accepted and recorded), a LoRA rank mismatch is named, metrics have each
step once after a kill and a resume, and ``workbench generate`` never empties its manifest."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from workbench.cli import main
from workbench.config import ConfigError, load_config
from workbench.rundir import check_run_dir, config_changes
from workbench.train import Trainer, train

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny" / "sdxl_dpo_lora.yaml"


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def _args(fx: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    """A 4-step tiny LoRA DPO run (checkpoint at step 2, final at 4), every path absolute."""
    return [
        f"model.source={fx['sdxl']}",
        f"data.sources.0.path={fx['pickapic']}",
        f"data.cache.dir={fx['sdxl'].parent / 'run_safety_cache'}",
        f"run.output_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        "run.deterministic=true",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.keep_last=5",
        "validation.prompts=[]",
        "logging.tensorboard=false",
        *extra,
    ]


def _train(fx: dict[str, Path], run_dir: Path, *extra: str) -> Path:
    _reset_accelerate()
    try:
        return train(load_config(TINY, _args(fx, run_dir, *extra)), show_progress=False)
    finally:
        _reset_accelerate()


@pytest.fixture(scope="module")
def finished(tiny_fixtures: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run, copied by each test that changes it."""
    return _train(tiny_fixtures, tmp_path_factory.mktemp("run_safety") / "finished")


@pytest.fixture()
def run_copy(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(finished, copy)
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- 1. refuse or overwrite
@pytest.mark.parametrize("left", ["everything", "metrics_only"])
def test_training_into_a_run_directory_that_holds_a_run_is_refused_before_anything_is_written(
    tiny_fixtures: dict[str, Path], run_copy: Path, capsys: pytest.CaptureFixture[str], left: str
):
    if left == "metrics_only":  # a run killed before its first checkpoint
        shutil.rmtree(run_copy / "final")
        shutil.rmtree(run_copy / "checkpoints")
    before = _snapshot(run_copy)
    args = _args(tiny_fixtures, run_copy)
    for command in ("train", "validate"):
        code = main([command, str(TINY), *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        for needle in (
            str(run_copy),
            "already holds a run",
            "train.resume=latest",
            "train.overwrite=true",
            "run.name",
        ):
            assert needle in err, err
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(load_config(TINY, args), show_progress=False).setup()
    assert _snapshot(run_copy) == before


def test_overwrite_true_removes_the_old_outputs_and_keeps_other_files(
    tiny_fixtures: dict[str, Path], run_copy: Path, capsys: pytest.CaptureFixture[str]
):
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / "resume_log.jsonl").write_text('{"step": 2}\n')
    _train(tiny_fixtures, run_copy, "train.overwrite=true", "train.max_steps=3", "train.checkpoint_every=1")
    err = capsys.readouterr().err
    assert "train.overwrite=true: removed final/, checkpoints/, metrics.jsonl" in err
    assert _steps(run_copy) == [1, 2, 3]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert (run_copy / "final" / "COMPLETE").read_text() == "step 3\n"
    assert not (run_copy / "resume_log.jsonl").exists()
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert "max_steps: 3" in (run_copy / "config.resolved.yaml").read_text()


def test_resume_and_overwrite_together_are_refused(tiny_fixtures: dict[str, Path], tmp_path: Path):
    with pytest.raises(ConfigError, match="contradict"):
        load_config(TINY, _args(tiny_fixtures, tmp_path / "x", "train.resume=latest", "train.overwrite=true"))


def test_resume_of_a_finished_run_with_nothing_left_to_train_is_refused(
    tiny_fixtures: dict[str, Path], run_copy: Path
):
    with pytest.raises(ConfigError, match=r"finished at step 4 .* nothing to resume"):
        check_run_dir(load_config(TINY, _args(tiny_fixtures, run_copy, "train.resume=latest")))
    shutil.rmtree(run_copy / "checkpoints")
    with pytest.raises(ConfigError, match="no complete checkpoint to resume from"):
        check_run_dir(
            load_config(TINY, _args(tiny_fixtures, run_copy, "train.resume=latest", "train.max_steps=6"))
        )


# ------------------------------------------------------------------------------- 2. config.resolved.yaml kept
def test_a_failed_command_does_not_rewrite_config_resolved(
    tiny_fixtures: dict[str, Path], run_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    import workbench.models

    before = _snapshot(run_copy)

    def broken(*args, **kwargs):
        raise RuntimeError("the model failed to load")

    monkeypatch.setattr(workbench.models, "setup_training_components", broken)
    args = _args(tiny_fixtures, run_copy, "train.resume=latest", "train.max_steps=6")
    with pytest.raises(RuntimeError, match="failed to load"):
        Trainer(load_config(TINY, args), show_progress=False).setup()
    assert _snapshot(run_copy) == before


def test_a_resume_keeps_the_config_and_records_the_safe_changes(
    tiny_fixtures: dict[str, Path], run_copy: Path
):
    original = (run_copy / "config.resolved.yaml").read_bytes()
    environment = (run_copy / "environment.json").read_bytes()
    _train(tiny_fixtures, run_copy, "train.resume=latest", "train.max_steps=6", "train.log_every=1")
    assert (run_copy / "config.resolved.yaml").read_bytes() == original
    assert (run_copy / "environment.json").read_bytes() == environment
    resumed = (run_copy / "config.resolved.resume-000002.yaml").read_text()
    assert "max_steps: 6" in resumed and "resume: latest" in resumed
    (entry,) = [json.loads(x) for x in (run_copy / "resume_log.jsonl").read_text().splitlines()]
    assert entry["step"] == 2 and entry["checkpoint"].endswith("step_000002")
    assert entry["changed"]["train.max_steps"] == [4, 6]
    assert set(entry["changed"]) == {"train.max_steps", "run.name", "run.output_dir"}  # this copy was moved
    assert entry["environment"]["num_processes"] == 1
    assert _steps(run_copy) == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------------- 4. a resume with a new config
def test_a_resume_with_changed_training_keys_is_refused_with_the_list(
    tiny_fixtures: dict[str, Path], run_copy: Path
):
    before = _snapshot(run_copy)
    args = _args(
        tiny_fixtures,
        run_copy,
        "train.resume=latest",
        "train.max_steps=6",
        "optimizer.lr=0.01",
        "objective.beta=100",
        "data.sources.0.path=/elsewhere/pairs.parquet",
    )
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(TINY, args), show_progress=False).setup()
    problems = str(info.value).split("Resume with")[0]
    assert "optimizer.lr: 0.001 -> 0.01" in problems
    assert "objective.beta: 5000.0 -> 100.0" in problems
    assert 'data.sources.0.path: "' in problems and '-> "/elsewhere/pairs.parquet"' in problems
    assert "max_steps" not in problems  # a safe key: accepted
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize("recorded_config", [True, False])
def test_a_lora_rank_mismatch_names_the_ranks(
    tiny_fixtures: dict[str, Path], run_copy: Path, recorded_config: bool
):
    """The tiny config's rank is 4; without config.resolved.yaml the rank is read from the checkpoint's adapter."""
    if not recorded_config:
        (run_copy / "config.resolved.yaml").unlink()
    args = _args(
        tiny_fixtures,
        run_copy,
        "train.resume=latest",
        "train.max_steps=6",
        "model.lora.rank=2",
        "model.lora.alpha=2",
    )
    with pytest.raises(ConfigError, match=r"rank differs from the checkpoint \(checkpoint r=4, config r=2\)"):
        Trainer(load_config(TINY, args), show_progress=False).setup()


def test_the_per_process_batch_may_change_when_the_global_batch_stays(
    tiny_fixtures: dict[str, Path], run_copy: Path
):
    """The run: batch_size 4, one process. Half the batch with twice the accumulation is the same global batch."""
    same = check_run_dir(
        load_config(
            TINY,
            _args(
                tiny_fixtures,
                run_copy,
                "train.resume=latest",
                "train.max_steps=6",
                "train.batch_size=2",
                "train.gradient_accumulation_steps=2",
            ),
        )
    )
    assert same is not None
    assert same.changed["train.batch_size"] == (4, 2)
    with pytest.raises(ConfigError, match=r"train.batch_size: 4 -> 2 \(global batch 4 -> 2"):
        check_run_dir(
            load_config(
                TINY,
                _args(
                    tiny_fixtures, run_copy, "train.resume=latest", "train.max_steps=6", "train.batch_size=2"
                ),
            )
        )


def test_config_changes_compare_nested_keys_and_list_items():
    old = {"a": {"b": 1, "c": [1, 2]}, "s": [{"p": "x"}], "gone": 1}
    new = {"a": {"b": 2, "c": [1, 2]}, "s": [{"p": "y"}, {"p": "z"}]}
    assert config_changes(old, new) == {
        "a.b": (1, 2),
        "gone": (1, "<absent>"),
        "s.0.p": ("x", "y"),
        "s.1.p": ("<absent>", "z"),
    }


# ------------------------------------------------------------------------------------ 5. kill, resume, metrics
def test_after_a_kill_and_a_resume_metrics_have_each_step_once(
    tiny_fixtures: dict[str, Path], finished: Path, run_copy: Path
):
    """The kill is simulated by taking a finished run back to its state after step 3: the checkpoint of step 2,
    metrics up to step 3 and half a line of step 4, no final/. The resume trains steps 3 and 4 again."""
    shutil.rmtree(run_copy / "final")
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()[:3]
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "train/lo')
    _train(tiny_fixtures, run_copy, "train.resume=latest")
    assert _steps(run_copy) == [1, 2, 3, 4]
    a = load_file(str(finished / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run_copy / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    uninterrupted = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(uninterrupted, resumed):
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-6)


def test_after_a_kill_and_a_resume_tensorboard_shows_each_step_once(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    """The resume at step 2 purges the interrupted run's events after step 2 (SummaryWriter purge_step), as
    TensorBoard reads them (tensorboard's EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _train(tiny_fixtures, tmp_path / "runs" / "tb", "logging.tensorboard=true")
    shutil.rmtree(run_dir / "final")  # killed after step 4, before the final save
    _train(tiny_fixtures, run_dir, "logging.tensorboard=true", "train.resume=latest")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert _steps(run_dir) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- 3. the generate manifest
def _generate(base: Path, out: Path, *extra: str) -> int:
    from workbench.commands import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    argv = ["--base", str(base), "--steps", "2", "--device", "cpu", "-o", str(out), *extra]
    return generate.main(parser.parse_args(argv))


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_a_failed_generate_rerun_keeps_the_manifest_and_reruns_deduplicate(
    tiny_fixtures: dict[str, Path], tmp_path: Path
):
    out, red, blue = tmp_path / "gen", ["-p", "a red circle"], ["-p", "a blue square"]
    assert _generate(tiny_fixtures["sdxl"], out, *red, "--seeds", "0") == 0
    first = (out / "manifest.jsonl").read_bytes()
    with pytest.raises(ValueError, match="does not exist"):  # the base pipeline fails to load
        _generate(tmp_path / "no_such_model", out, *red, "--seeds", "0-1")
    assert (out / "manifest.jsonl").read_bytes() == first

    assert _generate(tiny_fixtures["sdxl"], out, *red, "--seeds", "0-1") == 0  # seed 0 again, seed 1 new
    rows = _manifest(out)
    assert sorted((r["prompt"], r["seed"], r["path"]) for r in rows) == [
        ("a red circle", 0, "base/p0000_s0.png"),
        ("a red circle", 1, "base/p0000_s1.png"),
    ]
    # prompt 0 is now another prompt: its seed-0 image replaces the red circle's file, and so its row
    assert _generate(tiny_fixtures["sdxl"], out, *blue, "--seeds", "0") == 0
    rows = _manifest(out)
    assert sorted((r["prompt"], r["seed"], r["path"]) for r in rows) == [
        ("a blue square", 0, "base/p0000_s0.png"),
        ("a red circle", 1, "base/p0000_s1.png"),
    ]
    assert not list(out.glob(".*tmp*"))
