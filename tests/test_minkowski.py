"""The minkowski runtime (MinkowskiEngine sparse tensors) against dense references.

Needs a MinkowskiEngine build (scripts/build_minkowski.py); skipped without one, unless
SPARSECNN_REQUIRE_MINKOWSKI=1 (CI sets it after building), where a missing ME fails.
"""
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from helpers import ort_run, rel_err
from sparsecnn.common.errors import UserError
from sparsecnn.runtimes import get_runtime

rt = get_runtime("minkowski")
_ok, _why = rt.available()
if not _ok and os.environ.get("SPARSECNN_REQUIRE_MINKOWSKI") == "1":
    raise RuntimeError(f"SPARSECNN_REQUIRE_MINKOWSKI=1 but MinkowskiEngine is missing: {_why}")
needs_me = pytest.mark.skipif(not _ok, reason=f"MinkowskiEngine not built here: {_why}")
# Every numerical test runs on the CPU build; the same tests with "cuda" are the GPU suite (-m gpu).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons: cuBLAS/cuDNN without TF32 on both sides."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(nodes, x_shape, inits, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * len(x_shape))],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _sparse_image(rng, shape, keep=0.3):
    """Random features where only a random ~keep fraction of pixels is non-zero (in every channel)."""
    x = rng.standard_normal(shape).astype(np.float32)
    mask = rng.random((shape[0], 1, *shape[2:])) < keep
    return x * mask


def _conv_model(rng, cin, cout, kernel, stride=1, pad=None, dilation=1, bias=False, x_shape=None):
    kh, kw = kernel
    pads = pad if pad is not None else [(kh // 2) * dilation, (kw // 2) * dilation] * 2
    w = rng.standard_normal((cout, cin, kh, kw)).astype(np.float32)
    inits = {"w": w}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(cout).astype(np.float32)
        ins.append("b")
    node = helper.make_node("Conv", ins, ["y"], kernel_shape=[kh, kw], strides=[stride, stride], pads=pads,
                            dilations=[dilation, dilation])
    return _model([node], x_shape, inits), inits


@needs_me
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,stride,dilation", [((3, 3), 1, 1), ((3, 3), 2, 1), ((3, 5), 1, 1),
                                                    ((1, 1), 2, 1), ((7, 7), 2, 1), ((3, 3), 1, 2)])
