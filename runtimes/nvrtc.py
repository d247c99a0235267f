"""CUDA C++ kernels compiled at run time with NVRTC and launched on PyTorch's current stream.

Sources live in runtimes/<library>/cuda/. A compiled cubin is cached on disk, keyed by the source,
the options, the target architecture and the NVRTC version, so a second process (or an
engine loaded later) skips compilation. NVRTC needs no GPU: CI compiles every kernel for
sm_87 (Jetson Orin) and sm_90 (H100) with `compile_cubin` alone.

cuda-python is imported inside the functions here (DESIGN contract 3).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.errors import UserError

# Kernel sources live next to the runtime that launches them, in its `cuda/` folder
# (runtimes/csr/cuda, runtimes/ecr/cuda; runtimes/cuda holds the compiler's own smoke test).
# A source is named by its file name, unique across these folders; all are include paths.
KERNEL_DIRS = tuple(sorted([Path(__file__).parent / "cuda", *Path(__file__).parent.glob("*/cuda")]))


def kernel_path(filename: str) -> Path:
    """The one kernel source (or header) called `filename`."""
    for d in KERNEL_DIRS:
        if (d / filename).is_file():
            return d / filename
    raise FileNotFoundError(f"no kernel source {filename} in {', '.join(str(d) for d in KERNEL_DIRS)}")


def kernel_sources() -> list[Path]:
    """Every kernel source and header (.cu, .cuh) of every runtime."""
    return sorted(p for d in KERNEL_DIRS for p in d.glob("*.cu*"))


CI_ARCHS = ("sm_87", "sm_90")
# Every Jetson generation: Nano (Maxwell), TX2 (Pascal), Xavier (Volta), Orin (Ampere). CUDA 13's
# NVRTC no longer targets sm_50-sm_72; CUDA 12's (the PyPI wheel nvidia-cuda-nvrtc-cu12) does.
JETSON_ARCHS = ("sm_53", "sm_62", "sm_72", "sm_87")
OLDEST_ARCH = "sm_53"  # fp16 arithmetic and everything the kernels use; older cards are never built for

# What the kernels' code paths need (PTX ISA and CUDA C++ programming guide). Sources guard each with
# `#if __CUDA_ARCH__ >= ...` and a fallback, so one source builds for every arch from OLDEST_ARCH on.
ARCH_FEATURES = {
    "cp.async": 80,         # asynchronous global->shared copies (CSR and ECR staging); else plain loads
    "vector atomics": 90,   # atomicAdd on float2/float4 (split-K partial sums); else one atomic per float
    "tensor cores": 70,     # mma (fp16); the NVRTC kernels use the m16n8k16 shape, which needs sm_80 (below)
    "2:4 sparse tensor cores": 80,  # mma.sp: cuSPARSELt, TensorRT SPARSE_WEIGHTS, conv2to4_mma.cu (mma.cuh)
    "mma.sync m16n8k16": 80,  # dense fp16 mma, fp32 accumulate (mma.cuh): the csr tensor-core kernel, csr_tc.cu
}


def arch_number(arch: str) -> int:
    """'sm_87' -> 87."""
    if not arch.startswith(("sm_", "compute_")) or not arch.split("_", 1)[1].isdigit():
        raise ValueError(f"not a CUDA architecture: {arch!r} (expected e.g. 'sm_87')")
    return int(arch.split("_", 1)[1])


def has_feature(arch: str, feature: str) -> bool:
    return arch_number(arch) >= ARCH_FEATURES[feature]


KERNEL_FAMILIES = ("csr", "ecr", "sparsert", "two_four_mma")


def kernel_notes(arch: str, family: str) -> str:
    """Which variant of a kernel family ('csr', 'ecr', 'sparsert', 'two_four_mma') a card of `arch` gets, in one line."""
    n = arch_number(arch)
    if n < arch_number(OLDEST_ARCH):
        return f"{arch}: older than {OLDEST_ARCH}, the oldest architecture the kernels are built for in CI; untested"
    if family == "sparsert":
        return f"{arch}: generated kernels (plain loads and FMAs; nothing architecture-specific)"
    if family == "two_four_mma":
        if not has_feature(arch, "2:4 sparse tensor cores"):
            return f"{arch}: no 2:4 mma.sp conv (sparse tensor cores need sm_80; its source builds, its mma traps)"
        return f"{arch}: 2:4 conv on sparse tensor cores (mma.sp, fp16), staging by plain loads"
    what = {"csr": "CSR kernels", "ecr": "ECR/PECR kernels"}[family]
    staging = "cp.async staging" if n >= ARCH_FEATURES["cp.async"] else "staging by plain loads (no cp.async before sm_80)"
    atomics = ("vector split-K atomics" if n >= ARCH_FEATURES["vector atomics"]
               else "scalar split-K atomics")
    if family == "csr":  # csr_tc.cu builds everywhere; below sm_80 its FMA fallback is never offered
        atomics += (", fp16 tensor-core kernel (mma.sync m16n8k16)" if has_feature(arch, "mma.sync m16n8k16")
                    else ", no tensor-core kernel (mma.sync m16n8k16 needs sm_80)")
    return f"{arch}: {what} with {staging}, {atomics}"


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC that cuda-python loads."""
    err, major, minor = _bindings()[1].nvrtcVersion()
    if int(err) != 0:
        raise RuntimeError(f"nvrtcVersion failed: {err}")
    return int(major), int(minor)


