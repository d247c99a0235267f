"""The tensor-core CSR kernel (runtimes/csr/cuda/csr_tc.cu; host side runtimes/csr/tensor_core.py):
the tiled-CSL format round-trips; the CPU emulator runs the very same source (mma.sync emulated
fragment by fragment, tests/cuda_emu.h) against F.conv2d in fp32 on the fp16-rounded operands
(empty rows and tiles, odd M and N, K not a multiple of the tile, 1x1 / 3x3, stride 2,
dilation, residual + ReLU, split-K on and off); the csr runtime offers its configs for fp16 on
sm_80+ only and runs them through the one chooser. GPU tests at the end."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cuda_emu
from helpers import input_shape, ort_run, rel_err
from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
from sparsecnn.runtimes.csr.kernels import ConvGeometry, candidate_configs, config_from_dict, make_plan
from sparsecnn.runtimes.csr.tensor_core import (PITCH, TcConfig, k_table, tc_candidates, tiled_csl,
                                                tiled_csl_to_dense)

emu = pytest.mark.skipif(not cuda_emu.available(), reason="g++ not installed (the CPU kernel emulator needs it)")
TOL = 2e-3  # fp16 output: its rounding is ~5e-4 of max |y|


def sparse_weight(g: ConvGeometry, sparsity: float, seed: int = 0, empty_cols=None) -> torch.Tensor:
    """[M, C, kh, kw] at `sparsity`, row 0 empty; empty_cols (a slice of the GEMM view's K) zeroed."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g.m, g.c, g.kh, g.kw, generator=gen) * (torch.rand(g.m, g.c, g.kh, g.kw, generator=gen) >= sparsity)
    w[0] = 0
    if empty_cols is not None:
        w.view(g.m, -1)[:, empty_cols] = 0
    return w


def tc_case(backend, g: ConvGeometry, cfg: TcConfig, sparsity: float, batch: int = 1, relu: bool = False,
            residual: bool = False, channels_last: bool = False, empty_cols=None, seed: int = 0) -> float:
    """rel. error of the kernel against conv2d (+ bias) (+ residual) (+ ReLU), fp32 on fp16 operands."""
    w = sparse_weight(g, sparsity, seed, empty_cols)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, g.c, g.h, g.w, generator=gen).half()
    b = torch.randn(g.m, generator=gen)
    r = (2 * torch.randn(batch, g.m, g.ho, g.wo, generator=gen)).half() if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if r is not None else None
    plan = make_plan(csr_from_dense(gemm_view(w)), g, cfg, torch.float16, "cpu", backend, b, relu)
    y = plan(x, r)
    ref = F.conv2d(F.pad(x.float(), (g.pl, g.pr, g.pt, g.pb)), w.half().float(), b, (g.sh, g.sw), 0, (g.dh, g.dw))
    if r is not None:
        ref = ref + r.float()
    if relu:
        ref = torch.relu(ref)
    assert y.dtype == torch.float16 and tuple(y.shape) == tuple(ref.shape) and y.is_contiguous()
    if relu and residual:
        assert (ref == 0).float().mean() > 0.2  # the ReLU had work to do
    return rel_err(y.float(), ref)


# --- the format (host only) -------------------------------------------------------------------

@pytest.mark.parametrize("tm", [64, 128])
def test_tiled_csl_round_trips_with_empty_rows_and_tiles(tm):
    g = ConvGeometry(20, 150, 1, 1)  # K = 150: three 64-wide K tiles, the last one partial
    a = gemm_view(sparse_weight(g, 0.7, empty_cols=slice(64, 128))).clone()  # row 0 and K tile 1 empty
    a[5, 130] = -2.0
    a[7, 3] = 1e-8  # rounds to an fp16 zero (kept as an entry that writes 0)
    csr = csr_from_dense(a)
    words, tile_ptr = tiled_csl(csr, tm)
    assert torch.equal(tiled_csl_to_dense(words, tile_ptr, csr.shape, tm), a.half())
    runs = (tile_ptr[1:] - tile_ptr[:-1]).tolist()
    assert len(runs) == 3 and runs[1] == 0 and all(n % 4 == 0 for n in runs)
    w = words.numpy().view(np.uint32)
    pad = w[(w >> 16) == tm * PITCH]
    assert len(w) - len(pad) == csr.nnz and (pad & 0xFFFF == 0).all()  # padding: value 0, aimed at the scratch slot
    run2 = w[int(tile_ptr[2]):int(tile_ptr[3])]
    assert ((5 * PITCH + 130 - 128) << 16 | 0xC000) in run2.tolist()  # W[5, 130] = -2.0: row 5, column 2 of tile 2


