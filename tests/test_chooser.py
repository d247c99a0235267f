"""The one chooser (runtimes/chooser.py) and the base Engine's whole-graph guard, on CPU.

Timing is replaced by a stand-in clock (`Chooser.time`, `guard_graphs`) and the CUDA graph by
a stand-in replay, so the rules themselves are tested: a wrong candidate never wins, the
margin holds, saved decisions and plans replay without timing anything."""
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from helpers import rel_err
from sparsecnn.runtimes import base, chooser
from sparsecnn.runtimes.base import CompileOptions, Engine
from sparsecnn.runtimes.chooser import Candidate, Chooser, Decision, Switch
from sparsecnn.runtimes.executor import Executor


def _clock(ms: dict):
    """A stand-in for Chooser.time: each candidate takes ms[name]."""
    return lambda self, cands, args: {c.name: ms[c.name] for c in cands}


def _no_timing(*a, **k):
    raise AssertionError("nothing may be timed here")


def _candidates(x):
    ref = x * 3.0
    return [Candidate("dense:a", lambda t: t * 3.0, dense=True), Candidate("dense:b", lambda t: t * 3.0, dense=True),
            Candidate("sparse", lambda t: t * 3.0, dense=False, library="lib", detail={"config": 1}),
            Candidate("wrong", lambda t: t * 3.3, dense=False, library="lib")], ref


def test_a_wrong_or_failing_candidate_is_rejected_whatever_its_speed(monkeypatch):
    x = torch.randn(4, 8)
    cands, _ = _candidates(x)

    def boom(t):
        raise RuntimeError("out of memory\nmore")
    cands.append(Candidate("fails", boom, dense=False))
    monkeypatch.setattr(Chooser, "time", _clock({"dense:a": 1.0, "dense:b": 0.9, "sparse": 0.5, "wrong": 0.01,
                                                 "fails": 0.01}))
    d = Chooser("cpu").choose("layer", cands, (x,))
    assert d.chosen == "sparse" and not d.dense and d.library == "lib" and d.detail == {"config": 1}
    assert "wrong result" in d.rejected["wrong"] and d.rejected["fails"] == "failed: RuntimeError: out of memory"
    assert d.best_dense == "dense:b" and d.best_dense_ms == 0.9


@pytest.mark.parametrize("sparse_ms, wins", [(0.98, False), (0.96, True), (1.2, False)])
def test_sparse_must_beat_the_best_dense_form_by_the_margin(monkeypatch, sparse_ms, wins):
    x = torch.randn(4, 8)
    cands, _ = _candidates(x)
    monkeypatch.setattr(Chooser, "time", _clock({"dense:a": 1.0, "dense:b": 1.5, "sparse": sparse_ms, "wrong": 0.1}))
    d = Chooser("cpu", margin=0.03).choose("layer", cands, (x,))
    assert d.chosen == ("sparse" if wins else "dense:a")
    assert ("margin" in d.reason) == (not wins and sparse_ms < 1.0)


def test_policies_keep_their_side_among_correct_candidates(monkeypatch):
    x = torch.randn(4, 8)
    cands, _ = _candidates(x)
    monkeypatch.setattr(Chooser, "time", _clock({"dense:a": 1.0, "dense:b": 1.5, "sparse": 3.0, "wrong": 0.1}))
    assert Chooser("cpu", policy="sparse").choose("l", cands, (x,)).chosen == "sparse"  # never "wrong"
    monkeypatch.setattr(Chooser, "time", _clock({"dense:a": 1.0, "dense:b": 0.7, "sparse": 0.1, "wrong": 0.1}))
    assert Chooser("cpu", policy="dense").choose("l", cands, (x,)).chosen == "dense:b"
    with pytest.raises(ValueError):
        Chooser("cpu", policy="fastest")


def test_saved_and_forced_decisions_are_taken_without_timing(monkeypatch):
    x = torch.randn(4, 8)
    cands, _ = _candidates(x)
    monkeypatch.setattr(Chooser, "time", _clock({"dense:a": 1.0, "dense:b": 1.5, "sparse": 0.5, "wrong": 0.1}))
    first = Chooser("cpu").choose("layer", cands, (x,))
    monkeypatch.setattr(Chooser, "time", _no_timing)
    monkeypatch.setattr(Chooser, "check", _no_timing)
    again = Chooser("cpu").choose("layer", cands, (x,), saved=first.to_dict())
    assert again.how == "saved" and again.chosen == "sparse" and again.times_ms == first.times_ms
    assert Decision.from_dict({**first.to_dict(), "unknown_key": 1}).chosen == "sparse"
    forced = Chooser("cpu").choose("layer", cands, (x,), forced="dense:b")
    assert forced.how == "forced" and forced.chosen == "dense:b"


# --- the whole-graph guard (base.Engine._plan_graph) --------------------------------------

