"""Host side of the tensor-core CSR kernel (runtimes/csr/cuda/csr_tc.cu): Flash-LLM's "load
sparse, compute dense" for fp16 convs on sm_80+.

The weight's GEMM view (passes/csr/layout.py) becomes *tiled CSL*: TM x 64 tiles, each tile's
non-zeros one run of 32-bit words (in-tile position << 16 | fp16 bits), runs ordered m tile then
k tile and padded to a multiple of four words with words aimed at a scratch slot past the tile.
The kernel copies a tile's run to registers, scatters it into a zeroed shared-memory tile and
multiplies that with mma.m16n8k16 against the im2col of the input, gathered per K tile. The
configs join the csr runtime's per-layer choice (kernels.candidate_configs) for fp16 on cards
with the instruction; `TcPlan` runs one layer like kernels.ConvPlan.
"""
from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ...passes.csr.layout import CSR
from ..nvrtc import has_feature
from ..split_k import run_split, split_count
from .kernels import ConvGeometry, PlanDoesNotFit, _ptr, _residual

TILE_K = 64
PITCH = TILE_K + 8  # halves a shared-memory row of the expanded tile (csr_tc.cu kAPitch, kBPitch)
THREADS = 128
FEATURE = "mma.sync m16n8k16"  # nvrtc.ARCH_FEATURES: sm_80+
# (TM, TN) instantiations; RV (word vectors a thread keeps in registers) = TM / 32, i.e. a
# quarter of a tile's slots: tiles denser than 25 % scatter the rest from global memory.
# No 128 x 16: at N <= 16 the 64-row tile makes twice the blocks, and each instance costs
# 2-6 s of NVRTC time (sm_90).
VARIANTS = ((64, 16), (64, 32), (64, 64), (128, 32), (128, 64))


LABEL_PREFIX = "tensor-core tc"  # a chosen candidate's name starts so: the report prices it as tiled-CSL


class TcParams(ctypes.Structure):
    """Mirror of csr::TcParams in cuda/csr_tc.cu (same order, same C types)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("words", "tile_ptr", "k_tab", "bias", "x", "y", "residual")] + [
        (n, ctypes.c_longlong) for n in ("x_batch", "y_batch", "r_batch")] + [
        (n, ctypes.c_int) for n in ("M", "N", "C", "H", "W", "Wo", "sh", "sw", "ph", "pw", "x_cs", "x_hs", "x_ws",
                                    "y_cs", "y_ps", "r_cs", "r_ps", "k_tiles", "tiles_per_split", "nsplit",
                                    "relu", "accumulate")]


def tc_expression(tm: int, tn: int) -> str:
    return f"csr::csr_tc<{tm}, {tn}, {tm // 32}>"


def all_tc_expressions(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernel is fp16 only (tensor cores multiply fp16; fp32 layers keep the CUDA-core kernels)."""
    return tuple(tc_expression(tm, tn) for tm, tn in VARIANTS) if dtype == torch.float16 else ()


def tensor_cores(arch: str | None, dtype: torch.dtype) -> bool:
    """Whether the tensor-core kernel is offered: fp16 on a card with mma.sync m16n8k16."""
    return dtype == torch.float16 and arch is not None and has_feature(arch, FEATURE)


@dataclass(frozen=True)
class TcConfig:
    """TM output channels x TN output pixels a block (4 warps), K in tiles of 64; nsplit blocks
    along K (fp32 atomics into a workspace) when M x N make too few blocks."""

    tm: int
    tn: int
    nsplit: int = 1

    family = "tc"

    def label(self) -> str:
        split = f" splitk{self.nsplit}" if self.nsplit > 1 else ""
        return f"{LABEL_PREFIX} m{self.tm} n{self.tn}{split}"

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


