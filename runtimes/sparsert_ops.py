"""Reference implementations of the fused CSR ops (written by passes/csr_fused.py).

Inputs and attributes are those of issue 5's CsrConv / CsrGemm (docs/ops.md) plus one
optional input, the residual added before the ReLU (Conv -> Add -> Relu in a ResNet block).

sparsecnn::FusedCsrConv (version 1)
    inputs   X          [N, Cin, H, W] float
             values     [nnz] float   \\
             col_idx    [nnz] int32 (uint16 accepted)   passes/csr.py's CSR of the weight's
             row_ptr    [M+1] int32                     GEMM view W[M, Cin*kh*kw], column
             row_order  [M]   int32                     (cin*kh + r)*kw + s, rows longest first
             bias       [M] float                 optional ("" when absent)
             residual   [N, M, OH, OW] float      optional
    attrs    kernel_shape  ints [kh, kw]
             strides       ints [2]
             pads          ints [4], ONNX order [top, left, bottom, right]
             dilations     ints [2]
             in_channels   int Cin
             relu          int, 1: ReLU after the residual add
    output   Y = relu?(conv2d(X, W) + bias + residual)   [N, M, OH, OW]

sparsecnn::FusedCsrGemm (version 1)
    inputs   X [N, K] float; values, col_idx, row_ptr, row_order (CSR of W [M, K]);
             bias [M] (optional); residual [N, M] (optional)
    attrs    in_features int K; relu int
    output   Y = relu?(X @ W^T + bias + residual)   [N, M]

The builders here densify the CSR once and run PyTorch ops on any device: the reference
every generated kernel is checked against, and what the runtime runs on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import NodeContext, _torch_pad

DOMAIN = "sparsecnn"


def csr_arrays(ctx: NodeContext):
    """(values, col_idx, row_ptr, row_order) constants of a fused node, on the CPU."""
    arrays = [ctx.const(i) for i in range(1, 5)]
    if any(a is None for a in arrays):
        raise NotImplementedError("CSR inputs must be constant initializers")
    return [a.detach().cpu() for a in arrays]


def dense_weight(ctx: NodeContext, dtype=None) -> torch.Tensor:
    """The weight [M, K] rebuilt from the node's CSR, on the node's device."""
    values, col_idx, row_ptr, _ = csr_arrays(ctx)
    shape = weight_shape(ctx)
    m = shape[0]
    k = 1
    for s in shape[1:]:
        k *= s
    rows = torch.repeat_interleave(torch.arange(m), (row_ptr[1:] - row_ptr[:-1]).long())
    w = torch.zeros(m, k, dtype=torch.float32)
    w[rows, col_idx.long()] = values.float()
    return w.reshape(shape).to(ctx.device, dtype or ctx.dtype)


def weight_shape(ctx: NodeContext) -> list[int]:
    """[M, Cin, kh, kw] of a FusedCsrConv, [M, K] of a FusedCsrGemm."""
    m = int(ctx.const(3).numel()) - 1  # row_ptr [M+1]
    if ctx.node.op_type == "FusedCsrGemm":
        return [m, int(ctx.attr("in_features"))]
    return [m, int(ctx.attr("in_channels")), *[int(k) for k in ctx.attr("kernel_shape")]]


def optional_input(ctx: NodeContext, i: int) -> bool:
    return i < len(ctx.node.input) and bool(ctx.node.input[i])


def epilogue(ctx: NodeContext):
    """f(y, residual) applying the node's residual add and ReLU."""
    relu = bool(ctx.attr("relu", 0))

    def run(y, residual=None):
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    return run


def conv_params(ctx: NodeContext):
    strides = [int(s) for s in ctx.attr("strides", [1, 1])]
    pads = [int(p) for p in ctx.attr("pads", [0, 0, 0, 0])]
    dilations = [int(d) for d in ctx.attr("dilations", [1, 1])]
    return strides, pads, dilations


def _fused_conv(ctx: NodeContext):
    w = dense_weight(ctx)
    strides, pads, dilations = conv_params(ctx)
    bias = ctx.const(5) if optional_input(ctx, 5) else None
    bias = bias.to(ctx.device, ctx.dtype) if bias is not None else None
    post = epilogue(ctx)
    symmetric = pads[:2] == pads[2:]

    def run(x, *rest):
        residual = rest[5] if len(rest) > 5 else None
        if symmetric:
            y = F.conv2d(x, w, bias, strides, pads[:2], dilations)
        else:
            y = F.conv2d(F.pad(x, _torch_pad(pads)), w, bias, strides, 0, dilations)
        return post(y, residual)

    ctx.info.update(kernel="reference conv (dense from CSR)", format="csr")
    return run


def _fused_gemm(ctx: NodeContext):
    w = dense_weight(ctx)
    bias = ctx.const(5) if optional_input(ctx, 5) else None
    bias = bias.to(ctx.device, ctx.dtype) if bias is not None else None
    post = epilogue(ctx)

    def run(x, *rest):
        residual = rest[5] if len(rest) > 5 else None
        return post(F.linear(x, w, bias), residual)

    ctx.info.update(kernel="reference linear (dense from CSR)", format="csr")
    return run


OPS = {(DOMAIN, "FusedCsrConv"): _fused_conv, (DOMAIN, "FusedCsrGemm"): _fused_gemm}