class _FakeReplay:
    """Stands in for a CUDA graph on CPU: 'capture' runs fn, replay runs it again."""

    built: list = []

    def __init__(self, fn, example_inputs, warmup=3, first_call=True):
        self.fn, self.inputs = fn, tuple(example_inputs)
        self.static_outputs = fn(*self.inputs)
        _FakeReplay.built.append(self)

    def replay(self):
        return self.fn(*self.inputs)


def _three_convs():
    g = torch.Generator().manual_seed(0)
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        inits += [numpy_helper.from_array(torch.randn(4, 4, 3, 3, generator=g).numpy() * 0.3, f"w{i}"),
                  numpy_helper.from_array(torch.randn(4, generator=g).numpy(), f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _engine(state=None, extra=None) -> Engine:
    """A sparse engine whose every Conv is a Switch of 'sparse' (correct) and its dense forms,
    chosen by the one chooser the way the runtimes do it (saved decisions from `state`)."""
    saved = (state or {}).get("choices") or {}

    def build(ctx):
        w, b = ctx.const(1), ctx.const(2)
        conv = (lambda t: F.conv2d(t, w, b, padding=1))
        cands = [Candidate("dense:cudnn", conv, dense=True), Candidate("dense:cudnn_nhwc", conv, dense=True),
                 Candidate("sparse", conv, dense=False, library="test")]
        d = Chooser("cpu").choose(ctx.name, cands, (torch.randn(1, 4, 8, 8),), saved=saved.get(ctx.name))
        ctx.inputs_used = [0]
        return Switch(d, cands, ctx.info)

    opts = CompileOptions(extra=dict(extra or {}))
    model = _three_convs()
    ex = Executor(model, "cpu", ops={("", "Conv"): build}, options=opts.extra)
    eng = Engine(model, "cpu", opts, ex)
    eng.plans = dict((state or {}).get("plans") or {})
    return eng


@pytest.mark.parametrize("partial_ms, plan", [(0.5, "partial"), (2.0, "dense")])
def test_a_sparse_engine_that_loses_falls_back_says_so_and_replays_on_reload(monkeypatch, partial_ms, plan):
    monkeypatch.setattr(base, "GraphReplay", _FakeReplay)
    monkeypatch.setattr(Chooser, "time", _clock({"dense:cudnn": 1.0, "dense:cudnn_nhwc": 1.2, "sparse": 0.5}))
    fake = {"as chosen": 3.0, "dense": 1.0, "cudnn": 1.5, "cudnn_nhwc": 2.0, "partial": partial_ms}
    monkeypatch.setattr(chooser, "guard_graphs", lambda graphs, device, **k: (
        min(graphs, key=fake.get), {g: fake[g] for g in graphs}))
    eng = _engine()
    x = eng.prepare(torch.randn(1, 4, 8, 8))
    assert all(not sw.is_dense for sw in eng.switches())
    replay = eng._plan_graph("key", x)
    record = eng.plans["1x4x8x8"]
    assert record["chosen"] == plan and "whole-graph guard" in record["reason"]
    assert record["sparse_layers"] == ["conv0", "conv1", "conv2"]
    dense_now = [sw.name for sw in eng.switches() if sw.is_dense]
    if plan == "partial":  # the least profitable half (of 3: one layer) went back to dense
        assert record["reverted"] == dense_now and len(dense_now) == 1
    else:
        assert dense_now == ["conv0", "conv1", "conv2"]
        assert all(sw.active == "dense:cudnn" for sw in eng.switches())  # each layer's best dense form
    for sw in eng.switches():  # each switched layer's report says why
        assert ("whole-graph guard" in sw.info["choice"].get("why", "")) == (sw.name in dense_now)
    assert rel_err(replay.replay()[0], eng.executor(*x)[0]) == 0.0
    state = eng.full_state()
    assert state["plans"]["1x4x8x8"]["chosen"] == plan and set(state["choices"]) == {"conv0", "conv1", "conv2"}

    monkeypatch.setattr(Chooser, "time", _no_timing)
    monkeypatch.setattr(chooser, "guard_graphs", _no_timing)
    again = _engine(state)
    assert [sw.decision.how for sw in again.switches()] == ["saved"] * 3
    again._plan_graph("key", x)
    assert [sw.name for sw in again.switches() if sw.is_dense] == dense_now


def test_guard_off_keeps_the_engine_as_its_layers_chose(monkeypatch):
    monkeypatch.setattr(base, "GraphReplay", _FakeReplay)
    monkeypatch.setattr(Chooser, "time", _clock({"dense:cudnn": 1.0, "dense:cudnn_nhwc": 1.2, "sparse": 0.5}))
    monkeypatch.setattr(chooser, "guard_graphs", _no_timing)
    eng = _engine(extra={"guard": False})
    eng._plan_graph("key", eng.prepare(torch.randn(1, 4, 8, 8)))
    assert eng.plans["1x4x8x8"] == {"chosen": "as chosen", "reason": "guard off"}
    assert not any(sw.is_dense for sw in eng.switches())
