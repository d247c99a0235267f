"""fp32 -> fp16 ONNX: what strongly-typed TensorRT (10.12+, and 11 which has no FP16 builder flag) needs.

Every float32 tensor becomes float16: initializers (values beyond fp16's range are clipped
to +-65504 and counted), Constant / ConstantOfShape values, Cast-to-float targets and the
declared types of intermediate tensors. With `keep_io_types` (the default) the graph's
inputs and outputs stay float32 with a Cast at each, so callers feed and read fp32 as before.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import PassResult, copy_model

FP16_MAX = float(np.finfo(np.float16).max)


def _half(t: onnx.TensorProto, counters: Counter) -> onnx.TensorProto:
    arr = numpy_helper.to_array(t)
    big = np.abs(arr) > FP16_MAX
    if big.any():
        counters["values_clipped_to_fp16_range"] += int(big.sum())
    out = numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)
    return out


def _retype(vi: onnx.ValueInfoProto) -> bool:
    if _is_float(vi):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        return True
    return False


def _is_float(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.tensor_type.elem_type == TensorProto.FLOAT


def _cast_at_boundary(g: onnx.GraphProto, vi: onnx.ValueInfoProto, entering: bool) -> onnx.NodeProto:
    """Rename graph input or output `vi` to `<name>.fp16` inside the graph; the Cast between the two names."""
    half_name = vi.name + ".fp16"
    for node in g.node:
        for names in (node.input, node.output):
            for j, name in enumerate(names):
                if name == vi.name:
                    names[j] = half_name
    if entering:
        return helper.make_node("Cast", [vi.name], [half_name], name=f"cast_in_{vi.name}", to=TensorProto.FLOAT16)
    return helper.make_node("Cast", [half_name], [vi.name], name=f"cast_out_{vi.name}", to=TensorProto.FLOAT)


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = True) -> PassResult:
    counters: Counter = Counter()
    out = copy_model(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_half(t, counters))
            counters["initializers"] += 1
    for node in g.node:
        for a in node.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_half(a.t, counters))
                counters["constants"] += 1
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
                counters["casts"] += 1
    for vi in g.value_info:
        _retype(vi)
    if keep_io_types:
        head = [_cast_at_boundary(g, vi, entering=True) for vi in g.input if _is_float(vi)]
        tail = [_cast_at_boundary(g, vi, entering=False) for vi in g.output if _is_float(vi)]
        if head or tail:
            counters["io_casts"] += len(head) + len(tail)
        nodes = head + list(g.node) + tail
        del g.node[:]
        g.node.extend(nodes)
    else:
        for vi in list(g.input) + list(g.output):
            _retype(vi)
    return PassResult(out, counters, "to_fp16")
