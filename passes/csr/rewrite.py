"""Rewrite pruned Conv / Gemm nodes into `sparsecnn::CsrConv` / `sparsecnn::CsrGemm`.

The weight leaves the model as a dense tensor and comes back as four initializers holding
its CSR over the GEMM view (passes/csr.py): `<weight>.csr.values`, `.col_idx`, `.row_ptr`,
`.row_order`. Geometry (kernel, strides, pads, dilations, input channels) and a fused-ReLU
flag are attributes; a residual `Add` after the layer becomes an optional trailing input
(`Conv -> Add(., R) -> Relu` is one op: y = relu(conv(x) + bias + R)). The op's output keeps
its value_info so shape inference goes on through the custom op. Schemas:
passes/csr/reference.py and docs/ops.md. One pass for every CSR runtime (`csr`, `sparsert`).

A layer stays a standard ONNX node, counted by reason, when it is excluded (stems and
heads, or `exclude`), denser than `max_density` (CSR would not pay), grouped, not 2-D, or
of a form the op does not express.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layout import csr_from_dense, gemm_view
from ...common.shapes import same_pads
from ..prune import _is_excluded
from ..graph import (SPARSECNN_DOMAIN, SPARSECNN_OPSET, PassResult, inferred_value_infos, initializer_map, node_attr,
                    prune_exclusions)

CSR_SUFFIXES = ("values", "col_idx", "row_ptr", "row_order")
DEFAULT_MAX_DENSITY = 0.3  # at 70 % zeros and more a layer goes CSR (the low end of unstructured pruning)


def _dims(vi: onnx.ValueInfoProto | None) -> list[int | None] | None:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _shape_key(vi: onnx.ValueInfoProto | None) -> list[int | str | None] | None:
    """Dims as values or symbolic names (the same name: the same size), None where unknown."""
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


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
                fuse_relu: bool = True, index_dtype: str = "auto", fuse_residual: bool = True) -> PassResult:
    """Conv (group 1, 2-D) and Gemm with constant pruned weights -> CSR custom ops, with the
    `Add(., R)` (fuse_residual) and `Relu` (fuse_relu) after them fused into the op's epilogue.

    Fusion: a layer's output must have exactly one consumer and not be a graph output (the
    same for the Add's output before a Relu); the Add must have two inputs of the same known
    shape (no broadcast). Where an Add joins two convertible layers (a ResNet block with a
    downsample shortcut), the later one in topological order absorbs it, so the residual is
    computed first. The fused op sits where the last node it absorbed was.

    Counters: `conv_csr`, `gemm_csr`, `relu_fused`, `residual_fused`, `residual_not_fused_broadcast`,
    and `dense_<reason>` for each layer left as it was (excluded, too_dense, grouped, not_2d,
    auto_pad_unknown_shape, gemm_form, weight_shared, bias_not_constant).
    """
    counters: Counter = Counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)
    inits = initializer_map(out)
    types = inferred_value_infos(model)
    patterns = prune_exclusions(model) + list(exclude or [])
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in graph.output}
    producer = {o: i for i, node in enumerate(nodes) for o in node.output}

    def single_consumer(tensor: str) -> int | None:
        c = consumers.get(tensor, [])
        return c[0] if len(c) == 1 and tensor not in graph_outputs else None

    def standard(i: int, op_type: str) -> bool:
        return nodes[i].op_type == op_type and nodes[i].domain in ("", "ai.onnx")

    # 1. the layers that become CSR ops: {node index: (weight name, matrix, op attributes + bias)}
    plan: dict[int, dict] = {}
    for i, node in enumerate(nodes):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm"):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight_name = node.input[1]
        w = np.array(numpy_helper.to_array(inits[weight_name]))
        reason, spec = _convertible(node, w, inits, types)
        if reason is None and _is_excluded(weight_name, patterns):
            reason = "excluded"
        if reason is None and len(consumers.get(weight_name, [])) > 1:
            reason = "weight_shared"
        matrix = None
        if reason is None:
            matrix = gemm_view(w).numpy() if node.op_type == "Conv" else spec.pop("matrix")
            density = np.count_nonzero(matrix) / max(1, matrix.size)
            if density > max_density:
                reason = "too_dense"
        if reason is not None:
            counters[f"dense_{reason}"] += 1
            continue
        plan[i] = {"weight": weight_name, "matrix": matrix, "spec": spec, "relu": 0, "residual": "",
                   "output": node.output[0]}

    # 2. fusion: an Add goes to the later of two convertible producers; a Relu follows the Add or the layer
    absorbed: dict[int, int] = {}  # absorbed node index -> layer index
    for i in sorted(plan):
        entry = plan[i]
        nxt = single_consumer(entry["output"])
        if nxt is None:
            continue
        if fuse_residual and standard(nxt, "Add") and nxt not in absorbed and len(nodes[nxt].input) == 2:
            add = nodes[nxt]
            other = add.input[1] if add.input[0] == entry["output"] else add.input[0]
            rival = producer.get(other)
            if other == entry["output"]:
                continue  # Add(y, y)
            if rival in plan and rival > i and single_consumer(other) == nxt:
                continue  # the rival, computed later, absorbs this Add with our output as its residual
            shape = _shape_key(types.get(entry["output"]))
            if shape is None or None in shape or _shape_key(types.get(other)) != shape or \
                    _shape_key(types.get(add.output[0])) != shape:
                counters["residual_not_fused_broadcast"] += 1
                continue
            entry["residual"], entry["output"] = other, add.output[0]
            absorbed[nxt] = i
            counters["residual_fused"] += 1
            nxt = single_consumer(entry["output"])
            if nxt is None:
                continue
        if fuse_relu and standard(nxt, "Relu"):
            entry["relu"], entry["output"] = 1, nodes[nxt].output[0]
            absorbed[nxt] = i
            counters["relu_fused"] += 1

    if not plan:
        return PassResult(out, counters, "csr_rewrite")

    # 3. emit: each CSR op where the last node it absorbed was
    emit_at = {max([i] + [a for a, layer in absorbed.items() if layer == i]): i for i in plan}
    new_nodes: list[onnx.NodeProto] = []
    remove_inits: set[str] = set()
    add_inits: list[onnx.TensorProto] = []
    value_infos: dict[str, onnx.ValueInfoProto] = {}
    for idx, node in enumerate(nodes):
        if idx not in plan and idx not in absorbed:
            new_nodes.append(node)
            continue
        if idx not in emit_at:
            continue
        i = emit_at[idx]
        src, entry = nodes[i], plan[i]
        spec = dict(entry["spec"])
        tensors, _ = csr_initializers(entry["weight"], entry["matrix"], index_dtype)
        add_inits += tensors
        remove_inits.add(entry["weight"])
        inputs = [src.input[0]] + [t.name for t in tensors] + [spec.pop("bias")]
        if entry["residual"]:
            inputs.append(entry["residual"])
        while not inputs[-1]:
            inputs.pop()
        output = entry["output"]
        op_type = "CsrConv" if src.op_type == "Conv" else "CsrGemm"
        new_nodes.append(helper.make_node(op_type, inputs, [output], name=src.name or f"{entry['weight']}.csr",
                                          domain=SPARSECNN_DOMAIN, relu=entry["relu"], **spec))
        counters["conv_csr" if src.op_type == "Conv" else "gemm_csr"] += 1
        vi = types.get(output) or types.get(src.output[0])
        if vi is not None and output not in graph_outputs:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vi)
            copy.name = output
            value_infos[output] = copy

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
            pads = same_pads(dims[2:], kernel, strides, dilations, upper=auto == "SAME_UPPER")
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