def test_k_table_packs_channel_and_kernel_offsets():
    g = ConvGeometry(4, 3, 9, 9, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2)  # dilation 2: K = 27, one tile
    tab = k_table(g)
    assert tab.numel() == 64 and (tab[27:] == -1).all()
    assert int(tab[1 * 9 + 2 * 3 + 1]) == (1 << 16) | (4 << 8) | 2  # (c, r, s) = (1, 2, 1): r*dh = 4, s*dw = 2


def test_tensor_core_configs_only_for_fp16_on_sm80_and_up():
    g = ConvGeometry(512, 512, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1)  # ResNet-18's last 3x3: N = 49
    tc = [c for c in candidate_configs(g, dtype=torch.float16, arch="sm_90") if isinstance(c, TcConfig)]
    assert tc == tc_candidates(g) and {c.tn for c in tc} == {64, 32}
    assert any(c.nsplit > 1 for c in tc)  # 8 x 1 blocks: split along K to fill 132 SMs
    assert all(c.label().startswith("tensor-core") and config_from_dict(c.to_dict()) == c for c in tc)
    for dtype, arch in ((torch.float16, "sm_75"), (torch.float16, None), (torch.float32, "sm_90")):
        assert not any(isinstance(c, TcConfig) for c in candidate_configs(g, dtype=dtype, arch=arch))


# --- the kernel on the CPU emulator ---------------------------------------------------------------

@pytest.fixture(scope="module")
def backend():
    return cuda_emu.EmuBackend()


@emu
@pytest.mark.parametrize("sparsity", [0.7, 0.9])
@pytest.mark.parametrize("g,cfg,opts", [
    # 3x3 same, odd M, odd N (7 x 9), K = 63 (one partial tile), residual + ReLU
    (ConvGeometry(20, 7, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1), TcConfig(64, 32), dict(relu=True, residual=True)),
    # K = 144 (3 tiles) split three ways, batch 2
    (ConvGeometry(20, 16, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1), TcConfig(64, 64, 3), dict(relu=True, residual=True, batch=2)),
    # stride 2, asymmetric padding, split 2
    (ConvGeometry(13, 9, 10, 9, 3, 3, 2, 2, 0, 1, 1, 0), TcConfig(64, 16, 2), dict(relu=True)),
    # dilation 2, no bias effects hidden by a ReLU
    (ConvGeometry(9, 6, 11, 12, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2), TcConfig(64, 32), dict()),
    # 1x1: B is the input itself; an empty K tile; a 128-row tile with 70 rows; channels-last x and residual
    (ConvGeometry(70, 150, 5, 7), TcConfig(128, 32), dict(relu=True, residual=True, channels_last=True,
                                                            empty_cols=slice(64, 128))),
    (ConvGeometry(70, 150, 5, 7), TcConfig(64, 64, 3), dict(relu=True, residual=True, empty_cols=slice(64, 128))),
])
def test_tensor_core_kernel_matches_conv2d(backend, g, cfg, opts, sparsity):
    assert tc_case(backend, g, cfg, sparsity, **opts) <= TOL


