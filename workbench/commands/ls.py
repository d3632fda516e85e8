"""``workbench ls``: registered objectives, scorers, samplers, noising methods and references."""

from __future__ import annotations

import argparse
import importlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind", nargs="?", choices=["objectives", "scorers", "samplers"], help="only this kind"
    )


def _first_line(obj: object) -> str:
    doc = getattr(obj, "description", "") or (getattr(obj, "__doc__", "") or "")
    return doc.strip().splitlines()[0] if doc.strip() else ""


def main(args: argparse.Namespace) -> int:
    from samplers.noising import NOISING
    from trainers import OBJECTIVES

    sections: dict[str, list[tuple[str, str]]] = {
        "objectives": [
            (n, f"{o.summary}  [data: {o.needs.data}, noising: {o.noising}, reference: {o.reference}]")
            for n, o in OBJECTIVES.items()
        ],
        "noising": [(n, m.summary) for n, m in NOISING.items()],
    }
    for kind, module, attr in (
        ("scorers", "rewards", "SCORERS"),
        ("samplers", "samplers", "SAMPLERS"),
        ("references", "workbench.references", "REFERENCES"),
    ):
        registry = getattr(importlib.import_module(module), attr, None)
        sections[kind] = [(n, _first_line(o)) for n, o in registry.items()] if registry is not None else []
    for kind, rows in sections.items():
        if args.kind and kind != args.kind:
            continue
        print(f"{kind}:")
        for name, doc in rows:
            print(f"  {name:28s} {doc}")
    return 0