def supported_archs() -> tuple[str, ...]:
    """Every architecture the loaded NVRTC can compile for ('sm_75', ...); empty if it cannot say."""
    err, supported = _bindings()[1].nvrtcGetSupportedArchs()
    return tuple(f"sm_{int(x)}" for x in supported) if int(err) == 0 else ()


def compile_archs() -> tuple[str, ...]:
    """The architectures CI builds every kernel for with the loaded NVRTC: CUDA 12's for every
    Jetson generation, CUDA 13's (which dropped sm_53-sm_72) for Orin and the H100."""
    wanted = JETSON_ARCHS if nvrtc_version()[0] < 13 else CI_ARCHS
    supported = supported_archs()
    return tuple(a for a in wanted if a in supported) if supported else wanted


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel: a bug in sparsecnn, with the compiler's log."""


def _bindings():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:  # cuda-python < 12.6 spelled the modules differently
            from cuda import cuda as driver, nvrtc  # type: ignore
        except ImportError:
            raise UserError("cuda-python is not installed; `pip install 'sparsecnn[gpu]'` (or cuda-python) "
                            "to compile and run sparsecnn's CUDA kernels") from None
    return driver, nvrtc


def nvrtc_available() -> tuple[bool, str]:
    """Whether NVRTC can be loaded (no GPU needed); never raises."""
    try:
        _, nvrtc = _bindings()
        err, major, minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return False, f"NVRTC did not load ({err})"
        return True, f"NVRTC {major}.{minor}"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def cuda_include_dirs() -> list[str]:
    dirs = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            dirs.append(found)
    except Exception:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "include", "cuda_fp16.h").is_file():
            dirs.append(str(Path(home, "include")))
    return list(dict.fromkeys(dirs))


