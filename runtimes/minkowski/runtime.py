"""MinkowskiEngine runtime: feature maps as sparse tensors, convolution as gather-GEMM-scatter.

MinkowskiEngine (ME, NVIDIA, 0.5.4) keeps a tensor as coordinates of its *active sites*
plus one feature row per site, and runs a convolution as, for each kernel offset, a
gather of input rows, a GEMM with that offset's weight slice and a scatter-add into the
output rows; which input row feeds which output row is the *kernel map*, built from a hash
map of coordinates. Build ME with `python scripts/build_minkowski.py` (see its --help).

How an ONNX model runs here (DESIGN contract 3; no rewrite: ME takes the dense-with-zeros
model as it is):

- A feature map becomes a `SparseMap`: active sites are the pixels where any channel is
  non-zero (after a ReLU, the sites where the ReLU left something), coordinates
  (batch, row * stride, col * stride) in ME's convention, features [sites, channels].
- Conv -> ME convolution with the ONNX weight mapped to ME's [kernel volume, Cin, Cout]
  layout. ME enumerates a k_h x k_w kernel with the *first* spatial coordinate fastest
  (kernel index = kh + k_h * kw), centred for odd sizes; `me_kernel` does that mapping
  and tests/test_minkowski.py checks it against F.conv2d.
- Output sites are chosen so the result equals the dense convolution: a *generative*
  convolution whose output sites are every position whose receptive window holds an
  active input site (the dense occupancy max-pooled with the conv's own window, stride,
  padding and dilation), or every position when the conv has a non-zero bias (there the
  dense conv is non-zero everywhere). ME's own choices would differ from the dense model:
  submanifold (output sites = input sites) drops the values a dense conv spreads into
  neighbours, and ME's strided default keeps only positions whose stride cell holds an
  input site; both are available as `extra={"sites": "submanifold"}` to measure by how
  much they change the output, never as the default.
- ReLU applies to the features and then prunes sites whose features all became zero
  (`sites="relu"`, the default); `sites="generative"` keeps them (fewer coordinate maps,
  more GEMM rows).
- MaxPool -> ME max pooling (on non-negative input, where a window's missing sites are
  the zeros the dense map holds), AveragePool -> ME sum pooling divided by the dense
  window count, GlobalAveragePool -> a per-image sum of the site features.
- Add of two maps on the same sites adds features; with a skip path of another sparsity
  (ResNet's shortcuts) both sides go back to dense. Flatten, Gemm and every other op run
  dense (the shared executor's torch ops), with the reason in the per-layer report.

Each Conv is a chooser.Switch (runtimes/chooser.py) of ME's convolution and the layer's dense
forms, policy "sparse": ME runs wherever the one chooser's check finds it right on the first
input the layer gets, so the engine "as is" (`unguarded_runner`, `guard=false`) is
MinkowskiEngine, the honest answer `bench` reports. The guarded engine (the default) times the
network with ME against all dense and falls back to dense where ME is slower (measured 4-75x
slower per layer), saying so in `engine.plans`.

ME 0.5.4 dispatches float and double only, so the engine runs fp32. Each forward builds
its own coordinate maps and kernel maps (the input's active sites change with every
image), so there is no CUDA graph: the coordinate bookkeeping syncs with the host.
`MinkowskiEngineRuntimeEngine.profile_layers` times per layer the coordinate bookkeeping,
the kernel-map build and the convolution proper.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
import torch.nn.functional as F

from ...common.errors import UserError
from ..base import CompileOptions, Engine
from ..chooser import Candidate, Switch
from ..executor import Executor
from ..ops import STANDARD_OPS, NodeContext, resolve_pads
from ..options import SHARED_OPTIONS, Option
from ..torch.dense_conv import DenseConv

name = "minkowski"
ME_VERSION = "0.5.4"
SITE_MODES = ("relu", "generative", "submanifold")
OPTIONS = [
    *SHARED_OPTIONS,
    Option("sites", str, "relu", "output sites: relu (exact, ReLU prunes sites), generative (exact, keeps them), "
           "submanifold (ME's own rule, inexact: for comparison)", choices=SITE_MODES),
    Option("algorithm", str, "speed", "MinkowskiEngine's coordinate manager: speed or memory (memory-efficient)",
           choices=("speed", "memory")),
]
BUILD_HINT = ("build it with `python scripts/build_minkowski.py` (CPU: needs `apt-get install -y "
              "libopenblas-dev`; CUDA: needs nvcc and a GPU toolchain), or install a wheel it built "
              "with `pip install --no-deps PATH.whl`")


def _me():
    import warnings

    with warnings.catch_warnings():  # ME warns at import when it is a CPU-only build
        warnings.simplefilter("ignore")
        import MinkowskiEngine as ME  # heavy, and absent on most machines: imported only here
    return ME


def _backend():
    _me()
    from MinkowskiEngineBackend import _C  # the C++ extension: functions and enums

    return _C


def available() -> tuple[bool, str]:
    """(True, 'MinkowskiEngine 0.5.4, CUDA build ...') or (False, why and how to build it); never raises."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ME = _me()
            from MinkowskiEngineBackend import _C
    except Exception as exc:  # ImportError, or an OSError of a wheel built for another torch
        return False, f"MinkowskiEngine is not importable ({type(exc).__name__}: {str(exc)[:160]}); {BUILD_HINT}"
    try:
        cuda_build = bool(_C.is_cuda_available())
    except Exception:
        cuda_build = False
    if cuda_build:
        where = "CUDA build" + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                                else "; no GPU here, runs on --device cpu")
    else:
        where = "CPU-only build" + ("; the GPU is not used by it (rebuild on a machine with nvcc for CUDA)"
                                    if torch.cuda.is_available() else "")
    return True, f"MinkowskiEngine {getattr(ME, '__version__', '?')}, {where}"


