"""What every pass shares: the result type, the post-pass checks, graph import/export.

A pass is `fn(model: onnx.ModelProto, **options) -> PassResult`; a pipeline is an explicit
list of (pass, options) pairs run in order, with the model checked after each one. A failure
names the pass and the passes before it; SPARSECNN_DUMP_PASSES=DIR (or `dump_dir`) writes the
model before the first pass and after each one.

Passes that change the graph's structure (fold_bn, csr_rewrite, rewrite_2to4, fuse_ecr) edit it
through onnx-graphsurgeon (`import_graph`, edit, `export_graph`); those that only change values
or types in place (prune, to_fp16) edit the proto.
"""
from __future__ import annotations

import gc
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from ..common.errors import UserError
from ..common.memory import trim_heap
from ..common.onnxio import copy_fields, save_onnx, skeleton, tensor_nbytes

SPARSECNN_DOMAIN = "sparsecnn"
SPARSECNN_OPSET = 1
PRUNE_EXCLUDE_KEY = "sparsecnn.prune_exclude"
STANDARD_DOMAINS = ("", "ai.onnx", None)  # the default ONNX domain: "" or "ai.onnx" in protos, None in graphsurgeon


@dataclass
class PassResult:
    """A pass's output. A pass never edits the model it was given; one with nothing to change may
    return that model itself rather than a copy (a copy of VGG-19 is 548 MiB)."""
    model: onnx.ModelProto
    counters: Counter = field(default_factory=Counter)
    name: str = ""

    def summary(self) -> str:
        items = ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items()))
        return f"{self.name}: {items or 'no changes'}"


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy: a pass never edits the model it was given."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def copy_model_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of everything but the graph's initializers: a pass that rewrites weights adds them
    one at a time, so the input and its copy are each in memory once, not twice over."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip={"graph"})
    copy_fields(model.graph, out.graph, skip={"initializer"})
    return out


def node_attrs(node: onnx.NodeProto) -> dict:
    """{attribute name: value} of an ONNX node (onnx.helper's decoding)."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def inferred_value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """ValueInfo of every tensor ONNX shape inference reaches, inferred on the skeleton (weights
    as typed inputs, so hundreds of MB are not serialised). If inference fails, the model's own
    infos: shapes help passes and op builders, none requires them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:
        inferred = model
    g = inferred.graph
    return {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}


