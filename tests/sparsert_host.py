"""Run a generated SparseRT kernel's exact source on the CPU (tests only).

The kernel body (index math, tap pointers, k-split reduction, epilogue) is compiled as host
C++ with g++; every inline-PTX statement is translated instruction by instruction into C++
(the forms the generator emits: ld.global.nc[.vN].{f32,b16,b32}, mov.b32 {h, h}, cvt.f32.f16,
fma.rn.f32 with an immediate), so operand numbering and byte offsets are exercised too. Each
CUDA thread of a block runs as a host thread (std::barrier for __syncthreads); blocks run
one after another. Slow, for small layers.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HOST_HEADER = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#define __global__
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__
struct U3 { unsigned x, y, z; };
static thread_local U3 threadIdx, blockIdx;
static std::barrier<>* g_bar = nullptr;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
using std::min;
static inline float __int_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline float bits_f32(uint32_t v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline float h2f(uint16_t h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
static inline float to_f32(float v) { return v; }
static inline float to_f32(unsigned short v) { return h2f(v); }
static inline void store(float* p, float v) { *p = v; }
static inline void store(unsigned short* p, float v) { _Float16 f = (_Float16)v; std::memcpy(p, &f, 2); }
template <typename V> static inline V ldv(const void* base, long off) { V v; std::memcpy(&v, (const char*)base + off, sizeof(V)); return v; }
"""

_ASM = re.compile(r'asm volatile\("(.*?)"\n\s*: (.*?)\n\s*: (.*?)\);', re.S)
_OPERAND = re.compile(r'"[^"]*"\((\w+)\)')


def _translate_ptx(body: str, outs: list[str], ins: list[str]) -> str:
    ops = outs + ins

    def op(tok: str) -> str:
        return ops[int(tok.lstrip("%"))]

    def addr(text: str) -> tuple[str, str]:
        m = re.fullmatch(r"\[%(\d+)\+(-?\d+)\]", text.strip())
        return ops[int(m.group(1))], m.group(2)

    def reg(r: str) -> str:
        m = re.fullmatch(r"([xhu])(\d+)", r.strip())
        return f"{m.group(1)}[{m.group(2)}]"

    c = []
    for line in body.split("\\n\\t"):
        line = line.strip().rstrip(";")
        if line in ("{", "}", ""):
            c.append(line)
            continue
        m = re.fullmatch(r"\.reg \.(f32|b16|b32) ([xhu])<(\d+)>", line)
        if m:
            ctype = {"f32": "float", "b16": "uint16_t", "b32": "uint32_t"}[m.group(1)]
            c.append(f"{ctype} {m.group(2)}[{m.group(3)}];")
            continue
        m = re.fullmatch(r"ld\.global\.nc(?:\.v(\d))?\.(f32|b16|b32) (\{[^}]*\}|\w+), (\[.*\])", line)
        if m:
            n = int(m.group(1) or 1)
            ctype = {"f32": "float", "b16": "uint16_t", "b32": "uint32_t"}[m.group(2)]
            regs = [r.strip() for r in m.group(3).strip("{}").split(",")]
            assert len(regs) == n, line
            base, off = addr(m.group(4))
            size = {"float": 4, "uint16_t": 2, "uint32_t": 4}[ctype]
            if n > 1:  # vector loads must be aligned on the GPU
                c.append(f"if (((uintptr_t)((const char*){base} + {off})) % {n * size}) __builtin_trap();")
            for i, r in enumerate(regs):
                c.append(f"{reg(r)} = ldv<{ctype}>({base}, {off} + {i * size});")
            continue
        m = re.fullmatch(r"mov\.b32 \{(\w+), (\w+)\}, (\w+)", line)
        if m:
            c.append(f"{reg(m.group(1))} = (uint16_t)({reg(m.group(3))} & 0xffff); "
                     f"{reg(m.group(2))} = (uint16_t)({reg(m.group(3))} >> 16);")
            continue
        m = re.fullmatch(r"cvt\.f32\.f16 (\w+), (\w+)", line)
        if m:
            c.append(f"{reg(m.group(1))} = h2f({reg(m.group(2))});")
            continue
        m = re.fullmatch(r"fma\.rn\.f32 (%\d+), (\w+), 0f([0-9A-F]{8}), (%\d+)", line)
        if m:
            assert m.group(1) == m.group(4), line
            c.append(f"{op(m.group(1))} = std::fma({reg(m.group(2))}, bits_f32(0x{m.group(3)}u), {op(m.group(1))});")
            continue
        raise ValueError(f"PTX form the host translator does not know: {line!r}")
    return "\n".join(c)


