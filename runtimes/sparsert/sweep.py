"""GEMM-sweep method "sparsert": C[M, N] = W[M, K] @ B[K, N] with W's pattern compiled in.

Registered through converter/gemm_sweep.py's SWEEP_PLUGINS. The generated kernel bakes in
N (its load offsets are constants k*N), so one is generated, compiled and tuned per N at
the first call with that N (or at factory time when `n` is given); the sweep's warm-up
absorbs it. What it cost is kept in `BUILD_LOG` (generation, NVRTC compile, tuning, and
the chosen configuration) for the sweep's report: compile time per (shape, sparsity) is
part of SparseRT's price.
"""
from __future__ import annotations

import time

import torch


BUILD_LOG: list[dict] = []


def spmm_programs(weight: torch.Tensor, n: int, dtype: torch.dtype, max_configs: int = 3,
                  max_instructions: int | None = None, use_tuning: bool = True) -> list[tuple]:
    """[(Program, (source, kernel name))] of the candidate configurations for B [K, n]."""
    from ...passes.csr.layout import csr_from_dense
    from .codegen import (DEFAULT_MAX_INSTRUCTIONS, LayerGeometry, build_program, candidate_configs,
                                   layer_key, render_cuda)

    dt = "fp16" if dtype == torch.float16 else "fp32"
    m, k = weight.shape
    csr = csr_from_dense(weight.detach().float().cpu())
    geo = LayerGeometry("spmm", m, k, n=int(n))
    key = layer_key(csr, geo, None, False, False)
    configs = candidate_configs(csr, geo, dt, max_configs, max_instructions or DEFAULT_MAX_INSTRUCTIONS)
    progs = [build_program(csr, geo, cfg, dtype=dt, key=key) for cfg in configs]
    return [(p, render_cuda(p)) for p in progs]


def build_spmm(weight: torch.Tensor, n: int, dtype: torch.dtype, device=None, max_configs: int = 3,
               max_instructions: int | None = None, workers: int | None = None, retune: bool = False,
               programs: list[tuple] | None = None):
    """Generate, compile (in parallel) and time the candidate configurations for B [K, n].

    `programs` (from `spmm_programs`) skips the generation. Returns (run(B) -> C, log
    entry); run is None when no configuration fits the code-size cap.
    """
    from ...passes.csr.layout import csr_from_dense
    from ..nvrtc import device_arch
    from .codegen import (DEFAULT_MAX_INSTRUCTIONS, GeneratedKernel, LayerGeometry, build_program,
                                   candidate_configs, compile_programs, layer_key, load_tuning, render_cuda,
                                   store_tuning, TileConfig, tuning_key)

    device = torch.device(device or weight.device)
    dt = "fp16" if dtype == torch.float16 else "fp32"
    m, k = weight.shape
    csr = csr_from_dense(weight.detach().float().cpu())
    geo = LayerGeometry("spmm", m, k, n=int(n))
    key = layer_key(csr, geo, None, False, False)
    arch = device_arch(device)
    tkey = tuning_key(key, arch, dt, 1, "sweep")
    entry = {"M": m, "K": k, "N": n, "dtype": dt, "nnz": csr.nnz}
    t0 = time.perf_counter()
    cached = None if retune else load_tuning().get(tkey)
    if programs is not None:
        progs = [p for p, _ in programs]
        sources = [s for _, s in programs]
    else:
        if cached:
            configs = [TileConfig.parse(cached["config"])]
        else:
            configs = candidate_configs(csr, geo, dt, max_configs, max_instructions or DEFAULT_MAX_INSTRUCTIONS)
        progs = [build_program(csr, geo, cfg, dtype=dt, key=key) for cfg in configs]
        sources = [render_cuda(p) for p in progs]
    if not progs:
        entry.update(error=f"code size: every configuration exceeds the cap ({csr.nnz} non-zeros)",
                     gen_s=round(time.perf_counter() - t0, 3))
        BUILD_LOG.append(entry)
        return None, entry
    entry["gen_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    records = compile_programs(sources, arch, workers)
    entry["compile_wall_s"] = round(time.perf_counter() - t0, 3)
    entry["compile"] = {p.config.name: {"s": round(r.seconds, 3), "cached": r.cached, "instructions": p.instructions(),
                                        "cubin_bytes": r.cubin_bytes, **({"error": r.error[:300]} if r.error else {})}
                        for p, r in zip(progs, records)}
    kernels = {p.config.name: GeneratedKernel(p, device, source=s) for p, (s, _), r in zip(progs, sources, records)
               if not r.error}
    if not kernels:
        entry["error"] = "no configuration compiled"
        BUILD_LOG.append(entry)
        return None, entry
    t0 = time.perf_counter()
    b = torch.randn(k, n, device=device).to(dtype)
    timings = {}
    if len(kernels) > 1:  # the one chooser: each config checked against the first, timed interleaved
        from ..chooser import Candidate, Chooser

        cands = [Candidate(name, (lambda x, kern=kern: kern(x)), dense=False, library="sparsert")
                 for name, kern in kernels.items()]
        d = Chooser(device, dtype).choose("sweep", cands, (b,), reference=cands[0].name)
        timings = {name: round(ms, 5) for name, ms in d.times_ms.items()}
        best = d.chosen
        if d.rejected:
            entry["rejected"] = d.rejected
        store_tuning({tkey: {"choice": "generated", "config": best, "ms": timings}})
    else:
        best = next(iter(kernels))
    entry.update(tune_s=round(time.perf_counter() - t0, 3), config=best, candidates_ms=timings)
    BUILD_LOG.append(entry)
    return kernels[best], entry


def sparsert_method(weight: torch.Tensor, dtype: torch.dtype, n: int | None = None):
    """factory(weight [M, K], dtype) -> run(B [K, N]); builds per N on first use."""
    built: dict[int, object] = {}

    def get(n_cols: int):
        if n_cols not in built:
            kern, entry = build_spmm(weight, n_cols, dtype)
            if kern is None:
                raise RuntimeError(f"sparsert: {entry.get('error')}")
            built[n_cols] = kern
        return built[n_cols]

    if n is not None:
        get(int(n))

    def run(b: torch.Tensor) -> torch.Tensor:
        return get(int(b.shape[1]))(b.contiguous())

    return run


# The GEMM sweep (converter/gemm_sweep.py) reads this: method name -> factory.
METHODS = {"sparsert": sparsert_method}
