"""Every NVRTC program the runtimes compile, by kernel family, and the step that compiles them ahead of use.

A fresh card (or a fresh machine) compiles each program the first time a runtime needs it: on the
H100 the csr and ecr sets took over 85 s before the first layer was timed, inside the bench and the
GPU tests' time limits. `precompile` fills the disk cache (runtimes/nvrtc.py) with the same
programs, keyed the same way, in parallel worker processes: `sparsecnn doctor --compile-kernels`
on the machine itself, or for another arch anywhere NVRTC is installed (it needs no GPU), and the
cache folder copied there. Code generated per layer (sparsert) depends on the weights and is not here.
"""
from __future__ import annotations

import time
from typing import Callable


def _csr(filename: str) -> Callable[[], tuple[str, list[tuple[str, ...]]]]:
    def programs():
        from .csr.kernels import kernel_programs

        return filename, kernel_programs(filename)
    return programs


def _ecr() -> tuple[str, list[tuple[str, ...]]]:
    from .ecr.runtime import KERNEL_SOURCE, kernel_programs

    return KERNEL_SOURCE, kernel_programs()


def _two_four_mma() -> tuple[str, list[tuple[str, ...]]]:
    from .cusparselt.mma_conv import KERNEL_SOURCE, KERNELS

    return KERNEL_SOURCE, [KERNELS]


# family -> () -> (source file, [one program's name expressions, ...]), as the runtimes compile them
FAMILIES: dict[str, Callable[[], tuple[str, list[tuple[str, ...]]]]] = {
    "csr_conv": _csr("csr_conv.cu"),
    "csr_spmv": _csr("csr_spmv.cu"),
    "csr_sputnik": _csr("csr_sputnik.cu"),
    "csr_tc": _csr("csr_tc.cu"),  # fp16 only: its fp32 list is empty
    "ecr_conv": _ecr,
    "two_four_mma": _two_four_mma,  # sm_80+ runs mma.sp; older archs build a fallback that traps, never launched
}


def precompile(archs: list[str] | tuple[str, ...], families: list[str] | None = None, workers: int | None = None,
               progress: Callable[[str], None] | None = None) -> list[dict]:
    """Compile every program of `families` (all by default) for each arch into the kernel cache.
    Returns one row per (arch, family): programs, how many were compiled now (the rest were cached),
    seconds. A source that does not compile raises nvrtc.KernelCompileError naming it."""
    from . import nvrtc

    unknown = sorted(set(families or ()) - set(FAMILIES))
    if unknown:
        from ..common.errors import UserError

        raise UserError(f"unknown kernel famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                        f"known: {', '.join(FAMILIES)}")
    rows = []
    for arch in archs:
        nvrtc.arch_number(arch)  # 'sm_90', not '90': a ValueError before any work
        for family in families or FAMILIES:
            filename, groups = FAMILIES[family]()
            source = nvrtc.load_source(filename)
            start = time.perf_counter()
            compiled = nvrtc.compile_programs([(source, arch, filename, (), tuple(g)) for g in groups], workers)
            rows.append({"arch": arch, "family": family, "programs": len(groups), "compiled": compiled,
                         "seconds": round(time.perf_counter() - start, 2)})
            if progress:
                progress(f"{arch} {family}: {len(groups)} programs, {compiled} compiled now, "
                         f"{rows[-1]['seconds']:.1f} s")
    return rows
