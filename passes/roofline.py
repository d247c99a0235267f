"""Roofline ESTIMATES from published peaks: per layer and whole network for Jetson boards (`estimate`),
and per layer for the per-layer report on any card (`card_peaks`, `format_cost`, `roofline_time`).

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

from ..common.shapes import conv_out_size
from .graph import node_attrs, node_label, skeleton
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
    fp32_tflops: float | None = None  # CUDA cores (FMA, no tensor cores): the CUDA-core regime
    tf32_tflops: float | None = None  # TF32 tensor cores, dense (fp32 engines with TF32 allowed)

    def peak_tflops(self, precision: str) -> float | None:
        """The dense peak an engine of `precision` ('fp32': TF32 off, 'tf32', 'fp16') reaches at most."""
        return {"fp32": self.fp32_tflops, "tf32": self.tf32_tflops, "fp16": self.fp16_dense_tflops or None}[precision]


_JETPACK6 = "JetPack 6 (CUDA 12.6, TensorRT 10.3)"


def _orin(name: str, fp16_dense: float, gbs: float, fp32: float, source: str, jetpack: str = _JETPACK6) -> Board:
    """An Orin module (sm_87, Ampere tensor cores, 2:4 doubling the fp16 rate, JetPack 6's Python 3.10)."""
    return Board(name, "sm_87", fp16_dense, 2 * fp16_dense, gbs, source, tensor_cores=True, jetpack=jetpack,
                 python="3.10", fp32_tflops=fp32)


# Peaks as NVIDIA publishes them for each module (data sheets, developer-kit pages); where a data
# sheet gives INT8 TOPS only, fp16 is derived (Ampere tensor cores: fp16 = half the INT8 rate) and
# the comment says so. Not checked on a board: no Jetson has been run by this project.
BOARDS = {
    # NVIDIA Jetson Nano data sheet / developer-kit page: 128-core Maxwell GPU at 921.6 MHz,
    # "472 GFLOPS" (FP16, 2 x the FP32 rate through half2 FMA); 4 GB 64-bit LPDDR4, 25.6 GB/s.
    # No tensor cores: 2:4 sparsity cannot be used.
    "nano": Board("Jetson Nano 4GB", "sm_53", 0.472, None, 25.6,
                  "NVIDIA Jetson Nano data sheet: 472 GFLOPS FP16, LPDDR4 25.6 GB/s",
                  jetpack="JetPack 4.6 (CUDA 10.2, TensorRT 8.2)", python="3.6", fp32_tflops=0.236),
    # NVIDIA Jetson TX2 data sheet: 256-core Pascal GPU at up to 1.3 GHz, "1.33 TFLOPS" FP16
    # (half2 FMA); 8 GB 128-bit LPDDR4, 59.7 GB/s. No tensor cores.
    "tx2": Board("Jetson TX2 8GB", "sm_62", 1.33, None, 59.7,
                 "NVIDIA Jetson TX2 data sheet: 1.33 TFLOPS FP16, LPDDR4 59.7 GB/s",
                 jetpack="JetPack 4.6 (CUDA 10.2, TensorRT 8.2)", python="3.6", fp32_tflops=0.665),
    # NVIDIA Jetson Xavier NX data sheet: 384-core Volta GPU with 48 tensor cores at 1100 MHz,
    # "6 TFLOPS" FP16 (48 x 64 FMA x 2 x 1.1 GHz = 6.8, rounded down there); 8 GB 128-bit LPDDR4x,
    # 51.2 GB/s (59.7 on the 16 GB module). Tensor cores, but no 2:4 sparse ones (that is Ampere).
    "xavier-nx": Board("Jetson Xavier NX 8GB", "sm_72", 6.0, None, 51.2,
                       "NVIDIA Jetson Xavier NX data sheet: 6 TFLOPS FP16 (tensor cores), LPDDR4x 51.2 GB/s",
                       tensor_cores=True, jetpack="JetPack 5.1 (CUDA 11.4, TensorRT 8.5)", python="3.8",
                       fp32_tflops=0.845),
    # NVIDIA Jetson Orin Nano series data sheet (8GB module, 15 W mode, GPU at 625 MHz, 1024
    # CUDA cores, 32 tensor cores): 40 INT8 TOPS sparse / 20 dense; 128-bit LPDDR5 68 GB/s.
    # Ampere tensor cores run FP16 at half the INT8 rate: 10 TFLOPS dense, 20 sparse
    # (derived from the INT8 figures). JetPack 6.1+ "Super" mode (1020 MHz, 102 GB/s,
    # 67 sparse INT8 TOPS) would raise every number here by ~1.6x (compute) and 1.5x (bytes).
    "orin-nano": _orin("Jetson Orin Nano 8GB", 10.0, 68.0, 1.28, "NVIDIA Jetson Orin Nano data sheet: 40/20 INT8 "
                       "TOPS sparse/dense -> fp16 20/10 TFLOPS, LPDDR5 68 GB/s"),
    # NVIDIA Jetson Orin Nano Super Developer Kit (JetPack 6.1+ "MAXN SUPER" mode of the same 8GB module):
    # GPU at 1020 MHz, "67 INT8 TOPS" (sparse), 128-bit LPDDR5 102 GB/s. fp16 derived as above: 67 / 2 =
    # 33.5 TFLOPS sparse, 16.75 dense.
    "orin-nano-super": _orin("Jetson Orin Nano 8GB (Super mode)", 16.75, 102.0, 2.09,
                             "NVIDIA Jetson Orin Nano Super Developer Kit: 67 sparse INT8 TOPS -> fp16 33.5/16.75 "
                             "TFLOPS sparse/dense (derived), LPDDR5 102 GB/s",
                             jetpack="JetPack 6.1+ in MAXN SUPER mode (CUDA 12.6, TensorRT 10.3)"),
    # NVIDIA Jetson Orin NX series data sheet (16GB module): 1024 CUDA cores, 32 tensor cores at
    # 918 MHz: the Orin Nano's GPU at 918/625 of its clock, so 60/30 INT8 TOPS sparse/dense ->
    # fp16 30/15 TFLOPS (derived the same way); 128-bit LPDDR5, 102.4 GB/s.
    "orin-nx": _orin("Jetson Orin NX 16GB", 15.0, 102.4, 1.88, "NVIDIA Jetson Orin NX data sheet: 1024-core GPU "
                     "at 918 MHz -> fp16 30/15 TFLOPS sparse/dense (derived), LPDDR5 102.4 GB/s"),
    # NVIDIA Jetson AGX Orin series data sheet (64GB module): 2048 CUDA cores, 64 tensor cores at
    # 1.3 GHz, GPU "170 sparse INT8 TOPS" -> fp16 85/42.5 TFLOPS sparse/dense; 256-bit LPDDR5, 204.8 GB/s.
    "agx-orin": _orin("Jetson AGX Orin 64GB", 42.5, 204.8, 5.32, "NVIDIA Jetson AGX Orin data sheet: GPU 170 "
                      "sparse INT8 TOPS -> fp16 85/42.5 TFLOPS, LPDDR5 204.8 GB/s"),
}

# fp32_tflops of the boards: CUDA cores x 2 (FMA) x the GPU clock of the mode above (derived, not in the
# data sheets): Nano 128 x 0.9216 GHz, TX2 256 x 1.3, Xavier NX 384 x 1.1, Orin Nano 1024 x 0.625,
# Orin Nano Super 1024 x 1.02, Orin NX 1024 x 0.918, AGX Orin 2048 x 1.3.

# Data-centre and desktop cards by the name torch.cuda.get_device_name reports. FP32 is the CUDA-core
# (non-tensor) rate; fp16 and tf32 the dense tensor-core rates (the data sheets print the 2:4-sparse
# figure, twice these). Sources:
#   NVIDIA H100 Tensor Core GPU data sheet (H100 SXM / H100 PCIe): FP32 67 / 51 TFLOPS, TF32 989 / 756*,
#     FP16 1,979 / 1,513* (*with sparsity), GPU memory bandwidth 3.35 TB/s (HBM3) / 2 TB/s (HBM2e).
#   NVIDIA H200 Tensor Core GPU data sheet (H200 SXM): FP32 67, TF32 989*, FP16 1,979*, 4.8 TB/s HBM3e.
#   NVIDIA A100 Tensor Core GPU data sheet: FP32 19.5, TF32 156, FP16 312 (dense); 2,039 GB/s (80GB SXM),
#     1,935 (80GB PCIe), 1,555 (40GB).
#   NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP32 82.6, FP16 tensor with FP32 accumulate
#     165.2 (cuBLAS's fp16 GEMMs accumulate in fp32), TF32 82.6, GDDR6X 1,008 GB/s.
def _card(name, sm, fp32, tf32, fp16, fp16_sparse, gbs, source):
    return Board(name, sm, fp16, fp16_sparse, gbs, source, tensor_cores=True, fp32_tflops=fp32, tf32_tflops=tf32)


_H100 = "NVIDIA H100 Tensor Core GPU data sheet"
_A100 = "NVIDIA A100 Tensor Core GPU data sheet"
CARDS = {
    "NVIDIA H100 80GB HBM3": _card("H100 SXM 80GB", "sm_90", 67.0, 494.5, 989.5, 1979.0, 3350.0,
                                   f"{_H100} (H100 SXM): FP32 67 TFLOPS, FP16 989.5 dense, HBM3 3.35 TB/s"),
    "NVIDIA H100 PCIe": _card("H100 PCIe 80GB", "sm_90", 51.0, 378.0, 756.5, 1513.0, 2000.0,
                              f"{_H100} (H100 PCIe): FP32 51 TFLOPS, FP16 756.5 dense, HBM2e 2 TB/s"),
    "NVIDIA H200": _card("H200 SXM 141GB", "sm_90", 67.0, 494.5, 989.5, 1979.0, 4800.0,
                         "NVIDIA H200 Tensor Core GPU data sheet (H200 SXM): FP32 67 TFLOPS, FP16 989.5 dense, "
                         "HBM3e 4.8 TB/s"),
    "NVIDIA A100-SXM4-80GB": _card("A100 SXM 80GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 2039.0,
                                   f"{_A100} (80GB SXM): FP32 19.5 TFLOPS, FP16 312, 2,039 GB/s"),
    "NVIDIA A100 80GB PCIe": _card("A100 PCIe 80GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 1935.0,
                                   f"{_A100} (80GB PCIe): FP32 19.5 TFLOPS, FP16 312, 1,935 GB/s"),
    "NVIDIA A100-SXM4-40GB": _card("A100 SXM 40GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 1555.0,
                                   f"{_A100} (40GB): FP32 19.5 TFLOPS, FP16 312, 1,555 GB/s"),
    "NVIDIA A100-PCIE-40GB": _card("A100 PCIe 40GB", "sm_80", 19.5, 156.0, 312.0, 624.0, 1555.0,
                                   f"{_A100} (40GB): FP32 19.5 TFLOPS, FP16 312, 1,555 GB/s"),
    "NVIDIA GeForce RTX 4090": _card("GeForce RTX 4090", "sm_89", 82.6, 82.6, 165.2, 330.4, 1008.0,
                                     "NVIDIA Ada GPU architecture whitepaper (RTX 4090): FP32 82.6 TFLOPS, FP16 "
                                     "tensor (FP32 accumulate) 165.2, 1,008 GB/s"),
}
# The Jetsons by torch's name for their GPU (not checked on a board; an Orin or Xavier name does not say
# which module, so those are derived).
TORCH_BOARD_NAMES = {"NVIDIA Tegra X1": "nano", "NVIDIA Tegra X2": "tx2"}
# FP32 FMA lanes per SM by compute capability (CUDA C++ Programming Guide, arithmetic instruction
# throughput): 64 on sm_60, sm_7x and sm_80; 128 on the others since Maxwell.
FP32_LANES_PER_SM = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}


