"""The `sparsert` runtime: a kernel generated per pruned layer with its sparsity pattern compiled in.

rewrite: passes/csr/rewrite.py (the CSR rewrite the `csr` runtime uses too) turns sparse
Conv/Gemm layers (with the Add/Relu after them) into sparsecnn::CsrConv / CsrGemm with the
residual as an optional last input. compile: for every such layer, a few tile
configurations are generated (runtimes/sparsert/codegen.py) and compiled with NVRTC in
parallel, then each layer decides with the one chooser (runtimes/chooser.py): the generated
kernels, the CSR runtime's kernel (when a runtime named 'csr' is registered) and the layer's
dense forms (dense_conv's cuDNN NCHW/NHWC and im2col engines, or cuBLAS linear, with the fused
epilogue) are checked against the dense result, timed interleaved, and a sparse kernel runs
only where it beats the best dense form by the margin; the per-layer report says what ran
(`kind`), the configuration and every candidate's time. The whole network replays as
one CUDA graph. Winners are kept in the engine's saved state and in a tuning cache beside
the kernel cache (keyed by layer hash, GPU architecture, precision and batch), so a reload
or a second compile of the same weights skips the search and the compiles.

Options (CompileOptions.extra):
    min_sparsity      rewrite layers at least this sparse (default 0.5)
    candidates        subset of ["generated", "csr", "dense"] to consider (default all)
    max_configs       tile configurations generated per layer (default 3)
    max_instructions  code-size cap per generated kernel (default 120000; see CODE_SIZE_RULE)
    tune_batch        batch size the candidates are timed at (default 1)
    compile_workers   NVRTC threads/processes (default: CPU count)
    retune            ignore the tuning cache and saved state (default False)

On the CPU the CSR ops run their PyTorch reference (passes/csr/reference.py).
"""
from __future__ import annotations

import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ...common.errors import UserError
from ...passes.graph import node_attrs, node_label, run_pipeline, static_shapes
from ..base import CompileOptions, Engine, _MatmulPrecision
from ..executor import Executor
from ..ops import NodeContext
from ..options import SHARED_OPTIONS, Option
from .codegen import DEFAULT_MAX_CONFIGS, DEFAULT_MAX_INSTRUCTIONS

name = "sparsert"

CANDIDATE_KINDS = ("generated", "csr", "dense")
OPTIONS = [
    *SHARED_OPTIONS,
    Option("min_sparsity", float, 0.5, "rewrite layers at least this sparse", minimum=0.0),
    Option("candidates", list, list(CANDIDATE_KINDS), "what each layer may run", choices=CANDIDATE_KINDS),
    Option("max_configs", int, DEFAULT_MAX_CONFIGS, "tile configurations generated per layer", minimum=1),
    Option("max_instructions", int, DEFAULT_MAX_INSTRUCTIONS, "code-size cap per generated kernel", minimum=1),
    Option("tune_batch", int, 1, "batch size the candidates are timed at", minimum=1),
    Option("compile_workers", int, None, "NVRTC compile threads/processes (default: the CPU count)", minimum=1),
    Option("retune", bool, False, "ignore the tuning cache and the engine's saved choices"),
    Option("emulate_kernels", bool, False, "on the CPU, plan and choose with the generated kernels interpreted "
           "(tests)"),
    Option("arch", str, "sm_90", "GPU architecture to generate for when emulating (no GPU to ask)"),
]
STATE_VERSION = 1


def available() -> tuple[bool, str]:
    from ..nvrtc import nvrtc_available

    ok, why = nvrtc_available()
    if not ok:
        return False, f"NVRTC cannot be loaded ({why}); `pip install 'sparsecnn[gpu]'`"
    if not torch.cuda.is_available():
        return True, f"{why}; no CUDA GPU: runs the CPU reference of its ops"
    from ..nvrtc import device_kernel_notes

    return True, f"{why}, CUDA on {torch.cuda.get_device_name(0)}; {device_kernel_notes('sparsert')}"


def _options(options) -> CompileOptions:
    return options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)


CSR_OPS = ("CsrConv", "CsrGemm")


def passes(options=None) -> list:
    """The runtime's explicit rewrite pipeline: the CSR rewrite with fused epilogues (bias,
    residual Add, ReLU), for layers at least `min_sparsity` zero."""
    from ...passes.csr.rewrite import csr_rewrite

    min_sparsity = float(_options(options).extra.get("min_sparsity", 0.5))
    return [(csr_rewrite, {"max_density": 1.0 - min_sparsity})]


