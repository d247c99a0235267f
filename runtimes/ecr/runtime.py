"""The conv-pool runtime `ecr`: convolutions that skip the zeros of their input feature map.

Conv_Pool (Xu, Fan, Yu, Fu, arXiv:1909.09927): after a ReLU most inputs of a deep conv layer
are zero. ECR compresses each output position's im2col row to its non-zeros; PECR does the
same per pooling window and fuses the max-pool, so the conv output never reaches memory.

- `rewrite`: the `fuse_ecr` pass (Conv -> Relu -> MaxPool => sparsecnn::EcrConvPool,
  Conv -> Relu => sparsecnn::EcrConv; schemas in passes/ecr/reference.py and docs/ops.md).
- `compile`: on CUDA the ops run the NVRTC kernels of cuda/ecr_conv.cu, which build the
  compressed rows on the fly from the dense NCHW feature map (fp32, or fp16 with fp32
  accumulation). Each layer's candidates are its kernel variants (tile shape, output channels
  per block, K chunk, split-K) and its dense forms (runtimes/torch/dense_conv.py's engines with
  the ReLU and max-pool the op fuses); the one chooser (runtimes/chooser.py) checks each on the
  layer's real input from calibration images, times the correct ones interleaved in CUDA
  graphs, and keeps a variant only where it beats the best dense form by the margin. Input
  sparsity decides the winner, so calibrate on data like the data you will run
  (`calibration=` tensor); without it a random input is used and the report says so. On CPU
  the plain-PyTorch reference ops run (slow, for checking only).

On GPU the first run at an input shape is the base Engine's whole-graph guard: the network as
the layers chose, all dense and uniformly on cuDNN NCHW / NHWC, timed interleaved; a slower
ECR engine falls back (half its ECR layers, then all) and `engine.plans` says so. Decisions and
plans are saved in the engine file and replayed on reload.

extra options: `ecr_layers` = "auto" (measure, default) | "sparse" (the fastest correct variant,
even if dense is faster; guard off unless `guard` is given) | "dense"; `ecr_reps` timing
repetitions per candidate (default: choose_reps, 30); `choose_margin`; `guard` (default True;
`whole_network_check` is its older name); `batch` calibration batch when no calibration input
is given (default 1); `dense_conv` for layers left dense (default "best" on GPU).
"""
from __future__ import annotations

import ctypes
import math
import warnings
from dataclasses import dataclass, field

import onnx
import torch

from ...common.errors import UserError
from ...passes.ecr.rewrite import fuse_ecr
from ...passes.graph import SPARSECNN_DOMAIN, run_pipeline
from ..base import CompileOptions, Engine, calibration_input, with_saved_decisions
from ...passes.ecr.reference import (ECR_CONV, ECR_CONV_POOL, ConvGeometry, PoolGeometry, conv_geometry, max_pool,  # noqa: F401
                                     pool_geometry)
from ..executor import Executor
from ..ops import NodeContext
from ..options import DENSE_CONV, SHARED_OPTIONS, Option, with_default

name = "ecr"
OPTIONS = [
    *[o for o in SHARED_OPTIONS if o is not DENSE_CONV],
    with_default(DENSE_CONV, "best", "how layers left dense run their Conv (default best on GPU: per layer the "
                 "fastest, measured; the CPU reference path runs cudnn)"),
    Option("ecr_layers", str, "auto", "auto: the chooser keeps a kernel variant where it beats the layer's best dense "
           "form; sparse: the fastest correct variant even if dense is faster (guard off unless set); dense",
           choices=("auto", "sparse", "dense")),
    Option("ecr_reps", int, 30, "timing repetitions per candidate (overrides choose_reps)", minimum=1),
    Option("whole_network_check", bool, True, "older name of `guard` (the base whole-graph guard)"),
    Option("batch", int, 1, "calibration batch when no calibration input is given", minimum=1),
    Option("ecr_plain_conv", bool, True, "rewrite also a Conv with a sparse input but no Relu after it (e.g. "
           "before a residual Add) into EcrConv"),
]
KERNEL_SOURCE = "ecr_conv.cu"


def available() -> tuple[bool, str]:
    try:
        from ..nvrtc import nvrtc_available

        ok, why = nvrtc_available()
    except Exception as exc:  # never raises
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if torch.cuda.is_available() and ok:
        from ..nvrtc import device_kernel_notes

        return True, f"ECR/PECR kernels on {torch.cuda.get_device_name(0)} ({why}); {device_kernel_notes('ecr')}"
    if torch.cuda.is_available():
        return False, f"CUDA GPU present but NVRTC unusable ({why}); `pip install 'sparsecnn[gpu]'`"
    return True, "CPU only: the reference ECR/PECR ops (slow; for checking results)"


