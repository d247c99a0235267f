"""The `cusparselt` runtime: 2:4 Conv/Gemm layers on sparse tensor cores through PyTorch's cuSPARSELt.

Rewrite: `rewrite_2to4` (2:4 layers become sparsecnn::Conv2to4 / Gemm2to4, portable layout).
Compile: every 2:4 weight is decompressed once and re-compressed into cuSPARSELt's own
layout (`torch._cslt_compress`). Activations run channels-last (NHWC) so that

    Gemm / 1x1 stride-1 conv:  Y^T[N*H*W, Cout] = X[N*H*W, Cin] @ A^T  (no copy of X)
    other convs:               im2col in tap-major order (one copy), then the same GEMM

with `torch._cslt_sparse_mm(A_compressed, B, bias, transpose_result=True)`: the sparse
operand first (cuSPARSELt's rule), B = X^T as a transposed view, the result written straight
in NHWC. cuSPARSELt needs 16-bit operands with the sparse matrix's rows and columns
multiples of 16 and the dense matrix's multiples of 8 (PyTorch's table for fp16/bf16 in
torch/sparse/semi_structured.py); where a layer's Cout, K or N*Ho*Wo is not, it is padded
with zeros and the report says so.

A 2:4 conv has a second sparse candidate, `mma.sp`: sparsecnn's own implicit-GEMM kernel on
sparse tensor cores (mma_conv.py, cuda/conv2to4_mma.cu: no im2col, NHWC fp16), offered on CUDA
sm_80+ in fp16; elsewhere the layer's report says why not (`unsupported`).

Each layer picks cuSPARSELt, the mma.sp kernel or one of its dense forms (runtimes/torch/dense_conv.py's engines:
cuDNN NCHW/NHWC, im2col + cuBLAS; cuBLAS linear for a Gemm) with the one chooser
(runtimes/chooser.py) the first time it runs (in the warm-up that precedes the CUDA graph
capture): each candidate is checked against the cuDNN form, the correct ones timed interleaved
inside CUDA graphs (an eager cuSPARSELt call costs 0.4-1.2 ms of host set-up that a graph replay
removes), and sparse runs only where it beats the best dense form by the margin. The whole
network then replays as one CUDA graph, guarded by the base Engine: the engine as chosen, all
dense, and uniformly on cuDNN NCHW / NHWC, the fastest kept, `engine.plans` says which and why.

Options (CompileOptions.extra): `force` = "sparse" (cuSPARSELt) | "mma" | "dense" (skip the measurement),
`choose_margin` (`margin` is its older name), `guard` (`whole_network_check` its older name),
`tune_reps` (timed repetitions per candidate, default 20).
"""
from __future__ import annotations

import warnings

import onnx
import torch
import torch.nn.functional as F

from ...common.errors import UserError
from ...common.shapes import conv_out_size
from ...passes.graph import SPARSECNN_DOMAIN, run_pipeline
from ...passes.two_four.layout import CONV_OP, GEMM_OP, rewrite_2to4, unpack_2to4
from ..base import CompileOptions, Engine
from ..chooser import MARGIN, Candidate, Decision, Switch
from ..executor import TORCH_DTYPES, Executor
from ..ops import STANDARD_OPS, NodeContext, resolve_pads
from ..torch.dense_conv import DenseConv
from ...passes.two_four.reference import dense_context, dense_weight
from ..options import SHARED_OPTIONS, Option
from .mma_conv import NAME as MMA, MmaConv, _round_up, mma_unavailable

name = "cusparselt"
OPTIONS = [
    *SHARED_OPTIONS,
    Option("force", str, None, "run every 2:4 layer on cuSPARSELt (sparse), the mma.sp conv kernel (mma; Gemm "
           "layers: cuSPARSELt) or dense without measuring (default: measure)", choices=("sparse", "mma", "dense")),
    Option("margin", float, MARGIN, "older name of choose_margin (a layer runs sparse only when faster than its "
           "best dense form by this fraction)", minimum=0.0),
    Option("tune_reps", int, 20, "timed repetitions per candidate (overrides choose_reps)", minimum=1),
    Option("whole_network_check", bool, True, "older name of `guard` (the base whole-graph guard)"),
    Option("cslt_search", bool, False, "let cuSPARSELt search its algorithms (crashed the CUDA context on the H100)"),
]

