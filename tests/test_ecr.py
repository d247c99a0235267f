"""ECR / PECR: formats, reference ops, the fusion pass, kernel plans (CPU emulation), kernels
compiled for the CI architectures, the `ecr` runtime; GPU tests run the kernels."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ecr_emulator import ReferenceEcrKernels, emulate
from helpers import rel_err
from sparsecnn.passes.ecr.rewrite import fuse_ecr
from sparsecnn.passes.graph import run_pipeline
from sparsecnn.passes.ecr.reference import (ConvGeometry, PoolGeometry, ecr_conv, ecr_decode, ecr_encode, pecr_conv_pool,
                                        pecr_decode, pecr_encode)
from sparsecnn.passes.ecr.reference import dense_conv_relu_pool as dense_reference


def sparse_input(shape, zero_fraction, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    x[torch.rand(shape, generator=g, dtype=torch.float64) < zero_fraction] = 0
    return x.to(dtype)


def loop_im2col(x, g: ConvGeometry):
    """im2col by explicit loops (independent of the F.unfold path under test)."""
    rows = []
    for n in range(g.n):
        for oy in range(g.oh):
            for ox in range(g.ow):
                row = []
                for c in range(g.cin):
                    for i in range(g.kh):
                        for j in range(g.kw):
                            iy, ix = oy * g.sh - g.pads[0] + i, ox * g.sw - g.pads[1] + j
                            row.append(float(x[n, c, iy, ix]) if 0 <= iy < g.h and 0 <= ix < g.w else 0.0)
                rows.append(row)
    return torch.tensor(rows, dtype=x.dtype)


GEOMS = [
    ConvGeometry(2, 3, 7, 9, 3, 3, 1, 1, (1, 1, 1, 1)),
    ConvGeometry(1, 4, 9, 11, 3, 3, 1, 2, (1, 0, 2, 1)),   # strides and asymmetric pads
    ConvGeometry(1, 5, 8, 7, 1, 1, 2, 2, (0, 0, 0, 0)),    # 1x1 stride 2 (a ResNet shortcut)
    ConvGeometry(1, 2, 6, 6, 2, 3, 1, 1, (0, 1, 0, 1)),    # non-square kernel
]


# --- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("g", GEOMS)
def test_ecr_rows_are_the_compressed_im2col_rows(g):
    x = sparse_input((g.n, g.cin, g.h, g.w), 0.6)
    ecr = ecr_encode(x, g)
    dense = loop_im2col(x, g)
    assert torch.equal(ecr_decode(ecr), dense)
    assert ecr.values.numel() == int((dense != 0).sum()) and bool((ecr.values != 0).all())
    ends = ecr.row_end.long()
    assert ends.numel() == g.positions and bool((ends[1:] >= ends[:-1]).all()) and int(ends[-1]) == ecr.values.numel()
    assert torch.equal(ecr.empty, (dense != 0).sum(1) == 0)


def test_kernel_index_is_c_kh_kw_plus_i_kw_plus_j():
    """The harness computed i*j+i; the index must be (c*kh + i)*kw + j."""
    g = ConvGeometry(1, 2, 3, 4, 3, 4, 1, 1, (0, 0, 0, 0))  # one window per row, kh=3, kw=4
    for c, i, j in [(0, 1, 2), (1, 2, 3), (1, 0, 1), (0, 2, 0)]:
        x = torch.zeros(1, 2, 3, 4)
        x[0, c, i, j] = 1.5
        ecr = ecr_encode(x, g)
        assert ecr.kernel_idx.tolist() == [(c * 3 + i) * 4 + j]
        assert ecr.values.tolist() == [1.5]


def test_empty_windows_are_marked_and_yield_the_bias_alone():
    g = ConvGeometry(1, 2, 6, 6, 3, 3, 1, 1, (1, 1, 1, 1))
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[0, 1, 0, 0] = 2.0  # only windows around the top-left corner see it
    ecr = ecr_encode(x, g)
    assert int((~ecr.empty).sum()) == 4
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    b = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    y = ecr_conv(ecr, w, b, relu=False)
    assert torch.equal(y[0, :, 4, 4], b)  # an empty window: exactly the bias
    assert torch.allclose(y[0, :, 0, 0], b + 2.0 * w[:, 1, 1, 1])


@pytest.mark.parametrize("g", GEOMS)
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("relu", [True, False])
def test_reference_ecr_conv_matches_conv2d(g, zeros, relu):
    x = sparse_input((g.n, g.cin, g.h, g.w), zeros, seed=int(zeros * 100))
    w = torch.randn(6, g.cin, g.kh, g.kw, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    y = ecr_conv(ecr_encode(x, g), w, b, relu)
    ref = dense_reference(x, w, b, g, relu)
    assert y.shape == ref.shape
    assert float((y - ref).abs().max()) <= 1e-12 * max(1.0, float(ref.abs().max()))


POOLS = [
    (ConvGeometry(2, 3, 8, 10, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2)),
    (ConvGeometry(1, 4, 9, 9, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(3, 3, 2, 2, (1, 1, 1, 1), True)),
    (ConvGeometry(1, 3, 7, 8, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2, (0, 0, 0, 0), True)),  # odd: ceil
    (ConvGeometry(1, 2, 7, 7, 3, 3, 2, 2, (1, 1, 1, 1)), PoolGeometry(3, 3, 1, 1)),  # overlapping, stride 1
]


@pytest.mark.parametrize("g,pool", POOLS)
def test_pecr_groups_conv_windows_by_pooling_window(g, pool):
    x = sparse_input((g.n, g.cin, g.h, g.w), 0.7)
    pecr = pecr_encode(x, g, pool)
    qh, qw = pool.out_size(g.oh, g.ow)
    assert pecr.counts.shape == (g.n * qh * qw, pool.kh * pool.kw)
    dense = loop_im2col(x, g).reshape(g.n, g.oh, g.ow, -1)
    rows, valid = pecr_decode(pecr)
    for q in range(0, pecr.counts.shape[0], 3):
        n, rest = divmod(q, qh * qw)
        qy, qx = divmod(rest, qw)
        for cell in range(pool.kh * pool.kw):
            i, j = divmod(cell, pool.kw)
            cy, cx = qy * pool.sh - pool.pads[0] + i, qx * pool.sw - pool.pads[1] + j
            inside = 0 <= cy < g.oh and 0 <= cx < g.ow
            assert bool(valid[q, cell]) == inside
            if inside:
                assert torch.equal(rows[q, cell], dense[n, cy, cx])
                assert int(pecr.counts[q, cell]) == int((dense[n, cy, cx] != 0).sum())
            else:
                assert int(pecr.counts[q, cell]) == -1
    per_window = pecr.counts.clamp_min(0).sum(1)
    assert torch.equal(pecr.pool_ptr[1:] - pecr.pool_ptr[:-1], per_window.long())


@pytest.mark.parametrize("g,pool", POOLS)
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_reference_pecr_matches_conv_relu_maxpool(g, pool, zeros):
    x = sparse_input((g.n, g.cin, g.h, g.w), zeros, seed=3)
    w = torch.randn(5, g.cin, g.kh, g.kw, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    y = pecr_conv_pool(pecr_encode(x, g, pool), w, b)
    ref = dense_reference(x, w, b, g, pool=pool)
    assert y.shape == ref.shape
    assert float((y - ref).abs().max()) <= 1e-12 * max(1.0, float(ref.abs().max()))


# --- fusion pass ----------------------------------------------------------------------------

def _conv(name, x, y, w, b=None, **attrs):
    ins = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", ins, [y], name=name, **attrs)


def _graph(nodes, inits, outputs, in_shape=(1, 4, 8, 8)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info(o, TensorProto.INT64 if o == "idx" else TensorProto.FLOAT,
                                                         ["n", "c", "h", "w"]) for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _w(cout, cin, k=3, seed=0):
    return np.random.default_rng(seed).standard_normal((cout, cin, k, k)).astype(np.float32)


def test_fusion_pass_turns_chains_into_ecr_ops_and_counts_the_rest():
    inits = {"w0": _w(4, 4, seed=1), "w1": _w(4, 4, seed=2), "b1": np.ones(4, np.float32), "w2": _w(4, 4, seed=3),
             "w3": _w(4, 2, seed=4), "w4": _w(4, 4, seed=5), "w5": _w(4, 4, seed=6), "w6": _w(4, 4, seed=8)}
    nodes = [
        helper.make_node("Relu", ["x"], ["r0"]),
        _conv("c1", "r0", "y1", "w1", "b1", pads=[1, 1, 1, 1]),          # conv-relu-pool: PECR
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        _conv("c2", "p1", "y2", "w2", pads=[1, 1, 1, 1]),                # conv-relu; the pool has indices: ECR
        helper.make_node("Relu", ["y2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
        _conv("c3", "p1", "y3", "w3", pads=[1, 1, 1, 1], group=2),        # grouped: skipped
        _conv("c4", "p1", "y4", "w4", pads=[2, 2, 2, 2], dilations=[2, 2]),  # dilated: skipped
        _conv("c0", "x", "y0", "w0", pads=[1, 1, 1, 1]),                 # reads the graph input: skipped
        _conv("c5", "p1", "y5", "w5", pads=[1, 1, 1, 1]),                # no relu after: plain ECR conv
        _conv("c6", "p1", "y6", "w6", pads=[1, 1, 1, 1]),                # relu output also a graph output: ECR
        helper.make_node("Relu", ["y6"], ["r6"]),
        helper.make_node("MaxPool", ["r6"], ["p6"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    model = _graph(nodes, inits, ["p2", "idx", "y3", "y4", "y0", "y5", "r6", "p6"])
    out, res = run_pipeline(model, [(fuse_ecr, {})])
    c = res[0].counters
    assert c["converted_conv_relu_pool"] == 1 and c["converted_conv_relu"] == 2 and c["converted_conv"] == 1
    assert c["skipped_grouped"] == 1 and c["skipped_dilated"] == 1 and c["skipped_input_not_after_relu"] == 1
    assert c["pool_not_fused_indices_output"] == 1
    by_name = {n.name: n for n in out.graph.node}
    pecr = by_name["c1"]
    assert (pecr.domain, pecr.op_type, list(pecr.output)) == ("sparsecnn", "EcrConvPool", ["p1"])
    attrs = {a.name: helper.get_attribute_value(a) for a in pecr.attribute}
    assert attrs["pool_kernel_shape"] == [2, 2] and attrs["pool_strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    assert attrs["input_shape"] == [4, 8, 8] and attrs["output_shape"] == [4, 4, 4]
    ecr = by_name["c2"]
    assert ecr.op_type == "EcrConv" and list(ecr.output) == ["r2"]
    assert by_name["c6"].op_type == "EcrConv" and list(by_name["c6"].output) == ["r6"]
    assert by_name["c5"].op_type == "EcrConv" and {a.name: a.i for a in by_name["c5"].attribute}["relu"] == 0
    assert {n.op_type for n in out.graph.node if n.name in ("c0", "c3", "c4")} == {"Conv"}
    assert not any(n.op_type == "Relu" and n.output[0] == "r1" for n in out.graph.node)


def test_fusion_pass_resolves_same_padding_and_keeps_results(exported):
    inits = {"w1": _w(3, 4, seed=7)}
    nodes = [helper.make_node("Relu", ["x"], ["r0"]),
             _conv("c1", "r0", "y1", "w1", auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Relu", ["y1"], ["r1"])]
    model = _graph(nodes, inits, ["r1"], in_shape=(1, 4, 9, 8))
    out, res = run_pipeline(model, [(fuse_ecr, {})])
    node = out.graph.node[-1]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "EcrConv" and attrs["pads"] == [1, 0, 1, 1]  # SAME_UPPER: extra pad at the end
    x = np.random.default_rng(0).standard_normal((1, 4, 9, 8)).astype(np.float32)
    _check_same_outputs(model, out, x)


def _check_same_outputs(original, rewritten, x, tol=1e-5):
    from helpers import ort_run
    from sparsecnn.runtimes import get_runtime

    ref = ort_run(original, x)
    eng = get_runtime("ecr").compile(rewritten, "cpu")
    outs = eng(torch.from_numpy(x))
    for o, r in zip(outs, ref):
        assert rel_err(o, r) <= tol


@pytest.mark.parametrize("name", ["tinynet", "tinyresnet"])
def test_ecr_runtime_on_cpu_matches_onnxruntime(exported, name):
    from sparsecnn.runtimes import get_runtime

    model = exported(name)
    rewritten = get_runtime("ecr").rewrite(model)
    kinds = {n.op_type for n in rewritten.graph.node if n.domain == "sparsecnn"}
    assert kinds == ({"EcrConv", "EcrConvPool"} if name == "tinynet" else {"EcrConv"})
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _check_same_outputs(model, rewritten, x)


@pytest.mark.slow
def test_vgg19_rewrite_fuses_every_conv_after_the_stem(exported):
    out, res = run_pipeline(exported("vgg19"), [(fuse_ecr, {})])
    c = res[0].counters
    assert (c["converted_conv_relu_pool"], c["converted_conv_relu"], c["skipped_input_not_after_relu"]) == (5, 10, 1)
    pools = [n for n in out.graph.node if n.op_type == "EcrConvPool"]
    shapes = [{a.name: helper.get_attribute_value(a) for a in n.attribute}["output_shape"] for n in pools]
    assert shapes == [[64, 112, 112], [128, 56, 56], [256, 28, 28], [512, 14, 14], [512, 7, 7]]


# --- kernel plans, checked by a CPU emulation of the kernel's index arithmetic -------------

PLAN_CASES = [
    (ConvGeometry(2, 5, 9, 11, 3, 3, 1, 2, (1, 0, 2, 1)), None, 7, False),
    (ConvGeometry(1, 6, 13, 10, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2), 70, True),
    (ConvGeometry(1, 5, 9, 9, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(3, 3, 2, 2, (1, 1, 1, 1), True), 9, True),
    (ConvGeometry(1, 9, 8, 8, 1, 1, 2, 2, (0, 0, 0, 0)), None, 130, True),
    (ConvGeometry(1, 70, 7, 7, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2), 33, True),  # many chunks: split-K
]


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_every_kernel_plan_computes_the_layer(case):
    from sparsecnn.runtimes.ecr.runtime import CANDIDATES, make_plan, pack_weights

    g, pool, cout, relu = PLAN_CASES[case]
    x = sparse_input((g.n, g.cin, g.h, g.w), 0.6, seed=case)
    w = torch.randn(cout, g.cin, g.kh, g.kw, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64)
    ref = dense_reference(x, w, b, g, relu, pool)
    wt, bias = pack_weights(w.float(), b.float())
    planned = 0
    for cand in CANDIDATES[case % 4::4]:  # a quarter of the candidates per case keeps this quick
        plan = make_plan(cand, g, pool, cout, relu, sm_count=8, max_smem=227 * 1024)
        if plan is None:
            continue
        planned += 1
        y = emulate(plan, x, wt, bias)
        assert rel_err(y, ref) <= 1e-6, (cand.name, plan.describe())
    assert planned > 0


@pytest.mark.parametrize("case", range(len(PLAN_CASES)))
def test_list_kernel_plans_compute_the_layer(case):
    """Every list-kernel variant (union groups G = 1, 2, 4) through the emulation of its two phases."""
    from sparsecnn.runtimes.ecr.runtime import CANDIDATES, make_plan, pack_weights

    g, pool, cout, relu = PLAN_CASES[case]
    x = sparse_input((g.n, g.cin, g.h, g.w), 0.7, seed=10 + case)
    x[..., : g.h // 3, :] = 0  # some all-zero windows: empty lists, the bias alone
    w = torch.randn(cout, g.cin, g.kh, g.kw, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64)
    ref = dense_reference(x, w, b, g, relu, pool)
    wt, bias = pack_weights(w.float(), b.float())
    seen = set()
    for cand in CANDIDATES:
        v = cand.variant
        if v.kind != "list" or (v, cand.kc_target) in seen or cand.split_scale != (0.0 if case == 4 else 1.0):
            continue
        plan = make_plan(cand, g, pool, cout, relu, sm_count=8, max_smem=227 * 1024)
        if plan is None:
            continue
        seen.add((v, cand.kc_target))
        if case == 4:  # whole-wave split of 8 SMs: split-K with its workspace slots
            assert plan.params["splits"] > 1
        y = emulate(plan, x, wt, bias)
        assert rel_err(y, ref) <= 1e-6, (cand.name, plan.describe())
    # G = 2 variants have CT = 256, planned only for more than 128 output channels
    assert {v.group for v, _ in seen} == ({1, 2, 3, 4} if cout > 128 else {1, 3, 4})


def test_whole_wave_split_and_occupancy():
    from sparsecnn.runtimes.ecr.runtime import Variant, blocks_per_sm, wave_splits

    # 392 tiles, 16 chunks, 264 resident blocks: 1 split = 2 waves x 16 chunks, 2 splits = 3 waves x 8
    assert wave_splits(392, 16, 264) == 2
    assert wave_splits(1000, 8, 264) == 1  # already ~4 full waves: splitting only adds waves
    assert wave_splits(8, 128, 264) == 32  # few tiles: split until one wave is full
    v = Variant(2, 8, 1, kind="list")  # 8 warps
    assert blocks_per_sm(v, 20 * 1024, registers=80) == 3  # 80 regs x 256 threads: 3 blocks of 64 K registers
    assert blocks_per_sm(v, 100 * 1024) == 2  # shared memory: 228 KB per SM
    assert blocks_per_sm(Variant(2, 16, 1, warps=16, kind="list"), 20 * 1024, registers=126) == 1


# --- the kernel source itself on the CPU (tests/cuda_emu.h: every CUDA thread a host thread) ----

EMU_LAYERS = [  # odd sizes; 2x2 pool; stride 2 with asymmetric pads, batch 2; 3x3/2 ceil pool, 300 filters
    (ConvGeometry(1, 6, 9, 11, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2), 70),
    (ConvGeometry(2, 5, 7, 9, 3, 3, 1, 2, (1, 0, 2, 1)), None, 40),
    (ConvGeometry(1, 9, 11, 11, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(3, 3, 2, 2, (1, 1, 1, 1), True), 300),
]


@pytest.mark.parametrize("layer", range(len(EMU_LAYERS)))
def test_kernel_source_on_cpu_emulator_matches_reference(layer):
    """Every kernel variant (warp, list and row kernels, fp32 and fp16, split-K or not) runs from
    cuda/ecr_conv.cu on the CPU emulator; two launches each, the workspace back to zero."""
    import cuda_emu
    from ecr_emulator import EmuEcrKernels
    from sparsecnn.runtimes.ecr.runtime import CANDIDATES, VARIANTS, make_plan, pack_weights

    if not cuda_emu.available():
        pytest.skip("g++ not installed")
    g, pool, cout = EMU_LAYERS[layer]
    kernels = EmuEcrKernels(VARIANTS)
    w = torch.randn(cout, g.cin, g.kh, g.kw) / g.k ** 0.5
    b = torch.randn(cout)
    wt, bias = pack_weights(w, b)
    qh, qw = pool.out_size(g.oh, g.ow) if pool else (g.oh, g.ow)
    tried = set()
    for i, v in enumerate(VARIANTS):
        cands = [c for c in CANDIDATES if c.variant == v]
        cand = cands[(i + layer) % len(cands)]
        plan = make_plan(cand, g, pool, cout, True, sm_count=3, max_smem=227 * 1024)  # few SMs: split-K
        if plan is None:
            continue
        tried.add(v)
        zeros = (0.0, 0.5, 0.9, 1.0)[(i + layer) % 4]
        dtype = (torch.float32, torch.float16)[(i + layer) % 2]
        x = sparse_input((g.n, g.cin, g.h, g.w), zeros, seed=100 * layer + i, dtype=torch.float32).to(dtype)
        ref = dense_reference(x.double(), w.double(), b.double(), g, True, pool)
        ws = torch.zeros(max(1, plan.ws_floats))
        tickets = torch.zeros(max(1, plan.tickets), dtype=torch.int32)
        y = torch.full((g.n, cout, qh, qw), float("nan"), dtype=dtype)
        for _ in range(2):
            kernels.launch(plan, x, wt, bias, y, ws, tickets)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert rel_err(y.double(), ref) <= tol, (cand.name, zeros, dtype, plan.describe())
        assert float(ws.abs().sum()) == 0 and int(tickets.abs().sum()) == 0, cand.name
    # the row kernel plans 3x3 kernels at stride 1 along x only (layer 1 has stride 2)
    assert {v.kind for v in tried} == ({"warp", "list"} if g.sw > 1 else {"warp", "list", "row"})


def test_plans_split_k_when_tiles_are_few_and_fit_shared_memory():
    from sparsecnn.runtimes.ecr.runtime import CANDIDATES, make_plan

    g = ConvGeometry(1, 512, 14, 14, 3, 3, 1, 1, (1, 1, 1, 1))  # VGG-19 features.34 at batch 1
    plans = {c.name: make_plan(c, g, PoolGeometry(2, 2, 2, 2), 512, True, 132, 227 * 1024) for c in CANDIDATES}
    # every candidate plans, except 8-warp list kernels with 128 positions (8 x 14 conv region) and
    # 7-channel chunks: their patch, 7 x 10 x 16 = 1120 values, outgrows 4 prefetch registers x 256 threads
    missing = {n for n, p in plans.items() if p is None}
    assert missing == {c.name for c in CANDIDATES if c.variant.kind == "list" and c.kc_target == 63
                       and c.variant.rmax == 128 and c.variant.warps == 8}
    plans = [p for p in plans.values() if p is not None]
    for p in plans:
        if p.candidate.variant.kind == "list":
            assert p.params["cc"] * p.params["patch_h"] * p.params["patch_w"] <= p.candidate.variant.prefetch * p.candidate.variant.threads
    for p in plans:
        assert p.params["splits"] > 1 and p.smem <= 227 * 1024
        assert p.params["splits"] * p.params["chunks_per_split"] >= p.params["chunks"]
        assert (p.params["splits"] - 1) * p.params["chunks_per_split"] < p.params["chunks"]
        if p.candidate.split_scale >= 1:  # ~2 blocks per SM or more (whole-wave plans: tested above)
            assert p.grid[0] * p.grid[1] * p.grid[2] >= 132
    assert make_plan(CANDIDATES[0], g, None, 512, True, 132, 4096) is None  # too little shared memory


# --- kernels compile for the CI architectures (NVRTC needs no GPU) -------------------------

@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_kernels_compile_for_ci_archs(arch):
    from sparsecnn.runtimes.ecr.runtime import KERNEL_SOURCE, VARIANTS
    from sparsecnn.runtimes.nvrtc import compile_cubin, load_source, nvrtc_available

    if not nvrtc_available()[0]:
        pytest.skip("NVRTC not installed")
    exprs = tuple(v.expr(h) for v in VARIANTS for h in (False, True))
    log: list[str] = []
    cubin, names = compile_cubin(load_source(KERNEL_SOURCE), arch, KERNEL_SOURCE, options=("--ptxas-options=-v",),
                                 name_expressions=exprs, use_cache=False, log=log)
    assert cubin[:4] == b"\x7fELF" and set(names) == set(exprs)
    assert all(names[e].encode() in cubin for e in exprs)
    # ptxas reports every kernel; none may spill registers to local memory
    spills = [line for line in log[0].splitlines() if "spill" in line]
    assert len(spills) == len(exprs) and all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills)


def test_engine_params_match_the_kernel_struct():
    """EcrParams in Python lists the C struct's fields in the C order."""
    import re

    from sparsecnn.runtimes.ecr.runtime import KERNEL_SOURCE, PARAM_FIELDS
    from sparsecnn.runtimes.nvrtc import load_source

    body = re.search(r"struct EcrParams \{(.*?)\};", load_source(KERNEL_SOURCE), re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    fields = [f.strip() for decl in body.split(";") if decl.strip() for f in decl.replace("int ", "", 1).split(",")]
    assert fields == PARAM_FIELDS


# --- GPU: the kernels against the reference -------------------------------------------------

GPU_LAYERS = [  # real-shaped (VGG-19) and odd layers
    (ConvGeometry(1, 64, 31, 29, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2), 64),
    (ConvGeometry(2, 256, 15, 13, 3, 3, 1, 1, (1, 1, 1, 1)), None, 192),
    (ConvGeometry(1, 512, 14, 14, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2), 512),
    (ConvGeometry(1, 96, 17, 19, 1, 1, 2, 2, (0, 0, 0, 0)), None, 130),
    (ConvGeometry(1, 40, 11, 11, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(3, 3, 2, 2, (1, 1, 1, 1), True), 72),
    (ConvGeometry(1, 72, 9, 13, 3, 3, 1, 1, (1, 1, 1, 1)), PoolGeometry(2, 2, 2, 2), 384),  # CT 256 blocks past 256
]


@pytest.mark.gpu
@pytest.mark.parametrize("layer", range(len(GPU_LAYERS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_gpu_kernels_match_reference(layer, dtype, zeros):
    from sparsecnn.runtimes.ecr.runtime import CANDIDATES, KernelSet, Scratch, make_plan, pack_weights

    g, pool, cout = GPU_LAYERS[layer]
    dev = torch.device("cuda")
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh inputs every run
    x = sparse_input((g.n, g.cin, g.h, g.w), zeros, seed=seed, dtype=torch.float32).to(dtype)
    w = (torch.randn(cout, g.cin, g.kh, g.kw) / (g.k ** 0.5)).to(dtype)
    b = torch.randn(cout).to(dtype)
    xr, wr, br = x.double(), w.double(), b.double()  # the CPU reference ops (PyTorch, float64)
    ref = pecr_conv_pool(pecr_encode(xr, g, pool), wr, br) if pool else ecr_conv(ecr_encode(xr, g), wr, br, True)
    ks = KernelSet.get(dev)
    scratch = Scratch(dev)
    wt, bias = pack_weights(w.to(dev), b.to(dev))
    xd = x.to(dev)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    kinds = set()
    for cand in CANDIDATES:
        plan = make_plan(cand, g, pool, cout, True, ks.sm_count, ks.max_smem, ks.registers.get(cand.variant))
        if plan is None:
            continue
        kinds.add(cand.variant)
        scratch.reserve(plan.ws_floats, plan.tickets)
        qh, qw = (pool.out_size(g.oh, g.ow) if pool else (g.oh, g.ow))
        y = torch.full((g.n, cout, qh, qw), float("nan"), device=dev, dtype=dtype)
        for _ in range(2):  # a second launch finds the split-K workspace and tickets zeroed again
            ks.launch(plan, xd, wt, bias, y, scratch)
        torch.cuda.synchronize()
        err = rel_err(y.cpu(), ref) if float(ref.abs().max()) > 0 else float(y.abs().max())
        assert err <= tol, (cand.name, plan.describe(), seed, err)
    assert int(scratch.tickets.abs().sum()) == 0 and float(scratch.ws.abs().sum()) == 0
    assert kinds, "no kernel variant fits the layer"


def test_gpu_layers_exercise_every_kernel_variant():
    """The GPU correctness layers plan every variant (kind, VEC, positions, union group) somewhere."""
    from sparsecnn.runtimes.ecr.runtime import CANDIDATES, VARIANTS, make_plan

    planned = {c.variant for g, pool, cout in GPU_LAYERS for c in CANDIDATES
               if make_plan(c, g, pool, cout, True, 132, 227 * 1024) is not None}
    assert planned == set(VARIANTS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gpu_runtime_end_to_end_in_a_cuda_graph(exported, dtype, tmp_path):
    from sparsecnn.runtimes import get_runtime, load_engine

    model = exported("tinynet")
    rt = get_runtime("ecr")
    calib = torch.randn(2, 3, 32, 32)
    eng = rt.compile(rt.rewrite(model), "cuda", {"dtype": dtype, "extra": {"ecr_layers": "sparse", "ecr_reps": 5}},
                     calibration=calib)
    report = {r["name"]: r for r in eng.report()}
    assert any(r.get("format") in ("ecr", "pecr") for r in report.values())
    x = torch.randn(2, 3, 32, 32)
    ref = get_runtime("torch").compile(model, "cpu")(x)
    tol = 1e-5 if dtype == "fp32" else 5e-3
    for _ in range(2):  # graph replays
        outs = eng(x)
        assert rel_err(outs[0], ref[0]) <= tol
    eng.save(tmp_path / "e.engine")
    again = load_engine(tmp_path / "e.engine")
    # the ECR/PECR kernel choices come back from the file (dense layers re-decide their conv algorithm)
    sparse_kernels = lambda e: [(r["name"], r.get("kernel")) for r in e.report() if r.get("format") in ("ecr", "pecr")]  # noqa: E731
    assert sparse_kernels(again) == sparse_kernels(eng)
    assert rel_err(again(x)[0], ref[0]) <= tol


# --- the runtime's choices on CPU: a stand-in kernel set, the one chooser, the base guard ---------

def _ecr_engine(exported, monkeypatch, kernels, state=None, clock=None, **extra):
    from sparsecnn.runtimes import get_runtime
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.ecr import runtime as ecr

    if clock is not None:
        monkeypatch.setattr(Chooser, "time", clock)
    model = get_runtime("ecr").rewrite(exported("tinynet"))
    calib = None if state else torch.rand(2, 3, 32, 32)
    return ecr.compile_with_kernels(model, "cpu", {"extra": extra}, state=state, calibration=calib, kernels=kernels)


def _ecr_clock(wrong: str):
    """Dense forms 1 ms; of the other variants the first listed 0.5 ms, the rest 2 ms; `wrong` ones 0.1 ms."""
    def time(self, cands, args):
        right = [c.name for c in cands if not c.dense and not c.name.startswith(wrong)]
        return {c.name: 1.0 if c.dense else 0.1 if c.name.startswith(wrong) else 0.5 if c.name == right[0] else 2.0
                for c in cands}
    return time


def test_ecr_layers_choose_by_the_one_chooser_reject_wrong_kernels_and_reload_without_timing(exported, monkeypatch):
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.ecr.runtime import compile_with_kernels

    kernels = ReferenceEcrKernels(wrong=lambda name: name.startswith("row"))  # tinynet's 3x3 layers all plan row kernels
    eng = _ecr_engine(exported, monkeypatch, kernels, clock=_ecr_clock("row"), batch=2)  # reload walks at batch 2
    switches = eng.switches()
    assert switches and all(not sw.is_dense and not sw.active.startswith("row") for sw in switches)
    for sw in switches:
        row = {r["name"]: r for r in eng.report()}[sw.name]
        assert row["kernel"].endswith(":" + sw.active) and row["format"] in ("ecr", "pecr")
        assert any(n.startswith("row") for n in row["rejected"])
        assert all("wrong result" in why for n, why in row["rejected"].items() if n.startswith("row"))
        assert {"dense:cudnn", "dense:cudnn_nhwc"} <= set(row["times_ms"])  # the same dense forms everywhere
    x = torch.rand(2, 3, 32, 32)
    ref = _ecr_engine(exported, monkeypatch, kernels, ecr_layers="dense")(x)
    assert rel_err(eng(x)[0], ref[0]) <= 1e-5
    state = eng.full_state()
    assert [d["chosen"] for d in state["choices"].values()] == [sw.active for sw in switches]

    monkeypatch.setattr(Chooser, "time", lambda *a: pytest.fail("a saved decision was timed again"))
    monkeypatch.setattr(Chooser, "check", lambda *a: pytest.fail("a saved decision was checked again"))
    again = compile_with_kernels(eng.model, "cpu", eng.options, state=state, kernels=kernels)
    assert [(sw.name, sw.info["kernel"]) for sw in again.switches()] == [(sw.name, sw.info["kernel"]) for sw in switches]
    assert all(sw.decision.how == "saved" for sw in again.switches())
    # an older engine file: layer name -> variant name or "dense" (its dense forms are measured again)
    monkeypatch.undo()
    monkeypatch.setattr(Chooser, "time", lambda self, cands, args: {c.name: 1.0 for c in cands})
    first, *rest = [sw.name for sw in switches]
    old = compile_with_kernels(eng.model, "cpu", eng.options, kernels=kernels,
                               state={"choices": {first: switches[0].active, **{n: "dense" for n in rest}},
                                      "dense_conv_decisions": state["dense_conv_decisions"]})
    assert old.switches()[0].active == switches[0].active and all(sw.is_dense for sw in old.switches()[1:])


def test_ecr_policies_sparse_and_dense_and_the_guard(exported, monkeypatch):
    from sparsecnn.runtimes import base, chooser

    slow = lambda self, cands, args: {c.name: 1.0 if c.dense else 3.0 for c in cands}  # noqa: E731
    kernels = ReferenceEcrKernels()
    measured = _ecr_engine(exported, monkeypatch, kernels, clock=slow)
    assert all(sw.is_dense and "margin" not in sw.decision.reason for sw in measured.switches())
    sparse = _ecr_engine(exported, monkeypatch, kernels, clock=slow, ecr_layers="sparse")
    assert not any(sw.is_dense for sw in sparse.switches())
    assert not sparse.guard_on() and _ecr_engine(exported, monkeypatch, kernels, clock=slow, ecr_layers="sparse",
                                                 guard=True).guard_on()
    dense = _ecr_engine(exported, monkeypatch, kernels, clock=slow, ecr_layers="dense")
    assert all(sw.is_dense and sw.candidates.keys() == {n for n in sw.candidates if n.startswith("dense:")}
               for sw in dense.switches())
    assert not _ecr_engine(exported, monkeypatch, kernels, clock=slow, whole_network_check=False).guard_on()

    # the base guard: an ECR engine slower than dense falls back whole and says so
    from test_chooser import _FakeReplay

    monkeypatch.setattr(base, "GraphReplay", _FakeReplay)
    fast = lambda self, cands, args: {c.name: 1.0 if c.dense else 0.5 for c in cands}  # noqa: E731
    eng = _ecr_engine(exported, monkeypatch, kernels, clock=fast)
    assert not any(sw.is_dense for sw in eng.switches())
    fake = {"as chosen": 3.0, "dense": 1.0, "cudnn": 1.5, "cudnn_nhwc": 2.0, "partial": 2.5}
    monkeypatch.setattr(chooser, "guard_graphs", lambda graphs, device, **k: (
        min(graphs, key=fake.get), {g: fake[g] for g in graphs}))
    eng._plan_graph("key", eng.prepare(torch.rand(2, 3, 32, 32)))
    assert eng.whole_network["2x3x32x32"]["chosen"] == "dense" and all(sw.is_dense for sw in eng.switches())
