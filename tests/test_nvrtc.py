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