def backend_fn(name: str, like: torch.Tensor):
    """ME's C++ function `name` + CPU/GPU for tensors on `like`'s device (e.g. ConvolutionForwardGPU)."""
    from MinkowskiEngineBackend import _C

    return getattr(_C, name + ("GPU" if like.is_cuda else "CPU"))


def cuda_build() -> bool:
    try:
        from MinkowskiEngineBackend import _C

        return bool(_C.is_cuda_available())
    except Exception:
        return False


def rewrite(model: onnx.ModelProto, options: dict | None = None) -> onnx.ModelProto:
    """No passes: ME reads the dense-with-zeros ONNX model directly (weights stay dense)."""
    return model


# ----------------------------------------------------------------------------------------------
# Sparse feature maps and the per-engine state they share
# ----------------------------------------------------------------------------------------------

class _Recorder:
    """Per-layer phase times of one forward when profiling; a no-op otherwise."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = False
        self.marks: list[tuple[str, str, Any, Any]] = []

    @contextmanager
    def phase(self, layer: str, phase: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.marks.append((layer, phase, start, end))

    def collect(self) -> dict[tuple[str, str], float]:
        """{(layer, phase): ms} of the marks since the last collect (sums repeated phases)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out: dict[tuple[str, str], float] = {}
        for layer, phase, start, end in self.marks:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            out[(layer, phase)] = out.get((layer, phase), 0.0) + ms
        self.marks = []
        return out


@dataclass
class _State:
    """What the steps of one engine share: the device, the site mode, the profiler."""

    device: torch.device
    sites: str
    recorder: _Recorder
    algorithm: str = "speed"

    def new_space(self) -> "_Space":
        ME = _me()
        if self.device.type == "cuda":
            algo = (ME.MinkowskiAlgorithm.SPEED_OPTIMIZED if self.algorithm == "speed"
                    else ME.MinkowskiAlgorithm.MEMORY_EFFICIENT)
            manager = ME.CoordinateManager(D=2, coordinate_map_type=ME.CoordinateMapType.CUDA,
                                           allocator_type=ME.GPUMemoryAllocatorType.PYTORCH,
                                           minkowski_algorithm=algo)
        else:
            manager = ME.CoordinateManager(D=2, coordinate_map_type=ME.CoordinateMapType.CPU)
        return _Space(manager)


class _Space:
    """One ME coordinate manager: every map derived from one dense->sparse conversion lives here."""

    def __init__(self, manager):
        self.manager = manager
        self.count = 0

    def insert(self, idx: torch.Tensor, stride: int, label: str):
        """Insert grid positions idx [M, 3] (batch, row, col) at `stride`; returns (key, row order)."""
        coords = idx.to(torch.int32)
        coords[:, 1:] *= stride
        coords = coords.contiguous()  # torch 2.14: views of nonzero() output must be made contiguous for ME
        self.count += 1
        key, (unique_map, _) = self.manager.insert_and_map(coords, [stride, stride], f"{label}#{self.count}")
        return key, unique_map.long()


