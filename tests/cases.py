"""Random inputs that stress the selection contract: ties, zeros, non-finite values, odd sizes."""

from __future__ import annotations

import torch

ODD_SIZES = (0, 1, 31, 33, 1000, 4097, 9001)
MANY_SMALL = tuple(1 + (i * 7) % 53 for i in range(150))


def gradients(sizes, dtype=torch.float32, seed=0, device="cpu", special=True) -> list[torch.Tensor]:
    """One gradient per size: normal values, a quarter snapped to a coarse grid (ties),
    exact zeros, and (``special``) a few NaN / +-inf."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        g = torch.randn(n, generator=gen)
        snap = torch.rand(n, generator=gen) < 0.25
        g = torch.where(snap, torch.round(g * 4) / 4, g)
        g[torch.rand(n, generator=gen) < 0.05] = 0.0
        if special and n > 2:
            g[torch.randint(n, (max(1, n // 500),), generator=gen)] = float("nan")
            g[torch.randint(n, (max(1, n // 700),), generator=gen)] = float("inf")
            g[torch.randint(n, (max(1, n // 900),), generator=gen)] = float("-inf")
        out.append(g.to(dtype).to(device))
    return out


def parameters(sizes, dtype=torch.float32, seed=1, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        p = torch.randn(n, generator=gen)
        p[torch.rand(n, generator=gen) < 0.1] = 0.5  # repeated weights make |g*w| ties too
        out.append(p.to(dtype).to(device))
    return out
