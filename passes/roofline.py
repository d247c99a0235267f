"""Roofline ESTIMATES from published peaks: per layer and whole network for Jetson boards (`estimate`),
and per layer for the per-layer report on any card (`format_cost`, `roofline_time`); the boards' and
cards' peaks are common/peaks.py's.

Not a measurement: each layer takes max(FLOPs / peak FLOP/s, bytes / DRAM bandwidth),
layers are added up with no overlap, activations go to DRAM and back once per layer, and
ReLU / Sigmoid are taken as fused into the layer before them (TensorRT fuses them). For a
2:4 layer on a board with sparse tensor cores (Orin) the sparse peak applies and the weight bytes
are the kept half plus 2 bits of position per kept value; on a board without them
(Nano, TX2, Xavier) TensorRT runs 2:4 weights dense and nothing changes. What a roofline
cannot predict is listed in `CANNOT_PREDICT`.

The one cost model (`layer_costs`: each weight layer as a GEMM, M x K x N, its non-zeros and its
activations; `format_cost`: FLOPs and bytes of that layer stored dense, as CSR or as 2:4) serves
the Jetson estimate and the per-layer report's roofline line (converter/layer_report.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..common.peaks import Board
from ..common.shapes import conv_out_size
from .graph import node_attrs, node_label, skeleton
from .masks import is_2to4


CANNOT_PREDICT = (
    "the power mode and clocks in use (nvpmodel, jetson_clocks), DVFS and thermal throttling: peaks assume the "
    "mode named in each board's source",
    "DRAM shared with the CPU (and its traffic), and whether the model and its workspace fit the board's memory",
    "which tactics TensorRT or cuDNN pick, what they fuse, and how far below peak each layer runs (small layers "
    "and batch 1 are far from both roofs; launch overhead is not counted)",
    "unstructured sparsity (csr, sparsert, ecr): their speed depends on the kernel's efficiency at that sparsity, "
    "which only a measurement on the board shows; the estimate covers dense and 2:4",
    "whether NVIDIA's PyTorch wheel for the board has cuSPARSELt (the cusparselt runtime)",
)
ELEMENTWISE_FUSED = {"Relu", "Sigmoid", "Clip", "LeakyRelu", "Identity", "Dropout", "Flatten", "Reshape"}
BYTES_PER_VALUE = 2  # fp16


def _shapes_at_batch(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    light = skeleton(model)
    inits = {t.name for t in model.graph.initializer}
    # a symbolic first axis is the batch: on the inputs, and on the value_info a rewrite kept for its custom
    # ops' outputs (shape inference stops at a custom op and goes on from what it says)
    for vi in [vi for vi in light.graph.input if vi.name not in inits] + list(light.graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(light)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            out[vi.name] = dims
    for t in model.graph.initializer:
        out[t.name] = list(t.dims)
    return out


CSR_OPS = ("CsrConv", "CsrGemm", "CsrConvPool")
TWO_FOUR_OPS = ("Conv2to4", "Gemm2to4")
ECR_OPS = ("EcrConv", "EcrConvPool")


def _conv_pixels(attrs: dict, in_shape: list[int]) -> int:
    """Output pixels x batch of a conv fused with the pool after it (the op's own output is pooled)."""
    (kh, kw), (sh, sw) = attrs["kernel_shape"], attrs.get("strides", [1, 1])
    pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
    dh, dw = attrs.get("dilations", [1, 1])
    b, _, h, w = in_shape
    return b * conv_out_size(h, pt + pb, kh, sh, dh) * conv_out_size(w, pl + pr, kw, sw, dw)


def _gemm_view(node: onnx.NodeProto, inits: dict, ins: list, outs: list) -> dict | None:
    """A weight layer as a GEMM C[M, N] = W[M, K] @ B[K, N] (N: output pixels x batch): M, K, N, the
    weight's non-zeros and the format it is stored in; None for a node without a constant weight."""
    attrs = node_attrs(node)
    dims = lambda i: list(inits[node.input[i]].dims) if len(node.input) > i and node.input[i] in inits else None  # noqa: E731
    out_elems = int(np.prod(outs[0]))
    if node.op_type in CSR_OPS:
        values, row_ptr = dims(1), dims(3)
        if values is None or row_ptr is None:
            return None
        m, nnz = row_ptr[0] - 1, values[0]
        if node.op_type == "CsrGemm":
            k = int(attrs["in_features"])
        else:
            k = int(attrs["in_channels"]) * int(np.prod(attrs["kernel_shape"]))
        n = _conv_pixels(attrs, ins[0]) if node.op_type == "CsrConvPool" else out_elems // m
        return {"m": m, "k": k, "n": n, "nnz": nnz, "weights": m * k, "format": "csr", "two_four": False}
    if node.op_type in TWO_FOUR_OPS:
        values = dims(1)
        if values is None:
            return None
        m, k = values[0], 2 * values[1]
        return {"m": m, "k": k, "n": out_elems // m, "nnz": m * k // 2, "weights": m * k, "format": "2:4",
                "two_four": True}
    standard = node.op_type in ("Conv", "Gemm", "MatMul") and node.domain in ("", "ai.onnx")
    if not (standard or node.op_type in ECR_OPS) or dims(1) is None:
        return None
    w = numpy_helper.to_array(inits[node.input[1]])
    if node.op_type == "Conv" or node.op_type in ECR_OPS:
        m, k, axis = w.shape[0], int(np.prod(w.shape[1:])), 1
        n = _conv_pixels(attrs, ins[0]) if node.op_type == "EcrConvPool" else out_elems // m
    else:
        trans_b = attrs.get("transB", 0) if node.op_type == "Gemm" else 0
        k, m = (w.shape[1], w.shape[0]) if trans_b else (w.shape[0], w.shape[1])
        axis = 1 if trans_b else 0
        n = out_elems // m
    two_four = node.op_type in ("Conv", "Gemm", "MatMul") and w.shape[axis] % 4 == 0 and \
        is_2to4(torch.from_numpy(np.array(w)), axis)
    return {"m": int(m), "k": int(k), "n": int(n), "nnz": int(np.count_nonzero(w)), "weights": int(w.size),
            "format": "ecr" if node.op_type in ECR_OPS else "dense", "two_four": bool(two_four)}


def format_cost(m: int, k: int, n: int, fmt: str, bytes_per_value: int, act_elems: int,
                nnz: int | None = None, index_bytes: int = 2) -> dict:
    """FLOPs and DRAM bytes of one weight layer C[M, N] = W[M, K] @ B[K, N] with its weight stored as `fmt`,
    reading and writing `act_elems` activation values (input, output, a fused residual):

    - dense: 2·M·K·N FLOPs; the whole weight;
    - csr: 2·nnz·N useful FLOPs; values + column indices (`index_bytes`: uint16, docs/csr.md) + row
      pointers (int32, M + 1);
    - 2:4: half the dense FLOPs; the kept half of the values + 2 bits of position per kept value;
    - tiled-csl (Flash-LLM's "load sparse, compute dense", runtimes/csr/tensor_core.py): the dense FLOPs
      (tensor cores multiply the zeros back in) and one 32-bit word per non-zero (value + position).
    """
    act = bytes_per_value * act_elems
    if fmt == "csr":
        nnz = m * k if nnz is None else nnz
        return {"flops": 2 * nnz * n, "bytes": nnz * (bytes_per_value + index_bytes) + 4 * (m + 1) + act}
    if fmt == "tiled-csl":
        nnz = m * k if nnz is None else nnz
        return {"flops": 2 * m * k * n, "bytes": 4 * nnz + act}
    if fmt == "2:4":
        kept = m * k // 2
        return {"flops": 2 * kept * n, "bytes": bytes_per_value * kept + kept // 4 + act}
    if fmt == "dense":
        return {"flops": 2 * m * k * n, "bytes": bytes_per_value * m * k + act}
    raise ValueError(f"no weight-sparse cost model for format {fmt!r}")


def roofline_time(flops: int, nbytes: int, board: Board, precision: str) -> dict:
    """max(FLOPs / peak, bytes / bandwidth) on `board` at `precision` ('fp32', 'tf32', 'fp16'):
    {'s', 'bound'}, or {'s': None, 'reason'} when the board has no peak for that precision."""
    peak = board.peak_tflops(precision)
    if not peak:
        return {"s": None, "reason": f"no {precision.upper()} peak known for {board.name}"}
    compute, memory = flops / (peak * 1e12), nbytes / (board.dram_gbs * 1e9)
    return {"s": max(compute, memory), "bound": "compute" if compute >= memory else "memory"}


def layer_costs(model: onnx.ModelProto, batch: int = 1) -> list[dict]:
    """Per node: FLOPs and fp16 bytes (dense, and 2:4 where the weight is 2:4); for a weight layer also
    its GEMM view (m, k, n, nnz, the format its weight is stored in: dense, csr, 2:4, ecr) and
    `act_elems`, the activation values it reads and writes. Shapes from ONNX shape inference; a custom
    op's from the value_info its rewrite kept."""
    shapes = _shapes_at_batch(model, batch)
    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type in ELEMENTWISE_FUSED or node.op_type in ("Constant", "Shape", "Gather", "Unsqueeze", "Concat"):
            continue
        outs = [shapes.get(o) for o in node.output]
        ins = [shapes.get(i) for i in node.input if i and i not in inits]
        if any(s is None for s in outs + ins) or not outs:
            continue
        act_elems = sum(int(np.prod(s)) for s in ins) + sum(int(np.prod(s)) for s in outs)
        act_bytes = BYTES_PER_VALUE * act_elems
        row = {"name": node_label(node), "op": node.op_type, "flops": 0, "weights": 0, "two_four": False,
               "dense_bytes": act_bytes, "sparse_bytes": act_bytes}
        gemm = _gemm_view(node, inits, ins, outs)
        if gemm is not None:
            dense = format_cost(gemm["m"], gemm["k"], gemm["n"], "dense", BYTES_PER_VALUE, act_elems)
            sparse = format_cost(gemm["m"], gemm["k"], gemm["n"], "2:4", BYTES_PER_VALUE, act_elems) \
                if gemm["two_four"] else dense
            row.update(gemm, flops=dense["flops"], dense_bytes=dense["bytes"], sparse_bytes=sparse["bytes"],
                       act_elems=act_elems)
        elif node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Mul"):
            row["flops"] = int(np.prod(outs[0])) * (1 if node.op_type in ("Add", "Mul") else
                                                    int(np.prod(next((a.ints for a in node.attribute
                                                                      if a.name == "kernel_shape"), [1]))))
        rows.append(row)
    return rows


CONV_OPS = ("Conv", "CsrConv", "CsrConvPool", "Conv2to4", "EcrConv", "EcrConvPool")


def conv_gemm_shapes(model: onnx.ModelProto, batch: int = 1) -> list[tuple[int, int, int]]:
    """(M, K, N) of every conv of `model` as a GEMM at `batch` (M = Cout, K = Cin/groups x kh x kw,
    N = output pixels x batch), in network order, each shape once: the GEMM sweep's model shapes."""
    return list(dict.fromkeys((c["m"], c["k"], c["n"]) for c in layer_costs(model, batch)
                              if c["op"] in CONV_OPS and "m" in c))


def estimate(model: onnx.ModelProto, board: Board, batch: int = 1) -> dict:
    """Per-layer and whole-network roofline times (ms) on `board`, dense and with 2:4 where it applies."""
    peak_d = board.fp16_dense_tflops * 1e12
    bw = board.dram_gbs * 1e9
    rows = []
    for c in layer_costs(model, batch):
        dense = max(c["flops"] / peak_d, c["dense_bytes"] / bw)
        if c["two_four"] and board.fp16_sparse_tflops:
            sparse = max(c["flops"] / (board.fp16_sparse_tflops * 1e12), c["sparse_bytes"] / bw)
        else:
            sparse = dense
        bound = "compute" if c["flops"] / peak_d >= c["dense_bytes"] / bw else "memory"
        rows.append({**c, "dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3, "bound": bound})
    total_d = sum(r["dense_ms"] for r in rows)
    total_s = sum(r["sparse_ms"] for r in rows)
    return {"board": asdict(board), "batch": batch, "label": "ESTIMATE from published peaks (not measured)",
            "layers": rows, "dense_ms": total_d, "sparse_ms": total_s,
            "speedup": total_d / total_s if total_s else 1.0}


def format_estimate(est: dict, per_layer: bool = True) -> str:
    b = est["board"]
    head = (f"ROOFLINE ESTIMATE, not a measurement: {b['name']} ({b['sm']}), fp16, batch {est['batch']}; peaks "
            f"{b['fp16_dense_tflops']:g} TFLOP/s dense" + (f", {b['fp16_sparse_tflops']:g} 2:4-sparse" if b['fp16_sparse_tflops']
                                                          else ", no sparse tensor cores") + f", {b['dram_gbs']:g} GB/s"
            f"\n  source: {b['source']}")
    lines = [head]
    if per_layer:
        lines.append(f"  {'layer':<42}{'op':<18}{'GFLOP':>8}{'MB dense':>10}{'bound':>9}{'dense ms':>10}{'2:4 ms':>9}")
        for r in est["layers"]:
            lines.append(f"  {r['name'][-42:]:<42}{r['op']:<18}{r['flops'] / 1e9:>8.3f}{r['dense_bytes'] / 1e6:>10.2f}"
                         f"{r['bound']:>9}{r['dense_ms']:>10.3f}{r['sparse_ms']:>9.3f}")
    lines.append(f"  whole network: {est['dense_ms']:.2f} ms dense, {est['sparse_ms']:.2f} ms with 2:4 "
                 f"({est['speedup']:.2f}x) -- estimate")
    return "\n".join(lines)