@dataclass
class SparseMap:
    """A feature map as ME sees it: active sites of an N x H x W grid and their features."""

    feats: torch.Tensor       # [M, C], row r is the site at flat grid position rows[r]
    rows: torch.Tensor        # [M] int64: (b * H + i) * W + j
    key: Any                  # ME CoordinateMapKey
    space: _Space
    shape: tuple[int, int, int, int]  # N, C, H, W of the dense equivalent
    stride: int               # ME tensor stride: coordinates are (b, i * stride, j * stride)
    nonneg: bool = False      # every feature >= 0 (after a ReLU): missing sites are the minimum
    _occ: torch.Tensor | None = field(default=None, repr=False)

    @property
    def sites(self) -> int:
        return self.rows.numel()

    @property
    def grid(self) -> int:
        n, _, h, w = self.shape
        return n * h * w

    @property
    def site_sparsity(self) -> float:
        return 1.0 - self.sites / max(self.grid, 1)

    def occupancy(self) -> torch.Tensor:
        """[N, H, W] bool: which grid positions are active sites."""
        if self._occ is None:
            n, _, h, w = self.shape
            occ = torch.zeros(n * h * w, dtype=torch.bool, device=self.rows.device)
            occ[self.rows] = True
            self._occ = occ.view(n, h, w)
        return self._occ

    def dense(self) -> torch.Tensor:
        n, c, h, w = self.shape
        out = self.feats.new_zeros(n * h * w, c)
        out[self.rows] = self.feats
        return out.view(n, h, w, c).permute(0, 3, 1, 2).contiguous()


def to_sparse(x: torch.Tensor, state: _State, label: str) -> SparseMap:
    """Dense NCHW -> SparseMap with a fresh coordinate manager; active = any channel non-zero."""
    n, c, h, w = x.shape
    occ = (x != 0).any(1)
    idx = occ.nonzero()
    rows = (idx[:, 0] * h + idx[:, 1]) * w + idx[:, 2]
    space = state.new_space()
    key, order = space.insert(idx, 1, label)
    rows = rows[order]
    feats = x.permute(0, 2, 3, 1).reshape(n * h * w, c)[rows].contiguous()
    nonneg = bool((feats >= 0).all()) if feats.numel() else True
    return SparseMap(feats, rows, key, space, (n, c, h, w), 1, nonneg, occ)


def _dense(v):
    return v.dense() if isinstance(v, SparseMap) else v


def _new_sites(x: SparseMap, occ_out: torch.Tensor, stride_out: int, label: str):
    """Insert the output sites `occ_out` [N, Ho, Wo] into x's manager; returns (key, rows, idx)."""
    n, ho, wo = occ_out.shape
    idx = occ_out.nonzero()
    rows = (idx[:, 0] * ho + idx[:, 1]) * wo + idx[:, 2]
    key, order = x.space.insert(idx, stride_out, label)
    return key, rows[order]


def _output_occupancy(state: _State, x: SparseMap, kernel, stride, dilation, pads, out_hw, everywhere: bool):
    """Sites where the dense op's output can be non-zero (see the module docstring)."""
    n = x.shape[0]
    if everywhere:
        return torch.ones(n, *out_hw, dtype=torch.bool, device=x.rows.device)
    occ = x.occupancy()[:, None].to(torch.float32)
    if state.sites == "submanifold":
        # ME's own rule: stride 1 keeps the input sites; a stride keeps cells holding an input site.
        if stride == [1, 1]:
            out = occ
        else:
            out = F.max_pool2d(occ, stride, stride, ceil_mode=True)
        out = out[:, :, :out_hw[0], :out_hw[1]]
        if tuple(out.shape[2:]) != tuple(out_hw):
            out = F.pad(out, [0, out_hw[1] - out.shape[3], 0, out_hw[0] - out.shape[2]])
        return out[:, 0] > 0
    padded = F.pad(occ, [pads[1], pads[3], pads[0], pads[2]])
    return F.max_pool2d(padded, kernel, stride, 0, dilation)[:, 0] > 0


