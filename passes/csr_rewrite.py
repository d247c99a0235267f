"""Rewrite pruned Conv / Gemm nodes into `sparsecnn::CsrConv` / `sparsecnn::CsrGemm`.

The weight leaves the model as a dense tensor and comes back as four initializers holding
its CSR over the GEMM view (passes/csr.py): `<weight>.csr.values`, `.col_idx`, `.row_ptr`,
`.row_order`. Geometry (kernel, strides, pads, dilations, input channels) and a fused-ReLU
flag are attributes; the op's output keeps its value_info so shape inference goes on
through the custom op. Schemas: runtimes/csr_ops.py and docs/ops.md.

A layer stays a standard ONNX node, counted by reason, when it is excluded (stems and
heads, or `exclude`), denser than `max_density` (CSR would not pay), grouped, not 2-D, or
of a form the op does not express.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .csr import csr_from_dense, gemm_view
from .prune import _is_excluded
from .graph import (SPARSECNN_DOMAIN, SPARSECNN_OPSET, PassResult, inferred_value_infos, initializer_map, node_attr,
                    prune_exclusions)

CSR_SUFFIXES = ("values", "col_idx", "row_ptr", "row_order")
DEFAULT_MAX_DENSITY = 0.3  # at 70 % zeros and more a layer goes CSR (the low end of unstructured pruning)


def _dims(vi: onnx.ValueInfoProto | None) -> list[int | None] | None:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _same_pads(in_hw, kernel, strides, dilations, upper: bool) -> list[int]:
    begins, ends = [], []
    for n, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def csr_initializers(weight_name: str, matrix: np.ndarray, index_dtype: str = "auto") -> tuple[list[onnx.TensorProto], object]:
    """The four CSR initializers of a GEMM-view matrix [M, K] (and the CSR itself).

    Column indices are stored as uint16 when K <= 65536 (`index_dtype="auto"`), halving
    their bytes; row_ptr and row_order are int32. Values are fp32.
    """
    csr = csr_from_dense(matrix)
    k = csr.shape[1]
    if index_dtype == "auto":
        index_dtype = "uint16" if k <= 65536 else "int32"
    cols = csr.col_idx.numpy().astype(np.uint16 if index_dtype == "uint16" else np.int32)
    arrays = {"values": csr.values.numpy().astype(np.float32), "col_idx": cols,
              "row_ptr": csr.row_ptr.numpy().astype(np.int32), "row_order": csr.row_order.numpy().astype(np.int32)}
    return [numpy_helper.from_array(arrays[s], f"{weight_name}.csr.{s}") for s in CSR_SUFFIXES], csr


def csr_rewrite(model: onnx.ModelProto, max_density: float = DEFAULT_MAX_DENSITY, exclude: list[str] | None = None,
                fuse_relu: bool = True, index_dtype: str = "auto") -> PassResult:
    """Conv (group 1, 2-D) and Gemm with constant pruned weights -> CSR custom ops.

    Counters: `conv_csr`, `gemm_csr`, `relu_fused`, and `dense_<reason>` for each layer
    left as it was (excluded, too_dense, grouped, not_2d, auto_pad_unknown_shape,
    gemm_form, weight_shared, bias_not_constant).
    """
    counters: Counter = Counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = initializer_map(out)
    types = inferred_value_infos(model)
    patterns = prune_exclusions(model) + list(exclude or [])
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    new_nodes: list[onnx.NodeProto] = []
    dropped: set[int] = set()  # ids of Relu nodes fused into the op before them
    remove_inits: set[str] = set()
    add_inits: list[onnx.TensorProto] = []
    value_infos: dict[str, onnx.ValueInfoProto] = {}

    for node in graph.node:
        if id(node) in dropped:
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm"):
            new_nodes.append(node)
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        weight_name = node.input[1]
        w = np.array(numpy_helper.to_array(inits[weight_name]))
        reason, spec = _convertible(node, w, inits, types)
        if reason is None and _is_excluded(weight_name, patterns):
            reason = "excluded"
        if reason is None and len([c for c in consumers.get(weight_name, [])]) > 1:
            reason = "weight_shared"
        matrix = None
        if reason is None:
            matrix = gemm_view(w).numpy() if node.op_type == "Conv" else spec.pop("matrix")
            density = np.count_nonzero(matrix) / max(1, matrix.size)
            if density > max_density:
                reason = "too_dense"
        if reason is not None:
            counters[f"dense_{reason}"] += 1
            new_nodes.append(node)
            continue

        tensors, csr = csr_initializers(weight_name, matrix, index_dtype)
        add_inits += tensors
        remove_inits.add(weight_name)
        inputs = [node.input[0]] + [t.name for t in tensors]
        bias = spec.pop("bias")
        if bias:
            inputs.append(bias)
        output = node.output[0]
        relu = 0
        follow = consumers.get(output, [])
        if (fuse_relu and len(follow) == 1 and follow[0].op_type == "Relu" and follow[0].domain in ("", "ai.onnx")
                and output not in graph_outputs):
            relu, output = 1, follow[0].output[0]
            dropped.add(id(follow[0]))
            counters["relu_fused"] += 1
        op_type = "CsrConv" if node.op_type == "Conv" else "CsrGemm"
        new = helper.make_node(op_type, inputs, [output], name=node.name or f"{weight_name}.csr",
                               domain=SPARSECNN_DOMAIN, relu=relu, **spec)
        new_nodes.append(new)
        counters["conv_csr" if node.op_type == "Conv" else "gemm_csr"] += 1
        vi = types.get(output) or types.get(node.output[0])
        if vi is not None and output not in graph_outputs:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vi)
            copy.name = output
            value_infos[output] = copy

    if not (counters["conv_csr"] or counters["gemm_csr"]):
        return PassResult(out, counters, "csr_rewrite")
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {n for node in new_nodes for n in node.input}
    kept = [t for t in graph.initializer if t.name not in remove_inits or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + add_inits)
    kept_inputs = [i for i in graph.input if i.name not in remove_inits or i.name in still_used]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    old_vi = [vi for vi in graph.value_info if vi.name not in value_infos]
    del graph.value_info[:]
    graph.value_info.extend(old_vi + list(value_infos.values()))
    if not any(o.domain == SPARSECNN_DOMAIN for o in out.opset_import):
        out.opset_import.add(domain=SPARSECNN_DOMAIN, version=SPARSECNN_OPSET)
    return PassResult(out, counters, "csr_rewrite")


def _convertible(node: onnx.NodeProto, w: np.ndarray, inits: dict, types: dict) -> tuple[str | None, dict]:
    """(reason it stays dense or None, the op's attributes plus 'bias' and for Gemm 'matrix')."""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if bias and bias not in inits:
        return "bias_not_constant", {}
    if node.op_type == "Conv":
        if w.ndim != 4:
            return "not_2d", {}
        if node_attr(node, "group", 1) != 1:
            return "grouped", {}
        kernel = list(node_attr(node, "kernel_shape", None) or w.shape[2:])
        strides = list(node_attr(node, "strides", None) or [1, 1])
        dilations = list(node_attr(node, "dilations", None) or [1, 1])
        auto = node_attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto == "NOTSET":
            pads = list(node_attr(node, "pads", None) or [0, 0, 0, 0])
        elif auto == "VALID":
            pads = [0, 0, 0, 0]
        else:
            dims = _dims(types.get(node.input[0]))
            if not dims or len(dims) != 4 or dims[2] is None or dims[3] is None:
                return "auto_pad_unknown_shape", {}
            pads = _same_pads(dims[2:], kernel, strides, dilations, upper=auto == "SAME_UPPER")
        return None, {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
                      "in_channels": int(w.shape[1]), "bias": bias}
    # Gemm: Y = A @ op(B) + C with A [N, in]; only the plain linear-layer form.
    if node_attr(node, "transA", 0) or node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0 or w.ndim != 2:
        return "gemm_form", {}
    matrix = w if node_attr(node, "transB", 0) else w.T
    if bias:
        b = inits[bias]
        if list(b.dims) not in ([matrix.shape[0]], [1, matrix.shape[0]]):
            return "gemm_form", {}
    return None, {"in_features": int(matrix.shape[1]), "bias": bias, "matrix": np.ascontiguousarray(matrix)}
