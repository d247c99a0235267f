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

from .graph import PassResult, copy_model, initializer_map, prune_exclusions, replace_initializer, weight_nodes
from .masks import is_excluded as _is_excluded
from .masks import masks_for


def prunable_weights(model: onnx.ModelProto, exclude: list[str] | None = None) -> list[tuple[onnx.NodeProto, str, int]]:
    """Weight layers that a prune pass may touch: every Conv/Gemm/MatMul weight not excluded."""
    patterns = prune_exclusions(model) + list(exclude or [])
    return [(n, w, axis) for n, w, axis in weight_nodes(model) if not _is_excluded(w, patterns)]


def _apply(model: onnx.ModelProto, masks: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = copy_model(model)
    for name, mask in masks.items():
        replace_initializer(out, name, arrays[name] * mask.numpy())
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
    return PassResult(_apply(model, masks, arrays), counters, "prune_2to4")


def prune_unstructured(model: onnx.ModelProto, sparsity: float, scope: str = "layer",
                       exclude: list[str] | None = None) -> PassResult:
    """Magnitude pruning to `sparsity` per layer or globally over the prunable layers."""
    counters: Counter = Counter()
    layers = prunable_weights(model, exclude)
    counters["excluded"] = len(weight_nodes(model)) - len(layers)
    arrays = _weights(model, [w for _, w, _ in layers])
    masks, found = masks_for({k: torch.from_numpy(v) for k, v in arrays.items()}, "unstructured", sparsity, scope)
    counters.update(found)
    return PassResult(_apply(model, masks, arrays), counters, f"prune_unstructured({sparsity:g},{scope})")


def parse_prune(spec: str | None):
    """'2:4' -> ('2:4', None); '0.9' -> ('unstructured', 0.9); None/'none' -> None."""
    from ..common.errors import UserError
    from .masks import check_sparsity

    if spec is None or str(spec).lower() in ("none", "dense", "0", "0.0"):
        return None
    if spec == "2:4":
        return ("2:4", None)
    try:
        value = float(spec)
    except ValueError:
        raise UserError(f"--prune takes '2:4', a sparsity in [0, 1) such as 0.9, or 'none'; got '{spec}'") from None
    return ("unstructured", check_sparsity(value))


def prune_pipeline(spec: str | None, scope: str = "layer", exclude: list[str] | None = None) -> list:
    """The explicit list of passes that a `--prune` setting means."""
    parsed = parse_prune(spec)
    if parsed is None:
        return []
    kind, sparsity = parsed
    if kind == "2:4":
        return [(prune_2to4, {"exclude": exclude})]
    return [(prune_unstructured, {"sparsity": sparsity, "scope": scope, "exclude": exclude})]