def rewrite(model: onnx.ModelProto, options: dict | CompileOptions | None = None) -> onnx.ModelProto:
    return run_pipeline(model, passes(options))[0]


def reference_ops() -> dict:
    from ...passes.csr.reference import OPS

    return dict(OPS)


class SparseRTEngine(Engine):
    runtime = name

    def __init__(self, model, device, options, executor, decisions: dict | None = None, costs: dict | None = None,
                 arch: str | None = None):
        super().__init__(model, device, options, executor)
        self.decisions = decisions or {}
        self.compile_costs = costs or {}
        self.arch = arch

    def saved_state(self) -> dict:
        """Per-layer winners (and the layer hash they were chosen for): a reload skips the search."""
        if not self.decisions:
            return {}
        return {"version": STATE_VERSION, "arch": self.arch, "dtype": self.options.dtype, "layers": self.decisions}


def compile(model: onnx.ModelProto, device: str | torch.device = "cpu", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> SparseRTEngine:
    opts = _options(options)
    dev = torch.device(device)
    if opts.channels_last:
        raise UserError("the sparsert runtime runs NCHW activations; drop --channels-last")
    if dev.type != "cuda" and not opts.extra.get("emulate_kernels"):
        from ..reference_ops import reference_ops as all_reference

        ops = dict(all_reference())
        ops.update(reference_ops())
        ex = Executor(model, dev, opts.dtype, ops=ops, options=opts.extra)
        return SparseRTEngine(model, dev, opts, ex)
    planner = Planner(model, dev, opts, state or {})
    t0 = time.perf_counter()
    planner.prepare()
    ops = {key: planner.builder for key in reference_ops()}
    with _MatmulPrecision(dev, opts.tf32), torch.no_grad():
        ex = Executor(model, dev, opts.dtype, ops=ops, options=opts.extra)
    planner.finish()
    costs = dict(planner.costs, total_s=round(time.perf_counter() - t0, 3))
    return SparseRTEngine(model, dev, opts, ex, planner.decisions, costs, planner.arch)


# --------------------------------------------------------------------------------------------
# One layer's generated kernels as the chooser's candidates: shared by the planner and hybrid
# --------------------------------------------------------------------------------------------

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16"}  # what the generated kernels store


class KernelLoader:
    """Where generated programs become kernels: on a CUDA device NVRTC (in parallel, disk-cached)
    and codegen.GeneratedKernel; when emulating on the CPU (the emulate_kernels option, tests)
    the IR interpreter codegen.EmulatedKernel, which compiles nothing and is never fast."""

    def __init__(self, device: torch.device | str, emulate: bool | None = None, arch: str | None = None,
                 workers: int | None = None):
        from ..nvrtc import device_arch

        self.device = torch.device(device)
        self.emulate = self.device.type != "cuda" if emulate is None else bool(emulate)
        self.arch = arch or ("sm_90" if self.emulate else device_arch(self.device))
        self.workers = workers
        self._zeros: torch.Tensor | None = None

    def compile(self, sources: list[tuple[str, str]], progress: bool = False) -> list:
        """One codegen.CompileRecord per (source, kernel name)."""
        from . import codegen

        if self.emulate:
            return [codegen.CompileRecord(n, 0.0, 0.0, 0, False) for _, n in sources]
        return codegen.compile_programs(sources, self.arch, self.workers, progress=progress)

    def load(self, program, source: str):
        from .codegen import EmulatedKernel, GeneratedKernel

        return EmulatedKernel(program) if self.emulate else GeneratedKernel(program, self.device, source=source)

    def zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The padding taps' zero buffer, shared by the kernels (allocated before any graph capture)."""
        if self._zeros is None or self._zeros.numel() < numel or self._zeros.dtype != dtype:
            self._zeros = torch.zeros(max(numel, 1), device=self.device, dtype=dtype)
        return self._zeros


class LayerPrograms:
    """One CSR layer as code generation sees it (what a kernel bakes in: pattern, weights, bias,
    geometry, epilogue) and its generated programs. The planner generates every layer's programs
    and compiles them together; hybrid one group's at a time (`node_candidates`). Either way the
    chooser's candidates come from `candidates`."""

    def __init__(self, name: str, csr, geometry, bias: torch.Tensor | None = None, relu: bool = False,
                 residual: bool = False):
        from .codegen import layer_key

        self.name, self.csr, self.geometry, self.bias = name, csr, geometry, bias
        self.relu, self.residual = bool(relu), bool(residual)
        self.key = layer_key(csr, geometry, bias, self.relu, self.residual) if geometry is not None else ""
        self.reason = ""                 # why no generated candidate
        self.programs: list = []         # generated candidates (codegen.Program)
        self.sources: list[tuple[str, str]] = []
        self.records: list = []          # codegen.CompileRecord per program
        self.gen_s = 0.0
        self.compile_s = 0.0

    def generate(self, dtype: str, max_configs: int = DEFAULT_MAX_CONFIGS,
                 max_instructions: int = DEFAULT_MAX_INSTRUCTIONS, batch: int = 1, config: str | None = None) -> bool:
        """Build and render the programs of `config` (a saved TileConfig name) or of the best few
        configurations within the code-size cap; False, with `reason`, when none fits."""
        from .codegen import TileConfig, build_program, candidate_configs, render_cuda

        t0 = time.perf_counter()
        if config:
            configs = [TileConfig.parse(config)]
        else:
            configs = candidate_configs(self.csr, self.geometry, dtype, max_configs, max_instructions, batch)
        if not configs:
            self.reason = (f"code size: every configuration exceeds {max_instructions} instructions "
                           f"({self.csr.nnz} non-zeros)")
        for cfg in configs:
            prog = build_program(self.csr, self.geometry, cfg, self.bias, self.relu, self.residual, dtype, key=self.key)
            self.programs.append(prog)
            self.sources.append(render_cuda(prog))
        self.gen_s += time.perf_counter() - t0
        return bool(configs)

    def candidates(self, loader: KernelLoader, after=None) -> tuple[list, dict[str, str], dict[str, dict]]:
        """The compiled programs as the one chooser's candidates (library "sparsert", named
        `generated:<config>`): fn(x, residual=None) runs the kernel, with bias, residual and ReLU
        at its store, then `after` on its output (hybrid: the group's max-pool). Also why a
        program has no candidate (compile or load error) and each candidate's code statistics."""
        from ..chooser import Candidate

        candidates, notes, code = [], {}, {}
        for prog, (src, _), rec in zip(self.programs, self.sources, self.records):
            label = f"generated:{prog.config.name}"
            if rec.error:
                notes[label] = rec.error.splitlines()[0][:300]
                continue
            try:
                kern = loader.load(prog, src)
            except Exception as exc:  # a kernel that does not load is a bug worth seeing in the report
                notes[label] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            zeros = loader.zeros(kern.zeros_needed(), kern.torch_dtype) if kern.zeros_needed() else None
            if after is None:
                fn = (lambda x, r=None, kern=kern, zeros=zeros: kern(x, residual=r, zeros=zeros))
            else:
                fn = (lambda x, r=None, kern=kern, zeros=zeros: after(kern(x, residual=r, zeros=zeros)))
            candidates.append(Candidate(label, fn, dense=False, library="sparsert",
                                        detail={"config": prog.config.name, "kernel": prog.name,
                                                "instructions": prog.instructions()}))
            code[label] = {**prog.stats(), "compile_s": round(rec.seconds, 3), "cubin_bytes": rec.cubin_bytes,
                           "cached": rec.cached}
        return candidates, notes, code


def node_programs(ctx: NodeContext, shape: tuple[int, ...], dtype: str, max_configs: int = DEFAULT_MAX_CONFIGS,
                  max_instructions: int = DEFAULT_MAX_INSTRUCTIONS,
                  config: str | None = None) -> tuple[LayerPrograms | None, str]:
    """The generating half of `node_candidates`: one CsrConv / CsrConvPool / CsrGemm node's programs for
    an input of `shape` stored as `dtype` ('fp32', 'fp16'), rendered, not compiled; or (None, why)."""
    from ...passes.csr.layout import CSR
    from ...passes.csr.reference import bias_tensor, conv_geometry, csr_tensors, has_residual
    from .codegen import LayerGeometry

    values, cols, row_ptr, order = csr_tensors(ctx)
    m = row_ptr.numel() - 1
    if ctx.node.op_type == "CsrGemm":
        k, relu = int(ctx.attr("in_features")), bool(ctx.attr("relu", 0))
        geometry = LayerGeometry("gemm", m, k, n=shape[0])
    else:
        g = conv_geometry(ctx)
        (kh, kw), relu = g["kernel"], g["relu"]
        k = g["in_channels"] * kh * kw
        geometry = LayerGeometry.conv(m, g["in_channels"], shape[2], shape[3], kh, kw, g["stride"], g["pads"],
                                      g["dilation"])
    csr = CSR(values, cols.to(torch.int32), row_ptr.to(torch.int32), order.to(torch.int32), (m, k))
    layer = LayerPrograms(ctx.name, csr, geometry, bias_tensor(ctx), relu, has_residual(ctx))
    if not layer.generate(dtype, max_configs, max_instructions, shape[0], config):
        return None, layer.reason
    return layer, ""


def prepare_nodes(items: list[tuple[NodeContext, tuple[int, ...]]], loader: KernelLoader,
                  max_configs: int = DEFAULT_MAX_CONFIGS,
                  max_instructions: int = DEFAULT_MAX_INSTRUCTIONS) -> dict[str, tuple[tuple, LayerPrograms]]:
    """Generate every (node, input shape)'s programs, then compile them all in one parallel NVRTC batch
    (a layer at a time leaves the cores idle: ResNet-18's programs take minutes of CPU): {node name:
    (the shape, its LayerPrograms with records)}, for `node_candidates(prepared=...)` to load. A node
    whose dtype has no generated kernels, or whose every config is over the code-size cap, is left out."""
    layers: dict[str, tuple[tuple, LayerPrograms]] = {}
    for ctx, shape in items:
        dtype = DTYPE_NAMES.get(ctx.dtype)
        if dtype is None:
            continue
        layer, _ = node_programs(ctx, tuple(shape), dtype, max_configs, max_instructions)
        if layer is not None:
            layers[ctx.name] = (tuple(shape), layer)
    compile_together([layer for _, layer in layers.values()], loader)
    return layers


def compile_together(layers: list[LayerPrograms], loader: KernelLoader) -> list:
    """Every layer's programs in one NVRTC batch (in parallel across layers), each layer's records
    set and its `compile_s` the batch's wall time; all the records, in the layers' order."""
    sources = [src for layer in layers for src in layer.sources]
    if not sources:
        return []
    t0 = time.perf_counter()
    records = loader.compile(sources, progress=len(sources) > 4)
    wall = time.perf_counter() - t0
    it = iter(records)
    for layer in layers:
        layer.records = [next(it) for _ in layer.sources]
        layer.compile_s = wall  # compiled together, not one by one
    return records


def node_candidates(ctx: NodeContext, x: torch.Tensor, loader: KernelLoader, max_configs: int = DEFAULT_MAX_CONFIGS,
                    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS, config: str | None = None,
                    after=None, prepared: LayerPrograms | None = None) -> tuple[list, str, dict]:
    """sparsert's generated kernels for one CsrConv / CsrConvPool / CsrGemm node on input `x` (its
    real shape and dtype), generated, compiled and loaded now: (the chooser's candidates, why
    there are none, what generating and compiling cost). `config`: only that saved TileConfig (a
    reload); `after`: applied to each kernel's output (a CsrConvPool's max-pool, which no
    generated kernel fuses); `prepared`: the node's programs `prepare_nodes` already generated and
    compiled for x's shape (then only loaded here). At most `max_configs` programs, each within
    `max_instructions` (codegen.CODE_SIZE_RULE): a layer with more non-zeros than that gets none."""
    dtype = DTYPE_NAMES.get(x.dtype)
    if dtype is None:
        return [], f"generated kernels store fp32 or fp16, not {str(x.dtype).replace('torch.', '')}", {}
    if prepared is not None:
        layer = prepared
        cost = {"configs": len(layer.programs), "gen_s": round(layer.gen_s, 3),
                "compile_s": round(layer.compile_s, 3), "compiled": "ahead, with every layer's programs at once"}
    else:
        layer, why = node_programs(ctx, tuple(x.shape), dtype, max_configs, max_instructions, config)
        if layer is None:
            return [], why, {}
        t0 = time.perf_counter()
        layer.records = loader.compile(layer.sources)
        cost = {"configs": len(layer.programs), "gen_s": round(layer.gen_s, 3),
                "compile_s": round(time.perf_counter() - t0, 3)}
    candidates, notes, _ = layer.candidates(loader, after)
    return candidates, "; ".join(f"{k}: {v}" for k, v in notes.items()), cost


# --------------------------------------------------------------------------------------------
# The planner: generate and compile every candidate first (in parallel), then choose per layer
# --------------------------------------------------------------------------------------------

class _Layer(LayerPrograms):
    """A layer of the planner: its node, the candidate kinds it considers, a saved decision."""

    def __init__(self, node: onnx.NodeProto, csr, geometry, weight_shape: list[int], bias=None, relu: bool = False,
                 residual: bool = False, reason: str = ""):
        super().__init__(node_label(node), csr, geometry, bias, relu, residual)
        self.node = node
        self.weight_shape = weight_shape
        self.reason = reason
        self.kinds: list[str] = []       # candidate kinds to consider
        self.fixed: dict | None = None   # a decision from saved state / tuning cache


class Planner:
    def __init__(self, model: onnx.ModelProto, device: torch.device, opts: CompileOptions, state: dict):
        from ..nvrtc import device_arch

        self.model = model
        self.device = device
        self.opts = opts
        self.extra = opts.extra
        # emulate_kernels (tests): plan, choose and save on the CPU with interpreted kernels
        self.emulate = device.type != "cuda"
        self.arch = device_arch(device) if not self.emulate else str(self.extra.get("arch", "sm_90"))
        self.retune = bool(self.extra.get("retune", False))
        saved = state.get("layers", {}) if state and state.get("version") == STATE_VERSION else {}
        if state and (state.get("arch") not in (None, self.arch) or state.get("dtype") not in (None, opts.dtype)):
            saved = {}
        self.saved = {} if self.retune else saved
        kinds = self.extra.get("candidates", list(CANDIDATE_KINDS))
        unknown = set(kinds) - set(CANDIDATE_KINDS)
        if unknown:
            raise UserError(f"sparsert: unknown candidate kind(s) {sorted(unknown)}; choose from {list(CANDIDATE_KINDS)}")
        self.kinds = [k for k in CANDIDATE_KINDS if k in kinds]
        self.batch = int(self.extra.get("tune_batch") or 1)
        self.layers: dict[str, _Layer] = {}
        self.decisions: dict[str, dict] = {}
        self.tuning_updates: dict[str, dict] = {}
        self.costs = {"gen_s": 0.0, "compile_wall_s": 0.0, "compile_cpu_s": 0.0, "tune_s": 0.0,
                      "programs": 0, "programs_compiled": 0, "instructions": 0}
        self.loader: KernelLoader | None = None  # made by prepare

    # -- preparation ------------------------------------------------------------------------

    def prepare(self) -> None:
        from .codegen import LayerGeometry, load_tuning, tuning_key
        from ...passes.csr.layout import CSR

        inits = {t.name: t for t in self.model.graph.initializer}
        shapes = static_shapes(self.model)
        tuning = {} if self.retune else load_tuning()
        dtype = self.opts.dtype
        max_configs = int(self.extra.get("max_configs") or DEFAULT_MAX_CONFIGS)
        max_instr = int(self.extra.get("max_instructions") or DEFAULT_MAX_INSTRUCTIONS)
        self.loader = KernelLoader(self.device, self.emulate, self.arch, self.extra.get("compile_workers"))
        for node in self.model.graph.node:
            if node.domain != "sparsecnn" or node.op_type not in CSR_OPS:
                continue
            attrs = node_attrs(node)
            arr = [numpy_helper.to_array(inits[n]) for n in node.input[1:5]]
            m = int(arr[2].size) - 1
            if node.op_type == "CsrConv":
                shape = [m, int(attrs["in_channels"]), *[int(v) for v in attrs["kernel_shape"]]]
            else:
                shape = [m, int(attrs["in_features"])]
            k = int(np.prod(shape[1:]))
            csr = CSR(torch.from_numpy(arr[0].astype(np.float32)), torch.from_numpy(arr[1].astype(np.int32)),
                      torch.from_numpy(arr[2].astype(np.int32)), torch.from_numpy(arr[3].astype(np.int32)), (m, k))
            bias = None
            if len(node.input) > 5 and node.input[5]:
                bias = torch.from_numpy(numpy_helper.to_array(inits[node.input[5]]).astype(np.float32))
            in_dims = shapes.get(node.input[0])
            geometry, reason = None, ""
            if node.op_type == "CsrConv":
                if in_dims is None or len(in_dims) != 4 or any(d is None for d in in_dims[1:]):
                    reason = "input spatial shape unknown at compile time"
                else:
                    geometry = LayerGeometry.conv(m, shape[1], in_dims[2], in_dims[3], shape[2], shape[3],
                                                  attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0]),
                                                  attrs.get("dilations", [1, 1]))
            else:
                geometry = LayerGeometry("gemm", m, k, n=self.batch)
            layer = _Layer(node, csr, geometry, shape, bias, bool(attrs.get("relu", 0)),
                           len(node.input) > 6 and bool(node.input[6]), reason)
            self.layers[layer.name] = layer
            kinds = list(self.kinds)
            if layer.geometry is None:
                kinds = [x for x in kinds if x != "generated"]
            # the candidate set is part of the key: a winner among fewer candidates is no winner
            tkey = tuning_key(layer.key, self.arch, dtype, self.batch, ",".join(sorted(kinds))) if layer.key else ""
            fixed = self.saved.get(layer.name)
            if fixed and fixed.get("key") != layer.key[:32]:
                fixed = None
            if fixed is None and tkey in tuning:
                fixed = tuning[tkey]
            if fixed is not None and fixed.get("choice") in kinds:
                layer.fixed = fixed
                kinds = [fixed["choice"]]
            layer.kinds = kinds
            if "generated" in kinds:
                saved_config = layer.fixed.get("config") if layer.fixed else None
                if not layer.generate(dtype, max_configs, max_instr, self.batch, saved_config):
                    layer.kinds = [x for x in kinds if x != "generated"] or ["dense"]
                self.costs["gen_s"] += layer.gen_s
        records = compile_together(list(self.layers.values()), self.loader)
        if records and not self.emulate:
            self.costs["compile_wall_s"] = next(iter(self.layers.values())).compile_s
            self.costs["compile_cpu_s"] = sum(r.cpu_seconds for r in records)
            self.costs["programs"] = len(records)
            self.costs["programs_compiled"] = sum(not r.cached for r in records)
            self.costs["instructions"] = sum(p.instructions() for layer in self.layers.values()
                                             for p in layer.programs)
        self.costs = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.costs.items()}

    # -- per-layer build (called by the Executor) -------------------------------------------

    def builder(self, ctx: NodeContext):
        from ...passes.csr.reference import used_inputs
        from ..chooser import Candidate, Switch

        layer = self.layers[ctx.name]
        ctx.info.clear()
        ctx.inputs_used = used_inputs(ctx)  # x (and the residual): the weight lives in the candidates
        has_bias = len(ctx.node.input) > 5 and bool(ctx.node.input[5])
        nnz, (m, k) = layer.csr.nnz, layer.csr.shape
        info = {"format": "csr", "nnz": nnz, "sparsity": round(1 - nnz / max(1, m * k), 4),
                "fused": "+".join(x for x, on in (("bias", has_bias), ("residual", layer.residual),
                                                   ("relu", layer.relu)) if on) or "none"}
        args = self._example_inputs(ctx, layer)
        dense_forms = self._dense_forms(ctx, layer, args[0] if args else None)
        candidates: list = list(dense_forms) if "dense" in layer.kinds else []
        generated, notes, code = layer.candidates(self.loader)
        candidates += generated
        if "csr" in layer.kinds:
            fn, why = self._csr_candidate(ctx, layer)
            if fn is not None:
                candidates.append(Candidate("csr", fn, dense=False, library="csr", detail={"kernel": why}))
            else:
                notes["csr"] = why
        if layer.reason:
            info["reason"] = layer.reason
        if not candidates or args is None:  # nothing else to run, or no input to decide on: dense
            candidates = list(dense_forms[:1])
        decision = self._decide(ctx, layer, candidates, dense_forms, args)
        for label, why in decision.rejected.items():
            notes[label] = "rejected: " + why
        kind = decision.chosen.split(":")[0]

        def describe(sw) -> None:  # what runs now (also after the whole-graph guard switches the layer)
            what = sw.active.split(":")[0]
            ctx.info.update(kind=what, kernel={"generated": "sparsert generated", "csr": "csr runtime",
                                               "dense": ctx.node.op_type.replace("Csr", "torch ") + " (" + str(
                                                   sw.candidates[sw.active].detail.get("kernel", "cuDNN/cuBLAS")) + ")"}[what])
            if sw.active != sw.decision.chosen:
                ctx.info["reason"] = ctx.info.get("choice", {}).get("why", "switched by the whole-graph guard")

        if kind == "generated":
            info["config"] = decision.chosen.split(":", 1)[1]
            info["code"] = code[decision.chosen]
        if decision.times_ms:
            info["candidates_ms"] = {n: round(t, 5) for n, t in decision.times_ms.items()}
        if notes:
            info["notes"] = notes
        if layer.programs:
            info["gen_s"] = round(layer.gen_s, 3)
            info["compile_s"] = round(sum(r.seconds for r in layer.records), 3)
        ctx.info.update(info)
        self.decisions[layer.name] = {"key": layer.key[:32], "choice": kind, "chosen": decision.chosen,
                                      "config": info.get("config"), "ms": info.get("candidates_ms")}
        if decision.how == "measured" and layer.key:
            from .codegen import tuning_key

            self.tuning_updates[tuning_key(layer.key, self.arch, self.opts.dtype, self.batch,
                                           ",".join(sorted(layer.kinds)))] = self.decisions[layer.name]
        sw = Switch(decision, candidates, ctx.info, describe=describe)
        describe(sw)  # "kind" is what ran; "choice" is the chooser's record
        return sw

    def _example_inputs(self, ctx: NodeContext, layer: _Layer):
        """Random inputs of the layer's real shape at the tuning batch (weight sparsity: the values
        do not change a kernel's speed); None when the input size is unknown at compile time."""
        geo = layer.geometry
        gen = torch.Generator(device="cpu").manual_seed(0)
        if ctx.node.op_type == "CsrConv":
            if geo is None:
                return None
            x = torch.randn(self.batch, geo.cin, geo.h, geo.w, generator=gen)
            r = torch.randn(self.batch, geo.M, geo.oh, geo.ow, generator=gen) if layer.residual else None
        else:
            x = torch.randn(self.batch, layer.csr.shape[1], generator=gen)
            r = torch.randn(self.batch, layer.csr.shape[0], generator=gen) if layer.residual else None
        dt = ctx.dtype
        return x.to(self.device, dt), (r.to(self.device, dt) if r is not None else None)

    def _dense_forms(self, ctx: NodeContext, layer: _Layer, x: torch.Tensor | None) -> list:
        """The layer's dense forms on the decompressed weight, each with the fused bias, residual add
        and ReLU: dense_conv's engines (the same baselines as every runtime), or cuBLAS linear."""
        from ...passes.csr.reference import conv_geometry, dense_weight, epilogue
        from ..chooser import Candidate
        from ..torch.dense_conv import DenseConv

        w = dense_weight(ctx)
        b = layer.bias.to(self.device, ctx.dtype) if layer.bias is not None else None
        buffers = [w] + ([b] if b is not None else [])
        if ctx.node.op_type == "CsrGemm":
            return [Candidate("dense:linear", lambda t, r=None: epilogue(F.linear(t, w, b), None, r, layer.relu),
                              dense=True, library="torch", detail={"kernel": "cuBLAS linear"}, buffers=buffers)]
        g = conv_geometry(ctx)
        dense = DenseConv(ctx.name, w, g["stride"], g["dilation"], 1, lambda t: g["pads"], "best", {}, ctx.options)
        if x is None:  # input size unknown at compile time: cuDNN as the input comes
            forms = [Candidate("dense:cudnn", lambda t, r=None: epilogue(dense.run_mode("cudnn", t, b), None, r,
                                                                          layer.relu), dense=True, library="torch",
                               detail={"kernel": "cuDNN conv, NCHW"})]
        else:
            forms = dense.dense_candidates(x, b, epilogue=lambda y, r=None: epilogue(y, None, r, layer.relu))
        for f in forms:
            f.buffers = buffers
        return forms

    def _decide(self, ctx, layer: _Layer, candidates: list, dense_forms: list, args):
        """The one chooser on the layer's example input: each candidate checked against the first
        dense form (a wrong or failing one is rejected, the report says why), the correct ones
        timed interleaved; a sparse kernel must beat the best dense form by the margin. A layer
        fixed by saved state or the tuning cache takes its saved candidate without timing."""
        from ..chooser import MARGIN, Chooser

        forced = None
        if layer.fixed is not None:
            names = [c.name for c in candidates]
            wanted = layer.fixed.get("chosen") or {"csr": "csr", "dense": "dense:cudnn"}.get(
                layer.fixed.get("choice"), f"generated:{layer.fixed.get('config')}")
            forced = wanted if wanted in names else next((n for n in names if n.startswith(layer.fixed["choice"])), None)
        reps = 3 if self.emulate else int(self.extra.get("choose_reps", 30))  # emulated kernels: order of magnitude
        chooser = Chooser(self.device, ctx.dtype, tf32=self.opts.tf32, reps=reps,
                          margin=float(self.extra.get("choose_margin", MARGIN)))
        call_args = () if args is None else ((args[0], args[1]) if layer.residual else (args[0],))
        reference = None
        if args is not None and "dense" not in layer.kinds:  # the dense form is the reference, not a candidate
            reference = dense_forms[0].fn(*call_args)
        t0 = time.perf_counter()
        decision = chooser.choose(ctx.name, candidates, call_args, reference=reference, forced=forced)
        self.costs["tune_s"] = round(self.costs["tune_s"] + time.perf_counter() - t0, 3)
        return decision

    def _csr_candidate(self, ctx: NodeContext, layer: _Layer):
        """The CSR runtime's kernel for this one layer, through its runtime contract."""
        from .. import RUNTIME_MODULES, get_runtime

        if "csr" not in RUNTIME_MODULES:
            return None, "no runtime named 'csr' is registered"
        try:
            rt = get_runtime("csr")
            ok, why = rt.available()
            if not ok:
                return None, f"csr runtime not available: {why}"
            single = single_layer_model(ctx.node, self.model, layer, self.batch)
            # csr_decide "sparse": the CSR runtime's own kernel, not its dense fallback
            opts = {"dtype": self.opts.dtype, "tf32": self.opts.tf32, "cuda_graph": False, "csr_decide": "sparse"}
            eng = rt.compile(rt.rewrite(single, opts), self.device, opts)
            kernels = sorted({str(s.get("kernel")) for s in eng.report() if s.get("kernel")})
            ex = eng.executor

            if layer.residual:
                return (lambda x, r=None: ex(x, r)[0]), ", ".join(kernels)
            return (lambda x, r=None: ex(x)[0]), ", ".join(kernels)
        except Exception as exc:
            return None, f"csr candidate failed: {type(exc).__name__}: {exc}"[:300]

    def finish(self) -> None:
        from .codegen import store_tuning

        store_tuning(self.tuning_updates)


