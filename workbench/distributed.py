"""The processes of an ``accelerate launch`` run, as the commands see them (training, ``synth``, ``eval``).

Nothing distributed is home-made: accelerate sets up the process group. Two of its behaviours need a guard, both
met on machines without GPUs (docs/scaling.md): ``PartialState()`` ignores ``ACCELERATE_USE_CPU`` (only
``AcceleratorState`` reads it), so torchrun-launched CPU processes would each set up no process group and believe
they are alone; and ``accelerate launch --cpu --num_processes 2`` starts one process, not two.
"""

from __future__ import annotations

import os
from typing import Any


def process_state() -> Any:
    """accelerate's ``PartialState`` for this process, on the CPU (gloo) when ``ACCELERATE_USE_CPU`` is set, checked
    against the launcher's ``WORLD_SIZE`` (:func:`check_launch`)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launch(state.num_processes, state.distributed_type)
    return state


def check_launch(num_processes: int, distributed_type: Any) -> None:
    """Refuse a run whose launcher started ``WORLD_SIZE`` processes that accelerate did not join into one group:
    each would work alone and overwrite the others' outputs."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes != launched:
        raise ValueError(
            f"launched as {launched} processes, but accelerate set up {num_processes} (distributed type "
            f"{distributed_type}): each process would work alone and overwrite the others' outputs. On machines "
            "without GPUs set ACCELERATE_USE_CPU=1 (and launch with configs/accelerate/cpu_2proc.yaml or "
            "--multi_gpu: `accelerate launch --cpu` starts one process); see docs/scaling.md"
        )
