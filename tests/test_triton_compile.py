"""Every Triton kernel of the backend compiles for sm_90 (no GPU needed), without register spills.

Compilation runs in a child process with ``TRITON_INTERPRET`` unset: a process that imported Triton
under the interpreter holds interpreted versions of Triton's own library functions (``tl.cumsum``...)
and cannot compile for a GPU. Spills are read from ``ptxas -v`` (Triton's bundled ptxas) on the PTX.
Run this file directly to see the per-kernel report.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ARCH = 90
BLOCK = 1024  # as in pecker_kernels/backends/triton.py
NUM_WARPS = 4

# Runtime argument types by name; the remaining non-constexpr arguments are fp32 scalars.
ARG_TYPES = {
    "items_ptr": "*i64",
    "addrs_ptr": "*i64",
    "prefix_ptr": "*i32",
    "hist_ptr": "*i32",
    "remaining_ptr": "*i64",
    "k_ptr": "*i64",
    "threshold_ptr": "*fp32",
    "take_ptr": "*i64",
    "ties_ptr": "*i64",
    "tie_base_ptr": "*i64",
    "counts_ptr": "*i64",
    "scalars_ptr": "*fp32",
    "num_segments": "i32",
}


def _cases(tl, passes):
    """(kernel name, constexprs) for every specialisation the backend launches (update: a cover)."""
    for dtype in (tl.float32, tl.float16, tl.bfloat16):
        for weighted in (False, True):
            for prefix_shift, digit_shift, _ in passes:
                yield (
                    "histogram",
                    dict(DTYPE=dtype, WEIGHTED=weighted, PREFIX_SHIFT=prefix_shift, DIGIT_SHIFT=digit_shift),
                )
            for g_column, w_column, columns in ((0, 1, 3), (1, 0, 7)):
                yield (
                    "tie_count",
                    dict(
                        DTYPE=dtype,
                        WEIGHTED=weighted,
                        G_COLUMN=g_column,
                        W_COLUMN=w_column,
                        NUM_COLUMNS=columns,
                    ),
                )
            yield "mask", dict(DTYPE=dtype, WEIGHTED=weighted)
        base = dict(
            DTYPE=dtype,
            STATE_DTYPE=tl.float32,
            WEIGHTED=False,
            KIND=0,
            HAS_M=True,
            L2=False,
            CLIP=False,
            NESTEROV=False,
            MOMENTUM_INIT=False,
            EMA=False,
            MAXIMIZE=False,
            MASK_IN=False,
            MASK_OUT=False,
            HAS_SCALARS=False,
        )
        for changes in (
            {},
            dict(WEIGHTED=True, CLIP=True, EMA=True, MASK_OUT=True),
            dict(KIND=1, HAS_M=False, L2=True, MASK_IN=True, MASK_OUT=True),
            dict(KIND=2, NESTEROV=True, L2=True, EMA=True),
            dict(KIND=2, MOMENTUM_INIT=True, MASK_IN=True),
            dict(KIND=2, HAS_M=False),
            dict(KIND=1, MAXIMIZE=True, CLIP=True, HAS_SCALARS=True),
            # Device step scalars: Adam with everything on, SGD with the run-time momentum_init.
            dict(WEIGHTED=True, CLIP=True, EMA=True, MASK_OUT=True, HAS_SCALARS=True),
            dict(KIND=2, L2=True, EMA=True, MASK_IN=True, MASK_OUT=True, HAS_SCALARS=True),
            # bf16 moments: Adam with both moments, Adam without the first, SGD with momentum.
            dict(
                STATE_DTYPE=tl.bfloat16, WEIGHTED=True, CLIP=True, EMA=True, MASK_OUT=True, HAS_SCALARS=True
            ),
            dict(STATE_DTYPE=tl.bfloat16, KIND=1, HAS_M=False, L2=True, MASK_IN=True),
            dict(STATE_DTYPE=tl.bfloat16, KIND=2, NESTEROV=True, L2=True, EMA=True, HAS_SCALARS=True),
        ):
            yield "update", {**base, **changes}
    for index, (_, _, bits) in enumerate(passes):
        yield "pick", dict(DIGIT_BITS=bits, FIRST=index == 0, LAST=index == len(passes) - 1, ROWS=1)


def _ptxas(triton) -> str | None:
    """The ptxas that Triton itself uses for this architecture (it understands Triton's PTX version)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(ARCH).path
    except (ImportError, AttributeError, RuntimeError):
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        found = [p for p in (bundled / "ptxas-blackwell", bundled / "ptxas") if p.exists()]
        return str(found[0]) if found else None


def _compile_all() -> list[dict]:
    """Compiles every case (in this process, which must not run the interpreter); one record each."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    kernels = importlib.import_module("pecker_kernels.backends.triton_kernels")
    ptxas = _ptxas(triton)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, constexprs in _cases(tl, kernels.PASSES):
            fn = kernels.KERNELS[name]
            assert isinstance(fn, triton.runtime.jit.JITFunction), type(fn)
            constexprs = {**constexprs, "BLOCK": BLOCK} if "BLOCK" in fn.arg_names else dict(constexprs)
            signature = {
                p.name: "constexpr" if p.is_constexpr else ARG_TYPES.get(p.name, "fp32") for p in fn.params
            }
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled = triton.compile(
                source, target=GPUTarget("cuda", ARCH, 32), options={"num_warps": NUM_WARPS}
            )
            ptx = compiled.asm["ptx"]
            record = {
                "kernel": name,
                "constexprs": {k: str(v) for k, v in constexprs.items()},
                "target_ok": f".target sm_{ARCH}" in ptx and bool(compiled.asm.get("cubin")),
                "spills": None,
            }
            if ptxas is not None:
                path = Path(tmp) / "kernel.ptx"
                path.write_text(ptx)
                arch = re.search(r"^\.target (sm_\w+)", ptx, re.MULTILINE).group(1)
                log = subprocess.run(
                    [ptxas, f"--gpu-name={arch}", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stderr
                found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
                record["spills"] = sum(int(a) + int(b) for a, b in found) if found else None
                record["registers"] = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
            records.append(record)
    return records


def test_every_kernel_compiles_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice; 1 is the default
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in records} == {"histogram", "pick", "tie_count", "mask", "update"}
    for record in records:
        assert record["target_ok"], record
        assert record["spills"] in (0, None), f"register spills: {record}"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
