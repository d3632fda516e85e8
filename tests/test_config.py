"""Every shipped YAML validates (found recursively); typos and wrong types are refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.cli import main as cli_main
from workbench.config import ConfigError, load_config

CONFIGS = sorted(
    p
    for p in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml")
    if "accelerate" not in p.parts  # accelerate launch configs, not run configs (tests/test_multiprocess.py)
)


def test_configs_are_found():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_validates(path: Path):
    cfg = load_config(path)
    assert cfg.train.max_steps >= 1


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
model: {source: some/model}
data: {sources: [{format: pickapic_parquet, path: x.parquet}]}
objective: {name: diffusion_dpo}
train: {max_steps: 3}
"""


def test_typo_is_refused_with_the_dotted_key_and_a_suggestion(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), ["objective.betta=10"])
    assert "objective.betta: unknown key" in str(err.value)
    assert "objective.beta" in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), ["train.max_steps=many"])
    assert "train.max_steps" in str(err.value) and "'many'" in str(err.value)


def test_unknown_objective_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), ["objective.name=nope"])
    assert "objective.name" in str(err.value) and "diffusion_dpo" in str(err.value)


def test_overrides_and_scientific_notation(tmp_path: Path):
    cfg = load_config(
        _write(tmp_path, BASE + "optimizer: {name: adamw, lr: 5e-4}\n"), ["objective.beta=2000"]
    )
    assert cfg.optimizer.lr == pytest.approx(5e-4)
    assert cfg.objective.beta == 2000


def test_validate_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    good = _write(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.parquet").write_bytes(b"")  # the data path exists (validate checks that, not its rows)
    assert cli_main(["validate", str(good)]) == 0
    assert cli_main(["validate", str(good), "model.lroa.rank=4"]) == 2
    assert "model.lroa" in capsys.readouterr().err


def test_ls_lists_objectives(capsys: pytest.CaptureFixture[str]):
    assert cli_main(["ls", "objectives"]) == 0
    out = capsys.readouterr().out
    assert "diffusion_dpo" in out and "sft" in out


def test_list_items_can_be_overridden_by_index(tmp_path: Path):
    cfg = load_config(
        _write(tmp_path, BASE), ["data.sources.0.path=/data/shards", "validation.prompts=[a cat, a dog]"]
    )
    assert cfg.data.sources[0].path == "/data/shards"
    assert cfg.validation.prompts == ["a cat", "a dog"]
    with pytest.raises(ConfigError, match=r"data\.sources\.5\.path"):
        load_config(_write(tmp_path, BASE), ["data.sources.5.path=x"])