def card_peaks(name: str, capability: tuple[int, int] | None = None, sms: int | None = None,
               clock_khz: int | None = None, mem_clock_khz: int | None = None,
               bus_bits: int | None = None) -> tuple[Board | None, str]:
    """The peaks of the card torch calls `name`, and where they come from: (Board, 'data sheet: ...');
    for a card in neither CARDS nor BOARDS, FP32 and bandwidth derived from what the device reports
    (SMs x FP32 lanes x 2 x clock; 2 x memory clock x bus width): (Board, 'derived: ...'); (None, why)
    when even that is not known."""
    if name in CARDS:
        return CARDS[name], f"data sheet: {CARDS[name].source}"
    board = BOARDS.get(TORCH_BOARD_NAMES.get(name, name))
    if board is not None:
        return board, f"data sheet: {board.source} (fp32 derived: CUDA cores x 2 x clock)"
    missing = [what for what, v in (("SM count", sms), ("GPU clock", clock_khz), ("memory clock", mem_clock_khz),
                                    ("memory bus width", bus_bits)) if not v]
    if missing:
        return None, f"'{name}' is not in the peak table and its {', '.join(missing)} is not known"
    lanes = FP32_LANES_PER_SM.get(tuple(capability or ()), 128)
    fp32 = sms * lanes * 2 * clock_khz * 1e3 / 1e12
    gbs = 2 * mem_clock_khz * 1e3 * bus_bits / 8 / 1e9
    sm = f"sm_{capability[0]}{capability[1]}" if capability else "?"
    how = (f"derived: {sms} SMs x {lanes} FP32 lanes x 2 x {clock_khz / 1e6:.3f} GHz = {fp32:.1f} TFLOP/s, "
           f"2 x {mem_clock_khz / 1e6:.3f} GHz x {bus_bits} bit = {gbs:.0f} GB/s; no tensor-core peak known")
    return Board(name, sm, 0.0, None, gbs, how, fp32_tflops=fp32), how


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
