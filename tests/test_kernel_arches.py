"""Every kernel family compiles for every architecture the loaded NVRTC serves in CI: CUDA 13's
for sm_87 and sm_90 (the main environment), CUDA 12's for each Jetson generation, sm_53 to sm_87
(CI's old-torch leg). One line per arch x family goes to the log. Where a source needs newer
hardware (cp.async, vector atomics) it must fall back, or ptxas rejects it for the older arch.
The fallback paths also run on the CPU emulator, compiled as for the Jetson Nano (sm_53)."""
import pytest
import torch

from sparsecnn.runtimes import kernel_programs, nvrtc

needs_nvrtc = pytest.mark.skipif(not nvrtc.nvrtc_available()[0], reason="NVRTC not installed")
ARCHS = nvrtc.compile_archs() if nvrtc.nvrtc_available()[0] else ()


def _one_program(family):
    # every instantiation of a family in one program: what compiles there compiles in the runtimes' groups
    filename, groups = kernel_programs.FAMILIES[family]()
    return filename, [tuple(e for g in groups for e in g)]


# family -> () -> (source file, [one program's name expressions, ...]): the runtimes' own list
# (runtimes/kernel_programs.py, what `doctor --compile-kernels` fills the cache with) and NVRTC's smoke kernel
FAMILIES = {"smoke": lambda: ("smoke.cu", [("axpb<float>", "axpb<__half>")]),
            **{family: (lambda f=family: _one_program(f)) for family in kernel_programs.FAMILIES}}


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernel_family_compiles_for_arch(family, arch, capsys):
    filename, programs = FAMILIES[family]()
    source = nvrtc.load_source(filename)
    for exprs in programs:
        cubin, names = nvrtc.compile_cubin(source, arch, filename, name_expressions=exprs, use_cache=False)
        assert cubin[:4] == b"\x7fELF" and set(names) == set(exprs)
    notes = {"csr": nvrtc.kernel_notes(arch, "csr"), "ecr": nvrtc.kernel_notes(arch, "ecr"),
             "two": nvrtc.kernel_notes(arch, "two_four_mma")}.get(family.split("_")[0])
    with capsys.disabled():
        print(f"\n  NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))} {arch} {family}: "
              f"{sum(map(len, programs))} kernels compiled" + (f" ({notes})" if notes else ""))


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_generated_sparsert_kernel_compiles_for_arch(arch, dtype, capsys):
    from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view
    from sparsecnn.runtimes.sparsert import codegen as cg

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, 3, 3, generator=g) * (torch.rand(16, 8, 3, 3, generator=g) < 0.3)
    geo = cg.LayerGeometry.conv(16, 8, 9, 9, 3, 3, (1, 1), (1, 1, 1, 1))
    prog = cg.build_program(csr_from_dense(gemm_view(w)), geo, cg.TileConfig(8, 2, 2, 2, 6), torch.randn(16),
                            relu=True, residual=True, dtype=dtype)
    src, name = cg.render_cuda(prog)
    cubin, _ = nvrtc.compile_cubin(src, arch, name + ".cu", cg.COMPILE_OPTIONS, use_cache=False)
    assert cubin[:4] == b"\x7fELF"
    with capsys.disabled():
        print(f"\n  NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))} {arch} sparsert generated ({dtype}): "
              f"compiled ({nvrtc.kernel_notes(arch, 'sparsert')})")


def test_kernel_notes_follow_the_hardware():
    assert "cp.async staging" in nvrtc.kernel_notes("sm_87", "csr")
    assert "plain loads" in nvrtc.kernel_notes("sm_53", "csr") and "scalar" in nvrtc.kernel_notes("sm_72", "ecr")
    assert "vector split-K atomics" in nvrtc.kernel_notes("sm_90", "ecr")
    assert "untested" in nvrtc.kernel_notes("sm_35", "csr")
    assert nvrtc.has_feature("sm_87", "2:4 sparse tensor cores") and not nvrtc.has_feature("sm_72", "cp.async")
    assert "mma.sp" in nvrtc.kernel_notes("sm_87", "two_four_mma")
    assert nvrtc.kernel_notes("sm_72", "two_four_mma").startswith("sm_72: no 2:4 mma.sp conv")
    with pytest.raises(ValueError):
        nvrtc.arch_number("87")


def test_fallback_paths_run_on_the_emulator_as_on_a_jetson_nano(monkeypatch):
    """The emulator runs the H100's paths (__CUDA_ARCH__ 900) by default; compiled as sm_53, the
    pre-sm_80 staging and pre-sm_90 scalar split-K atomics of the CSR and ECR kernels run instead."""
    from dataclasses import replace

    import cuda_emu
    from test_csr_kernels import conv_case
    from test_ecr import test_kernel_source_on_cpu_emulator_matches_reference as ecr_kernels_match_reference

    from sparsecnn.runtimes.csr.kernels import ConvGeometry, window_config, with_split

    if not cuda_emu.available():
        pytest.skip("g++ not installed")
    compile_for_host = cuda_emu.compile_library
    monkeypatch.setattr(cuda_emu, "compile_library",
                        lambda filename, source: compile_for_host(filename, "#define __CUDA_ARCH__ 530\n" + source))
    g = ConvGeometry(37, 6, 15, 21, 3, 3, 1, 1, 1, 1, 1, 1)
    staged_sparse = with_split(g, replace(window_config(g, 4, 2, budget=240, threads=256), ss=True), sms=64)
    assert staged_sparse.nsplit >= 2
    backend = cuda_emu.EmuBackend()
    assert conv_case(backend, torch.float32, g, staged_sparse, relu=True) <= 1e-5
    assert conv_case(backend, torch.float16, g, staged_sparse, relu=True) <= 2e-3
    ecr_kernels_match_reference(0)  # every ECR variant, split-K, fp32 and fp16
