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

from ..common.errors import UserError

# NodeContext, attributes and the op table live in passes/node.py (below the format references);
# re-exported here, the executor's op module.
from ..passes.node import (STANDARD_OPS, Builder, NodeContext, OpFn, _torch_pad, attributes, op,  # noqa: F401
                          resolve_pads)

def _simple(fn: Callable) -> Builder:
    return lambda ctx: fn


def _div(a, b):
    # ONNX divides integers with truncation (shape arithmetic: ShuffleNet's channel split);
    # torch.div would return floats, which Slice cannot take as bounds
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": torch.pow,
    "Neg": torch.neg, "Sqrt": torch.sqrt, "Abs": torch.abs, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
    "Log": torch.log, "Floor": torch.floor, "Ceil": torch.ceil, "Softplus": F.softplus, "Mish": F.mish,
    "HardSwish": F.hardswish, "Max": lambda *xs: _fold(torch.maximum, xs), "Min": lambda *xs: _fold(torch.minimum, xs),
    "Sum": lambda *xs: _fold(torch.add, xs), "Equal": torch.eq, "Where": torch.where,
    "Identity": lambda x: x, "Shape": lambda x: torch.tensor(list(x.shape), dtype=torch.int64),
}.items():
    op(_name)(_simple(_fn))


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


@op("HardSigmoid")
def _hard_sigmoid(ctx):
    alpha, beta = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@op("Elu")
def _elu(ctx):
    alpha = ctx.attr("alpha", 1.0)
    return lambda x: F.elu(x, alpha)


@op("PRelu")
def _prelu(ctx):
    return lambda x, slope: torch.where(x >= 0, x, x * slope)


@op("Gelu")
def _gelu(ctx):
    approximate = ctx.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@op("ConstantOfShape")
def _constant_of_shape(ctx):
    value = ctx.attr("value")
    t = torch.as_tensor(np.array(value if value is not None else np.zeros(1, np.float32))).reshape(())
    if t.is_floating_point():
        t = t.to(ctx.dtype)

    def run(shape):
        return torch.full([int(v) for v in shape.tolist()], t.item(), dtype=t.dtype,
                          device=ctx.device if t.is_floating_point() else "cpu")

    return run


@op("Expand")
def _expand(ctx):
    def run(x, shape):
        dims = [int(v) for v in shape.tolist()]
        # ONNX broadcasts both ways (a 1 in the shape keeps x's size); torch's expand does not
        target = torch.broadcast_shapes(tuple(x.shape), tuple(dims))
        return x.expand(target)

    return run


@op("Split")
def _split(ctx):
    axis = ctx.attr("axis", 0)
    attr_split = ctx.attr("split")
    parts = len(ctx.node.output)

    def run(x, split=None):
        sizes = attr_split if split is None else [int(v) for v in split.tolist()]
        if sizes is None:
            n = x.shape[axis]
            size = -(-n // parts)  # ONNX: equal parts, the last smaller when it does not divide
            sizes = [min(size, n - i * size) for i in range(parts)]
        return tuple(torch.split(x, list(sizes), dim=axis))

    return run


@op("LayerNormalization")
def _layer_norm(ctx):
    if len([o for o in ctx.node.output[1:] if o]):
        raise NotImplementedError("LayerNormalization with its Mean or InvStdDev output")
    axis = ctx.attr("axis", -1)
    eps = ctx.attr("epsilon", 1e-5)

    def run(x, scale, bias=None):
        a = axis % x.dim()
        dims = tuple(range(a, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square().mean(dim=dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps) * scale
        return y if bias is None else y + bias

    return run


@op("InstanceNormalization")
def _instance_norm(ctx):
    eps = ctx.attr("epsilon", 1e-5)
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


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


@op("ConvTranspose")
def _conv_transpose(ctx):
    w = ctx.const(1)
    kernel = ctx.attr("kernel_shape") or (list(w.shape[2:]) if w is not None else None)
    if kernel is None:
        raise NotImplementedError("ConvTranspose whose weight is not a constant")
    spatial = len(kernel)
    stride = ctx.attr("strides", [1] * spatial)
    dilation = ctx.attr("dilations", [1] * spatial)
    groups = ctx.attr("group", 1)
    extra = ctx.attr("output_padding", [0] * spatial)
    if ctx.attr("output_shape") is not None or ctx.attr("auto_pad", "NOTSET") != "NOTSET":
        raise NotImplementedError("ConvTranspose with output_shape or auto_pad (give explicit pads)")
    pads = ctx.attr("pads", [0] * 2 * spatial)
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]

    def run(x, weight, bias=None):
        weight = w if w is not None else weight
        begin, end = pads[:spatial], pads[spatial:]
        if begin == end and all(e < max(s, d) for e, s, d in zip(extra, stride, dilation)):
            return conv(x, weight, bias, stride, begin, extra, groups, dilation)
        # asymmetric pads: the full output (output_padding grows its end), cropped each side, then the bias
        y = conv(x, weight, None, stride, 0, 0, groups, dilation)
        y = F.pad(y, _torch_pad([0] * spatial + list(extra)))
        y = y[(slice(None), slice(None)) + tuple(slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begin, end)))]
        return y if bias is None else y + bias.view(-1, *[1] * spatial)

    ctx.info.update(kernel="torch.conv_transpose")
    return run


