"""A few optimizer steps with NVTX ranges, for Nsight Systems:

    nsys profile -t cuda,nvtx -o pecker python -m pecker_kernels.profile --device cuda --size 1e8

The timeline shows the ranges ``select``, ``write_masks`` and ``update`` of the domain ``pecker_kernels``
inside one ``step`` range per iteration.
"""

from __future__ import annotations

import argparse
import time

import torch

from .optim import SalientAdamW
from .profiling import nvtx_range


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=float, default=1e7, help="parameters in all")
    parser.add_argument("--tensors", type=int, default=8, help="split the parameters over this many tensors")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--refresh-every", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    per_tensor = max(1, int(args.size) // args.tensors)
    params = [torch.nn.Parameter(torch.randn(per_tensor, device=args.device)) for _ in range(args.tensors)]
    optimizer = SalientAdamW(
        params, lr=1e-4, ratio=args.ratio, refresh_every=args.refresh_every, backend=args.backend
    )
    for p in params:
        p.grad = torch.randn_like(p)
    for step in range(args.steps):
        start = time.perf_counter()
        with nvtx_range("step"):
            optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"step {step + 1}: {1e3 * (time.perf_counter() - start):.2f} ms")


if __name__ == "__main__":
    main()
