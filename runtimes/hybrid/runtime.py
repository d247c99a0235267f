"""The `hybrid` runtime: per layer the fastest correct implementation over every library.

Each library is a silo with its own engine; the per-layer tables show that the winners differ
layer by layer. `hybrid` rewrites and compiles the pruned model once and, for each layer,
puts every library's implementation of it before the one chooser (runtimes/chooser.py):

- rewrite: csr's pass (passes/csr/rewrite.py) with a higher density cap (2:4 layers join),
  which groups Conv -> Add -> Relu into one CsrConv, then `fuse_csr_pool`, which groups a
  CsrConv -> MaxPool into CsrConvPool. A group is the unit of choice: a candidate computes the
  whole group, so fusions are part of the choice (PECR covers conv+ReLU+pool in one kernel; a
  CSR kernel covers conv+bias+residual+ReLU and is followed by a torch max-pool; the dense
  forms run cuDNN / im2col and the rest as torch ops).
- candidates per group (`LIBRARIES`; `hybrid_libraries` narrows them): the layer's dense forms
  (dense_conv's engines: cuDNN NCHW / NHWC, im2col + cuBLAS), csr's kernel configs,
  ecr / pecr's variants (where the geometry allows: dilation 1), cuSPARSELt for 2:4 weights
  (fp16 on CUDA), sparsert's generated kernels (a few tile configs per group, each generated
  with the weights baked in and compiled with NVRTC when the group chooses: the compile time
  is the price; `sparsert_max_configs`, `sparsert_max_instructions`). A library that cannot
  take a group says why ("unsupported: ...") in the report. Every candidate takes and returns
  NCHW-contiguous tensors, so a layout change a library needs (cuSPARSELt's NHWC im2col,
  dense:cudnn_nhwc) is inside its measured time.
- choice: at compile time on the layer's *real* input — calibration images (`calibration=`)
  run through the network, each group choosing on what its predecessors produce, because
  ecr's speed depends on input zeros (without calibration a random input is used, and the
  report says so). Rules are the chooser's: checked against cuDNN, timed interleaved in CUDA
  graphs, sparse only where it beats the best dense form by the margin.
- guard: the base Engine's whole-graph guard: the network as chosen against all dense and
  uniformly cuDNN NCHW / NHWC; a slower engine reverts its least profitable half of sparse
  layers, then all; `engine.plans` says what was reverted.
- reload: decisions and plans are saved in the engine file and replayed without timing; the
  card they were measured on is saved too: on another card the report says the choices were
  made elsewhere (on another compute capability they are measured again).

On CPU without kernels the reference ops run (CsrConv / CsrConvPool in torch), for checking.
"""
from __future__ import annotations

import warnings

import onnx
import torch

from ...common.errors import UserError
from ...passes.csr.layout import CSR
from ...passes.csr.reference import bias_tensor, conv_geometry, csr_tensors, epilogue, has_residual
from ...passes.csr.rewrite import CSR_CONV_POOL, csr_rewrite, fuse_csr_pool
from ...passes.ecr.reference import max_pool, pool_geometry
from ...passes.graph import SPARSECNN_DOMAIN, PassResult, run_pipeline
from ..base import CompileOptions, Engine, calibration_input, card_properties, with_saved_decisions
from ..executor import Executor
from ..ops import NodeContext
from ..options import DENSE_CONV, SHARED_OPTIONS, Option, with_default
from ..sparsert.codegen import DEFAULT_MAX_CONFIGS, DEFAULT_MAX_INSTRUCTIONS

