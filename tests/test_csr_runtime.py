"""The CSR rewrite pass, the reference CsrConv / CsrGemm ops and the `csr` runtime on CPU
(reference ops, and the kernel path through the CPU emulator); GPU tests at the end."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import cuda_emu
from helpers import input_shape, ort_run, rel_err
from sparsecnn.passes.csr.rewrite import csr_rewrite
from sparsecnn.passes.graph import SPARSECNN_DOMAIN, check_model, run_pipeline, set_prune_exclusions
from sparsecnn.passes.prune import prune_unstructured
from sparsecnn.runtimes import get_runtime

emu = pytest.mark.skipif(not cuda_emu.available(), reason="g++ not installed (the CPU kernel emulator needs it)")


def conv_model(w: np.ndarray, x_shape, bias=None, relu=False, **attrs):
    inits = [numpy_helper.from_array(w.astype(np.float32), "conv.weight")]
    ins = ["x", "conv.weight"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "conv.bias"))
        ins.append("conv.bias")
    nodes = [helper.make_node("Conv", ins, ["c"], name="conv", **attrs)]
    out = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        out = "r"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    set_prune_exclusions(model, [])  # a one-layer model: its conv is not a stem to leave dense
    return onnx.shape_inference.infer_shapes(model)


def masked_weight(shape, density, seed, empty_rows=(0,)):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * (rng.random(shape) < density)
    for r in empty_rows:
        w[r] = 0
    return w.astype(np.float32)


@pytest.mark.parametrize("kshape,attrs", [
    ((3, 3), dict(pads=[1, 1, 1, 1])),
    ((3, 3), dict(strides=[2, 2], pads=[0, 1, 1, 0])),
    ((3, 3), dict(dilations=[2, 2], pads=[2, 2, 2, 2])),
    ((1, 1), dict()),
    ((1, 1), dict(strides=[2, 2])),
    ((5, 3), dict(strides=[1, 2], pads=[2, 1, 2, 1])),
])
@pytest.mark.parametrize("relu,bias", [(False, False), (True, True)])
def test_reference_csr_conv_matches_conv2d_on_the_masked_weight(kshape, attrs, relu, bias):
    w = masked_weight((11, 5, *kshape), 0.2, seed=sum(kshape), empty_rows=(0, 7))
    b = np.random.default_rng(1).standard_normal(11).astype(np.float32) if bias else None
    model = conv_model(w, (2, 5, 13, 9), b, relu, kernel_shape=list(kshape), **attrs)
    sparse, results = run_pipeline(model, [(csr_rewrite, {})])
    assert results[0].counters["conv_csr"] == 1 and results[0].counters["relu_fused"] == int(relu)
    assert [n.op_type for n in sparse.graph.node] == ["CsrConv"]
    x = torch.randn(2, 5, 13, 9)
    y = get_runtime("torch").compile(sparse, "cpu", {})(x)[0]
    pads = attrs.get("pads", [0, 0, 0, 0])
    ref = F.conv2d(F.pad(x, (pads[1], pads[3], pads[0], pads[2])), torch.from_numpy(w),
                   None if b is None else torch.from_numpy(b), attrs.get("strides", 1), 0, attrs.get("dilations", 1))
    if relu:
        ref = torch.relu(ref)
    assert y.shape == ref.shape and rel_err(y, ref) <= 1e-5


def test_csr_initializers_hold_the_weight_compressed_and_swizzled():
    w = masked_weight((6, 4, 3, 3), 0.3, seed=3, empty_rows=(2,))
    model = conv_model(w, (1, 4, 8, 8), pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    sparse = csr_rewrite(model).model
    t = {i.name: numpy_helper.to_array(i) for i in sparse.graph.initializer}
    assert "conv.weight" not in t
    values, cols, rp, order = (t[f"conv.weight.csr.{k}"] for k in ("values", "col_idx", "row_ptr", "row_order"))
    assert cols.dtype == np.uint16 and rp.dtype == np.int32 and values.dtype == np.float32
    dense = np.zeros((6, 36), np.float32)
    for r in range(6):
        dense[r, cols[rp[r]:rp[r + 1]]] = values[rp[r]:rp[r + 1]]
    np.testing.assert_array_equal(dense, w.reshape(6, 36))
    lengths = np.diff(rp)
    assert list(lengths[order]) == sorted(lengths, reverse=True) and order[-1] == 2
    node = sparse.graph.node[0]
    assert node.domain == SPARSECNN_DOMAIN and {o.domain for o in sparse.opset_import} >= {"", SPARSECNN_DOMAIN}
    assert csr_rewrite(model, index_dtype="int32").model.graph.initializer[1].data_type == TensorProto.INT32


def test_layers_that_do_not_pay_or_cannot_be_expressed_stay_dense_with_reasons():
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    inits = [numpy_helper.from_array(masked_weight((4, 4, 3, 3), 0.1, 1), "sparse.weight"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "full.weight"),
             numpy_helper.from_array(masked_weight((4, 2, 3, 3), 0.1, 2), "grouped.weight")]
    nodes = [helper.make_node("Conv", ["x", "sparse.weight"], ["a"], pads=[1] * 4),
             helper.make_node("Conv", ["a", "full.weight"], ["b"], pads=[1] * 4),
             helper.make_node("Conv", ["b", "grouped.weight"], ["c"], pads=[1] * 4, group=2),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    set_prune_exclusions(model, [])
    res = csr_rewrite(model, max_density=0.3, exclude=[])
    assert dict(res.counters) == {"conv_csr": 1, "dense_too_dense": 1, "dense_grouped": 1}
    assert [n.op_type for n in res.model.graph.node] == ["CsrConv", "Conv", "Conv", "Relu"]
    assert csr_rewrite(model, exclude=["sparse"]).counters["dense_excluded"] == 1


class _ConvBnStack(torch.nn.Module):
    """Three conv + BatchNorm layers of equal width: fresh, their folded biases are all zero."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 8, 3, padding=1, bias=False) for c in (3, 8, 8))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(8) for _ in range(3))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return x.mean((2, 3))


