"""Rewrite pruned Conv / Gemm layers into CSR ops with a fused epilogue (bias, residual Add, ReLU).

    Conv(X, W, b) [-> Add(., R)] [-> Relu]   ==>   sparsecnn::FusedCsrConv(X, CSR(W), b, R)
    Gemm(X, W, b) [-> Add(., R)] [-> Relu]   ==>   sparsecnn::FusedCsrGemm(X, CSR(W), b, R)

CSR is passes/csr.py's format over the weight's GEMM view (values, col_idx, row_ptr,
row_order initializers); the op schemas are in runtimes/sparsert_ops.py and docs/ops.md.
Inputs and attributes follow issue 5's CsrConv / CsrGemm, plus an optional residual input.
A layer is converted when its weight is at least `min_sparsity` zero (dense stems and heads
stay standard ONNX ops). Where an Add joins two convertible convs (a ResNet block with a
downsample shortcut), the later one absorbs the Add, so the residual is computed first.

SEAM: this is the SparseRT-style runtime's own CSR rewrite. The CSR (Sputnik-design)
runtime of issue 5 writes its own rewrite on the same CSR format; the two are meant to
become ONE pass (fusion included), which both runtimes then consume.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .csr import csr_from_dense, gemm_view
from .graph import (SPARSECNN_DOMAIN, SPARSECNN_OPSET, PassResult, inferred_value_infos, initializer_map, node_attrs,
                    node_label)

FUSED_CONV = "FusedCsrConv"
FUSED_GEMM = "FusedCsrGemm"




def _dims(vi: onnx.ValueInfoProto | None) -> list[int | None] | None:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _conv_pads(attrs: dict, in_dims, kernel, strides, dilations) -> list[int] | None:
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "NOTSET":
        return list(attrs.get("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    if in_dims is None or any(d is None for d in in_dims[2:]):
        return None
    begins, ends = [], []
    for n, k, s, d in zip(in_dims[2:], kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def csr_initializers(prefix: str, matrix: np.ndarray) -> tuple[list[onnx.TensorProto], int]:
    """passes/csr.py's CSR of a [M, K] matrix as four initializers named <prefix>.csr.{values,...}."""
    import torch

    csr = csr_from_dense(torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)))
    tensors = [numpy_helper.from_array(csr.values.numpy().astype(np.float32), f"{prefix}.csr.values"),
               numpy_helper.from_array(csr.col_idx.numpy().astype(np.int32), f"{prefix}.csr.col_idx"),
               numpy_helper.from_array(csr.row_ptr.numpy().astype(np.int32), f"{prefix}.csr.row_ptr"),
               numpy_helper.from_array(csr.row_order.numpy().astype(np.int32), f"{prefix}.csr.row_order")]
    return tensors, csr.nnz


