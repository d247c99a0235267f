"""The portable 2:4 layout, the rewrite pass and the reference ops."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers import ort_run, rel_err
from sparsecnn.passes.graph import SPARSECNN_DOMAIN, check_model, run_pipeline
from sparsecnn.passes.prune import prune_2to4
from sparsecnn.passes.two_four.layout import (conv_gemm_view, conv_weight_from_view, pack_2to4, rewrite_2to4,
                                       unpack_2to4)
from sparsecnn.runtimes import get_runtime


def random_2to4(m: int, k: int, seed: int) -> torch.Tensor:
    """Random matrix with every 2-of-4 pattern, including groups with 0 or 1 non-zeros."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k // 4, 4, generator=g)
    keep = torch.rand(m, k // 4, 4, generator=g).argsort(-1) < torch.randint(0, 3, (m, k // 4, 1), generator=g)
    return (a * keep).reshape(m, k)


def test_pack_of_a_hand_made_row_gives_the_documented_bytes():
    # group 0 keeps positions 1, 3; group 1 has one non-zero (pos 0) and fills with pos 1.
    a = torch.tensor([[0.0, 5.0, 0.0, 7.0, 3.0, 0.0, 0.0, 0.0]])
    values, positions = pack_2to4(a)
    assert values.tolist() == [[5.0, 7.0, 3.0, 0.0]]
    assert positions.dtype == torch.uint8
    assert positions.tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]  # codes 1,3,0,1 little end first


