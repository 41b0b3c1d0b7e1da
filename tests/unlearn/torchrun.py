"""Runs the command line under torchrun, as the distributed tests need it."""

import os
import subprocess
import sys


def torchrun(nproc: int, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m pecker_kernels ARGV`` on ``nproc`` local ranks. ``--standalone`` picks a free port (no
    clash with another job on 29500); the fault handler prints every rank's Python stack if one aborts."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(
        [*cmd, "-m", "pecker_kernels", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )
