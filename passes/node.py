"""An ONNX node as a builder sees it at compile time, and the op tables builders go into.

The shared executor (runtimes/executor.py) builds each node by calling a `Builder` with a
`NodeContext`; the standard-ONNX builders fill `STANDARD_OPS` (runtimes/ops.py) and each
sparse format's reference builders live in that format's home (passes/<format>/reference.py).
Defined here, below both, so a format's reference can be written beside its layout and
rewrite pass without importing the runtimes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import torch

from ..common.shapes import explicit_pads

OpFn = Callable[..., Any]
Builder = Callable[["NodeContext"], OpFn]


@dataclass
class NodeContext:
    node: onnx.NodeProto
    attrs: dict[str, Any]
    consts: dict[str, torch.Tensor]
    shapes: dict[str, list[int | None]]
    device: torch.device
    dtype: torch.dtype
    channels_last: bool = False
    options: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what ran, for the per-layer report
    # Indices of node inputs the returned function takes (None: all). A builder that keeps
    # constants in its own form (e.g. compressed weights) lists only the rest, so the
    # executor neither passes nor keeps the originals.
    inputs_used: list[int] | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    def const(self, i: int) -> torch.Tensor | None:
        if i >= len(self.node.input) or not self.node.input[i]:
            return None
        return self.consts.get(self.node.input[i])

    def shape(self, tensor: str) -> list[int | None] | None:
        return self.shapes.get(tensor)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


STANDARD_OPS: dict[tuple[str, str], Builder] = {}


def op(op_type: str, domain: str = "", table: dict | None = None):
    def register(builder: Builder) -> Builder:
        (STANDARD_OPS if table is None else table)[(domain, op_type)] = builder
        return builder

    return register


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = onnx.numpy_helper.to_array(v)
        out[a.name] = v
    return out


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] -> F.pad's last-dim-first [b2, e2, b1, e1]."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def resolve_pads(ctx: NodeContext, x: torch.Tensor, kernel, stride, dilation) -> list[int]:
    return explicit_pads(ctx.attr("auto_pad"), ctx.attr("pads"), list(x.shape[2:]), kernel, stride, dilation)