def test_a_torch_exported_file_whose_biases_sit_behind_identity_nodes_goes_csr(tmp_path):
    """torch's exporter folds BatchNorm in eval mode and deduplicates the equal (zero) biases behind
    Identity nodes; loading the file inlines them, or the rewrite sees no constant bias and keeps the
    conv dense (ResNet-50 from torchvision kept 47 of 53 convs dense so)."""
    from sparsecnn.converter.source import load_source

    path = tmp_path / "stack.onnx"
    torch.onnx.export(_ConvBnStack().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    assert sum(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node) == 2  # the file as torch writes it
    model = load_source(str(path), quiet=True).model
    assert not any(n.op_type == "Identity" for n in model.graph.node)
    set_prune_exclusions(model, [])
    pruned, _ = run_pipeline(model, [(prune_unstructured, {"sparsity": 0.9})])
    res = csr_rewrite(pruned)
    assert dict(res.counters) == {"conv_csr": 3, "relu_fused": 3}


def test_the_api_readies_a_notebooks_modelproto_as_load_source_readies_a_file(tmp_path):
    from sparsecnn.converter.api import prune

    path = tmp_path / "stack.onnx"
    torch.onnx.export(_ConvBnStack().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    pruned = prune(onnx.load(str(path)), "0.9", input_shape=[3, 8, 8], scale=1 / 255)
    assert not any(n.op_type == "Identity" for n in pruned.onnx.graph.node)
    # stem and last conv dense by the prune rules; the middle one's bias sat behind an Identity
    assert dict(csr_rewrite(pruned.onnx).counters) == {"dense_excluded": 2, "conv_csr": 1, "relu_fused": 1}


def block_model(extra_consumer=(), graph_output=(), broadcast=False, shortcut_first=False, ws=None):
    """A ResNet block with a projection shortcut: y = relu(conv_b(relu(conv_a(x))) + conv_s(x)).
    shortcut_first: conv_s comes before conv_b in the node list (so conv_b is the later one);
    extra_consumer: these convs' outputs ("b", "s") also feed other nodes; graph_output: they are
    graph outputs too; broadcast: the shortcut is [2, 6, 1, 1] (a broadcast Add)."""
    ws = ws or [masked_weight(s, 0.25, seed=i) for i, s in enumerate([(6, 4, 3, 3), (6, 6, 3, 3), (6, 4, 1, 1)])]
    inits = [numpy_helper.from_array(w, n) for w, n in zip(ws, ["a.weight", "b.weight", "s.weight"])]
    inits.append(numpy_helper.from_array(np.linspace(-1, 1, 6).astype(np.float32), "b.bias"))
    conv_a = helper.make_node("Conv", ["x", "a.weight"], ["a"], name="a", pads=[1] * 4)
    relu_a = helper.make_node("Relu", ["a"], ["ra"], name="relu_a")
    conv_b = helper.make_node("Conv", ["ra", "b.weight", "b.bias"], ["b"], name="b", pads=[1] * 4)
    if broadcast:
        conv_s = helper.make_node("Conv", ["x", "s.weight"], ["s0"], name="s")
        shortcut = [conv_s, helper.make_node("ReduceMean", ["s0"], ["s"], axes=[2, 3], keepdims=1, name="pool")]
    else:
        shortcut = [helper.make_node("Conv", ["x", "s.weight"], ["s"], name="s")]
    add = helper.make_node("Add", ["b", "s"], ["sum"], name="add")
    relu = helper.make_node("Relu", ["sum"], ["y"], name="relu")
    nodes = [conv_a, relu_a] + (shortcut + [conv_b] if shortcut_first else [conv_b] + shortcut) + [add, relu]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    for t in extra_consumer:
        nodes.append(helper.make_node("Neg", [t], [f"neg_{t}"], name=f"neg_{t}"))
        outputs.append(helper.make_tensor_value_info(f"neg_{t}", TensorProto.FLOAT, None))
    for t in graph_output:
        outputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 9])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    set_prune_exclusions(model, [])
    return onnx.shape_inference.infer_shapes(model), ws


