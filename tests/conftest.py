"""Shared test setup: offline, CPU, few threads, tiny models built from config once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub download fails loudly
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SDXL and SD1.5 diffusers folders and a Pick-a-Pic-layout parquet (what configs/tiny point at)."""
    from workbench.tiny import write_tiny_fixtures

    return write_tiny_fixtures(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def workdir(tiny_fixtures: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory where the relative paths of configs/tiny resolve (.cache/tiny -> the fixtures)."""
    base = tiny_fixtures["sdxl"].parent.parent
    (base / ".cache").mkdir(exist_ok=True)
    link = base / ".cache" / "tiny"
    if not link.exists():
        link.symlink_to(tiny_fixtures["sdxl"].parent)
    monkeypatch.chdir(base)
    return base


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so in-process runs do not leak settings."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
    except Exception:  # pragma: no cover - accelerate internals moved
        pass
