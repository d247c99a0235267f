"""Can TensorRT 8.2 (JetPack 4.6, the original Jetson Nano) parse this ONNX model? A clear report.

Rules, from onnx-tensorrt's docs/operators.md for TensorRT 8.x (8.2-8.4 parse ONNX opsets up
to 13) and its restrictions column:
  - default-domain opset <= 13; no custom domains (TensorRT 8.2 has no sparsecnn plugin:
    deploy the pruned dense-with-zeros ONNX, not a runtime's --sparse-onnx rewrite)
  - every op in the 8.x support matrix; Conv/ConvTranspose weights are initializers;
    MaxPool without an Indices output; Squeeze/Unsqueeze/Slice axes constant
  - tensor types FLOAT, FLOAT16, INT8, INT32, BOOL (INT64 and DOUBLE are cast down, with a
    warning; anything else fails)
  - IR version: the 8.2 parser was built against ONNX IR 7; a newer IR gets a warning
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
from onnx import TensorProto

from .graph import STANDARD_DOMAINS

TRT82_MAX_OPSET = 13
TRT82_IR_VERSION = 7

# The "Y" rows of onnx-tensorrt's operator support matrix for TensorRT 8.x.
TRT8_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mul Neg
NonMaxSuppression Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomUniform RandomUniformLike Range
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Unsqueeze Upsample Where Xor
""".split())

SUPPORTED_TYPES = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "FLOAT16", TensorProto.INT8: "INT8",
                   TensorProto.INT32: "INT32", TensorProto.BOOL: "BOOL"}
CAST_DOWN_TYPES = {TensorProto.INT64: "INT64 (cast to INT32)", TensorProto.DOUBLE: "DOUBLE (cast to FLOAT)"}


@dataclass
class Finding:
    level: str  # "error" (the 8.2 parser fails) | "warning" (parses, with a caveat)
    what: str
    fix: str = ""


@dataclass
class CompatReport:
    target: str
    opset: int
    ir_version: int
    ops: dict
    findings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        lines = [f"{self.target} compatibility: {'PASS' if self.ok else 'FAIL'}",
                 f"  opset {self.opset} (max {TRT82_MAX_OPSET}), IR version {self.ir_version}, "
                 f"{sum(self.ops.values())} nodes: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.ops.items()))]
        for f in self.findings:
            lines.append(f"  {f.level.upper()}: {f.what}" + (f" -> {f.fix}" if f.fix else ""))
        if not self.findings:
            lines.append("  no problems found")
        return "\n".join(lines)


def _elem_types(model: onnx.ModelProto) -> Counter:
    types: Counter = Counter()
    for t in model.graph.initializer:
        types[t.data_type] += 1
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.type.tensor_type.elem_type] += 1
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to":
                types[a.i] += 1
    return types