# cuSPARSELt shape rules for fp16/bf16 as PyTorch states them
# (torch/sparse/semi_structured.py, SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS).
SPARSE_ALIGN = 16  # rows and columns of the sparse operand A[M, K]
DENSE_ALIGN = 8    # rows and columns of the dense operand B^T[N, K]
SUPPORTED_DTYPES = ("fp16", "bf16")


def available() -> tuple[bool, str]:
    """cuSPARSELt through PyTorch, or else sparsecnn's own mma.sp conv kernel (sm_80+, NVRTC): either runs
    2:4 layers sparse."""
    ok, why = cusparselt_available()
    if ok:
        return ok, why
    try:
        if not torch.cuda.is_available():
            return ok, why
        mma_why = mma_unavailable(torch.device("cuda", 0), torch.float16)
    except Exception:  # available() never raises; cusparselt_available's reason says what broke
        return ok, why
    if mma_why is not None:
        return False, f"{why}; and the mma.sp kernel: {mma_why}"
    return True, f"{why}: 2:4 convs on sparsecnn's mma.sp kernel only (fp16), fully connected layers dense"


def cusparselt_available() -> tuple[bool, str]:
    try:
        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to PyTorch"
        if not (hasattr(torch, "_cslt_compress") and hasattr(torch, "_cslt_sparse_mm")):
            return False, f"PyTorch {torch.__version__} has no torch._cslt_sparse_mm"
        backend = getattr(torch.backends, "cusparselt", None)
        if backend is None or not backend.is_available():
            return False, f"PyTorch {torch.__version__} was built without cuSPARSELt"
        major, minor = torch.cuda.get_device_capability(0)
        gpu = torch.cuda.get_device_name(0)
        if (major, minor) < (8, 0):
            return False, (f"{gpu} is sm_{major}{minor}; 2:4 sparse tensor cores need compute capability "
                           "8.0 or newer")
        version = backend.version()
        return True, f"cuSPARSELt {version} via PyTorch {torch.__version__} on {gpu} (sm_{major}{minor}); fp16/bf16"
    except Exception as exc:  # available() never raises
        return False, f"check failed: {type(exc).__name__}: {exc}"


def rewrite(model: onnx.ModelProto, options: dict | None = None) -> onnx.ModelProto:
    model, _ = run_pipeline(model, [(rewrite_2to4, {})])
    return model


# --- the sparse GEMM ---------------------------------------------------------------------

