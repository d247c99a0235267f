"""Fuse Conv -> Relu -> MaxPool into one `sparsecnn::EcrConvPool` (PECR) and Conv -> Relu into
`sparsecnn::EcrConv` (ECR): the conv-pool runtime's rewrite (schemas in passes/ecr/reference.py).

These ops skip the zeros of the *input feature map*, so a Conv is taken only where its input
is known to hold exact zeros: the output of a Relu (or Relu6 = Clip(0, 6)), of a MaxPool or
Concat over such tensors, or of another fused op with its ReLU. Weights stay dense and keep
their names. Every Conv left alone is counted under `skipped_<reason>`; a MaxPool after a
fused Conv -> Relu that cannot join it is counted under `pool_not_fused_<reason>`.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from ...common.shapes import explicit_pads
from ..graph import SPARSECNN_DOMAIN, STANDARD_DOMAINS, PassResult, export_graph, import_graph, static_shapes

ECR_CONV = "EcrConv"
ECR_CONV_POOL = "EcrConvPool"


def _explicit_pads(attrs: dict, spatial: list[int] | None, kernel: list[int], stride: list[int]) -> list[int] | None:
    """ONNX pads [top, left, bottom, right] of a graphsurgeon node; None if it needs an unknown size."""
    return explicit_pads(attrs.get("auto_pad"), attrs.get("pads"), spatial, kernel, stride, attrs.get("dilations"))


def _constant(tensor):
    import onnx_graphsurgeon as gs

    return tensor if isinstance(tensor, gs.Constant) else None


def _sparse_tensors(graph) -> set[str]:
    """Names of tensors that hold the exact zeros of a ReLU (in topological order)."""
    sparse: set[str] = set()
    for node in graph.nodes:
        ins = [t.name for t in node.inputs if t is not None and t.name]
        op = node.op
        if op == "Relu" or (node.domain == SPARSECNN_DOMAIN and node.attrs.get("relu", 1) and op in (ECR_CONV, ECR_CONV_POOL)):
            sparse.update(t.name for t in node.outputs)
        elif op == "Clip" and _clip_min(node) == 0.0:
            sparse.update(t.name for t in node.outputs)
        elif op in ("MaxPool", "Identity", "Dropout") and ins and ins[0] in sparse:
            sparse.add(node.outputs[0].name)
        elif op == "Concat" and ins and all(n in sparse for n in ins):
            sparse.add(node.outputs[0].name)
    return sparse


def _clip_min(node) -> float | None:
    if "min" in node.attrs:
        return float(node.attrs["min"])
    if len(node.inputs) > 1 and _constant(node.inputs[1]) is not None:
        return float(np.asarray(node.inputs[1].values).reshape(-1)[0])
    return None


def _conv_reason(conv, w_const, b_ok: bool) -> str | None:
    """Why this Conv cannot become an ECR op, or None."""
    if w_const is None:
        return "weight_not_constant"
    if not b_ok:
        return "bias_not_constant"
    w = np.asarray(w_const.values)
    if w.ndim != 4:
        return "not_2d"
    if int(conv.attrs.get("group", 1)) != 1:
        return "grouped"
    if any(int(d) != 1 for d in conv.attrs.get("dilations", [1, 1])):
        return "dilated"
    return None


def pool_unfusable_reason(pool) -> str | None:
    """Why a graphsurgeon MaxPool cannot be fused into the conv before it (None: it can)."""
    if len(pool.outputs) > 1 and pool.outputs[1].name:
        return "indices_output"
    kernel = list(pool.attrs.get("kernel_shape", []))
    if len(kernel) != 2:
        return "not_2d"
    if any(int(d) != 1 for d in pool.attrs.get("dilations", [1, 1])):
        return "dilated"
    if int(pool.attrs.get("storage_order", 0)) != 0:
        return "storage_order"
    return None


def _single_consumer(tensor, graph_outputs: set[int]):
    if id(tensor) in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def fuse_ecr(model: onnx.ModelProto, plain_conv: bool = True, require_sparse_input: bool = True) -> PassResult:
    """Conv -> Relu -> MaxPool => EcrConvPool; Conv -> Relu => EcrConv (relu=1).

    plain_conv: also turn a Conv with a sparse input but no Relu after it (e.g. a residual
    block's second conv, a detection head) into EcrConv with relu=0.
    require_sparse_input: leave a Conv whose input is not known to come from a ReLU (the
    stem, which reads the image) dense; the runtime would measure it slower anyway.
    """
    import onnx_graphsurgeon as gs

    shapes = static_shapes(model, unknown=-1)  # -1 where a dim is symbolic
    graph = import_graph(model)
    graph.toposort()
    counters: Counter = Counter()
    graph_outputs = {id(t) for t in graph.outputs}
    sparse = _sparse_tensors(graph)
    for conv in [n for n in graph.nodes if n.op == "Conv" and n.domain in STANDARD_DOMAINS]:
        w_const = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
        bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
        reason = _conv_reason(conv, w_const, bias is None or _constant(bias) is not None)
        x = conv.inputs[0]
        if reason is None and require_sparse_input and x.name not in sparse:
            reason = "input_not_after_relu"
        in_shape = shapes.get(x.name)
        if reason is None:
            kernel = [int(k) for k in np.asarray(w_const.values).shape[2:]]
            stride = [int(s) for s in conv.attrs.get("strides", [1, 1])]
            pads = _explicit_pads(conv.attrs, in_shape[2:] if in_shape and len(in_shape) == 4 else None, kernel, stride)
            if pads is None:
                reason = "auto_pad_with_unknown_input_size"
        if reason is not None:
            counters[f"skipped_{reason}"] += 1
            continue
        y = conv.outputs[0]
        relu = _single_consumer(y, graph_outputs)
        relu = relu if relu is not None and relu.op == "Relu" else None
        if relu is None and not plain_conv:
            counters["skipped_no_relu_after"] += 1
            continue
        pool = None
        if relu is not None:
            pool = _single_consumer(relu.outputs[0], graph_outputs)
            if pool is not None and pool.op != "MaxPool":
                pool = None
            elif pool is not None:
                pool_reason = pool_unfusable_reason(pool)
                pool_kernel = [int(k) for k in pool.attrs.get("kernel_shape", [])]
                pool_stride = [int(s) for s in pool.attrs.get("strides", [1] * len(pool_kernel))]
                y_shape = shapes.get(y.name)
                pool_pads = None if pool_reason else _explicit_pads(
                    pool.attrs, y_shape[2:] if y_shape and len(y_shape) == 4 else None, pool_kernel, pool_stride)
                if pool_reason is None and pool_pads is None:
                    pool_reason = "auto_pad_with_unknown_input_size"
                if pool_reason is not None:
                    counters[f"pool_not_fused_{pool_reason}"] += 1
                    pool = None
        attrs = {"kernel_shape": kernel, "strides": stride, "pads": pads, "relu": int(relu is not None)}
        last = pool or relu or conv
        out = last.outputs[0]
        if in_shape and len(in_shape) == 4:
            attrs["input_shape"] = [int(v) for v in in_shape[1:]]
        out_shape = shapes.get(out.name)
        if out_shape and len(out_shape) == 4:
            attrs["output_shape"] = [int(v) for v in out_shape[1:]]
        if pool is not None:
            attrs.update(pool_kernel_shape=pool_kernel, pool_strides=pool_stride, pool_pads=pool_pads,
                         pool_ceil_mode=int(pool.attrs.get("ceil_mode", 0)))
            op, key = ECR_CONV_POOL, "converted_conv_relu_pool"
        else:
            op, key = ECR_CONV, "converted_conv_relu" if relu is not None else "converted_conv"
        inputs = [x, conv.inputs[1]] + ([bias] if bias is not None else [])
        for node in (pool, relu, conv):
            if node is not None:
                node.outputs.clear()
        if out_shape and len(out_shape) == 4 and out.dtype is None:
            out.dtype = np.float32
        fused = gs.Node(op=op, name=conv.name or out.name, domain=SPARSECNN_DOMAIN, attrs=attrs,
                        inputs=inputs, outputs=[out])
        graph.nodes.append(fused)
        counters[key] += 1
    return PassResult(export_graph(graph, model), counters, "fuse_ecr")
