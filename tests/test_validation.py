"""Bad input gets a clear TypeError / ValueError and changes nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pecker_kernels as pk
from pecker_kernels.backends.base import empty_masks

CONFIG = pk.StepConfig.adam("adamw", lr=1e-2, step=1)


def _state(n=(10, 4)):
    params = [torch.randn(k) for k in n]
    grads = [torch.randn(k) for k in n]
    return params, grads, [torch.zeros(k) for k in n], [torch.zeros(k) for k in n]


def _call_and_check_nothing_changed(exception, match, **overrides):
    params, grads, m, v = _state()
    snapshot = [t.clone() for t in (*params, *m, *v)]
    kwargs = dict(exp_avg=m, exp_avg_sq=v, ratio=0.5)
    kwargs.update(overrides)
    with pytest.raises(exception, match=match):
        pk.masked_update(
            kwargs.pop("params", params), kwargs.pop("grads", grads), kwargs.pop("config", CONFIG), **kwargs
        )
    for before, after in zip(snapshot, (*params, *m, *v), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_zero_one_is_rejected(ratio):
    _call_and_check_nothing_changed(ValueError, "ratio must be in", ratio=ratio)


def test_ratio_of_the_wrong_type_is_rejected():
    _call_and_check_nothing_changed(TypeError, "ratio must be a float", ratio="half")


def test_unknown_score_scope_and_backend_are_rejected():
    _call_and_check_nothing_changed(ValueError, "unknown score 'hessian'", score="hessian")
    _call_and_check_nothing_changed(ValueError, "unknown scope 'layer'", scope="layer")
    _call_and_check_nothing_changed(ValueError, "unknown backend 'tpu'", backend="tpu")


def test_backend_not_available_for_the_device_is_rejected():
    _call_and_check_nothing_changed(
        ValueError, "backend 'cuda' is not available for tensors on cpu", backend="cuda"
    )


def test_integer_complex_and_mismatched_dtypes_are_rejected():
    _call_and_check_nothing_changed(
        TypeError,
        "expected float32, float16 or bfloat16",
        params=[torch.zeros(10, dtype=torch.int64), torch.zeros(4)],
    )
    _call_and_check_nothing_changed(
        TypeError,
        "expected float32, float16 or bfloat16",
        grads=[torch.zeros(10, dtype=torch.complex64), torch.zeros(4)],
    )
    _call_and_check_nothing_changed(
        TypeError,
        r"grads\[1\] has dtype torch.float16; expected torch.float32",
        grads=[torch.zeros(10), torch.zeros(4, dtype=torch.float16)],
    )
    _call_and_check_nothing_changed(
        TypeError,
        r"exp_avg_sq\[0\] has dtype torch.float64",
        exp_avg_sq=[torch.zeros(10, dtype=torch.float64), torch.zeros(4)],
    )


def test_wrong_shapes_counts_and_layouts_are_rejected():
    _call_and_check_nothing_changed(
        ValueError, r"grads\[0\] has shape \(9,\)", grads=[torch.zeros(9), torch.zeros(4)]
    )
    _call_and_check_nothing_changed(
        ValueError, "grads has 1 tensors but params has 2", grads=[torch.zeros(10)]
    )
    _call_and_check_nothing_changed(
        ValueError, "not contiguous", grads=[torch.zeros(20)[::2], torch.zeros(4)]
    )
    _call_and_check_nothing_changed(TypeError, "sparse", grads=[torch.zeros(10).to_sparse(), torch.zeros(4)])


def test_missing_or_superfluous_state_is_rejected():
    _call_and_check_nothing_changed(ValueError, "exp_avg_sq is required", exp_avg_sq=None)
    beta1_zero = pk.StepConfig.adam("adamw", lr=1e-2, step=1, betas=(0.0, 0.999))
    _call_and_check_nothing_changed(ValueError, "keeps no exp_avg", config=beta1_zero)


def test_bad_hyper_parameters_are_rejected():
    _call_and_check_nothing_changed(
        ValueError, "Invalid learning rate", config=pk.StepConfig.adam("adamw", lr=-1, step=1)
    )
    _call_and_check_nothing_changed(
        ValueError,
        "Nesterov momentum requires",
        config=pk.StepConfig.sgd(lr=0.1, nesterov=True),
        exp_avg=None,
        exp_avg_sq=None,
    )
    _call_and_check_nothing_changed(
        ValueError,
        "clip_value must be positive",
        config=pk.StepConfig.adam("adamw", lr=0.1, step=1, clip_value=0.0),
    )


@pytest.mark.parametrize(
    "scalars, exception, match",
    [
        ([1.0, 1.0, 1.0, 0.0, 0.0], TypeError, "config.scalars must be a float32 tensor"),
        (torch.zeros(5, dtype=torch.float64), TypeError, "config.scalars has dtype torch.float64"),
        (torch.zeros(4), ValueError, "config.scalars has 4 elements; expected 5"),
        (torch.zeros(10)[::2], ValueError, "config.scalars is not contiguous"),
        (torch.zeros(5, device="meta"), ValueError, "config.scalars is on meta but the params are on cpu"),
    ],
)
def test_step_scalars_of_the_wrong_type_size_layout_or_device_are_rejected(scalars, exception, match):
    config = dataclasses.replace(CONFIG, scalars=scalars)
    _call_and_check_nothing_changed(exception, match, config=config)


def test_exactly_one_of_ratio_and_masks_in():
    params, *_ = _state()
    _call_and_check_nothing_changed(ValueError, "exactly one of ratio", ratio=None)
    _call_and_check_nothing_changed(ValueError, "exactly one of ratio", masks_in=empty_masks(params))


def test_masks_of_the_wrong_size_or_type_are_rejected():
    _call_and_check_nothing_changed(
        ValueError,
        r"masks_in\[0\] has 2 words; a tensor of 10 elements needs 1",
        ratio=None,
        masks_in=[torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)],
    )
    _call_and_check_nothing_changed(
        TypeError,
        "packed bit mask",
        ratio=None,
        masks_in=[torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.int32)],
    )
    _call_and_check_nothing_changed(
        ValueError, "masks_out has 1 masks", masks_out=[torch.zeros(1, dtype=torch.int32)]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
@pytest.mark.gpu
def test_tensors_on_several_devices_are_rejected():
    _call_and_check_nothing_changed(
        ValueError, "is on cuda", grads=[torch.zeros(10), torch.zeros(4, device="cuda")]
    )


def test_tensors_on_several_devices_are_rejected_for_meta_too():
    _call_and_check_nothing_changed(
        ValueError, r"grads\[1\] is on meta", grads=[torch.zeros(10), torch.zeros(4, device="meta")]
    )


def test_topk_mask_rejects_grad_weight_without_weights():
    with pytest.raises(ValueError, match="needs weights"):
        pk.topk_mask([torch.randn(5)], 0.5, score="grad_weight")


def test_moments_must_be_fp32_or_bf16_alike_and_the_ema_fp32():
    bf16 = [torch.zeros(10, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
    _call_and_check_nothing_changed(
        TypeError,
        r"exp_avg\[0\] has dtype torch.float16; expected torch.float32 or torch.bfloat16",
        exp_avg=[torch.zeros(10, dtype=torch.float16), torch.zeros(4)],
    )
    _call_and_check_nothing_changed(
        TypeError,
        r"exp_avg\[0\] has dtype torch.bfloat16 but exp_avg_sq\[0\] has torch.float32",
        exp_avg=bf16,
    )
    with_ema = pk.StepConfig.adam("adamw", lr=1e-2, step=1, ema_decay=0.9)
    _call_and_check_nothing_changed(
        TypeError, r"ema\[0\] has dtype torch.bfloat16; expected torch.float32", config=with_ema, ema=bf16
    )
    params, grads, _, _ = _state()
    m, v = [t.clone() for t in bf16], [t.clone() for t in bf16]
    pk.masked_update(params, grads, CONFIG, exp_avg=m, exp_avg_sq=v, ratio=0.5)  # bf16 moments are fine
    assert all(t.dtype == torch.bfloat16 and bool(t.any()) for t in (*m, *v))
