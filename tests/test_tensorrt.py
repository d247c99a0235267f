"""The tensorrt runtime. TensorRT is not installable here: the real-engine tests run only where
`import tensorrt` works; elsewhere the version table, the log parser and the report are tested."""
import importlib.util

import numpy as np
import pytest
import torch

from helpers import ort_run, rel_err
from sparsecnn.passes.fp16 import to_fp16
from sparsecnn.passes.graph import check_model, run_pipeline
from sparsecnn.passes.prune import prune_2to4
from sparsecnn.runtimes.tensorrt import trt_compat
from sparsecnn.runtimes.tensorrt import runtime as trt_rt

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it cannot be on this project's "
                                                   "machines); these tests run where `import tensorrt` works")


@pytest.mark.parametrize("version,dtype,fp16_flag,expect", [
    # Jetson Nano (JetPack 4.6): explicit batch, FP16 flag, old workspace field, bindings + v2.
    ((8, 2, 1), "fp16", True, dict(explicit_batch_flag=True, strongly_typed=False, fp16_builder_flag=True,
                                   workspace_api="max_workspace_size", exec_api="execute_async_v2")),
    ((8, 4, 3), "fp16", True, dict(workspace_api="set_memory_pool_limit", exec_api="execute_async_v2")),
    ((8, 6, 1), "fp32", True, dict(explicit_batch_flag=True, fp16_builder_flag=False, exec_api="execute_async_v3")),
    # Orin Nano (JetPack 6): no explicit-batch flag, still weakly typed with the FP16 flag.
    ((10, 3, 0), "fp16", True, dict(explicit_batch_flag=False, strongly_typed=False, fp16_builder_flag=True,
                                    onnx_must_be_fp16=False)),
    # 10.12+: strongly typed, fp16 must come from the ONNX.
    ((10, 12, 0), "fp16", True, dict(strongly_typed=True, fp16_builder_flag=False, onnx_must_be_fp16=True)),
    ((10, 12, 0), "fp32", True, dict(strongly_typed=True, onnx_must_be_fp16=False)),
    # 11: no FP16 flag at all.
    ((11, 0, 0), "fp16", False, dict(strongly_typed=True, fp16_builder_flag=False, onnx_must_be_fp16=True,
                                     explicit_batch_flag=False, exec_api="execute_async_v3")),
])
def test_build_settings_per_tensorrt_version(version, dtype, fp16_flag, expect):
    s = trt_compat.build_settings(version, dtype, has_fp16_flag=fp16_flag)
    assert s["sparse_weights_flag"] is True
    for key, value in expect.items():
        assert s[key] == value, key


def test_parse_version():
    assert trt_compat.parse_version("8.2.1.8") == (8, 2, 1)
    assert trt_compat.parse_version("10.12.0.36") == (10, 12, 0)
    assert trt_compat.parse_version("11.0") == (11, 0, 0)
    assert trt_compat.parse_version("10.3.0rc1") == (10, 3, 0)


# The format of TensorRT's sparsity log, as the TensorRT developer guide shows it.
LOG = [
    "[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3",
    "[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3",
]


def test_sparsity_log_parses_both_lists():
    parsed = trt_compat.parse_sparsity_log(LOG + ["unrelated line"])
    assert parsed == {"eligible": ["conv1", "conv2", "conv3"], "picked_sparse": ["conv2", "conv3"]}


def test_fused_layer_names_match_their_onnx_nodes():
    names = ["/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu", "/fc/Gemm"]
    assert trt_compat.match_layer("/layer1/layer1.0/conv1/Conv", names)
    assert trt_compat.match_layer("/fc/Gemm", names)
    assert not trt_compat.match_layer("/layer1/layer1.0/conv2/Conv", names)


def test_layer_report_from_a_build_log(exported):
    model = prune_2to4(exported("tinyresnet")).model
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    stem, a, b = convs[0], convs[1], convs[2]
    log = [f"[I] [TRT] (Sparsity) Layers eligible for sparse math: {a} + /layer1/relu/Relu, {b}",
           f"[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: {b}"]
    rows = {r["name"]: r for r in trt_rt.layer_report(model, trt_compat.parse_sparsity_log(log))}
    assert rows[b]["picked_sparse"] and rows[b]["eligible"]
    assert rows[a]["eligible"] and not rows[a]["picked_sparse"] and "dense kernel faster" in rows[a]["reason"]
    assert not rows[stem]["two_four"] and rows[stem]["reason"] == "weights not 2:4"


def test_unavailable_says_it_was_never_run_here():
    ok, reason = trt_rt.available()
    if not HAS_TRT:
        assert not ok and "never been run" in reason


def test_fp16_onnx_keeps_fp32_io_and_matches_onnxruntime(exported):
    model = prune_2to4(exported("tinyresnet")).model
    half, results = run_pipeline(model, [(to_fp16, {"keep_io_types": True})])
    check_model(half)
    assert results[0].counters["initializers"] == 20
    assert all(t.data_type == 10 for t in half.graph.initializer if t.dims and len(t.dims) > 1)  # FLOAT16
    assert half.graph.input[0].type.tensor_type.elem_type == 1 and half.graph.output[0].type.tensor_type.elem_type == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    assert rel_err(ort_run(half, x)[0], ort_run(model, x)[0]) < 5e-3


def test_fp16_pass_clips_values_beyond_the_fp16_range():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([1e6, -2.0], dtype=np.float32), "k")])
    res = to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    assert res.counters["values_clipped_to_fp16_range"] == 1
    k = numpy_helper.to_array(res.model.graph.initializer[0])
    assert k.dtype == np.float16 and k[0] == np.float16(65504) and k[1] == -2


# --- where TensorRT exists -----------------------------------------------------------------

@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tensorrt_engine_matches_onnxruntime_and_saves_its_plan(exported, tmp_path, dtype):
    from sparsecnn.runtimes import load_engine

    model = prune_2to4(exported("tinyresnet")).model
    engine = trt_rt.compile(model, "cuda", {"dtype": dtype, "extra": {"batch": [1, 2, 4]}})
    x = torch.randn(2, 3, 32, 32)
    ref = ort_run(model, x.numpy())[0]
    assert rel_err(engine(x)[0], ref) < (1e-3 if dtype == "fp32" else 2e-2)
    rows = engine.report()
    assert {r["name"] for r in rows} >= {n.name for n in model.graph.node if n.op_type == "Conv"}
    assert any(line for line in engine.log_lines)
    path = engine.save(tmp_path / "t.engine")
    again = load_engine(path)
    assert again.plan == engine.plan  # reused, not rebuilt
    assert rel_err(again(x)[0], ref) < (1e-3 if dtype == "fp32" else 2e-2)
