"""The `tensorrt` runtime: TensorRT builds the pruned (dense-with-zeros) ONNX with SPARSE_WEIGHTS.

NOT RUN HERE: TensorRT cannot be installed on any machine this project has; this runtime is
written to NVIDIA's documented Python API for TensorRT 8.2 through 11 (the version
differences live in `trt_compat`) and its tests run only where `import tensorrt` works.

TensorRT finds 2:4 weights itself, so `rewrite` changes nothing for fp32/weakly-typed
builds; strongly-typed TensorRT (10.12+, and 11 which has no FP16 flag) takes precision from
the ONNX, so `compile` converts the model to fp16 (`passes.fp16.to_fp16`, fp32 I/O kept)
when fp16 is asked for. The build's log is kept; its "(Sparsity) Layers eligible for sparse
math" and "picked sparse implementation for layers" lines become the per-layer report
(TensorRT keeps dense kernels where they are faster). The serialized plan is stored in the
engine file and reused on load when the TensorRT version and GPU match.

Options (CompileOptions.extra): `batch` = [min, opt, max] for the optimization profile
(default [1, 1, 32]), `workspace_mb` (default 1024), `sparse` (default True), `plan` (also
write the raw plan to this path, e.g. for trtexec), `trt_cuda_graph` (capture TensorRT's
enqueue in a CUDA graph; documented by NVIDIA, off by default because untested here).
"""
from __future__ import annotations

import hashlib

import onnx
import torch

from ...common.errors import UserError
from ...common.fileio import write_bytes_atomic
from ...passes.graph import node_label, weight_nodes
from . import trt_compat as trt_compat
from ..base import CompileOptions, Engine, GraphReplay
from ..options import CHOOSER_OPTIONS, Option

name = "tensorrt"
# TensorRT runs the whole graph itself: the shared executor's dense conv settings do not apply
OPTIONS = [
    *CHOOSER_OPTIONS,
    Option("batch", list, [1, 1, 32], "min,opt,max batch of the optimization profile", item=int),
    Option("workspace_mb", int, 1024, "builder workspace in MiB", minimum=1),
    Option("sparse", bool, True, "let TensorRT pick 2:4 sparse kernels (SPARSE_WEIGHTS)"),
    Option("plan", str, None, "also write the raw TensorRT plan to this path (e.g. for trtexec)"),
    Option("trt_cuda_graph", bool, False, "capture TensorRT's enqueue in a CUDA graph (untested here)"),
]
NOT_RUN_HERE = ("it has never been run on this project's machines (TensorRT is not installable there); it is "
                "written to TensorRT's documented Python API for 8.2-11")


def _import_trt():
    import tensorrt as trt  # noqa: heavy, optional

    return trt


def available() -> tuple[bool, str]:
    try:
        trt = _import_trt()
    except Exception as exc:
        return False, f"cannot import tensorrt ({type(exc).__name__}); install TensorRT 8.2-11 (on Jetson: JetPack's). " \
                      f"NOT RUN HERE: {NOT_RUN_HERE}"
    try:
        if not torch.cuda.is_available():
            return False, f"TensorRT {trt.__version__} imports, but PyTorch sees no CUDA GPU"
        major, minor = torch.cuda.get_device_capability(0)
        sparse = "2:4 sparse tensor cores" if (major, minor) >= (8, 0) else "no sparse tensor cores (2:4 runs dense)"
        return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)} (sm_{major}{minor}, {sparse}); " \
                     f"UNTESTED: {NOT_RUN_HERE}"
    except Exception as exc:
        return False, f"check failed: {type(exc).__name__}: {exc}"


def rewrite(model: onnx.ModelProto, options: dict | None = None) -> onnx.ModelProto:
    """TensorRT reads the dense-with-zeros ONNX as it is (precision is settled in compile)."""
    return model


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT8": torch.int8,
                 "BOOL": torch.bool, "INT64": torch.int64, "BF16": torch.bfloat16, "UINT8": torch.uint8}


def torch_dtype(trt_dtype) -> torch.dtype:
    key = str(trt_dtype).split(".")[-1].upper()
    if key not in _TORCH_DTYPES:
        raise UserError(f"TensorRT tensor type {trt_dtype} has no PyTorch equivalent here")
    return _TORCH_DTYPES[key]


def layer_report(model: onnx.ModelProto, log: dict) -> list[dict]:
    """Per Conv/Gemm/MatMul of the ONNX: 2:4 or not, and what TensorRT's build log said."""
    from ...passes.inspect import layer_table

    rows = []
    two_four = {r.node: r.two_four for r in layer_table(model)}
    for node, weight, _ in weight_nodes(model):
        label = node_label(node)
        eligible = trt_compat.match_layer(label, log["eligible"])
        picked = trt_compat.match_layer(label, log["picked_sparse"])
        if picked:
            why = "TensorRT picked a sparse kernel"
        elif eligible:
            why = "eligible, but TensorRT measured a dense kernel faster"
        elif two_four.get(label):
            why = "2:4 weights, but not listed eligible (fp32 build, shape or fused form)"
        else:
            why = "weights not 2:4"
        rows.append({"name": label, "op": node.op_type, "weight": weight, "two_four": bool(two_four.get(label)),
                     "eligible": eligible, "picked_sparse": picked, "reason": why})
    return rows


