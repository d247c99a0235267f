"""The CSR CUDA kernels: NVRTC compiles them for the CI archs; the CPU emulator runs the very
same source against F.conv2d / matmul on the masked dense weight (odd sizes, strides,
padding, dilation, empty rows, several K chunks, split-K, fp16). The GPU tests at the end
run them on the device against the same references."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import cuda_emu
from helpers import rel_err
from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
from sparsecnn.runtimes.csr.kernels import (KERNEL_FILES, SPUTNIK_VARIANTS, ConvConfig, ConvGeometry, ConvPlan,
                                            GemvPlan, SputnikConfig, SputnikPlan, all_expressions, candidate_configs,
                                            chunk_pointers, config_from_dict, gemm_as_conv_geometry,
                                            gemm_conv_plan_call, make_plan, rows_block_column_use, spmm_config,
                                            sputnik_candidates, sputnik_heuristic, staged_sparse_runs, window_config,
                                            with_split)
from sparsecnn.runtimes.nvrtc import CI_ARCHS, compile_cubin, load_source, nvrtc_available

emu = pytest.mark.skipif(not cuda_emu.available(), reason="g++ not installed (the CPU kernel emulator needs it)")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CONV_3X3_GEOMETRIES = [  # checked by the window kernel and by Sputnik over im2col alike
    ConvGeometry(20, 7, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1),            # 3x3 same, odd sizes
    ConvGeometry(13, 5, 10, 9, 3, 3, 2, 2, 0, 1, 1, 0),            # stride 2, asymmetric pads
    ConvGeometry(9, 6, 11, 12, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2),      # dilation 2
]


@pytest.fixture(scope="module")
def backend():
    return cuda_emu.EmuBackend()


def pruned_conv_weight(m, c, kh, kw, density, seed=0, empty_rows=(0,), full_row=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, c, kh, kw, generator=g) * (torch.rand(m, c, kh, kw, generator=g) < density)
    for r in empty_rows:
        w[r] = 0
    if full_row is not None:
        w[full_row] = torch.randn(c, kh, kw, generator=g)
    return w


def conv_case(backend, dtype, g: ConvGeometry, cfg, batch=2, density=0.3, bias=True, relu=False, channels_last=False,
              seed=0, residual=False):
    """rel. error of the plan against F.conv2d (+ bias) (+ residual) (+ ReLU) on the masked weight.
    residual: True (contiguous) or "channels_last"."""
    w = pruned_conv_weight(g.m, g.c, g.kh, g.kw, density, seed, empty_rows=(0, g.m // 2), full_row=1)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, g.c, g.h, g.w, generator=gen).to(dtype)
    b = torch.randn(g.m, generator=gen) if bias else None
    r = None
    if residual:  # of the size of the conv's output: the sum goes negative often, so the ReLU matters
        r = (2 * torch.randn(batch, g.m, g.ho, g.wo, generator=gen)).to(dtype)
        if residual == "channels_last":
            r = r.contiguous(memory_format=torch.channels_last)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    plan = make_plan(csr_from_dense(gemm_view(w)), g, cfg, dtype, "cpu", backend, b, relu)
    y = plan(x) if r is None else plan(x, r)
    xf = F.pad(x.float(), (g.pl, g.pr, g.pt, g.pb))
    ref = F.conv2d(xf, w.to(dtype).float(), b, (g.sh, g.sw), 0, (g.dh, g.dw))
    if r is not None:
        ref = ref + r.float()
    if relu:
        ref = torch.relu(ref)
    assert y.dtype == dtype and tuple(y.shape) == tuple(ref.shape)
    return rel_err(y.float(), ref)


@pytest.mark.parametrize("arch", CI_ARCHS)
@pytest.mark.parametrize("filename", KERNEL_FILES)
@pytest.mark.skipif(not nvrtc_available()[0], reason="NVRTC not installed")
def test_every_csr_kernel_compiles_with_nvrtc(arch, filename, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path))
    for dtype in (torch.float32, torch.float16):
        exprs = all_expressions(filename, dtype)
        cubin, names = compile_cubin(load_source(filename), arch, filename, name_expressions=exprs)
        assert cubin[:4] == b"\x7fELF" and set(names) == set(exprs)


def test_column_use_per_row_block_follows_the_swizzled_rows():
    a = torch.zeros(4, 6)
    a[0, [1, 2]] = 1
    a[1, [0, 1, 2, 3]] = 1  # longest row: first in the swizzle
    a[3, [5]] = 1
    used = rows_block_column_use(csr_from_dense(a), 2).reshape(2, 6)
    # swizzled order 1, 0, 3, 2: block 0 = rows {1, 0}, block 1 = rows {3, 2}
    assert used.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]]


def test_chunk_pointers_split_each_row_at_chunk_boundaries():
    a = torch.zeros(3, 10)
    a[0, [0, 3, 4, 9]] = 1
    a[2, [5, 6]] = 2
    cp = chunk_pointers(csr_from_dense(a), 4)  # chunks [0,4) [4,8) [8,10)
    assert cp.tolist() == [[0, 2, 3, 4], [4, 4, 4, 4], [4, 4, 6, 6]]


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("geom", CONV_3X3_GEOMETRIES + [
    ConvGeometry(17, 3, 13, 7, 5, 3, 1, 2, 2, 1, 2, 1),            # 5x3 kernel, mixed strides
    ConvGeometry(11, 9, 5, 6, 1, 1, 2, 2),                         # 1x1 stride 2 (a downsample)
])
def test_window_kernel_matches_conv2d(backend, dtype, geom):
    cfg = window_config(geom, 2, 2, budget=3 * 40)  # a tiny stage budget forces several K chunks
    assert -(-geom.c // cfg.chunk_c) >= 2
    assert conv_case(backend, dtype, geom, cfg) <= TOL[dtype]


@emu
@pytest.mark.parametrize("p,rpt,threads", [(4, 4, 256), (2, 2, 256), (4, 2, 512)])
def test_window_kernel_tiles_rows_and_split_k(backend, p, rpt, threads):
    g = ConvGeometry(37, 6, 15, 21, 3, 3, 1, 1, 1, 1, 1, 1)  # several tiles, M not a multiple of a block's rows
    cfg = window_config(g, p, rpt, budget=240, threads=threads)
    split = with_split(g, cfg, sms=64)
    assert split is not None and split.nsplit >= 2
    assert conv_case(backend, torch.float32, g, cfg, relu=True) <= 1e-5
    assert conv_case(backend, torch.float32, g, split, relu=True) <= 1e-5
    assert conv_case(backend, torch.float16, g, split, relu=True) <= 2e-3


def test_staged_sparse_runs_pack_each_block_chunk_contiguously():
    a = torch.zeros(5, 12)
    a[0, [0, 5, 9]] = 1.0
    a[1, [1, 2, 3, 4, 6, 7, 8]] = 2.0  # longest row: slot 0
    a[3, [11]] = 3.0
    csr = csr_from_dense(a)
    cp = chunk_pointers(csr, 4)  # chunks of columns [0,4) [4,8) [8,12)
    src, blk_ptr = staged_sparse_runs(csr, cp, 4, 2)
    assert blk_ptr.shape == (3, 3, 3)  # 3 row blocks of 2 slots (the last half empty), 3 chunks
    starts = blk_ptr.long()
    assert bool((starts % 4 == 0).all())  # every segment starts aligned
    # runs are consecutive: each (block, chunk) run ends where the next begins
    ends = starts[:, :, -1].reshape(-1)
    assert ends[:-1].tolist() == starts[:, :, 0].reshape(-1)[1:].tolist() and int(ends[-1]) == src.numel()
    # every entry appears once, inside its own row's segment of its own chunk, in column order
    assert sorted(src[src >= 0].tolist()) == list(range(csr.nnz))
    order = csr.row_order.tolist()
    cols, ptr = csr.col_idx.tolist(), csr.row_ptr.tolist()
    for slot, row in enumerate(order):
        b, s = divmod(slot, 2)
        for q in range(3):
            seg = src[starts[b, q, s]:starts[b, q, s + 1]].tolist()
            got = [e for e in seg if e >= 0]
            want = [e for e in range(ptr[row], ptr[row + 1]) if cols[e] // 4 == q]
            assert got == want and len(seg) == -(-len(want) // 4) * 4


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p,rpt,threads,split", [(4, 4, 256, False), (2, 2, 512, True), (4, 2, 256, True)])
def test_staged_sparse_window_kernel_matches_conv2d(backend, dtype, p, rpt, threads, split):
    g = ConvGeometry(37, 6, 15, 21, 3, 3, 1, 1, 1, 1, 1, 1)  # several tiles, M not a multiple of a block's rows
    cfg = replace(window_config(g, p, rpt, budget=240, threads=threads), ss=True)
    if split:
        cfg = with_split(g, cfg, sms=64)
        assert cfg is not None and cfg.nsplit >= 2 and cfg.ss
    assert conv_case(backend, dtype, g, cfg, relu=True) <= TOL[dtype]
    assert conv_case(backend, dtype, ConvGeometry(13, 5, 10, 9, 3, 3, 2, 2, 0, 1, 1, 0),
                     replace(window_config(ConvGeometry(13, 5, 10, 9, 3, 3, 2, 2, 0, 1, 1, 0), p, rpt, budget=120,
                                           threads=threads), ss=True), density=0.05) <= TOL[dtype]


@emu
def test_window_kernel_reads_channels_last_input(backend):
    g = ConvGeometry(10, 8, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1)
    cfg = window_config(g, 2, 2, budget=2 * 9 * 11)
    assert conv_case(backend, torch.float32, g, cfg, channels_last=True, batch=3) <= 1e-5


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_residual_epilogue_of_the_staged_kernels(backend, dtype):
    """relu(conv + bias + residual): window and SpMM kernels, with and without split-K (the
    residual added once, by split 0, as the bias), residual contiguous or channels-last."""
    win = ConvGeometry(37, 6, 15, 21, 3, 3, 1, 1, 1, 1, 1, 1)
    cfg = window_config(win, 2, 2, budget=240)
    split = with_split(win, cfg, sms=64)
    assert split is not None and split.nsplit >= 2
    pw = ConvGeometry(29, 21, 8, 12)
    vec = spmm_config(pw, 4, 2, budget=5 * 128)
    vec_split = with_split(pw, vec, sms=200)
    assert vec_split is not None and vec_split.nsplit >= 2
    for g, c in ((win, cfg), (win, split), (pw, vec), (pw, vec_split), (pw, spmm_config(pw, 2, 4, budget=5 * 64))):
        for residual in (True, "channels_last"):
            err = conv_case(backend, dtype, g, c, relu=True, residual=residual)
            assert err <= TOL[dtype], (c.label(), residual)
    # without the ReLU too (negative sums are not clipped away)
    assert conv_case(backend, torch.float32, win, cfg, relu=False, residual=True) <= 1e-5


@emu
def test_fused_residual_of_a_gemm_through_spmv_and_spmm(backend):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(23, 70, generator=gen) * (torch.rand(23, 70, generator=gen) < 0.2)
    bias = torch.randn(23, generator=gen)
    for batch in (3, 11):
        x = torch.randn(batch, 70, generator=gen)
        r = 2 * torch.randn(batch, 23, generator=gen)
        ref = torch.relu(F.linear(x, w, bias) + r)
        if batch <= 8:
            y = GemvPlan(csr_from_dense(w), torch.float32, "cpu", backend, bias, relu=True)(x, r)
        else:
            g = gemm_as_conv_geometry(23, 70, batch)
            plan = ConvPlan(csr_from_dense(w), g, spmm_config(g, 1, 2, budget=32 * 16), torch.float32, "cpu", backend,
                            bias, relu=True)
            y = gemm_conv_plan_call(plan, x, r)
        assert rel_err(y, ref) <= 1e-5, batch


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hw,p,rpt,threads,aligned", [((7, 9), 2, 2, 256, False), ((8, 12), 1, 4, 256, True),
                                                       ((11, 13), 4, 8, 256, False), ((16, 16), 4, 2, 512, True)])
def test_pointwise_spmm_kernel_matches_conv2d(backend, dtype, hw, p, rpt, threads, aligned):
    g = ConvGeometry(29, 21, *hw)
    assert ((hw[0] * hw[1]) % 4 == 0) == aligned  # vector staging runs only on aligned rows
    cfg = spmm_config(g, p, rpt, budget=5 * 32 * p, threads=threads)
    assert conv_case(backend, dtype, g, cfg, relu=True) <= TOL[dtype]
    split = with_split(g, cfg, sms=200)
    assert split is not None
    assert conv_case(backend, dtype, g, split) <= TOL[dtype]


@emu
@pytest.mark.parametrize("k,n,density", [(40, 50, 0.1), (33, 96, 0.3), (7, 5, 0.5)])
def test_spmm_of_the_gemm_sweep_matches_matmul(backend, k, n, density):
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(19, k, generator=gen) * (torch.rand(19, k, generator=gen) < density)
    a[4] = 0
    b = torch.randn(k, n, generator=gen)
    g = ConvGeometry(19, k, 1, n)
    cands = candidate_configs(g, sms=8)
    staged = [c for c in cands if isinstance(c, ConvConfig)][:3]
    sputnik = [c for c in cands if isinstance(c, SputnikConfig)]
    assert sputnik and all(n % c.dv == 0 for c in sputnik)  # Sputnik's vectors must divide N
    for cfg in staged + sputnik:
        plan = make_plan(csr_from_dense(a), g, cfg, torch.float32, "cpu", backend)
        assert rel_err(plan.spmm(b), a @ b) <= 1e-5, cfg.label()


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_spmv_kernel_matches_linear(backend, dtype, batch):
    gen = torch.Generator().manual_seed(batch)
    w = torch.randn(45, 301, generator=gen) * (torch.rand(45, 301, generator=gen) < 0.15)
    w[0] = 0
    w[7, :3] = 1.0  # a 3-entry row: ROMA prefix and residue in one group
    w[9] = torch.randn(301, generator=gen)
    bias = torch.randn(45, generator=gen)
    x = torch.randn(batch, 301, generator=gen).to(dtype)
    plan = GemvPlan(csr_from_dense(w), dtype, "cpu", backend, bias, relu=True)
    ref = torch.relu(F.linear(x.float(), w.to(dtype).float(), bias))
    assert rel_err(plan(x).float(), ref) <= TOL[dtype]


@emu
def test_gemm_above_the_spmv_batch_runs_through_the_spmm_kernel(backend):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(23, 70, generator=gen) * (torch.rand(23, 70, generator=gen) < 0.2)
    x = torch.randn(11, 70, generator=gen)
    g = gemm_as_conv_geometry(23, 70, 11)
    cfg = spmm_config(g, 1, 2, budget=32 * 16)
    plan = ConvPlan(csr_from_dense(w), g, cfg, torch.float32, "cpu", backend, torch.ones(23), relu=False)
    assert rel_err(gemm_conv_plan_call(plan, x), F.linear(x, w, torch.ones(23))) <= 1e-5


# --- Sputnik's SpMM (csr_sputnik.cu) -----------------------------------------------------------

def sputnik_case_weight(m, k, density, gen):
    """Empty rows, one full row (several BK tiles), rows whose starts are not 4-aligned (ROMA)."""
    a = torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < density)
    a[0] = 0
    a[m // 2] = 0
    a[1] = torch.randn(k, generator=gen)
    a[2, :3] = 1.0  # a 3-entry row: residue only
    return a


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_sputnik_variant_matches_matmul(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    for variant in SPUTNIK_VARIANTS[dtype]:
        cfg = SputnikConfig(*variant)
        # N not a multiple of the tile (but of the vector width), K from tiny to several tiles
        n = cfg.dv * (2 * cfg.bx // cfg.dv + 3)
        for k in (3, 77):
            a = sputnik_case_weight(21, k, 0.5, gen)
            b = torch.randn(k, n, generator=gen).to(dtype)
            bias = torch.randn(21, generator=gen)
            plan = SputnikPlan(csr_from_dense(a), ConvGeometry(21, k, 1, n), cfg, dtype, "cpu", backend, bias, True)
            ref = torch.relu(a.to(dtype).double() @ b.double() + bias.double()[:, None])
            assert rel_err(plan.spmm(b).double(), ref) <= TOL[dtype], (cfg.label(), k)


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("geom", CONV_3X3_GEOMETRIES + [
    ConvGeometry(11, 9, 5, 6, 1, 1, 2, 2),                         # 1x1 stride 2: im2col too
    ConvGeometry(29, 21, 8, 12),                                   # pointwise: B is the input itself
])
def test_sputnik_candidates_of_a_conv_match_conv2d(backend, dtype, geom):
    cands = [c for c in candidate_configs(geom, dtype=dtype) if isinstance(c, SputnikConfig)]
    assert cands and all((c.im2col or c.shifted) != geom.pointwise for c in cands)
    # stride-1 convs also get the shifted copies (no im2col), strided ones only im2col
    assert any(c.shifted for c in cands) == (not geom.pointwise and (geom.sh, geom.sw) == (1, 1))
    for cfg in cands:
        assert conv_case(backend, dtype, geom, cfg, relu=True, seed=cfg.bx + cfg.dv) <= TOL[dtype], cfg.label()


@emu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_residual_epilogue_of_the_sputnik_port(backend, dtype):
    """Direct (pointwise), im2col and shifted Sputnik plans add the residual before the ReLU."""
    conv3 = ConvGeometry(20, 7, 9, 11, 3, 3, 1, 1, 1, 1, 1, 1)
    pointwise = ConvGeometry(29, 21, 8, 12)
    for g, kinds in ((conv3, ("im2col", "shifted")), (pointwise, ("direct",))):
        cands = [c for c in candidate_configs(g, dtype=dtype) if isinstance(c, SputnikConfig)]
        for kind in kinds:
            cfg = next(c for c in cands if {"im2col": c.im2col, "shifted": c.shifted,
                                            "direct": not (c.im2col or c.shifted)}[kind])
            for residual in (True, "channels_last"):
                err = conv_case(backend, dtype, g, cfg, relu=True, residual=residual, seed=3)
                assert err <= TOL[dtype], (cfg.label(), residual)
    odd = ConvGeometry(13, 5, 7, 9)  # N = 63: scalar residual loads and stores
    cfg = SputnikConfig(*sputnik_heuristic(63, dtype))
    assert cfg.dv == 1 and conv_case(backend, dtype, odd, cfg, relu=True, residual=True) <= TOL[dtype]


@emu
def test_sputnik_im2col_and_shifted_copies_read_channels_last_input(backend):
    g = ConvGeometry(10, 8, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1)
    for cfg in (SputnikConfig(4, 32, 32, 8, 4, 4, im2col=True), SputnikConfig(4, 32, 32, 8, 4, 4, shifted=True)):
        assert conv_case(backend, torch.float32, g, cfg, channels_last=True, batch=3) <= 1e-5


@emu
def test_shifted_copies_hold_the_padded_input_shifted_by_0_to_3(backend):
    g = ConvGeometry(4, 3, 5, 6, 3, 3, 1, 1, 1, 2, 1, 0)  # asymmetric pads: Hp = 7, Wp = 8
    plan = SputnikPlan(csr_from_dense(torch.ones(4, 27)), g, SputnikConfig(4, 32, 32, 8, 4, 4, shifted=True),
                       torch.float32, "cpu", backend)
    x = torch.randn(2, 3, 5, 6)
    copies = plan.shifted_copies(x)
    xpad = F.pad(x, (2, 0, 1, 1)).reshape(2, -1)
    flat = torch.cat([xpad, torch.zeros(2, plan.copy_len + 4 - xpad.shape[1])], 1)
    for j in range(4):
        assert torch.equal(copies[:, j], flat[:, j:j + plan.copy_len])
    # B's row k = (c, r, s) starts at c*Hp*Wp + r*Wp + s of the padded input: copy o % 4, offset o - o % 4
    o = 2 * 56 + 1 * 8 + 2  # k = (2, 1, 2)
    assert plan.k_offsets[2 * 9 + 1 * 3 + 2].item() == (o % 4) * plan.copy_len + o - o % 4


def test_sputnik_heuristic_is_sputniks_choice_by_n():
    f32, f16 = torch.float32, torch.float16
    assert sputnik_heuristic(50176) == (4, 32, 64, 8, 4, 4, 8)   # n % 64 == 0: the 64-wide tile
    assert sputnik_heuristic(784) == (4, 32, 32, 8, 4, 4, 1)     # n % 4 == 0
    assert sputnik_heuristic(98) == (2, 32, 32, 16, 2, 2, 1)     # even
    assert sputnik_heuristic(49) == (1, 32, 32, 32, 1, 1, 1)     # odd: scalar
    assert sputnik_heuristic(16) == (4, 32, 16, 8, 4, 2, 1)
    assert sputnik_heuristic(3136, f16)[5] == 8 and sputnik_heuristic(196, f16)[5] == 4


def test_sputnik_candidates_use_only_vectors_that_divide_the_rows():
    assert all(c.dv == 1 for c in sputnik_candidates(49))
    assert {c.dv for c in sputnik_candidates(98)} == {2}
    im2col = sputnik_candidates(49, n_align=56, im2col=True)  # padded im2col rows: float4 loads allowed
    assert im2col[0].dv == 4 and all(c.im2col for c in im2col)
    assert sputnik_candidates(784)[0] == SputnikConfig(4, 32, 32, 8, 4, 4)


def test_configs_of_both_families_round_trip_through_their_dicts():
    for cfg in (SputnikConfig(4, 32, 64, 8, 4, 4, 8, im2col=True), SputnikConfig(1, 32, 32, 32, 1, 1, shifted=True),
                spmm_config(ConvGeometry(8, 16, 4, 4), 2, 4)):
        assert config_from_dict(cfg.to_dict()) == cfg


@emu
def test_sputnik_plan_refuses_b_rows_its_vectors_cannot_read(backend):
    a = torch.eye(8, 12)
    plan = SputnikPlan(csr_from_dense(a), ConvGeometry(8, 12, 1, 50), SputnikConfig(4, 32, 32, 8, 4, 4), torch.float32,
                       "cpu", backend)
    with pytest.raises(ValueError, match="aligned"):
        plan.spmm(torch.randn(12, 50))


# --- on the GPU (run with -m gpu on the H100) ------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("geom", [
    ConvGeometry(64, 64, 56, 56, 3, 3, 1, 1, 1, 1, 1, 1),
    ConvGeometry(128, 64, 56, 56, 3, 3, 2, 2, 1, 1, 1, 1),
    ConvGeometry(33, 17, 13, 29, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2),
    ConvGeometry(512, 512, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1),
    ConvGeometry(256, 128, 28, 28, 1, 1, 2, 2),
    ConvGeometry(77, 45, 9, 7),
])
def test_gpu_conv_kernels_match_conv2d(dtype, geom):
    from sparsecnn.runtimes.csr.kernels import NvrtcBackend

    backend = NvrtcBackend("cuda")
    for i, cfg in enumerate(candidate_configs(geom, dtype=dtype)):  # fp16 has its own Sputnik configs
        w = pruned_conv_weight(geom.m, geom.c, geom.kh, geom.kw, 0.1, seed=torch.seed() % 1000)
        x = torch.randn(1, geom.c, geom.h, geom.w, device="cuda").to(dtype)
        b = torch.randn(geom.m, device="cuda")
        plan = make_plan(csr_from_dense(gemm_view(w)), geom, cfg, dtype, "cuda", backend, b, relu=True)
        xf = F.pad(x.float().cpu(), (geom.pl, geom.pr, geom.pt, geom.pb))  # reference on the CPU: no TF32
        conv = F.conv2d(xf, w.to(dtype).float(), b.cpu(), (geom.sh, geom.sw), 0, (geom.dh, geom.dw))
        assert rel_err(plan(x).float().cpu(), torch.relu(conv)) <= TOL[dtype], cfg.label()
        # the fused residual (contiguous, or channels-last every other config), added before the ReLU
        r = (2 * torch.randn(1, geom.m, geom.ho, geom.wo, device="cuda")).to(dtype)
        if i % 2:
            r = r.contiguous(memory_format=torch.channels_last)
        ref = torch.relu(conv + r.float().cpu())
        assert rel_err(plan(x, r).float().cpu(), ref) <= TOL[dtype], (cfg.label(), "residual")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(64, 576, 3136), (37, 3, 100), (256, 2304, 196), (45, 301, 49), (128, 1152, 784)])
def test_gpu_sputnik_kernels_match_matmul(dtype, m, k, n):
    """Every Sputnik variant whose vectors fit N: fresh random inputs, odd N, tiny K, empty rows."""
    from sparsecnn.runtimes.csr.kernels import NvrtcBackend

    backend = NvrtcBackend("cuda")
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for variant in SPUTNIK_VARIANTS[dtype]:
        cfg = SputnikConfig(*variant)
        if n % cfg.dv:
            continue
        a = sputnik_case_weight(m, k, 0.1, gen)
        b = torch.randn(k, n, generator=gen).to(dtype)
        bias = torch.randn(m, generator=gen)
        plan = SputnikPlan(csr_from_dense(a), ConvGeometry(m, k, 1, n), cfg, dtype, "cuda", backend, bias, True)
        y = plan.spmm(b.cuda()).double().cpu()
        ref = torch.relu(a.to(dtype).double() @ b.double() + bias.double()[:, None])
        assert rel_err(y, ref) <= TOL[dtype], cfg.label()
