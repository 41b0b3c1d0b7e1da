"""SaliencyAccumulator: SalUn's |sum of (clipped) gradients| over a forget set."""

import pytest
import torch

import pecker_kernels as pk
from pecker_kernels.saliency import SaliencyAccumulator


def test_accumulated_sum_equals_the_direct_sum_of_clipped_batch_gradients():
    model = torch.nn.Linear(6, 2)
    accumulator = SaliencyAccumulator(model.parameters(), clip_norm=0.5)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for seed in range(4):
        model.zero_grad()
        model(torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, 0.5 / (float(norm) + 1e-6))
        for e, g in zip(expected, grads, strict=True):
            e += factor * g
        accumulator.accumulate()
    for got, want in zip(accumulator.gradients(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert accumulator.batches == 4


def test_salun_mask_uses_the_absolute_value_of_the_sum_not_the_sum_of_absolute_values():
    p = torch.nn.Parameter(torch.zeros(2))
    accumulator = SaliencyAccumulator([p])
    accumulator.accumulate([torch.tensor([5.0, 2.0])])
    accumulator.accumulate([torch.tensor([-5.0, 2.0])])  # element 0 cancels: |0| < |4|
    optimizer = pk.SalientAdamW([p], ratio=0.5, refresh_every=0)
    optimizer.compute_mask(accumulator.gradients())
    assert optimizer.masks()[0].tolist() == [False, True]


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="no parameters"):
        SaliencyAccumulator([])
    with pytest.raises(ValueError, match="clip_norm must be positive"):
        SaliencyAccumulator([torch.zeros(1)], clip_norm=0)
    with pytest.raises(ValueError, match="got 2 gradients for 1 parameters"):
        SaliencyAccumulator([torch.zeros(1)]).accumulate([torch.zeros(1), torch.zeros(1)])