def static_shapes(model: onnx.ModelProto, unknown=None) -> dict[str, list]:
    """Dims of every tensor with a known rank; `unknown` where a dim is symbolic."""
    out = {}
    for name, vi in inferred_value_infos(model).items():
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[name] = [d.dim_value if d.HasField("dim_value") else unknown for d in t.shape.dim]
    return out


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker and strict shape inference; a failure here is a bug in the pass."""
    light = skeleton(model)
    onnx.checker.check_model(light)
    onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)


class Owned:
    """A model handed to `run_pipeline` by a caller that keeps no other reference to it.

    upb keeps a model's weights in one arena, freed only with the last reference to any part of it,
    and every read of a weight is a copy: a pass that edits weights holds its input whole beside its
    output, plus the layer it is editing twice over. A pass marked `frees_input` (prune) may take an
    owned input (`take()`), read its weights out and drop it before it builds its output: two copies
    of the weights at most, not two plus the largest layer twice (VGG-19's fc6: 784 MiB).
    """

    def __init__(self, model: onnx.ModelProto):
        self.model: onnx.ModelProto | None = model

    def take(self) -> onnx.ModelProto:
        model, self.model = self.model, None
        if model is None:
            raise RuntimeError("an owned model is taken once")
        return model


def frees_input(fn):
    """Mark a pass that accepts an `Owned` model and frees it once it has read what it needs."""
    fn.frees_input = True
    return fn


def taken(model) -> onnx.ModelProto:
    """The model itself, whether handed over `Owned` or not (for passes that cannot free it early)."""
    return model.take() if isinstance(model, Owned) else model


Pass = Callable[..., PassResult]
DUMP_ENV = "SPARSECNN_DUMP_PASSES"
_pipeline_runs = itertools.count()  # numbers each run's dump files, so nested pipelines do not overwrite


class PassError(RuntimeError):
    """A pass (or the check after it) failed on a model: a bug, raised with the original as __cause__."""


def pass_name(fn: Pass) -> str:
    """A pass's function name (looking through functools.partial)."""
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or repr(fn)


def run_pipeline(model: onnx.ModelProto | Owned, pipeline: Iterable[tuple[Pass, dict]],
                 dump_dir: str | os.PathLike | None = None) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the passes in order, checking the model after each. The results keep their counters; only
    the last keeps its model (the one returned), so a pipeline holds at most two models at a time.
    An `Owned` model goes to the first pass as it is when that pass `frees_input`, so the pipeline
    holds no reference to it; any other pass gets the model itself.

    An exception in a pass or its check becomes a `PassError` naming the pass and those run
    before it (torch.fx's wording); a `UserError` stays one (a line for the user) and gains
    the pass's name. dump_dir (default: $SPARSECNN_DUMP_PASSES) receives the model before the
    first pass and after each pass, as <run>-<step>-<pass>.onnx, for debugging a pipeline.
    """
    dump_dir = dump_dir or os.environ.get(DUMP_ENV) or None
    run = next(_pipeline_runs)
    handed, model = (model, None) if isinstance(model, Owned) else (None, model)
    if dump_dir:
        _dump(handed.model if handed is not None else model, dump_dir, run, 0, "input")
    results, done = [], []
    for step, (fn, options) in enumerate(pipeline, 1):
        name = pass_name(fn)
        if handed is not None and not getattr(fn, "frees_input", False):
            model, handed = handed.take(), None
        try:
            if handed is not None:  # the pass takes it; no reference is left here
                given, handed = handed, None
                res = fn(given, **options)
                del given
            else:
                res = fn(model, **options)
            res.name = res.name or name
            check_model(res.model)
        except UserError as exc:
            raise UserError(f"{exc} (in the '{name}' pass)") from exc
        except Exception as exc:
            raise PassError(f"An error occurred when running the '{name}' pass after the following passes: "
                            f"{done}") from exc
        if dump_dir:
            _dump(res.model, dump_dir, run, step, name)
        if results:  # only the last model lives on (it is returned): one copy per pass would pile up
            results[-1].model = None
        gc.collect()  # a graphsurgeon graph is a web of cycles holding its input model's tensors: free it now
        trim_heap()
        results.append(res)
        done.append(name)
        model = res.model
    if handed is not None:  # no pass ran
        model = handed.take()
    return model, results


def _dump(model: onnx.ModelProto, folder: str | os.PathLike, run: int, step: int, name: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_onnx(model, Path(folder) / f"{run:03d}-{step:02d}-{name}.onnx")


# --- graph helpers -----------------------------------------------------------------------

def import_graph(model: onnx.ModelProto):
    import onnx_graphsurgeon as gs

    return gs.import_onnx(model)


def export_graph(graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the original's metadata, IR version and opsets."""
    import onnx_graphsurgeon as gs

    graph.cleanup().toposort()
    opsets = {o.domain: o.version for o in like.opset_import}
    uses_custom = any(n.domain == SPARSECNN_DOMAIN for n in graph.nodes)
    if uses_custom:
        opsets[SPARSECNN_DOMAIN] = SPARSECNN_OPSET
    out = _export_holding_weights(graph)
    del out.opset_import[:]
    for domain, version in opsets.items():
        out.opset_import.add(domain=domain, version=version)
    out.ir_version = like.ir_version
    out.producer_name = like.producer_name or "sparsecnn"
    out.producer_version, out.domain, out.model_version = like.producer_version, like.domain, like.model_version
    out.doc_string = like.doc_string
    out.metadata_props.extend(like.metadata_props)
    return out


_HOLD_ABOVE = 1 << 16  # bytes: constants larger than this skip graphsurgeon's copies
_DATA_FIELDS = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"}


def _export_holding_weights(graph) -> onnx.ModelProto:
    """gs.export_onnx, with each large constant copied into the output once: one still as imported
    (LazyValues over a TensorProto of the input model) or an array a pass made (fold_bn's weights).
    graphsurgeon copies every initializer into a GraphProto, then that into the model, an array's
    bytes first: three models in memory at its peak (VGG-19: 1.6 GB on top of the input). They go
    out as headers (name, type, dims, no data) and are filled afterwards."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
    from onnx_graphsurgeon.ir.tensor import LazyValues

    held = {}
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant):
            continue
        if isinstance(t._values, LazyValues) and isinstance(t._values.tensor, onnx.TensorProto) and \
                tensor_nbytes(t._values.tensor) > _HOLD_ABOVE:
            header = onnx.TensorProto()
            copy_fields(t._values.tensor, header, skip=_DATA_FIELDS)
        elif isinstance(t._values, np.ndarray) and t._values.nbytes > _HOLD_ABOVE and t.data_location is None and \
                t.export_dtype == t.dtype:  # graphsurgeon's own path converts dtypes: leave those to it
            header = onnx.TensorProto(name=t.name, data_type=dtype_to_onnx(t.dtype), dims=t.shape)
        else:
            continue
        held[t.name] = (t, t._values)
        t._values = LazyValues(header)
    try:
        out = gs.export_onnx(graph, do_type_check=True)
    finally:
        for t, values in held.values():
            t._values = values
    for init in out.graph.initializer:
        if init.name in held:
            t, values = held[init.name]
            if isinstance(values, np.ndarray):
                init.raw_data = values.tobytes()  # graphsurgeon's bytes, made one tensor at a time
            else:
                init.CopyFrom(values.tensor)
                init.name = t.name
    return out


def set_tensor_info(tensor, info: onnx.ValueInfoProto) -> None:
    """Give a graphsurgeon Variable the dtype and shape of `info` (custom ops have no shape inference)."""
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    declared = OnnxImporter.import_tensor(info)
    tensor.dtype, tensor.shape = declared.dtype, declared.shape


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weight_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, int]]:
    """Conv / Gemm / MatMul nodes with a constant weight: (node, weight name, input-channel axis).

    The input-channel axis is the one a 2:4 pattern and a GEMM view's K dimension run along:
    axis 1 of a Conv weight [Cout, Cin/g, kh, kw] and of a Gemm weight with transB=1
    [out, in]; axis 0 of a MatMul or transB=0 Gemm weight [in, out].
    """
    inits = initializer_map(model)
    found = []
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            continue
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            found.append((node, node.input[1], 1))
        elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            found.append((node, node.input[1], 1 if trans_b else 0))
        elif node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            if len(inits[node.input[1]].dims) == 2:
                found.append((node, node.input[1], 0))
    return found


def dense_only_weight_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """Weight layers no runtime has a sparse kernel for (ConvTranspose): never pruned, since pruning them
    would cost accuracy and buy no time; the layer reports list them as dense, with that reason."""
    inits = initializer_map(model)
    return [(node, node.input[1]) for node in model.graph.node
            if node.domain in STANDARD_DOMAINS and node.op_type == "ConvTranspose"
            and len(node.input) > 1 and node.input[1] in inits]


def default_exclusions(model: onnx.ModelProto) -> list[str]:
    """Weights left dense when nothing says otherwise: stems and heads (`stem_and_head_roles`).

    Registry models carry explicit lists; this rule serves foreign ONNX files.
    """
    return list(stem_and_head_roles(model))


def stem_and_head_roles(model: onnx.ModelProto) -> dict[str, str]:
    """{weight: "stem" | "head"} for the weight layers at the network's ends.

    A stem is a weight layer reading a graph input directly; a head is one whose output
    reaches a graph output without passing another weight layer (classifiers, detection
    heads). Both are what pruning leaves dense by default; the layer report names the rule.
    """
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Keyed by output name: protobuf hands out fresh wrapper objects, so id() is not stable.
    weight_node_outputs = {n.output[0] for n, _, _ in weight_nodes(model)}

    def reaches_output(tensor: str, seen: set[str]) -> bool:
        if tensor in graph_outputs:
            return True
        if tensor in seen:
            return False
        seen.add(tensor)
        for c in consumers.get(tensor, []):
            if c.output[0] in weight_node_outputs:
                continue
            if any(reaches_output(o, seen) for o in c.output):
                return True
        return False

    roles = {}
    for node, weight, _ in weight_nodes(model):
        if node.input[0] in graph_inputs:
            roles[weight] = "stem"
        elif any(reaches_output(o, set()) for o in node.output):
            roles[weight] = "head"
    return roles


def prune_exclusions(model: onnx.ModelProto) -> list[str]:
    """The weights the model's own metadata (written at export) says to leave dense."""
    for prop in model.metadata_props:
        if prop.key == PRUNE_EXCLUDE_KEY:
            return list(json.loads(prop.value))
    return default_exclusions(model)


def set_prune_exclusions(model: onnx.ModelProto, weights: list[str]) -> None:
    for prop in list(model.metadata_props):
        if prop.key == PRUNE_EXCLUDE_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=PRUNE_EXCLUDE_KEY, value=json.dumps(sorted(weights)))


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array.astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)), name))
            return
    raise KeyError(name)


def node_label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def require_no_unknown_ops(model: onnx.ModelProto, known: set[tuple[str, str]]) -> None:
    for node in model.graph.node:
        key = (node.domain or "", node.op_type)
        if key not in known:
            dom = f"{node.domain}::" if node.domain else ""
            raise UserError(f"node '{node_label(node)}' uses op {dom}{node.op_type}, which sparsecnn "
                            "cannot run; supported ops are listed by `sparsecnn inspect --ops`")
