"""A model at an older default-domain opset: onnx.version_converter, helped over the versions it has no
adapter for.

onnx's converter steps one opset at a time and needs an adapter for every op that changed at each
step; going down it lacks many (Relu 14 -> 13 among them, so no model with a ReLU exported at opset
14+ reached opset 13, the newest opset TensorRT 8.2 on the original Jetson Nano parses). Most of
those changes only widened the types an op takes or added an attribute or input whose default keeps
the old meaning (`SAME_MEANING`). A node whose every change between the two opsets is one of those,
and that does not use what was added, means the same at the older opset: it is parked in a private
domain while the converter runs and comes back as it was, less the attributes the older version does
not know (set to their defaults: `ADDED_ATTRIBUTES`). An op newer than the target that the spec
defines through older ops (HardSwish) comes back as that expansion (`EXPANSIONS`). Everything else
is the converter's, and so are its refusals.
"""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import defs, helper

_PARKED = "ai.sparsecnn.opset_parked"


def _attr(node: onnx.NodeProto, name: str):
    a = next((a for a in node.attribute if a.name == name), None)
    return None if a is None else helper.get_attribute_value(a)


def _always(node: onnx.NodeProto) -> bool:
    return True


def _without(*names: str) -> Callable[[onnx.NodeProto], bool]:
    """The node sets none of `names` (attributes added at that version), or sets them to their default 0;
    the older version does not know them, so they are dropped (`ADDED_ATTRIBUTES`)."""
    return lambda node: all(_attr(node, n) in (None, 0) for n in names)


# (op, the version that changed it) -> when a node means the same at the version before. From the ONNX
# operator changelog: each of these widened the types (int8/16, uint8/16, bfloat16, sequences, optionals)
# or added an attribute or input whose default is the old behaviour. Versions above 22 are not listed.
_TYPES_ONLY = {
    14: ("Relu", "Add", "Sub", "Mul", "Div", "Identity"),
    15: ("BatchNormalization", "Pow"),
    16: ("Identity", "LeakyRelu", "PRelu", "Where", "GreaterOrEqual", "LessOrEqual"),
    19: ("Identity", "Constant", "Reshape", "Shape", "Size", "Equal"),
    20: ("ConstantOfShape",),
    21: ("Identity", "Constant", "Reshape", "Shape", "Size", "Cast", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
         "ConstantOfShape", "Pad"),
    22: ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "HardSigmoid"),
}
SAME_MEANING: dict[tuple[str, int], Callable[[onnx.NodeProto], bool]] = {
    **{(op, v): _always for v, ops in _TYPES_ONLY.items() for op in ops},
    ("Reshape", 14): _without("allowzero"),
    ("Shape", 15): _without("start", "end"),
    ("BatchNormalization", 14): lambda n: _without("training_mode")(n) and len([o for o in n.output if o]) == 1,
    ("Cast", 19): _without("saturate"),
    ("AveragePool", 19): lambda n: all(d == 1 for d in _attr(n, "dilations") or []),  # the default
    ("Pad", 18): lambda n: len([i for i in n.input if i]) <= 3,  # the axes input came at 18
    ("Pad", 19): lambda n: _attr(n, "mode") not in (b"wrap", "wrap"),
}


# attributes an op gained at a version, at their default value when SAME_MEANING lets a node through:
# dropped as it goes back to the older version
ADDED_ATTRIBUTES = {("Reshape", 14): ("allowzero",), ("Shape", 15): ("start", "end"),
                    ("BatchNormalization", 14): ("training_mode",), ("Cast", 19): ("saturate",),
                    ("AveragePool", 19): ("dilations",)}


def _hard_swish(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """HardSwish (opset 14) as the spec defines it: x * HardSigmoid(x; alpha 1/6, beta 0.5) (opset 6)."""
    gate = f"{node.output[0]}__hard_sigmoid"
    return [helper.make_node("HardSigmoid", [node.input[0]], [gate], name=f"{node.name}/HardSigmoid",
                             alpha=1.0 / 6, beta=0.5),
            helper.make_node("Mul", [node.input[0], gate], [node.output[0]], name=f"{node.name}/Mul")]


# ops newer than an older opset, with the exact expansion the spec gives them in older ops: op -> (the
# opset it came in, the nodes that replace it)
EXPANSIONS: dict[str, tuple[int, Callable[[onnx.NodeProto], list[onnx.NodeProto]]]] = {
    "HardSwish": (14, _hard_swish),
}


def _changes(op: str, have: int, target: int) -> list[int] | None:
    """The versions in (target, have] at which `op` changed; None when it does not exist at `target`."""
    out, v = [], have
    while True:
        try:
            since = defs.get_schema(op, v).since_version
        except defs.SchemaError:
            return None
        if since <= target:
            return out
        out.append(since)
        v = since - 1


def parkable(node: onnx.NodeProto, have: int, target: int) -> bool:
    """A default-domain node that means the same at opset `target` as at `have` (see SAME_MEANING), or
    that older ops express exactly (EXPANSIONS)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in EXPANSIONS and target < EXPANSIONS[node.op_type][0]:
        return True
    changes = _changes(node.op_type, have, target)
    return bool(changes) and all(SAME_MEANING.get((node.op_type, v), lambda n: False)(node) for v in changes)


def convert_version(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """`model` at default-domain opset `target` (onnx.version_converter's rules; going down, the nodes
    `parkable` finds are kept as they are rather than refused for want of an adapter). `model` itself
    is left as it was (its nodes are parked in place while the converter, which copies, runs)."""
    from onnx import version_converter

    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    parked = [n for n in model.graph.node if have is not None and target < have and parkable(n, have, target)]
    if not parked:
        return version_converter.convert_version(model, target)
    domains = [n.domain if n.HasField("domain") else None for n in parked]  # proto2: unset is not ""
    for node in parked:
        node.domain = _PARKED
    model.opset_import.append(helper.make_opsetid(_PARKED, 1))
    try:
        converted = version_converter.convert_version(model, target)
    finally:
        for node, domain in zip(parked, domains):
            if domain is None:
                node.ClearField("domain")
            else:
                node.domain = domain
        model.opset_import.pop()
    nodes = []
    for node in converted.graph.node:
        if node.domain != _PARKED:
            nodes.append(node)
            continue
        node.ClearField("domain")
        if node.op_type in EXPANSIONS and target < EXPANSIONS[node.op_type][0]:
            nodes.extend(EXPANSIONS[node.op_type][1](node))
            continue
        added = {a for v in _changes(node.op_type, have, target) or [] for a in ADDED_ATTRIBUTES.get((node.op_type, v), ())}
        kept_attrs = [a for a in node.attribute if a.name not in added]
        del node.attribute[:]
        node.attribute.extend(kept_attrs)
        nodes.append(node)
    del converted.graph.node[:]
    converted.graph.node.extend(nodes)
    kept = [o for o in converted.opset_import if o.domain != _PARKED]
    del converted.opset_import[:]
    converted.opset_import.extend(kept)
    return converted
