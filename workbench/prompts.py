"""Prompt sets for ``generate``, ``eval`` and ``synth``.

A prompt-set spec is one of:

* ``parti`` : PartiPrompts (1,632 prompts, bundled, Apache-2.0; see ``workbench/data/PartiPrompts.LICENSE.md``);
  ``parti:CATEGORY`` keeps one category (``parti:Animals``; case-insensitive);
* ``toy:heldout`` / ``toy:train`` / ``toy:all`` / ``toy:val`` / ``toy:gym_train``: the toy world's prompt splits (held-out prompts are never seen in
  pretraining or preference data);
* a file: ``.txt`` (one prompt per line; blank lines and ``#`` comments skipped), ``.tsv`` (column ``Prompt`` or
  ``prompt``, else the first column; a header row is required), ``.jsonl`` (field ``prompt`` or ``caption`` per line),
  or ``.json`` (a list of strings or of objects with ``prompt``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
PARTI_PATH = DATA_DIR / "PartiPrompts.tsv"
TOY_SPLITS = ("heldout", "train", "all", "val", "gym_train")


def load_prompts(spec: str, *, limit: int | None = None) -> list[str]:
    """The prompts named by ``spec`` (see the module docstring), in file order, optionally the first ``limit``."""
    kind, _, arg = spec.partition(":")
    if kind == "parti" and not Path(spec).exists():
        prompts = parti_prompts(arg or None)
    elif kind == "toy" and not Path(spec).exists():
        prompts = toy_prompts(arg or "heldout")
    else:
        prompts = read_prompt_file(spec)
    if not prompts:
        raise ValueError(f"prompt set {spec!r} is empty")
    return prompts[:limit] if limit is not None else prompts


def parti_prompts(category: str | None = None) -> list[str]:
    rows = _read_tsv(PARTI_PATH)
    if category is not None:
        known = sorted({r["Category"] for r in rows})
        rows = [r for r in rows if r["Category"].lower() == category.lower()]
        if not rows:
            raise ValueError(f"unknown PartiPrompts category {category!r}; known: {', '.join(known)}")
    return [r["Prompt"] for r in rows]


def toy_prompts(split: str = "heldout") -> list[str]:
    """The toy world's prompts: ``heldout``, ``train`` or ``all``."""
    if split not in TOY_SPLITS:
        raise ValueError(f"unknown toy prompt split {split!r}; use one of {', '.join(TOY_SPLITS)}")
    from workbench.toy import world

    return list(world.prompts(split))


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} not found; pass a .txt/.tsv/.jsonl/.json file, 'parti' or 'toy:heldout'"
        )
    suffix = p.suffix.lower()
    if suffix == ".tsv":
        rows = _read_tsv(p)
        if not rows:
            return []
        column = next((c for c in ("Prompt", "prompt", "caption") if c in rows[0]), next(iter(rows[0])))
        return [r[column] for r in rows if r[column]]
    text = _read_text(p)
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f'{p}:{n}: not JSON ({exc.msg}); each line is a string or {{"prompt": ...}}'
                    ) from None
                out.append(_prompt_of(item, f"{p}:{n}"))
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}:{exc.lineno}:{exc.colno}: not JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of prompts")
        return [_prompt_of(x, f"{p}[{i}]") for i, x in enumerate(data)]
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a non-UTF-8 file is refused with its line (prompts are text the model reads)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text; re-save the prompt file as UTF-8") from None


def _prompt_of(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "caption"):
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"{where}: expected a string or an object with a 'prompt' field, got {item!r:.80}")


def _read_tsv(path: Path) -> list[dict[str, str]]:
    text = _read_text(path)
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
