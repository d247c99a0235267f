"""SparseRT-style code generation: one pruned layer -> CUDA C++ specialised on its sparsity pattern.

Z. Wang, "SparseRT: Accelerating Unstructured Sparsity on GPUs for Deep Learning Inference"
(PACT'20). The layer is the GEMM C[M, N] = A[M, K] @ B[K, N] of passes/csr.py's view
(M = output channels, K = Cin*kh*kw, N = output pixels of one image). Everything known at
generation time is compiled into the kernel:

* every non-zero weight is the immediate operand of one `fma.rn.f32` (no weight or index
  loads at run time); the bias is an immediate of the epilogue;
* rows are put into *groups* of at most R rows, balanced by non-zero count (longest-first
  greedy over CSR.row_order); a thread block runs one group's straight-line code over a tile
  of columns, every thread keeping the group's R accumulators per column in registers;
* each distinct input row k a group needs is loaded ONCE per thread and feeds every FMA
  of the group's rows that use it (SparseRT's "one load per distinct input row");
* with k-split S > 1 the group's distinct rows are cut into S slices of equal work, run by
  S warps of the block and summed through shared memory;
* the load offsets are constants: for a conv, input element (c, ih, iw) of column
  (oh, ow) is `tap_pointer[r, s] + c*H*W` (implicit im2col; a tap pointer is precomputed
  per thread and points at a zero buffer where the tap falls into the padding, so the
  straight-line code needs no predicates); for an SpMM, row k is `B + n + k*N`;
* epilogue fused: + bias, + residual (Conv -> Add), ReLU; fp32 or fp16 storage with fp32
  accumulation.

The generator first builds an intermediate representation (`Program`: per group and slice
the list of loads, each with its offset and FMAs), which is rendered to CUDA C++
(`render_cuda`) and can be interpreted on the CPU (`interpret`) to check the arithmetic of
exactly what is compiled against the dense layer.

Code size rule (measured with NVRTC 13.0, see `CODE_SIZE_RULE`): the main loop is written as
inline PTX, so NVVM's optimiser sees one opaque statement per slice and compile time is
linear in the number of instructions (~60-90 us per instruction in ptxas on one core);
written as C++ `fmaf` calls, NVVM was super-linear (8k FMAs: 16 s, 16k: 40 s+) and runtime
multiplications in the load addresses made it worse, hence constant offsets. `__constant__`
memory does not shrink the code (an FFMA reads a constant-bank operand in the same single
instruction), so weights are always immediates and a layer whose smallest configuration
exceeds `max_instructions` is not generated: the runtime falls back to CSR or dense.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...common.shapes import conv_out_size

CODE_SIZE_RULE = ("weights as fma immediates; a program of more than max_instructions "
                  "(loads + FMAs x columns per thread) is not generated: the layer falls back to "
                  "CSR or dense (ptxas ~60-90 us per instruction, linear; __constant__ memory "
                  "would not shrink the instruction count)")
DEFAULT_MAX_INSTRUCTIONS = 120_000
DEFAULT_MAX_CONFIGS = 3        # tile configurations generated (each one NVRTC compile) per layer
MAX_ACCUMULATORS = 64          # registers for R x V accumulators per thread
MAX_STATIC_SHARED = 48 * 1024  # k-split reduction buffer must fit static shared memory
H100_SMS = 132                 # only used to size candidate grids; timing decides
DTYPES = ("fp32", "fp16")


# --------------------------------------------------------------------------------------------
# Geometry and configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerGeometry:
    """Where the GEMM view's operands live in memory.

    kind 'conv': input NCHW [*, cin, h, w], output NCHW [*, M, oh, ow]; K = cin*kh*kw.
    kind 'spmm': B [K, n] row-major, C [M, n] row-major (the GEMM sweep's operands).
    kind 'gemm': X [n, K] row-major (a Gemm/Linear layer, n = batch rows), Y [n, M].
    `pads` are the begin pads (top, left); the end pads only shape (oh, ow).
    """

    kind: str
    M: int
    K: int
    n: int = 0                       # spmm/gemm columns; conv: derived (oh*ow)
    cin: int = 0
    h: int = 0
    w: int = 0
    kh: int = 1
    kw: int = 1
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int] = (0, 0)
    dilations: tuple[int, int] = (1, 1)
    oh: int = 0
    ow: int = 0

    @staticmethod
    def conv(M: int, cin: int, h: int, w: int, kh: int, kw: int, strides=(1, 1), pads=(0, 0, 0, 0),
             dilations=(1, 1)) -> "LayerGeometry":
        """A 2-D convolution; `pads` as ONNX [top, left, bottom, right] (or [top, left])."""
        pads = tuple(int(p) for p in pads)
        pt, pl = pads[0], pads[1]
        pb, pr = (pads[2], pads[3]) if len(pads) == 4 else (pt, pl)
        sh, sw = (int(s) for s in strides)
        dh, dw = (int(d) for d in dilations)
        oh, ow = conv_out_size(h, pt + pb, kh, sh, dh), conv_out_size(w, pl + pr, kw, sw, dw)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"conv output is empty: input {h}x{w}, kernel {kh}x{kw}, pads {pads}")
        return LayerGeometry("conv", int(M), int(cin) * kh * kw, 0, int(cin), int(h), int(w), int(kh), int(kw),
                             (sh, sw), (pt, pl), (dh, dw), oh, ow)

    @property
    def cols(self) -> int:
        """Columns of the GEMM view per image (output pixels for a conv)."""
        return self.oh * self.ow if self.kind == "conv" else self.n

    @property
    def in_image_elems(self) -> int:
        return self.cin * self.h * self.w if self.kind == "conv" else self.K * self.n

    @property
    def out_image_elems(self) -> int:
        return self.M * self.cols

    def column_of(self, k: int) -> tuple[int, int]:
        """GEMM column k -> (tap index, element offset from the tap pointer)."""
        if self.kind == "conv":
            c, rs = divmod(k, self.kh * self.kw)
            return rs, c * self.h * self.w
        if self.kind == "spmm":
            return 0, k * self.n
        return 0, k  # gemm: X[n, k]

    def tap_shift(self, tap: int) -> tuple[int, int]:
        """(row, column) input shift of a conv tap."""
        r, s = divmod(tap, self.kw)
        return r * self.dilations[0], s * self.dilations[1]

    def tap_always_valid(self, tap: int) -> bool:
        if self.kind != "conv":
            return True
        dr, ds = self.tap_shift(tap)
        lo_r, hi_r = -self.pads[0] + dr, (self.oh - 1) * self.strides[0] - self.pads[0] + dr
        lo_c, hi_c = -self.pads[1] + ds, (self.ow - 1) * self.strides[1] - self.pads[1] + ds
        return lo_r >= 0 and hi_r < self.h and lo_c >= 0 and hi_c < self.w

    @property
    def contiguous_columns(self) -> bool:
        """Column n's input is element n of each input row (SpMM, 1x1 stride-1 unpadded conv)."""
        if self.kind == "spmm":
            return True
        return (self.kind == "conv" and self.kh == 1 and self.kw == 1 and self.strides == (1, 1)
                and self.pads == (0, 0) and self.oh == self.h and self.ow == self.w)

    @property
    def needs_zero_buffer(self) -> bool:
        return self.kind == "conv" and not all(self.tap_always_valid(t) for t in range(self.kh * self.kw))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerGeometry":
        d = dict(d)
        for key in ("strides", "pads", "dilations"):
            d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class TileConfig:
    """R rows per group, V columns per thread, WN warps across columns, S k-slices, P loads in flight."""

    rows: int = 16
    vec: int = 1
    warps_n: int = 4
    k_split: int = 1
    prefetch: int = 16

    @property
    def threads(self) -> int:
        return 32 * self.warps_n * self.k_split

    @property
    def name(self) -> str:
        return f"r{self.rows}v{self.vec}w{self.warps_n}s{self.k_split}p{self.prefetch}"

    @classmethod
    def parse(cls, name: str) -> "TileConfig":
        import re

        m = re.fullmatch(r"r(\d+)v(\d+)w(\d+)s(\d+)p(\d+)", name)
        if not m:
            raise ValueError(f"not a tile configuration name: {name!r}")
        return cls(*(int(g) for g in m.groups()))


# --------------------------------------------------------------------------------------------
# The intermediate representation
# --------------------------------------------------------------------------------------------

@dataclass
class Load:
    """One distinct input row of a group: loaded once, used by every FMA in `fmas`."""

    k: int                                  # GEMM column (input row of B)
    tap: int                                # which per-thread input pointer
    offset: int                             # element offset from that pointer
    fmas: list[tuple[int, float]]           # (accumulator slot, weight as an fp32 value)


@dataclass
class Group:
    rows: list[int]                         # accumulator slot -> output row
    bias: list[float]
    slices: list[list[Load]]                # k-split: slice s runs on warps with wk == s


@dataclass
class Program:
    geometry: LayerGeometry
    config: TileConfig
    dtype: str
    relu: bool
    residual: bool
    groups: list[Group]
    weights_hash: str
    layer_key: str = ""
    gen_seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"sparsert_{self.layer_key[:12]}_{self.config.name}_{self.dtype}"

    @property
    def vector_loads(self) -> bool:
        return self.config.vec > 1 and self.geometry.contiguous_columns

    @property
    def nnz(self) -> int:
        return sum(len(ld.fmas) for g in self.groups for sl in g.slices for ld in sl)

    @property
    def n_loads(self) -> int:
        return sum(len(sl) for g in self.groups for sl in g.slices)

    def instructions(self) -> int:
        """Main-loop instruction estimate: the code-size measure of the cap."""
        return instruction_estimate(self.n_loads, self.nnz, self.config.vec, self.dtype, self.vector_loads)

    def grid(self, batch: int = 1) -> tuple[int, int, int]:
        cfg = self.config
        tile = 32 * cfg.warps_n * cfg.vec
        return (len(self.groups), max(1, math.ceil(self.geometry.cols / tile)), batch)

    def stats(self) -> dict:
        return {"config": self.config.name, "groups": len(self.groups), "nnz": self.nnz, "loads": self.n_loads,
                "fmas_per_load": round(self.nnz / max(1, self.n_loads), 3), "instructions": self.instructions(),
                "threads": self.config.threads, "gen_s": round(self.gen_seconds, 4)}


def instruction_estimate(loads: int, nnz: int, vec: int, dtype: str, vector_loads: bool) -> int:
    per_load = 1 if vector_loads else vec
    if dtype == "fp16":
        per_load += vec  # one cvt.f32.f16 per column
    return loads * per_load + nnz * vec


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def balanced_groups(row_lengths: np.ndarray, row_order: np.ndarray, rows_per_group: int) -> list[list[int]]:
    """Rows -> groups of at most R rows with near-equal non-zero totals.

    Longest-processing-time greedy: rows in CSR.row_order (longest first) each go to the open
    group with the least work so far. Every group's total is within one row's length of the
    others (the load balance of the generated grid).
    """
    m = len(row_lengths)
    n_groups = max(1, math.ceil(m / rows_per_group))
    work = [0] * n_groups
    members: list[list[int]] = [[] for _ in range(n_groups)]
    import heapq

    heap = [(0, g) for g in range(n_groups)]
    for row in row_order.tolist():
        while True:
            w, g = heapq.heappop(heap)
            if len(members[g]) < rows_per_group:
                break
        members[g].append(int(row))
        work[g] = w + int(row_lengths[row])
        if len(members[g]) < rows_per_group:
            heapq.heappush(heap, (work[g], g))
    return [sorted(g) for g in members if g]


def _split_balanced(costs: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges of `costs` with near-equal sums (k-slices)."""
    total = sum(costs)
    bounds, acc, start = [], 0, 0
    for i, c in enumerate(costs):
        acc += c
        if len(bounds) < parts - 1 and acc >= total * (len(bounds) + 1) / parts:
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(costs)))
    while len(bounds) < parts:
        bounds.append((len(costs), len(costs)))
    return bounds


def layer_key(csr, geometry: LayerGeometry, bias, relu: bool, residual: bool) -> str:
    """Hash of everything a generated kernel bakes in: pattern, weights, bias, geometry, epilogue."""
    h = hashlib.sha256()
    for t in (csr.values, csr.col_idx, csr.row_ptr):
        h.update(np.ascontiguousarray(_np(t)).tobytes())
    if bias is not None:
        h.update(np.ascontiguousarray(_np(bias), dtype=np.float32).tobytes())
    h.update(json.dumps([geometry.to_dict(), relu, residual], sort_keys=True).encode())
    return h.hexdigest()


def weights_hash(csr, bias=None) -> str:
    h = hashlib.sha256()
    for t in (csr.values, csr.col_idx, csr.row_ptr):
        h.update(np.ascontiguousarray(_np(t)).tobytes())
    if bias is not None:
        h.update(np.ascontiguousarray(_np(bias), dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def build_program(csr, geometry: LayerGeometry, config: TileConfig, bias=None, relu: bool = False,
                  residual: bool = False, dtype: str = "fp32", key: str | None = None) -> Program:
    """The IR of one layer: groups balanced by non-zeros, each distinct input row loaded once."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    m, k = csr.shape
    if (m, k) != (geometry.M, geometry.K):
        raise ValueError(f"CSR shape {(m, k)} does not match the layer's GEMM view {(geometry.M, geometry.K)}")
    if config.vec > 1 and geometry.kind == "gemm":
        raise ValueError("a Gemm layer's columns are strided rows of X: use vec=1")
    values = _np(csr.values).astype(np.float32)
    cols = _np(csr.col_idx).astype(np.int64)
    row_ptr = _np(csr.row_ptr).astype(np.int64)
    lengths = row_ptr[1:] - row_ptr[:-1]
    order = _np(csr.row_order).astype(np.int64)
    bias_np = np.zeros(m, np.float32) if bias is None else _np(bias).astype(np.float32).reshape(-1)
    groups = []
    for rows in balanced_groups(lengths, order, config.rows):
        # (k, slot, weight) triples of the group, sorted by input row
        ks, slots, ws = [], [], []
        for slot, row in enumerate(rows):
            a, b = row_ptr[row], row_ptr[row + 1]
            ks.append(cols[a:b])
            slots.append(np.full(b - a, slot, np.int64))
            ws.append(values[a:b])
        kk = np.concatenate(ks) if ks else np.zeros(0, np.int64)
        ss = np.concatenate(slots) if slots else np.zeros(0, np.int64)
        ww = np.concatenate(ws) if ws else np.zeros(0, np.float32)
        idx = np.lexsort((ss, kk))
        kk, ss, ww = kk[idx], ss[idx], ww[idx]
        loads: list[Load] = []
        if len(kk):
            starts = np.flatnonzero(np.r_[True, kk[1:] != kk[:-1]]).tolist()
            ends = starts[1:] + [len(kk)]
            pairs = list(zip(ss.tolist(), ww.tolist()))
            kl = kk.tolist()
            for a, b in zip(starts, ends):
                tap, off = geometry.column_of(kl[a])
                loads.append(Load(kl[a], tap, off, pairs[a:b]))
        costs = [1 + len(ld.fmas) for ld in loads]
        slices = [loads[a:b] for a, b in _split_balanced(costs, config.k_split)]
        groups.append(Group(rows, [float(bias_np[r]) for r in rows], slices))
    prog = Program(geometry, config, dtype, bool(relu), bool(residual), groups, weights_hash(csr, bias),
                   key or layer_key(csr, geometry, bias, relu, residual))
    prog.gen_seconds = time.perf_counter() - t0
    return prog


# --------------------------------------------------------------------------------------------
# CPU interpretation of the IR (what CI checks against the dense layer)
# --------------------------------------------------------------------------------------------

def _column_bases(geo: LayerGeometry, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: input base element, and (for convs) the top-left input row/column."""
    if geo.kind == "conv":
        oh, ow = np.divmod(n, geo.ow)
        ih0 = oh * geo.strides[0] - geo.pads[0]
        iw0 = ow * geo.strides[1] - geo.pads[1]
        return ih0 * geo.w + iw0, ih0, iw0
    if geo.kind == "spmm":
        return n.copy(), n, n
    return n * geo.K, n, n


def interpret(program: Program, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """Run the program's tables on the CPU, in float64, the way the kernel does.

    x: conv [B, cin, h, w]; spmm [K, n]; gemm [n, K]. Returns conv [B, M, oh, ow],
    spmm [M, n], gemm [n, M]. Each load reads `tap pointer + offset` (zero where a conv
    tap falls into the padding) and feeds its FMAs; slices are summed; then bias, residual,
    ReLU.
    """
    geo = program.geometry
    x = np.asarray(x, dtype=np.float64)
    images = x.reshape(-1, geo.in_image_elems) if geo.kind == "conv" else x.reshape(1, -1)
    cols = x.shape[0] if geo.kind == "gemm" else geo.cols  # a Gemm's batch is its column count
    n = np.arange(cols)
    base, ih0, iw0 = _column_bases(geo, n)
    ntaps = geo.kh * geo.kw if geo.kind == "conv" else 1
    valid, shift = [], []
    for tap in range(ntaps):
        if geo.kind == "conv":
            dr, ds = geo.tap_shift(tap)
            valid.append((ih0 + dr >= 0) & (ih0 + dr < geo.h) & (iw0 + ds >= 0) & (iw0 + ds < geo.w))
            shift.append(dr * geo.w + ds)
        else:
            valid.append(np.ones(cols, bool))
            shift.append(0)
    out = np.zeros((images.shape[0], geo.M, cols))
    for b, flat in enumerate(images):
        for g in program.groups:
            acc = np.zeros((len(g.rows), cols))
            for sl in g.slices:
                for ld in sl:
                    addr = base + shift[ld.tap] + ld.offset
                    ok = valid[ld.tap]
                    v = np.where(ok, flat[np.where(ok, addr, 0)], 0.0)
                    for slot, wgt in ld.fmas:
                        acc[slot] += wgt * v
            for slot, row in enumerate(g.rows):
                out[b, row] = acc[slot] + g.bias[slot]
    if geo.kind == "conv":
        out = out.reshape(images.shape[0], geo.M, geo.oh, geo.ow)
    elif geo.kind == "spmm":
        out = out[0]
    else:
        out = out[0].T
    if program.residual:
        out = out + np.asarray(residual, dtype=np.float64).reshape(out.shape)
    if program.relu:
        out = np.maximum(out, 0.0)
    return out


# --------------------------------------------------------------------------------------------
# Rendering to CUDA C++ (main loop as inline PTX)
# --------------------------------------------------------------------------------------------

COMPILE_OPTIONS: tuple[str, ...] = ()


def _load_ptx(prog: Program, ring: int, tap_ops: dict[tuple[int, int], int], ld: Load) -> list[str]:
    """PTX that loads `ld` into ring slot `ring` (registers x{ring*V + j})."""
    v, fp16 = prog.config.vec, prog.dtype == "fp16"
    esz = 2 if fp16 else 4
    out = []
    base = ring * v
    if prog.vector_loads:
        addr = f"[%{tap_ops[(ld.tap, 0)]}+{ld.offset * esz}]"
        if not fp16:
            regs = ", ".join(f"x{base + j}" for j in range(v))
            out.append(f"ld.global.nc.v{v}.f32 {{{regs}}}, {addr};" if v > 1 else f"ld.global.nc.f32 x{base}, {addr};")
        else:
            words = (v + 1) // 2
            wregs = ", ".join(f"u{ring * 4 + i}" for i in range(words))
            out.append(f"ld.global.nc.v{words}.b32 {{{wregs}}}, {addr};" if words > 1 else
                       f"ld.global.nc.b32 u{ring * 4}, {addr};")
            for i in range(words):
                out.append(f"mov.b32 {{h{ring * 8 + 2 * i}, h{ring * 8 + 2 * i + 1}}}, u{ring * 4 + i};")
            for j in range(v):
                out.append(f"cvt.f32.f16 x{base + j}, h{ring * 8 + j};")
        return out
    for j in range(v):
        addr = f"[%{tap_ops[(ld.tap, j)]}+{ld.offset * esz}]"
        if fp16:
            out.append(f"ld.global.nc.b16 h{ring * 8 + j}, {addr};")
            out.append(f"cvt.f32.f16 x{base + j}, h{ring * 8 + j};")
        else:
            out.append(f"ld.global.nc.f32 x{base + j}, {addr};")
    return out


def _slice_asm(prog: Program, loads: list[Load], nslots: int) -> str:
    """One k-slice as a single inline-asm statement (C++ source text)."""
    if not loads:
        return ""
    cfg = prog.config
    v = cfg.vec
    slots = sorted({s for ld in loads for s, _ in ld.fmas})
    acc_ops = {}
    operands_out = []
    for s in slots:
        for j in range(v):
            acc_ops[(s, j)] = len(operands_out)
            operands_out.append(f'"+f"(a{s}_{j})')
    tap_ops: dict[tuple[int, int], int] = {}
    operands_in = []
    taps = sorted({ld.tap for ld in loads})
    pcols = 1 if prog.vector_loads else v
    for t in taps:
        for j in range(pcols):
            tap_ops[(t, j)] = len(operands_out) + len(operands_in)
            operands_in.append(f'"l"(p{t}_{j})')
    ring = max(1, min(cfg.prefetch, len(loads)))
    body = ["{", f".reg .f32 x<{ring * v}>;"]
    if prog.dtype == "fp16":
        body += [f".reg .b16 h<{ring * 8}>;", f".reg .b32 u<{ring * 4}>;"]
    emitted = []
    for i in range(min(ring, len(loads))):
        emitted += _load_ptx(prog, i % ring, tap_ops, loads[i])
    for i, ld in enumerate(loads):
        r = i % ring
        for slot, wgt in ld.fmas:
            imm = f"0f{_f32_bits(wgt):08X}"
            for j in range(v):
                acc = acc_ops[(slot, j)]
                emitted.append(f"fma.rn.f32 %{acc}, x{r * v + j}, {imm}, %{acc};")
        if i + ring < len(loads):
            emitted += _load_ptx(prog, r, tap_ops, loads[i + ring])
    body += emitted
    body.append("}")
    text = "\\n\\t".join(body)
    return f'asm volatile("{text}"\n      : {", ".join(operands_out)}\n      : {", ".join(operands_in)});'


_HEADER = r"""// Generated by sparsecnn.runtimes.sparsert.codegen: layer %(key)s, config %(config)s, %(dtype)s.
// %(kind)s M=%(M)d K=%(K)d columns=%(cols)d, %(nnz)d non-zeros baked in as FMA immediates.
typedef %(ctype)s T;
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(unsigned short v) {
  float f; asm("{ .reg .b16 t; mov.b16 t, %%1; cvt.f32.f16 %%0, t; }" : "=f"(f) : "h"(v)); return f;
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(unsigned short* p, float v) {
  unsigned short h; asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %%1; mov.b16 %%0, t; }" : "=h"(h) : "f"(v)); *p = h;
}
"""


def render_cuda(prog: Program) -> tuple[str, str]:
    """(CUDA C++ source, kernel name). Launch with `prog.grid(batch)` and `prog.config.threads`."""
    geo, cfg = prog.geometry, prog.config
    v, s_split, wn = cfg.vec, cfg.k_split, cfg.warps_n
    cols = geo.cols
    fp16 = prog.dtype == "fp16"
    name = prog.name
    lines = [_HEADER % {"key": prog.layer_key[:16], "config": cfg.name, "dtype": prog.dtype, "kind": geo.kind,
                        "M": geo.M, "K": geo.K, "cols": cols, "nnz": prog.nnz,
                        "ctype": "unsigned short" if fp16 else "float"}]
    lines.append(f'extern "C" __global__ void __launch_bounds__({cfg.threads}) {name}(\n'
                 f"    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ res, const T* __restrict__ zeros, int ncols) {{")
    lines.append("  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;")
    lines.append(f"  const int wn = warp % {wn}, wk = warp / {wn};")
    lines.append("  (void)wk; (void)zeros; (void)res;")
    if geo.kind == "gemm":
        lines.append("  const int COLS = ncols;")
    else:
        lines.append(f"  const int COLS = {cols}; (void)ncols;")
    lines.append(f"  const long img = blockIdx.z;")
    lines.append(f"  const T* xi = x + img * {geo.in_image_elems if geo.kind == 'conv' else 0}L;")
    lines.append(f"  T* yi = y + img * {geo.out_image_elems if geo.kind == 'conv' else 0}L;")
    if prog.residual:
        lines.append(f"  const T* ri = res + img * {geo.out_image_elems if geo.kind == 'conv' else 0}L;")
    tile = 32 * wn * v
    if prog.vector_loads:
        lines.append(f"  const int n0 = blockIdx.y * {tile} + wn * {32 * v} + lane * {v};")
        for j in range(1, v):
            lines.append(f"  const int n{j} = n0 + {j};")
        lines.append(f"  const int nc0 = min(n0, COLS - {v});")
        lines.append(f"  const T* p0_0 = xi + nc0;")
    else:
        lines.append(f"  const int n0 = blockIdx.y * {tile} + wn * {32 * v} + lane;")
        for j in range(v):
            if j:
                lines.append(f"  const int n{j} = n0 + {32 * j};")
            lines.append(f"  const int nc{j} = min(n{j}, COLS - 1);")
        taps_used = sorted({ld.tap for g in prog.groups for sl in g.slices for ld in sl})
        for j in range(v):
            if geo.kind == "spmm":
                lines.append(f"  const T* p0_{j} = xi + nc{j};")
            elif geo.kind == "gemm":
                lines.append(f"  const T* p0_{j} = xi + (long)nc{j} * {geo.K};")
            else:
                lines.append(f"  const int oh{j} = nc{j} / {geo.ow}, ow{j} = nc{j} - oh{j} * {geo.ow};")
                lines.append(f"  const int ih{j} = oh{j} * {geo.strides[0]} - {geo.pads[0]}, "
                             f"iw{j} = ow{j} * {geo.strides[1]} - {geo.pads[1]};")
                for t in taps_used:
                    dr, ds = geo.tap_shift(t)
                    ptr = f"xi + (ih{j} + {dr}) * {geo.w} + iw{j} + {ds}"
                    if geo.tap_always_valid(t):
                        lines.append(f"  const T* p{t}_{j} = {ptr};")
                    else:
                        lines.append(f"  const T* p{t}_{j} = ((unsigned)(ih{j} + {dr}) < {geo.h}u && "
                                     f"(unsigned)(iw{j} + {ds}) < {geo.w}u) ? {ptr} : zeros;")
    rmax = max(len(g.rows) for g in prog.groups)
    if s_split > 1:
        lines.append(f"  __shared__ float red[{s_split * rmax * v * wn * 32}];")
        lines.append(f"  const int rlane = wn * 32 + lane;")

    def out_off(row: int, j: int) -> str:
        if geo.kind == "gemm":
            return f"(long)n{j} * {geo.M} + {row}"
        return f"{row}L * COLS + n{j}"

    def epilogue(slot: int, row: int, bias: float, value: str, j: int) -> list[str]:
        e = [f"    if (n{j} < COLS) {{ float o = {value} + __int_as_float(0x{_f32_bits(bias):08X});"]
        if prog.residual:
            e.append(f"      o += to_f32(ri[{out_off(row, j)}]);")
        if prog.relu:
            e.append("      o = fmaxf(o, 0.f);")
        e.append(f"      store(yi + {out_off(row, j)}, o); }}")
        return e

    lines.append("  switch (blockIdx.x) {")
    for gi, g in enumerate(prog.groups):
        lines.append(f"  case {gi}: {{")
        accs = ", ".join(f"a{s}_{j} = 0.f" for s in range(len(g.rows)) for j in range(v))
        lines.append(f"    float {accs};")
        for si, sl in enumerate(g.slices):
            code = _slice_asm(prog, sl, len(g.rows))
            if not code:
                continue
            cond = "if (true)" if s_split == 1 else f"if (wk == {si})"
            lines.append(f"    {cond} {{\n      {code}\n    }}")
        if s_split == 1:
            for slot, row in enumerate(g.rows):
                for j in range(v):
                    lines += epilogue(slot, row, g.bias[slot], f"a{slot}_{j}", j)
        else:
            for slot in range(len(g.rows)):
                for j in range(v):
                    lines.append(f"    red[((wk * {rmax} + {slot}) * {v} + {j}) * {wn * 32} + rlane] = a{slot}_{j};")
            lines.append("    __syncthreads();")
            for part in range(s_split):
                mine = [(slot, row) for slot, row in enumerate(g.rows) if slot % s_split == part]
                if not mine:
                    continue
                lines.append(f"    if (wk == {part}) {{")
                for slot, row in mine:
                    for j in range(v):
                        terms = " + ".join(f"red[(({p} * {rmax} + {slot}) * {v} + {j}) * {wn * 32} + rlane]"
                                           for p in range(s_split))
                        lines += epilogue(slot, row, g.bias[slot], f"({terms})", j)
                lines.append("    }")
        lines.append("  } break;")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n", name


# --------------------------------------------------------------------------------------------
# Choosing candidate tile configurations
# --------------------------------------------------------------------------------------------

def _group_loads(lengths: np.ndarray, order: np.ndarray, csr_cols: np.ndarray, row_ptr: np.ndarray,
                 rows: int) -> tuple[int, int]:
    """(groups, distinct loads summed over groups) for R = rows."""
    groups = balanced_groups(lengths, order, rows)
    total = 0
    for g in groups:
        ks = np.concatenate([csr_cols[row_ptr[r]:row_ptr[r + 1]] for r in g]) if g else np.zeros(0)
        total += len(np.unique(ks))
    return len(groups), total


def candidate_configs(csr, geometry: LayerGeometry, dtype: str = "fp32", max_configs: int = DEFAULT_MAX_CONFIGS,
                      max_instructions: int = DEFAULT_MAX_INSTRUCTIONS, batch: int = 1) -> list[TileConfig]:
    """A few diverse tile configurations worth timing for this layer (best guess first).

    Candidates trade register reuse of loaded input rows (large R, more columns per thread)
    against parallelism (small R, k-split warps) for the layer's column count; each must fit
    the accumulator, shared-memory and code-size limits. The device timing decides.
    """
    m, _ = csr.shape
    cols = geometry.cols * (batch if geometry.kind == "conv" else 1)
    lengths = (_np(csr.row_ptr)[1:] - _np(csr.row_ptr)[:-1]).astype(np.int64)
    order = _np(csr.row_order).astype(np.int64)
    col_idx = _np(csr.col_idx).astype(np.int64)
    row_ptr = _np(csr.row_ptr).astype(np.int64)
    nnz = int(lengths.sum())
    if nnz > max_instructions:  # every configuration has at least one FMA per non-zero
        return []
    if geometry.kind == "gemm":
        vecs = [1]
    elif geometry.contiguous_columns:
        vecs = [v for v in (1, 2, 4) if geometry.cols % v == 0]
    else:
        vecs = [1, 2]
    # neighbouring taps of a conv read overlapping input rows: most of their loads hit L1
    l1_miss = 1.0 / 3.0 if geometry.kind == "conv" and geometry.kh * geometry.kw > 1 else 1.0
    loads_cache: dict[int, tuple[int, int]] = {}
    scored = []
    for rows in sorted({min(r, m) for r in (8, 16, 32, 64)}):
        if rows not in loads_cache:
            loads_cache[rows] = _group_loads(lengths, order, col_idx, row_ptr, rows)
        n_groups, loads = loads_cache[rows]
        for vec in vecs:
            if rows * vec > MAX_ACCUMULATORS:
                continue
            vl = vec > 1 and geometry.contiguous_columns
            instr = instruction_estimate(loads, nnz, vec, dtype, vl)
            if instr > max_instructions:
                continue
            col_warps = math.ceil(cols / (32 * vec))
            for k_split in (1, 2, 4, 8):
                warps_n = max(1, min(col_warps, 8 // k_split))
                if k_split > 1 and k_split * rows * vec * warps_n * 32 * 4 > MAX_STATIC_SHARED:
                    continue
                # A rough cycle model, only to pick which few configurations to time: issue
                # (every column-warp runs every group's code once), a lone warp's latency
                # (~4 cycles per instruction when its scheduler has nothing else), L2 traffic.
                epilogue = rows * vec * (4 if k_split == 1 else 6)
                total_warps = math.ceil(col_warps / warps_n) * warps_n * n_groups * k_split
                per_warp = instr / (n_groups * k_split) + epilogue / k_split
                issue = col_warps * (instr + n_groups * epilogue) / (H100_SMS * 4)
                waves = max(1, math.ceil(total_warps / (H100_SMS * 48)))
                latency = per_warp * 4 * waves
                l2 = col_warps * loads * 32 * vec * (2 if dtype == "fp16" else 4) * l1_miss / 2500
                # straight-line code is fetched from L2 once per group of warps running the
                # same slice in step (the WN column warps of a block): 16 B per instruction
                fetch = col_warps * instr * 16 / warps_n / 2500
                # each term is a lower bound; they overlap only partly
                terms = (issue, latency, l2 + fetch)
                est = max(terms) + 0.25 * (sum(terms) - max(terms))
                scored.append((est, TileConfig(rows, vec, warps_n, k_split, max(4, 24 // vec))))
    scored.sort(key=lambda t: t[0])
    # The model only ranks; keep the picks diverse so the device timing has real choices:
    # the best, the best with another R, the best whose warps all share one code path
    # (k_split 1: SparseRT's original shape), then by rank.
    chosen: list[TileConfig] = []
    rules = [lambda c: True, lambda c: c.rows not in {x.rows for x in chosen},
             lambda c: c.k_split == 1 and all(x.k_split != 1 for x in chosen),
             lambda c: c.k_split not in {x.k_split for x in chosen},
             lambda c: c.rows not in {x.rows for x in chosen}]
    for rule in rules:
        if len(chosen) >= max_configs:
            break
        pick = next((cfg for _, cfg in scored if cfg not in chosen and rule(cfg)), None)
        if pick is not None:
            chosen.append(pick)
    for _, cfg in scored:
        if len(chosen) >= max_configs:
            break
        if cfg not in chosen:
            chosen.append(cfg)
    order_map = {cfg: est for est, cfg in scored}
    return sorted(chosen, key=lambda c: order_map[c])


# --------------------------------------------------------------------------------------------
# Compiling many programs in parallel
# --------------------------------------------------------------------------------------------

@dataclass
class CompileRecord:
    name: str
    seconds: float
    cpu_seconds: float
    cubin_bytes: int
    cached: bool
    error: str = ""


def _gil_released_by_nvrtc() -> bool:
    """cuda-bindings releases the GIL around NVRTC calls from 12.9.x / 13.x on."""
    try:
        from cuda.bindings import __version__ as v
        major, minor = (int(p) for p in v.split(".")[:2])
        return (major, minor) >= (12, 9)
    except Exception:
        return False


def _compile_one(source: str, arch: str, name: str) -> tuple[float, float, int, bool]:
    from ..nvrtc import compile_cubin

    log: list[str] = []  # stays empty when the cubin came from the disk cache
    w0, c0 = time.perf_counter(), time.thread_time()
    cubin, _ = compile_cubin(source, arch, name + ".cu", COMPILE_OPTIONS, log=log)
    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    return wall, cpu, len(cubin), not log


def _process_compile(args):
    source, arch, name = args
    return _compile_one(source, arch, name)


def compile_programs(sources: list[tuple[str, str]], arch: str, workers: int | None = None,
                     mode: str = "auto", progress: bool = False) -> list[CompileRecord]:
    """Compile (source, kernel name) pairs with NVRTC into the disk cache, in parallel.

    Threads when cuda-bindings releases the GIL around NVRTC (it does from 12.9 on; NVRTC
    itself is thread-safe), else processes. A program already cached costs a file read.
    """
    unique: dict[str, int] = {}  # the same source twice would race on one cache file
    for i, (src, _) in enumerate(sources):
        unique.setdefault(src, i)
    if len(unique) < len(sources):
        firsts = sorted(unique.values())
        recs = compile_programs([sources[i] for i in firsts], arch, workers, mode, progress)
        by_src = {sources[i][0]: r for i, r in zip(firsts, recs)}
        return [by_src[src] if i == unique[src] else CompileRecord(name, 0.0, 0.0, by_src[src].cubin_bytes, True,
                                                                   by_src[src].error)
                for i, (src, name) in enumerate(sources)]
    workers = workers or max(1, min(len(sources), os.cpu_count() or 1))
    if mode == "auto":
        mode = "thread" if _gil_released_by_nvrtc() else "process"
    records: list[CompileRecord | None] = [None] * len(sources)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(sources), desc=f"NVRTC ({workers} {mode}s)", unit="kernel", leave=False)
        except ImportError:  # the GPU machine may lack it; a bar is a nicety
            bar = None

    def done(i, result=None, error=""):
        if result is None:
            records[i] = CompileRecord(sources[i][1], 0.0, 0.0, 0, False, error)
        else:
            wall, cpu, size, cached = result
            records[i] = CompileRecord(sources[i][1], wall, cpu, size, cached)
        if bar is not None:
            bar.update(1)

    if mode == "process" and len(sources) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_process_compile, (src, arch, name)): i for i, (src, name) in enumerate(sources)}
            for fut, i in futs.items():
                try:
                    done(i, fut.result())
                except Exception as exc:
                    done(i, error=f"{type(exc).__name__}: {exc}"[:2000])
    else:
        def job(i):
            src, name = sources[i]
            try:
                done(i, _compile_one(src, arch, name))
            except Exception as exc:
                done(i, error=f"{type(exc).__name__}: {exc}"[:2000])

        if workers == 1 or len(sources) == 1:
            for i in range(len(sources)):
                job(i)
        else:
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(job, range(len(sources))))
    if bar is not None:
        bar.close()
    return [r for r in records if r is not None]


# --------------------------------------------------------------------------------------------
# Launching a generated kernel
# --------------------------------------------------------------------------------------------

class GeneratedKernel:
    """A compiled program, launchable on torch tensors on PyTorch's current stream."""

    def __init__(self, program: Program, device=None, source: str | None = None):
        import torch

        from ..nvrtc import Kernel

        self.program = program
        src, name = (source, program.name) if source is not None else render_cuda(program)
        self.kernel = Kernel(src, name, device, options=COMPILE_OPTIONS, filename=name + ".cu")
        self.device = self.kernel.device
        self.torch_dtype = torch.float16 if program.dtype == "fp16" else torch.float32
        self._zeros = None

    def zeros_needed(self) -> int:
        geo = self.program.geometry
        return geo.in_image_elems if geo.needs_zero_buffer else 0

    def output_shape(self, x) -> tuple[int, ...]:
        geo = self.program.geometry
        if geo.kind == "conv":
            return (x.shape[0], geo.M, geo.oh, geo.ow)
        if geo.kind == "spmm":
            return (geo.M, geo.n)
        return (x.shape[0], geo.M)

    def __call__(self, x, out=None, residual=None, zeros=None):
        import torch

        geo, prog = self.program.geometry, self.program
        if x.dtype != self.torch_dtype or not x.is_contiguous():
            raise ValueError(f"{prog.name} takes contiguous {self.torch_dtype} input, got {x.dtype}")
        if geo.kind == "conv":
            if tuple(x.shape[1:]) != (geo.cin, geo.h, geo.w):
                raise ValueError(f"{prog.name} was generated for input [*, {geo.cin}, {geo.h}, {geo.w}], "
                                 f"got {tuple(x.shape)}")
            batch, ncols = x.shape[0], geo.cols
        elif geo.kind == "spmm":
            if tuple(x.shape) != (geo.K, geo.n):
                raise ValueError(f"{prog.name} was generated for B [{geo.K}, {geo.n}], got {tuple(x.shape)}")
            batch, ncols = 1, geo.n
        else:
            if x.dim() != 2 or x.shape[1] != geo.K:
                raise ValueError(f"{prog.name} takes X [n, {geo.K}], got {tuple(x.shape)}")
            batch, ncols = 1, x.shape[0]
        if prog.vector_loads and x.data_ptr() % (prog.config.vec * x.element_size()):
            raise ValueError(f"{prog.name} uses {prog.config.vec}-wide loads: input must be aligned")
        if out is None:
            out = torch.empty(self.output_shape(x), device=x.device, dtype=x.dtype)
        if prog.residual:
            if residual is None or residual.shape != out.shape or residual.dtype != out.dtype:
                raise ValueError(f"{prog.name} needs a residual shaped like its output {tuple(out.shape)}")
            residual = residual.contiguous()
        if geo.needs_zero_buffer:
            if zeros is None:
                if self._zeros is None:
                    self._zeros = torch.zeros(geo.in_image_elems, device=x.device, dtype=x.dtype)
                zeros = self._zeros
            elif zeros.numel() < geo.in_image_elems:
                raise ValueError("zero buffer too small")
        grid = prog.grid(batch)
        if geo.kind == "gemm":
            tile = 32 * prog.config.warps_n * prog.config.vec
            grid = (grid[0], max(1, math.ceil(ncols / tile)), 1)
        if ncols == 0:
            return out
        self.kernel(grid, (prog.config.threads,), x, out, residual, zeros, int(ncols))
        return out


class EmulatedKernel:
    """A program run by `interpret` on the CPU, with GeneratedKernel's call signature.

    Lets the runtime's planning, choosing and saving run in CI without a GPU; never fast.
    """

    def __init__(self, program: Program):
        import torch

        self.program = program
        self.torch_dtype = torch.float16 if program.dtype == "fp16" else torch.float32

    def zeros_needed(self) -> int:
        return 0

    def __call__(self, x, out=None, residual=None, zeros=None):
        import torch

        res = residual.detach().cpu().double().numpy() if residual is not None else None
        y = interpret(self.program, x.detach().cpu().double().numpy(), res)
        y = torch.from_numpy(np.ascontiguousarray(y)).to(x.device, x.dtype)
        if out is not None:
            out.copy_(y)
            return out
        return y


# --------------------------------------------------------------------------------------------
# Tuning cache: the per-layer winner, kept beside the kernel cache
# --------------------------------------------------------------------------------------------

_tuning_lock = threading.Lock()


def tuning_cache_path() -> Path:
    from ..nvrtc import cache_dir

    return cache_dir().parent / "sparsert-tuning.json"


def tuning_key(key: str, arch: str, dtype: str, batch: int, extra: str = "") -> str:
    return f"{key[:32]}|{arch}|{dtype}|b{batch}{('|' + extra) if extra else ''}"


def load_tuning() -> dict:
    p = tuning_cache_path()
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def store_tuning(entries: dict) -> None:
    """Merge `entries` into the tuning cache (atomic replace; a read-only cache is skipped)."""
    if not entries:
        return
    from ...common.fileio import write_text_atomic

    with _tuning_lock:
        data = load_tuning()
        data.update(entries)
        try:
            tuning_cache_path().parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(tuning_cache_path(), json.dumps(data, indent=1, sort_keys=True))
        except Exception:
            pass