def rewrite(model: onnx.ModelProto, options: CompileOptions | dict | None = None) -> onnx.ModelProto:
    # runtime settings live in CompileOptions.extra (where the CLI puts --option), not at the top level
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    model, _ = run_pipeline(model, [(fuse_ecr, {"plain_conv": bool(opts.extra.get("ecr_plain_conv", True))})])
    return model


# --- kernel variants and per-layer plans ---------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A template instantiation: VEC output channels per lane (CT = 32*VEC per block), PPW
    conv positions per warp (RMAX = PPW*WARPS per block), GROUP positions whose compressed
    rows are walked together (1, or the union of 2-4: each weight row read once for all; G = 3
    packs 3 values and k in one 16-byte entry).

    kind "warp" (`ecr_conv_pool`): each warp builds its positions' rows with ballots and
    broadcasts every non-zero by shuffle while it multiplies. kind "list" (`ecr_list_conv_pool`):
    the warp writes a group's compressed row of the K chunk to shared memory first, then a
    multiply-only loop reads its {values, k} entries; the next chunk's patch is prefetched
    through PREFETCH registers per thread while the current one is multiplied. kind "row"
    (`ecr_row_conv_pool`, 3x3 kernels at stride 1 along x): GROUP is the conv columns of a
    warp row, PPW / GROUP the rows of a warp; one ballot per input row gives its non-zero
    columns, and the weights of a (channel, kernel row) sit in registers while the warp walks
    the non-zeros of its rows."""

    vec: int
    ppw: int
    group: int = 1
    warps: int = 8
    kind: str = "warp"
    prefetch: int = 4
    scan: int = 1  # kind "row": 1 test every column, 2 every pair of columns first, 4 quads, then pairs
    share_rows: bool = False  # kind "row", 3x3 at stride 1: walk each input row once for all conv rows it serves

    @property
    def ct(self) -> int:
        return 32 * self.vec

    @property
    def rmax(self) -> int:
        return self.ppw * self.warps

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def rows(self) -> int:
        """kind "row": conv rows per warp"""
        return self.ppw // self.group

    def expr(self, half: bool) -> str:
        t = "__half" if half else "float"
        if self.kind == "row":
            return (f"ecr_row_conv_pool<{t}, {self.vec}, {self.group}, {self.rows}, {self.warps}, {ROW_KH}, {ROW_KW}, "
                    f"{self.scan}, {'true' if self.share_rows else 'false'}>")
        if self.kind == "list":
            return f"ecr_list_conv_pool<{t}, {self.vec}, {self.ppw}, {self.warps}, {self.group}, {self.prefetch}>"
        return f"ecr_conv_pool<{t}, {self.vec}, {self.ppw}, {self.warps}, {self.group}>"

    def smem_floats(self, kc: int, patch: int) -> int:
        if self.kind == "row":  # two patch buffers of rows of 32 floats, and a row offset per row
            return max(2 * kc * self.ct + 2 * patch + patch // 32, self.ct * (self.rmax + 1))
        main = 2 * kc * self.ct + patch + kc + self.rmax
        if self.kind == "list":  # then one list of kc entries (2 floats for G=1, 4 for G=2, 8 for G=4) per warp
            main = ((main + 3) & ~3) + self.warps * kc * {1: 2, 2: 4, 3: 4, 4: 8}[self.group]
        elif self.group == 4:
            main = ((main + 3) & ~3) + self.warps * 32 * 4
        return max(main, self.ct * (self.rmax + 1))

    def fits(self, patch: int) -> bool:
        """The list kernel fetches a chunk's patch through `prefetch` registers per thread."""
        return self.kind != "list" or patch <= self.prefetch * self.threads


# "warp" variants: the ones that won a layer on the H100 (results/ecr-pecr/); "list" variants:
# VEC x positions per warp x union group, those that fit 128 registers (2 blocks per SM) unspilled
VARIANTS = (Variant(4, 4), Variant(4, 4, 4), Variant(4, 8, 4), Variant(4, 16, 4), Variant(2, 8, 4),
            *(Variant(v, ppw, g, kind="list") for v, ppw, g in
              ((2, 8, 1), (2, 16, 1), (2, 8, 4), (2, 16, 4), (2, 12, 3), (4, 12, 3),
               (4, 8, 1), (4, 8, 4),
               (8, 4, 1), (8, 4, 2), (8, 4, 4), (8, 8, 4))),
            # 16 warps, 2x the positions per block at the same registers per thread: every weight byte
            # brought from L2 serves more positions (weight traffic, not multiplies, bounds the deep
            # layers at high sparsity)
            *(Variant(v, ppw, g, warps=16, kind="list") for v, ppw, g in
              ((2, 16, 1), (2, 16, 4), (2, 12, 3), (4, 8, 4), (8, 8, 4))),
            # "row" variants: VEC x columns x rows per warp (64 accumulators or fewer), scan
            *(Variant(v, cols * rows, cols, warps=warps, kind="row", prefetch=0, scan=scan, share_rows=share)
              for v, cols, rows, warps, scan, share in
              ((2, 16, 1, 8, 1, False), (2, 16, 1, 8, 2, False), (2, 14, 1, 8, 1, False),
               (2, 14, 2, 8, 1, True), (2, 14, 2, 8, 2, True),
               (4, 16, 1, 8, 1, False), (4, 16, 1, 8, 2, False), (4, 14, 1, 8, 1, False),
               (4, 14, 1, 8, 2, False),
               (4, 8, 2, 8, 1, True),
               (8, 8, 1, 8, 1, False), (8, 8, 1, 8, 2, False),
               # 32 accumulators: 3 blocks (24 warps) per SM
               (4, 8, 1, 8, 1, False), (2, 8, 2, 8, 1, True),
               # quads, then pairs, then columns: fewer tests at 80-95 % zeros
               (4, 14, 1, 8, 4, False), (4, 16, 1, 8, 4, False), (2, 14, 2, 8, 4, True),
               (4, 8, 1, 8, 2, False))))
