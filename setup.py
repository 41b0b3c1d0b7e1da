"""Build driver: runs CMake (Ninja) and places the compiled modules inside the package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _with_cuda() -> bool:
    if os.environ.get("PECKER_NO_CUDA"):
        return False
    return bool(os.environ.get("CUDACXX") or shutil.which("nvcc"))


class CMakeBuild(build_ext):
    """One CMake build produces every module; later extensions find theirs already built."""

    def build_extension(self, ext: Extension) -> None:
        if Path(self.get_ext_fullpath(ext.name)).exists() and ext.name != "pecker_kernels._C":
            return
        # All modules land next to the first one's path (pecker_kernels/ in place, or build/lib).
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("PECKER_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPECKER_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        # Always explicit: CMake's cache would otherwise keep the choice of an earlier configure.
        configure.append(f"-DPECKER_WITH_CUDA={'ON' if _with_cuda() else 'OFF'}")
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


modules = ["pecker_kernels._C"] + (["pecker_kernels._C_cuda"] if _with_cuda() else [])
setup(ext_modules=[CMakeExtension(name) for name in modules], cmdclass={"build_ext": CMakeBuild})
