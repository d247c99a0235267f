"""The cusparselt runtime: its lowering (im2col order, padding, strides) checked on the CPU with a
dense stand-in for the sparse GEMM, and on a GPU with cuSPARSELt itself (-m gpu)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from helpers import ort_run, rel_err
from sparsecnn.common.errors import UserError
from sparsecnn.passes.masks import mask_2to4
from sparsecnn.passes.prune import prune_2to4
from sparsecnn.runtimes.cusparselt import runtime as cs
from sparsecnn.runtimes import get_runtime
from sparsecnn.runtimes.executor import Executor

# (cout, cin, kernel, stride, pads, dilation, auto_pad, batch, hw): odd sizes on purpose, so
# M, K and N*Ho*Wo all need padding to cuSPARSELt's multiples somewhere.
CONV_CASES = [
    (20, 12, (3, 3), (2, 2), (1, 0, 0, 1), (1, 1), None, 3, (9, 11)),
    (24, 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), None, 2, (5, 5)),      # pointwise, N*H*W = 50
    (16, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), None, 2, (4, 4)),     # pointwise, the no-copy view
    (36, 20, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), None, 1, (7, 7)),     # 1x1 stride 2 (a downsample)
    (8, 4, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), None, 1, (6, 6)),       # dilation
    (12, 8, (3, 2), (2, 1), None, (1, 1), "SAME_UPPER", 2, (7, 5)),     # auto_pad, non-square kernel
]


def conv_model(cout, cin, kernel, stride, pads, dilation, auto_pad, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *kernel, generator=g)
    w = (w * mask_2to4(w, 1)).numpy()
    attrs = {"strides": list(stride), "dilations": list(dilation), "kernel_shape": list(kernel)}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(torch.randn(cout, generator=g).numpy(), "b"))
        inputs.append("b")
    graph = helper.make_graph([helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "Ho", "Wo"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def gemm_model(out_f, in_f, alpha, beta, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w = (w * mask_2to4(w, 1)).numpy()
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=alpha, beta=beta)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_f])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(torch.randn(out_f, generator=g).numpy(), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def lowered(model, device="cpu", dtype="fp32", backend="dense"):
    """The cusparselt lowering forced onto the sparse path."""
    return Executor(cs.rewrite(model), device, dtype, ops=cs.op_table(backend), channels_last=True,
                    options={"force": "sparse"})


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_lowering_matches_onnxruntime_on_cpu(case):
    cout, cin, kernel, stride, pads, dilation, auto_pad, batch, (h, w) = case
    model = conv_model(cout, cin, kernel, stride, pads, dilation, auto_pad, seed=cout + cin)
    ex = lowered(model)
    x = np.random.default_rng(cin).standard_normal((batch, cin, h, w), dtype=np.float32)
    out = ex(ex.prepare_input(torch.from_numpy(x)))[0]
    ref = ort_run(model, x)[0]
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    entry = next(iter(ex.steps[0].info["choices"].values()))
    assert entry["choice"] == "sparse"
    m, k, rows = entry["gemm"]
    assert (m, k, rows) == (cout, cin * kernel[0] * kernel[1], batch * ref.shape[2] * ref.shape[3])
    expect_pad = {d for d, n, a in (("M", m, 16), ("K", k, 16), ("N", rows, 8)) if n % a}
    assert set(entry["padded"]) == expect_pad


def test_pointwise_conv_reads_the_activation_without_a_copy():
    model = conv_model(16, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), None, seed=1)
    ex = lowered(model)
    x = ex.prepare_input(torch.randn(2, 16, 4, 4))
    layer = ex.steps[0].fn
    bt, _ = layer.sparse.columns(x)
    assert bt.data_ptr() == x.data_ptr()
    assert layer.sparse.describe(x)["im2col"] is False


@pytest.mark.parametrize("batch,out_f,in_f,alpha,beta", [(1, 10, 20, 1.0, 1.0), (5, 24, 32, 0.5, 2.0), (8, 16, 16, 1.0, 1.0)])
def test_gemm_lowering_matches_onnxruntime_on_cpu(batch, out_f, in_f, alpha, beta):
    model = gemm_model(out_f, in_f, alpha, beta, seed=batch)
    ex = lowered(model)
    x = np.random.default_rng(batch).standard_normal((batch, in_f), dtype=np.float32)
    out = ex(ex.prepare_input(torch.from_numpy(x)))[0]
    assert rel_err(out, ort_run(model, x)[0]) < 1e-5


def test_whole_tinyresnet_lowered_matches_onnxruntime_on_cpu(exported):
    model = prune_2to4(exported("tinyresnet")).model
    ex = lowered(model)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    out = ex(ex.prepare_input(torch.from_numpy(x)))[0]
    assert rel_err(out, ort_run(model, x)[0]) < 1e-5
    assert sum(1 for s in ex.steps if s.info.get("format") == "2:4") == 8


def test_available_never_raises_and_says_why(monkeypatch):
    ok, reason = cs.available()
    if not torch.cuda.is_available():
        assert not ok and "no CUDA GPU" in reason

    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    ok, reason = cs.available()
    assert not ok and "driver exploded" in reason


def test_compile_refuses_fp32_and_cpu_with_a_user_error():
    model = conv_model(8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), None, seed=0)
    with pytest.raises(UserError, match="fp16 or bf16"):
        cs.compile(model, "cpu", {"dtype": "fp32"})
    with pytest.raises(UserError, match="CUDA GPU"):
        cs.compile(model, "cpu", {"dtype": "fp16"})


# --- GPU: cuSPARSELt itself ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES)
def test_cslt_conv_matches_the_reference_fp16(case):
    if not cs.cusparselt_available()[0]:
        pytest.skip(cs.cusparselt_available()[1])
    cout, cin, kernel, stride, pads, dilation, auto_pad, batch, (h, w) = case
    model = conv_model(cout, cin, kernel, stride, pads, dilation, auto_pad, seed=int(torch.randint(0, 10**6, ())))
    ex = lowered(model, "cuda", "fp16", backend="cslt")
    x = torch.randn(batch, cin, h, w)
    out = ex(ex.prepare_input(x))[0].float().cpu()
    ref = get_runtime("torch").compile(cs.rewrite(model), "cpu")(x)[0]
    assert rel_err(out, ref) <= 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("batch,out_f,in_f", [(1, 10, 20), (3, 4096, 2048), (32, 1000, 512)])
def test_cslt_gemm_matches_the_reference_fp16(batch, out_f, in_f):
    if not cs.cusparselt_available()[0]:
        pytest.skip(cs.cusparselt_available()[1])
    model = gemm_model(out_f, in_f, 1.0, 1.0, seed=int(torch.randint(0, 10**6, ())))
    ex = lowered(model, "cuda", "fp16", backend="cslt")
    x = torch.randn(batch, in_f)
    out = ex(ex.prepare_input(x))[0].float().cpu()
    ref = get_runtime("torch").compile(cs.rewrite(model), "cpu")(x)[0]
    assert rel_err(out, ref) <= 2e-3


@pytest.mark.gpu
def test_cusparselt_engine_on_tinyresnet_measures_and_reports_each_layer(exported):
    if not cs.cusparselt_available()[0]:
        pytest.skip(cs.cusparselt_available()[1])
    model = prune_2to4(exported("tinyresnet")).model
    engine = cs.compile(cs.rewrite(model), "cuda", {"dtype": "fp16", "extra": {"tune_reps": 5}})
    x = torch.randn(2, 3, 32, 32)
    out = engine(x)[0]
    ref = get_runtime("torch").compile(model, "cpu")(x)[0]
    assert rel_err(out, ref) < 1e-2
    rows = [r for r in engine.report() if r.get("format") == "2:4"]
    assert len(rows) == 8
    for r in rows:  # decided by the one chooser against the layer's best dense form
        entry = next(iter(r["choices"].values()))
        assert entry["choice"] in ("sparse", "dense") and entry["sparse_us"] > 0 and entry["dense_us"] > 0
        assert entry["reason"] and r["choice"]["candidates_ms"]
    plan = next(iter(engine.plans.values()))  # the base whole-graph guard ran
    assert plan["chosen"] in ("as chosen", "partial", "dense", "cudnn", "cudnn_nhwc") and "as chosen" in plan["ms"]


# --- the choice on CPU (the "dense" backend stands in for cuSPARSELt) --------------------------

def _engine(exported, state=None, **extra):
    from sparsecnn.runtimes.base import CompileOptions

    model = cs.rewrite(prune_2to4(exported("tinynet")).model)
    return cs.build_engine(model, torch.device("cpu"), CompileOptions.from_dict({"extra": extra}), "dense", state)


def test_a_wrong_sparse_layer_is_rejected_and_decisions_reload_without_timing(exported, monkeypatch):
    from sparsecnn.runtimes.chooser import Chooser

    monkeypatch.setattr(Chooser, "time", lambda self, cands, args: {c.name: 2.0 if c.dense else 1.0 for c in cands})
    x = torch.randn(1, 3, 32, 32)
    eng = _engine(exported)
    eng(x)
    assert eng.sparse_layers() and all(not sw.is_dense for sw in eng.switches())
    state = eng.full_state()
    assert {d["chosen"] for d in state["choices"].values()} == {cs.SPARSE}

    monkeypatch.setattr(Chooser, "time", lambda *a: pytest.fail("a saved decision was timed again"))
    again = _engine(exported, state)
    assert rel_err(again(x)[0], eng(x)[0]) == 0
    assert all(sw.decision.how == "saved" and not sw.is_dense for sw in again.switches())
    # an engine saved before the one chooser: layer -> {shape: {"choice": ...}}
    old = _engine(exported, {"choices": {n: {"1x3x32x32": {"choice": "dense"}} for n in state["choices"]}})
    old(x)
    assert all(sw.is_dense and sw.decision.how == "forced" for sw in old.switches())

    monkeypatch.setattr(Chooser, "time", lambda self, cands, args: {c.name: 2.0 if c.dense else 1.0 for c in cands})
    monkeypatch.setattr(cs.SparseGemm, "__call__", lambda self, bt: 1.5 * F.linear(bt, self.weight, self.bias))
    wrong = _engine(exported)
    wrong(x)
    assert all(sw.is_dense for sw in wrong.switches())
    for sw in wrong.switches():
        assert "wrong result" in sw.info["choice"]["rejected"][cs.SPARSE]
