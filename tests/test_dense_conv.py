"""The dense conv engines of the torch runtime (extra={"dense_conv": ...}) against F.conv2d / ONNX Runtime."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from helpers import ort_run, rel_err
from sparsecnn.common.errors import UserError
from sparsecnn.runtimes import get_runtime

MODES = ["cudnn", "cudnn_nhwc", "im2col", "im2col_nhwc", "best"]


def _conv_model(cin, cout, hw, bias=True, **attrs):
    rng = np.random.default_rng(7)
    k = attrs.get("kernel_shape", [3, 3])
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((cout, cin // attrs.get("group", 1), *k)).astype(np.float32), "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        ins.append("b")
    node = helper.make_node("Conv", ins, ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


CASES = [
    dict(cin=5, cout=7, hw=(9, 11), kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    dict(cin=5, cout=7, hw=(9, 11), kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),  # asymmetric
    dict(cin=4, cout=6, hw=(13, 10), kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2], bias=False),
    dict(cin=6, cout=3, hw=(8, 8), kernel_shape=[1, 1]),                     # pointwise: a plain GEMM
    dict(cin=6, cout=3, hw=(9, 7), kernel_shape=[1, 1], strides=[2, 2]),     # strided 1x1 (ResNet shortcut)
    dict(cin=3, cout=8, hw=(15, 15), kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),  # stem
    dict(cin=3, cout=4, hw=(9, 9), kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(cin=8, cout=8, hw=(6, 6), kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=4),  # im2col not a candidate
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k not in ("cin", "cout", "hw")))
@pytest.mark.parametrize("mode", MODES[:-1])  # "best" runs one of these; tested on whole models below
@pytest.mark.parametrize("batch,channels_last", [(1, False), (3, True)])
def test_every_dense_conv_mode_matches_onnxruntime(case, mode, batch, channels_last):
    case = dict(case)
    model = _conv_model(case.pop("cin"), case.pop("cout"), case.pop("hw"), case.pop("bias", True), **case)
    shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = torch.randn(*shape)  # fresh each run
    engine = get_runtime("torch").compile(model, "cpu", {"extra": {"dense_conv": mode}})
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ours = engine.executor(xin)[0]
    ref = ort_run(model, x.numpy())[0]
    assert tuple(ours.shape) == ref.shape
    assert rel_err(ours, ref) < 1e-5


def test_best_reports_every_candidate_time_and_picks_the_fastest():
    model = _conv_model(8, 16, (12, 12), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    engine = get_runtime("torch").compile(model, "cpu", {"extra": {"dense_conv": "best"}})
    engine(torch.randn(2, 8, 12, 12))
    (row,) = engine.report()
    choice = row["choices"]["2x8x12x12"]
    assert set(choice["ms"]) == {"cudnn", "cudnn_nhwc", "im2col", "im2col_nhwc"}
    assert all(t > 0 for t in choice["ms"].values())
    assert choice["chosen"] == min(choice["ms"], key=choice["ms"].get)
    # a second shape is decided on its own; the first decision stays
    engine(torch.randn(1, 8, 12, 12))
    assert set(engine.report()[0]["choices"]) == {"2x8x12x12", "1x8x12x12"}


def test_best_skips_im2col_when_the_column_buffer_is_too_big_and_for_groups():
    model = _conv_model(8, 8, (12, 12), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    engine = get_runtime("torch").compile(model, "cpu", {"extra": {"dense_conv": "best", "im2col_max_bytes": 1000}})
    engine(torch.randn(1, 8, 12, 12))
    choice = engine.report()[0]["choices"]["1x8x12x12"]
    assert set(choice["ms"]) == {"cudnn", "cudnn_nhwc"}
    assert "column buffer" in choice["skipped"]["im2col"]
    grouped = _conv_model(8, 8, (6, 6), kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    engine = get_runtime("torch").compile(grouped, "cpu", {"extra": {"dense_conv": "best"}})
    engine(torch.randn(1, 8, 6, 6))
    assert "grouped" in engine.report()[0]["choices"]["1x8x6x6"]["skipped"]["im2col_nhwc"]


def test_saved_engine_keeps_its_per_layer_choices(tmp_path):
    from sparsecnn.runtimes import load_engine

    model = _conv_model(4, 4, (6, 6), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    engine = get_runtime("torch").compile(model, "cpu", {"extra": {"dense_conv": "best"}})
    engine(torch.randn(1, 4, 6, 6))
    chosen = engine.report()[0]["choices"]["1x4x6x6"]["chosen"]
    engine.save(tmp_path / "e.engine")
    again = load_engine(tmp_path / "e.engine", "cpu")
    x = torch.randn(1, 4, 6, 6)
    again(x)
    assert again.dense_convs[0].decided == {"1x4x6x6": chosen}
    assert "choices" not in again.report()[0] or "1x4x6x6" not in again.report()[0]["choices"]  # not re-measured


def test_unknown_dense_conv_setting_is_a_user_error():
    model = _conv_model(4, 4, (6, 6))
    with pytest.raises(UserError, match="dense_conv"):
        get_runtime("torch").compile(model, "cpu", {"extra": {"dense_conv": "winograd"}})


def test_whole_models_match_with_best_dense(exported):
    model = exported("tinyresnet")
    x = torch.randn(2, 3, 32, 32)
    ref = get_runtime("torch").compile(model, "cpu", {})(x)[0]
    ours = get_runtime("torch").compile(model, "cpu", {"extra": {"dense_conv": "best"}})(x)[0]
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 2e-3)])
@pytest.mark.parametrize("mode", MODES)
def test_dense_conv_modes_on_gpu_match_fp64_reference(mode, dtype, tol):
    for case in CASES:
        case = dict(case)
        cin, cout, hw, bias = case.pop("cin"), case.pop("cout"), case.pop("hw"), case.pop("bias", True)
        model = _conv_model(cin, cout, hw, bias, **case)
        engine = get_runtime("torch").compile(model, "cuda", {"dtype": dtype, "tf32": False,
                                                              "extra": {"dense_conv": mode}})
        x = torch.randn(3, cin, *hw)  # fresh each run
        ours = engine(x)[0]
        # fp64 reference on the operands as the engine sees them (rounded to fp16 for fp16)
        as_engine = (lambda t: t.to(torch.float16).double()) if dtype == "fp16" else (lambda t: t.double())
        w = {t.name: as_engine(torch.from_numpy(onnx.numpy_helper.to_array(t).copy())) for t in model.graph.initializer}
        # SAME_UPPER, stride 2, kernel 3 on 9x9: 5 outputs need 2 pad rows, split 1 / 1
        pads = [1, 1, 1, 1] if case.get("auto_pad") else case.get("pads", [0, 0, 0, 0])
        xp = F.pad(as_engine(x), (pads[1], pads[3], pads[0], pads[2]))
        ref = F.conv2d(xp, w["w"], w.get("b"), case.get("strides", [1, 1]), 0, case.get("dilations", [1, 1]),
                       case.get("group", 1))
        assert tuple(ours.shape) == tuple(ref.shape)
        assert rel_err(ours, ref) < tol, (mode, case)


class _FakeReplay:
    """Stands in for a CUDA graph on CPU: 'capture' runs fn once (after warm-up), replay runs it again."""

    built: list = []

    def __init__(self, fn, example_inputs, warmup=3, first_call=True):
        self.fn, self.inputs = fn, tuple(example_inputs)
        for _ in range(warmup):
            fn(*self.inputs)
        self.static_outputs = fn(*self.inputs)
        _FakeReplay.built.append(self)

    def replay(self):
        return self.fn(*self.inputs)


def test_whole_network_plan_choice_keeps_the_fastest_graph_and_rewrites_layer_choices(exported, monkeypatch):
    """The GPU-only plan selection of dense_conv=best (base.Engine._plan_graph), driven on CPU with
    a stand-in graph and clock: per-layer choices vs every conv on cuDNN NCHW vs NHWC."""
    from sparsecnn.runtimes import base, chooser

    _FakeReplay.built = []
    monkeypatch.setattr(base, "GraphReplay", _FakeReplay)
    fake = {"as chosen": 3.0, "cudnn": 1.0, "cudnn_nhwc": 2.0}
    monkeypatch.setattr(chooser, "guard_graphs", lambda graphs, device, **k: (
        min(graphs, key=fake.get), {g: fake[g] for g in graphs}))

    eng = get_runtime("torch").compile(exported("tinyresnet"), "cpu", {"extra": {"dense_conv": "best"}})
    x = eng.prepare(torch.randn(2, 3, 32, 32))
    eng.executor(*x)  # per-layer decisions, with the real (CPU) clock
    replay = eng._plan_graph("key", x)
    assert eng.plans["2x3x32x32"]["chosen"] == "cudnn"
    assert eng.plans["2x3x32x32"]["ms"] == fake
    assert replay is _FakeReplay.built[1]  # the graph captured with every conv on cuDNN NCHW
    for conv in eng.dense_convs:
        assert conv.override is None
        (key,) = conv.decided
        assert conv.decided[key] == "cudnn"
        assert "whole-network plan" in conv.info["choices"][key]["why"]
        assert conv.info["choices"][key]["layer_best"] in conv.info["choices"][key]["ms"]
    ref = get_runtime("torch").compile(exported("tinyresnet"), "cpu", {})
    assert rel_err(replay.replay()[0], ref.executor(*x)[0]) < 1e-5
    assert set(eng.full_state()["dense_conv_decisions"]) == {c.name for c in eng.dense_convs}
    assert eng.full_state()["plans"]["2x3x32x32"]["chosen"] == "cudnn"