class SparseGemm:
    """Y^T[Np, Mp] = B^T[Np, Kp] @ A^T for a 2:4 A[M, K] padded to [Mp, Kp].

    backend "cslt": cuSPARSELt. backend "dense": the same padded GEMM with F.linear, a
    stand-in that lets CPU tests check every index of the lowering.
    """

    def __init__(self, a: torch.Tensor, bias: torch.Tensor | None, backend: str = "cslt", allow_search: bool = False):
        self.m, self.k = a.shape
        self.mp, self.kp = _round_up(self.m, SPARSE_ALIGN), _round_up(self.k, SPARSE_ALIGN)
        padded = a.new_zeros(self.mp, self.kp)
        padded[:self.m, :self.k] = a
        self.bias = None
        if bias is not None:
            self.bias = bias.new_zeros(self.mp)
            self.bias[:self.m] = bias
        self.backend = backend
        # cuSPARSELt's own algorithm search is off unless asked for (extra cslt_search=True):
        # on the H100 (torch 2.11, cuSPARSELt 0.8.0) it faulted with an illegal instruction at
        # 4096^3, which kills the process's CUDA context; the default algorithm never did.
        self.allow_search = allow_search
        self.alg: dict[int, dict] = {}  # per padded row count N: cuSPARSELt algorithm settings
        if backend == "cslt":
            self.packed = torch._cslt_compress(padded.contiguous())
            self.buffers = [self.packed]
        else:
            self.weight = padded
            self.buffers = [padded]

    @property
    def padding(self) -> dict:
        return {d: [n, p] for d, n, p in (("M", self.m, self.mp), ("K", self.k, self.kp)) if n != p}

    def __call__(self, bt: torch.Tensor) -> torch.Tensor:
        if self.backend != "cslt":
            return F.linear(bt, self.weight, self.bias)
        return _cslt_mm(self.packed, bt.t(), self.bias, self.alg.get(bt.shape[0], {}))

    def search(self, bt: torch.Tensor) -> dict:
        """cuSPARSELt's own algorithm search for this N (empty if this PyTorch lacks it)."""
        search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
        if search is None or self.backend != "cslt" or not self.allow_search:
            return {}
        try:
            alg_id = search(self.packed, bt.t(), self.bias, None, None, True)[0]
        except Exception:
            return {}
        # Only the algorithm id is passed back: on the H100 (torch 2.11, cuSPARSELt 0.8)
        # the search reported split_k = -1, and calls given that split-k setting died with
        # an illegal-instruction fault that poisoned the CUDA context.
        return {"alg_id": int(alg_id)}


def _cslt_mm(packed, b, bias, alg: dict):
    try:
        return torch._cslt_sparse_mm(packed, b, bias, transpose_result=True, **alg)
    except TypeError:  # an older signature (split_k_one_kernel): keep the algorithm id only
        return torch._cslt_sparse_mm(packed, b, bias, transpose_result=True,
                                     **({"alg_id": alg["alg_id"]} if "alg_id" in alg else {}))


# --- lowering a layer to the GEMM --------------------------------------------------------

class ConvLowering:
    """Conv2to4 on an NCHW-shaped tensor (any memory format) as im2col + SparseGemm."""

    def __init__(self, ctx: NodeContext, gemm: SparseGemm, kernel: list[int]):
        self.ctx, self.gemm = ctx, gemm
        self.kernel = kernel
        self.stride = ctx.attr("strides", [1, 1])
        self.dilation = ctx.attr("dilations", [1, 1])
        self.cin = gemm.k // (kernel[0] * kernel[1])
        self.pointwise = kernel == [1, 1] and self.stride == [1, 1]

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """B^T[Np, Kp] in tap-major order, and (N, Ho, Wo)."""
        kh, kw = self.kernel
        sh, sw = self.stride
        dh, dw = self.dilation
        pads = resolve_pads(self.ctx, x, self.kernel, self.stride, self.dilation)  # [h0, w0, h1, w1]
        xh = x.permute(0, 2, 3, 1)  # NHWC view: contiguous when x is channels-last
        if any(pads):
            xh = F.pad(xh, (0, 0, pads[1], pads[3], pads[0], pads[2]))
        n, hp, wp, c = xh.shape
        ho, wo = conv_out_size(hp, 0, kh, sh, dh), conv_out_size(wp, 0, kw, sw, dw)
        rows = n * ho * wo
        rows_p = _round_up(rows, DENSE_ALIGN)
        kp = self.gemm.kp
        if self.pointwise and not any(pads) and rows_p == rows and kp == c and xh.is_contiguous():
            return xh.reshape(rows, c), (n, ho, wo)  # a view: no copy at all
        bt = xh.new_empty(rows_p, kp)
        if rows_p > rows:
            bt[rows:].zero_()
        if kp > self.gemm.k:
            bt[:, self.gemm.k:].zero_()
        s_n, s_h, s_w, s_c = xh.stride()
        patches = xh.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
        bt[:rows, :self.gemm.k].view(n, ho, wo, kh, kw, c).copy_(patches)
        return bt, (n, ho, wo)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bt, (n, ho, wo) = self.columns(x)
        y = self.gemm(bt)[:n * ho * wo, :self.gemm.m]
        return y.reshape(n, ho, wo, self.gemm.m).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory

    def describe(self, x: torch.Tensor) -> dict:
        n, c, h, w = x.shape
        pads = resolve_pads(self.ctx, x, self.kernel, self.stride, self.dilation)
        ho = conv_out_size(h, pads[0] + pads[2], self.kernel[0], self.stride[0], self.dilation[0])
        wo = conv_out_size(w, pads[1] + pads[3], self.kernel[1], self.stride[1], self.dilation[1])
        rows = n * ho * wo
        pad = dict(self.gemm.padding)
        if rows % DENSE_ALIGN:
            pad["N"] = [rows, _round_up(rows, DENSE_ALIGN)]
        direct = self.pointwise and not any(pads) and not pad
        return {"gemm": [self.gemm.m, self.gemm.k, rows], "im2col": not direct, "padded": pad}


