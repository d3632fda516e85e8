"""Subcommands of the ``workbench`` CLI: each module has ``add_arguments(parser)`` and ``main(args) -> int``."""