ROW_KH, ROW_KW = 3, 3        # the row kernel's kernel size (3x3, stride 1 along x)
KC_TARGETS = (36, 72)        # window entries per K chunk (4 or 8 channels of a 3x3 kernel)
# list kernels write rows 32 entries at a time: 63 = 7 channels of a 3x3 kernel fills 2 ballots
# (row kernels take the list kernels' chunk sizes and split scales too)
LIST_KC_TARGETS = (36, 63)
# x the split count that gives ~2 blocks per SM; 0: the split count that fills whole waves of
# resident blocks (occupancy from the kernel's registers and the plan's shared memory)
SPLIT_SCALES = (1.0, 2.0)       # warp kernels (as measured on the H100)
LIST_SPLIT_SCALES = (1.0, 0.0)  # list and row kernels
SM_SHARED_BYTES = 228 * 1024  # shared memory per SM (H100, A100-class and Orin: the most a plan counts on)
SM_REGISTERS = 64 * 1024
MAX_CC = 64                  # largest channel chunk; the transposed weight is padded for it
def kernel_programs() -> list[tuple[str, ...]]:
    """The programs KernelSet compiles from KERNEL_SOURCE: one per variant (its fp32 and fp16
    kernels), so they compile in parallel the first time (and `doctor --compile-kernels` fills the
    same cache entries)."""
    return [(v.expr(False), v.expr(True)) for v in VARIANTS]


MAX_CT = max(v.ct for v in VARIANTS)  # output channels of the widest block; W^T rows and bias padded to it


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    kc_target: int
    split_scale: float

    @property
    def name(self) -> str:
        v = self.variant
        split = f"s{self.split_scale:g}" if self.split_scale else "sw"
        if v.kind == "row":
            return (f"row{v.ct}x{v.warps * v.rows}x{v.group}s{v.scan}{'r' if v.share_rows else ''}"
                    f"-k{self.kc_target}-{split}")
        if v.kind == "list":
            return f"list{v.ct}x{v.rmax}g{v.group}-k{self.kc_target}-{split}"
        return f"ecr{v.vec * 32}x{v.rmax}{'u' if v.group == 4 else ''}-k{self.kc_target}-{split}"


CANDIDATES = tuple(Candidate(v, k, s) for v in VARIANTS
                   for k in (KC_TARGETS if v.kind == "warp" else LIST_KC_TARGETS)
                   for s in (SPLIT_SCALES if v.kind == "warp" else LIST_SPLIT_SCALES))
CANDIDATE_BY_NAME = {c.name: c for c in CANDIDATES}

PARAM_FIELDS = ("n_img cin h w cout cout_pad kh kw sh sw pad_t pad_l oh ow pkh pkw psh psw ppad_t ppad_l "
                "qh qw tqy tqx cry crx patch_h patch_w tiles_y tiles_x cc kc chunks chunks_per_split "
                "splits relu pool").split()


class EcrParams(ctypes.Structure):
    """The kernel's `EcrParams`, field for field (all int32)."""

    _fields_ = [(f, ctypes.c_int) for f in PARAM_FIELDS]


@dataclass
class Plan:
    candidate: Candidate
    params: dict
    grid: tuple[int, int, int]
    smem: int
    ws_floats: int
    tickets: int
    cparams: EcrParams = field(repr=False, default=None)

    def describe(self) -> dict:
        p = self.params
        return {"variant": self.candidate.name, "tile": [p["tqy"], p["tqx"]], "conv_region": [p["cry"], p["crx"]],
                "cc": p["cc"], "splits": p["splits"], "grid": list(self.grid), "smem": self.smem}


