"""Reference implementations (plain PyTorch) of the CSR ops, `sparsecnn::CsrConv` and `CsrGemm`.

These run on any device (CPU in CI); the CUDA kernels of the `csr` runtime are tested
against them. The weight never becomes dense here: the conv is a CSR x im2col product.

Schemas (domain `sparsecnn`, version 1; also in docs/ops.md)
-----------------------------------------------------------

The weight is CSR over its GEMM view A[M, K] (passes/csr.py): M = output channels (or
features), K = Cin*kh*kw with column k = (cin*kh + r)*kw + s (or K = in_features).

`CsrConv(X, values, col_idx, row_ptr, row_order[, B[, R]]) -> Y`
    X          float [N, Cin, H, W]
    values     float [nnz]            the non-zeros, row by row, columns ascending in a row
    col_idx    uint16 or int32 [nnz]  column of each value (uint16 when K <= 65536)
    row_ptr    int32 [M + 1]          row i holds values[row_ptr[i]:row_ptr[i+1]]; empty rows allowed
    row_order  int32 [M]              rows by non-zero count, longest first (Sputnik's row swizzle)
    B          float [M]              optional bias ("" when absent and R is given)
    R          float [N, M, Ho, Wo]   optional residual, added before the ReLU (Conv -> Add -> Relu)
    Y          float [N, M, Ho, Wo]   relu?(conv(X, W) + B + R), conv as ONNX Conv with group = 1
    attributes: kernel_shape [kh, kw], strides [sh, sw], pads [top, left, bottom, right],
                dilations [dh, dw], in_channels (Cin), relu (int, 1: ReLU applied to the output)

`CsrConvPool(X, values, col_idx, row_ptr, row_order[, B]) -> Y`
    Y = MaxPool(relu(conv(X, W) + B)): a CsrConv with relu = 1 and no residual, and the MaxPool
    that was its only consumer (the group a PECR kernel covers; `hybrid` plans over it).
    attributes: CsrConv's, plus pool_kernel_shape, pool_strides, pool_pads, pool_ceil_mode

`CsrGemm(A, values, col_idx, row_ptr, row_order[, C[, R]]) -> Y`
    A [N, K] float; Y [N, M] = relu?(A @ W^T + C + R). The CSR holds W [M, K] (ONNX Gemm's B
    with transB = 1, or B^T with transB = 0). C: optional bias [M] or [1, M] ("" when absent and
    R is given); R: optional residual [N, M].
    attributes: in_features (K), relu (int)
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .layout import CSR
from ..graph import SPARSECNN_DOMAIN
from ...common.shapes import conv_out_size
from ..node import Builder, NodeContext

CSR_INPUTS = 5  # X, values, col_idx, row_ptr, row_order
RESIDUAL_INPUT = 6  # after the optional bias


def has_residual(ctx: NodeContext) -> bool:
    return RESIDUAL_INPUT < len(ctx.node.input) and bool(ctx.node.input[RESIDUAL_INPUT])


def used_inputs(ctx: NodeContext) -> list[int]:
    """The inputs a CSR op's function takes: X, and the residual when the node has one."""
    return [0, RESIDUAL_INPUT] if has_residual(ctx) else [0]