@pytest.mark.parametrize("m,k", [(1, 4), (3, 8), (5, 12), (7, 36), (16, 576)])
def test_layout_round_trips_exactly(m, k):
    a = random_2to4(m, k, seed=m * 1000 + k)
    # Edge groups on row 0: all zero, ties of equal magnitude, single non-zero at the last position.
    if k >= 12:
        a[0, 0:4] = 0.0
        a[0, 4:8] = torch.tensor([0.0, 2.0, -2.0, 0.0])
        a[0, 8:12] = torch.tensor([-0.0, 0.0, 0.0, 9.5])
    values, positions = pack_2to4(a)
    assert values.shape == (m, k // 2) and positions.shape == (m, (k // 2 + 3) // 4)
    back = unpack_2to4(values, positions)
    assert torch.equal(back, a)
    # Every group stores two distinct ascending positions.
    codes = torch.stack([(positions >> (2 * i)) & 3 for i in range(4)], -1).reshape(m, -1)[:, :k // 2]
    pairs = codes.reshape(m, k // 4, 2)
    assert bool((pairs[..., 0] < pairs[..., 1]).all())


def test_layout_round_trips_fp16_and_bf16_values_bit_exactly():
    a = random_2to4(6, 40, seed=3)
    for dtype in (torch.float16, torch.bfloat16):
        h = a.to(dtype)
        values, positions = pack_2to4(h)
        assert values.dtype == dtype
        back = unpack_2to4(values, positions)
        nz = h != 0
        assert torch.equal(back.view(torch.int16)[nz], h.view(torch.int16)[nz])  # non-zeros bit-exact
        assert bool((back[~nz] == 0).all())


def test_pack_refuses_three_non_zeros_in_a_group():
    with pytest.raises(ValueError, match="not 2:4"):
        pack_2to4(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_2to4(torch.zeros(2, 6))


def test_conv_gemm_view_is_tap_major_and_inverts():
    w = torch.randn(5, 8, 3, 2)
    a = conv_gemm_view(w)
    cin, kw = 8, 2
    for o, c, r, s in [(0, 0, 0, 0), (4, 7, 2, 1), (2, 3, 1, 0)]:
        assert a[o, (r * kw + s) * cin + c] == w[o, c, r, s]
    assert torch.equal(conv_weight_from_view(a, (3, 2)), w)


def _pruned(exported, name):
    return prune_2to4(exported(name)).model


def test_rewrite_tinyresnet_shrinks_the_file_and_matches_onnxruntime(exported):
    dense = _pruned(exported, "tinyresnet")
    sparse, results = run_pipeline(dense, [(rewrite_2to4, {})])
    assert results[0].counters["converted_conv"] == 8
    assert results[0].counters["left_dense_not_2to4"] == 2  # stem and classifier
    assert sum(n.domain == SPARSECNN_DOMAIN for n in sparse.graph.node) == 8
    assert sparse.ByteSize() < 0.62 * dense.ByteSize()
    # Shape information survives the custom ops.
    inferred = onnx.shape_inference.infer_shapes(sparse)
    known = {vi.name for vi in inferred.graph.value_info}
    assert all(o in known for n in sparse.graph.node if n.domain == SPARSECNN_DOMAIN for o in n.output)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    ref = ort_run(dense, x)
    out = get_runtime("torch").compile(sparse, "cpu")(torch.from_numpy(x))
    assert rel_err(out[0], ref[0]) < 1e-5


def test_rewrite_resnet18_converts_every_pruned_conv(exported):
    dense = _pruned(exported, "resnet18")
    res = rewrite_2to4(dense)
    check_model(res.model)
    assert res.counters["converted_conv"] == 19 and res.counters["left_dense_not_2to4"] == 2
    assert res.model.ByteSize() < 0.56 * dense.ByteSize()


def _gemm_model(trans_b: int) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(trans_b)
    w = random_2to4(12, 16, seed=7).numpy()  # [out, in], 2:4 along in
    stored = w if trans_b else w.T.copy()
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), w


@pytest.mark.parametrize("trans_b", [0, 1])
def test_rewrite_gemm_stores_the_out_in_view_and_matches_onnxruntime(trans_b):
    model, w = _gemm_model(trans_b)
    sparse, results = run_pipeline(model, [(rewrite_2to4, {})])
    assert results[0].counters["converted_gemm"] == 1
    node = sparse.graph.node[0]
    assert (node.domain, node.op_type) == (SPARSECNN_DOMAIN, "Gemm2to4")
    inits = {t.name: numpy_helper.to_array(t) for t in sparse.graph.initializer}
    values, positions = inits[node.input[1]], inits[node.input[2]]
    np.testing.assert_array_equal(unpack_2to4(torch.tensor(values), torch.tensor(positions)).numpy(), w)
    x = np.random.default_rng(1).standard_normal((5, 16), dtype=np.float32)
    out = get_runtime("torch").compile(sparse, "cpu")(torch.from_numpy(x))
    assert rel_err(out[0], ort_run(model, x)[0]) < 1e-6


def test_layers_sharing_a_weight_share_its_packed_tensors():
    w = random_2to4(12, 16, seed=3).numpy()  # [out, in], 2:4 along in
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["a"], name="fc_a", transB=1),
         helper.make_node("Gemm", ["x", "w"], ["b"], name="fc_b", transB=1),
         helper.make_node("Gemm", ["x", "w_t"], ["c"], name="fc_c"),
         helper.make_node("Add", ["a", "b"], ["ab"], name="add_ab"),
         helper.make_node("Add", ["ab", "c"], ["y"], name="add_c")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 12])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "w_t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    sparse, results = run_pipeline(model, [(rewrite_2to4, {})])
    assert results[0].counters["converted_gemm"] == 3
    names = [t.name for t in sparse.graph.initializer]
    assert sorted(names) == ["w.2to4_positions", "w.2to4_values", "w_t.2to4_positions", "w_t.2to4_values"]
    fc = {n.name: list(n.input) for n in sparse.graph.node}
    assert fc["fc_a"][1:] == fc["fc_b"][1:] == ["w.2to4_values", "w.2to4_positions"]
    x = np.random.default_rng(2).standard_normal((5, 16), dtype=np.float32)
    out = get_runtime("torch").compile(sparse, "cpu")(torch.from_numpy(x))
    np.testing.assert_allclose(out[0].numpy(), 3 * x @ w.T, rtol=1e-5, atol=1e-5)
