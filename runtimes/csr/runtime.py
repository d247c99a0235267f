"""The `csr` runtime: unstructured weight sparsity on Sputnik-style CSR kernels (issue 5).

rewrite: `csr_rewrite` turns each pruned Conv (group 1) and Gemm into `sparsecnn::CsrConv` /
`CsrGemm` with the weight stored as CSR initializers, the residual Add and the Relu after it
fused into the op (a ResNet block's Conv -> Add -> Relu is one kernel); layers too dense or
excluded stay standard ONNX ops.

compile: on CUDA each CSR op is prepared for a few kernel configurations (runtimes/csr/
kernels.py); the one chooser (runtimes/chooser.py) checks each against the layer's dense form
and times them against the layer's best dense forms (dense_conv's cuDNN NCHW/NHWC and
im2col + cuBLAS on the decompressed weight, then the fused residual add and ReLU as torch
ops): a CSR config runs only where it beats the fastest dense form by the margin, and the
report says why. The whole network replays as one CUDA graph, and the whole-graph guard
(base.Engine) falls back to dense where the sparse engine would be slower. On CPU the
reference implementations run.

Options (CompileOptions.extra):
  csr_decide       "measure" (default): time sparse and dense per layer, keep the faster (by the margin);
                   "threshold": sparse when density <= csr_max_density; "sparse": always sparse
  csr_max_density  density above which a layer stays dense (rewrite and "threshold"; default 0.3)
  csr_autotune     time every candidate config (default True) or take the first
  csr_tune_reps    timed repetitions per candidate (default: choose_reps, 15 when unset)
  choose_margin    a CSR config must beat the best dense form by this fraction (default 0.03)
  guard            whole-graph guard: fall back to dense where the engine would be slower (default True)
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
from ..chooser import MARGIN, Switch
from ...passes.csr.reference import OPS as REFERENCE_OPS
from ...passes.csr.reference import bias_tensor, conv_geometry, csr_tensors, epilogue, has_residual, used_inputs
from ..executor import Executor
from ..ops import NodeContext
from .options import OPTIONS  # noqa: F401  (declared options: runtimes/options.py)

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
        return {}  # the per-layer decisions travel as the base engine's `choices`


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


def config_candidates(configs, make_plan, run_plan, kernel_of) -> tuple[list, list[dict]]:
    """The kernel configs whose plan fits the layer, as the one chooser's candidates (library "csr",
    `fn(*args)` = `run_plan(plan, *args)`), and the configs skipped, with why."""
    from ..chooser import Candidate
    from .kernels import PlanDoesNotFit

    candidates, skipped = [], []
    for cfg in configs:
        try:
            plan = make_plan(cfg)
        except PlanDoesNotFit as exc:  # e.g. a staged-sparse config whose non-zeros overflow shared memory
            skipped.append({"config": cfg.label(), "skipped": str(exc)})
            continue
        candidates.append(Candidate(cfg.label(), (lambda *t, p=plan: run_plan(p, *t)), dense=False, library="csr",
                                    detail={"config": cfg.to_dict(), "kernel": kernel_of(cfg),
                                            "csr_bytes": _nbytes(plan.buffers())}, buffers=plan.buffers()))
    return candidates, skipped


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
        self.reps = int(extra.get("csr_tune_reps", extra.get("choose_reps", 15)))
        self.margin = float(extra.get("choose_margin", MARGIN))
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        state = state or {}
        self.saved = dict(state.get("choices") or {})       # Decision dicts (chooser.Decision.to_dict)
        self.legacy = dict(state.get("layers") or {})       # engines saved before the one chooser
        budget = extra.get("csr_weight_budget", 0.0)
        self.weight_budget = float(budget) if budget not in (None, False, "off") else 0.0
        self.dense_fp32_bytes: dict[str, int] = {}  # per CSR layer: its weight (+ bias) as dense fp32
        self.switches: list[Switch] = []

    def _choose(self, ctx: NodeContext, density: float, configs: list, make_plan, run_plan, dense_forms: list,
                args: tuple, kernel_of) -> Switch:
        """Sparse (a candidate config) or one of the layer's dense forms, by the one chooser.

        `args`: inputs of the layer's function at its real shape and layout (x, and the residual
        when the op has one), so sparse candidates are timed with their fused epilogue and the
        dense forms with the residual add and ReLU they replace. Weight-sparse kernels' speed
        does not depend on the input values: they are checked and timed on random values. A
        reloaded engine takes its saved decision without timing anything."""
        from ..chooser import Chooser
        from .kernels import config_from_dict

        saved = self.saved.get(ctx.name)
        legacy = self.legacy.get(ctx.name)
        forced, why = None, None
        if saved is not None:  # build only what the saved decision needs
            wanted = saved.get("chosen")
            configs = [c for c in configs if c.label() == wanted]
            if not configs and not str(wanted).startswith("dense:") and saved.get("detail", {}).get("config"):
                configs = [config_from_dict(saved["detail"]["config"])]
        elif legacy is not None:
            if legacy.get("format") == "dense":
                configs, forced, why = [], dense_forms[0].name, legacy.get("reason", "saved decision")
            else:
                configs = [c for c in configs if c.to_dict() == legacy["config"]] or [config_from_dict(legacy["config"])]
                forced, why = configs[0].label(), "saved decision"
        elif self.decide == "threshold" and density > self.max_density:
            configs, forced = [], dense_forms[0].name
            why = f"density {density:.3f} > csr_max_density {self.max_density}"
        elif not self.autotune:
            configs = configs[:1]
        sparse, skipped = config_candidates(configs, make_plan, run_plan, kernel_of)
        candidates = list(dense_forms) + sparse
        if forced is None and configs and len(candidates) == len(dense_forms):
            why = "no candidate config fits this layer"
        chooser = Chooser(self.device, ctx.dtype, tf32=self.opts.tf32, margin=self.margin, reps=self.reps,
                          policy="sparse" if self.decide == "sparse" else "measure")
        decision = chooser.choose(ctx.name, candidates, args, reference=dense_forms[0].name, saved=saved,
                                  forced=forced)
        if why is not None:
            decision.reason = why
        sw = Switch(decision, candidates, ctx.info, describe=self._describe)
        self._describe(sw, skipped)
        self.switches.append(sw)
        return sw

    @staticmethod
    def _describe(sw: Switch, skipped: list | None = None) -> None:
        """The per-layer report of a CSR layer in its current state."""
        d, cand, info = sw.decision, sw.candidates[sw.active], sw.info
        times = d.times_ms
        rows = [{"config": n, "us": round(ms * 1e3, 3)} for n, ms in times.items() if not n.startswith("dense:")]
        rows += list(skipped or [])
        if rows:
            info["candidates"] = rows
        dense_times = {n: ms for n, ms in times.items() if n.startswith("dense:")}
        if dense_times:
            info["dense_us"] = round(min(dense_times.values()) * 1e3, 3)
        if cand.dense:
            why = info.get("choice", {}).get("why") if sw.active != d.chosen else None
            info.update(format="dense", kernel=cand.detail.get("kernel", cand.name), reason=why or d.reason or "dense")
        else:
            info.update(format="csr", config=cand.detail["config"], config_label=cand.name,
                        kernel=cand.detail["kernel"], csr_bytes=cand.detail["csr_bytes"])
            info.pop("reason", None)
        if cand.name in times:
            info["time_us"] = round(times[cand.name] * 1e3, 3)
        info["buffers"] = cand.buffers

    def apply_weight_budget(self, executor) -> None:
        """Send dense-by-measure layers back to their best sparse plan until the engine's weights fit
        `weight_budget` x the model's dense fp32 weights (the layers saving least time per extra
        byte go back first). Reference: every constant the engine keeps for other ops, at 4
        bytes an element, plus each CSR layer's weight and bias as dense fp32."""
        if self.weight_budget <= 0:
            return
        ref = sum(v.numel() * 4 for v in executor.consts.values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()) + sum(self.dense_fp32_bytes.values())
        cap = self.weight_budget * ref
        total = executor.weight_bytes()
        pending = []
        for sw in self.switches:
            sparse = sw.best_sparse()
            if sw.is_dense and sparse is not None:
                extra_bytes = _nbytes(sw.candidates[sw.active].buffers) - \
                    sw.candidates[sparse].detail["csr_bytes"]
                saving = sw.decision.times_ms.get(sparse, 0.0) - sw.decision.times_ms.get(sw.active, 0.0)
                pending.append((saving / max(1, extra_bytes), sw, sparse, extra_bytes, saving))
        pending.sort(key=lambda e: e[0])  # least saving per byte first
        for _, sw, sparse, extra_bytes, saving in pending:
            if total <= cap:
                break
            dense_us = sw.info.get("time_us")
            why = f"kept sparse by csr_weight_budget {self.weight_budget}"
            sw.decision.chosen, sw.decision.dense, sw.decision.library = sparse, False, "csr"
            sw.decision.reason = why
            sw.use(sparse)  # refreshes the report (describe)
            total -= extra_bytes
            sw.info.update(budget=f"{why}: dense was {saving * 1e3:.1f} us faster but needs "
                                  f"{extra_bytes / 2**20:.1f} MiB more",
                           reason=f"weight budget (dense measured {dense_us} us)")

    def _dense_forms(self, ctx: NodeContext, w: torch.Tensor, bias, relu: bool, pads, stride, dilation,
                     x: torch.Tensor) -> list:
        """The layer's dense forms (dense_conv's engines on the decompressed weight), each with the
        fused bias, residual add and ReLU as torch ops: fn(x, residual=None)."""
        from ..torch.dense_conv import DenseConv

        b = bias.to(self.device, ctx.dtype) if bias is not None else None
        dense = DenseConv(ctx.name, w.to(self.device, ctx.dtype), stride, dilation, 1, lambda t: pads, "best", {},
                          ctx.options)
        forms = dense.dense_candidates(x, b, epilogue=lambda y, r=None: epilogue(y, None, r, relu))
        for f in forms:
            f.buffers = [dense.w] + ([b] if b is not None else [])
        return forms

    def build_conv(self, ctx: NodeContext):
        from .kernels import ConvGeometry, candidate_configs, kernel_name, make_plan

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

        dense_forms = self._dense_forms(ctx, csr.to_dense().reshape(m, geom.c, kh, kw), bias, relu,
                                        (pt, pl, pb, pr), (sh, sw), (dh, dw), x)
        self.dense_fp32_bytes[ctx.name] = m * geom.k * 4 + (m * 4 if bias is not None else 0)
        ctx.info.update(nnz=csr.nnz, sparsity=1.0 - csr.density, relu_fused=relu, residual_fused=residual)
        return self._choose(
            ctx, csr.density, candidate_configs(geom, self.sms, dtype=ctx.dtype, arch=getattr(self.backend, "arch", None)),
            lambda cfg: make_plan(csr, geom, cfg, ctx.dtype, self.device, self.backend, bias, relu),
            lambda plan, t, r=None: plan.conv(t, r), dense_forms, args, lambda cfg: kernel_name(cfg, ctx.dtype))

    def build_gemm(self, ctx: NodeContext):
        from ..chooser import Candidate
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

        w = csr.to_dense().to(self.device, ctx.dtype)
        b = bias.to(self.device, ctx.dtype) if bias is not None else None
        dense_forms = [Candidate("dense:linear", lambda t, r=None: epilogue(torch.nn.functional.linear(t, w, b), None, r, relu),
                                 dense=True, library="torch",
                                 detail={"kernel": "torch.linear (cuBLAS)"}, buffers=[w] + ([b] if b is not None else []))]

        class _Gemv:  # one "config": the SpMV kernel
            def to_dict(self):
                return {"kernel": "spmv"}

            def label(self):
                return "spmv warp-per-row"

        self.dense_fp32_bytes[ctx.name] = m * k * 4 + (m * 4 if bias is not None else 0)
        ctx.info.update(nnz=csr.nnz, sparsity=1.0 - csr.density, relu_fused=relu, residual_fused=residual)
        return self._choose(
            ctx, csr.density, [_Gemv()],
            lambda cfg: GemvPlan(csr, ctx.dtype, self.device, self.backend, bias, relu), run_plan, dense_forms, args,
            lambda cfg: f"csr::csr_spmv (batch <= {GEMV_MAX_BATCH}), csr::csr_conv spmm above")