@pytest.mark.parametrize("shortcut_first", [False, True])
def test_rewrite_fuses_the_blocks_add_and_relu_into_the_later_conv(shortcut_first):
    model, (wa, wb, ws) = block_model(shortcut_first=shortcut_first)
    sparse, res = run_pipeline(model, [(csr_rewrite, {})])
    assert dict(res[0].counters) == {"conv_csr": 3, "relu_fused": 2, "residual_fused": 1}
    assert [n.op_type for n in sparse.graph.node] == ["CsrConv"] * 3
    nodes = {n.name: n for n in sparse.graph.node}
    later, earlier = ("b", "s") if shortcut_first else ("s", "b")
    fused = nodes[later]
    assert len(fused.input) == 7 and fused.input[6] == nodes[earlier].output[0] and fused.output[0] == "y"
    assert list(sparse.graph.node).index(fused) == 2  # after the residual's producer
    assert {a.name: a.i for a in fused.attribute}["relu"] == 1
    if later == "s":
        assert fused.input[5] == ""  # no bias on the shortcut conv: an empty optional input before R
    # the reference op: conv(x) + bias + residual, ReLU; against F.conv2d + add + relu on the masked weights
    x = torch.randn(2, 4, 7, 9)
    bias = torch.linspace(-1, 1, 6)
    ref = torch.relu(F.conv2d(torch.relu(F.conv2d(x, torch.from_numpy(wa), padding=1)), torch.from_numpy(wb), bias,
                              padding=1) + F.conv2d(x, torch.from_numpy(ws)))
    for rt in ("torch", "csr"):
        assert rel_err(get_runtime(rt).compile(sparse, "cpu", {})(x)[0], ref) <= 1e-5, rt