@op("Resize")
def _resize(ctx):
    mode = ctx.attr("mode", "nearest")
    coords = ctx.attr("coordinate_transformation_mode", "half_pixel")
    nearest = ctx.attr("nearest_mode", "round_prefer_floor")
    if ctx.attr("antialias", 0) or ctx.attr("axes") is not None or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize with antialias, axes or keep_aspect_ratio_policy")
    if mode == "nearest" and (coords, nearest) == ("asymmetric", "floor"):
        how = {"mode": "nearest"}  # torch's nearest (what F.interpolate exports)
    elif mode == "linear" and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        how = {"mode": "bilinear", "align_corners": coords == "align_corners"}
    else:
        raise NotImplementedError(f"Resize mode={mode} coordinate_transformation_mode={coords}"
                                  + (f" nearest_mode={nearest}" if mode == "nearest" else "")
                                  + " (torch's interpolate exports nearest/asymmetric/floor or linear/half_pixel)")

    def run(x, roi=None, scales=None, sizes=None):
        by_size = sizes is not None and sizes.numel() > 0
        given = [int(v) for v in sizes.tolist()] if by_size else [float(f) for f in scales.tolist()]
        if given[:2] != (list(x.shape[:2]) if by_size else [1.0, 1.0]):
            raise UserError(f"Resize '{ctx.name}' scales the batch or channel axis, which this runtime cannot run")
        if x.dim() != 4 and how["mode"] == "bilinear":
            raise UserError(f"Resize '{ctx.name}': linear resize of a {x.dim()}-D tensor is not supported")
        if by_size:
            return F.interpolate(x, size=given[2:], **how)
        # by scale, ONNX maps coordinates with the scale given, not in/out sizes: so does torch here
        return F.interpolate(x, scale_factor=given[2:], recompute_scale_factor=False, **how)

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
    t = torch.as_tensor(np.array(value))  # a copy: the attribute's array is read-only
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
        flips = []
        for s, e, a, k in zip(st, en, ax, sp):
            a %= x.dim()
            n = x.shape[a]
            s, e = (s + n if s < 0 else s), (e + n if e < 0 else e)
            if k > 0:
                index[a] = slice(max(min(s, n), 0), max(min(e, n), 0), k)
            else:  # ONNX's reverse slice (torch indexing takes no negative step): flip, then slice forward
                s, e = max(min(s, n - 1), -1), max(min(e, n - 1), -1)
                index[a] = slice(n - 1 - s, n - 1 - e, -k) if s > e else slice(0, 0)
                flips.append(a)
        if flips:
            x = torch.flip(x, flips)
        return x[tuple(index)]

    return run
