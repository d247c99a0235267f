"""A roofline ESTIMATE per layer and whole network for Jetson boards, from published peaks.

Not a measurement: each layer takes max(FLOPs / peak FLOP/s, bytes / DRAM bandwidth) at fp16,
layers are added up with no overlap, activations go to DRAM and back once per layer, and
ReLU / Sigmoid are taken as fused into the layer before them (TensorRT fuses them). For a
2:4 layer on a board with sparse tensor cores (Orin) the sparse peak applies and the weight bytes
are the kept half plus 2 bits of position per kept value; on a board without them
(Nano, TX2, Xavier) TensorRT runs 2:4 weights dense and nothing changes. What a roofline
cannot predict is listed in `CANNOT_PREDICT`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .graph import node_label, skeleton
from .masks import is_2to4


@dataclass(frozen=True)
class Board:
    name: str
    sm: str
    fp16_dense_tflops: float
    fp16_sparse_tflops: float | None  # None: no 2:4 sparse tensor cores
    dram_gbs: float
    source: str
    tensor_cores: bool = False  # fp16 mma (Volta sm_70 and newer)
    jetpack: str = ""  # the newest JetPack for the board, and what it brings
    python: str = ""  # that JetPack's Python


# Peaks as NVIDIA publishes them for each module (data sheets, developer-kit pages); where a data
# sheet gives INT8 TOPS only, fp16 is derived (Ampere tensor cores: fp16 = half the INT8 rate) and
# the comment says so. Not checked on a board: no Jetson has been run by this project.
BOARDS = {
    # NVIDIA Jetson Nano data sheet / developer-kit page: 128-core Maxwell GPU at 921.6 MHz,
    # "472 GFLOPS" (FP16, 2 x the FP32 rate through half2 FMA); 4 GB 64-bit LPDDR4, 25.6 GB/s.
    # No tensor cores: 2:4 sparsity cannot be used.
    "nano": Board("Jetson Nano 4GB", "sm_53", 0.472, None, 25.6,
                  "NVIDIA Jetson Nano data sheet: 472 GFLOPS FP16, LPDDR4 25.6 GB/s",
                  jetpack="JetPack 4.6 (CUDA 10.2, TensorRT 8.2)", python="3.6"),
    # NVIDIA Jetson TX2 data sheet: 256-core Pascal GPU at up to 1.3 GHz, "1.33 TFLOPS" FP16
    # (half2 FMA); 8 GB 128-bit LPDDR4, 59.7 GB/s. No tensor cores.
    "tx2": Board("Jetson TX2 8GB", "sm_62", 1.33, None, 59.7,
                 "NVIDIA Jetson TX2 data sheet: 1.33 TFLOPS FP16, LPDDR4 59.7 GB/s",
                 jetpack="JetPack 4.6 (CUDA 10.2, TensorRT 8.2)", python="3.6"),
    # NVIDIA Jetson Xavier NX data sheet: 384-core Volta GPU with 48 tensor cores at 1100 MHz,
    # "6 TFLOPS" FP16 (48 x 64 FMA x 2 x 1.1 GHz = 6.8, rounded down there); 8 GB 128-bit LPDDR4x,
    # 51.2 GB/s (59.7 on the 16 GB module). Tensor cores, but no 2:4 sparse ones (that is Ampere).
    "xavier-nx": Board("Jetson Xavier NX 8GB", "sm_72", 6.0, None, 51.2,
                       "NVIDIA Jetson Xavier NX data sheet: 6 TFLOPS FP16 (tensor cores), LPDDR4x 51.2 GB/s",
                       tensor_cores=True, jetpack="JetPack 5.1 (CUDA 11.4, TensorRT 8.5)", python="3.8"),
    # NVIDIA Jetson Orin Nano series data sheet (8GB module, 15 W mode, GPU at 625 MHz, 1024
    # CUDA cores, 32 tensor cores): 40 INT8 TOPS sparse / 20 dense; 128-bit LPDDR5 68 GB/s.
    # Ampere tensor cores run FP16 at half the INT8 rate: 10 TFLOPS dense, 20 sparse
    # (derived from the INT8 figures). JetPack 6.1+ "Super" mode (1020 MHz, 102 GB/s,
    # 67 sparse INT8 TOPS) would raise every number here by ~1.6x (compute) and 1.5x (bytes).
    "orin-nano": Board("Jetson Orin Nano 8GB", "sm_87", 10.0, 20.0, 68.0,
                       "NVIDIA Jetson Orin Nano data sheet: 40/20 INT8 TOPS sparse/dense -> fp16 20/10 TFLOPS, LPDDR5 68 GB/s",
                       tensor_cores=True, jetpack="JetPack 6 (CUDA 12.6, TensorRT 10.3)", python="3.10"),
    # NVIDIA Jetson Orin NX series data sheet (16GB module): 1024 CUDA cores, 32 tensor cores at
    # 918 MHz: the Orin Nano's GPU at 918/625 of its clock, so 60/30 INT8 TOPS sparse/dense ->
    # fp16 30/15 TFLOPS (derived the same way); 128-bit LPDDR5, 102.4 GB/s.
    "orin-nx": Board("Jetson Orin NX 16GB", "sm_87", 15.0, 30.0, 102.4,
                     "NVIDIA Jetson Orin NX data sheet: 1024-core GPU at 918 MHz -> fp16 30/15 TFLOPS sparse/dense "
                     "(derived), LPDDR5 102.4 GB/s",
                     tensor_cores=True, jetpack="JetPack 6 (CUDA 12.6, TensorRT 10.3)", python="3.10"),
    # NVIDIA Jetson AGX Orin series data sheet (64GB module): 2048 CUDA cores, 64 tensor cores at
    # 1.3 GHz, GPU "170 sparse INT8 TOPS" -> fp16 85/42.5 TFLOPS sparse/dense; 256-bit LPDDR5, 204.8 GB/s.
    "agx-orin": Board("Jetson AGX Orin 64GB", "sm_87", 42.5, 85.0, 204.8,
                      "NVIDIA Jetson AGX Orin data sheet: GPU 170 sparse INT8 TOPS -> fp16 85/42.5 TFLOPS, "
                      "LPDDR5 204.8 GB/s",
                      tensor_cores=True, jetpack="JetPack 6 (CUDA 12.6, TensorRT 10.3)", python="3.10"),
}

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
    for vi in light.graph.input:
        if vi.name in inits:
            continue
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


def layer_costs(model: onnx.ModelProto, batch: int = 1) -> list[dict]:
    """FLOPs and fp16 bytes (dense and 2:4) of each node; shapes from ONNX shape inference."""
    shapes = _shapes_at_batch(model, batch)
    inits = {t.name: t for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type in ELEMENTWISE_FUSED or node.op_type in ("Constant", "Shape", "Gather", "Unsqueeze", "Concat"):
            continue
        outs = [shapes.get(o) for o in node.output]
        ins = [shapes.get(i) for i in node.input if i and i not in inits]
        if any(s is None for s in outs + ins):
            continue
        act_bytes = BYTES_PER_VALUE * (sum(int(np.prod(s)) for s in ins) + sum(int(np.prod(s)) for s in outs))
        flops, weights, two_four = 0, 0, False
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            weights = int(w.size)
            out_elems = int(np.prod(outs[0]))
            if node.op_type == "Conv":
                macs = out_elems * int(np.prod(w.shape[1:]))
                axis = 1
            else:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
                k = w.shape[1] if trans_b else w.shape[0]
                macs = out_elems * k
                axis = 1 if trans_b else 0
            flops = 2 * macs
            two_four = w.shape[axis] % 4 == 0 and is_2to4(torch.from_numpy(np.array(w)), axis)
        elif node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Mul"):
            flops = int(np.prod(outs[0])) * (1 if node.op_type in ("Add", "Mul") else
                                             int(np.prod(next((a.ints for a in node.attribute if a.name == "kernel_shape"),
                                                              [1]))))
        dense_bytes = act_bytes + BYTES_PER_VALUE * weights
        # 2:4: half the values plus 2 bits of position per kept value.
        sparse_bytes = act_bytes + (BYTES_PER_VALUE * weights // 2 + weights // 8 if two_four else BYTES_PER_VALUE * weights)
        rows.append({"name": node_label(node), "op": node.op_type, "flops": flops, "weights": weights,
                     "two_four": two_four, "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes})
    return rows


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
