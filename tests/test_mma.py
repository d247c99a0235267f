"""runtimes/cuda/mma.cuh: one dense m16n8k16 and one 2:4 sparse m16n8k32 tile through the CPU emulator
(tests/cuda_emu.h) and, in the GPU suite, on the card, each against a torch matmul. The test kernels
(tests/mma_tiles.cu) load plain row-major tiles into fragments by the PTX ISA's layouts."""
import ctypes
from pathlib import Path

import pytest
import torch

import cuda_emu
from helpers import rel_err
from sparsecnn.passes.two_four.layout import pack_2to4, unpack_2to4

SOURCE = Path(__file__).with_name("mma_tiles.cu")
# extern "C" entry points that launch each test kernel on one emulated warp
LAUNCHERS = """
extern "C" void run_mma_dense_tile(const void* a, const void* bt, const void* c, void* d) {
  emu::launch(&mma_dense_tile, dim3(1), dim3(32), 0, (const __half*)a, (const __half*)bt, (const float*)c, (float*)d);
}
extern "C" void run_mma_sp_tile(const void* v, const void* pos, const void* bt, const void* c, void* d) {
  emu::launch(&mma_sp_tile, dim3(1), dim3(32), 0, (const __half*)v, (const unsigned char*)pos, (const __half*)bt,
              (const float*)c, (float*)d);
}
"""


def _emu_library():
    return cuda_emu.compile_library("mma_tiles.cu", "#define SPARSECNN_EMU 1\n" + SOURCE.read_text() + LAUNCHERS)


def two_four_tile(g: torch.Generator) -> torch.Tensor:
    """A[16, 32], 2:4 along K, every one of the six position pairs present, some groups with one or no
    non-zero (the portable layout then keeps zeros; the positions stay distinct and ascending)."""
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    a = torch.zeros(16, 32)
    vals = torch.randn(16, 32, generator=g)
    for r in range(16):
        for q in range(8):
            p0, p1 = pairs[(r * 8 + q * 5 + r // 3) % 6]
            a[r, 4 * q + p0] = vals[r, 4 * q + p0]
            if (r + q) % 7:
                a[r, 4 * q + p1] = vals[r, 4 * q + p1]
    a[3, 8:12] = 0  # an empty group
    return a.half()


def _cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    dense = (torch.randn(16, 16, generator=g).half(), torch.randn(16, 8, generator=g).half(), torch.randn(16, 8, generator=g))
    a = two_four_tile(g)
    values, positions = pack_2to4(a)
    assert torch.equal(unpack_2to4(values, positions), a)
    sparse = (a, values, positions, torch.randn(32, 8, generator=g).half(), torch.randn(16, 8, generator=g))
    return dense, sparse


def _expected(a, b, c):
    return a.double() @ b.double() + c.double()


@pytest.mark.skipif(not cuda_emu.available(), reason="g++ not installed")
def test_mma_tiles_on_the_emulator_match_torch():
    lib = _emu_library()
    (a, b, c), (sa, values, positions, sb, sc) = _cases(0)
    d = torch.zeros(16, 8)
    bt = b.t().contiguous()
    lib.run_mma_dense_tile(*[ctypes.c_void_p(t.data_ptr()) for t in (a, bt, c, d)])
    assert rel_err(d, _expected(a, b, c).float()) < 1e-6

    d = torch.zeros(16, 8)
    sbt = sb.t().contiguous()
    lib.run_mma_sp_tile(*[ctypes.c_void_p(t.data_ptr()) for t in (values, positions, sbt, sc, d)])
    assert rel_err(d, _expected(sa, sb, sc).float()) < 1e-6
    # the metadata matters: the same values read as if every group kept positions 0 and 1 differ
    wrong = _expected(values.reshape(16, 8, 2).new_zeros(16, 8, 4).index_copy(2, torch.tensor([0, 1]),
                                                                                values.reshape(16, 8, 2)).reshape(16, 32),
                      sb, sc).float()
    assert rel_err(d, wrong) > 0.1


@pytest.mark.gpu
def test_mma_tiles_on_the_gpu_match_torch():
    from sparsecnn.runtimes import nvrtc

    if not nvrtc.has_feature(nvrtc.device_arch(), "2:4 sparse tensor cores"):
        pytest.skip("mma.sp needs sm_80 or newer")
    dev = torch.device("cuda")
    source = SOURCE.read_text()
    (a, b, c), (sa, values, positions, sb, sc) = _cases(0)
    d = torch.zeros(16, 8, device=dev)
    nvrtc.Kernel(source, "mma_dense_tile", dev, filename="mma_tiles.cu")(
        (1,), (32,), a.to(dev), b.t().contiguous().to(dev), c.to(dev), d)
    torch.cuda.synchronize()
    assert rel_err(d.cpu(), _expected(a, b, c).float()) < 1e-5
    d = torch.zeros(16, 8, device=dev)
    nvrtc.Kernel(source, "mma_sp_tile", dev, filename="mma_tiles.cu")(
        (1,), (32,), values.to(dev), positions.to(dev), sb.t().contiguous().to(dev), sc.to(dev), d)
    torch.cuda.synchronize()
    assert rel_err(d.cpu(), _expected(sa, sb, sc).float()) < 1e-5