class GemmLowering:
    """Gemm2to4: Y = alpha * A_in @ W^T + beta * C with a SparseGemm."""

    def __init__(self, ctx: NodeContext, gemm: SparseGemm, alpha: float, beta: float, bias):
        self.gemm, self.alpha, self.beta, self.bias = gemm, alpha, beta, bias

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        rows = a.shape[0]
        rows_p = _round_up(rows, DENSE_ALIGN)
        if rows_p == rows and self.gemm.kp == self.gemm.k:
            bt = a.contiguous()
        else:
            bt = a.new_zeros(rows_p, self.gemm.kp)
            bt[:rows, :self.gemm.k] = a
        y = self.gemm(bt)[:rows, :self.gemm.m]
        if self.alpha != 1.0 or self.beta != 1.0:  # bias not fused in this case
            y = self.alpha * y
            if self.bias is not None:
                y = y + self.beta * self.bias
        return y

    def describe(self, x: torch.Tensor) -> dict:
        rows = x.shape[0]
        pad = dict(self.gemm.padding)
        if rows % DENSE_ALIGN:
            pad["N"] = [rows, _round_up(rows, DENSE_ALIGN)]
        return {"gemm": [self.gemm.m, self.gemm.k, rows], "im2col": False, "padded": pad}


# --- choosing sparse or dense per layer --------------------------------------------------

SPARSE = "cusparselt"  # the sparse candidate's name; the dense ones are dense:<mode> (or dense:linear)
NO_GEMM = "none"  # build_engine's backend where PyTorch has no cuSPARSELt: the mma.sp kernel alone