@pytest.mark.parametrize("case", [{"extra_consumer": ("b", "s")}, {"graph_output": ("b", "s")}, {"broadcast": True},
                                  {"extra_consumer": ("b",), "shortcut_first": True}])
def test_rewrite_never_fuses_an_add_into_a_conv_whose_output_is_needed_elsewhere(case):
    model, _ = block_model(**case)
    sparse, res = run_pipeline(model, [(csr_rewrite, {})])
    c = res[0].counters
    ops = [n.op_type for n in sparse.graph.node]
    if case.get("shortcut_first"):
        # conv_b is the later conv but its output is needed elsewhere: conv_s absorbs the Add,
        # with conv_b's output as its residual
        assert c["residual_fused"] == 1 and c["relu_fused"] == 2 and "Add" not in ops
        fused = next(n for n in sparse.graph.node if n.name == "s")
        assert fused.input[6] == "b" and ops.index("CsrConv", 2) > ops.index("Neg") - 2
    else:
        assert c["conv_csr"] == 3 and c["residual_fused"] == 0 and c["relu_fused"] == 1  # conv_a's Relu only
        assert "Add" in ops
        assert c["residual_not_fused_broadcast"] == int("broadcast" in case)
    x = np.random.default_rng(4).standard_normal((2, 4, 7, 9)).astype(np.float32)
    outs = get_runtime("csr").compile(sparse, "cpu", {})(torch.from_numpy(x))
    for a, b in zip(outs, ort_run(model, x)):
        assert rel_err(a, b) <= 1e-5


