"""Config error messages for keys inside union variants (optimizer, scheduler, ...) and the ``~key`` override."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.cli import main as cli_main
from workbench.config import ConfigError, load_config

CONFIGS = Path(__file__).parents[1] / "configs"


def _error(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


def test_typo_in_a_variant_names_the_variant_and_its_keys(capsys: pytest.CaptureFixture[str]):
    """``optimizer.lrr`` used to say ``Allowed keys here: .``: ``X | Y`` unions were not followed."""
    assert cli_main(["validate", str(CONFIGS / "toy" / "dpo.yaml"), "optimizer.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lrr: unknown key for optimizer 'adamw'." in err
    assert "Did you mean 'optimizer.lr'?" in err
    assert "Allowed keys for adamw: name, lr, weight_decay, betas, eps, implementation." in err


def test_switching_variant_by_override_says_which_key_is_left_over_and_how_to_fix_it():
    sdxl = CONFIGS / "sdxl" / "dpo.yaml"  # scheduler: {name: constant_with_warmup, warmup_steps: 200}
    msg = _error(sdxl, ["scheduler.name=constant"])
    assert "scheduler.warmup_steps: unknown key for scheduler 'constant'" in msg
    assert "warmup_steps belongs to constant_with_warmup / cosine" in msg
    assert "remove it with ~scheduler.warmup_steps" in msg
    assert "scheduler.name=constant_with_warmup" in msg
    assert "Allowed keys for constant: name." in msg
    # following the advice works
    cfg = load_config(sdxl, ["scheduler.name=constant", "~scheduler.warmup_steps"])
    assert cfg.scheduler.name == "constant"


def test_tilde_override_deletes_a_key_and_refuses_missing_ones():
    toy = CONFIGS / "toy" / "dpo.yaml"
    cfg = load_config(toy, ["~optimizer.weight_decay"])
    assert cfg.optimizer.weight_decay == pytest.approx(1e-2)  # back to the schema default
    assert "~optimizer.nope" in _error(toy, ["~optimizer.nope"])
    assert "no value" in _error(toy, ["~optimizer.lr=5e-4"])


def test_unknown_key_outside_unions_keeps_the_plain_message():
    msg = _error(CONFIGS / "toy" / "dpo.yaml", ["train.max_step=3"])
    assert "train.max_step: unknown key. Did you mean 'train.max_steps'? Allowed keys here: max_steps," in msg
