"""Layouts shared between Python and the compiled kernels are defined once (csrc/include/pecker/codes.h)
and every Python copy matches them; every backend receives the settings ``kernel_params`` builds."""

import pytest
import torch

from pecker_kernels import distributed
from pecker_kernels.backends import base, cpu, native
from pecker_kernels.backends.base import STEP_PARAM_FIELDS, StepConfig, kernel_params

MODULES = [m for m in (native.cpu_module, native.cuda_module) if m is not None]


@pytest.fixture(params=MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def module(request):
    return request.param


def test_the_cpu_module_is_built():
    assert native.cpu_module is not None


def test_score_optimizer_and_dtype_codes_match_the_compiled_ones(module):
    assert module.CODES["score"] == base.SCORE_CODES
    assert module.CODES["optimizer"] == base.OPTIMIZER_CODES
    assert module.CODES["dtype"] == {str(d).removeprefix("torch."): c for d, c in base.DTYPE_CODES.items()}


def test_step_scalar_order_matches_the_compiled_one(module):
    assert sorted(module.STEP_SCALARS, key=module.STEP_SCALARS.get) == list(base.SCALARS)


def test_radix_digits_match_the_compiled_ones_in_every_python_copy(module):
    from pecker_kernels.backends import triton_kernels

    assert [tuple(d) for d in module.RADIX_DIGITS] == list(base.RADIX_DIGITS)
    assert module.RADIX_BINS == 1 << max(w for _, w in base.RADIX_DIGITS) == triton_kernels.NUM_BINS.value
    assert distributed._DIGITS == base.RADIX_DIGITS
    assert [(shift, width) for _, shift, width in triton_kernels.PASSES] == list(base.RADIX_DIGITS)
    assert module.MASK_WORD_BITS == base.MASK_WORD_BITS


def test_step_params_struct_has_exactly_the_fields_kernel_params_builds(module):
    fields = {name for name in dir(module.StepParams()) if not name.startswith("_")}
    assert fields == set(STEP_PARAM_FIELDS)


@pytest.mark.skipif(native.cuda_module is None, reason="_C_cuda not built (no nvcc)")
def test_cuda_tensor_table_columns_are_the_tensor_desc_fields_in_order():
    from pecker_kernels.backends import cuda

    offsets = native.cuda_module.TENSOR_DESC_OFFSETS
    assert len(cuda.TENSOR_COLUMNS) == native.cuda_module.TENSOR_DESC_FIELDS == 16
    for name, column in offsets.items():
        assert cuda.TENSOR_COLUMNS[column] == name, name
    assert set(cuda.TENSOR_COLUMNS) == set(offsets)


CONFIGS = [
    StepConfig.adam("adamw", lr=1e-3, step=3, betas=(0.9, 0.999), weight_decay=0.01, clip_value=1.0),
    StepConfig.adam("adam", lr=2e-4, step=1, betas=(0.0, 0.99), eps=1e-6, ema_decay=0.999, maximize=True),
    StepConfig.sgd(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4, momentum_init=True),
    StepConfig.sgd(lr=0.1, momentum=0.9, nesterov=True, maximize=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["adamw", "adam", "sgd", "nesterov"])
def test_kernel_params_coefficients_are_double_rounded_once_for_every_backend(config):
    k = kernel_params(config, has_exp_avg=True, has_ema=config.ema_decay is not None)
    assert tuple(k) == STEP_PARAM_FIELDS
    f32 = lambda x: torch.tensor(x, dtype=torch.float64).float().item()  # noqa: E731
    # 1 - beta2 computed in double then rounded, not 1 - float(beta2) (0.00099998713 for 0.999)
    assert f32(k["one_minus_beta2"]) == f32(1.0 - config.beta2)
    assert k["has_coefficients"] == 1 and k["maximize"] == int(config.maximize)
    # The compiled structs hold the fields as kernel_params gave them (float fields rounded once).
    for module in MODULES:
        sp = module.StepParams()
        for name, value in k.items():
            setattr(sp, name, value)
        for name, value in k.items():
            got = getattr(sp, name)
            assert got == (f32(value) if isinstance(value, float) else value), name
    # The cpu backend's struct is built the same way.
    sp = cpu._step_params(config, True, config.ema_decay is not None)
    assert all(getattr(sp, name) == pytest.approx(value, rel=1e-7) for name, value in k.items())


def test_float_one_minus_beta2_differs_from_the_double_rounded_one():
    # Why has_coefficients exists: the float derivation is 1.3e-5 off in relative terms.
    beta2 = torch.tensor(0.999, dtype=torch.float32)
    in_float = (1 - beta2).item()
    rounded_once = torch.tensor(1 - 0.999, dtype=torch.float64).float().item()
    assert in_float != rounded_once


class _Recorder:
    """Stands in for a Triton kernel: records the keyword arguments of each launch."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@pytest.mark.parametrize("config", CONFIGS, ids=["adamw", "adam", "sgd", "nesterov"])
def test_triton_update_receives_the_kernel_params_values(monkeypatch, config):
    from pecker_kernels.backends import triton, triton_kernels

    recorder = _Recorder()
    monkeypatch.setattr(triton_kernels, "_update_kernel", recorder)
    p, g = torch.ones(40), torch.ones(40)
    state = [torch.zeros(40)]
    group = base.TensorGroup(
        params=[p],
        grads=[g],
        exp_avg=state,
        exp_avg_sq=None if config.kind == "sgd" else [torch.zeros(40)],
        ema=[torch.zeros(40)] if config.ema_decay is not None else None,
    )
    triton.update(group, config, "grad", [0], masks_in=[torch.zeros(2, dtype=torch.int32)])
    (kwargs,) = recorder.calls
    k = kernel_params(config, has_exp_avg=True, has_ema=config.ema_decay is not None)
    same = {
        "lr": "lr",
        "decay": "decay_factor",
        "weight_decay": "weight_decay",
        "beta1_c": "one_minus_beta1",
        "beta2": "beta2",
        "beta2_c": "one_minus_beta2",
        "eps": "eps",
        "step_size": "step_size",
        "bias_correction2_sqrt": "bias_correction2_sqrt",
        "momentum": "momentum",
        "dampening_c": "one_minus_dampening",
        "clip_value": "clip_value",
        "ema_c": "one_minus_ema_decay",
    }
    assert {arg: kwargs[arg] for arg in same} == {arg: k[field] for arg, field in same.items()}
    flags = {"KIND": "kind", "CLIP": "has_clip", "NESTEROV": "nesterov", "EMA": "has_ema"}
    flags["MAXIMIZE"] = "maximize"
    assert {arg: int(kwargs[arg]) for arg in flags} == {arg: k[field] for arg, field in flags.items()}
