"""The CUDA kernels compile for Hopper (sm_90 and sm_90a) without a GPU, warning-free and without
register spills in any kernel (read from ptxas's report). Skipped only where nvcc is absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_90", "sm_90a")


def _nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(source: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    # --cubin: device code only (no host compile); one job per (file, arch) keeps both cores busy.
    cmd = [NVCC, "-std=c++17", "-O3", "--cubin", f"-arch={arch}", "-Xptxas", "-v", "-Werror", "all-warnings"]
    cmd += [
        "-I",
        str(ROOT / "csrc" / "include"),
        str(source),
        "-o",
        str(out_dir / f"{source.stem}.{arch}.cubin"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[tuple[Path, str], subprocess.CompletedProcess]:
    out_dir = tmp_path_factory.mktemp("cuda_compile")
    # Largest first, so the workers finish at about the same time.
    jobs = [(src, arch) for src in sorted(SOURCES, key=lambda p: -p.stat().st_size) for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda job: _compile(*job, out_dir), jobs))
    return dict(zip(jobs, results, strict=True))


def test_sources_exist():
    assert SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_spills(reports, source, arch):
    result = reports[(source, arch)]
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed for {source.name} ({arch}):\n{log}"
    # ptxas prints, per function, "Compiling entry function '<name>' for '<arch>'", then its
    # "Function properties" with a "N bytes spill stores, M bytes spill loads" line.
    entries = _ENTRY.findall(log)
    spills = _SPILLS.findall(log)
    assert entries, f"ptxas reported no kernels:\n{log}"
    assert {a for _, a in entries} == {arch}, log
    assert len(spills) >= len(entries), log
    bad = [
        (kernel, s, ld)
        for (kernel, _), (s, ld) in zip(entries, spills, strict=False)
        if s != "0" or ld != "0"
    ]
    assert not bad, f"register spills (kernel, bytes stored, bytes loaded): {bad}"
    assert all(s == "0" and ld == "0" for s, ld in spills), log
