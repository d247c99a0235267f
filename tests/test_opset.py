"""passes/opset.py: going down to an older opset past the versions onnx.version_converter has no adapter
for (a ReLU at opset 14+ never reached 13), checked against ONNX Runtime on the model as it was."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparsecnn.common.errors import UserError
from sparsecnn.converter.source import convert_opset
from sparsecnn.passes.opset import convert_version


def _model(opset: int, allowzero: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Add -> HardSwish -> Reshape (allowzero) -> Gemm."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("w", 4, 3, 3, 3), init("scale", 4), init("bias", 4), init("mean", 4),
             numpy_helper.from_array(np.ones(4, np.float32), "var"), init("fc", 5, 64),
             numpy_helper.from_array(np.array([1, 64], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "b"], ["a"], name="add"),
             helper.make_node("HardSwish", ["a"], ["h"], name="hswish"),
             helper.make_node("Reshape", ["h", "shape"], ["f"], allowzero=allowzero, name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("have", [17, 18, 20])
def test_a_model_goes_down_to_opset_13_with_the_same_outputs(have):
    model = _model(have)
    before = model.SerializeToString()
    down = convert_opset(model, 13, "m.onnx")
    assert model.SerializeToString() == before  # the input is left as it was
    assert [o.version for o in down.opset_import if o.domain == ""] == [13] and len(down.opset_import) == 1
    ops = [n.op_type for n in down.graph.node]
    assert "HardSwish" not in ops and ops.count("HardSigmoid") == 1  # HardSwish came at 14
    reshape = next(n for n in down.graph.node if n.op_type == "Reshape")
    assert not reshape.attribute  # allowzero (14) at its default goes; opset 13 does not know it
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(down, x), _run(model, x), rtol=1e-5, atol=1e-5)


def test_what_changes_meaning_is_left_to_the_converter_and_its_refusal_is_one_line():
    model = _model(17, allowzero=1)  # allowzero=1 means something opset 13 cannot say
    assert convert_version(_model(17), 13) is not None
    with pytest.raises(UserError, match=r"cannot convert m.onnx from opset 17 to 13 .*re-export it at opset 13"):
        convert_opset(model, 13, "m.onnx")


def test_going_up_is_the_converters_alone():
    up = convert_version(_model(14), 17)
    assert [o.version for o in up.opset_import if o.domain == ""] == [17]
    assert any(n.op_type == "HardSwish" for n in up.graph.node)
