"""The reference runtime: the dense-with-zeros ONNX model run by PyTorch ops (cuDNN / cuBLAS).

It rewrites nothing; on GPU the whole network replays as one CUDA graph. With `sparsecnn`-
domain ops in the model it runs their plain-PyTorch reference implementations, which is
what every GPU kernel is tested against (DESIGN contract 2).

`extra={"dense_conv": MODE}` picks the dense conv engine (runtimes/torch/dense_conv.py): "cudnn"
(default), "cudnn_nhwc", "im2col", "im2col_nhwc" or "best". The *best dense engine*, the
baseline every sparse runtime is judged against, is

    get_runtime("torch").compile(model, "cuda", {"dtype": "fp32", "tf32": False,
                                                 "extra": {"dense_conv": "best"}})

With "best" on a GPU, the first run at an input shape decides each conv (per layer, input
layout conversion included) and then the whole network is captured three ways -- the per-
layer choices, every conv on cuDNN NCHW, every conv on cuDNN NHWC -- and the fastest graph
is kept (base.Engine._plan_graph); `engine.plans` records the three times and the winner.
"""
from __future__ import annotations

import onnx
import torch

from ..base import CompileOptions, Engine, with_saved_decisions
from .dense_conv import DenseConv, check_mode
from ..executor import Executor
from .options import OPTIONS  # noqa: F401  (declared options: runtimes/options.py)

name = "torch"


def available() -> tuple[bool, str]:
    gpu = f"CUDA on {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only (no CUDA GPU)"
    return True, gpu


def rewrite(model: onnx.ModelProto, options: dict | None = None) -> onnx.ModelProto:
    return model


def reference_ops() -> dict:
    """The plain-PyTorch implementations of all sparsecnn-domain ops."""
    from ..reference_ops import reference_ops as table

    return table()


class TorchEngine(Engine):
    runtime = name

    @property
    def dense_convs(self) -> list[DenseConv]:
        return [s.fn for s in self.executor.steps if isinstance(s.fn, DenseConv)]



def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> TorchEngine:
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    check_mode(opts.extra.get("dense_conv", "cudnn"))
    ex = Executor(model, device, opts.dtype, ops=reference_ops(), channels_last=opts.channels_last,
                  options=with_saved_decisions(opts.extra, state))
    engine = TorchEngine(model, device, opts, ex)
    return engine
