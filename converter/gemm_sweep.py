"""GEMM-level sweep: conv-as-GEMM shapes x sparsity, every method timed in the same run.

A conv layer as a GEMM is C[M, N] = W[M, K] @ B[K, N] with M = Cout, K = Cin*kh*kw,
N = H*W (batch 1). A *method* is a factory registered under a name:

    factory(weight: Tensor[M, K] (dense with zeros, on the device, fp32),
            dtype: torch.dtype) -> run(B: Tensor[K, N] of `dtype`) -> Tensor[M, N]

The factory does all one-time work (compression, handles, compilation); the sweep times
only `run`. Dense methods (cuBLAS in fp32 / TF32 / fp16) and sparse ones (cuSPARSE CSR,
sparsecnn's kernels) register the same way; plug-in modules listed in SWEEP_PLUGINS
register theirs on import.
"""
from __future__ import annotations

from typing import Callable

import torch

# The seed's grid: VGG-19 / ResNet-18 conv layers at batch 1 (M, K, N).
SWEEP_SHAPES: list[tuple[int, int, int]] = [
    (64, 576, 50176), (128, 1152, 12544), (256, 2304, 3136), (512, 4608, 784),
    (64, 576, 3136), (128, 1152, 784), (256, 2304, 196), (512, 4608, 49),
]
SWEEP_SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)

MethodFactory = Callable[[torch.Tensor, torch.dtype], Callable[[torch.Tensor], torch.Tensor]]
METHODS: dict[str, MethodFactory] = {}

# Modules that register sparse methods when imported (one line per runtime).
SWEEP_PLUGINS: list[str] = [
    "sparsecnn.runtimes.sparsert_sweep",
]


def register(name: str):
    def deco(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        return factory

    return deco
