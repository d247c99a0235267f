"""The project's one error measure between two results, and its tolerances.

`rel_err(a, b) = max |a - b| / max |b|` in float64 (b the reference): the measure every
correctness bar in DESIGN.md, results/ and the tests is stated in.
"""
from __future__ import annotations

import numpy as np
import torch


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64; 0 for empty tensors; inf if shapes differ. Computed where both
    tensors already are (a GEMM sweep's outputs stay on the GPU); anything else on the CPU."""
    same_device = all(isinstance(x, torch.Tensor) for x in (a, b)) and a.device == b.device
    a, b = (x.detach() if same_device else x.detach().cpu() if isinstance(x, torch.Tensor)
            else torch.as_tensor(np.asarray(x)) for x in (a, b))
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    a, b = a.to(torch.float64), b.to(torch.float64)
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    return err if err == err else float("inf")  # NaN anywhere is never within tolerance


# Tolerance of `rel_err` between two implementations of the same layer that both compute in
# `dtype` (accumulating in fp32): rounding differences only; a wrong kernel is off by O(1).
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TF32_TOLERANCE = 5e-3


def layer_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    return LAYER_TOLERANCE.get(dtype, 5e-2)
