"""Host side of the CSR kernels (runtimes/csr/cuda/csr_*.cu): configs, compile-time data, launches.

A *plan* is one layer prepared for one kernel configuration: the non-zeros in the device
precision, column indices pre-scaled to the offsets that configuration reads (uint16), the
per-chunk row pointers, the row swizzle and the bias, all on the device; calling it runs the
layer on PyTorch's current stream (so it is captured by CUDA graphs).

Kernels are launched through a *backend*: `NvrtcBackend` compiles with NVRTC and launches on
the GPU; the CPU tests pass an emulating backend (tests/cuda_emu.py) that runs the same
kernel source as host threads on CPU tensors.
"""
from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass, replace

import torch

from ...passes.csr.layout import CSR
from ..nvrtc import load_source
from ..split_k import even_split, run_split, split_wanted
from ...common.shapes import conv_out_size

THREADS = 256  # the SpMV kernel's block; conv/SpMM configs choose 256 or 512
MAX_SHARED_BYTES = 227 * 1024  # one block's shared memory on sm_90 when the device does not say (sm_87: 163 KiB)
STAGE_FLOATS = 8192  # one staged chunk: 32 KiB of fp32; double-buffered, 64 KiB a block (3 blocks an SM)
GEMV_MAX_BATCH = 8   # CsrGemm runs the warp-per-row SpMV kernel up to this batch


class PlanDoesNotFit(ValueError):
    """A config this layer cannot use (offsets past uint16, shared memory past the device's
    limit): the tuner skips it."""


class CsrParams(ctypes.Structure):
    """Mirror of csr::Params in cuda/csr_common.cuh (same order, same C types)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("values", "offsets", "chunk_ptr", "row_order", "bias", "k_used", "x",
                                               "y")] + [
        ("x_batch", ctypes.c_longlong), ("y_batch", ctypes.c_longlong)] + [
        (n, ctypes.c_int) for n in ("M", "C", "H", "W", "Ho", "Wo", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw",
                                    "x_cs", "x_hs", "x_ws", "y_cs", "y_hs", "y_ws",
                                    "tile_h", "tile_w", "tiles_w",
                                    "win_h", "win_w", "chunk_c", "nchunks", "chunks_per_split", "nsplit", "batch",
                                    "relu", "accumulate", "vec_stage")] + [
        ("residual", ctypes.c_void_p), ("r_batch", ctypes.c_longlong)] + [
        (n, ctypes.c_int) for n in ("r_cs", "r_hs", "r_ws")] + [
        ("blk_ptr", ctypes.c_void_p), ("ss_cap", ctypes.c_int)]


class SpmmParams(ctypes.Structure):
    """Mirror of csr::SpmmParams in cuda/csr_sputnik.cu (same order, same C types)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("values", "col_idx", "row_ptr", "row_order", "k_offsets", "bias", "x",
                                               "y")] + [
        ("x_batch", ctypes.c_longlong), ("y_batch", ctypes.c_longlong)] + [
        (n, ctypes.c_int) for n in ("M", "K", "N", "n_load", "ldb", "ldy", "relu", "vec_store", "out_pitch", "out_w")] + [
        ("residual", ctypes.c_void_p), ("r_batch", ctypes.c_longlong), ("ldr", ctypes.c_int), ("r_ps", ctypes.c_int)]


def _ctype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float", torch.float16: "__half"}[dtype]


# Every instantiation a source is compiled with (one NVRTC program per source and dtype).
# (pixels per lane, rows per warp, threads, vec, staged sparse)
CONV_VARIANTS = [(p, rpt, nt, False, ss) for p in (2, 4) for rpt in (2, 4) for nt in (256, 512) for ss in (False, True)] + \
                [(p, rpt, nt, True, False) for p in (1, 2, 4) for rpt in (2, 4, 8) for nt in (256, 512)]
SPMV_BATCH = (1, 4)


def conv_expression(dtype: torch.dtype, p: int, rpt: int, threads: int, vec: bool, ss: bool = False) -> str:
    b = lambda v: "true" if v else "false"  # noqa: E731
    return f"csr::csr_conv<{_ctype_name(dtype)}, {p}, {rpt}, {threads}, {b(vec)}, {b(ss)}>"


def spmv_expression(dtype: torch.dtype, nb: int) -> str:
    return f"csr::csr_spmv<{_ctype_name(dtype)}, {nb}>"


def all_expressions(filename: str, dtype: torch.dtype) -> tuple[str, ...]:
    if filename == "csr_conv.cu":
        return tuple(conv_expression(dtype, *v) for v in CONV_VARIANTS)
    if filename == "csr_spmv.cu":
        return tuple(spmv_expression(dtype, nb) for nb in SPMV_BATCH)
    if filename == "csr_sputnik.cu":
        return tuple(sputnik_expression(dtype, v) for v in SPUTNIK_VARIANTS[dtype]) + (
            im2col_expression(dtype), shift_expression(dtype))
    if filename == "csr_tc.cu":
        from .tensor_core import all_tc_expressions

        return all_tc_expressions(dtype)
    raise KeyError(filename)


KERNEL_FILES = ("csr_conv.cu", "csr_spmv.cu", "csr_sputnik.cu")  # csr_tc.cu: fp16 only, tensor_core.py


PROGRAM_SIZE = 4  # instantiations per NVRTC program: csr_conv's 34 in one took 85 s on one core


def dtype_programs(filename: str, dtype: torch.dtype) -> list[tuple[str, ...]]:
    """The programs NvrtcBackend compiles from `filename` for `dtype`: its instantiations in groups of
    PROGRAM_SIZE, compiled in parallel worker processes the first time one is needed."""
    exprs = all_expressions(filename, dtype)
    return [exprs[i:i + PROGRAM_SIZE] for i in range(0, len(exprs), PROGRAM_SIZE)]


def kernel_programs(filename: str) -> list[tuple[str, ...]]:
    """Every program of `filename`, both dtypes (what `doctor --compile-kernels` fills the cache with)."""
    return [g for dtype in (torch.float32, torch.float16) for g in dtype_programs(filename, dtype)]


class NvrtcBackend:
    """Compiles a kernel source's programs for a dtype the first time one of them is needed (in parallel
    workers; see dtype_programs) and launches on the GPU."""

    def __init__(self, device: torch.device | str):
        from ..nvrtc import device_arch

        self.device = torch.device(device)
        # which kernels the card can run (tensor_core.tensor_cores); None off a GPU
        self.arch = device_arch(self.device) if self.device.type == "cuda" else None
        self._kernels: dict[str, object] = {}
        self._smem_set: dict[str, int] = {}
        self._compiled: set[tuple[str, torch.dtype]] = set()

    def _kernel(self, filename: str, expr: str, dtype: torch.dtype):
        if expr not in self._kernels:
            from ..nvrtc import Kernel, compile_groups

            programs, source = dtype_programs(filename, dtype), load_source(filename)
            if (filename, dtype) not in self._compiled:
                compile_groups(source, self.arch, filename, programs)
                self._compiled.add((filename, dtype))
            program = next(g for g in programs if expr in g)
            self._kernels[expr] = Kernel(source, expr, self.device, name_expressions=program, filename=filename)
        return self._kernels[expr]

    def launch(self, filename: str, expr: str, dtype: torch.dtype, grid, block, smem: int, params: CsrParams) -> None:
        k = self._kernel(filename, expr, dtype)
        if smem > 48 * 1024 and self._smem_set.get(expr, 0) < smem:
            k.set_max_dynamic_shared(smem)
            self._smem_set[expr] = smem
        k(grid, block, params, shared=smem)