class TensorRTEngine(Engine):
    runtime = name

    def __init__(self, model, device, options, plan: bytes, log_lines: list[str], settings: dict, onnx_built):
        super().__init__(model, device, options, executor=None)
        trt = _import_trt()
        self.trt = trt
        self.plan = plan
        self.log_lines = log_lines
        self.settings = settings
        self.logger = trt_compat.make_logger(trt)
        self.cuda_engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.cuda_engine is None:
            raise UserError("TensorRT could not deserialize the plan (built by another TensorRT version?); rebuild it")
        self.context = self.cuda_engine.create_execution_context()
        self.tensors = trt_compat.io_tensors(trt, self.cuda_engine)
        self.sparsity = trt_compat.parse_sparsity_log(log_lines)
        self.layers = layer_report(onnx_built, self.sparsity)

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.tensors if t["input"]]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self.tensors if not t["input"]]

    def prepare(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ins = [t for t in self.tensors if t["input"]]
        return tuple(x.to(self.device, torch_dtype(t["dtype"])).contiguous() for x, t in zip(inputs, ins))

    def _run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        addresses = {}
        ins = [t for t in self.tensors if t["input"]]
        if len(inputs) != len(ins):
            raise UserError(f"model takes {len(ins)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        for x, t in zip(inputs, ins):
            trt_compat.set_input_shape(self.context, self.cuda_engine, t, x.shape)
            addresses[t["name"]] = x.data_ptr()
        outs = []
        for t in self.tensors:
            if not t["input"]:
                y = torch.empty(trt_compat.output_shape(self.context, t), dtype=torch_dtype(t["dtype"]), device=self.device)
                addresses[t["name"]] = y.data_ptr()
                outs.append(y)
        trt_compat.execute(self.context, self.tensors, addresses, torch.cuda.current_stream(self.device).cuda_stream)
        return tuple(outs)

    def runner(self, *inputs: torch.Tensor):
        if not self.options.extra.get("trt_cuda_graph", False):
            return self._run
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self._graphs:
            self._graphs[key] = GraphReplay(self._run, inputs)
        return self._graphs[key]

    def report(self) -> list[dict]:
        return [{**r, "kernel": "TensorRT sparse" if r["picked_sparse"] else "TensorRT dense",
                 "format": "2:4" if r["two_four"] else "dense"} for r in self.layers]

    def weight_bytes(self) -> int:
        return len(self.plan)  # the plan holds the weights (and the kernels' metadata)

    def saved_state(self) -> dict:
        major, minor = torch.cuda.get_device_capability(self.device)
        return {"trt_version": self.trt.__version__, "gpu": torch.cuda.get_device_name(self.device),
                "capability": [major, minor], "settings": self.settings, "log": self.log_lines[-400:],
                "plan_sha256": hashlib.sha256(self.plan).hexdigest()}

    def saved_files(self) -> dict[str, bytes]:
        return {"engine.plan": self.plan}


def _profile_shapes(model: onnx.ModelProto, batch: list[int]) -> dict:
    init = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        if any(d < 0 for d in dims[1:]):
            raise UserError(f"input '{vi.name}' has dynamic dimensions other than the batch ({dims}); export with a "
                            "fixed image size")
        if dims and dims[0] < 0:
            out[vi.name] = tuple([b] + dims[1:] for b in batch)
    return out


def compile(model: onnx.ModelProto, device: str | torch.device = "cuda", options: CompileOptions | dict | None = None,
            state: dict | None = None) -> TensorRTEngine:
    opts = options if isinstance(options, CompileOptions) else CompileOptions.from_dict(options)
    ok, reason = available()
    if not ok:
        raise UserError(f"runtime tensorrt is not available here: {reason}")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise UserError("runtime tensorrt needs a CUDA GPU; use --device cuda")
    if opts.dtype not in ("fp32", "fp16"):
        raise UserError(f"runtime tensorrt builds fp32 or fp16, not {opts.dtype}")
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise UserError("runtime tensorrt reads the pruned dense-with-zeros ONNX (TensorRT finds 2:4 itself); give it "
                        "the file `sparsecnn convert --prune 2:4 -o` wrote, not a --sparse-onnx rewrite")
    trt = _import_trt()
    state = state or {}
    settings = trt_compat.settings_for(trt, opts.dtype)
    built = fp16_onnx(model) if settings["onnx_must_be_fp16"] else model
    plan = (state.get("files") or {}).get("engine.plan")
    same_place = (state.get("trt_version") == trt.__version__
                  and state.get("gpu") == torch.cuda.get_device_name(dev))
    log_lines = list(state.get("log", []))
    if plan is None or not same_place:
        logger = trt_compat.make_logger(trt, echo=None)
        batch = list(opts.extra.get("batch", [1, 1, 32]))
        try:
            with torch.cuda.device(dev):
                plan, settings = trt_compat.build_plan(
                    trt, built.SerializeToString(), opts.dtype, logger, _profile_shapes(built, batch),
                    sparse=bool(opts.extra.get("sparse", True)),
                    workspace_bytes=int(opts.extra.get("workspace_mb", 1024)) << 20)
        except RuntimeError as exc:
            raise UserError(f"TensorRT build failed: {exc}") from None
        log_lines = logger.lines
    if opts.extra.get("plan"):
        write_bytes_atomic(opts.extra["plan"], plan)
    with torch.cuda.device(dev):
        return TensorRTEngine(model, dev, opts, plan, log_lines, settings, built)


def fp16_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 ONNX that strongly-typed TensorRT (10.12+, 11) needs, fp32 inputs/outputs kept."""
    from ...passes.fp16 import to_fp16
    from ...passes.graph import run_pipeline

    return run_pipeline(model, [(to_fp16, {"keep_io_types": True})])[0]

