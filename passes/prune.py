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
from ..common.onnxio import join_raw, split_raw, tensor_buffer
from .graph import (Owned, PassResult, copy_model_without_initializers, frees_input, initializer_map,
                    prune_exclusions, set_prune_exclusions, taken, tensor_nbytes, weight_nodes)
from .masks import is_excluded as _is_excluded
from .masks import masks_for


def prunable_weights(model: onnx.ModelProto, exclude: list[str] | None = None) -> list[tuple[onnx.NodeProto, str, int]]:
    """Weight layers that a prune pass may touch: every Conv/Gemm/MatMul weight not excluded."""
    patterns = prune_exclusions(model) + list(exclude or [])
    return [(n, w, axis) for n, w, axis in weight_nodes(model) if not _is_excluded(w, patterns, n.name)]


def check_exclusions(model: onnx.ModelProto, exclude: list[str] | None) -> None:
    """A pattern of `exclude` that names no weight layer (a typo, a name the file does not use) is a
    UserError: it would leave nothing dense and say nothing."""
    from ..common.errors import UserError

    layers = weight_nodes(model)
    for pattern in exclude or []:
        if not any(_is_excluded(w, [pattern], n.name) for n, w, _ in layers):
            example = f"'{layers[-1][0].name or layers[-1][1]}'" if layers else "a layer's name"
            raise UserError(f"exclude pattern '{pattern}' matches no Conv/Gemm layer of the model; give module, "
                            f"weight or node names such as {example} (globs allowed; `sparsecnn inspect` lists them)")


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


def _pruned(model: onnx.ModelProto | Owned, targets: set[str], mask_of, exclude: list[str] | None = None
            ) -> onnx.ModelProto:
    """A copy of `model` whose `targets`' weights are multiplied by `mask_of(name, weight)` (a keep-mask,
    or None to leave the layer as is), built one initializer at a time: the input and its copy are
    each in memory once, plus one layer's values and their copy in the output. (Copying the model,
    then every weight as an array, then replacing each in the copy peaked at 5.5 GB on VGG-19's 548 MiB.)
    An `Owned` model is freed once the targets' values are read out of it (`split_raw`): the layer
    being pruned then has its values and their copy in the output, not the input's copy too."""
    owned = isinstance(model, Owned)
    model = taken(model)
    out = copy_model_without_initializers(model)
    patterns = prune_exclusions(model) + list(exclude or [])
    inits = list(model.graph.initializer)
    slots = [out.graph.initializer.add() for _ in inits]  # the input's order, filled in any order
    # Largest first: the largest layer's two copies are made while the output holds nothing else yet.
    order = sorted(range(len(inits)), key=lambda i: -tensor_nbytes(inits[i]))
    held: dict[int, tuple] = {}  # an owned input's targets: (the tensor without its values, its raw values)
    if owned:  # the other tensors are copied and the targets' values read out, then the input goes
        for i in order:
            if inits[i].name in targets:
                held[i] = split_raw(inits[i])
            else:
                slots[i].CopyFrom(inits[i])
        del inits, model
        trim_heap()
    for i in order:
        if owned:
            if i not in held:
                continue
            t, raw = held.pop(i)
        else:
            t, raw = inits[i], None
            if t.name not in targets:
                slots[i].CopyFrom(t)
                continue
        buffer, weight = tensor_buffer(t, raw)  # a writable copy of its values, already serialised
        # An owned input's values go now: the buffer holds them, and the mask takes a copy as large.
        split, raw = raw is not None, None
        keep = mask_of(t.name, weight)
        if keep is None:  # left as it was (2:4 on channels not in fours): `t` whole, as it came
            join_raw(slots[i], t, weight.tobytes() if split else None)
            continue
        np.multiply(weight, keep, out=weight)  # weight * keep, in place
        del weight, keep
        trim_heap()  # the mask and its scratch, before the output's copy of the layer is made
        slots[i].MergeFromString(buffer)
        del buffer
    if exclude:  # the layers `exclude` left dense join the file's list: it says what was left dense on purpose
        set_prune_exclusions(out, [w for n, w, _ in weight_nodes(out) if _is_excluded(w, patterns, n.name)])
    return out


def _plan(model: onnx.ModelProto | Owned, exclude: list[str] | None) -> tuple[dict[str, int], int]:
    """({prunable weight: its input-channel axis}, layers excluded), read without keeping a reference
    into the model (an owned one must be free to go)."""
    view = model.model if isinstance(model, Owned) else model
    check_exclusions(view, exclude)
    layers = {w: axis for _, w, axis in prunable_weights(view, exclude)}
    return layers, len(weight_nodes(view)) - len(layers)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a weight array, a read-only one too (the masks only read it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


@frees_input
def prune_2to4(model: onnx.ModelProto | Owned, exclude: list[str] | None = None) -> PassResult:
    """2 of every 4 consecutive input channels zero (magnitude), per output channel and tap.

    A layer whose input channels are not a multiple of 4 is skipped whole and counted.
    """
    counters: Counter = Counter()
    axes, counters["excluded"] = _plan(model, exclude)

    def mask_of(name: str, weight: np.ndarray):  # one layer at a time: its mask depends on it alone
        masks, found = masks_for({name: _tensor(weight)}, "2:4", axes={name: axes[name]})
        counters.update(found)
        return masks[name].numpy() if name in masks else None

    out = _pruned(model, set(axes), mask_of, exclude)
    return PassResult(out, counters, "prune_2to4")


@frees_input
def prune_unstructured(model: onnx.ModelProto | Owned, sparsity: float, scope: str = "layer",
                       exclude: list[str] | None = None) -> PassResult:
    """Magnitude pruning to `sparsity` per layer or globally over the prunable layers."""
    counters: Counter = Counter()
    layers, counters["excluded"] = _plan(model, exclude)
    if scope == "global":  # one threshold over every layer: the magnitudes are ranked together
        model = taken(model)  # read whole for the ranking, so kept whole until the output is built
        inits = initializer_map(model)
        masks, found = masks_for({w: _tensor(numpy_helper.to_array(inits[w])) for w in layers},
                                 "unstructured", sparsity, scope)
        del inits
        counters.update(found)
        mask_of = lambda name, weight: masks[name].numpy() if name in masks else None  # noqa: E731
    else:
        masks = {}

        def mask_of(name: str, weight: np.ndarray):  # one layer at a time: its mask depends on it alone
            one, found = masks_for({name: _tensor(weight)}, "unstructured", sparsity, scope)
            counters.update(found)
            masks[name] = True
            return one[name].numpy()

    out = _pruned(model, set(layers), mask_of, exclude)
    depthwise = sum(1 for w in depthwise_weights(out) if w in masks)  # the output's weights have the input's shapes
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
