"""Output folders checked before anything slow happens: a command that will write into a folder finds out that it
cannot (a file in its place, a file as one of its parents, no permission, a read-only file system) before a model
loads, and says so naming the option and the path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def writable_folder(path: str | Path, option: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that a file can be written in it; returns it.

    Raises ``ValueError`` naming ``option`` (e.g. ``-o``) and the path when it is a file, lies under a file, cannot be
    created, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        where = f"{blocker} is a file, not a folder" if blocker is not None else str(exc)
        raise ValueError(f"{option} {out}: cannot create it: {where}; give another folder") from exc
    except OSError as exc:
        raise ValueError(
            f"{option} {out}: cannot create it ({exc.strerror or exc}); give a folder you can write to"
        ) from exc
    _probe(out, option)
    return out


def _probe(folder: Path, option: str) -> None:
    """Write and delete a small file in ``folder`` (permissions alone do not tell: root, read-only mounts, ACLs)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(
            f"{option} {folder} is not writable ({exc.strerror or exc}); give a folder you can write to"
        ) from exc
