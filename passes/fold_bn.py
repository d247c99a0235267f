"""Fold inference BatchNormalization into the Conv before it; inline constant Identity nodes."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from .graph import PassResult, export_graph, import_graph


def _constant(tensor):
    """The constant behind `tensor`, looking through Identity nodes, or None."""
    import onnx_graphsurgeon as gs

    while True:
        if isinstance(tensor, gs.Constant):
            return tensor
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity":
            tensor = tensor.inputs[0].inputs[0]
            continue
        return None


def inline_constant_identities(model: onnx.ModelProto) -> PassResult:
    """Replace Identity(constant) by the constant itself.

    PyTorch's exporter deduplicates equal initializers (e.g. freshly initialised BN
    weights) and leaves Identity nodes pointing at one copy; other passes want constants.
    A model without Identity nodes comes back as is (no copy).
    """
    counters: Counter = Counter()
    if not any(n.op_type == "Identity" for n in model.graph.node):
        return PassResult(model, counters, "inline_constant_identities")
    graph = import_graph(model)
    outputs = set(id(t) for t in graph.outputs)
    for node in list(graph.nodes):
        if node.op != "Identity" or id(node.outputs[0]) in outputs:
            continue
        const = _constant(node.inputs[0])
        if const is None:
            continue
        out = node.outputs[0]
        for consumer in list(out.outputs):
            consumer.inputs = [const if t is out else t for t in consumer.inputs]
        node.outputs.clear()
        counters["inlined"] += 1
    return PassResult(export_graph(graph, model), counters, "inline_constant_identities")


def fold_bn(model: onnx.ModelProto) -> PassResult:
    """Conv -> BatchNormalization (inference mode) becomes one Conv with scaled weights and a bias.

    The Conv keeps its weight's name, so layer names stay stable through folding. A model without
    BatchNormalization comes back as is (no copy).
    """
    import onnx_graphsurgeon as gs

    counters: Counter = Counter()
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return PassResult(model, counters, "fold_bn")
    graph = import_graph(model)
    graph_outputs = set(id(t) for t in graph.outputs)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        x = bn.inputs[0]
        conv = x.inputs[0] if len(x.inputs) == 1 else None
        params = [_constant(t) for t in bn.inputs[1:5]]
        if conv is None or conv.op != "Conv" or len(bn.outputs) != 1:
            counters["skipped_not_after_conv"] += 1
            continue
        if len(x.outputs) != 1 or id(x) in graph_outputs:
            counters["skipped_conv_output_shared"] += 1
            continue
        w_const = _constant(conv.inputs[1])
        b_const = _constant(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if w_const is None or any(p is None for p in params) or (len(conv.inputs) > 2 and b_const is None):
            counters["skipped_non_constant"] += 1
            continue
        gamma, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
        eps = bn.attrs.get("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        w = np.asarray(w_const.values, dtype=np.float64)
        b = np.asarray(b_const.values, dtype=np.float64) if b_const is not None else np.zeros(w.shape[0])
        dtype = np.asarray(w_const.values).dtype
        new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype)
        new_b = ((b - mean) * scale + beta).astype(dtype)
        base = w_const.name.removesuffix(".weight")
        conv.inputs[1] = gs.Constant(w_const.name if len(w_const.outputs) == 1 else f"{base}.folded.weight", new_w)
        bias = gs.Constant(f"{base}.bias" if b_const is None else b_const.name + ".folded", new_b)
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        y = bn.outputs[0]
        bn.outputs.clear()
        conv.outputs = [y]
        counters["folded"] += 1
    return PassResult(export_graph(graph, model), counters, "fold_bn")
