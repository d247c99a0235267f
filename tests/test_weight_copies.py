"""The convert path keeps few copies of the weights (VGG-19's 548 MiB peaked at 5.6 GB) and still writes
the same bytes: each lean path is checked against the plain one it replaces, computed here independently."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from sparsecnn.common.onnxio import save_onnx, serialized_parts
from sparsecnn.passes.graph import (Owned, PassResult, frees_input, run_pipeline, set_prune_exclusions, taken,
                                    tensor_nbytes)


def _model_with_every_kind_of_tensor() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32), "w32"),
             numpy_helper.from_array(np.arange(6, dtype=np.float16).reshape(2, 3), "w16"),
             numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape"),
             helper.make_tensor("floats", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])]  # float_data, no raw_data
    node = helper.make_node("MatMul", ["x", "w32"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 300])], initializer=inits,
                              doc_string="doc")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.metadata_props.add(key="sparsecnn.input_spec", value="{}")
    return model


@pytest.mark.parametrize("stream_above", [0, 1 << 20])
def test_streamed_serialisation_is_protobufs_byte_for_byte(monkeypatch, tmp_path, stream_above):
    import sparsecnn.common.onnxio as onnxio

    monkeypatch.setattr(onnxio, "_STREAM_ABOVE", stream_above)  # 0: every tensor's raw data written apart
    model = _model_with_every_kind_of_tensor()
    size, parts = serialized_parts(model)
    expected = model.SerializeToString()
    assert b"".join(parts) == expected and size == len(expected)
    save_onnx(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == expected


@pytest.mark.parametrize("name", ["w32", "w16", "shape", "floats"])
def test_a_tensor_parsed_from_its_buffer_is_the_tensor_of_its_values(name):
    from sparsecnn.common.onnxio import tensor_buffer

    like = next(t for t in _model_with_every_kind_of_tensor().graph.initializer if t.name == name)
    buffer, values = tensor_buffer(like)
    np.testing.assert_array_equal(values, numpy_helper.to_array(like))
    values *= 2  # writable, and what the buffer holds
    parsed = onnx.TensorProto()
    parsed.MergeFromString(buffer)
    assert parsed.SerializeToString() == numpy_helper.from_array(numpy_helper.to_array(like) * 2, name).SerializeToString()


def test_copy_without_initializers_keeps_everything_else():
    from sparsecnn.passes.graph import copy_model_without_initializers

    model = _model_with_every_kind_of_tensor()
    out = copy_model_without_initializers(model)
    assert not out.graph.initializer
    out.graph.initializer.extend(model.graph.initializer)
    assert out.SerializeToString() == model.SerializeToString()


def _reference_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The rule, written plainly: exactly round(s * n) zeros, smallest magnitudes, ties lowest index first."""
    flat = weight.abs().flatten().double()
    n_zero = round(sparsity * flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:n_zero]] = False
    return keep.view_as(weight)


