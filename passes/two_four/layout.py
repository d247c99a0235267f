"""The portable 2:4 weight layout and the pass that rewrites 2:4 Conv/Gemm into `sparsecnn` ops.

GEMM view (the layout sparse tensor cores consume: cuSPARSELt's row-major A, TensorRT's
NHWC convolutions). A Conv weight W[Cout, Cin, kh, kw] becomes A[M, K] with M = Cout and
K = kh*kw*Cin in **tap-major** order, column k = (r*kw + s)*Cin + c, so every group of 4
consecutive columns is 4 consecutive input channels at one kernel tap: 2:4 along input
channels is 2:4 along K. A Gemm weight is A[out, in] (transB=0 weights are transposed).

Portable 2:4 layout of A[M, K] (K a multiple of 4, at most 2 non-zeros per group of 4):

    values    [M, K/2]          the two kept entries of each group, in ascending position
                                order, in the weight's own dtype
    positions [M, ceil(K/8)]    uint8: the 2-bit position (0..3) inside its group of each
                                kept value, 4 positions per byte, slot j of a row in byte
                                j // 4 at bits 2*(j % 4) .. 2*(j % 4) + 1 (little end first);
                                unused bits at the end of a row are 0

A group with fewer than two non-zeros keeps its non-zeros first, then fills the remaining
slot(s) with its lowest-index zero entries, so every group stores two distinct, ascending
positions. Unpacking reproduces A exactly (by value: a dropped -0.0 comes back as +0.0).
Bytes: K/2 values + K/8 position bytes per row, i.e. 53% of fp32, 56% of fp16.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch

from ..graph import (SPARSECNN_DOMAIN, PassResult, export_graph, import_graph, inferred_value_infos, set_tensor_info,
                    weight_nodes)
from ..masks import is_2to4

CONV_OP = "Conv2to4"
GEMM_OP = "Gemm2to4"


# --- GEMM view ---------------------------------------------------------------------------

def conv_gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """W[Cout, Cin, kh, kw] -> A[Cout, kh*kw*Cin] (tap-major K; contiguous)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def conv_weight_from_view(a: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Inverse of `conv_gemm_view`: A[Cout, kh*kw*Cin] -> W[Cout, Cin, kh, kw]."""
    kh, kw = kernel
    cout, k = a.shape
    return a.reshape(cout, kh, kw, k // (kh * kw)).permute(0, 3, 1, 2).contiguous()


# --- pack / unpack -----------------------------------------------------------------------

def pack_2to4(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A[M, K] with at most 2 non-zeros per 4 consecutive columns -> (values, positions)."""
    if a.dim() != 2:
        raise ValueError(f"2:4 packing needs a 2-D GEMM view, got shape {tuple(a.shape)}")
    m, k = a.shape
    if k % 4:
        raise ValueError(f"2:4 packing needs K (columns) a multiple of 4, got {k}")
    groups = a.reshape(m, k // 4, 4)
    nonzero = groups != 0
    if nonzero.numel() and int(nonzero.sum(-1).max()) > 2:
        raise ValueError("weight is not 2:4: some group of 4 consecutive entries along K has more than 2 non-zeros")
    # Rank: non-zeros first (by index), then zeros (by index); keep the first two, ascending.
    rank = (~nonzero).to(torch.int64) * 4 + torch.arange(4)
    chosen = torch.sort(torch.argsort(rank, dim=-1, stable=True)[..., :2], dim=-1).values
    values = torch.gather(groups, -1, chosen).reshape(m, k // 2).contiguous()
    codes = chosen.reshape(m, k // 2).to(torch.uint8)
    slots = k // 2
    padded = (slots + 3) // 4 * 4
    if padded != slots:
        codes = torch.cat([codes, torch.zeros(m, padded - slots, dtype=torch.uint8)], dim=1)
    quads = codes.reshape(m, padded // 4, 4)
    positions = quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)
    return values, positions.contiguous()


def unpack_2to4(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(values[M, K/2], positions[M, ceil(K/8)]) -> A[M, K] on values' device and dtype."""
    m, half = values.shape
    k = 2 * half
    pos = positions.to(device=values.device, dtype=torch.uint8)
    codes = torch.stack([(pos >> (2 * i)) & 3 for i in range(4)], dim=-1).reshape(m, -1)[:, :half]
    dense = torch.zeros(m, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, codes.reshape(m, k // 4, 2).long(), values.reshape(m, k // 4, 2))
    return dense.reshape(m, k)


def decompress_weight(values: torch.Tensor, positions: torch.Tensor, kernel_shape=None) -> torch.Tensor:
    """The dense ONNX-layout weight of a 2:4 op: [Cout, Cin, kh, kw] for Conv2to4, [out, in] for Gemm2to4."""
    a = unpack_2to4(values, positions)
    return conv_weight_from_view(a, tuple(kernel_shape)) if kernel_shape is not None else a


# --- the rewrite pass --------------------------------------------------------------------

def rewrite_2to4(model: onnx.ModelProto) -> PassResult:
    """Every Conv (2-D, group 1) and Gemm (transA=0) whose weight is 2:4 along input channels
    becomes `sparsecnn::Conv2to4` / `sparsecnn::Gemm2to4` with the portable layout; others stay.

    Outputs keep their names and get value_info (the custom ops have no ONNX shape inference),
    so later shape inference still sees every tensor's shape.
    """
    import onnx_graphsurgeon as gs

    counters: Counter = Counter()
    shapes = inferred_value_infos(model)
    todo = {n.output[0]: (w, axis) for n, w, axis in weight_nodes(model)}  # outputs are unique names
    graph = import_graph(model)
    packed: dict[str, tuple[tuple[str, int], list]] = {}  # weight -> ((op, axis) it was packed for, its tensors)
    for node in list(graph.nodes):
        if not node.outputs or node.outputs[0].name not in todo:
            continue
        weight_name, axis = todo[node.outputs[0].name]
        arr = np.array(node.inputs[1].values)
        w = torch.from_numpy(arr)
        reason = None
        if node.op == "MatMul":
            reason = "skipped_matmul"
        elif node.op == "Conv" and (node.attrs.get("group", 1) != 1 or w.dim() != 4):
            reason = "skipped_grouped_or_not_2d"
        elif node.op == "Gemm" and node.attrs.get("transA", 0):
            reason = "skipped_gemm_transA"
        elif not is_2to4(w, axis):
            reason = "left_dense_not_2to4"
        elif weight_name in packed and packed[weight_name][0] != (node.op, axis):
            reason = "skipped_weight_shared_in_another_layout"  # one name cannot hold two packings
        if reason:
            counters[reason] += 1
            continue
        if node.op == "Conv":
            view = conv_gemm_view(w)
            attrs = {k: v for k, v in node.attrs.items() if k != "group"}
            attrs["kernel_shape"] = list(arr.shape[2:])
            op_type = CONV_OP
        else:
            view = w if axis == 1 else w.t().contiguous()
            attrs = {k: v for k, v in node.attrs.items() if k in ("alpha", "beta")}
            op_type = GEMM_OP
        if weight_name not in packed:  # layers sharing a weight share its packed tensors
            values, positions = pack_2to4(view)
            tensors = [gs.Constant(f"{weight_name}.2to4_values", values.numpy().astype(arr.dtype)),
                       gs.Constant(f"{weight_name}.2to4_positions", positions.numpy())]
            packed[weight_name] = ((node.op, axis), tensors)
        outputs = list(node.outputs)
        for o in outputs:
            if o.dtype is None and o.name in shapes:
                set_tensor_info(o, shapes[o.name])
        node.outputs.clear()  # the dense node and, once unused, its weight go at export
        inputs = [node.inputs[0], *packed[weight_name][1], *node.inputs[2:3]]
        graph.nodes.append(gs.Node(op_type, name=node.name or f"{node.op}({', '.join(o.name for o in outputs)})",
                                   domain=SPARSECNN_DOMAIN, attrs=dict(sorted(attrs.items())), inputs=inputs,
                                   outputs=outputs))
        counters["converted_conv" if node.op == "Conv" else "converted_gemm"] += 1
    return PassResult(export_graph(graph, model), counters, "rewrite_2to4")
