"""Reading files that may come from anyone: ``torch.load`` that never runs pickled code, with errors naming the file.

A ``.pt`` / ``.bin`` / ``.ckpt`` / ``.pkl`` file is a pickle, and unpickling runs whatever callables the file names
(a ``__reduce__`` returning ``(os.system, ("...",))``). Every such file the workbench reads goes through
:func:`load_torch_file`: ``torch.load(weights_only=True)``, whose unpickler accepts tensors, plain containers and
numbers (plus the numpy types of RNG states, :data:`RNG_SAFE_GLOBALS`) and refuses every other global before calling
it. A refusal becomes :class:`UnsafeFileError` naming the file and the global; a file that cannot be read at all
(truncated, bit flips, not a torch file) becomes :class:`CorruptFileError`. Both are ``ValueError``s, so the CLI
reports them as one message (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import codecs
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["RNG_SAFE_GLOBALS", "CorruptFileError", "UnsafeFileError", "load_torch_file"]

#: What an RNG-state file written by accelerate (``random_states_N.pkl``: numpy's ``get_state()`` and Python's
#: ``random.getstate()``) needs beyond torch's defaults; the same list accelerate's own ``load`` allows
#: (``accelerate/utils/other.py``, ``TORCH_SAFE_GLOBALS``). Each rebuilds plain numbers, never calls user code.
RNG_SAFE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct,  # pyright: ignore[reportAttributeAccessIssue]  # numpy's array rebuild helper
    np.ndarray,
    np.dtype,
    codecs.encode,
    np.dtypes.UInt32DType,
]


class UnsafeFileError(ValueError):
    """The file holds pickled code (a global that is not a tensor or plain data); it was not run."""


class CorruptFileError(ValueError):
    """The file cannot be read (truncated, damaged, or not a torch file)."""


def load_torch_file(path: str | Path, *, what: str, map_location: str = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with numpy RNG types allowed; errors name ``what`` and the file.

    ``mmap=True`` maps zip-format files lazily (tensor data is not read), which makes this a cheap safety check
    before a library loads the file itself; legacy (non-zip) files are read whole."""
    path = Path(path)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(RNG_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        opcode = re.search(r"Unsupported operand (\d+)", str(exc))
        name = found.group(1) if found is not None else None
        if name is None and opcode is not None:  # refused at an opcode (e.g. protocol 4's FRAME): look closer
            name = imported_global(path)
        if name is not None:
            raise UnsafeFileError(
                f"{what} {path}: refusing to load it: it holds pickled code ({name}), which would run on loading. "
                "Files the workbench writes hold only tensors and numbers; this one was altered or comes from "
                "elsewhere. Re-save its tensors as .safetensors in a trusted environment, or delete it."
            ) from None
        raise CorruptFileError(
            f"{what} {path}: cannot be read ({_first_line(exc)}); the file is damaged"
        ) from exc
    except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CorruptFileError(f"{what} {path}: the file is missing") from exc
        raise CorruptFileError(
            f"{what} {path}: cannot be read ({_first_line(exc)}); the file is truncated or damaged"
        ) from exc


def imported_global(path: Path) -> str | None:
    """The first global a pickle file imports that torch's weights-only unpickler does not allow, read with
    ``pickletools`` (nothing is executed; a torch zip file's ``data.pkl``, or the first pickle of any other file),
    or None when it imports none (or cannot be parsed)."""
    import pickletools

    from torch._weights_only_unpickler import (  # pyright: ignore[reportPrivateUsage]
        _get_allowed_globals,  # pyright: ignore[reportPrivateUsage]
    )

    allowed = set(_get_allowed_globals()) | {
        f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in RNG_SAFE_GLOBALS
    }
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                stream: Any = archive.open(member)
        else:
            stream = path.open("rb")
        with stream:
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    continue
                if name not in allowed:
                    return name
    except Exception:  # a damaged stream: not evidence of code
        return None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0][:200] if text else ""  # torch's reasons run on for several sentences
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