@pytest.mark.parametrize("kind", ["random", "ties at zero", "ties elsewhere", "fp16"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
def test_the_lean_magnitude_mask_follows_the_rule(monkeypatch, kind, sparsity):
    from sparsecnn.passes import masks

    monkeypatch.setattr(masks, "_LEAN_ABOVE", 0)  # every CPU weight takes the lean path
    monkeypatch.setattr(masks, "_CHUNK", 97)      # ties spread over many chunks
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 40, generator=g)
    if kind == "ties at zero":
        w[w.abs() < 0.7] = 0
    elif kind == "ties elsewhere":
        w = torch.round(w * 2) / 2
    elif kind == "fp16":
        w = w.half()
    assert torch.equal(masks.mask_magnitude(w, sparsity), _reference_mask(w, sparsity))


@pytest.mark.parametrize("method", ["2:4", "0.9", "0.7 global"])
def test_pruning_one_initializer_at_a_time_gives_the_masks_applied_to_a_copy(exported, method):
    from sparsecnn.passes.masks import masks_for
    from sparsecnn.passes.prune import prunable_weights, prune_2to4, prune_unstructured

    model = exported("tinyresnet")
    layers = prunable_weights(model)
    weights = {w: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
               for _, w, _ in layers if t.name == w}
    if method == "2:4":
        result = prune_2to4(model)
        masks, _ = masks_for(weights, "2:4", axes={w: a for _, w, a in layers})
    else:
        sparsity, _, scope = method.partition(" ")
        result = prune_unstructured(model, float(sparsity), scope or "layer")
        masks, _ = masks_for(weights, "unstructured", float(sparsity), scope or "layer")
    got = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert [t.name for t in result.model.graph.initializer] == [t.name for t in model.graph.initializer]
    out = {t.name: t for t in result.model.graph.initializer}
    for t in model.graph.initializer:
        want = (weights[t.name] * masks[t.name]).numpy() if t.name in masks else numpy_helper.to_array(t)
        np.testing.assert_array_equal(got[t.name], want)
        if t.name in masks:  # the same bytes as the tensor of the masked array: -0.0 where a negative weight was zeroed
            assert out[t.name].SerializeToString() == numpy_helper.from_array(want, t.name).SerializeToString()
    assert result.counters["pruned"] == len(masks)


def test_a_pipeline_keeps_only_its_last_model(exported):
    from sparsecnn.passes.graph import run_pipeline
    from sparsecnn.passes.prune import prune_2to4, prune_unstructured

    model = exported("tinynet")
    out, results = run_pipeline(model, [(prune_unstructured, {"sparsity": 0.5}), (prune_2to4, {})])
    assert results[0].model is None and results[1].model is out and results[0].counters["pruned"] == 2


def test_export_adds_the_weights_itself_and_can_release_the_modules(monkeypatch):
    import sparsecnn.converter.export as export
    from sparsecnn.models.registry import load_model

    module, spec, entry = load_model("tinyresnet")
    lean = export.export_onnx(module, spec, entry.exclude)
    monkeypatch.setattr(export, "_export_then_weights", lambda *a, **k: None)  # the exporter's own weights
    plain = export.export_onnx(module, spec, entry.exclude)
    assert lean.SerializeToString() == plain.SerializeToString()
    monkeypatch.undo()
    released = export.export_onnx(module, spec, entry.exclude, release=True)
    assert released.SerializeToString() == plain.SerializeToString()
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    moved = [t.name for t in released.graph.initializer if t.name in tensors]
    assert moved and all(tensors[name].numel() == 0 for name in moved)  # each exported weight moved into the model


def _unfolded_tinyresnet(monkeypatch) -> onnx.ModelProto:
    """tinyresnet exported with its BatchNorms (the export pipeline off)."""
    import sparsecnn.converter.export as export
    from sparsecnn.models.registry import load_model

    module, spec, entry = load_model("tinyresnet")
    with monkeypatch.context() as m:
        m.setattr(export, "EXPORT_PIPELINE", [])
        return export.export_onnx(module, spec, entry.exclude)


@pytest.mark.parametrize("rewrite", ["csr_rewrite", "fold_bn"])
def test_graphsurgeon_export_holding_the_weights_back_writes_the_same_model(exported, monkeypatch, rewrite):
    """Held back: imported constants (csr_rewrite keeps most weights) and arrays a pass made (CSR's arrays,
    fold_bn's folded weights)."""
    import onnx_graphsurgeon as gs

    import sparsecnn.passes.graph as graph
    from sparsecnn.passes.csr.rewrite import csr_rewrite
    from sparsecnn.passes.fold_bn import fold_bn
    from sparsecnn.passes.prune import prune_unstructured

    if rewrite == "csr_rewrite":
        model, run = prune_unstructured(exported("tinyresnet"), 0.9).model, csr_rewrite
    else:
        model, run = _unfolded_tinyresnet(monkeypatch), fold_bn
    with monkeypatch.context() as m:
        m.setattr(graph, "_HOLD_ABOVE", 0)  # every constant held back and copied in afterwards
        held = run(model).model.SerializeToString()
    with monkeypatch.context() as m:
        m.setattr(graph, "_export_holding_weights", lambda g: gs.export_onnx(g, do_type_check=True))
        plain = run(model).model.SerializeToString()
    assert held == plain


def test_passes_with_nothing_to_do_return_their_input(exported):
    from sparsecnn.passes.fold_bn import fold_bn, inline_constant_identities

    model = exported("tinynet")  # BatchNorm folded already, no Identity left
    assert fold_bn(model).model is model and inline_constant_identities(model).model is model


def _two_matmuls() -> onnx.ModelProto:
    """x[1, 6] @ odd[6, 64] @ w32[64, 300]: `odd` in float_data with 6 input rows (2:4 leaves it as it is)."""
    rng = np.random.default_rng(1)
    inits = [helper.make_tensor("odd", onnx.TensorProto.FLOAT, [6, 64], rng.standard_normal(6 * 64).tolist()),
             numpy_helper.from_array(rng.standard_normal((64, 300)).astype(np.float32), "w32"),
             numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "odd"], ["h"], name="mm0"),
             helper.make_node("MatMul", ["h", "w32"], ["y"], name="mm1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 300])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_prune_exclusions(model, [])  # both layers prunable (stem and head otherwise)
    return model


@pytest.mark.parametrize("prune", ["0.5", "2:4"])
def test_prune_of_an_owned_model_writes_the_same_bytes(prune):
    """A model handed to the pipeline `Owned` is read out and freed before the output is built (split_raw,
    tensor_buffer on the values read): the output is the plain pass's byte for byte, a float_data weight
    and a layer 2:4 leaves as it is included."""
    from sparsecnn.passes.prune import prune_pipeline

    model = _two_matmuls()
    plain, _ = run_pipeline(model, prune_pipeline(prune))
    owned, results = run_pipeline(Owned(_two_matmuls()), prune_pipeline(prune))
    assert owned.SerializeToString() == plain.SerializeToString()
    assert model.SerializeToString() == _two_matmuls().SerializeToString()  # the plain pass left its input as is
    assert results[0].counters["pruned"] == (1 if prune == "2:4" else 2)


def test_an_owned_model_is_given_to_a_pass_that_frees_it_and_taken_for_any_other():
    seen = []

    def frees(model):
        seen.append(type(model).__name__)
        return PassResult(taken(model))

    def keeps(model):
        seen.append(type(model).__name__)
        return PassResult(model)

    model = _two_matmuls()
    out, _ = run_pipeline(Owned(model), [(frees_input(frees), {}), (keeps, {})])
    assert out is not None and seen == ["Owned", "ModelProto"]
    out, _ = run_pipeline(Owned(model), [(keeps, {})])
    assert seen[-1] == "ModelProto" and run_pipeline(Owned(model), [])[0] is model


_CONVERT_PEAK = """
import sys

import torch
from torch import nn

from sparsecnn.converter.cli import main
from sparsecnn.models.registry import MODELS, InputSpec, ModelEntry


class Tail(nn.Module):  # VGG's shape: most weights in wide fc layers, the largest last (fc3: 64 of 112 MiB)
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(2048, 2048), nn.Linear(2048, 4096), nn.Linear(4096, 4096)
        self.head = nn.Linear(4096, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x)).flatten(1)
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


MODELS["tail"] = ModelEntry("tail", "", Tail, InputSpec(3, 8, 8, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10),
                            exclude=("stem", "head"), classifier="head")


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


assert main(["convert", "tinynet", "--prune", "0.9", "-o", sys.argv[1] + "/warm.onnx"]) == 0  # the lazy imports
floor = status("VmRSS")
assert main(["convert", "tail", "--prune", "0.9", "-o", sys.argv[1] + "/tail.onnx"]) == 0
print(status("VmHWM") - floor)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_convert_peaks_within_two_models(tmp_path):
    """`convert` in a fresh process: its peak RSS above the imports stays under 2.35x the weights (the dense
    model and its weights read out of it, or the pruned one: 2.1 to 2.2x here). Before the prune pass built each
    layer in a buffer protobuf parses in place, largest first, it peaked at 3.6x; before it freed the dense
    model once its weights were read (`Owned`), 2.4 to 2.6x (the dense model, and the largest layer twice)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CONVERT_PEAK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    weights = sum(tensor_nbytes(t) for t in onnx.load(str(tmp_path / "tail.onnx")).graph.initializer)
    assert weights > 100 * 2**20
    assert peak < 2.35 * weights, f"peak {peak / 2**20:.0f} MiB above the imports, {peak / weights:.2f}x the weights"
