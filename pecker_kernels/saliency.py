"""Saliency from a forget set: SalUn's |sum of gradients| accumulated over many batches on the device."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .distributed import is_dtensor, like, local, resolve_group
from .validation import as_float


class ParamGradients(list):
    """A list of gradients that knows its parameters (``params``, index-aligned), so that
    ``optimizer.compute_mask`` matches each gradient to its parameter by identity, whatever the
    optimizer's param-group order."""

    def __init__(self, grads: Iterable[Tensor], params: Sequence[Tensor]) -> None:
        super().__init__(grads)
        self.params = list(params)


class SaliencyAccumulator:
    """Sums the gradients of ``params`` over batches of a forget set, without leaving the device.

    ``score="grad"`` of the sum is SalUn's saliency ``|sum_b g_b|`` (the absolute value of the summed
    gradient, not the sum of absolute values). With ``clip_norm`` each batch's gradient is first scaled
    down to a global L2 norm of at most ``clip_norm`` (no host synchronisation: the scale is a tensor).
    A batch with any non-finite gradient element is left out of the sums (on the device, no sync) and
    counted in ``skipped_batches``, so one overflow cannot turn every sum into NaN.

    Sharded parameters (FSDP2's DTensors) are summed shard by shard on each rank; the clipping norm and
    the non-finite test are over every rank's shards (one all-reduce a batch, so every rank accumulates
    the same batches), and ``gradients()`` returns DTensors laid out as the parameters.

        accumulator = SaliencyAccumulator(generator.parameters(), clip_norm=1.0)
        for batch in forget_loader:
            generator.zero_grad(); forget_loss(batch).backward(); accumulator.accumulate()
        optimizer.compute_mask(accumulator.gradients())  # matched to the optimizer's parameters
    """

    def __init__(self, params: Iterable[Tensor], clip_norm: float | None = None) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("SaliencyAccumulator got no parameters")
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise TypeError(f"params[{i}] must be a floating-point tensor")
        if clip_norm is not None and not as_float("clip_norm", clip_norm) > 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self._group = resolve_group(self.params)  # the shards' process group; None for plain tensors
        self.sums = [torch.zeros_like(local(p), dtype=torch.float32) for p in self.params]  # this rank's
        self.batches = 0
        # Batches left out for non-finite gradients: a device count, read only by skipped_batches.
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.sums[0].device)

    @torch.no_grad()
    def accumulate(self, grads: Sequence[Tensor | None] | None = None) -> None:
        """Add one batch: ``grads`` (one per parameter, its shape; default each parameter's ``.grad``;
        None for a parameter without one)."""
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        for i, (g, p) in enumerate(zip(grads, self.params, strict=True)):
            if g is None:
                continue
            if not isinstance(g, Tensor) or not g.is_floating_point():
                raise TypeError(f"gradient {i} must be a floating-point tensor")
            if g.shape != p.shape:  # would broadcast silently
                raise ValueError(
                    f"gradient {i} has shape {tuple(g.shape)}; its parameter has {tuple(p.shape)}"
                )
            if g.device != p.device:
                raise ValueError(f"gradient {i} is on {g.device}; its parameter is on {p.device}")
            if is_dtensor(g) != is_dtensor(p) or local(g).shape != local(p).shape:
                raise ValueError(
                    f"gradient {i} must be sharded as its parameter is (a DTensor of its layout)"
                )
        present = [(s, local(g).float()) for s, g in zip(self.sums, grads, strict=True) if g is not None]
        if self._group is None and not present:
            return
        home = self.sums[0].device
        # The batch's global norm is finite exactly when every element is (a norm that overflows fp32
        # leaves the batch out too): one flag, on the device. Shards: the norm over every rank's.
        norms = [torch.linalg.vector_norm(g).to(home) for _, g in present]
        if self._group is None:
            norm = torch.linalg.vector_norm(torch.stack(norms))
        else:  # every rank joins, with or without gradients of its own
            square = (
                torch.linalg.vector_norm(torch.stack(norms)) ** 2 if norms else torch.zeros((), device=home)
            )
            torch.distributed.all_reduce(square, group=self._group)
            norm = square.sqrt()
        finite = torch.isfinite(norm)
        scale = None if self.clip_norm is None else torch.clamp(self.clip_norm / (norm + 1e-6), max=1.0)
        for total, g in present:
            contribution = g if scale is None else g * scale.to(g.device)
            total.add_(torch.where(finite.to(g.device), contribution, torch.zeros_like(contribution)))
        self._skipped += (~finite).to(self._skipped.device, torch.int64)
        self.batches += 1

    @property
    def skipped_batches(self) -> int:
        """Batches left out for non-finite gradients (reads the device count back)."""
        return int(self._skipped)

    def gradients(self) -> ParamGradients:
        """The summed gradients, shaped like the parameters (fp32; DTensors for sharded parameters), as a
        list that knows its parameters."""
        return ParamGradients([like(s, p) for s, p in zip(self.sums, self.params, strict=True)], self.params)
