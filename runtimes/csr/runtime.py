"""The `csr` runtime: unstructured weight sparsity on Sputnik-style CSR kernels (issue 5).

rewrite: `csr_rewrite` turns each pruned Conv (group 1) and Gemm into `sparsecnn::CsrConv` /
`CsrGemm` with the weight stored as CSR initializers, the residual Add and the Relu after it
fused into the op (a ResNet block's Conv -> Add -> Relu is one kernel); layers too dense or
excluded stay standard ONNX ops.

compile: on CUDA each CSR op is prepared for a few kernel configurations (runtimes/
csr_kernels.py) which are timed on the device; the fastest runs, unless the layer's dense
form (the torch runtime's Conv / linear on the decompressed weight, cuDNN / cuBLAS, then the
fused residual add and ReLU as torch ops) is faster still, in which case the layer runs dense
and the report says so. The whole
network replays as one CUDA graph. On CPU the reference implementations run.

Options (CompileOptions.extra):
  csr_decide       "measure" (default): time sparse and dense per layer, keep the faster;
                   "threshold": sparse when density <= csr_max_density; "sparse": always sparse
  csr_max_density  density above which a layer stays dense (rewrite and "threshold"; default 0.3)
  csr_autotune     time every candidate config (default True) or take the first
  csr_tune_reps    timed repetitions per candidate (default 15)
  csr_exclude      extra layers to leave dense in the rewrite (globs of weight/module names)
  csr_fuse         fuse the residual Add after a layer into its op (rewrite; default True;
                   a Relu after the layer or the Add is always fused)
  csr_weight_budget  engine weight memory cap, as a fraction of the model's dense fp32 weights
                   (default 0: off, the fastest engine; 0.25 is the issue's bar): a layer measured faster
                   dense runs dense only while the engine's weights stay under the cap - the
                   layers saving the most time per extra byte first; the others stay sparse and
                   their report says so ("budget")
  dense_conv ...   passed through to the torch runtime's Conv builder for dense layers
"""
from __future__ import annotations

import onnx
import torch

from ...common.errors import UserError
from ...passes.csr.layout import CSR
from ...passes.csr.rewrite import DEFAULT_MAX_DENSITY, csr_rewrite
from ...passes.graph import SPARSECNN_DOMAIN, PassResult, run_pipeline
from ..base import CompileOptions, Engine, _MatmulPrecision
from ...passes.csr.reference import OPS as REFERENCE_OPS
from ...passes.csr.reference import bias_tensor, conv_geometry, csr_tensors, epilogue, has_residual, used_inputs
from ..executor import Executor
from ..ops import STANDARD_OPS, NodeContext, attributes

name = "csr"


def available() -> tuple[bool, str]:
    try:
        if not torch.cuda.is_available():
            return True, "CPU: reference CSR ops (the CUDA kernels need a GPU)"
        from ..nvrtc import device_kernel_notes, nvrtc_available

        ok, why = nvrtc_available()
        if not ok:
            return False, f"CUDA GPU present but NVRTC is not usable ({why}); `pip install 'sparsecnn[gpu]'`"
        return True, f"CSR kernels via {why} on {torch.cuda.get_device_name(0)}; {device_kernel_notes('csr')}"
    except Exception as exc:  # never raise from available()
        return False, f"{type(exc).__name__}: {exc}"


def _extra(options) -> dict:
    if options is None:
        return {}
    if isinstance(options, CompileOptions):
        return dict(options.extra)
    opts = CompileOptions.from_dict(options)
    return dict(opts.extra)


def passes(options=None) -> list:
    """The runtime's explicit rewrite pipeline."""
    extra = _extra(options)
    return [(csr_rewrite, {"max_density": float(extra.get("csr_max_density", DEFAULT_MAX_DENSITY)),
                           "exclude": list(extra.get("csr_exclude", [])),
                           "fuse_residual": bool(extra.get("csr_fuse", True))})]