def test_fuse_option_off_keeps_the_add():
    model, _ = block_model()
    rt = get_runtime("csr")
    on = rt.rewrite(model, {})
    off = rt.rewrite(model, {"csr_fuse": False})
    assert "Add" not in [n.op_type for n in on.graph.node]
    assert [n.op_type for n in off.graph.node] == ["CsrConv", "CsrConv", "CsrConv", "Add", "Relu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_csr_conv_adds_the_residual_before_the_relu(dtype):
    from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
    from sparsecnn.passes.csr.reference import reference_csr_conv

    w = torch.from_numpy(masked_weight((6, 4, 3, 3), 0.3, seed=8))
    csr = csr_from_dense(gemm_view(w))
    x = torch.randn(2, 4, 7, 9).to(dtype)
    r = (2 * torch.randn(2, 6, 4, 5)).to(dtype)
    bias = torch.randn(6)
    y = reference_csr_conv(x, csr.values, csr.col_idx.long(), csr.row_ptr.long(), 6, 4, (3, 3), (2, 2), (1, 1, 1, 1),
                           (1, 1), bias, True, r)
    ref = torch.relu(F.conv2d(x.float(), w.to(dtype).float(), bias, 2, 1) + r.float())
    assert y.dtype == dtype and rel_err(y.float(), ref) <= (1e-5 if dtype == torch.float32 else 2e-3)
    assert (ref == 0).any() and (ref > 0).any()  # the ReLU clips some sums: its place after the add matters


@pytest.mark.parametrize("trans_b,bias_shape,relu", [(1, [7], True), (0, [1, 7], False)])
def test_reference_csr_gemm_matches_linear(trans_b, bias_shape, relu):
    w = masked_weight((7, 20), 0.2, 5)  # [out, in]
    b = np.random.default_rng(2).standard_normal(bias_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w if trans_b else np.ascontiguousarray(w.T), "fc.weight"),
             numpy_helper.from_array(b, "fc.bias")]
    nodes = [helper.make_node("Gemm", ["a", "fc.weight", "fc.bias"], ["g"], transB=trans_b)]
    out = "g"
    if relu:
        nodes.append(helper.make_node("Relu", ["g"], ["y"]))
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 20])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [3, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    set_prune_exclusions(model, [])
    sparse, res = run_pipeline(model, [(csr_rewrite, {})])
    assert res[0].counters["gemm_csr"] == 1 and res[0].counters["relu_fused"] == int(relu)
    a = torch.randn(3, 20)
    ref = F.linear(a, torch.from_numpy(w), torch.from_numpy(b).reshape(-1))
    y = get_runtime("torch").compile(sparse, "cpu", {})(a)[0]
    assert rel_err(y, torch.relu(ref) if relu else ref) <= 1e-5


def test_resnet18_at_90_percent_sparse_onnx_is_under_a_quarter_of_dense(exported):
    dense = exported("resnet18")
    sparse, res = run_pipeline(prune_unstructured(dense, 0.9).model, [(csr_rewrite, {})])
    check_model(sparse)
    # 8 blocks: conv1 -> Relu, and conv2 or the downsample (the later one) -> Add -> Relu
    assert dict(res[0].counters) == {"conv_csr": 19, "dense_excluded": 2, "relu_fused": 16, "residual_fused": 8}
    assert not any(n.op_type == "Add" for n in sparse.graph.node)
    assert len(sparse.SerializeToString()) <= 0.25 * len(dense.SerializeToString())


@pytest.mark.parametrize("name", ["tinyresnet", "tinynet_odd"])
def test_csr_runtime_on_cpu_reproduces_onnxruntime(exported, name):
    rt = get_runtime("csr")
    pruned = prune_unstructured(exported(name), 0.9).model
    sparse = rt.rewrite(pruned, {})
    assert any(n.op_type == "CsrConv" for n in sparse.graph.node)
    if name == "tinyresnet":  # every residual Add went into a CsrConv
        assert not any(n.op_type == "Add" for n in sparse.graph.node)
        assert sum(len(n.input) == 7 for n in sparse.graph.node if n.op_type == "CsrConv") == 3
    x = np.random.default_rng(0).standard_normal(input_shape(pruned, 2)).astype(np.float32)
    engine = rt.compile(sparse, "cpu", {})
    assert rel_err(engine(torch.from_numpy(x))[0], ort_run(pruned, x)[0]) <= 1e-4
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert rows and all(r["format"] == "csr" and 0.85 < r["sparsity"] < 0.95 for r in rows)


@emu
def test_kernel_path_of_the_runtime_through_the_emulator_reproduces_onnxruntime(exported):
    from sparsecnn.runtimes.csr.runtime import compile_with_backend

    pruned = prune_unstructured(exported("tinyresnet"), 0.9).model
    sparse = get_runtime("csr").rewrite(pruned, {})
    x = np.random.default_rng(1).standard_normal(input_shape(pruned, 2)).astype(np.float32)
    ref = ort_run(pruned, x)[0]
    backend = cuda_emu.EmuBackend()
    engine = compile_with_backend(sparse, "cpu", {"csr_decide": "sparse", "csr_autotune": False}, backend=backend)
    assert rel_err(engine(torch.from_numpy(x))[0], ref) <= 1e-4
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert len(rows) == 8 and all(r["format"] == "csr" and r["kernel"].startswith("csr::csr_conv") for r in rows)
    assert sum(r["residual_fused"] is True for r in rows) == 3 and not any(r["op"] == "Add" for r in engine.report())
    # a reloaded engine takes its saved per-layer configs instead of tuning again
    state = engine.full_state()
    assert set(state["choices"]) == {r["name"] for r in rows}
    again = compile_with_backend(sparse, "cpu", {"csr_decide": "measure"}, state=state, backend=backend)
    assert [r.get("config") for r in again.report()] == [r.get("config") for r in engine.report()]
    assert all("candidates" not in r for r in again.report())
    # fp32 weights: the CSR buffers of 90 %-sparse layers instead of their dense weights
    assert engine.weight_bytes() < 0.5 * get_runtime("torch").compile(pruned, "cpu", {}).weight_bytes()


@emu
def test_tuner_times_sparse_and_dense_with_the_fused_residual_and_engines_round_trip(exported, tmp_path, monkeypatch):
    """Per fused layer, every sparse candidate and the dense form are timed on (x, residual);
    the dense form adds it (and applies the ReLU) itself; the saved engine reloads its choices."""
    from sparsecnn.runtimes.csr import runtime as csr_rt
    from sparsecnn.runtimes.base import read_engine

    from sparsecnn.runtimes.chooser import Chooser

    timed: list[tuple[str, int]] = []  # (candidate, number of args) per timing
    fused_layers: list[str] = []

    def spy(self, candidates, args):  # sparse 5 us; dense 10 us, but 1 us for the first fused layer (it goes dense)
        first_fused = len(args) == 2 and not fused_layers
        if len(args) == 2:
            fused_layers.append(id(candidates))
        out = {}
        for c in candidates:
            timed.append((c.name, len(args)))
            out[c.name] = (0.001 if first_fused else 0.010) if c.dense else 0.005
        return out

    monkeypatch.setattr(Chooser, "time", spy)
    pruned = prune_unstructured(exported("tinyresnet"), 0.9).model
    sparse = get_runtime("csr").rewrite(pruned, {})
    backend = cuda_emu.EmuBackend()
    engine = csr_rt.compile_with_backend(sparse, "cpu", {"csr_tune_reps": 1}, backend=backend)
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    fused = [r for r in rows if r["residual_fused"]]
    assert len(fused) == 3 and all(len(r["candidates"]) >= 2 and "dense_us" in r for r in fused)
    # every config and every dense form of a fused layer is timed on (x, residual)
    dense_named = {f for f, n in timed if n == 2 and f.startswith("dense:")}
    assert {"dense:cudnn", "dense:cudnn_nhwc"} <= dense_named
    assert sum(n == 2 and not f.startswith("dense:") for f, n in timed) == sum(len(r["candidates"]) for r in fused)
    assert [r["format"] for r in fused] == ["dense", "csr", "csr"]  # the dense form with its residual add too
    x = torch.from_numpy(np.random.default_rng(5).standard_normal(input_shape(pruned, 2)).astype(np.float32))
    ref = ort_run(pruned, x.numpy())[0]
    assert rel_err(engine(x)[0], ref) <= 1e-4
    path = engine.save(tmp_path / "fused.engine")
    manifest, model, _ = read_engine(path)
    assert sum(len(n.input) == 7 for n in model.graph.node if n.op_type == "CsrConv") == 3
    timed.clear()
    again = csr_rt.compile_with_backend(model, "cpu", manifest["options"], state=manifest["state"], backend=backend)
    assert not timed  # the saved decisions, nothing measured
    again_rows = [r for r in again.report() if r["op"] == "sparsecnn::CsrConv"]
    assert [(r["format"], r.get("config"), r["residual_fused"]) for r in again_rows] == \
        [(r["format"], r.get("config"), r["residual_fused"]) for r in rows]
    assert rel_err(again(x)[0], ref) <= 1e-4


@emu
def test_threshold_decision_keeps_denser_layers_dense(exported):
    from sparsecnn.runtimes.csr.runtime import compile_with_backend

    pruned = prune_unstructured(exported("tinynet"), 0.6).model
    sparse = get_runtime("csr").rewrite(pruned, {"csr_max_density": 0.5})
    engine = compile_with_backend(sparse, "cpu", {"csr_decide": "threshold", "csr_max_density": 0.3},
                                  backend=cuda_emu.EmuBackend())
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert rows and all(r["format"] == "dense" and "csr_max_density" in r["reason"] for r in rows)


@emu
def test_configs_a_layer_cannot_use_are_skipped_and_none_left_means_dense(exported, monkeypatch):
    from sparsecnn.runtimes.csr import kernels as csr_kernels
    from sparsecnn.runtimes.csr.runtime import compile_with_backend

    pruned = prune_unstructured(exported("tinynet"), 0.9).model
    sparse = get_runtime("csr").rewrite(pruned, {})
    real_make_plan = csr_kernels.make_plan

    def staged_sparse_never_fits(csr, g, cfg, *a, **k):
        if getattr(cfg, "ss", False):
            raise csr_kernels.PlanDoesNotFit(f"{cfg.label()}: too much shared memory")
        return real_make_plan(csr, g, cfg, *a, **k)

    monkeypatch.setattr(csr_kernels, "make_plan", staged_sparse_never_fits)
    opts = {"csr_decide": "sparse", "csr_tune_reps": 1}
    engine = compile_with_backend(sparse, "cpu", opts, backend=cuda_emu.EmuBackend())
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert rows and all(r["format"] == "csr" and " ss " not in r["config_label"] for r in rows)
    skipped = [c for r in rows for c in r["candidates"] if "skipped" in c]
    assert skipped and all(" ss " in c["config"] for c in skipped)

    def nothing_fits(*a, **k):
        raise csr_kernels.PlanDoesNotFit("nothing fits")

    monkeypatch.setattr(csr_kernels, "make_plan", nothing_fits)
    engine = compile_with_backend(sparse, "cpu", opts, backend=cuda_emu.EmuBackend())
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert rows and all(r["format"] == "dense" and r["reason"] == "no candidate config fits this layer" for r in rows)


@emu
def test_runtime_runs_layers_on_sputniks_spmm_from_saved_configs(exported):
    from sparsecnn.runtimes.csr.runtime import compile_with_backend
    from sparsecnn.runtimes.csr.kernels import SputnikConfig

    pruned = prune_unstructured(exported("tinyresnet"), 0.9).model
    sparse = get_runtime("csr").rewrite(pruned, {})
    x = np.random.default_rng(3).standard_normal(input_shape(pruned, 2)).astype(np.float32)
    backend = cuda_emu.EmuBackend()
    first = compile_with_backend(sparse, "cpu", {"csr_decide": "sparse", "csr_autotune": False}, backend=backend)
    layers = {}
    nodes = [n for n in sparse.graph.node if n.op_type == "CsrConv"]
    rows = [r for r in first.report() if r["op"] == "sparsecnn::CsrConv"]
    for i, (node, row) in enumerate(zip(nodes, rows)):
        strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])
        shifted = strides == [1, 1] and i % 2 == 0  # the others through the explicit im2col
        cfg = SputnikConfig(4, 32, 32, 8, 4, 4, im2col=not shifted, shifted=shifted)
        layers[row["name"]] = {"format": "csr", "config": cfg.to_dict()}
    engine = compile_with_backend(sparse, "cpu", {"csr_decide": "measure"}, state={"layers": layers}, backend=backend)
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert {r["kernel"].split("<")[0] for r in rows} == {"csr::shift4", "csr::im2col4"}
    assert all("csr::sputnik_spmm<float, 4, 32, 32, 8, 4, 4, 1>" in r["kernel"] for r in rows)
    assert rel_err(engine(torch.from_numpy(x))[0], ort_run(pruned, x)[0]) <= 1e-4


