"""The standard-ONNX op table of the shared executor: each op as plain PyTorch.

A builder receives the node's context at compile time and returns the function that runs
it; builders may precompute from constant inputs (weights). Runtimes extend the table with
their `sparsecnn`-domain ops.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

# NodeContext, attributes and the op table live in passes/node.py (below the format references);
# re-exported here, the executor's op module.
from ..passes.node import (STANDARD_OPS, Builder, NodeContext, OpFn, _torch_pad, attributes, op,  # noqa: F401
                          resolve_pads)

def _simple(fn: Callable) -> Builder:
    return lambda ctx: fn


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
    "Neg": torch.neg, "Sqrt": torch.sqrt, "Abs": torch.abs,
    "Identity": lambda x: x, "Shape": lambda x: torch.tensor(list(x.shape), dtype=torch.int64),
}.items():
    op(_name)(_simple(_fn))


@op("Dropout")
def _dropout(ctx):
    return lambda x, *rest: x


@op("LeakyRelu")
def _leaky(ctx):
    alpha = ctx.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@op("Clip")
def _clip(ctx):
    lo, hi = ctx.const(1), ctx.const(2)
    lo = float(lo) if lo is not None else ctx.attr("min", None)
    hi = float(hi) if hi is not None else ctx.attr("max", None)
    return lambda x, *rest: torch.clamp(x, lo, hi)


@op("Softmax")
def _softmax(ctx):
    axis = ctx.attr("axis", -1)
    return lambda x: torch.softmax(x, axis)


@op("Conv")
def _conv(ctx):
    w = ctx.const(1)
    kernel = ctx.attr("kernel_shape") or (list(w.shape[2:]) if w is not None else None)
    spatial = len(kernel)
    stride = ctx.attr("strides", [1] * spatial)
    dilation = ctx.attr("dilations", [1] * spatial)
    groups = ctx.attr("group", 1)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    mode = ctx.options.get("dense_conv", "cudnn")
    if mode != "cudnn":  # another dense engine, or the per-layer choice (runtimes/torch/dense_conv.py)
        from .torch.dense_conv import build_dense_conv

        layer = build_dense_conv(ctx, w, kernel, stride, dilation, groups, mode,
                                 lambda x: resolve_pads(ctx, x, kernel, stride, dilation))
        if layer is not None:
            return layer
    if w is not None and ctx.channels_last and w.dim() == 4:
        w = w.contiguous(memory_format=torch.channels_last)

    def run(x, weight, bias=None):
        weight = w if w is not None else weight
        pads = resolve_pads(ctx, x, kernel, stride, dilation)
        begin, end = pads[:spatial], pads[spatial:]
        if begin == end:
            return conv(x, weight, bias, stride, begin, dilation, groups)
        return conv(F.pad(x, _torch_pad(pads)), weight, bias, stride, 0, dilation, groups)

    ctx.info.update(kernel="torch.conv (cuDNN)" if ctx.device.type == "cuda" else "torch.conv")
    return run


def _pool_prep(ctx, x, kernel, stride, fill):
    pads = resolve_pads(ctx, x, kernel, stride, ctx.attr("dilations", [1] * len(kernel)))
    n = len(kernel)
    begin, end = pads[:n], pads[n:]
    if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel)):
        return x, begin
    return F.pad(x, _torch_pad(pads), value=fill), [0] * n


@op("MaxPool")
def _maxpool(ctx):
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise NotImplementedError("MaxPool with an Indices output")
    kernel = ctx.attr("kernel_shape")
    stride = ctx.attr("strides", [1] * len(kernel))
    dilation = ctx.attr("dilations", [1] * len(kernel))
    ceil = bool(ctx.attr("ceil_mode", 0))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]

    def run(x):
        x, pad = _pool_prep(ctx, x, kernel, stride, float("-inf"))
        return pool(x, kernel, stride, pad, dilation, ceil_mode=ceil)

    return run


@op("AveragePool")
def _avgpool(ctx):
    kernel = ctx.attr("kernel_shape")
    stride = ctx.attr("strides", [1] * len(kernel))
    ceil = bool(ctx.attr("ceil_mode", 0))
    include = bool(ctx.attr("count_include_pad", 0))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]

    def run(x):
        pads = resolve_pads(ctx, x, kernel, stride, [1] * len(kernel))
        n = len(kernel)
        if pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel)):
            return pool(x, kernel, stride, pads[:n], ceil_mode=ceil, count_include_pad=include)
        if not include and any(pads):
            raise NotImplementedError("asymmetric AveragePool padding with count_include_pad=0")
        return pool(F.pad(x, _torch_pad(pads)), kernel, stride, 0, ceil_mode=ceil)

    return run


@op("GlobalAveragePool")
def _gap(ctx):
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(ctx):
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("BatchNormalization")
def _bn(ctx):
    eps = ctx.attr("epsilon", 1e-5)
    return lambda x, g, b, m, v, *rest: F.batch_norm(x, m, v, g, b, False, 0.0, eps)


@op("Gemm")
def _gemm(ctx):
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)

    def run(a, b, c=None):
        if ta:
            a = a.t()
        if alpha == 1.0 and beta == 1.0:
            return F.linear(a, b if tb else b.t(), c)
        y = alpha * (a @ (b.t() if tb else b))
        return y if c is None else y + beta * c

    ctx.info.update(kernel="torch.linear (cuBLAS)" if ctx.device.type == "cuda" else "torch.linear")
    return run


@op("MatMul")
def _matmul(ctx):
    return torch.matmul


@op("Flatten")
def _flatten(ctx):
    axis = ctx.attr("axis", 1)

    def run(x):
        a = axis if axis >= 0 else x.dim() + axis
        lead = math.prod(x.shape[:a])
        return x.reshape(lead, -1)

    return run


@op("Reshape")
def _reshape(ctx):
    allowzero = ctx.attr("allowzero", 0)

    def run(x, shape):
        dims = [int(v) for v in shape.tolist()]
        if not allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return run


@op("Transpose")
def _transpose(ctx):
    perm = ctx.attr("perm")
    return lambda x: x.permute(*(perm or reversed(range(x.dim()))))


@op("Concat")
def _concat(ctx):
    axis = ctx.attr("axis")

    return lambda *xs: torch.cat(xs, axis)


@op("Unsqueeze")
def _unsqueeze(ctx):
    attr_axes = ctx.attr("axes")

    def run(x, axes=None):
        ax = attr_axes if axes is None else axes.tolist()
        out_rank = x.dim() + len(ax)
        for a in sorted(a % out_rank for a in ax):
            x = x.unsqueeze(a)
        return x

    return run


@op("Squeeze")
def _squeeze(ctx):
    attr_axes = ctx.attr("axes")

    def run(x, axes=None):
        ax = attr_axes if axes is None else axes.tolist()
        if ax is None:
            return x.squeeze()
        for a in sorted((a % x.dim() for a in ax), reverse=True):
            x = x.squeeze(a)
        return x

    return run


@op("Gather")
def _gather(ctx):
    axis = ctx.attr("axis", 0)

    def run(x, idx):
        idx = idx.to(x.device)
        if idx.dim() == 0:
            return x.select(axis, int(idx) % x.shape[axis])
        return torch.index_select(x, axis, (idx % x.shape[axis]).flatten()).reshape(
            *x.shape[:axis], *idx.shape, *x.shape[axis + 1:])

    return run


@op("Constant")
def _constant(ctx):
    value = ctx.attr("value")
    t = torch.as_tensor(value)
    if t.is_floating_point():
        t = t.to(ctx.device, ctx.dtype)
    return lambda: t


@op("Cast")
def _cast(ctx):
    to = onnx.helper.tensor_dtype_to_np_dtype(ctx.attr("to"))
    # Floats run in the engine's precision; other types map through NumPy's dtype.
    target = ctx.dtype if to.kind == "f" else torch.from_numpy(np.zeros(0, dtype=to)).dtype

    def run(x):
        return x.to(target)

    return run


@op("Pad")
def _pad(ctx):
    mode = ctx.attr("mode", "constant")

    def run(x, pads, value=None, axes=None):
        p = [int(v) for v in pads.tolist()]
        if axes is not None:
            raise NotImplementedError("Pad with axes")
        fill = float(value) if value is not None else 0.0
        return F.pad(x, _torch_pad(p), mode=mode if mode != "edge" else "replicate",
                     **({"value": fill} if mode == "constant" else {}))

    return run


@op("ReduceMean")
def _reduce_mean(ctx):
    keep = bool(ctx.attr("keepdims", 1))
    attr_axes = ctx.attr("axes")

    def run(x, axes=None):
        ax = attr_axes if axes is None else axes.tolist()
        return x.mean(dim=tuple(ax) if ax is not None else tuple(range(x.dim())), keepdim=keep)

    return run


@op("Slice")
def _slice(ctx):
    def run(x, starts, ends, axes=None, steps=None):
        st, en = starts.tolist(), ends.tolist()
        ax = axes.tolist() if axes is not None else list(range(len(st)))
        sp = steps.tolist() if steps is not None else [1] * len(st)
        index = [slice(None)] * x.dim()
        for s, e, a, k in zip(st, en, ax, sp):
            if k != 1:
                raise NotImplementedError("Slice with steps other than 1")
            n = x.shape[a]
            index[a] = slice(max(min(s if s >= 0 else s + n, n), 0), max(min(e if e >= 0 else e + n, n), 0))
        return x[tuple(index)]

    return run