def rewrite_with_report(model: onnx.ModelProto, options=None) -> tuple[onnx.ModelProto, list[PassResult]]:
    return run_pipeline(model, passes(options))


def rewrite(model: onnx.ModelProto, options=None) -> onnx.ModelProto:
    return rewrite_with_report(model, options)[0]


class CsrEngine(Engine):
    runtime = name

    def __init__(self, *args, session=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.session = session

    def saved_state(self) -> dict:
        return {"layers": dict(self.session.decisions)} if self.session is not None else {}


def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> CsrEngine:
    device = torch.device(device)
    backend = None
    if device.type == "cuda":
        ok, why = available()
        if not ok:
            raise UserError(f"runtime 'csr' cannot run on {device}: {why}")
        from .kernels import NvrtcBackend

        backend = NvrtcBackend(device)
    return compile_with_backend(model, device, options, state, backend)


def compile_with_backend(model: onnx.ModelProto, device, options=None, state: dict | None = None,
                         backend=None) -> CsrEngine:
    """compile() with an explicit kernel backend (None: the reference ops). The CPU tests pass
    the emulator (tests/cuda_emu.py) to run the GPU code path on CPU tensors."""
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    device = torch.device(device)
    session = None
    if backend is not None:
        session = _KernelSession(device, opts, state or {}, backend)
        ops = {(SPARSECNN_DOMAIN, "CsrConv"): session.build_conv, (SPARSECNN_DOMAIN, "CsrGemm"): session.build_gemm}
    else:
        ops = dict(REFERENCE_OPS)
    with torch.no_grad(), _MatmulPrecision(device, opts.tf32):
        ex = Executor(model, device, opts.dtype, ops=ops, channels_last=opts.channels_last, options=opts.extra)
    if session is not None:
        session.apply_weight_budget(ex)
    return CsrEngine(model, device, opts, ex, session=session)


# --- kernel builders ------------------------------------------------------------------------

def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Switch:
    """A layer's callable whose implementation the weight budget may still change after the
    layer is built (dense measured faster, sparse kept if the memory cap needs it)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _KernelSession:
    """Shared state of one compile with kernels: backend, tuning settings, per-layer decisions."""

    def __init__(self, device: torch.device, opts: CompileOptions, state: dict, backend):
        extra = opts.extra
        self.device, self.opts = device, opts
        self.backend = backend
        self.decide = str(extra.get("csr_decide", "measure"))
        if self.decide not in ("measure", "threshold", "sparse"):
            raise UserError(f"csr_decide must be measure, threshold or sparse, got '{self.decide}'")
        self.max_density = float(extra.get("csr_max_density", DEFAULT_MAX_DENSITY))
        self.autotune = bool(extra.get("csr_autotune", True))
        self.reps = int(extra.get("csr_tune_reps", 15))
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        self.saved = dict((state or {}).get("layers", {}))
        self.decisions: dict[str, dict] = {}
        budget = extra.get("csr_weight_budget", 0.0)
        self.weight_budget = float(budget) if budget not in (None, False, "off") else 0.0
        self.dense_fp32_bytes: dict[str, int] = {}  # per CSR layer: its weight (+ bias) as dense fp32
        self.pending: list[dict] = []  # layers running dense that the budget may send back to sparse

    def time_us(self, fn, args: tuple) -> float:
        """Microseconds of one fn(*args) (args: the layer's input, and its residual when fused)."""
        from .kernels import time_in_graph_us

        return time_in_graph_us(lambda a: fn(*a), args, self.device, self.reps)

    def _choose(self, ctx: NodeContext, density: float, candidates: list, make_plan, run_plan, make_dense, args,
                kernel_of):
        """Sparse (the fastest candidate config) or dense for one layer.

        `args`: example inputs of the layer's function (x, and the residual when the op has one),
        so sparse candidates are timed with their fused epilogue and the dense form with its
        residual add and ReLU. Returns (fn, report info, device buffers, decision to save). A
        reloaded engine takes its saved decision (the caller puts the saved config first)
        without timing anything.
        """
        from .kernels import PlanDoesNotFit

        saved = self.saved.get(ctx.name)
        info: dict = {}

        def dense(reason: str, us: float | None = None):
            fn, bufs, kernel = make_dense()
            info.update(format="dense", kernel=kernel, reason=reason, dense_bytes=_nbytes(bufs))
            if us is not None:
                info["time_us"] = round(us, 3)
            return fn, info, bufs, {"format": "dense", "reason": reason}

        if saved is not None and saved.get("format") == "dense":
            return dense(saved.get("reason", "saved decision"))
        if saved is None and self.decide == "threshold" and density > self.max_density:
            return dense(f"density {density:.3f} > csr_max_density {self.max_density}")
        if saved is not None or not self.autotune:
            candidates = candidates[:1]
        measure = saved is None and (len(candidates) > 1 or self.decide == "measure")
        best = None
        timed = []
        for cfg in candidates:
            try:
                plan = make_plan(cfg)
            except PlanDoesNotFit as exc:  # e.g. a staged-sparse config whose non-zeros overflow shared memory
                timed.append({"config": cfg.label(), "skipped": str(exc)})
                continue
            us = self.time_us(lambda *t, p=plan: run_plan(p, *t), args) if measure else None
            if us is not None:
                timed.append({"config": cfg.label(), "us": round(us, 3)})
            if best is None or (us is not None and us < best[2]):
                best = (cfg, plan, us)
        if best is None:
            return dense("no candidate config fits this layer")
        cfg, plan, sparse_us = best
        info["csr_bytes"] = _nbytes(plan.buffers())
        if timed:
            info["candidates"] = timed
        if saved is None and self.decide == "measure":
            dense_fn, dense_bufs, kernel = make_dense()
            dense_us = self.time_us(dense_fn, args)
            info["dense_us"] = round(dense_us, 3)
            info["dense_bytes"] = _nbytes(dense_bufs)
            if dense_us < sparse_us:
                info["sparse_us"] = round(sparse_us, 3)
                info.update(format="dense", kernel=kernel, reason="dense measured faster", time_us=round(dense_us, 3))
                if self.weight_budget <= 0:
                    del plan, best
                    return dense_fn, info, dense_bufs, {"format": "dense", "reason": "dense measured faster"}
                # dense for now; apply_weight_budget may switch back to this sparse plan
                switch = _Switch(dense_fn)
                self.pending.append({"name": ctx.name, "switch": switch, "info": ctx.info, "kernel": kernel_of(cfg),
                                     "saving_us": sparse_us - dense_us,
                                     "sparse": ((lambda *t, p=plan: run_plan(p, *t)), plan.buffers(), cfg, sparse_us),
                                     "extra_bytes": _nbytes(dense_bufs) - _nbytes(plan.buffers())})
                return switch, info, dense_bufs, {"format": "dense", "reason": "dense measured faster"}
            del dense_fn, dense_bufs
        if sparse_us is not None:
            info["time_us"] = round(sparse_us, 3)
        info.update(format="csr", config=cfg.to_dict(), config_label=cfg.label(), kernel=kernel_of(cfg))
        return (lambda *t, p=plan: run_plan(p, *t)), info, plan.buffers(), {"format": "csr", "config": cfg.to_dict()}

    def apply_weight_budget(self, executor) -> None:
        """Send dense-by-measure layers back to their sparse plans until the engine's weights fit
        `weight_budget` x the model's dense fp32 weights (the layers saving least time per extra
        byte go back first). Reference: every constant the engine keeps for other ops, at 4
        bytes an element, plus each CSR layer's weight and bias as dense fp32."""
        pending, self.pending = self.pending, []
        if not pending or self.weight_budget <= 0:
            return
        ref = sum(v.numel() * 4 for v in executor.consts.values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()) + sum(self.dense_fp32_bytes.values())
        cap = self.weight_budget * ref
        total = executor.weight_bytes()
        pending.sort(key=lambda e: e["saving_us"] / max(1, e["extra_bytes"]))  # least saving per byte first
        for e in pending:
            if total <= cap:
                break
            fn, bufs, cfg, sparse_us = e["sparse"]
            info = e["info"]
            e["switch"].fn = fn
            dense_us = info.get("time_us")
            total -= e["extra_bytes"]
            info.update(format="csr", config=cfg.to_dict(), config_label=cfg.label(), time_us=round(sparse_us, 3),
                        buffers=bufs, csr_bytes=_nbytes(bufs),
                        budget=f"kept sparse by csr_weight_budget {self.weight_budget}: dense was "
                               f"{e['saving_us']:.1f} us faster but needs {e['extra_bytes'] / 2**20:.1f} MiB more",
                        reason=f"weight budget (dense measured {dense_us} us)")
            info["kernel"] = e["kernel"]
            self.decisions[e["name"]] = {"format": "csr", "config": cfg.to_dict()}

    def build_conv(self, ctx: NodeContext):
        from .kernels import ConvGeometry, candidate_configs, config_from_dict, kernel_name, make_plan

        g = conv_geometry(ctx)
        values, cols, row_ptr, order = csr_tensors(ctx)
        bias = bias_tensor(ctx)
        m = row_ptr.numel() - 1
        shape = ctx.shape(ctx.node.input[0])
        if not shape or len(shape) != 4 or shape[2] is None or shape[3] is None:
            ref = REFERENCE_OPS[(SPARSECNN_DOMAIN, "CsrConv")](ctx)
            ctx.info.update(reason="input size unknown at compile time: reference op (torch sparse)")
            return ref
        ctx.inputs_used = used_inputs(ctx)  # x (and the residual): the CSR arrays live in the plans
        (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = g["kernel"], g["stride"], g["pads"], g["dilation"]
        geom = ConvGeometry(m, g["in_channels"], shape[2], shape[3], kh, kw, sh, sw, pt, pl, pb, pr, dh, dw)
        csr = CSR(values, cols.to(torch.int32), row_ptr.to(torch.int32), order.to(torch.int32), (m, geom.k))
        relu, residual = g["relu"], has_residual(ctx)
        x = torch.randn(1, geom.c, geom.h, geom.w, device=self.device).to(ctx.dtype)
        args = (x,)
        if residual:
            args += (torch.randn(1, m, geom.ho, geom.wo, device=self.device).to(ctx.dtype),)
        if ctx.channels_last:
            args = tuple(t.contiguous(memory_format=torch.channels_last) for t in args)

        def make_dense():
            w = csr.to_dense().reshape(m, geom.c, kh, kw)
            return self._dense_conv(ctx, w, bias, relu)

        candidates = candidate_configs(geom, self.sms, dtype=ctx.dtype)
        saved = self.saved.get(ctx.name)
        if saved is not None and saved.get("format") == "csr":
            candidates = [config_from_dict(saved["config"])]
        self.dense_fp32_bytes[ctx.name] = m * geom.k * 4 + (m * 4 if bias is not None else 0)
        fn, info, bufs, decision = self._choose(
            ctx, csr.density, candidates,
            lambda cfg: make_plan(csr, geom, cfg, ctx.dtype, self.device, self.backend, bias, relu),
            lambda plan, t, r=None: plan.conv(t, r), make_dense, args, lambda cfg: kernel_name(cfg, ctx.dtype))
        ctx.info.update(nnz=csr.nnz, sparsity=1.0 - csr.density, relu_fused=relu, residual_fused=residual, buffers=bufs,
                        **info)
        self.decisions[ctx.name] = decision
        return fn

    def _dense_conv(self, ctx: NodeContext, w: torch.Tensor, bias, relu: bool):
        """The torch runtime's Conv builder on the decompressed weight (its options apply), then
        the fused residual add and ReLU in place: fn(x, residual=None)."""
        kh, kw = w.shape[2:]
        g = conv_geometry(ctx)
        node = onnx.helper.make_node("Conv", [ctx.node.input[0], "__csr_dense_w", "__csr_dense_b"], list(ctx.node.output),
                                     name=ctx.name, kernel_shape=[kh, kw], strides=list(g["stride"]),
                                     pads=list(g["pads"]), dilations=list(g["dilation"]))
        consts = {"__csr_dense_w": w.to(self.device, ctx.dtype)}
        b = bias.to(self.device, ctx.dtype) if bias is not None else None
        if b is not None:
            consts["__csr_dense_b"] = b
        dctx = NodeContext(node, attributes(node), consts, ctx.shapes, ctx.device, ctx.dtype, ctx.channels_last,
                           ctx.options)
        run = STANDARD_OPS[("", "Conv")](dctx)
        kernel = dctx.info.get("kernel", "torch.conv")

        def fn(t, r=None):
            return epilogue(run(t, None, b), None, r, relu)

        return fn, [consts["__csr_dense_w"]] + ([b] if b is not None else []), kernel

    def build_gemm(self, ctx: NodeContext):
        from .kernels import GEMV_MAX_BATCH, ConvPlan, GemvPlan, gemm_as_conv_geometry, gemm_conv_plan_call, spmm_config

        values, cols, row_ptr, order = csr_tensors(ctx)
        bias = bias_tensor(ctx)
        m, k = row_ptr.numel() - 1, int(ctx.attr("in_features"))
        relu, residual = bool(ctx.attr("relu", 0)), has_residual(ctx)
        csr = CSR(values, cols.to(torch.int32), row_ptr.to(torch.int32), order.to(torch.int32), (m, k))
        if k > 65536:
            ref = REFERENCE_OPS[(SPARSECNN_DOMAIN, "CsrGemm")](ctx)
            ctx.info.update(reason="K > 65536: reference op (torch sparse)")
            return ref
        ctx.inputs_used = used_inputs(ctx)
        args = (torch.randn(1, k, device=self.device).to(ctx.dtype),)
        if residual:
            args += (torch.randn(1, m, device=self.device).to(ctx.dtype),)
        wide_plans: dict[int, ConvPlan] = {}

        def run_plan(plan, t, r=None):
            n = t.shape[0]
            if n <= GEMV_MAX_BATCH:
                return plan(t, r)
            if n not in wide_plans:  # built outside capture: GraphReplay warms up first
                g = gemm_as_conv_geometry(m, k, n)
                wide_plans[n] = ConvPlan(csr, g, spmm_config(g, 1, 4), ctx.dtype, self.device, self.backend, bias, relu)
            return gemm_conv_plan_call(wide_plans[n], t, r)

        def make_dense():
            w = csr.to_dense().to(self.device, ctx.dtype)
            b = bias.to(self.device, ctx.dtype) if bias is not None else None

            def fn(t, r=None):
                return epilogue(torch.nn.functional.linear(t, w, b), None, r, relu)

            return fn, [w] + ([b] if b is not None else []), "torch.linear (cuBLAS)"

        class _Gemv:  # one "config": the SpMV kernel
            def to_dict(self):
                return {"kernel": "spmv"}

            def label(self):
                return "spmv warp-per-row"

        self.dense_fp32_bytes[ctx.name] = m * k * 4 + (m * 4 if bias is not None else 0)
        fn, info, bufs, decision = self._choose(
            ctx, csr.density, [_Gemv()],
            lambda cfg: GemvPlan(csr, ctx.dtype, self.device, self.backend, bias, relu), run_plan, make_dense, args,
            lambda cfg: f"csr::csr_spmv (batch <= {GEMV_MAX_BATCH}), csr::csr_conv spmm above")
        ctx.info.update(nnz=csr.nnz, sparsity=1.0 - csr.density, relu_fused=relu, residual_fused=residual, buffers=bufs,
                        **info)
        self.decisions[ctx.name] = decision
        return fn
