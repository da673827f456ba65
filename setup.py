"""Build of kdops: the pure-Python package plus the native modules built by CMake.

``kdops._C`` (OpenMP CPU kernels) is always attempted and ``kdops._C_cuda`` (CUDA kernels) when
CMake finds nvcc. Without CMake or a working compiler the install still succeeds, without the
native modules (kdops then runs on its Triton and torch backends), after a warning.

Environment variables:
  KDOPS_NO_CUDA=1         do not build kdops._C_cuda
  KDOPS_REQUIRE_CUDA=1    fail unless both native modules build (for CI)
  KDOPS_NATIVE_ARCH=0     no -march=native for the CPU kernels (portable binaries)
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: all cores)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


class CMakeExtension(Extension):
    """A module built by the CMake project at the repository root (target = last name part)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], optional=True)
        self.target = name.rpartition(".")[2]


class CMakeBuild(build_ext):
    """Configures the CMake project once, then builds each extension's target into the place
    setuptools expects it (copied into the source tree for editable installs)."""

    def run(self) -> None:
        self._cmake = None  # the configured CMake: None not tried yet, "" failed, else its path
        super().run()

    def _skip(self, what: str, modules: str = "its native modules") -> None:
        """Warns that `modules` are not built because of `what` (an error under
        KDOPS_REQUIRE_CUDA=1)."""
        message = f"kdops: {what}; kdops is installed without {modules}"
        if _flag("KDOPS_REQUIRE_CUDA"):
            raise RuntimeError(f"{message} (an error because KDOPS_REQUIRE_CUDA=1)")
        print(f"\n{'=' * 78}\nWARNING: {message}\n{'=' * 78}\n", file=sys.stderr)

    def _build_dir(self) -> Path:
        return Path(self.build_temp).resolve() / "cmake"

    def _configure(self) -> str:
        """Configures the CMake project; returns the cmake executable, "" on failure."""
        cmake = shutil.which("cmake")
        if cmake is None:
            self._skip("cmake was not found (install cmake >= 3.18)")
            return ""
        try:
            import pybind11
        except ImportError:
            self._skip("pybind11 is not installed (pip install pybind11)")
            return ""
        args = [
            cmake,
            "-S", str(ROOT),
            "-B", str(self._build_dir()),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DKDOPS_NO_CUDA={'ON' if _flag('KDOPS_NO_CUDA') else 'OFF'}",
            f"-DKDOPS_REQUIRE_CUDA={'ON' if _flag('KDOPS_REQUIRE_CUDA') else 'OFF'}",
            f"-DKDOPS_NATIVE_ARCH={'OFF' if os.environ.get('KDOPS_NATIVE_ARCH') == '0' else 'ON'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        try:
            subprocess.run(args, check=True)
        except subprocess.CalledProcessError:
            self._skip("configuring the native build with CMake failed (see the output above)")
            return ""
        return cmake

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if self._cmake is None:
            self._cmake = self._configure()
        if not self._cmake:
            return
        # The module targets of the configured project (no _C_cuda without nvcc: CMake said why).
        if ext.target not in (self._build_dir() / "kdops_modules.txt").read_text().split(";"):
            return
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        try:
            build = [self._cmake, "--build", str(self._build_dir()), "--target", ext.target]
            subprocess.run(build + ["-j", jobs], check=True)
        except subprocess.CalledProcessError:
            self._skip(f"building {ext.name} failed (see the output above)", ext.name)
            return
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        built = self._build_dir() / (ext.target + sysconfig.get_config_var("EXT_SUFFIX"))
        shutil.copyfile(built, out)


setup(
    name="kdops",
    version="0.1.0",
    description="Fused knowledge-distillation losses for PyTorch (Triton, CUDA and CPU kernels)",
    python_requires=">=3.10",
    packages=find_packages(include=["kdops", "kdops.*"]),
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest"], "bench": ["matplotlib"],
                    "hf": ["transformers", "accelerate"],
                    # kdops.integrations.trl replaces functions of this TRL release (as the Makefile pins it)
                    "trl": ["trl==1.16.0", "transformers", "accelerate"]},
    entry_points={"console_scripts": ["kdops-bench=kdops.bench.cli:main", "kdops-cache=kdops.cache.__main__:main"]},
    ext_modules=[CMakeExtension("kdops._C"), CMakeExtension("kdops._C_cuda")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