class TwoFourLayer(Switch):
    """The op function of one 2:4 layer: cuSPARSELt or one of the layer's dense forms, decided by the
    one chooser (runtimes/chooser.py) the first time the layer runs (in the warm-up before the CUDA
    graph capture, on the input it really receives), then a Switch the whole-graph guard can flip.
    Later input shapes keep that decision."""

    def __init__(self, ctx: NodeContext, sparse, dense_forms, gemm: SparseGemm, bias, kind: str,
                 saved: dict | None = None, mma: MmaConv | None = None):
        # Switch.__init__ runs at the first call, when the candidates can be measured
        self.name_, self.sparse, self.dense_forms, self.gemm, self.bias, self.kind = (
            ctx.name, sparse, dense_forms, gemm, bias, kind)
        self.mma = mma  # sparsecnn's mma.sp conv, where offered (else the report's `unsupported` says why)
        self.ctx, self.info = ctx, ctx.info
        extra = ctx.options
        self.force = extra.get("force")
        # `margin` is the older name of choose_margin (its default was 0.02)
        self.margin = float(extra.get("choose_margin", extra.get("margin", MARGIN)))
        self.reps = int(extra.get("tune_reps", extra.get("choose_reps", 20)))
        self.saved = saved
        self.decision = None
        self.choices: dict[str, dict] = {}
        self.info.setdefault("choices", self.choices)
        self.info.update(format="2:4")

    @staticmethod
    def shape_key(x: torch.Tensor) -> str:
        return "x".join(map(str, x.shape))

    def __call__(self, x, values=None, positions=None, bias=None):
        if self.decision is None:
            self.decide(x)
        return self.fn(x)

    def layer_candidates(self, x: torch.Tensor) -> list:
        sparse = [] if self.gemm is None else [Candidate(SPARSE, self.sparse, dense=False, library="cusparselt",
                                                         detail=self.sparse.describe(x),
                                                         buffers=list(self.gemm.buffers))]
        mma = [] if self.mma is None else [Candidate(MMA, self.mma, dense=False, library="cusparselt",
                                                     detail=self.mma.describe(x), buffers=list(self.mma.buffers))]
        return [*self.dense_forms(x), *sparse, *mma]

    def decide(self, x: torch.Tensor) -> Decision:
        from ..chooser import Chooser

        candidates = self.layer_candidates(x)
        entry = dict(next((c.detail for c in candidates if c.name == SPARSE), {}))  # {}: no cuSPARSELt here
        if entry.get("padded"):
            entry["padding_note"] = "padded with zeros to cuSPARSELt's multiples (" + ", ".join(
                f"{d} {a}->{b}" for d, (a, b) in entry["padded"].items()) + ")"
        default_dense = "dense:cudnn_nhwc" if self.kind == "conv" else "dense:linear"  # the engine runs NHWC
        forced, why = None, None
        if self.force in ("sparse", "mma", "dense"):
            forced = {"sparse": SPARSE, "dense": default_dense}.get(self.force, MMA if self.mma is not None else SPARSE)
            why = f"forced {forced} (extra force={self.force})"
        elif x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            forced, why = default_dense, "not measured (first seen inside a graph capture): dense by default"
        elif self.gemm is not None and self.gemm.backend == "cslt" and self.saved is None:
            found = self.gemm.search(x.new_zeros(_round_up(entry["gemm"][2], DENSE_ALIGN), self.gemm.kp))
            if found:  # cslt_search on: the algorithm cuSPARSELt found is the sparse candidate's
                self.gemm.alg[_round_up(entry["gemm"][2], DENSE_ALIGN)] = entry["cslt_alg"] = found
        chooser = Chooser(x.device, x.dtype, tf32=False, margin=self.margin, reps=self.reps)
        d = chooser.choose(self.name_, candidates, (x,), reference=candidates[0].name, saved=self.saved, forced=forced)
        if why:
            d.reason = why
        Switch.__init__(self, d, candidates, self.info, describe=TwoFourLayer._describe)
        times = d.times_ms
        if SPARSE in times:
            entry["sparse_us"] = round(times[SPARSE] * 1e3, 2)
        if MMA in times:
            entry["mma_us"] = round(times[MMA] * 1e3, 2)
        if d.best_dense_ms is not None:
            entry["dense_us"] = round(d.best_dense_ms * 1e3, 2)
        entry.update(choice="dense" if d.dense else "sparse", chosen=d.chosen, reason=d.reason)
        if d.rejected:
            entry["rejected"] = dict(d.rejected)
        self.choices[self.shape_key(x)] = entry
        self._describe()
        self.info["buffers"] = list(self.gemm.buffers if self.gemm is not None else []) + [
            b for c in self.candidates.values() for b in c.buffers]
        return d

    def _describe(self) -> None:
        """The report in the layer's current state (also after the guard switches it)."""
        self.info["format"] = "2:4"
        self.info["kernel"] = "cuSPARSELt 2:4" if self.active == SPARSE else \
            self.candidates[self.active].detail.get("kernel", self.active)


def _bias(ctx: NodeContext):
    b = ctx.const(3)
    return None if b is None else b.to(ctx.device, ctx.dtype)


