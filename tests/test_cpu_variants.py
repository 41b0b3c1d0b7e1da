"""The CPU backend's other code paths -- the portable (non-AVX2) kernels and the exact radix select
that backs up the sampled bracket -- against the oracle: the CPU parity tests rerun in a child process
with the switch that forces each path (the switches are read once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "switch", [{"PECKER_CPU_ISA": "baseline"}, {"PECKER_CPU_SELECT": "radix"}], ids=["portable", "radix"]
)
def test_cpu_parity_holds_on_the_forced_path(switch):
    env = {**os.environ, **switch}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backend_parity.py"]
    result = subprocess.run(
        [*command, "-k", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