name = "hybrid"
LIBRARIES = ("csr", "ecr", "cusparselt", "sparsert")
DEFAULT_MAX_DENSITY = 0.6  # 2:4 layers (density 0.5) become groups too: cuSPARSELt is one of their candidates
OPTIONS = [
    *[o for o in SHARED_OPTIONS if o is not DENSE_CONV],
    with_default(DENSE_CONV, "best", "how convs outside any group (too dense, grouped, excluded) run (default best "
                 "on GPU: per layer the fastest dense form, measured)"),
    Option("hybrid_libraries", list, list(LIBRARIES), "the sparse libraries whose implementations compete per "
           "layer (the dense forms always do: 'dense' may be named, alone it means no sparse library)",
           choices=("dense", *LIBRARIES)),
    Option("hybrid_max_density", float, DEFAULT_MAX_DENSITY, "layers denser than this are not grouped (they run "
           "dense)", minimum=0.0),
    Option("csr_exclude", list, [], "layers to leave dense (weight or module names, globs)"),
    Option("sparsert_max_configs", int, DEFAULT_MAX_CONFIGS, "sparsert tile configs generated per group, each one "
           "NVRTC compile at compile time", minimum=1),
    Option("sparsert_max_instructions", int, DEFAULT_MAX_INSTRUCTIONS, "code-size cap per generated sparsert kernel "
           "(a group with more non-zeros gets no sparsert candidate)", minimum=1),
    Option("batch", int, 1, "calibration batch when no calibration input is given", minimum=1),
]


def available() -> tuple[bool, str]:
    from ..csr.runtime import available as kernels_available  # the same needs: NVRTC on a GPU, else references

    ok, why = kernels_available()
    return ok, (f"per layer the fastest of dense, {', '.join(LIBRARIES)}; {why}" if ok else why)


def _options(options) -> CompileOptions:
    return options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)


def passes(options=None) -> list:
    extra = _options(options).extra
    return [(csr_rewrite, {"max_density": float(extra.get("hybrid_max_density", DEFAULT_MAX_DENSITY)),
                           "exclude": list(extra.get("csr_exclude", [])), "fuse_residual": True}),
            (fuse_csr_pool, {})]


def rewrite_with_report(model: onnx.ModelProto, options=None) -> tuple[onnx.ModelProto, list[PassResult]]:
    return run_pipeline(model, passes(options))


def rewrite(model: onnx.ModelProto, options=None) -> onnx.ModelProto:
    return rewrite_with_report(model, options)[0]


# --- one group and its candidates ----------------------------------------------------------

class Backends:
    """The kernels each library runs with: real ones on CUDA; the CPU tests pass emulators."""

    _mma, _mma_made = None, False  # conv2to4_mma.cu's launcher (the `mma` property)

    def __init__(self, device: torch.device, csr=None, ecr=None, two_four: str | None = None, sparsert=None):
        self.device = device
        self.csr, self.ecr, self.two_four = csr, ecr, two_four
        self.sparsert = sparsert  # sparsert.runtime.KernelLoader: NVRTC, or the IR interpreter in CPU tests
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        self._scratch = None

    @classmethod
    def for_device(cls, device: torch.device, dtype: str) -> "Backends":
        from ..csr.kernels import NvrtcBackend
        from ..ecr.runtime import KernelSet
        from ..sparsert.runtime import KernelLoader

        two_four = None
        if dtype in ("fp16", "bf16"):
            from ..cusparselt.runtime import cusparselt_available as cslt_available

            two_four = "cslt" if cslt_available()[0] else None
        return cls(device, NvrtcBackend(device), KernelSet.get(device), two_four, KernelLoader(device))

    @property
    def mma(self):
        """conv2to4_mma.cu's launcher (cusparselt/mma_conv.py), made on first use where the kernel is offered
        (CUDA sm_80+), else None; the CPU tests set the emulator."""
        if not self._mma_made:
            from ..cusparselt.runtime import mma_backend

            self._mma, self._mma_made = mma_backend(self.device, "fp16"), True
        return self._mma

    @mma.setter
    def mma(self, launcher) -> None:
        self._mma, self._mma_made = launcher, True

    @property
    def scratch(self):
        from ..ecr.runtime import Scratch

        if self._scratch is None:
            self._scratch = Scratch(self.device)
        return self._scratch