def _mma_layer(ctx: NodeContext, mma_backend, bias) -> tuple[MmaConv | None, str | None]:
    """The conv on conv2to4_mma.cu, or None and why it is not offered here (MmaConv's own reason)."""
    if mma_backend is None:
        return None, mma_unavailable(ctx.device, ctx.dtype) or "no mma.sp kernel backend"
    kernel = list(ctx.attr("kernel_shape"))
    stride, dilation = ctx.attr("strides", [1, 1]), ctx.attr("dilations", [1, 1])
    try:
        return MmaConv(ctx.const(1), ctx.const(2), kernel, stride, dilation,
                       lambda x: resolve_pads(ctx, x, kernel, stride, dilation), bias, False, mma_backend, ctx.device,
                       dtype=ctx.dtype), None
    except (NotImplementedError, ValueError) as exc:
        return None, str(exc)


def _layer_builder(kind: str, backend: str, mma_backend=None):
    def build(ctx: NodeContext):
        if ctx.dtype not in (torch.float16, torch.bfloat16) and backend in ("cslt", NO_GEMM):
            raise NotImplementedError("cuSPARSELt runs fp16/bf16 only")
        weight = dense_weight(ctx)  # ONNX layout, engine dtype
        bias = _bias(ctx)
        if kind == "conv":
            alpha = beta = 1.0
        else:
            dense_ctx = dense_context(ctx, "Gemm", weight, {"transB": 1, "transA": 0})
            std = STANDARD_OPS[("", "Gemm")](dense_ctx)
            dense_run = lambda t, c=None: std(t, weight, c)  # noqa: E731
            alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
        fused_bias = bias if (alpha == 1.0 and beta == 1.0) else None
        gemm = None  # without cuSPARSELt no sparse GEMM, and no unpacked copy of the weight for one
        if backend != NO_GEMM:
            a = unpack_2to4(ctx.const(1).to(ctx.device, ctx.dtype), ctx.const(2))
            gemm = SparseGemm(a, fused_bias, backend, allow_search=bool(ctx.options.get("cslt_search", False)))
        weights = [weight] + ([bias] if bias is not None else [])
        if kind == "conv":
            lowering = ConvLowering(ctx, gemm, list(ctx.attr("kernel_shape"))) if gemm is not None else None
            kernel = list(ctx.attr("kernel_shape"))
            stride, dilation = ctx.attr("strides", [1, 1]), ctx.attr("dilations", [1, 1])
            dense = DenseConv(ctx.name, weight, stride, dilation, int(ctx.attr("group", 1)),
                              lambda t: resolve_pads(ctx, t, kernel, stride, dilation), "best", {}, ctx.options)

            def dense_forms(x):  # the same dense baselines as every runtime's (dense_conv's engines)
                forms = dense.dense_candidates(x, bias)
                for f in forms:
                    f.buffers = weights
                return forms
        else:
            lowering = GemmLowering(ctx, gemm, alpha, beta, bias) if gemm is not None else None

            def dense_forms(x):
                return [Candidate("dense:linear", lambda t: dense_run(t, bias), dense=True, library="torch",
                                  detail={"kernel": "cuBLAS linear"}, buffers=weights)]
        mma, mma_why = _mma_layer(ctx, mma_backend, bias) if kind == "conv" else (None, "a conv kernel")
        unsupported = {MMA: mma_why} if mma_why else {}
        if gemm is None:
            unsupported[SPARSE] = "cuSPARSELt is not in this PyTorch (torch.backends.cusparselt)"
        if unsupported:
            ctx.info["unsupported"] = unsupported
        saved = (ctx.options.get("_saved_choices") or {}).get(ctx.name)
        layer = TwoFourLayer(ctx, lowering, dense_forms, gemm, bias, kind,
                             saved if saved and "chosen" in saved else None, mma)
        if saved and "chosen" not in saved and saved:  # an engine saved before the one chooser: shape -> entry
            layer.force = next(iter(saved.values())).get("choice", layer.force)
        ctx.info["buffers"] = (list(gemm.buffers) if gemm is not None else []) + weights + (
            list(mma.buffers) if mma is not None else [])
        return layer

    return build


