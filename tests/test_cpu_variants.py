"""The CPU backend's other code paths -- the portable kernels, the AVX2 ones where the CPU runs AVX-512,
and the exact radix select that backs up the sampled bracket -- against the oracle: the CPU parity tests
rerun in a child process with the switch that forces each path (the switches are read once per
process); and every vector copy's update bit for bit against the portable one."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .cases import ODD_SIZES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "switch",
    [{"PECKER_CPU_ISA": "baseline"}, {"PECKER_CPU_ISA": "avx2"}, {"PECKER_CPU_SELECT": "radix"}],
    ids=["portable", "avx2", "radix"],
)
def test_cpu_parity_holds_on_the_forced_path(switch):
    env = {**os.environ, **switch}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backend_parity.py"]
    result = subprocess.run(
        [*command, "-k", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def _raw_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


# Raw bits planted in every stream: a NaN with a payload, both infinities, the smallest subnormal, -0.
SPECIAL_BITS = {
    torch.float32: [0x7FC00001, -0x00800000, 0x7F800000, 0x00000001, -0x80000000],
    torch.bfloat16: [0x7FC1, -0x0080, 0x7F80, 0x0001, -0x8000],
    torch.float16: [0x7E01, -0x0400, 0x7C00, 0x0001, -0x8000],
}


def _plant_special_values(tensors: list[torch.Tensor], first: int) -> None:
    """Every 37th element from ``first`` becomes one of SPECIAL_BITS: frozen ones must keep those bits,
    updated ones round (NaN canonical, subnormals kept) as the portable loop does."""
    for t in tensors:
        at = torch.arange(t.numel())[first::37]
        bits = torch.tensor(SPECIAL_BITS[t.dtype], dtype=_raw_bits(t).dtype)
        _raw_bits(t).view(-1)[at] = bits[torch.arange(len(at)) % len(bits)]


def updated_bits() -> dict[str, torch.Tensor]:
    """Every update configuration of the parity tests, at every parameter and moment dtype, selected by
    score and from a stored mask, run by the CPU backend of this process: each result's raw bits."""
    from pecker_kernels.backends import cpu, eager
    from pecker_kernels.backends.base import empty_masks

    from .test_backend_parity import UPDATE_CONFIGS, _group, _ks

    sizes = (*ODD_SIZES, 70_000)  # tails of every length; more than one 32k chunk
    segments = [0] * len(sizes)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    state_dtypes = (torch.float32, torch.bfloat16)
    paths = ("grad", "grad_weight", "stored mask")
    out = {}
    for name, dtype, state_dtype, path in itertools.product(UPDATE_CONFIGS, dtypes, state_dtypes, paths):
        config = UPDATE_CONFIGS[name]
        group = _group(config, sizes, dtype, seed=3, state_dtype=state_dtype)
        # Seven values only in the last gradient: the threshold has thousands of ties, so the cut
        # between the ties taken and those left falls inside a block with more ties after it.
        ties = group.grads[-1]
        quarters = torch.randint(-3, 4, ties.shape, generator=torch.Generator().manual_seed(5))
        ties.copy_(quarters.to(ties.dtype) / 4)
        # Each stream at its own elements, so that selected elements (finite gradients) meet them too.
        for first, field in enumerate(("params", "grads", "exp_avg", "exp_avg_sq")):
            _plant_special_values(getattr(group, field) or [], first=5 + 6 * first)
        score = "grad_weight" if path == "grad_weight" else "grad"
        weights = group.params if score == "grad_weight" else None
        selection = eager.select(group.grads, weights, score, segments, _ks(sizes, segments, 0.4))
        masks = empty_masks(group.params)
        if path == "stored mask":
            eager.write_masks(group.grads, None, score, segments, selection, masks)
            cpu.update(group, config, score, segments, masks_in=masks)
        else:
            cpu.update(group, config, score, segments, selection=selection, masks_out=masks)
        key = f"{name}/{dtype}/{state_dtype}/{path}"
        for field in ("params", "exp_avg", "exp_avg_sq", "ema"):
            for i, t in enumerate(getattr(group, field) or []):
                out[f"{key}/{field}/{i}"] = _raw_bits(t)
        for i, m in enumerate(masks):
            out[f"{key}/mask/{i}"] = m
    return out


VECTOR_ISAS = ("avx2", "avx512")


def _bits_under(isa: str, path) -> dict:
    """updated_bits() in a fresh process running the ``isa`` kernels (PECKER_CPU_ISA asks for them)."""
    code = (
        "import torch; from pecker_kernels.backends import cpu; "
        "from tests.test_cpu_variants import updated_bits; "
        f"assert cpu.cpu_module.kernel_isa() == {isa!r}, cpu.cpu_module.kernel_isa(); "
        f"torch.save(updated_bits(), {str(path)!r})"
    )
    env = {**os.environ, "PECKER_CPU_ISA": isa}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=600)
    return torch.load(path)


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_vector_lanes_round_like_the_portable_loop(isa, tmp_path):
    """The vector updates run eight lanes per instruction (AVX2; AVX-512 with 32 registers and masked
    stores) and compile the common options away; the portable kernels run one element at a time through
    every option. Same bits, or the lanes drifted."""
    from pecker_kernels.backends import cpu

    best = cpu.cpu_module.kernel_isa()
    if VECTOR_ISAS.index(isa) > (VECTOR_ISAS.index(best) if best in VECTOR_ISAS else -1):
        pytest.skip(f"this CPU runs {best}: it has no {isa} kernels")
    portable, lanes = (
        _bits_under("baseline", tmp_path / "portable.pt"),
        _bits_under(isa, tmp_path / "lanes.pt"),
    )
    assert portable.keys() == lanes.keys()
    differ = [key for key in lanes if not torch.equal(lanes[key], portable[key])]
    assert not differ, f"{len(differ)} of {len(lanes)} results differ, first: {differ[:5]}"
