"""Precision regimes every benchmark runs in, named once.

    fp16             fp16 operands on tensor cores (cuDNN / cuBLAS accumulate in fp32)
    fp32-cuda-core   fp32 with TF32 off in cuDNN and cuBLAS: plain fp32 FMAs on CUDA cores,
                     the regime of the seed libraries and of GPUs without tensor cores
                     (the original Jetson Nano)
    fp32             fp32 with TF32 tensor cores allowed in cuDNN and cuBLAS
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..common.errors import UserError


@dataclass(frozen=True)
class Regime:
    name: str
    dtype: str  # engine dtype: fp32 | fp16
    tf32: bool
    description: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.dtype == "fp16" else torch.float32

    def compile_options(self, **more) -> dict:
        return {"dtype": self.dtype, "tf32": self.tf32, **more}


REGIMES: dict[str, Regime] = {r.name: r for r in [
    Regime("fp16", "fp16", False, "fp16 on tensor cores"),
    Regime("fp32-cuda-core", "fp32", False, "fp32, TF32 off in cuDNN and cuBLAS (CUDA cores)"),
    Regime("fp32", "fp32", True, "fp32, TF32 tensor cores allowed"),
]}


def parse_regimes(text: str | list[str]) -> list[Regime]:
    names = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for n in (x.strip() for x in names if x.strip()):
        if n not in REGIMES:
            raise UserError(f"unknown regime '{n}'; choose from {', '.join(REGIMES)}")
        out.append(REGIMES[n])
    if not out:
        raise UserError(f"no regime given; choose from {', '.join(REGIMES)}")
    return out


@contextlib.contextmanager
def regime_flags(regime: Regime):
    """TF32 on or off in cuBLAS and cuDNN for the duration, restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = regime.tf32
    torch.backends.cudnn.allow_tf32 = regime.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