@emu
def test_weight_budget_keeps_layers_sparse_until_the_engine_fits(exported, monkeypatch):
    from sparsecnn.runtimes.csr import runtime as csr_rt

    from sparsecnn.runtimes.chooser import Chooser

    # every dense form "measures" 10 us, every sparse plan 100 us: measuring alone picks dense everywhere
    monkeypatch.setattr(Chooser, "time", lambda self, cands, args: {c.name: 0.010 if c.dense else 0.100 for c in cands})
    pruned = prune_unstructured(exported("tinyresnet"), 0.9).model
    sparse = get_runtime("csr").rewrite(pruned, {})
    x = np.random.default_rng(2).standard_normal(input_shape(pruned, 1)).astype(np.float32)
    dense_bytes = get_runtime("torch").compile(pruned, "cpu", {}).weight_bytes()
    backend = cuda_emu.EmuBackend()
    opts = {"csr_autotune": False}
    unbounded = csr_rt.compile_with_backend(sparse, "cpu", {**opts, "csr_weight_budget": 0}, backend=backend)
    rows = [r for r in unbounded.report() if r["op"] == "sparsecnn::CsrConv"]
    assert all(r["format"] == "dense" for r in rows) and unbounded.weight_bytes() == dense_bytes
    opts = {**opts, "csr_weight_budget": 0.25}
    engine = csr_rt.compile_with_backend(sparse, "cpu", opts, backend=backend)
    assert engine.weight_bytes() <= 0.25 * dense_bytes
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    kept = [r for r in rows if r["format"] == "csr"]
    assert kept and all("csr_weight_budget" in r["budget"] for r in kept)
    assert any(r["format"] == "dense" for r in rows)  # the cap leaves room for some dense layers
    # the budget's decisions are saved: a reload runs the same formats without measuring
    again = csr_rt.compile_with_backend(sparse, "cpu", opts, state=engine.full_state(), backend=backend)
    assert [r.get("format") for r in again.report()] == [r.get("format") for r in engine.report()]
    assert rel_err(engine(torch.from_numpy(x))[0], ort_run(pruned, x)[0]) <= 1e-4