@emu
def test_tensor_core_spmm_of_the_gemm_sweep_matches_matmul(backend):
    g = ConvGeometry(20, 100, 1, 7)  # odd M, K past one tile, N = 7
    a = gemm_view(sparse_weight(g, 0.8, seed=3))
    b = torch.randn(100, 7).half()
    plan = make_plan(csr_from_dense(a), g, TcConfig(64, 16, 2), torch.float16, "cpu", backend)
    assert rel_err(plan.spmm(b).float(), a.half().float() @ b.float()) <= TOL


@emu
def test_runtime_offers_the_tensor_core_kernel_for_fp16_and_replays_it(monkeypatch):
    """csr's per-layer choice on sm_80+ in fp16 holds the tensor-core configs; every candidate is
    checked against the dense form by the one chooser (timings faked so the tc kernel wins here);
    the saved decision reloads without timing."""
    from test_csr_runtime import conv_model, masked_weight

    from sparsecnn.runtimes import get_runtime
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.csr import runtime as csr_rt

    timed = []

    def fake_time(self, candidates, args):
        timed.extend(c.name for c in candidates)
        return {c.name: 0.001 if c.name.startswith("tensor-core") else 0.010 for c in candidates}

    monkeypatch.setattr(Chooser, "time", fake_time)
    w = masked_weight((24, 8, 3, 3), 0.2, seed=4)
    model = conv_model(w, (1, 8, 6, 7), bias=np.linspace(-1, 1, 24), relu=True, pads=[1, 1, 1, 1])
    sparse = get_runtime("csr").rewrite(model, {})
    backend = cuda_emu.EmuBackend()
    opts = {"dtype": "fp16", "csr_tune_reps": 1}
    plain = csr_rt.compile_with_backend(sparse, "cpu", opts, backend=backend)  # an emulator says no arch: no tc
    assert not any(n.startswith("tensor-core") for n in timed)
    backend.arch = "sm_90"
    engine = csr_rt.compile_with_backend(sparse, "cpu", opts, backend=backend)
    row = next(r for r in engine.report() if r["op"] == "sparsecnn::CsrConv")
    assert row["format"] == "csr" and row["config_label"].startswith("tensor-core"), row
    assert "tensor cores" in row["kernel"] and not any("skipped" in c for c in row["candidates"])
    x = np.random.default_rng(2).standard_normal(input_shape(model, 1)).astype(np.float32)
    ref = ort_run(model, x)[0]
    assert rel_err(engine(torch.from_numpy(x))[0].float(), ref) <= 5e-3
    timed.clear()
    again = csr_rt.compile_with_backend(sparse, "cpu", opts, state=engine.full_state(), backend=backend)
    assert not timed and next(r for r in again.report() if r["op"] == "sparsecnn::CsrConv")["config"] == row["config"]
    assert rel_err(again(torch.from_numpy(x))[0].float(), ref) <= 5e-3
    del plain


@emu
def test_hybrid_takes_the_tensor_core_configs_from_csr(monkeypatch):
    """hybrid's csr candidates are csr's config_candidates: on sm_80+ in fp16 they hold the
    tensor-core kernel, which wins here by faked timing and computes the group right."""
    from test_csr_runtime import conv_model, masked_weight

    from sparsecnn.runtimes import get_runtime
    from sparsecnn.runtimes.chooser import Chooser
    from sparsecnn.runtimes.hybrid import runtime as hybrid

    monkeypatch.setattr(Chooser, "time", lambda self, cands, args: {
        c.name: 0.5 if c.name.startswith("tensor-core") else 1.0 if c.dense else 2.0 for c in cands})
    model = conv_model(masked_weight((24, 8, 3, 3), 0.2, seed=5), (1, 8, 6, 7), bias=np.ones(24), relu=True,
                       pads=[1, 1, 1, 1])
    backend = cuda_emu.EmuBackend()
    backend.arch = "sm_80"
    eng = hybrid.compile_with_backends(get_runtime("hybrid").rewrite(model), "cpu",
                                       {"dtype": "fp16", "hybrid_libraries": ["csr"]},
                                       backends=hybrid.Backends(torch.device("cpu"), csr=backend))
    row = next(r for r in eng.report() if r["op"].startswith("sparsecnn::CsrConv"))
    assert row["library"] == "csr" and "tensor cores" in row["kernel"], row
    x = np.random.default_rng(3).standard_normal(input_shape(model, 1)).astype(np.float32)
    assert rel_err(eng(torch.from_numpy(x))[0].float(), ort_run(model, x)[0]) <= 5e-3