def check_trt82(model: onnx.ModelProto) -> CompatReport:
    """The TensorRT 8.2 (JetPack 4.6) parser's rules applied to `model`."""
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    ops = Counter((f"{n.domain}::" if n.domain not in STANDARD_DOMAINS else "") + n.op_type for n in model.graph.node)
    report = CompatReport("TensorRT 8.2 (JetPack 4.6, Jetson Nano)", opset, model.ir_version, dict(ops))
    add = report.findings.append
    if opset > TRT82_MAX_OPSET:
        add(Finding("error", f"opset {opset} is newer than the {TRT82_MAX_OPSET} TensorRT 8.2's ONNX parser reads",
                    "re-export with `sparsecnn convert MODEL --opset 13 ...`"))
    if model.ir_version > TRT82_IR_VERSION:
        add(Finding("warning", f"IR version {model.ir_version} is newer than the {TRT82_IR_VERSION} the 8.2 parser was "
                               "built against (it warns and parses)", "export with --opset 13, which writes IR 7"))
    custom = sorted({n.domain for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    for domain in custom:
        names = sorted({n.op_type for n in model.graph.node if n.domain == domain})
        add(Finding("error", f"custom-domain ops {domain}::{', '.join(names)} have no TensorRT 8.2 implementation",
                    "deploy the pruned dense-with-zeros ONNX that `sparsecnn convert --prune ... -o` writes"))
    unknown = sorted({n.op_type for n in model.graph.node if n.domain in STANDARD_DOMAINS and n.op_type not in TRT8_OPS})
    if unknown:
        add(Finding("error", f"ops not in TensorRT 8.x's ONNX support matrix: {', '.join(unknown)}",
                    "replace them before export (or write a TensorRT plugin)"))
    inits = {t.name for t in model.graph.initializer}
    produced_by_constant = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    constant = inits | produced_by_constant
    for node in model.graph.node:
        label = node.name or node.op_type
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] not in constant:
            add(Finding("error", f"{label}: {node.op_type} weights must be an initializer in TensorRT 8.2"))
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            add(Finding("error", f"{label}: MaxPool's Indices output is not supported"))
        if node.op_type in ("Squeeze", "Unsqueeze", "Slice"):
            axes_at = 3 if node.op_type == "Slice" else 1
            if len(node.input) > axes_at and node.input[axes_at] and node.input[axes_at] not in constant:
                add(Finding("error", f"{label}: {node.op_type} axes must be constant in TensorRT 8.2"))
    for dtype, count in sorted(_elem_types(model).items()):
        if dtype in SUPPORTED_TYPES or dtype == TensorProto.UNDEFINED:
            continue
        if dtype in CAST_DOWN_TYPES:
            if dtype == TensorProto.DOUBLE:
                add(Finding("warning", f"{count} tensors of type {CAST_DOWN_TYPES[dtype]}"))
            continue  # INT64 shape constants are normal in exports; TensorRT casts them silently enough
        add(Finding("error", f"{count} tensors of type {TensorProto.DataType.Name(dtype)}, which TensorRT 8.2 cannot read",
                    "export in float32 (or float16)"))
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if any(i > 0 for i in dynamic):
            add(Finding("warning", f"input '{vi.name}' has dynamic non-batch dimensions",
                        "export with a fixed image size, or give TensorRT an optimization profile for them"))
    return report


# --- which runtimes apply on which Jetson board ------------------------------------------------

@dataclass
class RuntimeFit:
    runtime: str
    applies: bool
    why: str


def toolkit_runs_on(board) -> bool:
    """sparsecnn itself installs on the board: its JetPack has Python >= 3.10 (JetPack 6, Orin)."""
    from ..common.support import MIN_PYTHON, version_tuple

    return version_tuple(board.python) >= MIN_PYTHON


def board_runtimes(board) -> list[RuntimeFit]:
    """Per runtime: can it run on `board` (a common.peaks.Board), and what it exploits there."""
    on_board = toolkit_runs_on(board)
    no_toolkit = f"not on the board: {board.jetpack} has Python {board.python}, sparsecnn needs 3.10 (convert on a host)"
    sparse_tc = board.fp16_sparse_tflops is not None
    trt_sparse = ("2:4 weights run on sparse tensor cores (SPARSE_WEIGHTS)" if sparse_tc else
                  "no sparse tensor cores: 2:4 weights run dense; channel pruning (a smaller dense model) is what "
                  "speeds it up")
    fits = [RuntimeFit("tensorrt", True, f"{board.jetpack.split('(')[-1].rstrip(')').split(', ')[-1]} from JetPack"
                                         f"{'' if on_board else ', through scripts/jetson_deploy.py'}; {trt_sparse}")]
    fits.append(RuntimeFit("torch", on_board, "NVIDIA's PyTorch wheel for JetPack 6 (2.5-2.8), cuDNN dense convs"
                           + ("; fp16 on tensor cores" if board.tensor_cores else "") if on_board else no_toolkit))
    fits.append(RuntimeFit("cusparselt", on_board and sparse_tc,
                           "2:4 on sparse tensor cores: cuSPARSELt if NVIDIA's torch wheel was built with it, else "
                           "sparsecnn's mma.sp conv kernel through NVRTC (convs only)" if on_board
                           and sparse_tc else ("needs 2:4 sparse tensor cores (sm_80+, Orin)" if on_board else no_toolkit)))
    for name, what in (("csr", "CSR kernels (unstructured weights)"), ("sparsert", "generated kernels (unstructured weights)"),
                       ("ecr", "ECR/PECR kernels (feature-map sparsity)")):
        fits.append(RuntimeFit(name, on_board, f"{what} through NVRTC (cuda-python 12.x and JetPack's NVRTC), built "
                                               f"for {board.sm} at first use" if on_board else
                               f"{what} compile for {board.sm} in CI; {no_toolkit}"))
    fits.append(RuntimeFit("minkowski", False, "MinkowskiEngine would have to be built on the board "
                           "(scripts/build_minkowski.py --cuda --arch 8.7); never tried" if on_board else no_toolkit))
    return fits