def single_layer_model(node: onnx.NodeProto, model: onnx.ModelProto, layer: _Layer, batch: int = 1) -> onnx.ModelProto:
    """One fused layer as a plain ONNX Conv/Gemm (+Add)(+Relu) model: dense-with-zeros weights."""
    from onnx import TensorProto, helper

    attrs = node_attrs(node)
    w = layer.csr.to_dense().numpy().reshape(layer.weight_shape)
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    ins = ["x", "w"]
    if layer.bias is not None:
        inits.append(numpy_helper.from_array(layer.bias.numpy().astype(np.float32), "b"))
        ins.append("b")
    geo = layer.geometry
    if node.op_type == "CsrConv":
        x_shape = [batch, geo.cin, geo.h, geo.w]
        y_shape = [batch, geo.M, geo.oh, geo.ow]
        core = helper.make_node("Conv", ins, ["y0"], strides=list(attrs["strides"]), pads=list(attrs["pads"]),
                                dilations=list(attrs["dilations"]), kernel_shape=list(w.shape[2:]))
    else:
        x_shape = [batch, w.shape[1]]
        y_shape = [batch, w.shape[0]]
        core = helper.make_node("Gemm", ins, ["y0"], transB=1)
    nodes, inputs, last = [core], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], "y0"
    if layer.residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, y_shape))
        nodes.append(helper.make_node("Add", [last, "r"], ["y1"]))
        last = "y1"
    if layer.relu:
        nodes.append(helper.make_node("Relu", [last], ["y2"]))
        last = "y2"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "single_layer", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              inits)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    out.ir_version = model.ir_version
    return out
