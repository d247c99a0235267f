import pytest
import torch

from sparsecnn.runtimes.nvrtc import CI_ARCHS, KernelCompileError, compile_cubin, load_source, nvrtc_available

pytestmark = pytest.mark.skipif(not nvrtc_available()[0], reason="NVRTC not installed")


@pytest.mark.parametrize("arch", CI_ARCHS)
def test_smoke_kernel_compiles_for_ci_archs(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path))
    cubin, names = compile_cubin(load_source("smoke.cu"), arch, "smoke.cu", name_expressions=("axpb<float>", "axpb<__half>"))
    assert cubin[:4] == b"\x7fELF"
    assert set(names) == {"axpb<float>", "axpb<__half>"}
    # the second compile comes from the disk cache, byte for byte
    again, names2 = compile_cubin(load_source("smoke.cu"), arch, "smoke.cu", name_expressions=("axpb<float>", "axpb<__half>"))
    assert again == cubin and names2 == names
    assert len(list(tmp_path.rglob("*.cubin"))) == 1


def test_compile_groups_fills_the_cache_in_parallel(tmp_path, monkeypatch):
    """Two groups compiled by worker processes: compile_cubin then finds each one cached (a
    read-only cache would make it compile again: compare with use_cache=False)."""
    from sparsecnn.runtimes.nvrtc import compile_groups

    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path))
    groups = [("axpb<float>",), ("axpb<__half>",)]
    compile_groups(load_source("smoke.cu"), "sm_90", "smoke.cu", groups, workers=2)
    assert len(list(tmp_path.rglob("*.cubin"))) == 2
    for group in groups:
        cached, names = compile_cubin(load_source("smoke.cu"), "sm_90", "smoke.cu", name_expressions=group)
        fresh, names2 = compile_cubin(load_source("smoke.cu"), "sm_90", "smoke.cu", name_expressions=group,
                                      use_cache=False)
        assert cached == fresh and names == names2
    assert len(list(tmp_path.rglob("*.cubin"))) == 2  # nothing new was written: both were found


def test_compile_error_carries_the_compiler_log(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path))
    with pytest.raises(KernelCompileError, match="undefined_thing"):
        compile_cubin("__global__ void k() { undefined_thing(); }", "sm_90")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_smoke_kernel_runs_on_torch_stream_and_in_a_cuda_graph(dtype):
    from sparsecnn.runtimes.nvrtc import Kernel

    expr = "axpb<float>" if dtype == torch.float32 else "axpb<__half>"
    k = Kernel(load_source("smoke.cu"), expr, name_expressions=(expr,))
    x = torch.randn(1000, device="cuda").to(dtype)
    y = torch.empty(1000, device="cuda")
    k(((1000 + 255) // 256,), (256,), x, y, 2.0, 1.0, 1000)
    torch.testing.assert_close(y, 2 * x.float() + 1)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        k(((1000 + 255) // 256,), (256,), x, y, 3.0, 0.0, 1000)
    x.copy_(torch.ones_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, torch.full_like(y, 3.0))


def test_compiling_leaves_python_objects_intact(tmp_path, monkeypatch):
    """An empty NVRTC log is one byte; writing it into an immutable bytes object corrupted
    CPython's shared b" " and, through it, torch.load of any later checkpoint."""
    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path))
    compile_cubin(load_source("smoke.cu"), "sm_90", "smoke.cu", name_expressions=("axpb<float>",), use_cache=False)
    assert b" " == bytes([32])
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.load(path, weights_only=True)["w"].sum() == 2


def test_cache_key_holds_header_contents_not_paths(tmp_path, monkeypatch):
    """A cache filled on one machine must be found on another (other install paths), and an edit to a
    header two includes deep must miss it."""
    from sparsecnn.runtimes import nvrtc

    src_dir = tmp_path / "cuda"
    src_dir.mkdir()
    (src_dir / "outer.cuh").write_text('#include "inner.cuh"\n', encoding="utf-8")
    (src_dir / "inner.cuh").write_text("#define SCALE 2\n", encoding="utf-8")
    monkeypatch.setattr(nvrtc, "KERNEL_DIRS", (src_dir,))
    source = '#include "outer.cuh"\n__global__ void k(float* p) { p[0] *= SCALE; }\n'
    opts, key = nvrtc._options_and_key(source, "sm_90", (), ())
    assert f"--include-path={src_dir}" in opts  # the compiler still finds the headers
    monkeypatch.setattr(nvrtc, "cuda_include_dirs", lambda: ["/elsewhere/cuda/include"])
    monkeypatch.setattr(nvrtc, "KERNEL_DIRS", (src_dir, tmp_path / "moved"))
    assert nvrtc._options_and_key(source, "sm_90", (), ())[1] == key
    (src_dir / "inner.cuh").write_text("#define SCALE 3\n", encoding="utf-8")
    assert nvrtc._options_and_key(source, "sm_90", (), ())[1] != key


def test_precompile_fills_the_cache_once_and_names_unknown_families(tmp_path, monkeypatch):
    from sparsecnn.common.errors import UserError
    from sparsecnn.runtimes import kernel_programs

    monkeypatch.setenv("SPARSECNN_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_programs, "FAMILIES",
                        {"smoke": lambda: ("smoke.cu", [("axpb<float>",), ("axpb<__half>",)])})
    first = kernel_programs.precompile(["sm_90"], workers=1)
    assert [(r["family"], r["programs"], r["compiled"]) for r in first] == [("smoke", 2, 2)]
    assert len(list(tmp_path.rglob("*.cubin"))) == 2
    # what the precompile wrote is what a later compile of the same program finds
    cached, _ = compile_cubin(load_source("smoke.cu"), "sm_90", "smoke.cu", name_expressions=("axpb<__half>",))
    assert cached in {p.read_bytes() for p in tmp_path.rglob("*.cubin")}
    assert len(list(tmp_path.rglob("*.cubin"))) == 2
    assert kernel_programs.precompile(["sm_90"], workers=1)[0]["compiled"] == 0
    with pytest.raises(UserError, match="unknown kernel family nope"):
        kernel_programs.precompile(["sm_90"], families=["nope"])


def test_runtime_programs_cover_each_instantiation_once():
    from sparsecnn.runtimes.csr import kernels
    from sparsecnn.runtimes.ecr.runtime import VARIANTS, kernel_programs as ecr_programs

    for filename in kernels.KERNEL_FILES:
        for dtype in (torch.float32, torch.float16):
            groups = kernels.dtype_programs(filename, dtype)
            flat = [e for g in groups for e in g]
            assert sorted(flat) == sorted(kernels.all_expressions(filename, dtype))
            assert max(map(len, groups)) <= kernels.PROGRAM_SIZE
    assert len(ecr_programs()) == len(VARIANTS)


def test_doctor_compile_kernels_wants_a_written_arch(capsys):
    from sparsecnn.converter.cli import main

    assert main(["doctor", "--compile-kernels", "90"]) == 2
    assert "written like sm_90" in capsys.readouterr().err
    assert main(["doctor", "--compile-kernels", "sm_9999"]) == 2  # before any compile, not NVRTC's traceback
    err = capsys.readouterr().err
    assert "sm_9999: NVRTC" in err and "only" in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        assert main(["doctor", "--compile-kernels"]) == 2
        assert "name the architectures" in capsys.readouterr().err
