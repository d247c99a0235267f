"""Prune passes: zero weights of Conv / Gemm layers in an ONNX model (dense-with-zeros hand-off).

Weights stay dense tensors; only their values change (DESIGN contract 1). Layers named in
the model's exclusion list (written at export, or stems and heads for foreign files) are
never touched.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .graph import (PassResult, copy_model, initializer_map, prune_exclusions, replace_initializer,
                    set_prune_exclusions, weight_nodes)
from .masks import is_excluded as _is_excluded
from .masks import masks_for


def prunable_weights(model: onnx.ModelProto, exclude: list[str] | None = None) -> list[tuple[onnx.NodeProto, str, int]]:
    """Weight layers that a prune pass may touch: every Conv/Gemm/MatMul weight not excluded."""
    patterns = prune_exclusions(model) + list(exclude or [])
    return [(n, w, axis) for n, w, axis in weight_nodes(model) if not _is_excluded(w, patterns)]


def depthwise_weights(model: onnx.ModelProto) -> list[str]:
    """Weights of depthwise convs (grouped, one input channel per group: MobileNet's 3x3 layers).

    Their filters are tiny (9 weights for a 3x3), so unstructured pruning at 0.9 empties most of
    their channels, and the csr runtime runs grouped convs dense anyway. The passes prune them as
    any layer (2:4 skips them: one input channel is not a multiple of 4) and count them, so the
    CLI's pass summary and the Python API's warning can say so.
    """
    inits = initializer_map(model)
    out = []
    for node, weight, _ in weight_nodes(model):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = list(inits[weight].dims)
        if node.op_type == "Conv" and group > 1 and len(dims) > 1 and dims[1] == 1:
            out.append(weight)
    return out


def _apply(model: onnx.ModelProto, masks: dict[str, torch.Tensor], arrays: dict[str, np.ndarray],
           exclude: list[str] | None = None) -> onnx.ModelProto:
    out = copy_model(model)
    for name, mask in masks.items():
        replace_initializer(out, name, arrays[name] * mask.numpy())
    if exclude:  # the layers `exclude` left dense join the file's list: it says what was left dense on purpose
        set_prune_exclusions(out, [w for _, w, _ in weight_nodes(model)
                                   if _is_excluded(w, prune_exclusions(model) + list(exclude))])
    return out


def _weights(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    inits = initializer_map(model)
    return {n: np.array(numpy_helper.to_array(inits[n])) for n in names}


def prune_2to4(model: onnx.ModelProto, exclude: list[str] | None = None) -> PassResult:
    """2 of every 4 consecutive input channels zero (magnitude), per output channel and tap.

    A layer whose input channels are not a multiple of 4 is skipped whole and counted.
    """
    counters: Counter = Counter()
    layers = prunable_weights(model, exclude)
    counters["excluded"] = len(weight_nodes(model)) - len(layers)
    arrays = _weights(model, [w for _, w, _ in layers])
    masks, found = masks_for({k: torch.from_numpy(v) for k, v in arrays.items()}, "2:4",
                             axes={name: axis for _, name, axis in layers})
    counters.update(found)
    return PassResult(_apply(model, masks, arrays, exclude), counters, "prune_2to4")


def prune_unstructured(model: onnx.ModelProto, sparsity: float, scope: str = "layer",
                       exclude: list[str] | None = None) -> PassResult:
    """Magnitude pruning to `sparsity` per layer or globally over the prunable layers."""
    counters: Counter = Counter()
    layers = prunable_weights(model, exclude)
    counters["excluded"] = len(weight_nodes(model)) - len(layers)
    arrays = _weights(model, [w for _, w, _ in layers])
    masks, found = masks_for({k: torch.from_numpy(v) for k, v in arrays.items()}, "unstructured", sparsity, scope)
    counters.update(found)
    depthwise = sum(1 for w in depthwise_weights(model) if w in masks)
    if depthwise:
        counters["pruned_depthwise"] = depthwise
    return PassResult(_apply(model, masks, arrays, exclude), counters, f"prune_unstructured({sparsity:g},{scope})")


def parse_prune(spec: str | None, what: str = "--prune"):
    """'2:4' -> ('2:4', None); '0.9' -> ('unstructured', 0.9); None/'none' -> None. `what` names the
    setting in the error (the CLI's flag, the Python API's argument)."""
    from ..common.errors import UserError
    from .masks import check_sparsity

    if spec is None or str(spec).lower() in ("none", "dense", "0", "0.0"):
        return None
    if spec == "2:4":
        return ("2:4", None)
    try:
        value = float(spec)
    except ValueError:
        raise UserError(f"{what} takes '2:4', a sparsity in [0, 1) such as 0.9, or 'none'; got '{spec}'") from None
    return ("unstructured", check_sparsity(value))


def prune_pipeline(spec: str | None, scope: str = "layer", exclude: list[str] | None = None,
                   what: str = "--prune") -> list:
    """The explicit list of passes that a `--prune` setting means."""
    parsed = parse_prune(spec, what)
    if parsed is None:
        return []
    kind, sparsity = parsed
    if kind == "2:4":
        return [(prune_2to4, {"exclude": exclude})]
    return [(prune_unstructured, {"sparsity": sparsity, "scope": scope, "exclude": exclude})]
