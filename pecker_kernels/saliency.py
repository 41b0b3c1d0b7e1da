"""Saliency from a forget set: SalUn's |sum of gradients| accumulated over many batches on the device."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


class SaliencyAccumulator:
    """Sums the gradients of ``params`` over batches of a forget set, without leaving the device.

    ``score="grad"`` of the sum is SalUn's saliency ``|sum_b g_b|`` (the absolute value of the summed
    gradient, not the sum of absolute values). With ``clip_norm`` each batch's gradient is first scaled
    down to a global L2 norm of at most ``clip_norm`` (no host synchronisation: the scale is a tensor).

        accumulator = SaliencyAccumulator(generator.parameters(), clip_norm=1.0)
        for batch in forget_loader:
            generator.zero_grad(); forget_loss(batch).backward(); accumulator.accumulate()
        optimizer.compute_mask(accumulator.gradients())
    """

    def __init__(self, params: Iterable[Tensor], clip_norm: float | None = None) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("SaliencyAccumulator got no parameters")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self.clip_norm = clip_norm
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.batches = 0

    @torch.no_grad()
    def accumulate(self, grads: Sequence[Tensor | None] | None = None) -> None:
        """Add one batch: ``grads`` (one per parameter; default each parameter's ``.grad``)."""
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        present = [(s, g.float()) for s, g in zip(self.sums, grads, strict=True) if g is not None]
        if not present:
            return
        scale = None
        if self.clip_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in present]))
            scale = torch.clamp(self.clip_norm / (norm + 1e-6), max=1.0)
        for total, g in present:
            total.add_(g if scale is None else g * scale)
        self.batches += 1

    def gradients(self) -> list[Tensor]:
        """The summed gradients, shaped like the parameters (fp32)."""
        return self.sums
