"""Prune passes: zero weights of Conv / Gemm layers in an ONNX model (dense-with-zeros hand-off).

Weights stay dense tensors; only their values change (DESIGN contract 1). Layers named in
the model's exclusion list (written at export, or stems and heads for foreign files) are
never touched.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..common.memory import trim_heap
from ..common.onnxio import tensor_buffer
from .graph import (PassResult, copy_model_without_initializers, initializer_map, prune_exclusions,
                    set_prune_exclusions, tensor_nbytes, weight_nodes)
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


def _pruned(model: onnx.ModelProto, layers: list, mask_of, exclude: list[str] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose `layers`' weights are multiplied by `mask_of(name, weight)` (a keep-mask,
    or None to leave the layer as is), built one initializer at a time: the input and its copy are
    each in memory once, plus one layer's values and their copy in the output. (Copying the model,
    then every weight as an array, then replacing each in the copy peaked at 5.5 GB on VGG-19's 548 MiB.)"""
    targets = {w for _, w, _ in layers}
    out = copy_model_without_initializers(model)
    inits = list(model.graph.initializer)
    slots = [out.graph.initializer.add() for _ in inits]  # the input's order, filled in any order
    # Largest first: the largest layer's two copies are made while the output holds nothing else yet.
    for i in sorted(range(len(inits)), key=lambda i: -tensor_nbytes(inits[i])):
        t, slot = inits[i], slots[i]
        if t.name not in targets:
            slot.CopyFrom(t)
            continue
        buffer, weight = tensor_buffer(t)  # a writable copy of its values, already serialised
        keep = mask_of(t.name, weight)
        if keep is None:
            slot.CopyFrom(t)
            continue
        np.multiply(weight, keep, out=weight)  # weight * keep, in place
        del weight, keep
        trim_heap()  # the mask and its scratch, before the output's copy of the layer is made
        slot.MergeFromString(buffer)
        del buffer
    if exclude:  # the layers `exclude` left dense join the file's list: it says what was left dense on purpose
        patterns = prune_exclusions(model) + list(exclude)
        set_prune_exclusions(out, [w for _, w, _ in weight_nodes(model) if _is_excluded(w, patterns)])
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a weight array, a read-only one too (the masks only read it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


def prune_2to4(model: onnx.ModelProto, exclude: list[str] | None = None) -> PassResult:
    """2 of every 4 consecutive input channels zero (magnitude), per output channel and tap.

    A layer whose input channels are not a multiple of 4 is skipped whole and counted.
    """
    counters: Counter = Counter()
    layers = prunable_weights(model, exclude)
    counters["excluded"] = len(weight_nodes(model)) - len(layers)
    axes = {name: axis for _, name, axis in layers}

    def mask_of(name: str, weight: np.ndarray):  # one layer at a time: its mask depends on it alone
        masks, found = masks_for({name: _tensor(weight)}, "2:4", axes={name: axes[name]})
        counters.update(found)
        return masks[name].numpy() if name in masks else None

    out = _pruned(model, layers, mask_of, exclude)
    return PassResult(out, counters, "prune_2to4")


def prune_unstructured(model: onnx.ModelProto, sparsity: float, scope: str = "layer",
                       exclude: list[str] | None = None) -> PassResult:
    """Magnitude pruning to `sparsity` per layer or globally over the prunable layers."""
    counters: Counter = Counter()
    layers = prunable_weights(model, exclude)
    counters["excluded"] = len(weight_nodes(model)) - len(layers)
    if scope == "global":  # one threshold over every layer: the magnitudes are ranked together
        inits = initializer_map(model)
        masks, found = masks_for({w: _tensor(numpy_helper.to_array(inits[w])) for _, w, _ in layers},
                                 "unstructured", sparsity, scope)
        counters.update(found)
        mask_of = lambda name, weight: masks[name].numpy() if name in masks else None  # noqa: E731
    else:
        masks = {}

        def mask_of(name: str, weight: np.ndarray):  # one layer at a time: its mask depends on it alone
            one, found = masks_for({name: _tensor(weight)}, "unstructured", sparsity, scope)
            counters.update(found)
            masks[name] = True
            return one[name].numpy()

    out = _pruned(model, layers, mask_of, exclude)
    depthwise = sum(1 for w in depthwise_weights(model) if w in masks)
    if depthwise:
        counters["pruned_depthwise"] = depthwise
    return PassResult(out, counters, f"prune_unstructured({sparsity:g},{scope})")


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