def op_table(backend: str = "cslt", mma=None) -> dict:
    """Builders for the 2:4 ops; backend "dense" is the CPU-testable stand-in for cuSPARSELt, NO_GEMM a
    PyTorch without cuSPARSELt (2:4 convs on the mma.sp kernel or dense, GEMMs dense). `mma`: the
    launcher of conv2to4_mma.cu (mma_conv.NvrtcMma on a GPU, the emulator in CPU tests), or None."""
    return {(SPARSECNN_DOMAIN, CONV_OP): _layer_builder("conv", backend, mma),
            (SPARSECNN_DOMAIN, GEMM_OP): _layer_builder("gemm", backend)}


def mma_backend(device: torch.device, dtype: str):
    """conv2to4_mma.cu's launcher where it is offered (CUDA sm_80+, fp16), else None (the report says why)."""
    from ..executor import TORCH_DTYPES

    if mma_unavailable(torch.device(device), TORCH_DTYPES[dtype]) is not None:
        return None
    from .mma_conv import NvrtcMma

    return NvrtcMma(torch.device(device))


# --- the engine --------------------------------------------------------------------------

class CuSparseLtEngine(Engine):
    """The whole-graph guard is the base Engine's: the engine as its layers chose vs all dense and
    uniformly on cuDNN NCHW / NHWC (the dense executors this runtime used to build), timed interleaved."""

    runtime = name

    @property
    def whole_network(self) -> dict:
        """The whole-graph plans per input shape (the older name of `plans`)."""
        return self.plans

    def guard_on(self) -> bool:
        extra = self.options.extra  # whole_network_check: the older name of guard
        return bool(extra.get("guard", extra.get("whole_network_check", True)))

    def sparse_layers(self, input_shape=None) -> list[str]:
        return [sw.name for sw in self.switches() if sw.decision is not None and not sw.is_dense]

    def switches(self) -> list:
        return [sw for sw in super().switches() if sw.decision is not None]  # layers never run: undecided


def compile(model: onnx.ModelProto, device: str | torch.device = "cuda", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> CuSparseLtEngine:
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    dev = torch.device(device)
    if opts.dtype not in SUPPORTED_DTYPES:
        raise UserError(f"runtime cusparselt runs fp16 or bf16, not {opts.dtype} (cuSPARSELt's fp32 mode wants "
                        "1:2 sparsity, not 2:4); use --dtype fp16")
    if dev.type != "cuda":
        raise UserError("runtime cusparselt needs a CUDA GPU (sm_80 or newer); use --runtime torch on the CPU")
    ok, reason = cusparselt_available()
    mma = mma_backend(dev, opts.dtype)
    if not ok and mma is None:
        raise UserError(f"runtime cusparselt is not available here: {reason}; and sparsecnn's mma.sp kernel: "
                        f"{mma_unavailable(dev, TORCH_DTYPES[opts.dtype])}")
    if not ok:  # e.g. a Jetson PyTorch built without cuSPARSELt: the 2:4 convs can still run sparse
        warnings.warn(f"cusparselt: {reason}; 2:4 convs choose between sparsecnn's mma.sp kernel and dense, "
                      "2:4 fully connected layers run dense")
    return build_engine(model, dev, opts, "cslt" if ok else NO_GEMM, state, mma)


def build_engine(model: onnx.ModelProto, device: torch.device, opts: CompileOptions, backend: str = "cslt",
                 state: dict | None = None, mma=None) -> CuSparseLtEngine:
    """The engine without the environment checks; backend "dense" runs anywhere (dry runs, CPU tests);
    `mma`: conv2to4_mma.cu's launcher (op_table)."""
    if not any(n.domain == SPARSECNN_DOMAIN for n in model.graph.node):
        model = rewrite(model)
    extra = dict(opts.extra)
    extra["_saved_choices"] = (state or {}).get("choices", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of older search APIs
        ex = Executor(model, device, opts.dtype, ops=op_table(backend, mma), channels_last=True, options=extra)
    engine_opts = CompileOptions.from_dict({**opts.to_dict(), "channels_last": True})
    engine = CuSparseLtEngine(model, device, engine_opts, ex)
    return engine
