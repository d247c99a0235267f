"""conv2to4_mma.cu, sparsecnn's 2:4 implicit-GEMM convolution on sparse tensor cores: the weight's
register order (round trip against the portable layout), the kernel on the CPU emulator against
torch's conv on the unpacked weight (shapes kept tiny: every CUDA thread is a host thread), and in
the GPU suite the real kernel and the runtime paths that offer it."""
import pytest
import torch
import torch.nn.functional as F

import cuda_emu
from helpers import rel_err
from test_two_four import random_2to4
from sparsecnn.passes.two_four.layout import conv_gemm_view, conv_weight_from_view, pack_2to4, unpack_2to4
from sparsecnn.runtimes.cusparselt.mma_conv import (KERNEL_SOURCE, KERNELS, MmaConv, mma_unavailable, pack_for_mma,
                                                    unpack_from_mma)

TOL = 2e-3  # fp16 output (rel_err, max |a - b| / max |b|)


def two_four_weight(cout, cin, kh, kw, seed):
    """A 2:4 conv weight (every pattern, groups with 0-2 non-zeros) in fp16, W[Cout, Cin, kh, kw]."""
    return conv_weight_from_view(random_2to4(cout, kh * kw * cin, seed), (kh, kw)).half()


@pytest.mark.parametrize("m,k", [(1, 4), (20, 36), (16, 32), (33, 200), (5, 12)])
def test_register_order_round_trips_against_unpack(m, k):
    values, positions = pack_2to4(random_2to4(m, k, seed=m + k).half())
    wfrag, wmeta = pack_for_mma(values, positions)
    assert wfrag.shape == (-(-m // 16), -(-k // 32), 32, 4) and wmeta.shape == wfrag.shape[:3]
    assert torch.equal(unpack_from_mma(wfrag, wmeta, m, k), unpack_2to4(values, positions))
    # padding groups (rows past M, columns past K) hold positions (0, 1): valid metadata, zero values
    meta = (wmeta.to(torch.int64) & 0xFFFFFFFF).reshape(-1, 8, 4)[:, :, :2]
    nibbles = torch.stack([(meta >> (4 * i)) & 0xF for i in range(8)], -1)
    assert bool(((nibbles & 3) < (nibbles >> 2)).all())  # every group: two distinct ascending positions
    assert bool((unpack_from_mma(wfrag, wmeta, wfrag.shape[0] * 16, wfrag.shape[1] * 32)[m:] == 0).all())


# (cout, cin, h, w, kernel, stride, pads [t, l, b, r], dilation, batch, residual+relu, split)
CASES = {
    "3x3 s1 pad1, odd Cout and spatial, batch 2": (20, 8, 7, 9, 3, 1, [1, 1, 1, 1], 1, 2, False, 1),
    "3x3 s2 pad1, split-K 3": (32, 16, 9, 9, 3, 2, [1, 1, 1, 1], 1, 1, False, 3),
    "1x1, residual + relu": (20, 12, 7, 9, 1, 1, [0, 0, 0, 0], 1, 2, True, 1),
    "3x3 dilation 2 pad 2, split-K 2": (16, 8, 9, 7, 3, 1, [2, 2, 2, 2], 2, 1, False, 2),
    "3x3 Cin 4 (chunks straddle taps), asymmetric pads, residual + relu, split-K": (
        12, 4, 6, 5, 3, 2, [0, 1, 1, 0], 1, 2, True, 2),
    "Cin 40 (K chunks past one tap), auto split": (24, 40, 5, 5, 3, 1, [1, 1, 1, 1], 1, 1, True, None),
}


@pytest.fixture(scope="module")
def emu_kernels():
    if not cuda_emu.available():
        pytest.skip("g++ not installed")
    return cuda_emu.EmuKernels(KERNEL_SOURCE, KERNELS)


def run_case(case, backend, device="cpu", seed=0):
    cout, cin, h, w, k, s, pads, d, batch, fused, split = case
    g = torch.Generator().manual_seed(seed)
    weight = two_four_weight(cout, cin, k, k, seed)
    values, positions = pack_2to4(conv_gemm_view(weight))
    bias = torch.randn(cout, generator=g)
    x = torch.randn(batch, cin, h, w, generator=g).half()
    conv = MmaConv(values, positions, (k, k), (s, s), (d, d), pads, bias, fused, backend, device, split=split)
    ref = F.conv2d(F.pad(x.float(), (pads[1], pads[3], pads[0], pads[2])), weight.float(), bias, s, 0, d)
    residual = torch.randn(ref.shape, generator=g).half() if fused else None
    if fused:
        ref = torch.relu(ref + residual.float())
    xd = x.to(device).contiguous(memory_format=torch.channels_last)
    y = conv(xd, None if residual is None else residual.to(device))
    return y, ref, conv


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_on_the_emulator_matches_torch_conv(name, emu_kernels):
    case = CASES[name]
    launches = len(emu_kernels.launches)
    y, ref, conv = run_case(case, emu_kernels)
    assert y.shape == ref.shape and y.dtype == torch.float16
    assert y.is_contiguous(memory_format=torch.channels_last)  # NHWC memory, NCHW shape
    assert rel_err(y, ref) <= TOL
    names = [n for n, _ in emu_kernels.launches[launches:]]
    splits = conv.nsplit(y.shape[0] * y.shape[2] * y.shape[3])[0]
    assert names == (["conv2to4_mma", "conv2to4_finish"] if splits > 1 else ["conv2to4_mma"])
    if case[-1] not in (None, 1):
        assert splits == case[-1]


def test_auto_split_k_follows_the_grid_against_the_sms(emu_kernels):
    values, positions = pack_2to4(random_2to4(32, 9 * 64, seed=1).half())
    conv = MmaConv(values, positions, (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], None, False, emu_kernels, "cpu")
    assert conv.nsplit(64 * 132)[0] == 1        # 132 blocks fill the H100's SMs: no split
    assert 1 < conv.nsplit(64)[0] <= 16         # one block: split over K
    assert conv.nsplit(64)[0] * conv.nsplit(64)[1] >= conv.kc
    assert conv.nsplit(64 * 100) == (3, 6)      # 100 blocks: slices for about two waves (264 blocks), as csr's


def test_mma_conv_says_why_it_cannot_run_a_layer():
    values, positions = pack_2to4(random_2to4(8, 4, seed=2).half())  # K = 4: Cin 4 at 1x1, Cin 2 at 1x2
    with pytest.raises(NotImplementedError, match="runs fp16, not float32"):
        MmaConv(values, positions, (1, 1), (1, 1), (1, 1), [0] * 4, None, False, None, "cpu", dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="Cin a multiple of 4"):
        MmaConv(values, positions, (1, 2), (1, 1), (1, 1), [0] * 4, None, False, None, "cpu")


def test_the_kernel_is_offered_only_on_cuda_sm80_fp16():
    assert "CUDA" in mma_unavailable(torch.device("cpu"), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_on_the_gpu_matches_torch_conv(name):
    from sparsecnn.runtimes.cusparselt.mma_conv import NvrtcMma

    dev = torch.device("cuda")
    why = mma_unavailable(dev, torch.float16)
    if why:
        pytest.skip(why)
    y, ref, _ = run_case(CASES[name], NvrtcMma(dev), dev)
    torch.cuda.synchronize()
    assert rel_err(y.float().cpu(), ref) <= TOL


# --- the runtime paths that offer it (CPU: the emulator stands in for the card) ---------------------

def _fp16_conv_on_cpu() -> bool:
    try:  # older torch builds have no fp16 convolution on the CPU (the dense forms the chooser checks against)
        F.conv2d(torch.ones(1, 4, 3, 3, dtype=torch.float16), torch.ones(4, 4, 1, 1, dtype=torch.float16))
        return True
    except RuntimeError:
        return False


needs_fp16_cpu = pytest.mark.skipif(not _fp16_conv_on_cpu(), reason="this torch has no fp16 conv on the CPU")


def _clock(fastest):
    """A Chooser.time stand-in: `fastest` 1 ms, other sparse candidates 1.5, dense forms 2."""
    return lambda self, cands, args: {c.name: 1.0 if c.name == fastest else (2.0 if c.dense else 1.5) for c in cands}


def _cusparselt_engine(model, mma, state=None, backend="dense", **extra):
    from sparsecnn.runtimes.base import CompileOptions
    from sparsecnn.runtimes.cusparselt import runtime as cs

    return cs.build_engine(model, torch.device("cpu"), CompileOptions.from_dict({"dtype": "fp16", "extra": extra}),
                           backend, state, mma)


@needs_fp16_cpu
def test_cusparselt_runtime_chooses_the_mma_kernel_checks_it_and_replays_it(exported, emu_kernels, monkeypatch):
    from helpers import ort_run
    from sparsecnn.passes.prune import prune_2to4
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.cusparselt import runtime as cs
    from sparsecnn.runtimes.cusparselt.mma_conv import NAME

    pruned = prune_2to4(exported("tinynet")).model
    model = cs.rewrite(pruned)
    x = torch.rand(1, 3, 32, 32)
    monkeypatch.setattr(Chooser, "time", _clock(NAME))
    launches = len(emu_kernels.launches)
    eng = _cusparselt_engine(model, emu_kernels)
    y = eng(x)[0]
    switches = eng.switches()
    assert switches and all(sw.active == NAME and "conv2to4_mma" in sw.info["kernel"] for sw in switches)
    assert len(emu_kernels.launches) > launches  # the kernel ran (checked against cuDNN's form, then timed)
    assert rel_err(y.float(), torch.from_numpy(ort_run(pruned, x.numpy())[0])) <= 1e-2  # fp16 network

    state = eng.full_state()
    monkeypatch.setattr(Chooser, "time", lambda *a: pytest.fail("a saved decision was timed again"))
    again = _cusparselt_engine(model, emu_kernels, state)
    assert rel_err(again(x)[0].float(), y.float()) == 0
    assert all(sw.decision.how == "saved" and sw.active == NAME for sw in again.switches())

    # a wrong kernel is never chosen, and the report says why
    monkeypatch.setattr(Chooser, "time", _clock(NAME))
    from sparsecnn.runtimes.cusparselt.mma_conv import MmaConv

    right = MmaConv.__call__
    monkeypatch.setattr(MmaConv, "__call__", lambda self, t, r=None: right(self, t, r) * 1.5)
    wrong = _cusparselt_engine(model, emu_kernels)
    wrong(x)
    for sw in wrong.switches():
        assert sw.active != NAME and "wrong result" in sw.info["choice"]["rejected"][NAME]


@needs_fp16_cpu
def test_without_cusparselt_the_runtime_runs_2to4_convs_on_the_mma_kernel_and_gemms_dense(
        exported, emu_kernels, monkeypatch):
    """A PyTorch built without cuSPARSELt (a Jetson wheel may be one): the 2:4 convs still choose
    the mma.sp kernel, the fully connected layer runs dense, and the report says why."""
    from helpers import ort_run
    from sparsecnn.passes.prune import prune_2to4
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.cusparselt import runtime as cs
    from sparsecnn.runtimes.cusparselt.mma_conv import NAME

    from sparsecnn.passes.graph import set_prune_exclusions

    dense = exported("tinynet")
    set_prune_exclusions(dense, ["features.0.weight"])  # the classifier 2:4 too
    pruned = prune_2to4(dense).model
    monkeypatch.setattr(Chooser, "time", _clock(NAME))
    eng = _cusparselt_engine(cs.rewrite(pruned), emu_kernels, backend=cs.NO_GEMM)
    x = torch.rand(1, 3, 32, 32)
    y = eng(x)[0]
    assert rel_err(y.float(), torch.from_numpy(ort_run(pruned, x.numpy())[0])) <= 1e-2
    rows = {r["op"]: r for r in eng.report() if r["op"].startswith("sparsecnn::")}
    conv, gemm = rows["sparsecnn::Conv2to4"], rows["sparsecnn::Gemm2to4"]
    assert conv["choice"]["chosen"] == NAME and set(conv["choice"]["candidates_ms"]) >= {NAME}
    assert cs.SPARSE not in conv["choice"]["candidates_ms"] and "cuSPARSELt" in conv["unsupported"][cs.SPARSE]
    assert gemm["choice"]["chosen"] == "dense:linear"  # no sparse GEMM without cuSPARSELt


@needs_fp16_cpu
def test_cusparselt_runtime_says_why_the_mma_kernel_is_not_offered(exported):
    from sparsecnn.passes.prune import prune_2to4
    from sparsecnn.runtimes.cusparselt import runtime as cs

    eng = _cusparselt_engine(cs.rewrite(prune_2to4(exported("tinynet")).model), None, force="dense")
    eng(torch.rand(1, 3, 32, 32))
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::Conv2to4")]
    assert rows and all("CUDA" in r["unsupported"]["mma.sp"] for r in rows)


@needs_fp16_cpu
def test_hybrid_offers_the_mma_kernel_to_2to4_groups_with_their_residual_and_relu(exported, emu_kernels, monkeypatch):
    from test_hybrid import _backends, _oracle, _pruned

    from sparsecnn.runtimes import get_runtime
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.cusparselt.mma_conv import NAME
    from sparsecnn.runtimes.hybrid import runtime as hybrid

    model = _pruned(exported, "tinyresnet", "2:4")
    monkeypatch.setattr(Chooser, "time", _clock(NAME))
    backends = _backends()
    backends.mma = cuda_emu.EmuKernels(KERNEL_SOURCE, KERNELS, sms=1)  # planned for one SM: no split-K, half the launches
    x = torch.rand(1, 3, 32, 32)
    # csr's emulated configs would take minutes; the guard's whole-graph runs are not what this checks
    opts = {"dtype": "fp16", "extra": {"hybrid_libraries": ["cusparselt"], "guard": False}}
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu", opts, calibration=x,
                                       backends=backends)
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    chosen = [r for r in rows if "conv2to4_mma" in str(r.get("kernel"))]
    assert chosen and any("residual" in r["group"] for r in chosen)  # a fused Add + Relu group ran in the kernel
    assert rel_err(eng(x)[0].float(), _oracle(model, x)) <= 1e-2


@pytest.mark.gpu
def test_gpu_cusparselt_engine_forced_onto_the_mma_kernel_matches_onnxruntime(exported):
    from helpers import ort_run
    from sparsecnn.passes.prune import prune_2to4
    from sparsecnn.runtimes.cusparselt import runtime as cs
    from sparsecnn.runtimes.cusparselt.mma_conv import NAME

    why = mma_unavailable(torch.device("cuda"), torch.float16) or (None if cs.available()[0] else cs.available()[1])
    if why:
        pytest.skip(why)
    model = prune_2to4(exported("tinyresnet")).model
    x = torch.rand(2, 3, 32, 32)
    eng = cs.compile(cs.rewrite(model), "cuda", {"dtype": "fp16", "extra": {"force": "mma", "guard": False}})
    y = eng(x.cuda())[0].float().cpu()
    assert rel_err(y, torch.from_numpy(ort_run(model, x.numpy())[0])) <= 2e-2  # fp16 network vs ORT fp32
    assert eng.switches() and all(sw.active == NAME for sw in eng.switches() if sw.kind == "conv")


@pytest.mark.gpu
def test_gpu_hybrid_times_the_mma_kernel_on_2to4_groups_and_never_finds_it_wrong(exported):
    from test_hybrid import _oracle, _pruned

    from sparsecnn.runtimes import get_runtime
    from sparsecnn.runtimes.cusparselt.mma_conv import NAME

    why = mma_unavailable(torch.device("cuda"), torch.float16)
    if why:
        pytest.skip(why)
    model = _pruned(exported, "tinyresnet", "2:4")
    rt = get_runtime("hybrid")
    x = torch.rand(2, 3, 32, 32)
    eng = rt.compile(rt.rewrite(model), "cuda", {"dtype": "fp16", "extra": {"choose_reps": 5,
                                                                             "hybrid_libraries": ["cusparselt"]}},
                     calibration=x)
    rows = [r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv")]
    assert rows and all(NAME in r["choice"].get("candidates_ms", {}) for r in rows)
    assert not [r for r in rows if NAME in r["choice"].get("rejected", {})]
    assert rel_err(eng(x.cuda())[0].float().cpu(), _oracle(model, x)) <= 2e-2
