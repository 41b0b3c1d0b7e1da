"""The DDPM schedule (diffusers' ``DDPMScheduler``), DDIM sampling for the teacher's reference samples
(diffusers' ``DDIMScheduler``) and the one-step generator."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class Schedule:
    """The forward process of a ``DDPMScheduler`` (default: linear betas 1e-4..0.02, T = 1000):
    ``abar[t]`` is prod_{s<=t}(1 - beta_s), t = 0..T-1, as the scheduler computes it (float32)."""

    def __init__(self, scheduler: DDPMScheduler | None = None) -> None:
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler()
        self.steps = int(self.scheduler.config.num_train_timesteps)
        self.abar = self.scheduler.alphas_cumprod.detach().float().clone()
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler's prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        if self.steps < 2 or not torch.isfinite(self.abar).all() or not (self.abar > 0).all():
            raise ValueError("the scheduler needs T >= 2 and finite, positive alphas_cumprod")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Schedule:
        return cls(DDPMScheduler.from_config(config))

    @property
    def config(self) -> dict[str, Any]:
        """The scheduler's config (JSON-serialisable): what a run records to reuse its generator."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.scheduler.config).items()}

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)), each shaped (B, 1, 1, 1)."""
        a = self.abar.to(t.device)[t].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        s, n = self.coefficients(t)
        return s * x0 + n * eps

    def x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        s, n = self.coefficients(t)
        return (xt - n * eps) / s

    def eps_from_output(self, xt: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The noise prediction a network with this schedule's ``prediction_type`` makes."""
        if self.prediction_type == "epsilon":
            return out
        s, n = self.coefficients(t)
        if self.prediction_type == "sample":
            return (xt - s * out) / n
        return s * out + n * xt  # v = s eps - n x0


@torch.no_grad()
def ddim_sample(
    net: nn.Module,
    schedule: Schedule,
    labels: Tensor,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """Deterministic DDIM (eta = 0, "trailing" time steps from T - 1, x0 clipped to [-1, 1] and the noise
    recomputed from it) from pure noise: the teacher's samples for the reference metrics. ``net`` maps
    (x_t, t, c) to the noise prediction."""
    if steps < 1:
        raise ValueError(f"DDIM steps must be >= 1, got {steps}")
    sampler = DDIMScheduler.from_config(
        schedule.scheduler.config,
        timestep_spacing="trailing",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    sampler.set_timesteps(min(steps, schedule.steps))
    x = torch.randn((len(labels), *shape), generator=generator)
    for t in sampler.timesteps:
        tt = t.long().repeat(len(labels))
        x = sampler.step(net(x, tt, labels), int(t), x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


class OneStepGenerator(nn.Module):
    """G(z, c): the network evaluated once at ``t_init`` on x_init = sqrt(1 - abar) z (SFD/SiD's
    generator), returning x0 = (x_init - sqrt(1 - abar) eps) / sqrt(abar)."""

    def __init__(self, net: nn.Module, schedule: Schedule, t_init: int = 440) -> None:
        super().__init__()
        if not 0 <= t_init < schedule.steps:
            raise ValueError(f"t_init must be in [0, {schedule.steps}), got {t_init}")
        self.net, self.schedule, self.t_init = net, schedule, t_init

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        t = torch.full((len(z),), self.t_init, dtype=torch.long, device=z.device)
        s, n = self.schedule.coefficients(t)
        x_init = n * z
        return (x_init - n * self.net(x_init, t, labels)) / s