def test_conv_weight_offsets_match_conv2d_on_a_dense_input(kernel, stride, dilation, device):
    rng = np.random.default_rng()
    shape = (2, 5, 13, 11)
    model, inits = _conv_model(rng, 5, 7, kernel, stride, dilation=dilation, x_shape=shape)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    w = torch.from_numpy(inits["w"])
    pad = ((kernel[0] // 2) * dilation, (kernel[1] // 2) * dilation)
    want = F.conv2d(x.double(), w.double(), None, stride, pad, dilation)
    got = rt.compile(model, device, {})(x)[0]
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5


@needs_me
def test_kernel_offsets_in_the_other_order_give_a_wrong_result(monkeypatch):
    """The test above can fail: a weight mapped with the second spatial dim fastest is wrong, and
    the one chooser's check rejects it (the layer runs dense and the result stays right)."""
    rng = np.random.default_rng()
    shape = (1, 4, 9, 9)
    model, inits = _conv_model(rng, 4, 6, (3, 3), x_shape=shape)
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    want = F.conv2d(x, torch.from_numpy(inits["w"]), None, 1, 1)
    import sparsecnn.runtimes.minkowski.runtime as mk

    def swapped(weight):
        cout, cin, kh, kw = weight.shape
        return weight.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout).contiguous()

    monkeypatch.setattr(mk, "me_kernel", swapped)
    engine = rt.compile(model, "cpu", {})
    got = engine(x)[0]
    conv = next(r for r in engine.report() if r["op"] == "Conv")
    err = float(conv["choice"]["rejected"]["minkowski"].split("rel err ")[1].split()[0])
    assert err > 0.05 and conv["choice"]["chosen"].startswith("dense:")
    assert rel_err(got, want) < 1e-5


@needs_me
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,bias", [(1, False), (2, False), (1, True), (2, True)])
def test_generative_sites_reproduce_the_dense_conv_of_a_sparse_map(stride, bias, device):
    """Sites outside the active set that a dense conv fills from neighbours (or from the bias) are produced."""
    rng = np.random.default_rng()
    shape = (2, 4, 15, 12)
    x = torch.from_numpy(_sparse_image(rng, shape, keep=0.15))
    model, inits = _conv_model(rng, 4, 6, (3, 3), stride, bias=bias, x_shape=shape)
    want = F.conv2d(x.double(), torch.from_numpy(inits["w"]).double(),
                    torch.from_numpy(inits["b"]).double() if bias else None, stride, 1)
    engine = rt.compile(model, device, {})
    got = engine(x)[0]
    assert rel_err(got, want) < 1e-5
    conv = next(r for r in engine.report() if r["op"] == "Conv")
    assert conv["site_sparsity_in"] > 0.5  # the input really was sparse
    if not bias:  # output sites: the active set dilated by the window, not every position
        assert 0 < conv["site_sparsity_out"] < conv["site_sparsity_in"]


@needs_me
def test_submanifold_sites_change_the_result_which_is_why_they_are_not_the_default():
    rng = np.random.default_rng()
    shape = (1, 3, 12, 12)
    x = torch.from_numpy(_sparse_image(rng, shape, keep=0.2))
    model, inits = _conv_model(rng, 3, 4, (3, 3), x_shape=shape)
    want = F.conv2d(x, torch.from_numpy(inits["w"]), None, 1, 1)
    sub = rt.compile(model, "cpu", {"extra": {"sites": "submanifold", "guard": False}})(x)[0]
    assert rel_err(sub, want) > 1e-2
    exact = rt.compile(model, "cpu", {"extra": {"sites": "generative"}})(x)[0]
    assert rel_err(exact, want) < 1e-5


@needs_me
@pytest.mark.parametrize("op,attrs,size", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), (13, 10)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2]), (7, 9)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0), (8, 7)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1), (9, 9)),
    ("AveragePool", dict(kernel_shape=[1, 1], strides=[1, 1]), (7, 7)),
])
@pytest.mark.parametrize("device", DEVICES)
def test_pooling_after_relu_matches_onnxruntime(op, attrs, size, device):
    rng = np.random.default_rng()
    shape = (2, 5, *size)
    relu = helper.make_node("Relu", ["x"], ["r"])
    pool = helper.make_node(op, ["r"], ["y"], **attrs)
    model = _model([relu, pool], shape, {})
    x = _sparse_image(rng, shape, keep=0.4)
    engine = rt.compile(model, device, {})
    got = engine(torch.from_numpy(x))[0]
    ref = ort_run(model, x)[0]
    assert tuple(got.shape) == ref.shape
    assert rel_err(got, ref) < 1e-5
    assert any(r["op"] == op and r["kernel"].startswith("ME ") for r in engine.report())


@needs_me
@pytest.mark.parametrize("op", ["Conv", "MaxPool"])
def test_an_input_with_no_active_site_runs_dense(op):
    """RegNet's squeeze-excitation: ReLU of a pooled [N, C, 1, 1] vector can be all zeros, and ME's
    convolution on the empty sparse tensor killed the process (SIGSEGV) in `verify --runtimes minkowski`."""
    rng = np.random.default_rng(0)
    relu = helper.make_node("Relu", ["x"], ["r"])
    if op == "Conv":
        node = helper.make_node("Conv", ["r", "w", "b"], ["y"], kernel_shape=[1, 1])
        inits = {"w": rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "b": np.ones(4, np.float32)}
    else:
        node, inits = helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), {}
    model = _model([relu, node], (2, 3, 4, 4), inits)
    x = -np.abs(rng.standard_normal((2, 3, 4, 4))).astype(np.float32)  # nothing survives the ReLU
    got = rt.compile(model, "cpu", {})(torch.from_numpy(x))[0]
    ref = ort_run(model, x)[0]
    assert tuple(got.shape) == ref.shape and np.abs(got.numpy() - ref).max() < 1e-6