def test_convert_cli_writes_the_sparse_onnx_for_the_csr_runtime(tmp_path, capsys):
    from sparsecnn.converter.cli import main

    out, sparse = tmp_path / "t.onnx", tmp_path / "t.csr.onnx"
    assert main(["convert", "tinyresnet", "--prune", "0.9", "-o", str(out), "--runtime", "csr",
                 "--sparse-onnx", str(sparse), "--engine", str(tmp_path / "t.engine"), "--device", "cpu"]) == 0
    model = onnx.load(str(sparse))
    assert sum(n.op_type == "CsrConv" for n in model.graph.node) == 8
    assert sparse.stat().st_size < out.stat().st_size


# --- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("fp16", 3e-2)])
def test_gpu_csr_engine_reproduces_onnxruntime_on_pruned_resnet18(exported, dtype, tol):
    pruned = prune_unstructured(exported("resnet18"), 0.9).model
    rt = get_runtime("csr")
    # every layer on a CSR kernel: the per-layer choice forced sparse and the whole-graph guard off
    engine = rt.compile(rt.rewrite(pruned, {}), "cuda", {"dtype": dtype, "tf32": False, "csr_decide": "sparse",
                                                         "guard": False})
    x = np.random.default_rng(int(torch.seed() % 2**31)).standard_normal(input_shape(pruned)).astype(np.float32)
    assert rel_err(engine(torch.from_numpy(x))[0], ort_run(pruned, x)[0]) <= tol
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert len(rows) == 19 and all(r["format"] == "csr" for r in rows)
    assert sum(r["residual_fused"] is True for r in rows) == 8  # every block's Add (+ Relu) in a CSR kernel
    assert not any(r["op"] == "Add" for r in engine.report())