def rewrite_fused_csr(model: onnx.ModelProto, min_sparsity: float = 0.5, fuse: bool = True) -> PassResult:
    """Convert sparse Conv/Gemm layers (and the Add/Relu after them) into FusedCsr ops."""
    counters: Counter = Counter()
    graph = model.graph
    inits = initializer_map(model)
    shapes = inferred_value_infos(model)
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)

    def single_consumer(tensor: str) -> int | None:
        c = consumers.get(tensor, [])
        return c[0] if len(c) == 1 and tensor not in graph_outputs else None

    # 1. which nodes are convertible, with their weight as a [M, K] matrix
    plan: dict[int, dict] = {}
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm"):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            counters["skipped_weight_not_constant"] += 1
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        attrs = node_attrs(node)
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if bias_name and bias_name not in inits:
            counters["skipped_bias_not_constant"] += 1
            continue
        entry = {"attrs": attrs, "bias": bias_name}
        if node.op_type == "Conv":
            if w.ndim != 4:
                counters["skipped_not_2d_conv"] += 1
                continue
            if attrs.get("group", 1) != 1:
                counters["skipped_grouped_conv"] += 1
                continue
            kernel = list(w.shape[2:])
            strides = list(attrs.get("strides", [1, 1]))
            dilations = list(attrs.get("dilations", [1, 1]))
            pads = _conv_pads(attrs, _dims(shapes.get(node.input[0])), kernel, strides, dilations)
            if pads is None:
                counters["skipped_same_padding_unknown_shape"] += 1
                continue
            entry.update(matrix=gemm_view(w).numpy(), op=FUSED_CONV,
                         node_attrs=dict(kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
                                         in_channels=int(w.shape[1])))
        else:
            if w.ndim != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                counters["skipped_gemm_form"] += 1
                continue
            mat = w if attrs.get("transB", 0) else w.T
            if bias_name and numpy_helper.to_array(inits[bias_name]).size != mat.shape[0]:
                counters["skipped_gemm_bias_broadcast"] += 1
                continue
            entry.update(matrix=np.ascontiguousarray(mat), op=FUSED_GEMM, node_attrs=dict(in_features=int(mat.shape[1])))
        sparsity = 1.0 - np.count_nonzero(entry["matrix"]) / max(1, entry["matrix"].size)
        if sparsity < min_sparsity:
            counters["skipped_dense"] += 1
            continue
        entry["sparsity"] = sparsity
        plan[i] = entry

    # 2. fusion: Add joins go to the later convertible producer; Relu follows the Add or the layer
    absorbed: dict[int, int] = {}  # absorbed node index -> layer index
    producer = {node.output[0]: i for i, node in enumerate(graph.node) if node.output}
    if fuse:
        for i in sorted(plan):
            out = graph.node[i].output[0]
            nxt = single_consumer(out)
            if nxt is None:
                continue
            nnode = graph.node[nxt]
            if nnode.op_type == "Add" and nnode.domain in ("", "ai.onnx") and nxt not in absorbed:
                others = [t for t in nnode.input if t != out]
                if len(others) != 1 or len(nnode.input) != 2:
                    continue
                other = others[0]
                # the later of two convertible producers absorbs the Add
                rival = producer.get(other)
                if rival in plan and single_consumer(other) == nxt and rival > i:
                    continue
                if _dims(shapes.get(other)) != _dims(shapes.get(out)) or _dims(shapes.get(out)) is None:
                    counters["skipped_add_broadcast"] += 1
                    continue
                plan[i]["residual"] = other
                absorbed[nxt] = i
                counters["fused_residual"] += 1
                out = nnode.output[0]
                nxt = single_consumer(out)
                if nxt is None:
                    continue
                nnode = graph.node[nxt]
            if nnode.op_type == "Relu" and nnode.domain in ("", "ai.onnx"):
                plan[i]["relu"] = True
                absorbed[nxt] = i
                counters["fused_relu"] += 1

    # 3. emit: each fused node sits where its last absorbed node was
    last_of: dict[int, int] = {}
    for a, layer in absorbed.items():
        last_of[layer] = max(last_of.get(layer, layer), a)
    emit_at = {last_of.get(i, i): i for i in plan}
    out_model = onnx.ModelProto()
    out_model.CopyFrom(model)
    g = out_model.graph
    del g.node[:]
    new_inits, dropped = [], set()
    value_infos = []
    for idx, node in enumerate(graph.node):
        if idx in plan or idx in absorbed:
            if idx not in emit_at:
                continue
            layer = emit_at[idx]
            entry = plan[layer]
            src = graph.node[layer]
            tensors, nnz = csr_initializers(src.input[1], entry["matrix"])
            new_inits += tensors
            dropped.add(src.input[1])
            inputs = [src.input[0]] + [t.name for t in tensors] + [entry["bias"]]
            if entry.get("residual"):
                inputs.append(entry["residual"])
            while inputs and not inputs[-1]:
                inputs.pop()
            final_out = graph.node[idx].output[0]
            fused = helper.make_node(entry["op"], inputs, [final_out], name=src.name or node_label(src),
                                     domain=SPARSECNN_DOMAIN, relu=int(bool(entry.get("relu"))),
                                     **entry["node_attrs"])
            g.node.append(fused)
            if final_out in shapes and final_out not in graph_outputs:
                value_infos.append(shapes[final_out])
            counters["converted_conv" if entry["op"] == FUSED_CONV else "converted_gemm"] += 1
            counters["nnz"] += nnz
            continue
        g.node.append(node)
    still_used = {n for node in g.node for n in node.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    known_vi = {vi.name for vi in g.value_info}
    g.value_info.extend(vi for vi in value_infos if vi.name not in known_vi)
    if plan and not any(o.domain == SPARSECNN_DOMAIN for o in out_model.opset_import):
        out_model.opset_import.add(domain=SPARSECNN_DOMAIN, version=SPARSECNN_OPSET)
    return PassResult(out_model, counters, f"rewrite_fused_csr({min_sparsity:g})")
