"""GEMM-sweep method "csr": sparsecnn's CSR SpMM kernels (runtimes/csr/cuda/csr_conv.cu, SpMM layout, the
Sputnik port csr_sputnik.cu, and in fp16 on sm_80+ the tensor-core kernel csr_tc.cu).

Listed in converter/gemm_sweep.py's SWEEP_PLUGINS, which reads this module's METHODS. The first call for a given N
times every candidate configuration (csr_kernels.candidate_configs) on the device and keeps
the fastest; `run.tuned[N]` then holds the chosen config, its time and all candidates'.
"""
from __future__ import annotations

import torch



def csr_spmm_method(weight: torch.Tensor, dtype: torch.dtype, backend=None):
    """`backend`: the kernel launcher (default NVRTC on the weight's GPU; tests pass the emulator)."""
    from ...passes.csr.layout import csr_from_dense
    from .kernels import ConvGeometry, NvrtcBackend, candidate_configs, make_plan, tune

    csr = csr_from_dense(weight.detach().float().cpu())
    m, k = csr.shape
    device = weight.device
    backend = backend or NvrtcBackend(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    tuned: dict[int, dict] = {}

    def run(b: torch.Tensor) -> torch.Tensor:
        n = b.shape[1]
        if n not in tuned:  # one-time: pick the config for this N (outside any graph capture)
            g = ConvGeometry(m, k, 1, n)
            cfg, plan, us, timed = tune(candidate_configs(g, sms, dtype=dtype, arch=getattr(backend, "arch", None)),
                                        lambda c: make_plan(csr, g, c, dtype, device, backend), lambda p, a: p.spmm(a), b,
                                        device)
            tuned[n] = {"plan": plan, "config": cfg.label(), "family": getattr(cfg, "family", "staged"), "us": us,
                        "candidates": timed}
        return tuned[n]["plan"].spmm(b)

    run.tuned = tuned
    return run


# The GEMM sweep (converter/gemm_sweep.py) reads this: method name -> factory.
METHODS = {"csr": csr_spmm_method}