@pytest.mark.gpu
def test_gpu_tuned_engine_with_fused_residuals_replays_and_round_trips(exported, tmp_path):
    """The tuner on the device (sparse candidates and dense, both with the residual), the CUDA
    graph replay, save and load."""
    from sparsecnn.runtimes import load_engine

    pruned = prune_unstructured(exported("tinyresnet"), 0.9).model
    rt = get_runtime("csr")
    engine = rt.compile(rt.rewrite(pruned, {}), "cuda", {"dtype": "fp32", "tf32": False})
    x = np.random.default_rng(7).standard_normal(input_shape(pruned)).astype(np.float32)
    ref = ort_run(pruned, x)[0]
    for _ in range(3):  # the first run tunes dense convs and captures, the next ones replay
        assert rel_err(engine(torch.from_numpy(x))[0], ref) <= 1e-4
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    fused = [r for r in rows if r["residual_fused"]]
    assert len(fused) == 3 and all("dense_us" in r and r["candidates"] for r in fused)
    engine.save(tmp_path / "e.engine")
    again = load_engine(tmp_path / "e.engine", "cuda")
    assert rel_err(again(torch.from_numpy(x))[0], ref) <= 1e-4  # its first run replays the saved plan
    assert [(r.get("format"), r.get("config")) for r in again.report()] == \
        [(r.get("format"), r.get("config")) for r in engine.report()]
    assert again.plans == engine.plans