def _tile(qh: int, qw: int, pk: tuple, g: ConvGeometry, rmax: int, rows: int | None = None,
          cols: int | None = None) -> tuple[int, int]:
    """Outputs per tile (tqy, tqx) whose conv region fits `rmax` positions (and, for the row
    kernel, `rows` x `cols`): fewest tiles, then least recomputed/idle work, then the smallest
    input patch. (0, 0) if not even one output fits. `pk`: pool kernel and stride (kh, kw, sh, sw)."""
    best, best_key = (0, 0), None
    for tqy in range(1, qh + 1):
        cry = (tqy - 1) * pk[2] + pk[0]
        if cry > min(rmax, rows or rmax):
            break
        for tqx in range(1, qw + 1):
            crx = (tqx - 1) * pk[3] + pk[1]
            if cry * crx > rmax or crx > (cols or rmax):
                break
            tiles = -(-qh // tqy) * -(-qw // tqx)
            patch = ((cry - 1) * g.sh + g.kh) * ((crx - 1) * g.sw + g.kw)
            key = (tiles, tiles * cry * crx, patch, -tqx)
            if best_key is None or key < best_key:
                best, best_key = (tqy, tqx), key
    return best


def blocks_per_sm(v: Variant, smem: int, registers: int | None = None) -> int:
    """Resident blocks of `v` per SM with `smem` bytes of dynamic shared memory (1 KB reserved per
    block) and, if known, `registers` per thread (allocated per warp in units of 256)."""
    n = min(64 // v.warps, 32, SM_SHARED_BYTES // (smem + 1024))
    if registers:
        n = min(n, SM_REGISTERS // (-(-registers * 32 // 256) * 256 * v.warps))
    return max(1, n)


def wave_splits(base: int, chunks: int, slots: int) -> int:
    """Split count whose grid fills whole waves of `slots` resident blocks best: time ~ waves x
    (chunks per block + 1, the +1 for a block's fixed work: prologue, epilogue, split-K adds)."""
    best = None
    for s in range(1, min(chunks, 64) + 1):
        per = -(-chunks // s)
        s_eff = -(-chunks // per)
        cost = -(-base * s_eff // slots) * (per + 1)
        if best is None or cost < best[0]:
            best = (cost, s_eff)
    return best[1]


def make_plan(cand: Candidate, g: ConvGeometry, pool: PoolGeometry | None, cout: int, relu: bool,
              sm_count: int, max_smem: int, registers: int | None = None) -> Plan | None:
    """The launch of `cand` for this layer, or None if it does not fit (shared memory).
    `registers`: the kernel's registers per thread, for the occupancy the whole-wave split uses."""
    v = cand.variant
    if pool is not None:
        qh, qw = pool.out_size(g.oh, g.ow)
        pk = (pool.kh, pool.kw, pool.sh, pool.sw, pool.pads[0], pool.pads[1])
    else:
        qh, qw = g.oh, g.ow
        pk = (1, 1, 1, 1, 0, 0)
    if qh <= 0 or qw <= 0 or pk[0] * pk[1] > v.rmax:
        return None
    if v.ct > 64 and v.ct >= 2 * cout:  # half the lanes or more would multiply padding
        return None
    khw = g.kh * g.kw
    cc = max(1, min(g.cin, MAX_CC, round(cand.kc_target / khw)))
    if v.kind == "row" and ((g.kh, g.kw) != (ROW_KH, ROW_KW) or g.sw != 1 or (v.share_rows and g.sh != 1)):
        return None
    rows_cols = (v.warps * v.rows, v.group) if v.kind == "row" else (None, None)
    tqy, tqx = _tile(qh, qw, pk, g, v.rmax, *rows_cols)
    if not tqy:
        return None
    cry, crx = (tqy - 1) * pk[2] + pk[0], (tqx - 1) * pk[3] + pk[1]
    patch_h, patch_w = (cry - 1) * g.sh + g.kh, (crx - 1) * g.sw + g.kw
    # the row kernel keeps each patch row in 32 floats (a warp row's columns, one per lane)
    patch = cc * patch_h * (32 if v.kind == "row" else patch_w)
    kc = cc * khw
    smem = 4 * v.smem_floats(kc, patch)
    if smem > max_smem or not v.fits(patch):
        return None
    tiles_y, tiles_x = -(-qh // tqy), -(-qw // tqx)
    cout_pad = -(-cout // MAX_CT) * MAX_CT
    n_ct = -(-cout // v.ct)  # blocks of CT output channels (the weight rows are padded to MAX_CT)
    chunks = -(-g.cin // cc)
    base = g.n * tiles_y * tiles_x * n_ct
    if cand.split_scale:
        want = max(1, round(2 * sm_count * cand.split_scale / base)) if base < 2 * sm_count * cand.split_scale else 1
        splits = min(chunks, want)
    else:
        splits = wave_splits(base, chunks, sm_count * blocks_per_sm(v, smem, registers))
    per_split = -(-chunks // splits)
    splits = -(-chunks // per_split)
    grid = (g.n * tiles_y * tiles_x, n_ct, splits)
    params = dict(n_img=g.n, cin=g.cin, h=g.h, w=g.w, cout=cout, cout_pad=cout_pad, kh=g.kh, kw=g.kw, sh=g.sh,
                  sw=g.sw, pad_t=g.pads[0], pad_l=g.pads[1], oh=g.oh, ow=g.ow, pkh=pk[0], pkw=pk[1], psh=pk[2],
                  psw=pk[3], ppad_t=pk[4], ppad_l=pk[5], qh=qh, qw=qw, tqy=tqy, tqx=tqx, cry=cry, crx=crx,
                  patch_h=patch_h, patch_w=patch_w, tiles_y=tiles_y, tiles_x=tiles_x, cc=cc, kc=kc, chunks=chunks,
                  chunks_per_split=per_split, splits=splits, relu=int(relu), pool=int(pool is not None))
    ws = grid[0] * n_ct * v.rmax * v.ct if splits > 1 else 0  # one fp32 slot per tile, zero at rest
    plan = Plan(cand, params, grid, smem, ws, grid[0] * n_ct if splits > 1 else 0)
    plan.cparams = EcrParams(**params)
    return plan


def layer_cost(g: ConvGeometry, pool: PoolGeometry | None, cout: int, density: float) -> dict:
    """Work of one layer: dense and skipped-zero multiply-adds, and the bytes the kernels must move."""
    positions = g.positions
    dense_macs = positions * g.k * cout
    return {"positions": positions, "k": g.k, "cout": cout, "dense_macs": dense_macs,
            "sparse_macs": int(dense_macs * density), "input_bytes_fp32": 4 * g.n * g.cin * g.h * g.w,
            "weight_bytes_fp32": 4 * g.k * cout,
            "output_bytes_fp32": 4 * g.n * cout * (math.prod(pool.out_size(g.oh, g.ow)) if pool else g.oh * g.ow),
            "conv_output_bytes_fp32": 4 * positions * cout}


def pack_weights(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [Cout, Cin, kh, kw] -> fp32 W^T [(Cin + MAX_CC)*kh*kw, Cout_pad = Cout rounded up to MAX_CT] (rows read
    coalesced; zero rows past K so any chunk size reads inside it) and the fp32 bias [Cout_pad]."""
    cout, cin, kh, kw = (int(s) for s in w.shape)
    cout_pad = -(-cout // MAX_CT) * MAX_CT
    wt = torch.zeros((cin + MAX_CC) * kh * kw, cout_pad, device=w.device)
    wt[: cin * kh * kw, :cout] = w.float().reshape(cout, -1).t()
    bias = torch.zeros(cout_pad, device=w.device)
    if b is not None:
        bias[:cout] = b.float()
    return wt, bias


# --- device-side state -------------------------------------------------------------------

class Scratch:
    """Split-K workspace and tickets shared by an engine's layers (they run one after another).

    Both are zero at rest: every launch leaves its slots and tickets as it found them. They
    grow at compile time only; a buffer a captured graph uses is never freed while the
    engine lives."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ws = torch.zeros(1, device=device)
        self.tickets = torch.zeros(1, dtype=torch.int32, device=device)
        self._retired: list[torch.Tensor] = []

    def reserve(self, ws_floats: int, tickets: int) -> None:
        if ws_floats > self.ws.numel():
            self._retired.append(self.ws)
            self.ws = torch.zeros(ws_floats, device=self.device)
        if tickets > self.tickets.numel():
            self._retired.append(self.tickets)
            self.tickets = torch.zeros(tickets, dtype=torch.int32, device=self.device)


def _func_attribute(kernel, name: str, default: int) -> int:
    driver = kernel._driver
    err, value = driver.cuFuncGetAttribute(getattr(driver.CUfunction_attribute, name), kernel.function)
    return int(value) if int(err) == 0 else default


def _static_shared_bytes(kernel) -> int:
    return _func_attribute(kernel, "CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES", 1024)


class KernelSet:
    """All variants, compiled (one program per variant, cached on disk) and loaded once per device."""

    _cache: dict = {}

    @classmethod
    def get(cls, device: torch.device) -> "KernelSet":
        key = (device.type, device.index or 0)
        if key not in cls._cache:
            cls._cache[key] = cls(device)
        return cls._cache[key]

    def __init__(self, device: torch.device):
        from ..nvrtc import Kernel, compile_groups, device_arch, load_source

        self.device = device
        source = load_source(KERNEL_SOURCE)
        groups = dict(zip(VARIANTS, kernel_programs()))
        compile_groups(source, device_arch(device), KERNEL_SOURCE, list(groups.values()))
        props = torch.cuda.get_device_properties(device)
        self.sm_count = props.multi_processor_count
        optin = int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
        self.kernels = {}
        static = 0
        for v in VARIANTS:
            for half in (False, True):
                k = Kernel(source, v.expr(half), device, name_expressions=groups[v], filename=KERNEL_SOURCE)
                static = max(static, _static_shared_bytes(k))
                self.kernels[(v, half)] = k
        # dynamic + static shared memory must fit the opt-in limit
        self.max_smem = optin - static
        # registers per thread of each variant (the larger of fp32 / fp16), for occupancy
        self.registers = {v: max(_func_attribute(self.kernels[(v, h)], "CU_FUNC_ATTRIBUTE_NUM_REGS", 0)
                                 for h in (False, True)) or None for v in VARIANTS}
        for k in self.kernels.values():
            k.set_max_dynamic_shared(self.max_smem)

    def launch(self, plan: Plan, x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
               scratch: Scratch) -> None:
        v = plan.candidate.variant
        k = self.kernels[(v, x.dtype == torch.float16)]
        k(plan.grid, (v.threads,), x, wt, bias, y, scratch.ws, scratch.tickets, plan.cparams, shared=plan.smem)


class EcrLayer:
    """One conv (+ max-pool) layer's kernels: packed weights, per-shape plans, launches."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, attrs: dict, pool: PoolGeometry | None,
                 relu: bool, scratch: Scratch, kernels: "KernelSet | None" = None):
        self.attrs = dict(attrs)
        self.pool = pool
        self.relu = pool is not None or relu
        self.cout, self.cin = int(weight.shape[0]), int(weight.shape[1])
        self.wt, self.bias = pack_weights(weight, bias)
        self.scratch = scratch
        self.kernels = kernels if kernels is not None else KernelSet.get(weight.device)
        self._plans: dict[tuple, Plan | None] = {}

    def geometry(self, x: torch.Tensor) -> ConvGeometry:
        return conv_geometry(self.attrs, x.shape)

    def plan(self, cand: Candidate, x: torch.Tensor) -> Plan | None:
        key = (tuple(x.shape), cand.name)
        if key not in self._plans:
            g = self.geometry(x)
            plan = make_plan(cand, g, self.pool, self.cout, self.relu, self.kernels.sm_count, self.kernels.max_smem,
                             self.kernels.registers.get(cand.variant))
            if plan is not None:
                self.scratch.reserve(plan.ws_floats, plan.tickets)
            self._plans[key] = plan
        return self._plans[key]

    def out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        g = self.geometry(x)
        oh, ow = self.pool.out_size(g.oh, g.ow) if self.pool else (g.oh, g.ow)
        return (g.n, self.cout, oh, ow)

    def run_candidate(self, cand: Candidate, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the ECR kernels take fp32 or fp16 feature maps, not {x.dtype}")
        plan = self.plan(cand, x)
        if plan is None:
            raise ValueError(f"{cand.name} does not fit this layer")
        x = x.contiguous()
        y = torch.empty(self.out_shape(x), device=x.device, dtype=x.dtype)
        self.kernels.launch(plan, x, self.wt, self.bias, y, self.scratch)
        return y

    def candidates(self, x: torch.Tensor) -> list[Candidate]:
        if x.dtype not in (torch.float32, torch.float16):  # the kernels read fp32 or fp16 feature maps
            return []
        out, seen = [], set()
        for c in CANDIDATES:  # candidates whose launches would be identical are timed once
            plan = self.plan(c, x)
            if plan is None:
                continue
            key = (c.variant, tuple(sorted(plan.params.items())), plan.grid)
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out


def kernel_candidates(layer: EcrLayer, x: torch.Tensor, after=None, include: str | None = None) -> list:
    """The layer's kernel variants whose plan fits `x`, as the one chooser's candidates
    `fn(x, *rest)` (library "ecr"); `after(y, *rest)`: what the group does after the kernel
    (e.g. a residual add and ReLU, for a runtime planning over fused groups); `include`: a saved
    variant, kept even where another variant's launch is identical at this shape."""
    from ..chooser import Candidate as Choice

    variants = layer.candidates(x)
    if include in CANDIDATE_BY_NAME and include not in {c.name for c in variants} \
            and layer.plan(CANDIDATE_BY_NAME[include], x) is not None:
        variants.append(CANDIDATE_BY_NAME[include])
    out = []
    for cand in variants:
        if after is None:
            fn = (lambda t, *rest, c=cand: layer.run_candidate(c, t))
        else:
            fn = (lambda t, *rest, c=cand: after(layer.run_candidate(c, t), *rest))
        out.append(Choice(cand.name, fn, dense=False, library="ecr",
                          detail={"kernel": f"{KERNEL_SOURCE}:{cand.name}", "config": layer.plan(cand, x).describe()},
                          buffers=[layer.wt, layer.bias]))
    return out


class EcrOp:
    """One EcrConv / EcrConvPool node on CUDA: its kernel variants and its dense forms as the one
    chooser's candidates. `choose(x)` decides on the layer's real input (calibration images run
    through the network: input sparsity decides the winner) and returns the executor step, a
    chooser.Switch the whole-graph guard can still send back to dense."""

    def __init__(self, ctx: NodeContext, scratch: Scratch, kernels: "KernelSet | None" = None):
        from ..torch.dense_conv import DenseConv

        self.ctx = ctx
        self.name = ctx.name
        self.attrs = dict(ctx.attrs)
        self.pool = pool_geometry(self.attrs) if ctx.node.op_type == ECR_CONV_POOL else None
        self.relu = self.pool is not None or bool(self.attrs.get("relu", 1))
        w, b = ctx.const(1), ctx.const(2)
        if w is None or (len(ctx.node.input) > 2 and ctx.node.input[2] and b is None):
            raise NotImplementedError("the weight and bias must be constants")
        self.layer = EcrLayer(w, b, self.attrs, self.pool, self.relu, scratch, kernels)
        pads = tuple(int(p) for p in self.attrs.get("pads", [0, 0, 0, 0]))
        self.dense = DenseConv(ctx.name, w, self.attrs.get("strides", [1, 1]), (1, 1), 1, lambda t: pads, "best", {},
                               ctx.options)
        self.bias = b
        ctx.inputs_used = [0]  # the weights live in the op (packed for the kernels, and as the dense forms')
        ctx.info.update(format="pecr" if self.pool else "ecr", buffers=[self.layer.wt, self.layer.bias])

    def _epilogue(self, y: torch.Tensor) -> torch.Tensor:
        """What the fused op also does after the conv: ReLU (and the max-pool of PECR)."""
        if self.relu:
            y = torch.relu(y)
        return max_pool(y, self.pool) if self.pool is not None else y

    def candidates(self, x: torch.Tensor, sparse: bool = True, include: str | None = None) -> list:
        """The layer's dense forms (`dense:<mode>`, conv + ReLU [+ max-pool]) and, with `sparse`,
        every kernel variant whose plan fits this input (`include`: a saved variant, kept even
        where another variant's launch is identical at this input's shape)."""
        out = self.dense.dense_candidates(x, self.bias, epilogue=lambda y, *rest: self._epilogue(y))
        for c in out:
            c.buffers = [self.dense.w] + ([self.bias] if self.bias is not None else [])
        return out + (kernel_candidates(self.layer, x, include=include) if sparse else [])

    def choose(self, x: torch.Tensor, chooser, saved: dict | str | None = None, dense_only: bool = False):
        """The executor step for this layer, decided by `chooser` on `x` (or replayed from `saved`:
        a Decision dict, or an older engine's variant name / "dense")."""
        from ..chooser import Switch

        forced = None
        if isinstance(saved, str):  # engines saved before the one chooser: name -> variant or "dense"
            dense_only = dense_only or saved == "dense"
            forced, saved = (None if saved == "dense" else saved), None
            if forced is not None and forced not in CANDIDATE_BY_NAME:
                raise UserError(f"saved engine names kernel variant '{forced}' that this sparsecnn does not have; "
                                "rebuild the engine")
        wanted = forced if forced is not None else (saved or {}).get("chosen")
        candidates = self.candidates(x, sparse=not dense_only, include=wanted)
        decision = chooser.choose(self.name, candidates, (x,), reference="dense:cudnn", saved=saved, forced=forced)
        if dense_only and decision.how == "measured" and not decision.reason.startswith("every"):
            decision.reason = "ecr_layers=dense (" + decision.reason + ")"
        sw = Switch(decision, candidates, self.ctx.info, describe=self._describe)
        self._describe(sw, x)
        return sw

    def _describe(self, sw, x: torch.Tensor | None = None) -> None:
        """The per-layer report: input sparsity, what runs, every candidate's time, what was rejected
        (again after the whole-graph guard switches the layer: `x` None)."""
        d, cand, info = sw.decision, sw.candidates[sw.active], self.ctx.info
        if x is not None:
            sparsity = float((x == 0).float().mean())
            info.update(sparsity=round(sparsity, 4), input_sparsity=round(sparsity, 4))
        sparsity = info.get("input_sparsity", 0.0)
        if d.times_ms:
            info["times_ms"] = {k: round(v, 4) for k, v in d.times_ms.items()}
        if d.rejected:
            info["rejected"] = dict(d.rejected)
        if cand.dense:
            info.update(format="dense", kernel=cand.detail.get("kernel", cand.name)
                        + (" + relu" if self.relu else "") + (" + maxpool" if self.pool else ""),
                        reason=(info.get("choice", {}).get("why") if sw.active != d.chosen else None)
                        or (f"{d.reason} at input sparsity {sparsity:.2f}" if d.times_ms else d.reason))
        else:
            info.update(format="pecr" if self.pool else "ecr", kernel=cand.detail["kernel"],
                        config=cand.detail["config"])
            info.pop("reason", None)
        info["buffers"] = cand.buffers

    def __call__(self, x, w=None, b=None):  # before `choose` (not reached by a compiled engine): dense
        return self._epilogue(self.dense.run_mode("cudnn", x, self.bias))


# --- engine --------------------------------------------------------------------------------

class EcrEngine(Engine):
    """The whole-graph guard is the base Engine's (runtimes/base.py): with the per-layer choices,
    all dense and uniformly on cuDNN NCHW / NHWC, the fastest graph kept, `plans` says why."""

    runtime = name

    def __init__(self, *args, ops: dict | None = None, chooser=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ecr_ops: dict[str, EcrOp] = dict(ops or {})  # step name -> its op (the step itself becomes a Switch)
        self.chooser = chooser

    @property
    def whole_network(self) -> dict:
        """The whole-graph plans per input shape (the older name of `plans`)."""
        return self.plans

    def guard_on(self) -> bool:
        extra = self.options.extra
        # ecr_layers=sparse means the ECR kernels, as is (the library's own answer): no guard unless asked
        default = extra.get("whole_network_check", extra.get("ecr_layers", "auto") != "sparse")
        return bool(extra.get("guard", default))

    def calibrate(self, *inputs: torch.Tensor, saved: dict | None = None) -> list[dict]:
        """Choose every ECR layer's implementation on `inputs` run through the network (each layer
        sees the activations its predecessors produce); `saved`: decisions to replay instead."""
        dense_only = self.options.extra.get("ecr_layers", "auto") == "dense"
        rows = []

        def before(step, args):
            op = self.ecr_ops.get(step.name)
            if op is not None:
                step.fn = op.choose(args[0], self.chooser, (saved or {}).get(op.name), dense_only)
                rows.append({"name": step.name, **step.fn.decision.report()})

        self.walk_to_choose(inputs, before, replaying=saved is not None)
        return rows


def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None, calibration: torch.Tensor | None = None) -> EcrEngine:
    """An engine for a model rewritten by `rewrite` (other models run, with no ECR layer)."""
    from ..reference_ops import reference_ops

    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    dev = torch.device(device)
    if dev.type != "cuda":
        ex = Executor(model, dev, opts.dtype, ops=reference_ops(), channels_last=opts.channels_last, options=opts.extra)
        return EcrEngine(model, dev, opts, ex)
    return compile_with_kernels(model, dev, opts, state, calibration, KernelSet.get(dev))


def compile_with_kernels(model: onnx.ModelProto, device, options: CompileOptions | dict | None = None,
                         state: dict | None = None, calibration: torch.Tensor | None = None,
                         kernels=None) -> EcrEngine:
    """compile() with an explicit kernel set: the CPU tests pass a stand-in to run the GPU path's
    choices (the one chooser, the base guard, saved decisions) on CPU tensors."""
    from ..chooser import MARGIN, Chooser
    from ..reference_ops import reference_ops

    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    dev = torch.device(device)
    opts.extra.setdefault("dense_conv", "best")  # layers left dense: the best dense engine's per-layer choice
    mode = str(opts.extra.get("ecr_layers", "auto"))
    if mode not in ("auto", "sparse", "dense"):
        raise UserError(f"ecr_layers must be auto, sparse or dense, not '{mode}'")
    reps = int(opts.extra.get("ecr_reps", opts.extra.get("choose_reps", 30)))
    scratch = Scratch(dev)

    def builder(ctx: NodeContext):
        return EcrOp(ctx, scratch, kernels)

    table = {**reference_ops(), (SPARSECNN_DOMAIN, ECR_CONV): builder, (SPARSECNN_DOMAIN, ECR_CONV_POOL): builder}
    ex = Executor(model, dev, opts.dtype, ops=table, channels_last=opts.channels_last,
                  options=with_saved_decisions(opts.extra, state))
    ops = {s.name: s.fn for s in ex.steps if isinstance(s.fn, EcrOp)}
    chooser = Chooser(dev, ex.dtype, tf32=opts.tf32, reps=reps,
                      margin=float(opts.extra.get("choose_margin", MARGIN)),
                      policy="sparse" if mode == "sparse" else "measure")
    engine = EcrEngine(model, dev, opts, ex, ops=ops, chooser=chooser)
    saved = (state or {}).get("choices") or {}
    if not ops:
        return engine
    if calibration is None and all(op.name in saved for op in ops.values()):
        # replayed, not re-timed: any input of the calibration shape gives the candidates to match them with
        engine.calibrate(calibration_input(model, int(opts.extra.get("batch", 1))), saved=saved)
        return engine
    if calibration is None:
        calibration = calibration_input(model, int(opts.extra.get("batch", 1)))
        for op in ops.values():
            op.ctx.info["calibration"] = "random input (no calibration images given)"
        warnings.warn("ecr: kernels chosen on a random input; pass calibration images for real activation sparsity")
    engine.calibrate(calibration)
    return engine
