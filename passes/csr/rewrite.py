"""Rewrite pruned Conv / Gemm nodes into `sparsecnn::CsrConv` / `sparsecnn::CsrGemm`.

The weight leaves the model as a dense tensor and comes back as four initializers holding
its CSR over the GEMM view (passes/csr/layout.py): `<weight>.csr.values`, `.col_idx`, `.row_ptr`,
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

from .layout import csr_from_dense, gemm_view
from ...common.shapes import explicit_pads
from ..masks import is_excluded
from ..graph import (SPARSECNN_DOMAIN, STANDARD_DOMAINS, PassResult, copy_model, export_graph, import_graph,
                    inferred_value_infos, prune_exclusions, set_tensor_info)

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


def csr_arrays(matrix: np.ndarray, index_dtype: str = "auto") -> dict[str, np.ndarray]:
    """The four CSR arrays of a GEMM-view matrix [M, K], by suffix (CSR_SUFFIXES).

    Column indices are stored as uint16 when K <= 65536 (`index_dtype="auto"`), halving
    their bytes; row_ptr and row_order are int32. Values are fp32.
    """
    csr = csr_from_dense(matrix)
    k = csr.shape[1]
    if index_dtype == "auto":
        index_dtype = "uint16" if k <= 65536 else "int32"
    cols = csr.col_idx.numpy().astype(np.uint16 if index_dtype == "uint16" else np.int32)
    return {"values": csr.values.numpy().astype(np.float32), "col_idx": cols,
            "row_ptr": csr.row_ptr.numpy().astype(np.int32), "row_order": csr.row_order.numpy().astype(np.int32)}


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
    import onnx_graphsurgeon as gs

    counters: Counter = Counter()
    types = inferred_value_infos(model)
    patterns = prune_exclusions(model) + list(exclude or [])
    graph = import_graph(model)
    nodes = list(graph.nodes)  # the model's own (topological) order: "later" below means later here
    index = {id(node): i for i, node in enumerate(nodes)}
    graph_outputs = {id(t) for t in graph.outputs}

    def single_consumer(tensor) -> int | None:
        # a node reading the tensor twice is listed twice: not a single consumer
        c = tensor.outputs
        return index[id(c[0])] if len(c) == 1 and id(tensor) not in graph_outputs else None

    def standard(i: int, op_type: str) -> bool:
        return nodes[i].op == op_type and nodes[i].domain in STANDARD_DOMAINS

    # 1. the layers that become CSR ops: {node index: (weight, matrix, op attributes + bias)}
    plan: dict[int, dict] = {}
    for i, node in enumerate(nodes):
        if node.domain not in STANDARD_DOMAINS or node.op not in ("Conv", "Gemm"):
            continue
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        weight = node.inputs[1]
        w = np.array(weight.values)
        reason, spec = _convertible(node, w, types)
        if reason is None and is_excluded(weight.name, patterns):
            reason = "excluded"
        if reason is None and len(weight.outputs) > 1:
            reason = "weight_shared"
        matrix = None
        if reason is None:
            matrix = gemm_view(w).numpy() if node.op == "Conv" else spec.pop("matrix")
            density = np.count_nonzero(matrix) / max(1, matrix.size)
            if density > max_density:
                reason = "too_dense"
        if reason is not None:
            counters[f"dense_{reason}"] += 1
            continue
        plan[i] = {"weight": weight.name, "matrix": matrix, "spec": spec, "relu": 0, "residual": None,
                   "output": node.outputs[0]}

    # 2. fusion: an Add goes to the later of two convertible producers; a Relu follows the Add or the layer
    absorbed: dict[int, int] = {}  # absorbed node index -> layer index
    for i in sorted(plan):
        entry = plan[i]
        nxt = single_consumer(entry["output"])
        if nxt is None:
            continue
        if fuse_residual and standard(nxt, "Add") and nxt not in absorbed and len(nodes[nxt].inputs) == 2:
            add = nodes[nxt]
            other = add.inputs[1] if add.inputs[0] is entry["output"] else add.inputs[0]
            if other is entry["output"]:
                continue  # Add(y, y)
            rival = index[id(other.inputs[0])] if other.inputs else None
            if rival in plan and rival > i and single_consumer(other) == nxt:
                continue  # the rival, computed later, absorbs this Add with our output as its residual
            shape = _shape_key(types.get(entry["output"].name))
            if shape is None or None in shape or _shape_key(types.get(other.name)) != shape or \
                    _shape_key(types.get(add.outputs[0].name)) != shape:
                counters["residual_not_fused_broadcast"] += 1
                continue
            entry["residual"], entry["output"] = other, add.outputs[0]
            absorbed[nxt] = i
            counters["residual_fused"] += 1
            nxt = single_consumer(entry["output"])
            if nxt is None:
                continue
        if fuse_relu and standard(nxt, "Relu"):
            entry["relu"], entry["output"] = 1, nodes[nxt].outputs[0]
            absorbed[nxt] = i
            counters["relu_fused"] += 1

    if not plan:
        return PassResult(copy_model(model), counters, "csr_rewrite")

    # 3. emit: each CSR op where the last node it absorbed was; the nodes it replaces lose their
    # outputs, and they and the dense weights go at export
    emit_at = {max([i] + [a for a, layer in absorbed.items() if layer == i]): i for i in plan}
    ordered = []
    for idx, node in enumerate(nodes):
        ordered.append(node)
        if idx not in emit_at:
            continue
        i = emit_at[idx]
        src, entry = nodes[i], plan[i]
        spec = dict(entry["spec"])
        arrays = csr_arrays(entry["matrix"], index_dtype)
        inputs = [src.inputs[0]] + [gs.Constant(f"{entry['weight']}.csr.{s}", arrays[s]) for s in CSR_SUFFIXES]
        inputs += [spec.pop("bias") or gs.Variable.empty(), entry["residual"] or gs.Variable.empty()]
        while inputs[-1].is_empty():
            inputs.pop()
        output, src_output = entry["output"], src.outputs[0].name
        for n in [src] + [nodes[a] for a, layer in absorbed.items() if layer == i]:
            n.outputs.clear()
        vi = types.get(output.name) or types.get(src_output)
        if vi is not None and id(output) not in graph_outputs:
            set_tensor_info(output, vi)
        op_type = "CsrConv" if src.op == "Conv" else "CsrGemm"
        ordered.append(gs.Node(op_type, name=src.name or f"{entry['weight']}.csr", domain=SPARSECNN_DOMAIN,
                               attrs=dict(sorted({"relu": entry["relu"], **spec}.items())),
                               inputs=inputs, outputs=[output]))
        counters["conv_csr" if src.op == "Conv" else "gemm_csr"] += 1
    graph.nodes = ordered
    return PassResult(export_graph(graph, model), counters, "csr_rewrite")


def _convertible(node, w: np.ndarray, types: dict) -> tuple[str | None, dict]:
    """(reason a graphsurgeon Conv/Gemm node stays dense or None, the op's attributes plus 'bias'
    (its constant or None) and for Gemm 'matrix')."""
    import onnx_graphsurgeon as gs

    attrs = node.attrs
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if bias is not None and not isinstance(bias, gs.Constant):
        return "bias_not_constant", {}
    if node.op == "Conv":
        if w.ndim != 4:
            return "not_2d", {}
        if attrs.get("group", 1) != 1:
            return "grouped", {}
        kernel = list(attrs.get("kernel_shape") or w.shape[2:])
        strides = list(attrs.get("strides") or [1, 1])
        dilations = list(attrs.get("dilations") or [1, 1])
        dims = _dims(types.get(node.inputs[0].name))
        pads = explicit_pads(attrs.get("auto_pad"), attrs.get("pads"), dims[2:] if dims and len(dims) == 4 else None,
                             kernel, strides, dilations)
        if pads is None:
            return "auto_pad_unknown_shape", {}
        return None, {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations,
                      "in_channels": int(w.shape[1]), "bias": bias}
    # Gemm: Y = A @ op(B) + C with A [N, in]; only the plain linear-layer form.
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or w.ndim != 2:
        return "gemm_form", {}
    matrix = w if attrs.get("transB", 0) else w.T
    if bias is not None and list(bias.shape) not in ([matrix.shape[0]], [1, matrix.shape[0]]):
        return "gemm_form", {}
    return None, {"in_features": int(matrix.shape[1]), "bias": bias, "matrix": np.ascontiguousarray(matrix)}


CSR_CONV_POOL = "CsrConvPool"


def fuse_csr_pool(model: onnx.ModelProto) -> PassResult:
    """CsrConv (relu, no residual) -> MaxPool => `sparsecnn::CsrConvPool`: the group a conv-pool
    kernel (PECR) covers whole, so a runtime that plans over groups can weigh it against CSR +
    pool and dense + pool. Counters: `conv_pool_fused`, `pool_not_fused_<reason>`."""
    from ..ecr.rewrite import pool_unfusable_reason

    shapes = inferred_value_infos(model)
    graph = import_graph(model)
    counters: Counter = Counter()
    graph_outputs = {id(t) for t in graph.outputs}
    for conv in [n for n in graph.nodes if n.op == "CsrConv" and n.domain == SPARSECNN_DOMAIN]:
        if not conv.attrs.get("relu", 0) or len(conv.inputs) > 6:
            continue  # PECR's max is over ReLU outputs; a residual would sit between conv and pool
        y = conv.outputs[0]
        if id(y) in graph_outputs or len(y.outputs) != 1 or y.outputs[0].op != "MaxPool" or \
                y.outputs[0].domain not in STANDARD_DOMAINS:
            continue
        pool = y.outputs[0]
        reason = pool_unfusable_reason(pool)
        kernel = [int(k) for k in pool.attrs.get("kernel_shape", [])]
        stride = [int(s) for s in pool.attrs.get("strides", [1] * len(kernel))]
        dims = _dims(shapes.get(y.name))
        pads = None if reason else explicit_pads(pool.attrs.get("auto_pad"), pool.attrs.get("pads"),
                                                 dims[2:] if dims and len(dims) == 4 else None, kernel, stride)
        if reason is None and pads is None:
            reason = "auto_pad_unknown_shape"
        if reason is not None:
            counters[f"pool_not_fused_{reason}"] += 1
            continue
        out = pool.outputs[0]
        if shapes.get(out.name) is not None and id(out) not in graph_outputs:
            set_tensor_info(out, shapes[out.name])  # shape inference stops at a custom op: keep what it knew
        attrs = dict(conv.attrs, pool_kernel_shape=kernel, pool_strides=stride, pool_pads=pads,
                     pool_ceil_mode=int(pool.attrs.get("ceil_mode", 0)))
        inputs = list(conv.inputs)
        conv.outputs.clear()
        pool.outputs.clear()
        graph.nodes.append(gs_node(CSR_CONV_POOL, conv.name, attrs, inputs, [out]))
        counters["conv_pool_fused"] += 1
    graph.toposort()
    return PassResult(export_graph(graph, model), counters, "fuse_csr_pool")


def gs_node(op_type: str, name: str, attrs: dict, inputs: list, outputs: list):
    import onnx_graphsurgeon as gs

    return gs.Node(op_type, name=name, domain=SPARSECNN_DOMAIN, attrs=dict(sorted(attrs.items())), inputs=inputs,
                   outputs=outputs)
