"""The reference runtime: the dense-with-zeros ONNX model run by PyTorch ops (cuDNN / cuBLAS).

It rewrites nothing; on GPU the whole network replays as one CUDA graph. With `sparsecnn`-
domain ops in the model it runs their plain-PyTorch reference implementations, which is
what every GPU kernel is tested against (DESIGN contract 2).
"""
from __future__ import annotations

import onnx
import torch

from .base import CompileOptions, Engine
from .executor import Executor

name = "torch"


def available() -> tuple[bool, str]:
    gpu = f"CUDA on {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only (no CUDA GPU)"
    return True, gpu


def rewrite(model: onnx.ModelProto, options: dict | None = None) -> onnx.ModelProto:
    return model


def reference_ops() -> dict:
    """The plain-PyTorch implementations of all sparsecnn-domain ops."""
    from .reference_ops import reference_ops as table

    return table()


class TorchEngine(Engine):
    runtime = name


def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> TorchEngine:
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    ex = Executor(model, device, opts.dtype, ops=reference_ops(), channels_last=opts.channels_last,
                  options=opts.extra)
    return TorchEngine(model, device, opts, ex)
