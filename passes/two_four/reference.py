"""Reference implementations of the 2:4 ops (plain PyTorch, CPU-capable); schemas below.

Weights use the portable 2:4 layout of `sparsecnn.passes.two_four.layout` (GEMM view with a
tap-major K; kept values + 2-bit positions packed 4 per byte). The reference decompresses
once at build time and runs the standard Conv / Gemm; GPU runtimes are tested against it.

sparsecnn::Conv2to4 (domain `sparsecnn`, version 1)
    inputs:  X [N, Cin, H, W]
             values    [Cout, kh*kw*Cin/2]      the kept weights (the model's float type)
             positions [Cout, ceil(kh*kw*Cin/8)] uint8, 2-bit positions, 4 per byte
             B [Cout] (optional)
    attributes: kernel_shape [kh, kw] (required), strides, pads, dilations, auto_pad as in
             ONNX Conv; group is always 1
    output:  Y [N, Cout, Ho, Wo], exactly ONNX Conv with the decompressed weight

sparsecnn::Gemm2to4 (domain `sparsecnn`, version 1)
    inputs:  A [N, in]
             values    [out, in/2]
             positions [out, ceil(in/8)] uint8
             C [out] (optional)
    attributes: alpha, beta as in ONNX Gemm (transA = 0; the weight is stored as [out, in],
             i.e. ONNX Gemm with transB = 1)
    output:  Y [N, out] = alpha * A @ W^T + beta * C
"""
from __future__ import annotations

import onnx

from ..graph import SPARSECNN_DOMAIN
from .layout import CONV_OP, GEMM_OP, decompress_weight
from ..node import STANDARD_OPS, Builder, NodeContext, op

OPS: dict[tuple[str, str], Builder] = {}

_WEIGHT = "__2to4_weight"


def dense_context(ctx: NodeContext, op_type: str, weight, extra_attrs: dict | None = None) -> NodeContext:
    """A NodeContext for the standard `op_type` with `weight` as its constant input 1."""
    node = onnx.helper.make_node(op_type, [ctx.node.input[0], _WEIGHT] + list(ctx.node.input[3:4]),
                                 list(ctx.node.output), name=ctx.name)
    attrs = {k: v for k, v in ctx.attrs.items()}
    attrs.update(extra_attrs or {})
    consts = {_WEIGHT: weight}
    if len(ctx.node.input) > 3 and ctx.node.input[3] in ctx.consts:
        consts[ctx.node.input[3]] = ctx.consts[ctx.node.input[3]]
    return NodeContext(node, attrs, consts, ctx.shapes, ctx.device, ctx.dtype, ctx.channels_last, ctx.options)


def dense_weight(ctx: NodeContext):
    """The decompressed weight in ONNX layout, on the engine's device and dtype."""
    values, positions = ctx.const(1), ctx.const(2)
    if values is None or positions is None:
        raise NotImplementedError("2:4 values and positions must be initializers")
    kernel = ctx.attr("kernel_shape") if ctx.node.op_type == CONV_OP else None
    return decompress_weight(values, positions, kernel).to(ctx.device, ctx.dtype)


@op(CONV_OP, SPARSECNN_DOMAIN, table=OPS)
def _conv2to4(ctx: NodeContext):
    sub = dense_context(ctx, "Conv", dense_weight(ctx))
    run = STANDARD_OPS[("", "Conv")](sub)
    ctx.info.update(kernel="reference: 2:4 decompressed, " + sub.info.get("kernel", "torch.conv"), format="2:4")
    return lambda x, values=None, positions=None, bias=None: run(x, None, bias)


@op(GEMM_OP, SPARSECNN_DOMAIN, table=OPS)
def _gemm2to4(ctx: NodeContext):
    sub = dense_context(ctx, "Gemm", dense_weight(ctx), {"transB": 1, "transA": 0})
    run = STANDARD_OPS[("", "Gemm")](sub)
    weight = sub.consts[_WEIGHT]
    ctx.info.update(kernel="reference: 2:4 decompressed, " + sub.info.get("kernel", "torch.linear"), format="2:4")
    return lambda a, values=None, positions=None, c=None: run(a, weight, c)
