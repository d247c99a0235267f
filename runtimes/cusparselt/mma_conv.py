"""Host side of conv2to4_mma.cu: sparsecnn's own 2:4 convolution on sparse tensor cores (mma.sp).

cuSPARSELt (runtime.py) needs im2col and a GEMM; this kernel gathers the input window itself
(implicit GEMM, NHWC fp16) and fuses bias, residual and ReLU at the store. It lives beside the
cuSPARSELt lowering because both are the same runtime's 2:4 candidates, chosen per layer by the
one chooser; the kernel is the docstring of cuda/conv2to4_mma.cu.

- `pack_for_mma(values, positions)`: the portable 2:4 layout (passes/two_four/layout.py) in the
  kernel's register order: per 16-row tile and 32-column chunk, each lane's four A registers (one
  uint4) and its metadata word. The portable positions are already PTX's metadata bits (2 bits per
  kept value, ascending, first in the low bits; 16 bits = four groups), so the metadata is a copy of
  bytes. `unpack_from_mma` inverts it (tests).
- `MmaConv`: one layer (weights, geometry, epilogue); called on an NCHW-shaped fp16 tensor in any
  memory format, returns NCHW-shaped output in channels-last memory (NCHW-contiguous callers convert,
  as the hybrid runtime's candidates do, inside the measured call).
- `NvrtcMma`: launches on PyTorch's current stream; tests pass an emulator backend with the same
  `launch(name, grid, block, params)`.
- `mma_unavailable(device, dtype)`: why the kernel is not offered (None when it is): CUDA, sm_80+
  (`nvrtc.has_feature(arch, "2:4 sparse tensor cores")`), fp16.
"""
from __future__ import annotations

import ctypes

import torch

from ...common.shapes import conv_out_size
from ..split_k import even_split, split_count

KERNEL_SOURCE = "conv2to4_mma.cu"
KERNELS = ("conv2to4_mma", "conv2to4_finish")
CHUNK = 32           # K columns per mma.sp (and per staged chunk)
TILE_M = 16          # rows per mma.sp
BLOCK_M, BLOCK_N, THREADS = 64, 64, 128
FINISH_THREADS = 256
MAX_SPLIT = 16
NAME = "mma.sp"      # the candidate's name in the chooser and the report
KERNEL_LABEL = "sparsecnn conv2to4_mma (implicit-GEMM mma.sp, NHWC fp16)"
_PAD_CODES = 0x44    # a byte of two padding groups: positions (0, 1) and (0, 1)