def _check(result, what: str):
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def cache_dir() -> Path:
    root = os.environ.get("SPARSECNN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsecnn"
    return Path(root) / "kernels"


def _options_and_key(source: str, arch: str, options: tuple[str, ...], name_expressions) -> tuple[list[str], str]:
    """NVRTC's options for a compile, and the cache key of its result (source, included headers,
    options, name expressions, NVRTC version)."""
    ver = _bindings()[1].nvrtcVersion()
    includes = [*[f"--include-path={d}" for d in cuda_include_dirs()], *[f"--include-path={d}" for d in KERNEL_DIRS]]
    base = [f"--gpu-architecture={arch}", "-std=c++17", "--device-as-default-execution-space"]
    # The key holds what decides the cubin, not where files sit: the project's headers by content, CUDA's
    # by the NVRTC version that ships them. So a cache filled on one machine (`sparsecnn doctor
    # --compile-kernels`, NVRTC needs no GPU) is valid on another with the same NVRTC.
    key = hashlib.sha256("\0".join([source, arch, *base, *options, *name_expressions, str(ver[1:])]).encode()
                         + _included_sources(source)).hexdigest()[:32]
    return base + includes + list(options), key


def compile_cubin(source: str, arch: str, name: str = "kernel.cu", options: tuple[str, ...] = (),
                  name_expressions: tuple[str, ...] = (), use_cache: bool = True,
                  log: list | None = None) -> tuple[bytes, dict[str, str]]:
    """Compile CUDA C++ `source` for `arch` (e.g. 'sm_90') -> (cubin, {expression: lowered name}).

    `name_expressions` are template instantiations such as 'csr_spmm<float, 4>' whose
    mangled names the caller needs to look the kernels up. When `log` is a list, the
    compiler's log (e.g. ptxas -v resource usage) is appended to it if a compile ran.
    """
    _, nvrtc = _bindings()
    opts, key = _options_and_key(source, arch, options, name_expressions)
    cubin_path = cache_dir() / f"{key}.cubin"
    names_path = cache_dir() / f"{key}.names"
    if use_cache and cubin_path.is_file() and names_path.is_file():
        lines = names_path.read_text(encoding="utf-8").splitlines()
        return cubin_path.read_bytes(), dict(line.split("\t", 1) for line in lines if line)
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            _check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
        bopts = [o.encode() for o in opts]
        err = nvrtc.nvrtcCompileProgram(prog, len(bopts), bopts)[0]
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # NVRTC writes into the buffers it is given: they must be mutable. (`b" " * size`,
        # as NVIDIA's samples write it, is CPython's shared one-byte object when the log is
        # empty, and overwriting it corrupted unrelated code, torch.load among it.)
        log_buf = bytearray(size)
        nvrtc.nvrtcGetProgramLog(prog, log_buf)
        log_bytes = bytes(log_buf).rstrip(b"\0")
        if log is not None:
            log.append(log_bytes.decode(errors="replace"))
        if int(err) != 0:
            raise KernelCompileError(f"NVRTC could not compile {name} for {arch}:\n{log_bytes.decode(errors='replace')}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin_buf = bytearray(size)
        _check((nvrtc.nvrtcGetCUBIN(prog, cubin_buf)[0], None), "nvrtcGetCUBIN")
        cubin = bytes(cubin_buf)
        lowered = {}
        for expr in name_expressions:
            mangled = _check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()), "nvrtcGetLoweredName")
            lowered[expr] = mangled.decode() if isinstance(mangled, bytes) else str(mangled)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if use_cache:
        _write_cache(cubin_path, cubin, names_path, "".join(f"{k}\t{v}\n" for k, v in lowered.items()))
    return cubin, lowered


def _compile_group(args: tuple) -> None:
    compile_cubin(*args)  # into the cache; returns nothing, so no cubin is pickled back to the parent


def compile_groups(source: str, arch: str, name: str, groups: list[tuple[str, ...]], options: tuple[str, ...] = (),
                   workers: int | None = None) -> None:
    """Fill the cache with one program per group of name expressions, compiled in parallel worker
    processes (NVRTC compiles one program on one core; a source with many template instances
    compiles several times faster this way). Groups already cached are skipped; if workers
    cannot start, the caller's own compile_cubin calls compile what is missing one by one."""
    compile_programs([(source, arch, name, options, tuple(group)) for group in groups], workers, serial=False)


def is_cached(source: str, arch: str, options: tuple[str, ...], name_expressions: tuple[str, ...]) -> bool:
    return (cache_dir() / f"{_options_and_key(source, arch, options, name_expressions)[1]}.cubin").is_file()


def compile_programs(programs: list[tuple], workers: int | None = None, serial: bool = True) -> int:
    """Fill the cache with `programs`, each (source, arch, name, options, name_expressions), in
    parallel worker processes; those already cached are skipped. Returns how many were compiled.
    When workers cannot start (or only one is wanted), `serial` compiles them here one by one;
    otherwise the caller's own compile_cubin calls compile (and report) whatever is missing."""
    todo = [p for p in programs if not is_cached(p[0], p[1], p[3], p[4])]
    workers = min(len(todo), workers or os.cpu_count() or 1)
    if workers >= 2 and _compile_in_workers(todo, workers):
        return len(todo)
    if serial:
        for program in todo:
            compile_cubin(*program)
    return len(todo) if serial else 0