def epilogue(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """y + bias (along dim 1) + residual, then ReLU: the fused epilogue of the CSR ops, in y's
    precision, in place (y is a fresh result its caller owns: no extra tensors in a graph)."""
    if bias is not None:
        y.add_(bias.to(y.device, y.dtype).view(1, -1, *([1] * (y.dim() - 2))))
    if residual is not None:
        y.add_(residual)
    return y.relu_() if relu else y


def csr_tensors(ctx: NodeContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values fp32 CPU, col_idx int64, row_ptr int64, row_order int64) of a CSR op node."""
    missing = [ctx.node.input[i] for i in range(1, CSR_INPUTS) if ctx.const(i) is None]
    if missing:
        raise NotImplementedError(f"CSR arrays must be initializers; {', '.join(missing)} is not")
    values = ctx.const(1).detach().to("cpu", torch.float32)
    return values, ctx.const(2).to(torch.int64).cpu(), ctx.const(3).to(torch.int64).cpu(), ctx.const(4).to(torch.int64).cpu()


def bias_tensor(ctx: NodeContext, index: int = CSR_INPUTS) -> torch.Tensor | None:
    if index < len(ctx.node.input) and ctx.node.input[index]:
        b = ctx.const(index)
        if b is None:
            raise NotImplementedError("the bias must be an initializer")
        return b.detach().reshape(-1).to("cpu", torch.float32)
    return None


def conv_geometry(ctx: NodeContext) -> dict:
    kh, kw = ctx.attr("kernel_shape")
    sh, sw = ctx.attr("strides", [1, 1])
    pt, pl, pb, pr = ctx.attr("pads", [0, 0, 0, 0])
    dh, dw = ctx.attr("dilations", [1, 1])
    return {"kernel": (kh, kw), "stride": (sh, sw), "pads": (pt, pl, pb, pr), "dilation": (dh, dw),
            "in_channels": ctx.attr("in_channels"), "relu": bool(ctx.attr("relu", 0))}


def reference_csr_conv(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                       m: int, in_channels: int, kernel, stride, pads, dilation, bias: torch.Tensor | None = None,
                       relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """CSR(W) @ im2col(X) in fp32, reshaped to [N, M, Ho, Wo]; bias, residual and ReLU after."""
    n, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(f"input has {c} channels, the CSR weight expects {in_channels}")
    pt, pl, pb, pr = pads
    xf = F.pad(x.float(), (pl, pr, pt, pb))
    ho = conv_out_size(h, pt + pb, kernel[0], stride[0], dilation[0])
    wo = conv_out_size(w, pl + pr, kernel[1], stride[1], dilation[1])
    cols = F.unfold(xf, kernel, dilation=dilation, stride=stride)  # [N, K, Ho*Wo]
    k = cols.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "sparse CSR is beta" notice
        a = torch.sparse_csr_tensor(row_ptr.to(x.device), col_idx.to(x.device), values.to(x.device, torch.float32),
                                    size=(m, k))
        y = torch.stack([a @ cols[i] for i in range(n)]) if n else cols.new_zeros(0, m, ho * wo)
    return epilogue(y.reshape(n, m, ho, wo), bias, residual, relu).to(x.dtype)


def reference_csr_gemm(a: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor, m: int,
                       in_features: int, bias: torch.Tensor | None = None, relu: bool = False,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = torch.sparse_csr_tensor(row_ptr.to(a.device), col_idx.to(a.device), values.to(a.device, torch.float32),
                                    size=(m, in_features))
        y = (w @ a.float().t()).t()
    return epilogue(y, bias, residual, relu).to(a.dtype)


def dense_weight(ctx: NodeContext) -> torch.Tensor:
    """The node's weight rebuilt dense from its CSR: [M, Cin, kh, kw] (CsrConv) or [M, K] (CsrGemm),
    on the node's device and in its precision."""
    values, cols, row_ptr, order = csr_tensors(ctx)
    m = row_ptr.numel() - 1
    if ctx.node.op_type == "CsrGemm":
        shape = [m, int(ctx.attr("in_features"))]
    else:
        shape = [m, int(ctx.attr("in_channels")), *[int(k) for k in ctx.attr("kernel_shape")]]
    w = CSR(values, cols, row_ptr, order, (m, math.prod(shape[1:]))).to_dense()
    return w.reshape(shape).to(ctx.device, ctx.dtype)


def build_dense(ctx: NodeContext):
    """A CSR op run dense: the weight decompressed once, then F.conv2d / F.linear (cuDNN, cuBLAS)
    and the epilogue; fn(x, residual=None). The `sparsert` runtime's dense candidate."""
    w = dense_weight(ctx)
    bias = bias_tensor(ctx)
    bias = bias.to(ctx.device, ctx.dtype) if bias is not None else None
    relu = bool(ctx.attr("relu", 0))
    ctx.inputs_used = used_inputs(ctx)
    if ctx.node.op_type == "CsrGemm":
        def run(x, residual=None):
            return epilogue(F.linear(x, w, bias), None, residual, relu)
    else:
        g = conv_geometry(ctx)
        pt, pl, pb, pr = g["pads"]

        def run(x, residual=None):
            if (pt, pl) == (pb, pr):
                y = F.conv2d(x, w, bias, g["stride"], (pt, pl), g["dilation"])
            else:
                y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, bias, g["stride"], 0, g["dilation"])
            return epilogue(y, None, residual, relu)
    ctx.info.update(format="csr", kernel=f"torch {'linear' if ctx.node.op_type == 'CsrGemm' else 'conv'} "
                                         "(dense from CSR)")
    return run