class Group:
    """One CsrConv / CsrConvPool node: conv (+bias) (+residual) (+ReLU) (+max-pool), with its
    candidates from every library; `choose(x, residual)` decides on the real input."""

    def __init__(self, ctx: NodeContext, backends: Backends, libraries: list[str]):
        from ..torch.dense_conv import DenseConv

        self.ctx, self.name, self.backends, self.libraries = ctx, ctx.name, backends, list(libraries)
        g = conv_geometry(ctx)
        self.g = g
        values, cols, row_ptr, order = csr_tensors(ctx)
        m = row_ptr.numel() - 1
        kh, kw = g["kernel"]
        self.csr = CSR(values, cols.to(torch.int32), row_ptr.to(torch.int32), order.to(torch.int32),
                       (m, g["in_channels"] * kh * kw))
        self.weight = self.csr.to_dense().reshape(m, g["in_channels"], kh, kw)
        self.bias_fp32 = bias_tensor(ctx)  # CPU fp32: what the csr plans and the ECR packing take
        bias = self.bias_fp32
        self.bias = bias.to(ctx.device, ctx.dtype) if bias is not None else None
        self.relu, self.residual = g["relu"], has_residual(ctx)
        self.pool = pool_geometry(ctx.attrs) if ctx.node.op_type == CSR_CONV_POOL else None
        self.dense = DenseConv(ctx.name, self.weight.to(ctx.device, ctx.dtype), g["stride"], g["dilation"], 1,
                               lambda t: g["pads"], "best", {}, ctx.options)
        self.unsupported: dict[str, str] = {}
        self.library_of: dict[str, str] = {}
        self.sparsert_prepared: tuple | None = None  # (input shape, LayerPrograms) compiled ahead (prepare_sparsert)
        ctx.inputs_used = [0, 6] if self.residual else [0]  # the weight lives in the candidates
        fused = [s for s, on in (("bias", bias is not None), ("residual", self.residual), ("relu", self.relu),
                                 ("maxpool", self.pool is not None)) if on]
        ctx.info.update(group="conv" + "".join("+" + f for f in fused), nnz=self.csr.nnz,
                        sparsity=round(1.0 - self.csr.density, 4))

    def after(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of the group after a conv output y (bias already in): residual, ReLU, max-pool."""
        y = epilogue(y, None, residual, self.relu)
        return max_pool(y, self.pool) if self.pool is not None else y

    # each library's implementations of this group (empty, with a reason, where it has none)
    def dense_candidates(self, x: torch.Tensor) -> list:
        forms = self.dense.dense_candidates(x, self.bias, epilogue=lambda y, r=None: self.after(y, r).contiguous())
        for f in forms:
            f.buffers = [self.dense.w] + ([self.bias] if self.bias is not None else [])
        return forms

    def csr_candidates(self, x: torch.Tensor) -> list:
        from ..csr.kernels import ConvGeometry, candidate_configs, kernel_name, make_plan
        from ..csr.runtime import config_candidates

        if self.backends.csr is None:
            return self._no("csr", "no CSR kernels on this device")
        (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = (self.g[k] for k in ("kernel", "stride", "pads", "dilation"))
        geom = ConvGeometry(self.csr.shape[0], self.g["in_channels"], x.shape[2], x.shape[3], kh, kw, sh, sw,
                            pt, pl, pb, pr, dh, dw)
        bias = self.bias_fp32
        dtype, device, backend = self.ctx.dtype, self.backends.device, self.backends.csr
        pool = self.pool

        def run(plan, t, r=None):
            y = plan.conv(t, r)
            return max_pool(y, pool).contiguous() if pool is not None else y

        cands, _ = config_candidates(candidate_configs(geom, self.backends.sms, dtype=dtype,
                                                       arch=getattr(backend, "arch", None)),
                                     lambda cfg: make_plan(self.csr, geom, cfg, dtype, device, backend, bias, self.relu),
                                     run, lambda cfg: kernel_name(cfg, dtype))
        return cands or self._no("csr", "no kernel config fits this layer")

    def ecr_candidates(self, x: torch.Tensor) -> list:
        from ..ecr.runtime import EcrLayer, kernel_candidates

        if self.backends.ecr is None:
            return self._no("ecr", "no ECR kernels on this device")
        if self.g["dilation"] != (1, 1):
            return self._no("ecr", "dilated conv (the ECR kernels run dilation 1)")
        if x.dtype not in (torch.float32, torch.float16):
            return self._no("ecr", f"the ECR kernels read fp32 or fp16, not {x.dtype}")
        attrs = {"kernel_shape": list(self.g["kernel"]), "strides": list(self.g["stride"]),
                 "pads": list(self.g["pads"])}
        # ECR fuses ReLU (and PECR the pool) only without a residual in between: otherwise the
        # kernel computes the conv and the group's rest runs as torch ops
        fused_relu = self.relu and not self.residual
        w = self.weight.to(self.backends.device, torch.float32)
        bias = self.bias_fp32
        layer = EcrLayer(w, bias.to(w.device) if bias is not None else None, attrs,
                         self.pool if fused_relu else None, fused_relu, self.backends.scratch, self.backends.ecr)
        if fused_relu:  # the kernel is the whole group: ECR with its ReLU, or PECR with the pool
            cands = kernel_candidates(layer, x)
        else:
            cands = kernel_candidates(layer, x, after=lambda y, r=None: self.after(y, r).contiguous())
        for c in cands:
            c.detail["format"] = "pecr" if (fused_relu and self.pool is not None) else "ecr"
        return cands or self._no("ecr", "no ECR variant fits this layer")

    def two_four_candidates(self, x: torch.Tensor) -> list:
        from ...passes.masks import is_2to4
        from ...passes.two_four.layout import conv_gemm_view
        from ..chooser import Candidate
        from ...passes.two_four.layout import pack_2to4
        from ..cusparselt.mma_conv import NAME as MMA, MmaConv, mma_unavailable
        from ..cusparselt.runtime import ConvLowering, SparseGemm

        if self.backends.two_four is None and self.backends.mma is None:
            return self._no("cusparselt", "cuSPARSELt runs fp16/bf16 on CUDA only; "
                            + (mma_unavailable(self.backends.device, x.dtype) or "no mma.sp kernel here"))
        if not is_2to4(self.weight, axis=1):
            return self._no("cusparselt", "not 2:4")
        cands = []
        if self.backends.two_four is not None:
            a = conv_gemm_view(self.weight).to(self.backends.device, self.ctx.dtype)
            gemm = SparseGemm(a, self.bias, self.backends.two_four)
            lowering = ConvLowering(self.ctx, gemm, list(self.g["kernel"]))
            cands.append(Candidate("cusparselt", lambda t, r=None: self.after(lowering(t), r).contiguous(),
                                   dense=False, library="cusparselt",
                                   detail={"kernel": "cuSPARSELt 2:4 (im2col + sparse GEMM)", **lowering.describe(x)},
                                   buffers=list(gemm.buffers)))
        if self.backends.mma is None:
            self.unsupported[MMA] = mma_unavailable(self.backends.device, x.dtype) or "no mma.sp kernel here"
            return cands
        # sparsecnn's implicit-GEMM mma.sp conv (library cusparselt: the 2:4 runtime's folder, so a reload
        # rebuilds it): bias, residual and ReLU in the kernel, the pool after; NCHW in and out like every
        # candidate, the layout changes inside its measured time. MmaConv says why it cannot run a layer.
        try:
            values, positions = pack_2to4(conv_gemm_view(self.weight).to(torch.float16))
            conv = MmaConv(values, positions, self.g["kernel"], self.g["stride"], self.g["dilation"],
                           list(self.g["pads"]), self.bias_fp32, self.relu, self.backends.mma, self.backends.device,
                           dtype=x.dtype)
        except (NotImplementedError, ValueError) as exc:
            self.unsupported[MMA] = str(exc)
            return cands
        pool = self.pool

        def run(t, r=None):
            y = conv(t.contiguous(memory_format=torch.channels_last), r)
            return (max_pool(y, pool) if pool is not None else y).contiguous()

        cands.append(Candidate(MMA, run, dense=False, library="cusparselt", detail=conv.describe(x),
                               buffers=list(conv.buffers)))
        return cands

    def sparsert_candidates(self, x: torch.Tensor, config: str | None = None) -> list:
        """sparsert's kernels generated for this group's weights and input size (its one home,
        sparsert.runtime.node_candidates); a pooled group's pool runs after the kernel.
        `config`: only that one (a reload replays its saved config, nothing else is compiled)."""
        from ..sparsert.runtime import node_candidates

        if self.backends.sparsert is None:
            return self._no("sparsert", "no generated kernels on this device (NVRTC and a CUDA GPU)")
        pool = self.pool
        opts = self.ctx.options
        prepared = self.sparsert_prepared
        prepared = prepared[1] if prepared and config is None and prepared[0] == tuple(x.shape) else None
        cands, why, cost = node_candidates(
            self.ctx, x, self.backends.sparsert, int(opts.get("sparsert_max_configs", DEFAULT_MAX_CONFIGS)),
            int(opts.get("sparsert_max_instructions", DEFAULT_MAX_INSTRUCTIONS)), config,
            after=(lambda y: max_pool(y, pool).contiguous()) if pool is not None else None, prepared=prepared)
        if cost:
            self.ctx.info["sparsert_build_s"] = cost  # generating and compiling: hybrid's compile-time price
        return cands or self._no("sparsert", why or "no generated kernel")

    def _no(self, library: str, why: str) -> list:
        self.unsupported[library] = why
        return []

    def candidates(self, x: torch.Tensor, only: set[str] | None = None, saved: dict | None = None) -> list:
        """Dense forms first (the reference is cuDNN), then each allowed library's; `only`: the
        libraries to build (a reloaded engine builds only what its saved decision needs, and a
        saved sparsert choice only its config: `saved`, the saved Decision)."""
        self.unsupported.clear()
        out = self.dense_candidates(x)
        saved_config = (saved.get("detail") or {}).get("config") if saved and saved.get("library") == "sparsert" \
            else None
        makers = {"csr": self.csr_candidates, "ecr": self.ecr_candidates, "cusparselt": self.two_four_candidates,
                  "sparsert": lambda t: self.sparsert_candidates(t, saved_config)}
        for lib in self.libraries:
            if only is None or lib in only:
                try:
                    out += makers[lib](x)
                except Exception as exc:  # one library failing to build must not take the others down
                    self.unsupported[lib] = f"failed to build: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return out

    def choose(self, args: list, chooser, saved: dict | None = None):
        from ..chooser import Switch

        x = args[0]
        residual = args[1] if self.residual and len(args) > 1 else None
        call = (x,) if residual is None else (x, residual)
        only = None
        if saved and saved.get("chosen"):
            only = {saved.get("library")} if not str(saved["chosen"]).startswith("dense:") else set()
        candidates = self.candidates(x, only, saved if only is not None else None)
        self.library_of = {c.name: ("dense" if c.dense else c.library) for c in candidates}
        decision = chooser.choose(self.name, candidates, call, reference="dense:cudnn", saved=saved)
        sw = Switch(decision, candidates, self.ctx.info, describe=self.describe)
        self.describe(sw, x)
        return sw

    def describe(self, sw, x: torch.Tensor | None = None) -> None:
        """The per-layer report in the layer's current state (again after the guard switches it)."""
        d, cand, info = sw.decision, sw.candidates[sw.active], sw.info
        if x is not None:
            info["input_sparsity"] = round(float((x == 0).float().mean()), 4)
        info.update(library="dense" if cand.dense else cand.library,
                    format="dense" if cand.dense else cand.detail.get("format", cand.library),
                    kernel=cand.detail.get("kernel", cand.name))
        best: dict[str, float] = {}
        for cand_name, ms in d.times_ms.items():  # each library's best: who lost, by how much
            lib = self.library_of.get(cand_name, "?")
            best[lib] = min(best.get(lib, ms), ms)
        if best:
            info["libraries_ms"] = {k: round(v, 4) for k, v in sorted(best.items(), key=lambda kv: kv[1])}
        if self.unsupported:
            info["unsupported"] = dict(self.unsupported)
        if cand.name in d.times_ms:
            info["time_us"] = round(d.times_ms[cand.name] * 1e3, 3)
        if cand.dense:
            info["reason"] = (info.get("choice", {}).get("why") if sw.active != d.chosen else None) or d.reason
        else:
            info.pop("reason", None)
        info["buffers"] = cand.buffers

    def __call__(self, x, residual=None):  # before `choose` (not reached by a compiled engine): cuDNN
        return self.after(self.dense.run_mode("cudnn", x, self.bias), residual)


# --- the engine --------------------------------------------------------------------------

class HybridEngine(Engine):
    runtime = name

    def __init__(self, *args, groups: dict | None = None, chooser=None, card: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups: dict[str, Group] = dict(groups or {})
        self.chooser = chooser
        self.card = card or {}

    def saved_state(self) -> dict:
        return {"card": self.card}

    def calibrate(self, *inputs: torch.Tensor, saved: dict | None = None) -> None:
        """Choose every group on `inputs` run through the network (each group sees what its
        predecessors produce); `saved`: decisions to replay instead of measuring."""
        def before(step, args):
            group = self.groups.get(step.name)
            if group is not None and not hasattr(step.fn, "decision"):
                step.fn = group.choose(args, self.chooser, (saved or {}).get(group.name))

        self.walk_to_choose(inputs, before, replaying=saved is not None)


def prepare_sparsert(groups: dict[str, Group], model: onnx.ModelProto, loader, options: dict, batch: int) -> int:
    """Generate and compile sparsert's programs for every group whose input shape shape inference knows,
    in one parallel batch, before calibration visits the groups one by one (each would wait for its own
    NVRTC run: minutes on ResNet-18). A group whose real input differs compiles its own then. Returns
    how many groups were prepared."""
    from ...passes.graph import static_shapes
    from ..sparsert.runtime import prepare_nodes

    shapes = static_shapes(model)
    items = []
    for g in groups.values():
        dims = shapes.get(g.ctx.node.input[0])
        if dims and len(dims) == 4 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            items.append((g.ctx, (batch, *dims[1:])))
    prepared = prepare_nodes(items, loader, int(options.get("sparsert_max_configs", DEFAULT_MAX_CONFIGS)),
                             int(options.get("sparsert_max_instructions", DEFAULT_MAX_INSTRUCTIONS)))
    for name, entry in prepared.items():
        groups[name].sparsert_prepared = entry
    return len(prepared)


def _card(device: torch.device) -> dict:
    """What a saved engine's choices were measured on (base.card_properties, as the engine file keeps it)."""
    props = card_properties(device)
    if props is None:
        return {"name": "cpu", "capability": "cpu"}
    major, minor = props["capability"]
    return {"name": props["name"], "capability": f"sm_{major}{minor}"}


def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None, calibration: torch.Tensor | None = None) -> HybridEngine:
    opts = _options(options)
    dev = torch.device(device)
    if dev.type != "cuda":  # the reference ops: correct, not fast
        from ..reference_ops import reference_ops

        ex = Executor(model, dev, opts.dtype, ops=reference_ops(), channels_last=False, options=opts.extra)
        return HybridEngine(model, dev, opts, ex, card=_card(dev))
    ok, why = available()
    if not ok:
        raise UserError(f"runtime 'hybrid' cannot run on {dev}: {why}")
    return compile_with_backends(model, dev, opts, state, calibration, Backends.for_device(dev, opts.dtype))


def compile_with_backends(model: onnx.ModelProto, device, options=None, state: dict | None = None,
                          calibration: torch.Tensor | None = None, backends: Backends | None = None) -> HybridEngine:
    """compile() with explicit library kernels: the CPU tests pass emulators, so the planning,
    grouping, guard and save/reload run on CPU tensors."""
    from ..chooser import MARGIN, Chooser
    from ..csr.runtime import _KernelSession
    from ..reference_ops import reference_ops

    opts = _options(options)
    dev = torch.device(device)
    if opts.channels_last:
        raise UserError("the hybrid runtime plans NCHW activations (each candidate prices its own layout); "
                        "drop --channels-last")
    opts.extra.setdefault("dense_conv", "best")
    libraries = [lib for lib in opts.extra.get("hybrid_libraries", LIBRARIES) if lib != "dense"]  # dense always is
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        raise UserError(f"hybrid_libraries: unknown {', '.join(unknown)}; choose from dense, {', '.join(LIBRARIES)}")
    backends = backends or Backends(dev)
    state = dict(state or {})
    card = _card(dev)
    saved_card = state.get("card") or {}
    saved = dict(state.get("choices") or {})
    note = None
    if saved and saved_card and saved_card.get("capability") != card["capability"]:
        note = (f"choices saved on {saved_card.get('name')} ({saved_card.get('capability')}) were measured again on "
                f"{card['name']} ({card['capability']}): another compute capability")
        saved = {}
        warnings.warn("hybrid: " + note)
    elif saved and saved_card and saved_card.get("name") != card["name"]:
        note = f"choices were made on {saved_card.get('name')}, not on this {card['name']} (same compute capability)"
    groups: dict[str, Group] = {}

    def build_group(ctx: NodeContext):  # decided at calibration, on the real input (its shape included)
        group = Group(ctx, backends, libraries)
        groups[ctx.name] = group
        return group

    session = None
    table = {**reference_ops(), (SPARSECNN_DOMAIN, "CsrConv"): build_group, (SPARSECNN_DOMAIN, CSR_CONV_POOL): build_group}
    if backends.csr is not None:  # fully connected layers: csr's SpMV against cuBLAS
        session = _KernelSession(dev, opts, state, backends.csr)
        table[(SPARSECNN_DOMAIN, "CsrGemm")] = session.build_gemm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older cuSPARSELt search APIs' deprecation notice
        ex = Executor(model, dev, opts.dtype, ops=table, channels_last=False,
                      options=with_saved_decisions(opts.extra, state))
    reps = int(opts.extra.get("choose_reps", 30))
    chooser = Chooser(dev, ex.dtype, tf32=opts.tf32, reps=reps, margin=float(opts.extra.get("choose_margin", MARGIN)))
    engine = HybridEngine(model, dev, opts, ex, groups=groups, chooser=chooser, card=card)
    engine.measured_again = bool(note) and not saved  # load_engine: the saved plans were for the saved choices
    if not groups:
        return engine
    if calibration is None and all(g in saved for g in groups):
        engine.calibrate(calibration_input(model, int(opts.extra.get("batch", 1))), saved=saved)
    else:
        random_input = calibration is None
        if random_input:
            calibration = calibration_input(model, int(opts.extra.get("batch", 1)))
        if "sparsert" in libraries and backends.sparsert is not None and not saved:
            prepare_sparsert(groups, model, backends.sparsert, opts.extra, int(calibration.shape[0]))
        engine.calibrate(calibration, saved=saved or None)
        if random_input:
            for g in groups.values():
                g.ctx.info["calibration"] = "random input (no calibration images given): the ECR choice may differ " \
                                            "on real activations"
    if note:
        for g in groups.values():
            g.ctx.info["measured_on"] = note
    return engine