def host_source(cuda_source: str, name: str) -> str:
    body = cuda_source[cuda_source.index('extern "C"'):]

    def repl(m):
        outs = _OPERAND.findall(m.group(2))
        ins = _OPERAND.findall(m.group(3))
        return _translate_ptx(m.group(1), outs, ins)

    body, count = _ASM.subn(repl, body)
    assert "asm" not in body, "an asm statement was not translated"
    typedef = re.search(r"typedef [^;]*;", cuda_source).group(0)
    launcher = f"""
extern "C" void launch_host(unsigned gx, unsigned gy, unsigned gz, unsigned nt, const T* x, T* y, const T* res,
                            const T* zeros, int ncols) {{
  for (unsigned bz = 0; bz < gz; ++bz) for (unsigned by = 0; by < gy; ++by) for (unsigned bx = 0; bx < gx; ++bx) {{
    std::barrier<> bar(nt);
    g_bar = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < nt; ++t)
      threads.emplace_back([=] {{ threadIdx = U3{{t, 0, 0}}; blockIdx = U3{{bx, by, bz}}; {name}(x, y, res, zeros, ncols); }});
    for (auto& th : threads) th.join();
  }}
}}
"""
    return HOST_HEADER + typedef + "\n" + body + launcher


def available() -> bool:
    return shutil.which("g++") is not None


_libs: dict[str, ctypes.CDLL] = {}


def host_kernel(cuda_source: str, name: str, workdir: Path | None = None):
    """A ctypes function launch_host(gx, gy, gz, threads, x, y, res, zeros, ncols)."""
    src = host_source(cuda_source, name)
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    if key not in _libs:
        d = Path(workdir or tempfile.mkdtemp(prefix="sparsert-host-"))
        (d / f"{key}.cpp").write_text(src)
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o", str(d / f"{key}.so"),
                        str(d / f"{key}.cpp")], check=True, capture_output=True, encoding="utf-8", errors="replace")
        _libs[key] = ctypes.CDLL(str(d / f"{key}.so"))
    fn = _libs[key].launch_host
    fn.restype = None
    fn.argtypes = [ctypes.c_uint] * 4 + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    return fn


def run_host(program, source: str, name: str, x: np.ndarray, residual: np.ndarray | None = None,
             batch: int = 1) -> np.ndarray:
    """Launch the program's kernel on host arrays exactly as GeneratedKernel launches it."""
    import math

    geo = program.geometry
    fp16 = program.dtype == "fp16"
    dt = np.float16 if fp16 else np.float32
    x = np.ascontiguousarray(x, dtype=dt)
    if geo.kind == "conv":
        out_shape, ncols = (x.shape[0], geo.M, geo.oh, geo.ow), geo.cols
        batch = x.shape[0]
    elif geo.kind == "spmm":
        out_shape, ncols = (geo.M, geo.n), geo.n
    else:
        out_shape, ncols = (x.shape[0], geo.M), x.shape[0]
    out = np.full(out_shape, np.nan, dtype=dt)
    res = np.ascontiguousarray(residual, dtype=dt) if residual is not None else None
    zeros = np.zeros(max(1, geo.in_image_elems), dtype=dt)
    gx, gy, gz = program.grid(batch)
    if geo.kind == "gemm":
        gy = max(1, math.ceil(ncols / (32 * program.config.warps_n * program.config.vec)))
    fn = host_kernel(source, name)

    def ptr(a):
        return None if a is None else a.ctypes.data

    fn(gx, gy, gz, program.config.threads, ptr(x), ptr(out), ptr(res), ptr(zeros), ncols)
    return out
