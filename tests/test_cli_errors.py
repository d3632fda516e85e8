"""Issue 14 part 3: every bad command-line input is one message on stderr and exit code 2, never a traceback;
unexpected errors keep their traceback and say they are a bug."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from workbench.cli import main

TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toy" / "dpo.yaml")


@pytest.fixture(autouse=True)
def _toy_data(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder where configs/toy/dpo.yaml's data path (runs/toy_dpo_pairs) exists, so that `validate TOY`
    passes its data check, and where no earlier run of that name lies."""
    work = tmp_path_factory.mktemp("work")
    (work / "runs" / "toy_dpo_pairs").mkdir(parents=True)
    (work / "runs" / "toy_dpo_pairs" / "shard-0.parquet").write_bytes(b"")  # validate only looks for it
    monkeypatch.chdir(work)
    return work


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, command: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert f"workbench {command}: error:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# ----------------------------------------------------------------------------------------------- the CLI itself
def test_user_error_is_one_message(capsys, tmp_path):
    code, err = run(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert_user_error(code, err, "validate", "config file not found", "missing.yaml")
    assert len(err.strip().splitlines()) == 1


def test_os_error_names_the_path(capsys, monkeypatch, tmp_path):
    from workbench.commands import ls

    def boom(args):
        (tmp_path / "nope" / "x.txt").read_text()

    monkeypatch.setattr(ls, "main", boom)
    code, err = run(capsys, "ls")
    assert_user_error(code, err, "ls", str(tmp_path / "nope" / "x.txt"), "No such file or directory")
    assert "[Errno" not in err


def test_non_utf8_text_names_the_file(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {source: caf\xe9}\n".encode("latin-1"))
    code, err = run(capsys, "validate", str(path))
    assert_user_error(code, err, "validate", str(path), "UTF-8")


def test_unexpected_error_keeps_the_traceback_and_says_bug(capsys, monkeypatch):
    from workbench.commands import ls

    def boom(args):
        raise RuntimeError("kaput")

    monkeypatch.setattr(ls, "main", boom)
    code, err = run(capsys, "ls")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: kaput" in err
    assert "workbench ls: unexpected error (RuntimeError)" in err and "bug" in err and "report" in err


def test_traceback_env_shows_user_error_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_TRACEBACK", "1")
    code, err = run(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 2 and "Traceback" in err and "workbench validate: error: config file not found" in err


def test_overrides_after_flags(capsys):
    """`validate CONFIG --print key=value`: argparse left the override over ("unrecognized arguments")."""
    assert main(["validate", TOY, "--print", "train.max_steps=3", "run.name=after_flag"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "name: after_flag" in out
    with pytest.raises(SystemExit) as exc:  # an unknown flag stays argparse's usage error (exit code 2)
        main(["validate", TOY, "--bogus", "train.max_steps=3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- config cases
def test_yaml_syntax_error_names_file_line_and_column(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\n   seed: 1\n")
    code, err = run(capsys, "validate", str(path))
    assert_user_error(
        code, err, "validate", f"{path}:3:8: YAML syntax error", "mapping values are not allowed"
    )
    path.write_text("train: {max_steps: [1\nmodel: x\n")
    code, err = run(capsys, "validate", str(path))
    assert_user_error(code, err, "validate", f"{path}:2:", "line 1, column 20")


def test_override_that_is_not_yaml(capsys):
    code, err = run(capsys, "validate", TOY, "train.max_steps=[")
    assert_user_error(code, err, "validate", "override 'train.max_steps=['", "not valid YAML")
    code, err = run(capsys, "validate", TOY, "run=${run}")
    assert_user_error(code, err, "validate", "override 'run=${run}'", "cannot refer to the config")
    assert "full_key" not in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=true", "train.max_steps: expected an integer, got the boolean true"),
        ("optimizer.lr=false", "optimizer.lr: expected a number, got the boolean false"),
        ("objective.beta=true", "objective.beta: expected a number, got the boolean true"),
    ],
)
def test_booleans_are_not_numbers(capsys, override, expected):
    code, err = run(capsys, "validate", TOY, override)
    assert_user_error(code, err, "validate", expected)


def test_booleans_stay_booleans(capsys):
    assert main(["validate", TOY, "run.deterministic=true", "train.scale_lr=false"]) == 0


def test_noising_without_name_lists_the_choices(capsys):
    code, err = run(capsys, "validate", TOY, "noising.eta=0.5")
    assert_user_error(
        code, err, "validate", "noising: needs a 'name'", "forward", "ddim_inversion", "~noising"
    )


def test_unknown_validation_scorer_is_refused(capsys):
    code, err = run(capsys, "validate", TOY, "validation.scorers=[no_such_scorer]")
    assert_user_error(
        code, err, "validate", "'no_such_scorer' is not a registered scorer", "jpeg_compressibility"
    )
    assert "(got {" not in err  # no dump of the whole config
    code, err = run(capsys, "validate", TOY, "validation.scorer_options={hpsv2: {path: x}}")
    assert_user_error(code, err, "validate", "validation.scorer_options.hpsv2", "not in validation.scorers")
    assert main(["validate", TOY, "validation.scorers=[jpeg_compressibility]"]) == 0


def test_resume_path_that_does_not_exist_is_refused_before_loading(capsys, tmp_path):
    code, err = run(capsys, "validate", TOY, "train.resume=lastest")
    assert_user_error(
        code, err, "validate", "train.resume: lastest is not a folder", "Did you mean train.resume=latest?"
    )
    code, err = run(capsys, "train", TOY, f"train.resume={tmp_path / 'nope'}", f"run.output_dir={tmp_path}")
    assert_user_error(code, err, "train", "is not a folder", "step_000500")
    assert "Did you mean" not in err and not any(tmp_path.iterdir())  # refused before the run folder exists
    assert main(["validate", TOY, "train.resume=latest"]) == 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw_8bit_without_bitsandbytes_is_refused_at_validate_time(capsys):
    code, err = run(capsys, "validate", TOY, "optimizer.name=adamw_8bit")
    assert_user_error(code, err, "validate", "bitsandbytes", "pip install '.[gpu]'", "optimizer.name=adamw")


def test_decode_error_anywhere_names_the_file_being_read(capsys, monkeypatch, tmp_path):
    from workbench.commands import ls

    path = tmp_path / "captions.txt"
    path.write_bytes(b"ok\n\xff\xfe broken\n")

    def reads(args):
        return len(path.read_text(encoding="utf-8"))

    monkeypatch.setattr(ls, "main", reads)
    code, err = run(capsys, "ls")
    assert_user_error(code, err, "ls", f"{path}: not valid utf-8 text", "offset 3", "re-save it as UTF-8")


# ------------------------------------------------------------------------------------------------ command cases
@pytest.mark.parametrize(
    ("seeds", "expected"),
    [
        ("5-1", "the range '5-1' is empty (it descends); write 1-5"),
        ("-3", "cannot read '-3'"),
        (",", "no seeds"),
    ],
)
def test_bad_seeds(capsys, tmp_path, seeds, expected):
    code, err = run(
        capsys, "generate", "--prompt", "a red circle", f"--seeds={seeds}", "-o", str(tmp_path / "g")
    )
    assert_user_error(code, err, "generate", "--seeds", expected)
    assert not (tmp_path / "g").exists()  # refused before anything is written


def test_generate_output_that_is_a_file_or_under_one(capsys, tmp_path):
    (tmp_path / "taken").write_text("x")
    code, err = run(capsys, "generate", "--prompt", "a", "-o", str(tmp_path / "taken"))
    assert_user_error(code, err, "generate", f"-o {tmp_path / 'taken'} is a file; pass a folder")
    code, err = run(capsys, "generate", "--prompt", "a", "-o", str(tmp_path / "taken" / "sub"))
    assert_user_error(code, err, "generate", str(tmp_path / "taken"))


def test_missing_prompt_set_file(capsys, tmp_path):
    code, err = run(capsys, "generate", "--prompts", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "g"))
    assert_user_error(code, err, "generate", "prompt file", "nope.txt", "not found", "toy:heldout")


def _image(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "a.png")
    return folder


def test_score_missing_or_non_utf8_prompts_file(capsys, tmp_path):
    images = _image(tmp_path / "imgs")
    code, err = run(
        capsys,
        "score",
        str(images),
        "--prompts-file",
        str(tmp_path / "nope.txt"),
        "--scorer",
        "jpeg_compressibility",
    )
    assert_user_error(code, err, "score", f"--prompts-file {tmp_path / 'nope.txt'}: no such file")
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a red circle\ncaf\xe9\n")
    code, err = run(
        capsys, "score", str(images), "--prompts-file", str(bad), "--scorer", "jpeg_compressibility"
    )
    assert_user_error(code, err, "score", f"{bad}:2: not UTF-8")


def test_scorer_option_of_the_wrong_type(capsys, tmp_path):
    images = _image(tmp_path / "imgs")
    code, err = run(
        capsys, "score", str(images), "--prompt", "a", "--scorer", "jpeg_compressibility:quality=abc"
    )
    assert_user_error(code, err, "score", "quality='abc' must be an integer in 1..100")
    code, err = run(
        capsys, "score", str(images), "--prompt", "a", "--scorer", "jpeg_compressibility:quality=true"
    )
    assert_user_error(code, err, "score", "quality=True must be an integer")


def test_export_takes_a_run_folder(capsys, tiny_fixtures: dict[str, Path], tmp_path):
    """`export --checkpoint RUN` resolves RUN/final/lora as `generate -c RUN` does; an unfinished run says which
    checkpoint to pass; a bad output path is refused before the base loads."""
    from workbench.config import ModelSection
    from workbench.models import save_lora, setup_training_components

    base = str(tiny_fixtures["sdxl"])
    comps = setup_training_components(ModelSection(source=base))
    save_lora(comps.unet, tmp_path / "run" / "final" / "lora", "sdxl")
    out = tmp_path / "merged.safetensors"
    argv = ["export", base, str(out), "--checkpoint", str(tmp_path / "run"), "--dtype", "fp32"]
    code, err = run(capsys, *argv)
    assert_user_error(code, err, "export", "is a LoRA; pass --fuse-lora")
    assert main([*argv, "--fuse-lora"]) == 0 and out.is_file()
    (tmp_path / "unfinished" / "checkpoints" / "step_000002").mkdir(parents=True)
    code, err = run(capsys, "export", base, str(out), "--checkpoint", str(tmp_path / "unfinished"))
    assert_user_error(code, err, "export", "training run without final/", "step_000002")
    code, err = run(capsys, "export", base, str(tmp_path), "--checkpoint", str(tmp_path / "run"))
    assert_user_error(code, err, "export", "is a folder; pass a file path")


# --------------------------------------------------------------------------------------------- override fuzzing
def _schema_paths() -> list[str]:
    """Dotted paths of the run schema (every variant of every union, list items as index 0): real keys to fuzz."""
    from pydantic import BaseModel

    from workbench.config import RunConfig, _members, refresh_schema

    refresh_schema()
    out: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            out.append(path)
            for member in _members(field.annotation):
                if isinstance(member, type) and issubclass(member, BaseModel):
                    walk(member, f"{path}.")
                for arg in getattr(member, "__args__", ()):
                    if isinstance(arg, type) and issubclass(arg, BaseModel):
                        walk(arg, f"{path}.0.")

    walk(RunConfig, "")
    return sorted(set(out))


def test_config_override_fuzz_never_shows_a_traceback(capsys):
    """Random keys (real schema paths, near misses, junk) and YAML-ish values through `workbench validate`: the user
    sees exit code 0 or one message with exit code 2, never a traceback (issue 14 part 3)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    paths = _schema_paths()
    keys = st.one_of(
        st.sampled_from(paths),
        st.builds(
            lambda p, s: p + s, st.sampled_from(paths), st.sampled_from([".x", ".0", "s", ".name", "..", ""])
        ),
        st.text(alphabet="abcxyz._0123~[]$@é ", min_size=0, max_size=12),
    )
    values = st.one_of(
        st.sampled_from(
            [
                "true",
                "no",
                "null",
                "~",
                "[]",
                "{}",
                "[1, 2]",
                "{name: x}",
                "[",
                "{a",
                "'",
                '"',
                "${oops}",
                "nan",
                "-1",
                "0",
                "1e999",
                "1e-9",
                "forward",
                "adamw_8bit",
                "lora",
                "sd15",
                "random",
                "[no_such_scorer]",
                "{hpsv2: {path: x}}",
                "é",
                "",
            ]
        ),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(str),
        st.text(max_size=10),
    )
    override = st.one_of(
        st.builds(lambda k, v: f"{k}={v}", keys, values),
        st.builds(lambda k: f"~{k}", keys),
        keys,
    )

    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: CI never turns red by chance
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(st.lists(override, min_size=1, max_size=4))
    def check(overrides: list[str]) -> None:
        try:
            code = main(["validate", TOY, *overrides])
        except (
            SystemExit
        ) as exc:  # argparse usage errors (an override that looks like a flag) exit 2 themselves
            code = exc.code
        err = capsys.readouterr().err
        assert code in (0, 2), (overrides, err)
        assert "Traceback" not in err, (overrides, err)

    check()


def test_non_utf8_jsonl_row_is_skipped_and_reported_by_row(tmp_path):
    """A pair JSONL with one Latin-1 row: that row is skipped with its file:line, the others are read (before: a
    UnicodeDecodeError out of the reader, no row named)."""
    from PIL import Image

    from workbench.data import read_records

    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    good = '{"prompt": "p1", "image_0": "a.png", "image_1": "b.png", "prefer_0": 0, "prefer_1": 1}\n'
    bad = '{"prompt": "caf\xe9", "image_0": "a.png", "image_1": "b.png", "prefer_0": 1, "prefer_1": 0}\n'
    (tmp_path / "pairs.jsonl").write_bytes(good.encode() + bad.encode("latin-1") + good.encode())
    records, report = read_records([{"format": "pair_jsonl", "path": str(tmp_path / "pairs.jsonl")}])
    assert len(records) == 2
    assert [rid for rid, _ in report.skipped] == ["pairs.jsonl:2"]
    assert "not UTF-8" in report.skipped[0][1]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.txt", b"a red circle\ncaf\xe9\n", "p.txt:2: not UTF-8"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "p.jsonl:2: not JSON"),
        ("p.json", b'["a",\n "b"\n', "p.json:3:1: not JSON"),
        ("p.tsv", b"Prompt\n\xff\n", "p.tsv:2: not UTF-8"),
    ],
)
def test_bad_prompt_file_names_file_and_line(capsys, tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    code, err = run(capsys, "generate", "--prompts", str(tmp_path / name), "-o", str(tmp_path / "g"))
    assert_user_error(code, err, "generate", str(tmp_path / expected))