def _compile_in_workers(todo: list[tuple], workers: int) -> bool:
    try:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the workers use NVRTC only, and must not inherit this process's CUDA state
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_group, todo))
    except Exception:  # noqa: BLE001 - the serial path compiles (and reports) whatever failed here
        return False
    return True


def _included_sources(source: str, seen: set[str] | None = None) -> bytes:
    """Contents of the local headers a source includes, and those they include, so editing any of
    them changes the key."""
    seen = set() if seen is None else seen
    out = b""
    for line in source.splitlines():
        line = line.strip()
        if line.startswith('#include "'):
            name = line.split('"')[1]
            if name in seen:
                continue
            seen.add(name)
            try:
                text = kernel_path(name).read_bytes()
            except FileNotFoundError:
                continue
            out += text + _included_sources(text.decode("utf-8", "replace"), seen)
    return out


def _write_cache(cubin_path: Path, cubin: bytes, names_path: Path, names: str) -> None:
    try:
        cubin_path.parent.mkdir(parents=True, exist_ok=True)
        for path, data in ((names_path, names.encode()), (cubin_path, cubin)):
            tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a recompile


def load_source(filename: str) -> str:
    return kernel_path(filename).read_text(encoding="utf-8")


def device_arch(device: torch.device | int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def device_kernel_notes(family: str, device: torch.device | int | None = None) -> str:
    """`kernel_notes` for the card PyTorch sees: what the runtimes' available() report."""
    return kernel_notes(device_arch(device), family)


@dataclass
class _Loaded:
    module: object
    functions: dict


_loaded: dict[tuple, _Loaded] = {}
_lock = threading.Lock()


class Kernel:
    """One `__global__` function of a compiled source, launchable on torch tensors."""

    def __init__(self, source: str, function: str, device: torch.device | None = None, options: tuple[str, ...] = (),
                 name_expressions: tuple[str, ...] = (), filename: str = "kernel.cu"):
        driver, _ = _bindings()
        self.device = torch.device(device or "cuda")
        torch.cuda.init()
        arch = device_arch(self.device)
        exprs = tuple(name_expressions) or ()
        cubin, lowered = compile_cubin(source, arch, filename, options, exprs)
        key = (hashlib.sha256(cubin).hexdigest(), self.device.index or 0)
        with _lock, torch.cuda.device(self.device):
            torch.cuda.current_stream()  # makes PyTorch's (primary) context current on this thread
            if key not in _loaded:
                module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
                _loaded[key] = _Loaded(module, {})
            entry = _loaded[key]
            symbol = lowered.get(function, function)
            if symbol not in entry.functions:
                entry.functions[symbol] = _check(driver.cuModuleGetFunction(entry.module, symbol.encode()),
                                                 f"cuModuleGetFunction({function})")
            self.function = entry.functions[symbol]
        self.name = function
        self._driver = driver

    def set_max_dynamic_shared(self, nbytes: int) -> None:
        attr = self._driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check((self._driver.cuFuncSetAttribute(self.function, attr, nbytes)[0], None), "cuFuncSetAttribute")

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], *args, shared: int = 0) -> None:
        """Launch on PyTorch's current stream. Tensors pass as pointers; ints as int32 unless
        wrapped in a ctypes type (e.g. ctypes.c_int64); floats as float32; a ctypes.Structure
        as a struct passed by value (same field order and types as the kernel's)."""
        values = []
        for a in args:
            if isinstance(a, torch.Tensor):
                values.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, bool):
                values.append(ctypes.c_int(int(a)))
            elif isinstance(a, int):
                values.append(ctypes.c_int(a))
            elif isinstance(a, float):
                values.append(ctypes.c_float(a))
            elif isinstance(a, (ctypes._SimpleCData, ctypes.Structure)):  # a Structure: a by-value struct parameter
                values.append(a)
            elif a is None:
                values.append(ctypes.c_void_p(0))
            else:
                raise TypeError(f"cannot pass {type(a).__name__} to kernel {self.name}")
        ptrs = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        err = self._driver.cuLaunchKernel(self.function, *g, *b, shared, stream, ctypes.addressof(ptrs), 0)[0]
        if int(err) != 0:
            raise RuntimeError(f"launching {self.name} failed: {err}")
