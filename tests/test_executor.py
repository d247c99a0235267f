import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from helpers import input_shape, ort_run, rel_err
from sparsecnn.common.errors import UserError
from sparsecnn.passes.prune import prune_2to4, prune_unstructured
from sparsecnn.runtimes import get_runtime


@pytest.mark.parametrize("name,prune", [("resnet18", "0.9"), ("resnet18", "2:4"), ("vgg19", "0.9"),
                                        ("trafficcamnet", "0.9"), ("tinyresnet", "2:4")])
def test_torch_runtime_reproduces_onnxruntime_on_pruned_models(exported, name, prune):
    dense = exported(name)
    model = (prune_2to4(dense) if prune == "2:4" else prune_unstructured(dense, float(prune))).model
    x = np.random.default_rng(0).standard_normal(input_shape(model, 2 if name.startswith("tiny") else 1)).astype(np.float32)
    engine = get_runtime("torch").compile(model, "cpu", {"dtype": "fp32"})
    ours = engine(torch.from_numpy(x))
    ref = ort_run(model, x)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert tuple(a.shape) == b.shape
        assert rel_err(a, b) <= 1e-4


def _single_node_model(node, inputs, outputs, initializers=()):
    graph = helper.make_graph([node], "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("node_kwargs", [
    dict(op_type="MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
    dict(op_type="MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    dict(op_type="AveragePool", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0),
    dict(op_type="AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(op_type="Conv", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
    dict(op_type="Conv", kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(op_type="Conv", kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2]),
])
def test_spatial_ops_match_onnxruntime_including_asymmetric_padding(node_kwargs):
    op_type = node_kwargs.pop("op_type")
    rng = np.random.default_rng(1)
    inits, ins = [], ["x"]
    if op_type == "Conv":
        inits = [onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
        ins = ["x", "w"]
    node = helper.make_node(op_type, ins, ["y"], **node_kwargs)
    model = _single_node_model(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 11])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    x = rng.standard_normal((1, 3, 9, 11)).astype(np.float32)
    ours = get_runtime("torch").compile(model, "cpu", {})(torch.from_numpy(x))[0]
    ref = ort_run(model, x)[0]
    assert tuple(ours.shape) == ref.shape
    assert rel_err(ours, ref) < 1e-5


def _const(name, values, dtype=np.float32):
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


_W = np.random.default_rng(2).standard_normal((4, 3, 3, 3))
# ops torchvision CNNs and common layers export (MobileNetV3, ConvNeXt, ShuffleNet, segmentation
# heads, decoders), each in the forms their exporters write, against ONNX Runtime
STANDARD_OP_CASES = {
    "HardSwish": (dict(op_type="HardSwish"), []),
    "HardSigmoid": (dict(op_type="HardSigmoid", alpha=1 / 6, beta=0.5), []),
    "Erf": (dict(op_type="Erf"), []),
    "LayerNormalization": (dict(op_type="LayerNormalization", axis=-1, epsilon=1e-6),
                           [_const("s", np.linspace(0.5, 2, 11)), _const("b", np.linspace(-1, 1, 11))]),
    "ConvTranspose": (dict(op_type="ConvTranspose", strides=[2, 2]), [_const("w", _W), _const("b", [1, 2, 3])]),
    "ConvTranspose-asymmetric": (dict(op_type="ConvTranspose", strides=[3, 2], pads=[1, 0, 0, 1], output_padding=[2, 1]),
                                 [_const("w", _W), _const("b", [1, 2, 3])]),
    "Slice-reversed": (dict(op_type="Slice"), [_const("st", [-1, 7], np.int64), _const("en", [-2**63 + 1, 0], np.int64),
                                               _const("ax", [3, 2], np.int64), _const("sp", [-1, -3], np.int64)]),
    "Resize-linear": (dict(op_type="Resize", mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
                      [_const("roi", []), _const("sc", [1, 1, 2.0, 1.5])]),
    "Resize-nearest": (dict(op_type="Resize", mode="nearest", coordinate_transformation_mode="asymmetric",
                            nearest_mode="floor"), [_const("roi", []), _const("sc", [1, 1, 2.0, 3.0])]),
    "Split": (dict(op_type="Split", axis=1), [_const("split", [1, 3], np.int64)]),
    "Pow": (dict(op_type="Pow"), [_const("p", 2.0)]),
    "Max": (dict(op_type="Max"), [_const("m", [[[0.1]], [[-0.2]], [[0.0]], [[0.3]]])]),
    "Expand": (dict(op_type="Expand"), [_const("shape", [3, 1, 1, 1, 1], np.int64)]),
    "PRelu": (dict(op_type="PRelu"), [_const("slope", [[[0.1]], [[0.2]], [[0.3]], [[0.4]]])]),
    "Softplus": (dict(op_type="Softplus"), []),
    "Elu": (dict(op_type="Elu", alpha=0.7), []),
    "InstanceNormalization": (dict(op_type="InstanceNormalization"), [_const("s", [1, 2, 3, 4]), _const("b", [0, 1, 0, 1])]),
}


@pytest.mark.parametrize("case", sorted(STANDARD_OP_CASES))
def test_standard_ops_of_common_cnns_match_onnxruntime(case):
    kwargs, inits = STANDARD_OP_CASES[case]
    kwargs = dict(kwargs)
    op_type = kwargs.pop("op_type")
    outs = ["y", "z"] if op_type == "Split" else ["y"]
    node = helper.make_node(op_type, ["x"] + [t.name for t in inits], outs, **kwargs)
    model = _single_node_model(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 11])],
                               [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (5 if op_type == "Expand" else 4))
                                for o in outs], inits)
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 11)).astype(np.float32)
    ours = get_runtime("torch").compile(model, "cpu", {})(torch.from_numpy(x))
    ref = ort_run(model, x)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert tuple(a.shape) == b.shape
        assert rel_err(a, b) < 1e-5


