"""Run sparsecnn's CUDA kernels on the CPU: the same source compiled by g++ against cuda_emu.h.

`EmuBackend` has the launch interface of runtimes.csr_kernels.NvrtcBackend; the plans run
unchanged on CPU tensors (their data pointers are host pointers here). Each CUDA thread is
a host thread, so keep the problems small.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sparsecnn.runtimes.csr.kernels import all_expressions
from sparsecnn.runtimes.nvrtc import KERNEL_DIRS, kernel_sources

HERE = Path(__file__).parent


def available() -> bool:
    return shutil.which("g++") is not None


def _library(filename: str, dtypes=(torch.float32, torch.float16)) -> tuple[ctypes.CDLL, dict[str, str]]:
    exprs = [e for d in dtypes for e in all_expressions(filename, d)]
    lines = ["#define SPARSECNN_EMU 1", f'#include "{filename}"']
    symbols = {}
    for i, expr in enumerate(exprs):
        sym = f"emu_launch_{i}"
        symbols[expr] = sym
        lines.append(f'extern "C" void {sym}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, '
                     f'const void* params) {{ emu::launch_params(&{expr}, dim3(gx, gy, gz), dim3(bx), smem, params); }}')
    return compile_library(filename, "\n".join(lines) + "\n"), symbols


def compile_library(filename: str, source: str) -> ctypes.CDLL:
    """g++ `source` (host C++ that includes kernel `filename` with SPARSECNN_EMU defined) into a
    shared library, cached by the source, the kernel sources and this emulator."""
    deps = b"".join(p.read_bytes() for p in kernel_sources()) + (HERE / "cuda_emu.h").read_bytes()
    key = hashlib.sha256(source.encode() + deps).hexdigest()[:16]
    cache = Path(os.environ.get("SPARSECNN_EMU_CACHE", Path(tempfile.gettempdir()) / "sparsecnn-emu"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"{Path(filename).stem}-{key}.so"
    if not lib.is_file():
        src = cache / f"{Path(filename).stem}-{key}.cpp"
        src.write_text(source)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w", *[f"-I{d}" for d in KERNEL_DIRS], f"-I{HERE}",
                        str(src), "-o", str(tmp)], check=True)
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


class EmuBackend:
    def __init__(self):
        self._libs: dict[str, tuple[ctypes.CDLL, dict[str, str]]] = {}
        self.launches: list[tuple[str, tuple, int]] = []

    def launch(self, filename: str, expr: str, dtype: torch.dtype, grid, block, smem: int, params) -> None:
        if filename not in self._libs:
            self._libs[filename] = _library(filename)
        lib, symbols = self._libs[filename]
        g = tuple(grid) + (1,) * (3 - len(grid))
        fn = getattr(lib, symbols[expr])
        fn.argtypes = [ctypes.c_uint] * 5 + [ctypes.c_void_p]
        self.launches.append((expr, g, smem))
        fn(*g, block[0], smem, ctypes.addressof(params))


class EmuKernels:
    """The `extern "C"` kernels `names` of source `filename`, each taking one parameter block by value,
    run on the emulator: `launch(name, grid, block, params)`, the interface of a runtime's NVRTC
    launcher (e.g. runtimes/cusparselt/mma_conv.NvrtcMma). `sms`: the SM count the host plans for."""

    def __init__(self, filename: str, names: tuple[str, ...], sms: int = 132):
        lines = ["#define SPARSECNN_EMU 1", f'#include "{filename}"']
        for name in names:
            lines.append(f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                         f'const void* params) {{ emu::launch_params(&{name}, dim3(gx, gy, gz), dim3(bx), 0, params); }}')
        self.lib = compile_library(filename, "\n".join(lines) + "\n")
        self.sms = sms
        self.launches: list[tuple[str, tuple]] = []

    def launch(self, name: str, grid, block, params) -> None:
        g = tuple(grid) + (1,) * (3 - len(grid))
        fn = getattr(self.lib, f"emu_{name}")
        fn.argtypes = [ctypes.c_uint] * 4 + [ctypes.c_void_p]
        self.launches.append((name, g))
        fn(*g, block[0], ctypes.addressof(params))