def _info(ctx: NodeContext, values: torch.Tensor, m: int, k: int, kernel: str) -> None:
    ctx.info.update(format="csr", nnz=int(values.numel()), sparsity=1.0 - values.numel() / max(1, m * k),
                    kernel=kernel)


def build_reference_conv(ctx: NodeContext):
    g = conv_geometry(ctx)
    values, cols, row_ptr, _ = csr_tensors(ctx)
    bias = bias_tensor(ctx)
    m = row_ptr.numel() - 1
    ctx.inputs_used = used_inputs(ctx)  # the CSR arrays live in this closure; the executor may drop its copies
    dev = ctx.device
    values, cols, row_ptr = values.to(dev), cols.to(dev), row_ptr.to(dev)
    bias = bias.to(dev) if bias is not None else None
    _info(ctx, values, m, g["in_channels"] * g["kernel"][0] * g["kernel"][1], "reference (torch sparse CSR x im2col)")
    ctx.info["buffers"] = [t for t in (values, cols, row_ptr, bias) if t is not None]

    def run(x, residual=None):
        return reference_csr_conv(x, values, cols, row_ptr, m, g["in_channels"], g["kernel"], g["stride"], g["pads"],
                                  g["dilation"], bias, g["relu"], residual)

    return run


def build_reference_gemm(ctx: NodeContext):
    values, cols, row_ptr, _ = csr_tensors(ctx)
    bias = bias_tensor(ctx)
    m, k = row_ptr.numel() - 1, ctx.attr("in_features")
    relu = bool(ctx.attr("relu", 0))
    ctx.inputs_used = used_inputs(ctx)
    dev = ctx.device
    values, cols, row_ptr = values.to(dev), cols.to(dev), row_ptr.to(dev)
    bias = bias.to(dev) if bias is not None else None
    _info(ctx, values, m, k, "reference (torch sparse CSR)")
    ctx.info["buffers"] = [t for t in (values, cols, row_ptr, bias) if t is not None]

    def run(a, residual=None):
        return reference_csr_gemm(a, values, cols, row_ptr, m, k, bias, relu, residual)

    return run


def build_reference_conv_pool(ctx: NodeContext):
    """CsrConvPool: the CsrConv reference (with its ReLU), then the fused max-pool."""
    from ..ecr.reference import max_pool, pool_geometry

    conv = build_reference_conv(ctx)
    pool = pool_geometry(ctx.attrs)
    ctx.info["kernel"] += " + max-pool"
    return lambda x: max_pool(conv(x), pool)


OPS: dict[tuple[str, str], Builder] = {
    (SPARSECNN_DOMAIN, "CsrConv"): build_reference_conv,
    (SPARSECNN_DOMAIN, "CsrConvPool"): build_reference_conv_pool,
    (SPARSECNN_DOMAIN, "CsrGemm"): build_reference_gemm,
}
