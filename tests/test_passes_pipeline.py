"""run_pipeline: which pass failed and after which, UserErrors kept for the user, the dump hook."""
import functools
from collections import Counter

import onnx
import pytest
from onnx import TensorProto, helper

from sparsecnn.common.errors import UserError
from sparsecnn.passes.graph import PassError, PassResult, run_pipeline


def relu_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def keep(model, tag="kept"):
    return PassResult(model, Counter({tag: 1}))


def add_identity(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node[0].output[0] = "r"
    out.graph.node.append(helper.make_node("Identity", ["r"], ["y"], name="identity"))
    return PassResult(out, Counter(identities=1), "add_identity")


def crash(model):
    raise KeyError("no such weight")


def refuse(model):
    raise UserError("weight 'w' has 3 input channels; 2:4 needs a multiple of 4")


def break_graph(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node[0].input[0] = "missing"  # reads a tensor nothing produces: the checker rejects it
    return PassResult(out, Counter(), "break_graph")


def test_results_in_order_named_after_the_pass_unless_it_names_itself():
    model, results = run_pipeline(relu_model(), [(keep, {}), (add_identity, {}), (keep, {"tag": "again"})])
    assert [r.name for r in results] == ["keep", "add_identity", "keep"]
    assert [dict(r.counters) for r in results] == [{"kept": 1}, {"identities": 1}, {"again": 1}]
    assert [n.op_type for n in model.graph.node] == ["Relu", "Identity"]


def test_an_exception_in_a_pass_names_it_and_the_passes_before_it():
    with pytest.raises(PassError) as info:
        run_pipeline(relu_model(), [(keep, {}), (functools.partial(add_identity), {}), (crash, {}), (keep, {})])
    assert str(info.value) == ("An error occurred when running the 'crash' pass after the following passes: "
                               "['keep', 'add_identity']")
    assert isinstance(info.value.__cause__, KeyError)


def test_a_model_that_fails_the_check_is_blamed_on_the_pass_that_made_it():
    with pytest.raises(PassError, match=r"'break_graph' pass after the following passes: \[\]") as info:
        run_pipeline(relu_model(), [(break_graph, {}), (keep, {})])
    assert isinstance(info.value.__cause__, onnx.checker.ValidationError)


def test_a_user_error_stays_one_line_for_the_user_and_names_the_pass():
    with pytest.raises(UserError) as info:
        run_pipeline(relu_model(), [(keep, {}), (refuse, {})])
    assert str(info.value) == "weight 'w' has 3 input channels; 2:4 needs a multiple of 4 (in the 'refuse' pass)"
    assert "\n" not in str(info.value) and not isinstance(info.value, PassError)


def test_dump_dir_holds_the_model_before_and_after_each_pass(tmp_path):
    run_pipeline(relu_model(), [(keep, {}), (add_identity, {})], dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.split("-", 1)[1] for f in files] == ["00-input.onnx", "01-keep.onnx", "02-add_identity.onnx"]
    assert len({f.split("-", 1)[0] for f in files}) == 1  # one run, one prefix
    last = onnx.load(str(tmp_path / files[-1]))
    assert [n.op_type for n in last.graph.node] == ["Relu", "Identity"]


def test_the_environment_variable_turns_the_dump_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECNN_DUMP_PASSES", str(tmp_path / "dumps"))
    run_pipeline(relu_model(), [(keep, {})])
    assert len(list((tmp_path / "dumps").iterdir())) == 2
    monkeypatch.delenv("SPARSECNN_DUMP_PASSES")
    run_pipeline(relu_model(), [(keep, {})], dump_dir=None)
    assert len(list((tmp_path / "dumps").iterdir())) == 2