def test_integer_shape_arithmetic_divides_as_onnx_does():
    """ShuffleNet's x.chunk(2, dim=1): Shape -> Gather -> Add -> Div -> Mul -> Slice bounds. ONNX
    divides integers (truncating); a float quotient made Slice fail inside the engine with a traceback."""
    class Half(torch.nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return a * 2 - b

    path = io.BytesIO()
    torch.onnx.export(Half(), (torch.zeros(1, 4, 3, 3),), path, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {1: "C"}})
    model = onnx.load_from_string(path.getvalue())
    assert "Div" in {n.op_type for n in model.graph.node}
    x = np.random.default_rng(0).standard_normal((1, 6, 3, 3)).astype(np.float32)
    ours = get_runtime("torch").compile(model, "cpu", {})(torch.from_numpy(x))[0]
    assert rel_err(ours, ort_run(model, x)[0]) < 1e-6


def test_unknown_op_fails_at_compile_time_naming_node_and_op():
    node = helper.make_node("Hardmax", ["x"], ["y"], name="weird_node")
    model = _single_node_model(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(UserError, match=r"weird_node.*Hardmax"):
        get_runtime("torch").compile(model, "cpu", {})


@pytest.mark.parametrize("args,match", [
    ((np.zeros((1, 3, 32, 32), np.float32),), r"input 'input' must be a torch tensor, got ndarray \(torch\.from_numpy"),
    ((torch.zeros(3, 32, 32),), r"has shape \[3, 32, 32\]; the model takes \[N, 3, 32, 32\]"),
    ((torch.zeros(1, 1, 32, 32),), r"has shape \[1, 1, 32, 32\]; the model takes \[N, 3, 32, 32\]"),
    ((torch.zeros(1, 3, 32, 32), torch.zeros(1)), r"model takes 1 input\(s\) \(input\), got 2"),
], ids=["numpy array", "no batch axis", "wrong channels", "an extra input"])
def test_engine_call_with_a_wrong_input_is_one_line(exported, args, match):
    """These failed deep inside a layer with torch's message (or AttributeError); a graph replay
    dropped an extra input silently."""
    engine = get_runtime("torch").compile(exported("tinynet"), "cpu", {})
    with pytest.raises(UserError, match=match):
        engine(*args)
    assert engine(torch.zeros(2, 3, 32, 32))[0].shape == (2, 10)  # any batch


def test_engine_save_load_roundtrip(exported, tmp_path):
    from sparsecnn.runtimes import load_engine

    model = prune_unstructured(exported("tinyresnet"), 0.7).model
    engine = get_runtime("torch").compile(model, "cpu", {"dtype": "fp32"})
    x = torch.randn(3, 3, 32, 32)
    path = engine.save(tmp_path / "t.engine")
    again = load_engine(path, "cpu")
    assert again.runtime == "torch" and again.options.dtype == "fp32"
    torch.testing.assert_close(again(x)[0], engine(x)[0], rtol=0, atol=0)


def test_engine_file_that_is_not_an_engine_is_a_user_error(tmp_path):
    from sparsecnn.runtimes import load_engine

    bad = tmp_path / "x.engine"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a sparsecnn engine"):
        load_engine(bad, "cpu")


def test_fp16_on_cpu_stays_close_to_fp32(exported):
    model = exported("tinyresnet")
    x = torch.randn(2, 3, 32, 32)
    rt = get_runtime("torch")
    a = rt.compile(model, "cpu", {"dtype": "fp32"})(x)[0]
    b = rt.compile(model, "cpu", {"dtype": "fp16"})(x)[0]
    assert b.dtype == torch.float32  # engines hand back fp32 whatever they ran in
    assert rel_err(b, a) < 2e-2