@needs_me
def test_max_pool_of_possibly_negative_values_runs_dense_with_a_reason():
    rng = np.random.default_rng()
    shape = (1, 3, 8, 8)
    model, inits = _conv_model(rng, 3, 4, (3, 3), x_shape=shape)
    model.graph.node[0].output[0] = "c"
    model.graph.node.append(helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]))
    x = _sparse_image(rng, shape, keep=0.3)
    engine = rt.compile(model, "cpu", {})
    got = engine(torch.from_numpy(x))[0]
    assert rel_err(got, ort_run(model, x)[0]) < 1e-5
    pool = next(r for r in engine.report() if r["op"] == "MaxPool")
    assert pool["path"] == "dense" and "negative" in pool["reason"]


def _sparse_input(shape, seed=0):
    """A normalised image with zeroed regions (a crude stand-in for empty background)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    n, _, h, w = shape
    x[:, :, : h // 2, : w // 3] = 0
    x[:, :, h // 3:, w - w // 4:] = 0
    return x


def _check_network(model, x, min_sparse_layers=1, device="cpu"):
    from sparsecnn.passes.prune import prune_unstructured

    model = prune_unstructured(model, 0.9).model
    ref = get_runtime("torch").compile(model, device, {"dtype": "fp32", "tf32": False})(x)
    engine = rt.compile(model, device, {"dtype": "fp32", "extra": {"guard": False}})  # MinkowskiEngine as it is
    got = engine(x)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert rel_err(a, b) <= 1e-4
    report = engine.report()
    convs = [r for r in report if r["op"] == "Conv"]
    assert convs and all(r["kernel"].startswith("ME conv") for r in convs)
    assert sum(r.get("site_sparsity_in", 0) > 0.05 for r in convs) >= min_sparse_layers
    return engine


@needs_me
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tinynet", "tinynet_odd", "tinyresnet"])
def test_tiny_networks_match_the_dense_reference(exported, name, device):
    _check_network(exported(name), _sparse_input((2, 3, 32, 32)), device=device)


@needs_me
@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("resnet18", (1, 3, 224, 224)), ("vgg19", (1, 3, 224, 224)),
                                        ("trafficcamnet", (1, 3, 128, 224))])
def test_whole_networks_match_the_dense_reference_within_1e4(exported, name, shape):
    # TrafficCamNet is fully convolutional: a 128x224 input keeps CI's CPU time small.
    _check_network(exported(name), _sparse_input(shape))


@needs_me
@pytest.mark.gpu
@pytest.mark.parametrize("name,shape", [("resnet18", (2, 3, 224, 224)), ("vgg19", (2, 3, 224, 224)),
                                        ("trafficcamnet", (1, 3, 544, 960))])
def test_gpu_whole_networks_match_the_dense_reference_within_1e4(exported, name, shape):
    _check_network(exported(name), _sparse_input(shape, seed=int(torch.randint(0, 1000, ()))), device="cuda")


@needs_me
@pytest.mark.gpu
def test_gpu_engine_runs_me_kernels_on_the_gpu_and_profiles_them(exported):
    engine = rt.compile(exported("tinyresnet"), "cuda", {"extra": {"guard": False}})  # ME as it is
    engine(_sparse_input((1, 3, 32, 32)))
    assert all("(GPU)" in r["kernel"] for r in engine.report() if r["op"] == "Conv")
    rows = engine.profile_layers(_sparse_input((1, 3, 32, 32)), reps=2)
    assert all(r["conv_ms"] > 0 for r in rows if r["op"] == "Conv")


@needs_me
def test_profile_reports_bookkeeping_kernel_map_and_conv_time_per_layer(exported):
    engine = rt.compile(exported("tinyresnet"), "cpu", {})
    rows = engine.profile_layers(_sparse_input((1, 3, 32, 32)), reps=2)
    convs = [r for r in rows if r["op"] == "Conv"]
    assert len(convs) == 9
    for r in convs:
        assert r["conv_ms"] > 0 and r["kernel_map_ms"] >= 0 and r["coords_ms"] >= 0
        assert 0.0 <= r["site_sparsity_in"] <= 1.0


@needs_me
def test_fp16_is_refused_with_a_reason(exported):
    with pytest.raises(UserError, match="fp32 only"):
        rt.compile(exported("tinynet"), "cpu", {"dtype": "fp16"})


@needs_me
def test_engine_save_load_keeps_the_site_mode(exported, tmp_path):
    from sparsecnn.runtimes import load_engine

    engine = rt.compile(exported("tinynet"), "cpu", {"extra": {"sites": "generative"}})
    again = load_engine(engine.save(tmp_path / "m.engine"), "cpu")
    assert again.runtime == "minkowski" and again.state.sites == "generative"
    x = _sparse_input((1, 3, 32, 32))
    torch.testing.assert_close(again(x)[0], engine(x)[0])


def test_available_explains_how_to_build_when_me_is_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_me(name, *args, **kwargs):
        if name.startswith("MinkowskiEngine"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_me)
    ok, why = rt.available()
    assert not ok
    assert "scripts/build_minkowski.py" in why and "libopenblas-dev" in why


def test_doctor_lists_the_minkowski_runtime(capsys):
    from sparsecnn.converter import cmd_doctor

    cmd_doctor.run(None)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("minkowski"))
    assert ("MinkowskiEngine 0.5.4" in line) if _ok else ("build_minkowski.py" in line)


@needs_me
def test_add_on_shared_sites_stays_sparse_and_global_pool_sums_site_features():
    rng = np.random.default_rng()
    shape = (2, 4, 9, 7)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["r", "r"], ["s"]),
             helper.make_node("GlobalAveragePool", ["s"], ["y"])]
    model = _model(nodes, shape, {"w": w})
    x = _sparse_image(rng, shape, keep=0.3)
    engine = rt.compile(model, "cpu", {})
    got = engine(torch.from_numpy(x))[0]
    assert rel_err(got, ort_run(model, x)[0]) < 1e-5
    add = next(r for r in engine.report() if r["op"] == "Add")
    assert add["path"] == "sparse"


@needs_me
def test_guarded_engine_falls_back_to_dense_says_so_and_reloads_without_timing(exported, tmp_path, monkeypatch):
    """Each conv is a chooser Switch (ME or its dense forms, policy sparse: ME where it is right);
    the whole-graph guard falls back to dense where ME is slower (stand-in clock here)."""
    from sparsecnn.runtimes import chooser, load_engine

    fake = {"as chosen": 3.0, "dense": 1.0}
    monkeypatch.setattr(chooser, "guard_graphs", lambda graphs, device, **k: (
        min(graphs, key=fake.get), {g: fake[g] for g in graphs}))
    x = _sparse_input((2, 3, 32, 32))
    engine = rt.compile(exported("tinynet"), "cpu", {})
    got = engine(x)
    ref = get_runtime("torch").compile(exported("tinynet"), "cpu", {})(x)
    assert rel_err(got[0], ref[0]) <= 1e-4
    plan = engine.plans["2x3x32x32"]
    assert plan["chosen"] == "dense" and "whole-graph guard" in plan["reason"] and plan["sparse_layers"]
    convs = [r for r in engine.report() if r["op"] == "Conv"]
    assert convs and all(r["choice"]["chosen"] == "minkowski" and r["choice"]["now"].startswith("dense:")
                         and not r["kernel"].startswith("ME") for r in convs)
    as_is = engine.unguarded_runner(*engine.prepare(x))  # MinkowskiEngine as it is: what bench reports
    assert rel_err(as_is(*engine.prepare(x))[0], ref[0]) <= 1e-4
    assert all(sw.active == "minkowski" for sw in engine.switches())

    monkeypatch.setattr(chooser, "guard_graphs", lambda *a, **k: pytest.fail("a saved plan was timed again"))
    again = load_engine(engine.save(tmp_path / "m.engine"), "cpu")
    again(x)
    assert again.plans["2x3x32x32"]["chosen"] == "dense"
    assert all(sw.decision.how == "saved" and sw.is_dense for sw in again.switches())
