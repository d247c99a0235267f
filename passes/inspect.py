"""Per-layer facts about a model: shapes, sparsity, 2:4 compliance, bytes dense vs non-zero."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import dense_only_weight_nodes, initializer_map, node_label, weight_nodes
from .masks import is_2to4
from .prune import _tensor, prunable_weights


@dataclass
class LayerInfo:
    node: str
    op: str
    weight: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    prunable: bool
    two_four: bool | None  # None: input channels not a multiple of 4, 2:4 impossible
    dense_bytes: int
    nonzero_bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d


def layer_table(model: onnx.ModelProto) -> list[LayerInfo]:
    inits = initializer_map(model)
    prunable = {w for _, w, _ in prunable_weights(model)}
    rows = []
    for node, name, axis in weight_nodes(model):
        arr = numpy_helper.to_array(inits[name])  # a read-only view of one copy of its bytes
        nnz = int(np.count_nonzero(arr))
        two_four = is_2to4(_tensor(arr), axis) if arr.shape[axis] % 4 == 0 else None  # is_2to4 only reads it
        rows.append(LayerInfo(node_label(node), node.op_type, name, tuple(arr.shape), arr.size, nnz,
                              name in prunable, two_four, arr.nbytes, nnz * arr.itemsize))
    for node, name in dense_only_weight_nodes(model):
        arr = numpy_helper.to_array(inits[name])
        nnz = int(np.count_nonzero(arr))
        rows.append(LayerInfo(node_label(node), node.op_type, name, tuple(arr.shape), arr.size, nnz,
                              False, None, arr.nbytes, nnz * arr.itemsize))
    return rows


def sparsity_summary(rows: list[LayerInfo]) -> dict:
    pr = [r for r in rows if r.prunable]
    total = sum(r.params for r in pr)
    nnz = sum(r.nonzeros for r in pr)
    return {
        "layers": len(rows),
        "prunable_layers": len(pr),
        "prunable_params": total,
        "prunable_sparsity": 1.0 - nnz / total if total else 0.0,
        "all_sparsity": 1.0 - sum(r.nonzeros for r in rows) / max(1, sum(r.params for r in rows)),
        "two_four_layers": sum(1 for r in pr if r.two_four),
        "dense_bytes": sum(r.dense_bytes for r in rows),
        "nonzero_bytes": sum(r.nonzero_bytes for r in rows),
    }


def format_table(rows: list[LayerInfo]) -> str:
    head = f"{'layer':<44} {'op':<6} {'shape':<20} {'params':>10} {'sparsity':>8} {'2:4':>4} {'prune':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tf = "n/a" if r.two_four is None else ("yes" if r.two_four else "no")
        lines.append(f"{r.node[-44:]:<44} {r.op:<6} {'x'.join(map(str, r.shape)):<20} {r.params:>10} "
                     f"{r.sparsity:>8.3f} {tf:>4} {'yes' if r.prunable else 'no':>5}")
    s = sparsity_summary(rows)
    lines.append("-" * len(head))
    lines.append(f"{s['layers']} weight layers, {s['prunable_layers']} prunable; sparsity over prunable layers "
                 f"{s['prunable_sparsity']:.4f}; 2:4 layers {s['two_four_layers']}; weights "
                 f"{s['dense_bytes'] / 2**20:.1f} MiB dense, {s['nonzero_bytes'] / 2**20:.1f} MiB non-zero")
    return "\n".join(lines)