def _crop(x: SparseMap, h_keep: int, w_keep: int, label: str) -> SparseMap:
    """x without the sites at row >= h_keep or column >= w_keep (same grid, a new coordinate map)."""
    n, c, h, w = x.shape
    i, j = (x.rows // w) % h, x.rows % w
    keep = (i < h_keep) & (j < w_keep)
    if bool(keep.all()):
        return x
    rows = x.rows[keep]
    idx = torch.stack([rows // (h * w), (rows // w) % h, rows % w], 1)
    key, order = x.space.insert(idx, x.stride, label + ":crop")
    return SparseMap(x.feats[keep][order].contiguous(), rows[order], key, x.space, x.shape, x.stride, x.nonneg)


def _window_ok(kernel, dilation, pads) -> str | None:
    """ME centres odd kernels on the output site and starts even ones at it: the begin pads must agree."""
    for k, d, p in zip(kernel, dilation, pads[:2]):
        want = (k // 2) * d if k % 2 else 0
        if p != want:
            return (f"padding {pads} with kernel {kernel} (dilation {dilation}) does not put the window where ME "
                    f"does (begin pad must be {'(k//2)*dilation' if k % 2 else '0'})")
    return None


def _out_hw(h, w, kernel, stride, dilation, pads, ceil: bool = False):
    rnd = math.ceil if ceil else math.floor
    ho = rnd((h + pads[0] + pads[2] - dilation[0] * (kernel[0] - 1) - 1) / stride[0]) + 1
    wo = rnd((w + pads[1] + pads[3] - dilation[1] * (kernel[1] - 1) - 1) / stride[1]) + 1
    return ho, wo


def me_kernel(weight: torch.Tensor) -> torch.Tensor:
    """ONNX Conv weight [Cout, Cin, kh, kw] -> ME kernel [kh * kw, Cin, Cout], kernel index kh + k_h * kw.

    ME's kernel region runs the first spatial coordinate (our row, H) fastest.
    """
    cout, cin, kh, kw = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(kw * kh, cin, cout).contiguous()


# ----------------------------------------------------------------------------------------------
# Op builders
# ----------------------------------------------------------------------------------------------

def _dense_fallback(op_type: str, reason: str):
    """Wrap the standard builder of `op_type`: sparse inputs go back to dense first."""
    standard = STANDARD_OPS[("", op_type)]

    def build(ctx: NodeContext):
        fn = standard(ctx)
        ctx.info.setdefault("kernel", "torch (dense)")
        ctx.info.setdefault("reason", reason)

        def run(*args):
            return fn(*[_dense(a) for a in args])

        return run

    return build


def _conv_builder(state: _State):
    def build(ctx: NodeContext):
        w = ctx.const(1)
        dense_fn = STANDARD_OPS[("", "Conv")](ctx)
        if w is None or w.dim() != 4:
            ctx.info.update(kernel="torch.conv (dense)", reason="weight is not a constant 2-D conv kernel")
            return lambda x, *rest: dense_fn(_dense(x), *rest)
        kernel = list(ctx.attr("kernel_shape") or w.shape[2:])
        stride = list(ctx.attr("strides", [1, 1]))
        dilation = list(ctx.attr("dilations", [1, 1]))
        groups = ctx.attr("group", 1)
        bias = ctx.const(2)
        reason = None
        if groups != 1:
            reason = f"grouped conv (group={groups}): ME has channel-wise conv only for group == channels"
        if ctx.attr("auto_pad", "NOTSET") == "NOTSET":
            reason = reason or _window_ok(kernel, dilation, list(ctx.attr("pads", [0, 0, 0, 0])))
        if reason:
            ctx.info.update(kernel="torch.conv (dense)", reason=reason)
            return lambda x, *rest: dense_fn(_dense(x), *rest)
        me_w = me_kernel(w)
        has_bias = bias is not None and bool((bias != 0).any())
        label = ctx.name
        fmt = "ME sparse tensor"
        ctx.info.update(kernel=f"ME conv {kernel[0]}x{kernel[1]}/{stride[0]} ({'GPU' if ctx.device.type == 'cuda' else 'CPU'})",
                        format=fmt, sites_rule="every position (bias)" if has_bias and state.sites != "submanifold"
                        else ("submanifold" if state.sites == "submanifold" else "generative"))

        def run(x, *rest):
            ME = _me()
            rec = state.recorder
            if not isinstance(x, SparseMap):
                with rec.phase(label, "coords"):
                    x = to_sparse(x, state, label + ":in")
            if not x.feats.shape[0]:  # no active site (an SE block's ReLU output that is all zeros):
                return dense_fn(x.dense(), *rest)  # ME's convolution segfaults on an empty tensor
            n, c, h, wd = x.shape
            pads = resolve_pads(ctx, torch.empty(0, 0, h, wd), kernel, stride, dilation)
            if _window_ok(kernel, dilation, pads):  # an auto_pad that resolved off-centre
                ctx.info.update(reason=_window_ok(kernel, dilation, pads))
                return dense_fn(x.dense(), *rest)
            out_hw = _out_hw(h, wd, kernel, stride, dilation, pads)
            with rec.phase(label, "coords"):
                occ_out = _output_occupancy(state, x, kernel, stride, dilation, pads, out_hw,
                                            has_bias and state.sites != "submanifold")
                stride_out = x.stride * stride[0] if stride[0] == stride[1] else None
                if stride_out is None:
                    raise UserError(f"node '{label}': ME runs equal strides only, got {stride}")
                key, rows = _new_sites(x, occ_out, stride_out, label)
            fw = backend_fn("ConvolutionForward", x.feats)
            args = (x.feats, me_w, kernel, stride, dilation, ME.RegionType.HYPER_CUBE, torch.IntTensor(),
                    False, _backend().ConvolutionMode.DEFAULT, x.key, key, x.space.manager._manager)
            if rec.enabled:  # the first call builds (and caches) the kernel map, the second reuses it
                with rec.phase(label, "kmap+conv"):
                    fw(*args)
                with rec.phase(label, "conv"):
                    out = fw(*args)
            else:
                out = fw(*args)
            if has_bias:
                out += bias
            ctx.info.update(site_sparsity_in=round(x.site_sparsity, 4), sites_in=x.sites, sites_out=rows.numel(),
                            site_sparsity_out=round(1.0 - rows.numel() / max(n * out_hw[0] * out_hw[1], 1), 4))
            return SparseMap(out, rows, key, x.space, (n, me_w.shape[2], *out_hw), stride_out, False, occ_out)

        dense = DenseConv(ctx.name, w, stride, dilation, 1,
                          lambda t: resolve_pads(ctx, t, kernel, stride, dilation), "best", {}, ctx.options)
        return MeConv(ctx, run, dense, bias, state)

    return build


class MeConv(Switch):
    """One Conv as the one chooser sees it: MinkowskiEngine's convolution or the layer's dense forms
    (dense_conv's engines). Policy "sparse": ME runs wherever it computes the layer right (checked
    on the first input the layer gets, a dense reference beside it), so the engine "as is" is
    MinkowskiEngine (what `bench` reports for the library); the whole-graph guard
    (MinkowskiEngineRuntimeEngine.runner) falls back to dense where ME is slower (measured 4-75x
    slower per layer: it always is so far)."""

    SPARSE = "minkowski"

    def __init__(self, ctx: NodeContext, me_run, dense, bias, state: "_State"):
        # Switch.__init__ runs at the first call, when the layer's input exists
        self.ctx, self.info, self.me_run, self.dense, self.bias, self.state = ctx, ctx.info, me_run, dense, bias, state
        self.saved = (ctx.options.get("_saved_choices") or {}).get(ctx.name)
        self.decision = None

    def layer_candidates(self, x) -> list:
        forms = [Candidate(f.name, (lambda t, *rest, f=f: f.fn(_dense(t))), dense=True, library="torch",
                           detail=f.detail, buffers=[self.dense.w]) for f in self.dense.dense_candidates(_dense(x), self.bias)]
        me = Candidate(self.SPARSE, self.me_run, dense=False, library="MinkowskiEngine",
                       detail={"kernel": self.info.get("kernel", "ME conv")}, as_tensor=_dense)
        return [*forms, me]

    def __call__(self, x, *rest):
        if self.decision is None:
            from ..chooser import Chooser

            candidates = self.layer_candidates(x)
            forced = self.SPARSE if self.state.sites == "submanifold" else None  # inexact by design: no check
            d = Chooser(self.ctx.device, torch.float32, policy="sparse").choose(
                self.ctx.name, candidates, (x,), reference="dense:cudnn", saved=self.saved, forced=forced)
            if forced:
                d.reason = "sites=submanifold: ME's own rule, inexact by design (for comparison)"
            self.me_kernel = self.info.get("kernel")
            Switch.__init__(self, d, candidates, self.info, describe=MeConv._describe)
            self._describe()
        return self.fn(x, *rest)

    def _describe(self) -> None:
        """The report in the layer's current state (also after the guard switches it)."""
        self.info["kernel"] = self.me_kernel if self.active == self.SPARSE else \
            self.candidates[self.active].detail.get("kernel", self.active)


def _relu_builder(state: _State):
    def build(ctx: NodeContext):
        label = ctx.name
        ctx.info.update(kernel="relu on site features" + (", prune empty sites" if state.sites == "relu" else ""))

        def run(x):
            if not isinstance(x, SparseMap):
                return torch.relu(x)
            feats = torch.relu(x.feats)
            if state.sites != "relu":
                return SparseMap(feats, x.rows, x.key, x.space, x.shape, x.stride, True, x._occ)
            with state.recorder.phase(label, "coords"):
                keep = (feats != 0).any(1)
                kept = int(keep.sum())
                if kept == x.sites:
                    out = SparseMap(feats, x.rows, x.key, x.space, x.shape, x.stride, True, x._occ)
                else:
                    rows = x.rows[keep]
                    n, _, h, w = x.shape
                    idx = torch.stack([rows // (h * w), (rows // w) % h, rows % w], 1)
                    key, order = x.space.insert(idx, x.stride, label)
                    out = SparseMap(feats[keep][order].contiguous(), rows[order], key, x.space, x.shape, x.stride, True)
            ctx.info.update(site_sparsity_out=round(out.site_sparsity, 4), sites_pruned=x.sites - out.sites)
            return out

        return run

    return build


def _pool_builder(state: _State, op_type: str):
    def build(ctx: NodeContext):
        dense_fn = STANDARD_OPS[("", op_type)](ctx)
        kernel = list(ctx.attr("kernel_shape"))
        stride = list(ctx.attr("strides", [1] * len(kernel)))
        dilation = list(ctx.attr("dilations", [1] * len(kernel)))
        label = ctx.name
        reason = None
        if len(kernel) != 2:
            reason = "not a 2-D pooling"
        elif ctx.attr("ceil_mode", 0):
            reason = "ceil_mode=1: windows past the border have no ME equivalent here"
        elif stride[0] != stride[1]:
            reason = "unequal strides"
        elif ctx.attr("auto_pad", "NOTSET") == "NOTSET":
            reason = _window_ok(kernel, dilation, list(ctx.attr("pads", [0, 0, 0, 0])))
        if reason:
            ctx.info.update(kernel="torch pooling (dense)", reason=reason)
            return lambda x: dense_fn(_dense(x))
        is_max = op_type == "MaxPool"
        include_pad = bool(ctx.attr("count_include_pad", 0))
        ctx.info.update(kernel=f"ME {'max' if is_max else 'sum/count'} pooling {kernel[0]}x{kernel[1]}/{stride[0]}")

        def run(x):
            ME = _me()
            if not isinstance(x, SparseMap):
                with state.recorder.phase(label, "coords"):
                    x = to_sparse(x, state, label + ":in")
            if not x.feats.shape[0]:  # no active site: ME crashes on an empty tensor, the dense op is exact
                return dense_fn(x.dense())
            if is_max and not x.nonneg:
                ctx.info.update(path="dense", reason="max pooling of values that may be negative: a missing site "
                                                     "is a zero the dense max would see")
                return dense_fn(x.dense())
            n, c, h, w = x.shape
            pads = resolve_pads(ctx, torch.empty(0, 0, h, w), kernel, stride, dilation)
            if _window_ok(kernel, dilation, pads):
                ctx.info.update(path="dense", reason=_window_ok(kernel, dilation, pads))
                return dense_fn(x.dense())
            out_hw = _out_hw(h, w, kernel, stride, dilation, pads)
            if kernel == stride and dilation == [1, 1] and (h > out_hw[0] * kernel[0] or w > out_hw[1] * kernel[1]):
                # Non-overlapping windows take ME's stride-map path, which aborts the process on an
                # input site beyond the last window (odd sizes): drop those sites first.
                with state.recorder.phase(label, "coords"):
                    x = _crop(x, out_hw[0] * kernel[0], out_hw[1] * kernel[1], label)
            with state.recorder.phase(label, "coords"):
                occ_out = _output_occupancy(state, x, kernel, stride, dilation, pads, out_hw, False)
                stride_out = x.stride * stride[0]
                key, rows = _new_sites(x, occ_out, stride_out, label)
            fw = backend_fn("LocalPoolingForward", x.feats)
            mode = ME.PoolingMode.LOCAL_MAX_POOLING if is_max else ME.PoolingMode.LOCAL_SUM_POOLING
            with state.recorder.phase(label, "pool"):
                out, _ = fw(x.feats, kernel, stride, dilation, ME.RegionType.HYPER_CUBE, torch.IntTensor(), mode,
                            x.key, key, x.space.manager._manager)
                if not is_max:  # the dense average divides by the window size, missing sites counted as zeros
                    if include_pad:
                        out = out / float(kernel[0] * kernel[1])
                    else:
                        ones = torch.ones(1, 1, h, w, device=out.device, dtype=out.dtype)
                        count = F.avg_pool2d(F.pad(ones, [pads[1], pads[3], pads[0], pads[2]]), kernel, stride,
                                             0, count_include_pad=True) * (kernel[0] * kernel[1])
                        out = out / count.reshape(-1).repeat(n)[rows][:, None]
            ctx.info.update(site_sparsity_in=round(x.site_sparsity, 4))
            return SparseMap(out.contiguous(), rows, key, x.space, (n, c, *out_hw), stride_out, x.nonneg, occ_out)

        return run

    return build


def _gap_builder(state: _State):
    def build(ctx: NodeContext):
        ctx.info.update(kernel="per-image sum of site features / (H*W)")

        def run(x):
            if not isinstance(x, SparseMap):
                return x.mean(dim=(2, 3), keepdim=True)
            n, c, h, w = x.shape
            out = x.feats.new_zeros(n, c).index_add_(0, x.rows // (h * w), x.feats)
            return (out / float(h * w)).view(n, c, 1, 1)

        return run

    return build


def _add_builder(state: _State):
    def build(ctx: NodeContext):
        ctx.info.update(kernel="feature add on shared sites, else dense add")

        def run(a, b):
            if isinstance(a, SparseMap) and isinstance(b, SparseMap) and a.space is b.space and (a.key is b.key or a.key.get_key() == b.key.get_key()):
                ctx.info.update(path="sparse")
                return SparseMap(a.feats + b.feats, a.rows, a.key, a.space, a.shape, a.stride, False, a._occ)
            if isinstance(a, SparseMap) or isinstance(b, SparseMap):
                ctx.info.update(path="dense", reason="operands on different sites (a skip path of another "
                                                     "sparsity): both densified")
            return torch.add(_dense(a), _dense(b))

        return run

    return build


def minkowski_ops(state: _State) -> dict:
    table = {("", op): _dense_fallback(op, f"ME has no {op}: runs dense on the densified map")
             for (dom, op) in STANDARD_OPS if dom == ""}
    for op in ("Flatten", "Gemm", "Reshape", "MatMul"):
        table[("", op)] = _dense_fallback(op, "a fully connected layer needs the dense map")
    table[("", "Conv")] = _conv_builder(state)
    table[("", "Relu")] = _relu_builder(state)
    table[("", "MaxPool")] = _pool_builder(state, "MaxPool")
    table[("", "AveragePool")] = _pool_builder(state, "AveragePool")
    table[("", "GlobalAveragePool")] = _gap_builder(state)
    table[("", "Add")] = _add_builder(state)
    return table


# ----------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------

class _SparseExecutor(Executor):
    """The shared executor; graph outputs that are sparse maps come back dense."""

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_dense(o) for o in super().__call__(*inputs))


class MinkowskiEngineRuntimeEngine(Engine):
    runtime = name

    def __init__(self, model, device, options, executor, state: _State):
        super().__init__(model, device, options, executor)
        self.state = state

    def switches(self) -> list:
        return [sw for sw in super().switches() if sw.decision is not None]  # layers never run: undecided

    def runner(self, *inputs):
        """No CUDA graph (the coordinate bookkeeping syncs with the host), so the whole-graph guard
        is the base one's rule run eagerly: the network with ME layers against the same network
        with every ME layer on its best dense form, timed interleaved (chooser.guard_graphs); the
        dense one wins unless ME is faster, and `plans` says so (saved, replayed on reload)."""
        from ..chooser import guard_graphs

        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key in self._graphs:
            return self._graphs[key]
        with torch.no_grad():
            self.executor(*inputs)  # the first call decides every layer (MeConv)
        me = [sw for sw in self.switches() if not sw.is_dense]
        chosen = {sw: sw.active for sw in self.switches()}
        as_chosen = self._in_state(chosen)
        self._as_chosen[key] = as_chosen
        label = "x".join(str(d) for d in inputs[0].shape)
        saved = self.plans.get(label)
        if not me or not self.guard_on():
            self.plans.setdefault(label, {"chosen": "as chosen", "reason": "guard off" if me else "no ME layer"})
            self._graphs[key] = as_chosen
            return as_chosen
        dense = {sw: sw.best_dense() for sw in self.switches()}
        if saved and saved.get("chosen") in ("as chosen", "dense"):
            winner = saved["chosen"]
        else:
            plans = {"as chosen": as_chosen, "dense": self._in_state(dense)}
            winner, times = guard_graphs({k: (lambda f=f: f(*inputs)) for k, f in plans.items()}, self.device,
                                         reps=10 if self.device.type == "cuda" else 3, prefer="dense")
            self.plans[label] = {"chosen": winner, "ms": {k: round(v, 5) for k, v in times.items()},
                                 "sparse_layers": [sw.name for sw in me]}
            if winner == "dense":
                self.plans[label]["reason"] = (f"whole-graph guard: all dense ran {times['as chosen'] / times['dense']:.2f}x "
                                               "faster than MinkowskiEngine")
        why = self.plans[label].get("reason")
        if winner == "dense":
            for sw in me:
                sw.use(dense[sw], why)
        self._graphs[key] = self._in_state(dense if winner == "dense" else chosen)
        return self._graphs[key]

    def _in_state(self, state: dict):
        """The executor with each switch on its candidate in `state` (set per call: the guarded and the
        unguarded runner share the steps)."""
        def run(*inputs):
            for sw, name in state.items():
                if sw.active != name:
                    sw.active, sw.fn = name, sw.candidates[name].fn
            return self.executor(*inputs)
        return run

    def saved_state(self) -> dict:
        return {"sites": self.state.sites}

    def profile_layers(self, *inputs: torch.Tensor, reps: int = 5) -> list[dict]:
        """Per layer, median over `reps` forwards: coordinate bookkeeping, kernel-map build and conv ms.

        The kernel-map time is (first convolution call, which builds and caches the map) minus
        (a second call that reuses it); the convolution time is the second call. Both calls run
        only while profiling, so the totals here exceed a plain forward by the conv time.
        """
        xs = self.prepare(*inputs)
        rec = self.state.recorder
        samples: dict[str, list[dict[str, float]]] = {}
        with torch.no_grad():
            self.executor(*xs)  # warm-up (a layer's first call also decides it)
            for sw in self.switches():  # the layers as they chose (ME), whatever the guard runs
                sw.active, sw.fn = sw.decision.chosen, sw.candidates[sw.decision.chosen].fn
            rec.enabled = True
            try:
                for _ in range(reps):
                    self.executor(*xs)
                    per_layer: dict[str, dict[str, float]] = {}
                    for (layer, phase), ms in rec.collect().items():
                        per_layer.setdefault(layer, {})[phase] = ms
                    for layer, d in per_layer.items():
                        samples.setdefault(layer, []).append(d)
            finally:
                rec.enabled = False
                rec.marks = []
        rows = []
        for step in self.executor.steps:
            if step.name not in samples:
                continue
            runs = samples[step.name]

            def med(key):
                vals = sorted(r.get(key, 0.0) for r in runs)
                return vals[len(vals) // 2]

            coords, both, conv, pool = med("coords"), med("kmap+conv"), med("conv"), med("pool")
            row = {"name": step.name, "op": step.op_type, "coords_ms": coords}
            if step.op_type == "Conv":
                row.update(kernel_map_ms=max(both - conv, 0.0), conv_ms=conv)
            elif pool:
                row.update(pool_ms=pool)
            row.update({k: v for k, v in step.info.items() if k.startswith("site") or k.startswith("sites")})
            rows.append(row)
        return rows


def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> MinkowskiEngineRuntimeEngine:
    """Compile for ME. extra: sites = relu (default) | generative | submanifold (inexact, for comparison)."""
    ok, why = available()
    if not ok:
        raise UserError(f"runtime 'minkowski' is not available here: {why}")
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    if opts.dtype != "fp32":
        raise UserError(f"the minkowski runtime runs fp32 only (MinkowskiEngine {ME_VERSION} dispatches float and "
                        f"double); got --dtype {opts.dtype}")
    dev = torch.device(device)
    if dev.type == "cuda" and not cuda_build():
        raise UserError("this MinkowskiEngine is a CPU-only build: use --device cpu, or rebuild it on a machine "
                        "with nvcc (`python scripts/build_minkowski.py --cuda`)")
    sites = (state or {}).get("sites") or opts.extra.get("sites", "relu")
    if sites not in SITE_MODES:
        raise UserError(f"unknown minkowski site mode '{sites}'; choose one of {', '.join(SITE_MODES)}")
    st = _State(dev, sites, _Recorder(dev), opts.extra.get("algorithm", "speed"))
    extra = {**opts.extra, "_saved_choices": (state or {}).get("choices") or {}}
    ex = _SparseExecutor(model, dev, "fp32", ops=minkowski_ops(st), channels_last=False, options=extra)
    engine = MinkowskiEngineRuntimeEngine(model, dev, opts, ex, st)
    return engine