class Conv2to4Params(ctypes.Structure):
    """Mirror of Conv2to4Params in cuda/conv2to4_mma.cu (same order, same C types)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("wfrag", "wmeta", "x", "bias", "residual", "y", "ws")] + [
        (n, ctypes.c_int) for n in ("M", "Mt", "K", "KC", "Cin", "H", "W", "Ho", "Wo", "N", "kw", "sh", "sw", "pt",
                                    "pl", "dh", "dw", "chunks_per_split", "relu")]


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_for_mma(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable 2:4 (values [M, K/2] fp16, positions [M, ceil(K/8)] uint8) -> (wfrag int32 [Mt, KC, 32, 4],
    wmeta int32 [Mt, KC, 32]) for conv2to4_mma.cu, M padded to 16 and K to 32 with zero values at
    positions (0, 1). On values' device."""
    m, half = values.shape
    k = 2 * half
    if k % 4:
        raise ValueError(f"2:4 needs K a multiple of 4, got {k}")
    mp, kp = _round_up(m, TILE_M), _round_up(k, CHUNK)
    mt, kc = mp // TILE_M, kp // CHUNK
    dev = values.device
    vals = torch.zeros(mp, kp // 2, dtype=torch.float16, device=dev)
    vals[:m, :half] = values.to(torch.float16)
    pos = torch.full((mp, kp // 8), _PAD_CODES, dtype=torch.uint8, device=dev)
    nbytes = (half + 3) // 4
    pos[:m, :nbytes] = positions[:, :nbytes].to(dev, torch.uint8)
    if half % 4:  # the last byte holds one real group; its unused slots become a padding group
        pos[:m, nbytes - 1] |= 0x40
    # A registers: word w of a row is compressed columns (2w, 2w+1), the first in the low half.
    words = vals.view(torch.int32).view(mt, 2, 8, kc, 2, 4)          # [mt, row half, g, kc, q, t]
    wfrag = words.permute(0, 3, 2, 5, 4, 1).reshape(mt, kc, 32, 4)    # lane = 4g + t, register = 2q + half
    # metadata: lane (g, t < 2) = bytes 2t, 2t+1 of row g's chunk (low 16 bits) and of row g + 8's (high)
    b = pos.to(torch.int64).view(mt, 2, 8, kc, 2, 2)                 # [mt, row half, g, kc, t, byte]
    half16 = b[..., 0] | (b[..., 1] << 8)                             # [mt, row half, g, kc, t]
    word = half16[:, 0] | (half16[:, 1] << 16)                        # [mt, g, kc, t]
    meta = torch.zeros(mt, kc, 8, 4, dtype=torch.int64, device=dev)
    meta[..., :2] = word.permute(0, 2, 1, 3)
    return wfrag.contiguous(), _as_int32(meta.reshape(mt, kc, 32)).contiguous()


def unpack_from_mma(wfrag: torch.Tensor, wmeta: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """The dense A[m, k] (fp16) that `pack_for_mma`'s output multiplies with, read by PTX's fragment and
    metadata layouts (runtimes/cuda/mma.cuh); for tests."""
    mt, kc = wfrag.shape[:2]
    a = torch.zeros(mt * TILE_M, kc * CHUNK, dtype=torch.float16)
    regs = wfrag.cpu().contiguous().view(torch.float16).view(mt, kc, 32, 4, 2)
    meta = wmeta.cpu().to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        g, t = divmod(lane, 4)
        for reg in range(4):
            row_off, q = reg % 2, reg // 2
            rows = torch.arange(mt) * TILE_M + g + 8 * row_off
            group = t + 4 * q
            src = 4 * (g) + group // 4  # the lane whose metadata holds this group (selector 0)
            bits = (meta[:, :, src] >> (16 * row_off + 4 * (group % 4))) & 0xF  # [mt, kc]
            for j, shift in ((0, 0), (1, 2)):
                cols = torch.arange(kc)[None, :] * CHUNK + 4 * group + ((bits >> shift) & 3)
                a[rows[:, None].expand(mt, kc), cols.expand(mt, kc)] = regs[:, :, lane, reg, j]
    return a[:m, :k]


def _not_fp16(dtype: torch.dtype) -> str | None:
    return None if dtype == torch.float16 else f"the mma.sp kernel runs fp16, not {str(dtype).replace('torch.', '')}"


def mma_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why conv2to4_mma is not offered on `device` at `dtype`, or None when it is."""
    from .. import nvrtc

    if device.type != "cuda":
        return "the mma.sp kernel needs a CUDA GPU"
    if why := _not_fp16(dtype):
        return why
    try:
        arch = nvrtc.device_arch(device)
    except Exception as exc:  # noqa: BLE001 - a report line, never an exception
        return f"no compute capability: {type(exc).__name__}: {exc}"
    if not nvrtc.has_feature(arch, "2:4 sparse tensor cores"):
        return f"{arch}: no sparse tensor cores (mma.sp needs sm_80 or newer)"
    ok, why = nvrtc.nvrtc_available()
    return None if ok else f"NVRTC not available: {why}"


class NvrtcMma:
    """Compiles conv2to4_mma.cu once per device and launches on PyTorch's current stream."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._kernels: dict[str, object] = {}
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count

    def launch(self, name: str, grid, block, params: Conv2to4Params) -> None:
        if not self._kernels:  # both at once: split-K's finishing pass must not load a module inside a graph capture
            from ..nvrtc import Kernel, load_source

            source = load_source(KERNEL_SOURCE)
            self._kernels = {k: Kernel(source, k, self.device, name_expressions=KERNELS, filename=KERNEL_SOURCE)
                             for k in KERNELS}
        self._kernels[name](grid, block, params)


class MmaConv:
    """One 2:4 conv layer on conv2to4_mma.cu: y = relu?(conv(x, A) + bias + residual). A layer the
    kernel cannot run (`dtype`, the engine's, not fp16; Cin not a multiple of 4) raises
    NotImplementedError or ValueError saying why."""

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, kernel, stride, dilation, pads,
                 bias: torch.Tensor | None, relu: bool, backend, device, split: int | None = None,
                 dtype: torch.dtype = torch.float16):
        if why := _not_fp16(dtype):
            raise NotImplementedError(why)
        self.m, half = values.shape
        self.k = 2 * half
        self.kh, self.kw = (int(v) for v in kernel)
        if self.k % (self.kh * self.kw):
            raise ValueError(f"K={self.k} is not kh*kw*Cin for kernel {self.kh}x{self.kw}")
        self.cin = self.k // (self.kh * self.kw)
        if self.cin % 4:
            raise NotImplementedError(f"the mma.sp kernel needs Cin a multiple of 4 (2:4 along input channels), "
                                      f"got {self.cin}")
        self.stride, self.dilation = [int(v) for v in stride], [int(v) for v in dilation]
        self.pads = pads  # [top, left, bottom, right], or a function of the input (ONNX auto_pad)
        self.relu = bool(relu)
        self.backend, self.device = backend, torch.device(device)
        self.split = split  # None: by the grid's size against the SMs; an int: forced
        wfrag, wmeta = pack_for_mma(values.to(torch.float16), positions)
        self.wfrag, self.wmeta = wfrag.to(self.device), wmeta.to(self.device)
        self.mt, self.kc = wfrag.shape[:2]
        self.bias = None if bias is None else bias.detach().to(self.device, torch.float32).contiguous()
        self.buffers = [self.wfrag, self.wmeta] + ([self.bias] if self.bias is not None else [])

    def pads_for(self, x: torch.Tensor) -> list[int]:
        return [int(v) for v in (self.pads(x) if callable(self.pads) else self.pads)]

    def out_hw(self, x: torch.Tensor, pads: list[int] | None = None) -> tuple[int, int]:
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.stride, self.dilation, pads or self.pads_for(x)
        h, w = x.shape[2:]
        return conv_out_size(h, pt + pb, self.kh, sh, dh), conv_out_size(w, pl + pr, self.kw, sw, dw)

    def nsplit(self, n_pixels: int) -> tuple[int, int]:
        """(splits, chunks per split) over K for an output of n_pixels columns: forced, or split_k's rule
        (at most MAX_SPLIT slices of two chunks or more)."""
        if self.split is not None:
            splits = even_split(self.kc, int(self.split))
        else:
            blocks = -(-n_pixels // BLOCK_N) * -(-self.mt // (BLOCK_M // TILE_M))
            splits = split_count(blocks, self.kc, getattr(self.backend, "sms", 132), min(self.kc // 2, MAX_SPLIT))
        return splits, -(-self.kc // splits)

    def describe(self, x: torch.Tensor) -> dict:
        n = x.shape[0]
        ho, wo = self.out_hw(x)
        splits, _ = self.nsplit(n * ho * wo)
        return {"kernel": KERNEL_LABEL, "gemm": [self.m, self.k, n * ho * wo], "split_k": splits,
                "padded": {d: [a, b] for d, a, b in (("M", self.m, self.mt * TILE_M), ("K", self.k, self.kc * CHUNK))
                           if a != b}}

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self.cin:
            raise ValueError(f"input has {c} channels, the weight {self.cin}")
        if why := _not_fp16(x.dtype):
            raise NotImplementedError(why)
        pads = self.pads_for(x)  # once a call: a SAME conv resolves them from the input
        ho, wo = self.out_hw(x, pads)
        xh = x.permute(0, 2, 3, 1)
        if not xh.is_contiguous() or xh.data_ptr() % 8:
            xh = xh.contiguous()  # the gather reads 4 channels (8 bytes) at a time
        y = torch.empty(n, ho, wo, self.m, dtype=torch.float16, device=x.device)
        r = None
        if residual is not None:
            r = residual.permute(0, 2, 3, 1)
            if tuple(r.shape) != tuple(y.shape):
                raise ValueError(f"residual shape {tuple(residual.shape)} is not the output's")
            r = r.contiguous()
        pixels = n * ho * wo
        splits, per = self.nsplit(pixels)
        ws = torch.zeros(pixels, self.m, dtype=torch.float32, device=x.device) if splits > 1 else None
        (sh, sw), (dh, dw), (pt, pl, _, _) = self.stride, self.dilation, pads
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        p = Conv2to4Params(ptr(self.wfrag), ptr(self.wmeta), ptr(xh), ptr(self.bias), ptr(r), ptr(y), ptr(ws),
                           self.m, self.mt, self.k, self.kc, self.cin, h, w, ho, wo, pixels, self.kw, sh, sw, pt, pl,
                           dh, dw, per, int(self.relu))
        grid = (-(-pixels // BLOCK_N), -(-self.mt // (BLOCK_M // TILE_M)), splits)
        self.backend.launch("conv2to4_mma", grid, (THREADS,), p)
        if ws is not None:
            self.backend.launch("conv2to4_finish", (-(-pixels * self.m // FINISH_THREADS),), (FINISH_THREADS,), p)
        return y.permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
