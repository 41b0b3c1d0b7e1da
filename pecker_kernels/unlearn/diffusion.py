"""DDPM schedule (epsilon prediction, linear betas), the teacher's sampler and the one-step generator."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Schedule:
    """Linear beta schedule; ``abar[t]`` is prod_{s<=t}(1 - beta_s), t = 0..T-1."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        self.steps = steps
        self.betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.abar = torch.cumprod(1 - self.betas, 0).float()

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


@torch.no_grad()
def ddim_sample(
    net: nn.Module,
    schedule: Schedule,
    labels: Tensor,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from pure noise: the teacher's samples for the reference metrics."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = torch.randn((len(labels), *shape), generator=generator)
    times = torch.linspace(schedule.steps - 1, 0, steps).round().long()
    for i, t in enumerate(times):
        tt = t.repeat(len(labels))
        s_t, n_t = schedule.coefficients(tt)
        x0 = ((x - n_t * net(x, tt, labels)) / s_t).clamp(-1, 1)
        if i + 1 == len(times):
            return x0
        # Recompute eps from the clamped x0 so the trajectory stays consistent with it.
        eps = (x - s_t * x0) / n_t
        s_next, n_next = schedule.coefficients(times[i + 1].repeat(len(labels)))
        x = s_next * x0 + n_next * eps
    return x


class OneStepGenerator(nn.Module):
    """G(z, c): the UNet evaluated once at ``t_init`` on x_init = sqrt(1 - abar) z (SFD/SiD's generator)."""

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