# --- on the GPU (run with -m gpu on an sm_80+ card) ----------------------------------------------

gpu = pytest.mark.gpu


def _needs_sm80():
    from sparsecnn.runtimes.nvrtc import device_arch, has_feature

    if not has_feature(device_arch(0), "mma.sync m16n8k16"):
        pytest.skip("the tensor-core kernel needs sm_80+")


@gpu
@pytest.mark.parametrize("sparsity", [0.7, 0.9])
@pytest.mark.parametrize("g", [
    ConvGeometry(512, 512, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1),      # ResNet-18 layer4 3x3: N = 49
    ConvGeometry(256, 256, 14, 14, 3, 3, 1, 1, 1, 1, 1, 1),    # layer3: N = 196
    ConvGeometry(256, 128, 28, 28, 3, 3, 2, 2, 1, 1, 1, 1),    # a stride-2 3x3
    ConvGeometry(512, 256, 14, 14, 1, 1, 2, 2),                # a downsample 1x1, stride 2
    ConvGeometry(77, 45, 9, 7),                                # odd everything, 1x1
])
def test_gpu_tensor_core_kernel_matches_conv2d(g, sparsity):
    from sparsecnn.runtimes.csr.kernels import NvrtcBackend

    _needs_sm80()
    backend = NvrtcBackend("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfgs = [c for c in candidate_configs(g, sms=sms, dtype=torch.float16, arch=backend.arch) if isinstance(c, TcConfig)]
    assert cfgs
    w = sparse_weight(g, sparsity, seed=7)
    x = torch.randn(1, g.c, g.h, g.w).half()
    b = torch.randn(g.m)
    r = (2 * torch.randn(1, g.m, g.ho, g.wo)).half()
    ref = F.conv2d(F.pad(x.float(), (g.pl, g.pr, g.pt, g.pb)), w.half().float(), b, (g.sh, g.sw), 0, (g.dh, g.dw))
    for cfg in cfgs:
        plan = make_plan(csr_from_dense(gemm_view(w)), g, cfg, torch.float16, "cuda", backend, b, relu=True)
        assert rel_err(plan(x.cuda()).float().cpu(), torch.relu(ref)) <= TOL, cfg.label()
        assert rel_err(plan(x.cuda(), r.cuda()).float().cpu(), torch.relu(ref + r.float())) <= TOL, cfg.label()


@gpu
def test_gpu_csr_runtime_times_the_tensor_core_kernel(exported):
    """A 90 %-pruned tinyresnet in fp16 on the card: every 3x3 layer's candidates include the
    tensor-core configs (checked and timed by the chooser); the engine matches ONNX Runtime."""
    from sparsecnn.passes.prune import prune_unstructured
    from sparsecnn.runtimes import get_runtime

    _needs_sm80()
    pruned = prune_unstructured(exported("tinyresnet"), 0.9).model
    sparse = get_runtime("csr").rewrite(pruned, {})
    engine = get_runtime("csr").compile(sparse, "cuda", {"dtype": "fp16"})
    rows = [r for r in engine.report() if r["op"] == "sparsecnn::CsrConv"]
    assert rows and all(any(c["config"].startswith("tensor-core") and "us" in c for c in r["candidates"]) for r in rows)
    x = np.random.default_rng(0).standard_normal(input_shape(pruned, 1)).astype(np.float32)
    assert rel_err(engine(torch.from_numpy(x).cuda())[0].float().cpu(), ort_run(pruned, x)[0]) <= 2e-2