def _k_tiles(k: int) -> int:
    return max(1, -(-k // TILE_K))


def tc_split(g: ConvGeometry, tm: int, tn: int, sms: int, batch: int = 1) -> int:
    """Blocks along K for this tile's grid (M tiles x pixel tiles x batch): split_k's rule over K tiles."""
    return split_count(-(-g.m // tm) * -(-(g.ho * g.wo) // tn) * batch, _k_tiles(g.k), sms)


def tc_candidates(g: ConvGeometry, sms: int = 132, batch: int = 1) -> list[TcConfig]:
    """The configs worth timing: the pixel tile that wastes least of N (and the next wider one),
    64- and 128-row tiles, each also split along K where the grid is small."""
    n = g.ho * g.wo
    tns = [16] if n <= 16 else [32, 16] if n <= 32 else [64, 32]
    out = []
    for tm in (64, 128):
        for tn in tns:
            if (tm, tn) not in VARIANTS or (tm == 128 and g.m <= 64):
                continue
            out.append(TcConfig(tm, tn))
            split = tc_split(g, tm, tn, sms, batch)
            if split > 1:
                out.append(TcConfig(tm, tn, split))
    return out


# --- the format -------------------------------------------------------------------------------

def tiled_csl(csr: CSR, tm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words int32 [total], tile_ptr int32 [m_tiles * k_tiles + 1]) of the CSR's GEMM view [M, K].

    Word = (position << 16) | fp16 bits, position = row_in_tile * PITCH + col_in_tile (the padded
    shared-memory row); each run padded to a multiple of four words aimed at tm * PITCH."""
    m, k = csr.shape
    mts, kts = -(-m // tm), _k_tiles(k)
    if tm * PITCH + 8 > 65536:
        raise PlanDoesNotFit(f"a {tm}-row tile's positions do not fit 16 bits")
    rows = csr.row_indices()
    cols = csr.col_idx.long()
    tile = (rows // tm) * kts + cols // TILE_K
    pos = (rows % tm) * PITCH + cols % TILE_K
    bits = csr.values.to(torch.float16).view(torch.int16).long() & 0xFFFF
    order = torch.sort(tile, stable=True).indices
    tile, word = tile[order], (pos[order] << 16) | bits[order]
    counts = torch.bincount(tile, minlength=mts * kts)
    tile_ptr = torch.zeros(mts * kts + 1, dtype=torch.int64)
    tile_ptr[1:] = torch.cumsum((counts + 3) // 4 * 4, 0)
    first = torch.zeros(mts * kts + 1, dtype=torch.int64)
    first[1:] = torch.cumsum(counts, 0)
    rank = torch.arange(tile.numel()) - first[tile]
    out = np.full(int(tile_ptr[-1]), (tm * PITCH) << 16, dtype=np.uint32)
    out[(tile_ptr[tile] + rank).numpy()] = word.numpy().astype(np.uint32)
    return torch.from_numpy(out.view(np.int32)), tile_ptr.to(torch.int32)


def tiled_csl_to_dense(words: torch.Tensor, tile_ptr: torch.Tensor, shape: tuple[int, int], tm: int) -> torch.Tensor:
    """The fp16 matrix [M, K] a tiled CSL holds (the format's inverse, for tests and checks)."""
    m, k = shape
    kts = _k_tiles(k)
    w = torch.from_numpy(words.cpu().numpy().view(np.uint32).astype(np.int64))
    tile = torch.searchsorted(tile_ptr.long(), torch.arange(w.numel()), right=True) - 1
    pos, bits = w >> 16, w & 0xFFFF
    real = pos < tm * PITCH
    tile, pos, bits = tile[real], pos[real], bits[real]
    rows = (tile // kts) * tm + pos // PITCH
    cols = (tile % kts) * TILE_K + pos % PITCH
    dense = torch.zeros(-(-m // tm) * tm, kts * TILE_K, dtype=torch.float16)
    dense[rows, cols] = torch.from_numpy(bits.numpy().astype(np.uint16).view(np.float16))
    return dense[:m, :k]


def k_table(g: ConvGeometry) -> torch.Tensor:
    """[k_tiles * 64] int32: GEMM row k = (c, r, s) as c << 16 | r*dh << 8 | s*dw, -1 past K."""
    k = torch.arange(g.k, dtype=torch.int64)
    rs = g.kh * g.kw
    c, r, s = k // rs, (k % rs) // g.kw, k % g.kw
    if g.c > 32767 or (g.kh - 1) * g.dh > 255 or (g.kw - 1) * g.dw > 255:
        raise PlanDoesNotFit("channels or kernel reach too large for the tensor-core kernel's row table")
    tab = torch.full((_k_tiles(g.k) * TILE_K,), -1, dtype=torch.int64)
    tab[:g.k] = (c << 16) | ((r * g.dh) << 8) | (s * g.dw)
    return tab.to(torch.int32)


# --- the plan ---------------------------------------------------------------------------------

class TcPlan:
    """One conv layer prepared for one TcConfig; call it on x [N, C, H, W] (any strides)."""

    def __init__(self, csr: CSR, g: ConvGeometry, cfg: TcConfig, dtype: torch.dtype, device, backend,
                 bias: torch.Tensor | None = None, relu: bool = False):
        if csr.shape != (g.m, g.k):
            raise ValueError(f"CSR shape {csr.shape} does not match the layer's GEMM view {(g.m, g.k)}")
        if dtype != torch.float16:
            raise PlanDoesNotFit(f"{cfg.label()}: the tensor-core kernel multiplies fp16, not {dtype}")
        self.g, self.cfg, self.dtype, self.device, self.backend, self.relu = g, cfg, dtype, torch.device(device), backend, relu
        words, tile_ptr = tiled_csl(csr, cfg.tm)
        self.words = words.to(self.device)
        self.tile_ptr = tile_ptr.to(self.device)
        self.k_tab = k_table(g).to(self.device)
        self.bias = None if bias is None else bias.reshape(-1).to(self.device, torch.float32).contiguous()
        self.k_tiles = _k_tiles(g.k)
        self.tiles_per_split = -(-self.k_tiles // cfg.nsplit)
        self.npix = g.ho * g.wo
        self.smem = 2 * 2 * (cfg.tm * PITCH + 8) + 2 * 2 * cfg.tn * PITCH
        self.expr = tc_expression(cfg.tm, cfg.tn)

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.words, self.tile_ptr, self.k_tab, self.bias) if t is not None]

    def conv(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W] -> relu?(conv + bias + residual) [N, M, Ho, Wo] contiguous, fp16."""
        g, cfg = self.g, self.cfg
        x = x.to(self.dtype)
        n = x.shape[0]
        if max(x.stride()[1:]) * max(g.c, g.h, g.w) >= 2**31:
            raise ValueError("input too large for the tensor-core kernel's 32-bit offsets")
        shape = (n, g.m, g.ho, g.wo)
        r = _residual(residual, shape, self.dtype, flat_pixels=True)
        split = cfg.nsplit > 1
        return run_split(lambda y: self._launch(x, y, r, split), shape, self.dtype, x.device, split, self.relu)

    def _launch(self, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None, split: bool) -> None:
        g, cfg, n = self.g, self.cfg, x.shape[0]
        p = TcParams()
        p.words, p.tile_ptr, p.k_tab, p.bias = (self.words.data_ptr(), self.tile_ptr.data_ptr(),
                                                self.k_tab.data_ptr(), _ptr(self.bias))
        p.x, p.y, p.residual = x.data_ptr(), y.data_ptr(), _ptr(r)
        p.x_batch, p.x_cs, p.x_hs, p.x_ws = x.stride()
        p.y_batch, p.y_cs, p.y_ps = y.stride(0), y.stride(1), 1
        if r is not None:
            p.r_batch, p.r_cs, p.r_ps = r.stride(0), r.stride(1), r.stride(3)
        p.M, p.N, p.C, p.H, p.W, p.Wo = g.m, self.npix, g.c, g.h, g.w, g.wo
        p.sh, p.sw, p.ph, p.pw = g.sh, g.sw, g.pt, g.pl
        p.k_tiles, p.tiles_per_split, p.nsplit = self.k_tiles, self.tiles_per_split, cfg.nsplit
        p.relu, p.accumulate = int(self.relu), int(split)
        grid = (-(-self.npix // cfg.tn), -(-g.m // cfg.tm), n * cfg.nsplit)
        self.backend.launch("csr_tc.cu", self.expr, self.dtype, grid, (THREADS,), self.smem, p)

    def spmm(self, b: torch.Tensor) -> torch.Tensor:
        """B [K, N] -> A @ B [M, N] (the GEMM sweep's operation): B as a 1 x N image of K channels."""
        if (self.g.h, self.g.w) != (1, b.shape[1]) or not self.g.pointwise:
            raise ValueError(f"plan prepared for {self.g}, not a GEMM with N = {b.shape[1]}")
        return self.conv(b.unsqueeze(0).unsqueeze(2))[0, :, 0, :]

    __call__ = conv


__all__ = ["TcConfig", "TcPlan", "all_tc_expressions", "k_table", "tc_candidates", "tc_expression", "tc_split",
           "tensor_cores", "tiled_csl", "tiled_csl_to_dense"]