# --- geometry and configurations -----------------------------------------------------------

@dataclass(frozen=True)
class ConvGeometry:
    """A conv over one image [C, H, W] -> [M, Ho, Wo]; a GEMM B[K, N] is C=K, H=1, W=N, 1x1."""

    m: int
    c: int
    h: int
    w: int
    kh: int = 1
    kw: int = 1
    sh: int = 1
    sw: int = 1
    pt: int = 0
    pl: int = 0
    pb: int = 0
    pr: int = 0
    dh: int = 1
    dw: int = 1

    @property
    def ho(self) -> int:
        return conv_out_size(self.h, self.pt + self.pb, self.kh, self.sh, self.dh)

    @property
    def wo(self) -> int:
        return conv_out_size(self.w, self.pl + self.pr, self.kw, self.sw, self.dw)

    @property
    def k(self) -> int:
        return self.c * self.kh * self.kw

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: a plain SpMM over the flattened pixels."""
        return (self.kh, self.kw, self.sh, self.sw, self.pt, self.pl, self.pb, self.pr) == (1, 1, 1, 1, 0, 0, 0, 0)

    def flat(self) -> "ConvGeometry":
        """The pointwise conv as a 1 x (H*W) image, the layout of the VEC kernels."""
        return ConvGeometry(self.m, self.c, 1, self.h * self.w)


@dataclass(frozen=True)
class ConvConfig:
    vec: bool      # SpMM layout (pointwise / GEMM) instead of the conv window
    p: int         # output pixels (columns) per lane: tile of 32*p
    rpt: int       # output rows per warp: threads/32*rpt rows a block
    chunk_c: int   # input channels (K rows) staged per chunk
    tile_h: int
    tile_w: int
    nsplit: int = 1  # blocks along K (fp32 atomic accumulation) when the grid is too small
    threads: int = 256
    ss: bool = False  # staged sparse: the block's non-zeros of a chunk copied to shared memory with it

    @property
    def rows_per_block(self) -> int:
        return self.threads // 32 * self.rpt

    def label(self) -> str:
        kind = "spmm" if self.vec else "window"
        split = f" splitk{self.nsplit}" if self.nsplit > 1 else ""
        return (f"{kind}{' ss' if self.ss else ''} p{self.p} rows{self.rows_per_block}(t{self.threads}) "
                f"tile{self.tile_h}x{self.tile_w} chunk{self.chunk_c}{split}")

    def to_dict(self) -> dict:
        return asdict(self)


def window_dims(g: ConvGeometry, tile_h: int, tile_w: int) -> tuple[int, int]:
    return (tile_h - 1) * g.sh + (g.kh - 1) * g.dh + 1, (tile_w - 1) * g.sw + (g.kw - 1) * g.dw + 1


def _balanced(size: int, most: int) -> int:
    """A tile length <= most that splits `size` into equal-ish tiles."""
    n = -(-size // max(1, most))
    return -(-size // n)


def window_config(g: ConvGeometry, p: int, rpt: int, nsplit: int = 1, budget: int = STAGE_FLOATS,
                  threads: int = 256, tile_w: int | None = None) -> ConvConfig:
    pixels = 32 * p
    tile_w = _balanced(g.wo, tile_w or pixels)
    tile_h = _balanced(g.ho, max(1, pixels // tile_w))
    win_h, win_w = window_dims(g, tile_h, tile_w)
    chunk_c = max(1, min(g.c, budget // (win_h * win_w)))
    return ConvConfig(False, p, rpt, chunk_c, tile_h, tile_w, nsplit, threads)


def spmm_config(g: ConvGeometry, p: int, rpt: int, nsplit: int = 1, budget: int = STAGE_FLOATS,
                threads: int = 256) -> ConvConfig:
    return ConvConfig(True, p, rpt, max(1, min(g.c, budget // (32 * p))), 1, 32 * p, nsplit, threads)


def grid_blocks(g: ConvGeometry, cfg: ConvConfig, batch: int = 1) -> int:
    gg = g.flat() if cfg.vec else g
    tiles = -(-gg.ho // cfg.tile_h) * -(-gg.wo // cfg.tile_w)
    return -(-g.m // cfg.rows_per_block) * tiles * batch * cfg.nsplit


def with_split(g: ConvGeometry, cfg: ConvConfig, sms: int, batch: int = 1, min_chunk_k: int = 64) -> ConvConfig | None:
    """The config split along K so the grid covers about two waves, or None if it does already.

    Chunks shrink (down to `min_chunk_k` K rows, so row segments stay long enough for the
    vector groups to pay) when there are fewer chunks than splits wanted.
    """
    blocks = grid_blocks(g, cfg, batch)
    want = split_wanted(blocks, sms)
    if want == 1:
        return None
    rs = g.kh * g.kw
    chunk_c = cfg.chunk_c
    if -(-g.c // chunk_c) < want:
        chunk_c = min(chunk_c, max(-(-min_chunk_k // rs), -(-g.c // want)))
    nsplit = even_split(-(-g.c // chunk_c), want)
    return ConvConfig(**{**cfg.to_dict(), "chunk_c": chunk_c, "nsplit": nsplit}) if nsplit > 1 else None


ROW_SHAPES = ((2, 256), (4, 256), (8, 256), (4, 512), (8, 512))  # (rows per warp, threads)


def candidate_configs(g: ConvGeometry, sms: int = 132, batch: int = 1, dtype: torch.dtype = torch.float32,
                      sputnik: bool = True, arch: str | None = None) -> list:
    """The configurations worth timing for a layer (up to about 17), most promising first.

    Rows per block trade staging traffic (each block stages its tile's operand once for all
    its rows) against parallelism; pixels per lane trade sparse-load reuse against tile
    waste; a K split (fp32 atomics) fills the GPU when rows x tiles make too few blocks.
    After them (sputnik=True) Sputnik's SpMM (csr_sputnik.cu): its heuristic config and
    neighbours, on the layer's input directly for a pointwise conv / GEMM, after an explicit
    im2col (timed with it) for other convs. Last, for fp16 on a card of `arch` with
    mma.sync m16n8k16 (sm_80+), the tensor-core kernel's configs (tensor_core.py).
    """
    from .tensor_core import tc_candidates, tensor_cores

    out = _staged_configs(g, sms, batch)
    if sputnik and g.k <= 65536:
        if g.pointwise:
            out += sputnik_candidates(g.h * g.w, dtype)
        else:
            npix = g.ho * g.wo
            out += sputnik_candidates(npix, dtype, n_align=-(-npix // IM2COL_ALIGN) * IM2COL_ALIGN, im2col=True)
            if (g.sh, g.sw) == (1, 1):
                out += sputnik_candidates(g.ho * (g.w + g.pl + g.pr), dtype, shifted=True)
    if tensor_cores(arch, dtype):
        out += tc_candidates(g, sms, batch)
    return out


def _staged_configs(g: ConvGeometry, sms: int, batch: int) -> list[ConvConfig]:
    if g.pointwise:
        n = g.h * g.w
        ps = [p for p in (4, 2, 1) if 32 * p <= max(32, 2 * n)][:2] or [1]
        shapes = [(r, t) for r, t in ROW_SHAPES if t // 32 * r <= max(32, g.m) and r >= 4]
        base = [spmm_config(g, p, r, threads=t) for p in ps for r, t in shapes]
        if ps[0] == 4 and g.c > STAGE_FLOATS // 128:  # long K: twice the chunk (longer row segments), 1 block an SM
            base.append(spmm_config(g, 4, 4, threads=512, budget=2 * STAGE_FLOATS))
    else:
        shapes = [(r, t) for r, t in ROW_SHAPES if t // 32 * r <= max(16, g.m) and r <= 4]
        base = [window_config(g, p, r, threads=t) for p in (4, 2) for r, t in shapes]
        if g.wo >= 64 and g.ho >= 8:  # wide maps: also 2-D tiles (4 x 32), whose halo re-stages less input
            base += [window_config(g, 4, r, threads=t, tile_w=32) for r, t in shapes if t == 256]
        # each also with its non-zeros staged in shared memory (no L1/L2 latency per entry group)
        base += [replace(cfg, ss=True) for cfg in base]
    out: list[ConvConfig] = []
    for cfg in base:
        out.append(cfg)
        split = with_split(g, cfg, sms, batch)
        if split is not None:
            out.append(split)
    return list(dict.fromkeys(out))


# --- compile-time data ----------------------------------------------------------------------

def chunk_pointers(csr: CSR, chunk_k: int) -> torch.Tensor:
    """[M, nchunks + 1] int32: where row m's entries with column >= q*chunk_k begin."""
    m, k = csr.shape
    nchunks = max(1, -(-k // chunk_k))
    rows = csr.row_indices()
    keys = rows * k + csr.col_idx.to(torch.int64)  # ascending: rows in order, columns ascending in a row
    bounds = torch.clamp(torch.arange(nchunks + 1, dtype=torch.int64) * chunk_k, max=k)
    queries = torch.arange(m, dtype=torch.int64)[:, None] * k + bounds[None, :]
    return torch.searchsorted(keys, queries.reshape(-1)).reshape(m, nchunks + 1).to(torch.int32)


def entry_offsets(csr: CSR, g: ConvGeometry, cfg: ConvConfig) -> torch.Tensor:
    """Each entry's column pre-scaled to its offset inside the staged chunk (uint16)."""
    col = csr.col_idx.to(torch.int64)
    if cfg.vec:
        off = (col % cfg.chunk_c) * (32 * cfg.p)
    else:
        rs = g.kh * g.kw
        c, r, s = col // rs, (col % rs) // g.kw, col % g.kw
        win_h, win_w = window_dims(g, cfg.tile_h, cfg.tile_w)
        off = (c % cfg.chunk_c) * (win_h * win_w) + r * g.dh * win_w + s * g.dw
    if off.numel() and int(off.max()) > 65535:
        raise PlanDoesNotFit(f"offsets do not fit uint16 for config {cfg.label()}")
    return off.to(torch.int32)


def staged_sparse_runs(csr: CSR, chunk_ptr: torch.Tensor, chunk_k: int,
                       rows_per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packing of a staged-sparse plan: the entries of each (row block, K chunk) in one run,
    row slots in swizzled order, each row's segment padded to a multiple of four. chunk_ptr is
    chunk_pointers(csr, chunk_k): an entry's chunk is its column // chunk_k.

    Returns (src, blk_ptr): src[i] = the CSR entry at packed position i, or -1 for padding;
    blk_ptr [row blocks, nchunks, rows_per_block + 1] int32 = where each slot's segment starts
    (the last column: where the run ends). Runs are consecutive, so every run and segment
    starts at a multiple of four (aligned vector copies and loads)."""
    m = csr.shape[0]
    nchunks = chunk_ptr.shape[1] - 1
    nblocks = -(-m // rows_per_block)
    slots = nblocks * rows_per_block
    row_of_slot = torch.full((slots,), -1, dtype=torch.int64)
    row_of_slot[:m] = csr.row_order.long()
    cp = chunk_ptr.long()
    lengths = torch.zeros(slots, nchunks, dtype=torch.int64)
    real = row_of_slot >= 0
    lengths[real] = cp[row_of_slot[real], 1:] - cp[row_of_slot[real], :-1]
    padded = (lengths + 3) // 4 * 4
    # packed order: block, chunk, slot in block
    order = padded.reshape(nblocks, rows_per_block, nchunks).permute(0, 2, 1).reshape(-1)
    starts = torch.zeros(order.numel() + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(order, 0)
    blk_ptr = torch.empty(nblocks, nchunks, rows_per_block + 1, dtype=torch.int64)
    blk_ptr[:, :, :rows_per_block] = starts[:-1].reshape(nblocks, nchunks, rows_per_block)
    blk_ptr[:, :, rows_per_block] = starts[1:].reshape(nblocks, nchunks, rows_per_block)[:, :, -1]
    src = torch.full((int(starts[-1]),), -1, dtype=torch.int64)
    if csr.nnz:
        slot_of_row = torch.empty(m, dtype=torch.int64)
        slot_of_row[csr.row_order.long()] = torch.arange(m)
        rows = csr.row_indices()
        entry = torch.arange(csr.nnz, dtype=torch.int64)
        chunk = csr.col_idx.long() // chunk_k  # chunk_ptr's chunks are column ranges of chunk_k
        slot = slot_of_row[rows]
        seg_start = blk_ptr[slot // rows_per_block, chunk, slot % rows_per_block]
        src[seg_start + entry - cp[rows, chunk]] = entry
    return src, blk_ptr.to(torch.int32)


def rows_block_column_use(csr: CSR, rows_per_block: int) -> torch.Tensor:
    """[row blocks, K] uint8: 1 where a row of the block (in swizzled order) has an entry in column k."""
    m, k = csr.shape
    nblocks = -(-m // rows_per_block)
    block_of_row = torch.empty(m, dtype=torch.int64)
    block_of_row[csr.row_order.long()] = torch.arange(m) // rows_per_block
    rows = csr.row_indices()
    used = torch.zeros(nblocks * k, dtype=torch.uint8)
    used[block_of_row[rows] * k + csr.col_idx.long()] = 1
    return used


def _padded(t: torch.Tensor, dtype: torch.dtype, device, pad: int = 4) -> torch.Tensor:
    """`t` followed by `pad` zeros (ROMA's last group may read up to three entries past a row)."""
    out = torch.zeros(t.numel() + pad, dtype=dtype, device=device)
    out[:t.numel()] = t.to(device=device, dtype=dtype)
    return out


def _uint16(t: torch.Tensor, device) -> torch.Tensor:
    """Values in [0, 65535] as 16-bit device words (+4 zeros of ROMA padding). Kept in an int16
    tensor (torch's uint16 is barely supported on CUDA); the kernels read unsigned shorts."""
    import numpy as np

    out = np.zeros(t.numel() + 4, dtype=np.uint16)
    out[:t.numel()] = t.cpu().numpy()
    return torch.from_numpy(out.view(np.int16)).to(device)


def _max_shared_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", MAX_SHARED_BYTES))
    return MAX_SHARED_BYTES


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _residual(r: torch.Tensor | None, shape, dtype: torch.dtype, flat_pixels: bool = False) -> torch.Tensor | None:
    """The residual input of a fused epilogue, checked against the output `shape` and in the
    plan's precision. flat_pixels: the kernel addresses pixel q = oy*Wo + ox as q * stride(3),
    which NCHW and channels-last tensors allow; anything else is copied."""
    if r is None:
        return None
    if tuple(r.shape) != tuple(shape):
        raise ValueError(f"residual of shape {tuple(r.shape)}, the layer's output is {tuple(shape)}")
    r = r.to(dtype)
    if flat_pixels and r.dim() == 4 and r.stride(2) != r.shape[3] * r.stride(3) and r.shape[2] > 1:
        r = r.contiguous()
    return r


# --- plans ---------------------------------------------------------------------------------

class ConvPlan:
    """One conv (or SpMM) layer prepared for one config; call it on x [N, C, H, W] (or B [K, N])."""

    def __init__(self, csr: CSR, g: ConvGeometry, cfg: ConvConfig, dtype: torch.dtype, device, backend,
                 bias: torch.Tensor | None = None, relu: bool = False):
        if csr.shape != (g.m, g.k):
            raise ValueError(f"CSR shape {csr.shape} does not match the layer's GEMM view {(g.m, g.k)}")
        self.g, self.cfg, self.dtype, self.device, self.backend, self.relu = g, cfg, dtype, torch.device(device), backend, relu
        self.kg = g.flat() if cfg.vec else g  # the geometry the kernel sees
        self.nchunks = -(-g.c // cfg.chunk_c)
        values, offsets = csr.values, entry_offsets(csr, g, cfg)
        chunk_k = cfg.chunk_c * g.kh * g.kw
        chunk_ptr = chunk_pointers(csr, chunk_k)
        self.blk_ptr, self.ss_cap = None, 0
        if cfg.ss:  # packed per (row block, chunk): padding is value 0 at offset 0
            src, blk_ptr = staged_sparse_runs(csr, chunk_ptr, chunk_k, cfg.rows_per_block)
            keep = src >= 0
            values = torch.zeros(src.numel(), dtype=csr.values.dtype).masked_scatter_(keep, csr.values[src[keep]])
            offsets = torch.zeros(src.numel(), dtype=torch.int32).masked_scatter_(keep, offsets[src[keep]])
            runs = int((blk_ptr[:, :, -1] - blk_ptr[:, :, 0]).max()) if blk_ptr.numel() else 0
            self.ss_cap = max(8, -(-runs // 8) * 8)
            self.blk_ptr = blk_ptr.reshape(-1).to(self.device)
        self.values = _padded(values, dtype, self.device)
        self.offsets = _uint16(offsets, self.device)
        self.chunk_ptr = chunk_ptr.to(self.device)
        self.row_order = csr.row_order.to(self.device, torch.int32)
        self.bias = None if bias is None else bias.reshape(-1).to(self.device, torch.float32).contiguous()
        self.expr = conv_expression(dtype, cfg.p, cfg.rpt, cfg.threads, cfg.vec, cfg.ss)
        self.k_used = rows_block_column_use(csr, cfg.rows_per_block).to(self.device) if cfg.vec else None
        self._param_cache: dict[tuple, CsrParams] = {}
        if cfg.vec:
            self.win_h, self.win_w = 1, 32 * cfg.p
            self.smem = 2 * cfg.chunk_c * 32 * cfg.p * 4
        else:
            self.win_h, self.win_w = window_dims(g, cfg.tile_h, cfg.tile_w)
            self.smem = 2 * cfg.chunk_c * self.win_h * self.win_w * 4
        if cfg.ss:  # the sparse buffers follow the dense ones, 16-byte aligned
            self.smem = -(-self.smem // 16) * 16 + 2 * self.ss_cap * (dtype.itemsize + 2)
            most = _max_shared_bytes(self.device)
            if self.smem > most:
                raise PlanDoesNotFit(f"{cfg.label()}: {self.smem} bytes of shared memory (at most {most})")
        self.cps = -(-self.nchunks // cfg.nsplit)

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.offsets, self.chunk_ptr, self.row_order, self.bias, self.k_used,
                            self.blk_ptr) if t is not None]

    def _params(self, x: torch.Tensor, y: torch.Tensor, n: int, strides_x, strides_y, accumulate: bool,
                residual: torch.Tensor | None = None, strides_r=(0, 0, 0, 0)) -> CsrParams:
        key = (n, tuple(strides_x), tuple(strides_y), accumulate, x.data_ptr() % 16 == 0, tuple(strides_r))
        base = self._param_cache.get(key)
        if base is None:
            base = self._param_cache[key] = self._base_params(x, n, strides_x, strides_y, accumulate)
            (base.r_batch, base.r_cs, base.r_hs, base.r_ws) = strides_r
        p = CsrParams.from_buffer_copy(base)  # per call only the pointers change
        p.x, p.y, p.residual = x.data_ptr(), y.data_ptr(), _ptr(residual)
        return p

    def _base_params(self, x: torch.Tensor, n: int, strides_x, strides_y, accumulate: bool) -> CsrParams:
        g, kg, cfg = self.g, self.kg, self.cfg
        p = CsrParams()
        p.values, p.offsets, p.chunk_ptr, p.row_order = (self.values.data_ptr(), self.offsets.data_ptr(),
                                                        self.chunk_ptr.data_ptr(), self.row_order.data_ptr())
        p.bias, p.k_used = _ptr(self.bias), _ptr(self.k_used)
        p.blk_ptr, p.ss_cap = _ptr(self.blk_ptr), self.ss_cap
        (p.x_batch, p.x_cs, p.x_hs, p.x_ws), (p.y_batch, p.y_cs, p.y_hs, p.y_ws) = strides_x, strides_y
        p.M, p.C, p.H, p.W, p.Ho, p.Wo = g.m, kg.c, kg.h, kg.w, kg.ho, kg.wo
        p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw = kg.kh, kg.kw, kg.sh, kg.sw, kg.pt, kg.pl, kg.dh, kg.dw
        p.tile_h, p.tile_w, p.tiles_w = cfg.tile_h, cfg.tile_w, -(-kg.wo // cfg.tile_w)
        p.win_h, p.win_w, p.chunk_c, p.nchunks = self.win_h, self.win_w, cfg.chunk_c, self.nchunks
        p.chunks_per_split, p.nsplit, p.batch = self.cps, cfg.nsplit, n
        p.relu, p.accumulate = int(self.relu), int(accumulate)
        p.vec_stage = int(cfg.vec and p.x_ws == 1 and p.x_cs % 4 == 0 and (n == 1 or p.x_batch % 4 == 0)
                          and x.data_ptr() % 16 == 0)
        return p

    def _launch(self, x, y, n, sx, sy, accumulate: bool, r=None, sr=(0, 0, 0, 0)) -> None:
        tiles = -(-self.kg.ho // self.cfg.tile_h) * -(-self.kg.wo // self.cfg.tile_w)
        grid = (-(-self.g.m // self.cfg.rows_per_block), tiles, n * self.cfg.nsplit)
        self.backend.launch("csr_conv.cu", self.expr, self.dtype, grid, (self.cfg.threads,), self.smem,
                            self._params(x, y, n, sx, sy, accumulate, r, sr))

    def _run(self, x: torch.Tensor, out_shape, n: int, sx, sy_of, y_view, r=None, sr=(0, 0, 0, 0)) -> torch.Tensor:
        """Allocate, launch over `n` images (with the split-K epilogue if needed), return the output.
        r: the residual (strides sr, as the output's) added in the epilogue, before the ReLU."""
        split = self.cfg.nsplit > 1
        return y_view(run_split(lambda y: self._launch(x, y, n, sx, sy_of(y), split, r, sr), out_shape, self.dtype,
                                x.device, split, self.relu))

    def conv(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W] (any strides for windows) -> y [N, M, Ho, Wo] contiguous; `residual`
        (the output's shape, any strides) is added before the ReLU."""
        g = self.g
        x = x.to(self.dtype)
        n = x.shape[0]
        if self.cfg.vec and not (x.stride(3) == 1 and x.stride(2) == g.w):
            x = x.contiguous()  # pointwise as SpMM needs rows of H*W contiguous pixels
        if self.cfg.vec:
            sx = (x.stride(0), x.stride(1), 0, 1)
        else:
            sx = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
        shape = (n, g.m, g.ho, g.wo)
        sy = lambda y: (y.stride(0), y.stride(1), 0 if self.cfg.vec else y.stride(2), 1)  # noqa: E731
        r = _residual(residual, shape, self.dtype, flat_pixels=self.cfg.vec)
        sr = (0, 0, 0, 0) if r is None else (r.stride(0), r.stride(1), 0 if self.cfg.vec else r.stride(2), r.stride(3))
        return self._run(x, shape, n, sx, sy, lambda y: y, r, sr)

    def spmm(self, b: torch.Tensor) -> torch.Tensor:
        """B [K, N] -> A @ B [M, N] (the GEMM sweep's operation; vec configs)."""
        b = b.to(self.dtype)
        if b.stride(1) != 1:
            b = b.contiguous()
        sx = (0, b.stride(0), 0, 1)
        sy = lambda y: (0, y.stride(1), 0, 1)  # noqa: E731
        return self._run(b, (1, self.g.m, self.g.w), 1, sx, sy, lambda y: y[0])

    __call__ = conv


class GemvPlan:
    """A CsrGemm layer at batch <= GEMV_MAX_BATCH: warp-per-row SpMV (csr_spmv.cu)."""

    def __init__(self, csr: CSR, dtype: torch.dtype, device, backend, bias: torch.Tensor | None = None,
                 relu: bool = False):
        m, k = csr.shape
        if k > 65536:
            raise ValueError("SpMV keeps column indices in uint16; K must be <= 65536")
        self.m, self.k, self.dtype, self.device, self.backend, self.relu = m, k, dtype, torch.device(device), backend, relu
        self.values = _padded(csr.values, dtype, self.device)
        self.offsets = _uint16(csr.col_idx.to(torch.int64), self.device)
        self.row_ptr = csr.row_ptr.to(self.device, torch.int32)
        self.row_order = csr.row_order.to(self.device, torch.int32)
        self.bias = None if bias is None else bias.reshape(-1).to(self.device, torch.float32).contiguous()

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.offsets, self.row_ptr, self.row_order, self.bias) if t is not None]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, K] -> relu?(x W^T + bias + residual [N, M])."""
        x = x.to(self.dtype)
        if x.stride(1) != 1:
            x = x.contiguous()
        n = x.shape[0]
        nb = 1 if n == 1 else 4
        y = torch.empty(n, self.m, dtype=self.dtype, device=x.device)
        r = _residual(residual, (n, self.m), self.dtype)
        p = CsrParams()
        p.values, p.offsets, p.chunk_ptr, p.row_order = (self.values.data_ptr(), self.offsets.data_ptr(),
                                                        self.row_ptr.data_ptr(), self.row_order.data_ptr())
        p.bias, p.x, p.y = _ptr(self.bias), x.data_ptr(), y.data_ptr()
        p.x_batch, p.y_batch, p.y_cs = x.stride(0), y.stride(0), 1
        p.M, p.C, p.batch, p.relu, p.nchunks, p.nsplit = self.m, self.k, n, int(self.relu), 1, 1
        if r is not None:
            p.residual, p.r_batch, p.r_cs = r.data_ptr(), r.stride(0), r.stride(1)
        self.backend.launch("csr_spmv.cu", spmv_expression(self.dtype, nb), self.dtype,
                            (-(-self.m // (THREADS // 32)), -(-n // nb), 1), (THREADS,), 0, p)
        return y


# --- Sputnik's SpMM (cuda/csr_sputnik.cu) -------------------------------------------------

@dataclass(frozen=True)
class SputnikConfig:
    """Sputnik's SpmmConfig: y rows a block (one subwarp of `width` threads each), bk non-zeros
    staged a step, bx output columns a block, sv sparse values and dv dense columns a vector
    load, minb blocks an SM in the launch bounds. im2col: a k x k conv as an explicit im2col
    (csr::im2col4) followed by the SpMM; shifted: a stride-1 conv as four shifted copies of the
    padded input (csr::shift4) read through per-k row offsets (dv <= 4); otherwise the SpMM
    reads B (or a pointwise conv's input) directly."""

    y: int
    bk: int
    bx: int
    width: int
    sv: int
    dv: int
    minb: int = 1
    im2col: bool = False
    shifted: bool = False

    family = "sputnik"

    @property
    def threads(self) -> int:
        return self.width * self.y

    def kernel(self) -> tuple:
        return (self.y, self.bk, self.bx, self.width, self.sv, self.dv, self.minb)

    def label(self) -> str:
        minb = f" minb{self.minb}" if self.minb > 1 else ""
        prep = "im2col+" if self.im2col else "shifted+" if self.shifted else ""
        return (f"sputnik {prep}spmm y{self.y} k{self.bk} x{self.bx} w{self.width} "
                f"sv{self.sv} dv{self.dv}{minb}")

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


def _sv(y, bk, bx, w, sv, dv, minb=1) -> tuple:
    return (y, bk, bx, w, sv, dv, minb)


# Every instantiation compiled, per dtype: Sputnik's heuristic picks (CudaSpmmBiasRelu) and the
# kernels of its table / test instantiations next to them. fp32 columns are floats; fp16 ones
# halves (Sputnik's half2 configs with their widths counted in halves).
SPUTNIK_F32 = {
    "large": _sv(4, 32, 64, 8, 4, 4, 8),     # n % 64 == 0: float4/float4, 64-wide tile, min occupancy 8
    "default": _sv(4, 32, 32, 8, 4, 4),      # n % 4 == 0: float4/float4, 4-way subwarp tiling
    "wide": _sv(1, 32, 128, 32, 1, 4),       # table (MBV1, n = 196): float/float4, a warp a row
    "hybrid": _sv(4, 16, 32, 8, 2, 4),       # table (MBV1, n = 3136): float2/float4
    "novsubwarp": _sv(2, 32, 64, 16, 2, 4),  # test instantiation: float2/float4 without subwarp tiling
    "n16": _sv(4, 32, 16, 8, 4, 2),          # n <= 16
    "n8": _sv(4, 32, 8, 8, 4, 1),            # n <= 8
    "even": _sv(2, 32, 32, 16, 2, 2),        # n % 2 == 0: float2/float2
    "scalar": _sv(1, 32, 32, 32, 1, 1),      # odd n: float/float
    "scalar4": _sv(4, 32, 32, 8, 4, 1),      # odd n, float4 sparse loads (neighbour)
}
SPUTNIK_F16 = {  # Sputnik's half configs; sparse loads capped at bk/width values (its half8 loads need 64-entry tiles)
    "large": _sv(4, 32, 64, 8, 4, 8),        # n % 64 == 0: half8 dense loads
    "default": _sv(2, 32, 64, 16, 2, 4),     # otherwise: half4 dense loads, 16 threads a row
    "mid": _sv(4, 32, 32, 8, 4, 4),          # n < 32: half4
    "n16": _sv(4, 32, 16, 8, 4, 2),          # n < 16: half2
    "even": _sv(2, 32, 32, 16, 2, 2),        # n % 2 == 0 (neighbour of the fp32 float2 kernel)
    "scalar": _sv(1, 32, 32, 32, 1, 1),      # odd n
}
SPUTNIK_VARIANTS = {torch.float32: tuple(dict.fromkeys(SPUTNIK_F32.values())),
                    torch.float16: tuple(dict.fromkeys(SPUTNIK_F16.values()))}
IM2COL_ALIGN = 8  # im2col rows padded to a multiple of this: any dense vector width can read them


def sputnik_expression(dtype: torch.dtype, variant: tuple) -> str:
    return f"csr::sputnik_spmm<{_ctype_name(dtype)}, {', '.join(str(v) for v in variant)}>"


def im2col_expression(dtype: torch.dtype) -> str:
    return f"csr::im2col4<{_ctype_name(dtype)}>"


def shift_expression(dtype: torch.dtype) -> str:
    return f"csr::shift4<{_ctype_name(dtype)}>"


def sputnik_heuristic(n: int, dtype: torch.dtype = torch.float32) -> tuple:
    """Sputnik's own choice for an SpMM with n output columns (CudaSpmmBiasRelu)."""
    t = SPUTNIK_F32 if dtype == torch.float32 else SPUTNIK_F16
    if dtype == torch.float32:
        if n % 4 == 0:
            if n <= 8:
                return t["n8"]
            if n <= 16:
                return t["n16"]
            return t["large"] if n % 64 == 0 else t["default"]
        return t["even"] if n % 2 == 0 else t["scalar"]
    if n % 8 == 0 or n % 4 == 0:
        if n <= 16:
            return t["n16"]
        if n < 32:
            return t["mid"]
        return t["large"] if n % 64 == 0 else t["default"]
    return t["even"] if n % 2 == 0 else t["scalar"]


def sputnik_candidates(n: int, dtype: torch.dtype = torch.float32, n_align: int | None = None,
                       im2col: bool = False, shifted: bool = False) -> list[SputnikConfig]:
    """Sputnik's heuristic config for n columns first, then its neighbours whose dense vector
    width divides `n_align` (the columns B's rows may be read in: n itself, or the padded
    im2col rows) - the tuner times them all. Shifted convs: the three first with dv <= 4 (the
    copies align vectors of four)."""
    if shifted:
        cands = sputnik_candidates(n, dtype, n_align=-(-n // IM2COL_ALIGN) * IM2COL_ALIGN, im2col=True)
        return [SputnikConfig(*c.kernel(), shifted=True) for c in cands if c.dv <= 4][:3]
    n_align = n if n_align is None else n_align
    t = SPUTNIK_F32 if dtype == torch.float32 else SPUTNIK_F16
    if dtype == torch.float32:
        order = ["large", "default", "wide", "novsubwarp", "hybrid"] if n > 16 else ["n16", "n8", "default"]
        order += ["even", "scalar4", "scalar"]
    else:
        order = ["large", "default", "mid", "n16", "even", "scalar"]
    first = sputnik_heuristic(n_align if im2col else n, dtype)
    out = [first] + [t[k] for k in order]
    out = [v for v in dict.fromkeys(out) if n_align % v[5] == 0]
    # the widest vector widths that fit; a few configs, not every fallback
    best_dv = max(v[5] for v in out)
    out = [v for v in out if v[5] >= min(best_dv, 2)][:5] or out[:2]
    return [SputnikConfig(*v, im2col=im2col) for v in out]


class SputnikPlan:
    """One layer prepared for Sputnik's SpMM; `spmm(B)` for B [K, N], `conv(x)` for x [N, C, H, W]
    (pointwise convs read x directly; others go through the explicit im2col when cfg.im2col)."""

    def __init__(self, csr: CSR, g: ConvGeometry, cfg: SputnikConfig, dtype: torch.dtype, device, backend,
                 bias: torch.Tensor | None = None, relu: bool = False):
        if csr.shape != (g.m, g.k):
            raise ValueError(f"CSR shape {csr.shape} does not match the layer's GEMM view {(g.m, g.k)}")
        if g.k > 65536:
            raise ValueError("Sputnik plans keep column indices in uint16; K must be <= 65536")
        if not (cfg.im2col or cfg.shifted) and not g.pointwise:
            raise ValueError(f"{cfg.label()}: a {g.kh}x{g.kw} conv needs the im2col or shifted variant")
        if cfg.im2col and g.k > 65535:
            raise ValueError("im2col launches a grid row per K row: K must be < 65536")
        if cfg.shifted and ((g.sh, g.sw) != (1, 1) or cfg.dv > 4):
            raise ValueError(f"{cfg.label()}: shifted copies serve stride-1 convs with dense vectors of <= 4")
        self.g, self.cfg, self.dtype, self.device, self.backend, self.relu = g, cfg, dtype, torch.device(device), backend, relu
        self.values = _padded(csr.values, dtype, self.device, pad=8)
        self.col_idx = _uint16(csr.col_idx.to(torch.int64), self.device)
        self.row_ptr = csr.row_ptr.to(self.device, torch.int32)
        self.row_order = csr.row_order.to(self.device, torch.int32)
        self.bias = None if bias is None else bias.reshape(-1).to(self.device, torch.float32).contiguous()
        self.expr = sputnik_expression(dtype, cfg.kernel())
        self.npix = g.ho * g.wo
        self.ldb_im2col = -(-self.npix // IM2COL_ALIGN) * IM2COL_ALIGN
        self.k_offsets = None
        if cfg.shifted:
            # padded input [C][Hp][Wp]; B's row k = (c, r, s) starts at o_k in it, read from copy o_k % 4
            self.hp, self.wp = g.h + g.pt + g.pb, g.w + g.pl + g.pr
            k = torch.arange(g.k, dtype=torch.int64)
            c, r, s_ = k // (g.kh * g.kw), (k % (g.kh * g.kw)) // g.kw, k % g.kw
            o = c * self.hp * self.wp + r * g.dh * self.wp + s_ * g.dw
            # every read, o_k + n (+ a vector, + a tile of columns past Ho*Wp), stays inside a copy
            self.copy_len = -(-(g.c * self.hp * self.wp + (g.kw - 1) * g.dw + 128 + 8 + 4) // 8) * 8
            if 4 * self.copy_len >= 2**31:
                raise ValueError("input too large for 32-bit offsets into the shifted copies")
            self.k_offsets = ((o % 4) * self.copy_len + (o - o % 4)).to(self.device, torch.int32)

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.values, self.col_idx, self.row_ptr, self.row_order, self.k_offsets, self.bias)
                if t is not None]

    def _spmm(self, b: torch.Tensor, n_cols: int, n_load: int, ldb: int, x_batch: int, y: torch.Tensor, ldy: int,
              y_batch: int, images: int, out_pitch: int = 0, out_w: int = 0, r: torch.Tensor | None = None) -> None:
        """r: a residual [N, M, Ho, Wo] whose pixels flatten (oy*Wo + ox at stride(3)), added before the ReLU."""
        cfg, esize = self.cfg, b.element_size()
        if n_load % cfg.dv or ldb % cfg.dv or x_batch % cfg.dv or b.data_ptr() % (cfg.dv * esize):
            raise ValueError(f"{cfg.label()}: B rows are not aligned for {cfg.dv}-wide loads")
        if self.k_offsets is None and (self.g.k - 1) * ldb + n_load >= 2**31:
            raise ValueError("B too large for 32-bit element offsets")
        p = SpmmParams()
        p.values, p.col_idx, p.row_ptr, p.row_order = (self.values.data_ptr(), self.col_idx.data_ptr(),
                                                       self.row_ptr.data_ptr(), self.row_order.data_ptr())
        p.k_offsets = _ptr(self.k_offsets)
        p.bias, p.x, p.y = _ptr(self.bias), b.data_ptr(), y.data_ptr()
        p.x_batch, p.y_batch = x_batch, y_batch
        p.M, p.K, p.N, p.n_load, p.ldb, p.ldy, p.relu = self.g.m, self.g.k, n_cols, n_load, ldb, ldy, int(self.relu)
        p.out_pitch, p.out_w = out_pitch, out_w
        if r is not None:
            p.residual, p.r_batch, p.ldr, p.r_ps = r.data_ptr(), r.stride(0), r.stride(1), r.stride(3)
        p.vec_store = int(ldy % cfg.dv == 0 and y_batch % cfg.dv == 0 and y.data_ptr() % (cfg.dv * esize) == 0)
        grid = (-(-self.g.m // cfg.y), -(-n_cols // cfg.bx), images)
        self.backend.launch("csr_sputnik.cu", self.expr, self.dtype, grid, (cfg.threads,), 0, p)

    def im2col(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] (any strides) -> B [N, K, ldb] (rows padded with zeros to ldb)."""
        g = self.g
        n = x.shape[0]
        ldb = self.ldb_im2col
        b = torch.empty(n, g.k, ldb, dtype=self.dtype, device=x.device)
        p = CsrParams()
        p.x, p.y = x.data_ptr(), b.data_ptr()
        p.x_batch, p.x_cs, p.x_hs, p.x_ws = x.stride(0), x.stride(1), x.stride(2), x.stride(3)
        p.y_batch, p.y_cs = g.k * ldb, ldb
        p.C, p.H, p.W, p.Ho, p.Wo = g.c, g.h, g.w, g.ho, g.wo
        p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw = g.kh, g.kw, g.sh, g.sw, g.pt, g.pl, g.dh, g.dw
        p.batch = n
        self.backend.launch("csr_sputnik.cu", im2col_expression(self.dtype), self.dtype,
                            (-(-ldb // (4 * 256)), g.k, n), (256,), 0, p)
        return b

    def shifted_copies(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] (any strides) -> [N, 4, copy_len]: the padded input, shifted by 0..3."""
        g = self.g
        n = x.shape[0]
        buf = torch.empty(n, 4, self.copy_len, dtype=self.dtype, device=x.device)
        p = CsrParams()
        p.x, p.y = x.data_ptr(), buf.data_ptr()
        p.x_batch, p.x_cs, p.x_hs, p.x_ws = x.stride(0), x.stride(1), x.stride(2), x.stride(3)
        p.y_batch, p.y_cs = 4 * self.copy_len, self.copy_len
        p.C, p.H, p.W, p.ph, p.pw, p.win_h, p.win_w, p.batch = g.c, g.h, g.w, g.pt, g.pl, self.hp, self.wp, n
        self.backend.launch("csr_sputnik.cu", shift_expression(self.dtype), self.dtype,
                            (-(-self.copy_len // 256), 4, n), (256,), 0, p)
        return buf

    def conv(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W] -> y [N, M, Ho, Wo] contiguous; `residual` (y's shape) added before the ReLU."""
        g = self.g
        x = x.to(self.dtype)
        n = x.shape[0]
        y = torch.empty(n, g.m, g.ho, g.wo, dtype=self.dtype, device=x.device)
        r = _residual(residual, y.shape, self.dtype, flat_pixels=True)
        if self.cfg.shifted:
            b = self.shifted_copies(x)
            grid_cols = g.ho * self.wp  # outputs on the padded width; columns ox >= Wo dropped at the store
            n_load = -(-grid_cols // self.cfg.bx) * self.cfg.bx
            self._spmm(b, grid_cols, n_load, 4, 4 * self.copy_len, y, self.npix, g.m * self.npix, n,
                       out_pitch=self.wp, out_w=g.wo, r=r)
            return y
        if self.cfg.im2col:
            b = self.im2col(x)
            self._spmm(b, self.npix, self.ldb_im2col, self.ldb_im2col, g.k * self.ldb_im2col, y, self.npix,
                       g.m * self.npix, n, r=r)
            return y
        if not x.is_contiguous():
            x = x.contiguous()
        if x.data_ptr() % 16:  # a view at an odd offset: vector loads need an aligned copy
            x = x.clone()
        self._spmm(x, self.npix, self.npix, self.npix, x.stride(0), y, self.npix, g.m * self.npix, n, r=r)
        return y

    def spmm(self, b: torch.Tensor) -> torch.Tensor:
        """B [K, N] -> A @ B [M, N]."""
        b = b.to(self.dtype)
        if b.stride(1) != 1:
            b = b.contiguous()
        if b.data_ptr() % 16:
            b = b.clone()
        n = b.shape[1]
        y = torch.empty(self.g.m, n, dtype=self.dtype, device=b.device)
        self._spmm(b, n, n, b.stride(0), 0, y, n, 0, 1)
        return y

    __call__ = conv


def make_plan(csr: CSR, g: ConvGeometry, cfg, dtype: torch.dtype, device, backend, bias=None, relu: bool = False):
    """The plan of a config of any family (ConvConfig: csr_conv.cu; SputnikConfig: csr_sputnik.cu;
    TcConfig: csr_tc.cu)."""
    from .tensor_core import TcConfig, TcPlan

    cls = SputnikPlan if isinstance(cfg, SputnikConfig) else TcPlan if isinstance(cfg, TcConfig) else ConvPlan
    return cls(csr, g, cfg, dtype, device, backend, bias, relu)


def config_from_dict(d: dict):
    """Inverse of cfg.to_dict() for every family (a saved engine's per-layer decision)."""
    from .tensor_core import TcConfig

    d = dict(d)
    family = d.pop("family", None)
    if family == SputnikConfig.family:
        return SputnikConfig(**d)
    if family == TcConfig.family:
        return TcConfig(**d)
    return ConvConfig(**d)


def kernel_name(cfg, dtype: torch.dtype) -> str:
    from .tensor_core import TcConfig, tc_expression

    if isinstance(cfg, TcConfig):
        return f"{tc_expression(cfg.tm, cfg.tn)} (tensor cores, mma.sync m16n8k16)"
    if isinstance(cfg, SputnikConfig):
        spmm = sputnik_expression(dtype, cfg.kernel())
        if cfg.im2col:
            return f"{im2col_expression(dtype)} + {spmm}"
        return f"{shift_expression(dtype)} + {spmm}" if cfg.shifted else spmm
    return conv_expression(dtype, cfg.p, cfg.rpt, cfg.threads, cfg.vec, cfg.ss)


def gemm_as_conv_geometry(m: int, k: int, batch: int) -> ConvGeometry:
    """Y[b, m] = W x[b] as the SpMM W @ X^T: X^T [K, batch] is the 1 x batch 'image' of K channels."""
    return ConvGeometry(m, k, 1, batch)


def gemm_conv_plan_call(plan: ConvPlan, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A CsrGemm above the SpMV batch limit through the SpMM kernel: reads X^T (and writes Y^T,
    reads the residual [N, M]) by strides."""
    x = x.to(plan.dtype)
    n = x.shape[0]
    if n != plan.g.w:
        raise ValueError(f"plan prepared for batch {plan.g.w}, got {n}")
    sx = (0, x.stride(1), 0, x.stride(0))
    sy = lambda y: (0, y.stride(1), 0, y.stride(0))  # noqa: E731
    r = _residual(residual, (n, plan.g.m), plan.dtype)
    sr = (0, 0, 0, 0) if r is None else (0, r.stride(1), 0, r.stride(0))
    return plan._run(x, (n, plan.g.m), 1, sx, sy, lambda y: y, r, sr)


def time_in_graph_us(fn, arg, device, reps: int = 15, inner: int = 10) -> float:
    """Median microseconds of one `fn(arg)` through the shared graph timer (`time_calls`: at
    least `inner` calls captured in one CUDA graph, so launch overhead is excluded as in an
    engine's whole-network graph). On CPU (emulated kernels) fewer plain calls."""
    from ..timing import time_calls

    device = torch.device(device)
    if device.type != "cuda":
        reps = max(1, reps // 5)
    with torch.no_grad():  # a tuner times many short candidates back to back: little warm-up each
        return time_calls(lambda j: fn(arg), device, reps=reps, warmup=1, min_inner=inner, warmup_ms=2.0).median_ms * 1e3


def tune(candidates: list, make_plan, run, arg, device, reps: int = 15) -> tuple:
    """The fastest candidate config on `arg` by the one chooser (checked against the first that
    fits, timed interleaved in CUDA graphs); returns (config, plan, us, [{config, us | skipped}]).
    For the GEMM sweep and the kernel study, which compare sparse configs only."""
    from ..chooser import Candidate, Chooser

    plans, timed, cands = {}, [], []
    for cfg in candidates:
        try:
            plans[cfg.label()] = (cfg, make_plan(cfg))
        except PlanDoesNotFit as exc:
            timed.append({"config": cfg.label(), "skipped": str(exc)})
            continue
        cands.append(Candidate(cfg.label(), (lambda a, p=plans[cfg.label()][1]: run(p, a)), dense=False, library="csr"))
    with torch.no_grad():
        d = Chooser(device, arg.dtype, reps=reps if torch.device(device).type == "cuda" else max(3, reps // 5),
                    policy="sparse").choose("tune", cands, (arg,))
    timed += [{"config": n, "us": round(ms * 1e3, 3)} for n, ms in d.times_ms.items()]
    timed += [{"config": n, "skipped": why} for n, why in d.rejected.items()]
    cfg, plan = plans[d.chosen]
    if d.chosen in d.times_ms:
        return cfg, plan, d.times_ms[d.chosen] * 1e3, timed
    us = time_in_graph_us(lambda a: run(plan, a), arg, device, reps)  # the only candidate: nothing was timed
    return cfg, plan, us, timed + [{"config": d.chosen, "us": round(us, 3)}]


def expected_floor_us(nnz: int, n: int, dense_bytes: int, sms: int = 132, clock_ghz: float = 1.755,
                      dram_gbs: float = 3000.0) -> float:
    """Lower bound in microseconds: nnz*N FMAs fed from shared memory (32 floats/clk/SM) or
    the dense operand read once from DRAM, whichever is slower."""
    fma_us = nnz * n / (32 * sms * clock_ghz * 1e3)
    mem_us = dense_bytes / (dram_gbs * 1e3)
    return max(fma_us, mem_us)


__all__ = ["ConvGeometry", "ConvConfig", "ConvPlan", "GemvPlan", "NvrtcBackend", "PlanDoesNotFit", "SputnikConfig",
           "SputnikPlan",
           "candidate_configs", "chunk_pointers", "config_from_dict", "entry_offsets", "make_plan", "window_config",
           "spmm_config", "sputnik_candidates", "with_split"]
