"""Named samplers: each maps a pipeline's scheduler config to a diffusers scheduler.

``Scheduler.from_config(pipe.scheduler.config)`` keeps the model's noise schedule (betas, zero-terminal-SNR
rescaling, timestep spacing, prediction type) and only swaps the integration rule. The factories copy the config into
a plain ``dict``: ``from_config`` treats any non-dict argument as a (deprecated) model name or path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from workbench.registry import Registry

SchedulerFactory = Callable[[Mapping[str, Any]], Any]

#: sampler name -> factory(scheduler_config) -> diffusers scheduler. Listed by ``workbench ls``.
SAMPLERS: Registry[SchedulerFactory] = Registry("sampler")


@SAMPLERS.register("ddim")
def ddim(config: Mapping[str, Any]) -> Any:
    """DDIM, deterministic (eta = 0); Song et al. 2021, eq. 12. No sample clipping (latent space)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config), clip_sample=False)


@SAMPLERS.register("euler")
def euler(config: Mapping[str, Any]) -> Any:
    """Euler (Karras et al. 2022, Algorithm 2 without churn): first-order ODE steps in sigma."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(dict(config))


@SAMPLERS.register("dpmpp_2m")
def dpmpp_2m(config: Mapping[str, Any]) -> Any:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep, data prediction."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(dict(config), algorithm_type="dpmsolver++", solver_order=2)


def make_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """The scheduler for sampler ``name`` built from a pipeline's scheduler ``config``."""
    return SAMPLERS.get(name)(config)
