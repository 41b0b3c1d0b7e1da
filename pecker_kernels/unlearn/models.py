"""The networks: a compact class-conditional UNet (teacher, generator and pseudo-score all share it) and
a small CNN classifier whose penultimate layer gives the features for Frechet distances."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps, shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)  # scale and shift (FiLM) from time + class
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class UNet(nn.Module):
    """eps(x_t, t, c): two resolutions (H and H/2), one ResBlock per level, FiLM conditioning."""

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        num_classes: int = 10,
        base: int = 16,
        emb_dim: int = 64,
    ) -> None:
        super().__init__()
        if image_size % 2:
            raise ValueError(f"UNet needs an even image size, got {image_size}")
        self.config = dict(
            image_size=image_size, channels=channels, num_classes=num_classes, base=base, emb_dim=emb_dim
        )
        c1, c2 = base, base * 3 // 2
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim)
        self.inp = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.pool = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, emb_dim)
        self.mid = ResBlock(c2, c2, emb_dim)
        self.up2 = ResBlock(c2 + c2, c2, emb_dim)
        self.up1 = ResBlock(c2 + c1, c1, emb_dim)
        self.out = nn.Sequential(_norm(c1), nn.SiLU(), nn.Conv2d(c1, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.config["emb_dim"])) + self.class_emb(c))
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.pool(h1), emb)
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], 1), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up1(torch.cat([h, h1], 1), emb)
        return self.out(h)


class Classifier(nn.Module):
    """Small CNN; ``features`` is the penultimate layer used for Frechet distances."""

    def __init__(
        self, image_size: int = 8, channels: int = 1, num_classes: int = 10, width: int = 32
    ) -> None:
        super().__init__()
        self.config = dict(image_size=image_size, channels=channels, num_classes=num_classes, width=width)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(8 * w, w),
            nn.ReLU(),
        )
        self.head = nn.Linear(w, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "classifier": Classifier}


def build(kind: str, config: dict[str, Any]) -> nn.Module:
    """A network of ``kind`` ("unet" or "classifier") from its recorded config."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of: {', '.join(MODELS)}")
    return MODELS[kind](**config)
