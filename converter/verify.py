"""Does an engine compute what its ONNX model says? Outputs against ONNX Runtime (`sparsecnn verify`).

The oracle is ONNX Runtime on the CPU running the pruned, dense-with-zeros ONNX model: the
hand-off every runtime must reproduce (DESIGN contract 1). Per output the check reports the
maximum and mean absolute error and the same relative to the reference's largest magnitude
(max |got - ref| / max |ref|: `common.numerics.rel_err`, the project's one measure).

An output passes when  max |got - ref| <= atol + rtol * max |ref|.  With atol 0 (the default)
that is rel_err <= rtol; atol is absolute slack for an output whose reference is (near) all
zero. The default rtol is the per-dtype layer tolerance of `common.numerics` (fp32 1e-4, fp16
2e-2, fp32 with TF32 5e-3): rounding differences stay far below it, a wrong kernel is off by O(1).
NaN or Inf in an output, a missing output or a different shape fails.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
import torch

from ..common.errors import UserError
from ..common.numerics import layer_tolerance, rel_err
from ..common.onnxio import get_input_spec, graph_inputs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def default_tolerance(dtype: str = "fp32", tf32: bool = False) -> tuple[float, float]:
    """(atol, rtol) for an engine computing in `dtype`: the layer tolerance of common.numerics."""
    return 0.0, layer_tolerance(DTYPES.get(dtype, torch.float32), tf32)


# ---- the model's inputs ------------------------------------------------------------------------

def model_inputs(model: onnx.ModelProto) -> list[tuple[str, list[int | None], int]]:
    """(name, dims with None where symbolic, ONNX element type) of each real graph input (no shape: [])."""
    return [(name, dims or [], elem) for name, dims, elem in graph_inputs(model)]


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else "?" if d is None else str(d)
                           for i, d in enumerate(dims)) + "]"


def random_inputs(model: onnx.ModelProto, batch: int | None = None, seed: int = 0, where: str = "the model",
                  input_shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """Standard-normal inputs of the model's declared sizes and `batch` (default: an input's fixed
    batch, else 1; another batch than a fixed one is a user error), seeded as `sparsecnn run --random
    --seed` draws them (one torch generator, inputs in graph order). `input_shape` (CxHxW or NxCxHxW,
    `--input-shape`) sizes a model's one image input where its file leaves sizes open."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UserError(f"batch must be a whole number >= 1, got {batch!r}")
    spec = get_input_spec(model, where)
    inputs = model_inputs(model)
    if input_shape is not None:
        if len(inputs) != 1 or len(inputs[0][1]) != 4:
            raise UserError(f"{where}: --input-shape sizes a model with one NxCxHxW input; this one takes "
                            f"{', '.join(f'{n} {_fmt_dims(d)}' for n, d, _ in inputs)}: give its values in an .npz "
                            "file (--inputs FILE.npz)")
        if len(input_shape) == 4:
            if batch is not None and batch != input_shape[0]:
                raise UserError(f"--input-shape says batch {input_shape[0]} and --batch says {batch}; give one")
            batch, input_shape = input_shape[0], input_shape[1:]
        name, dims, _ = inputs[0]
        clash = [f"{d} (not {g})" for d, g in zip(dims[1:], input_shape) if d is not None and d != g]
        if clash:
            raise UserError(f"{where}: input '{name}' is {_fmt_dims(dims)}; --input-shape "
                            f"{'x'.join(map(str, input_shape))} differs from its fixed sizes; drop --input-shape "
                            "or give the model's sizes")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, dims, elem in inputs:
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            raise UserError(f"{where}: input '{name}' is not a float tensor; give its values in an .npz file "
                            "(--inputs FILE.npz)")
        shape = dims[1:]
        if input_shape is not None:
            shape = list(input_shape)
        elif any(d is None for d in shape) and spec and len(dims) == 4:
            shape = [spec.get("channels"), spec.get("height"), spec.get("width")]
        if not dims or any(d is None for d in shape):
            hint = " or its size with --input-shape CxHxW" if len(dims) == 4 else ""
            raise UserError(f"{where}: input '{name}' has no fixed size ({_fmt_dims(dims)}); give its values in "
                            f"an .npz file (--inputs FILE.npz){hint}")
        if dims[0] is not None and batch is not None and batch != dims[0]:
            raise UserError(f"{where}: input '{name}' has a fixed batch of {dims[0]}; drop --batch {batch}, or "
                            "export the model with a dynamic batch axis")
        n = batch if batch is not None else dims[0] or 1
        out[name] = torch.randn(n, *shape, generator=gen).numpy()
    return out


def read_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (no pickled objects); a missing or unreadable file is one line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"inputs file not found: {p}")
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{p} is not a readable NumPy .npz file ({str(exc).splitlines()[0][:120]}); write one "
                        "with numpy.savez(FILE, input=array) or `sparsecnn run MODEL --random --save-inputs -o "
                        "FILE.npz`") from None


def check_inputs(arrays: Mapping[str, object], model: onnx.ModelProto, where: str = "the inputs"
                 ) -> dict[str, np.ndarray]:
    """The model's inputs picked by name from `arrays`, as float32 of the declared rank and sizes.
    Other arrays are ignored (`run --save-inputs` files also hold the outputs)."""
    expected = model_inputs(model)
    names = ", ".join(f"'{n}' {_fmt_dims(d)}" for n, d, _ in expected)
    out = {}
    for name, dims, _ in expected:
        if name not in arrays:
            held = ", ".join(f"'{k}'" for k in arrays) or "no arrays"
            raise UserError(f"{where} has no array '{name}' (it holds {held}); the model's inputs are {names}, "
                            "stored by input name")
        a = arrays[name]
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        if a.dtype.kind != "f":
            raise UserError(f"{where}: array '{name}' holds {a.dtype} values; input '{name}' takes floats "
                            "(already resized and normalised)")
        shape = list(a.shape)
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims[1:], shape[1:])) \
                or (dims and dims[0] is not None and dims[0] != shape[0]) or 0 in shape:
            raise UserError(f"{where}: array '{name}' has shape {shape}; input '{name}' takes {_fmt_dims(dims)}")
        if not np.isfinite(a).all():
            raise UserError(f"{where}: array '{name}' holds NaN or Inf values")
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


# ---- the oracle and the subjects ---------------------------------------------------------------

def reference_outputs(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], where: str = "the model"
                      ) -> dict[str, np.ndarray]:
    """ONNX Runtime on the CPU: {output name: array}."""
    import onnxruntime as ort

    custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise UserError(f"{where} holds custom ops (domain {', '.join(custom)}) that ONNX Runtime cannot run; "
                        "the reference is the pruned ONNX file the engine was built from")
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(inputs))))
    except Exception as exc:  # noqa: BLE001 - ORT's own error types; the model is what failed
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"ONNX Runtime cannot run {where}: {first}") from None


def engine_runner(engine) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """Run a sparsecnn Engine on inputs by name; its outputs by name (fp32, host)."""
    def run(inputs):
        outs = engine(*[torch.from_numpy(inputs[n]) for n in engine.input_names])
        return {n: o.detach().cpu().float().numpy() for n, o in zip(engine.output_names, outs)}

    return run


@contextmanager
def eval_mode(module):
    """`module` in eval mode, as it is exported; afterwards every submodule's own mode is back (a
    frozen BatchNorm inside a training model stays frozen). Anything else passes through."""
    if not isinstance(module, torch.nn.Module):
        yield module
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def callable_runner(fn, input_names: list[str], output_names: list[str]):
    """Run any callable on tensors (an nn.Module, a function): its outputs, in the reference's order.
    An nn.Module runs in eval mode, as it was exported, on the device of its parameters."""
    def run(inputs):
        device = next((p.device for p in fn.parameters()), None) if isinstance(fn, torch.nn.Module) else None
        with eval_mode(fn), torch.no_grad():
            got = fn(*[torch.from_numpy(inputs[n]).to(device or "cpu") for n in input_names])
        if isinstance(got, Mapping):
            got = list(got.values())
        elif not isinstance(got, (tuple, list)):
            got = [got]
        arrays = [g.detach().cpu().float().numpy() if isinstance(g, torch.Tensor) else np.asarray(g) for g in got]
        if len(arrays) != len(output_names):
            raise UserError(f"it returned {len(arrays)} outputs, the ONNX model has {len(output_names)} "
                            f"({', '.join(output_names)})")
        return dict(zip(output_names, arrays))

    return run


@dataclass
class Subject:
    """One thing checked against the reference: a label and how to run it, with its tolerance."""

    label: str
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    atol: float
    rtol: float


# ---- the comparison ------------------------------------------------------------------------------

@dataclass
class OutputCheck:
    """One output of one subject against the reference."""

    subject: str
    output: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    ref_max: float  # max |reference|: what the relative errors divide by
    atol: float
    rtol: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.note and math.isfinite(self.max_abs) and self.max_abs <= self.atol + self.rtol * self.ref_max

    def to_dict(self) -> dict:
        d = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}
        return {**d, "passed": self.passed}


def compare_output(subject: str, output: str, got: np.ndarray | None, ref: np.ndarray, atol: float,
                   rtol: float) -> OutputCheck:
    ref64 = np.asarray(ref, dtype=np.float64)
    ref_max = float(np.abs(ref64).max()) if ref64.size else 0.0
    if got is None:
        return OutputCheck(subject, output, list(ref64.shape), math.inf, math.inf, math.inf, math.inf, ref_max,
                           atol, rtol, "output missing")
    got64 = np.asarray(got, dtype=np.float64)
    if got64.shape != ref64.shape:
        return OutputCheck(subject, output, list(got64.shape), math.inf, math.inf, math.inf, math.inf, ref_max,
                           atol, rtol, f"shape {list(got64.shape)}, reference {list(ref64.shape)}")
    if not ref64.size:
        return OutputCheck(subject, output, [], 0.0, 0.0, 0.0, 0.0, 0.0, atol, rtol)
    diff = np.abs(got64 - ref64)
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    if not (math.isfinite(max_abs) and math.isfinite(mean_abs)):
        max_abs = mean_abs = math.inf
    scale = max(ref_max, 1e-30)
    note = "" if np.isfinite(got64).all() else "NaN or Inf in the output"
    return OutputCheck(subject, output, list(ref64.shape), max_abs, mean_abs, rel_err(got64, ref64), mean_abs / scale,
                       ref_max, atol, rtol, note)


@dataclass
class VerifyResult:
    """Every output of every subject against ONNX Runtime; `passed` when all are within tolerance."""

    reference: str                       # what computed the reference, on which file
    inputs: dict[str, list[int]]         # input name -> shape
    input_source: str                    # "random, seed 0" or the .npz file
    checks: list[OutputCheck] = field(default_factory=list)
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # subject -> outputs
    input_arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # what every subject ran on

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def outputs(self) -> list[OutputCheck]:
        return self.checks

    @property
    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]

    def __getitem__(self, output: str) -> OutputCheck:
        """The check of output `output` (the first subject's, when several were checked)."""
        for c in self.checks:
            if c.output == output:
                return c
        raise KeyError(f"no output '{output}'; outputs: {', '.join(dict.fromkeys(c.output for c in self.checks))}")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reference": self.reference, "inputs": self.inputs,
                "input_source": self.input_source, "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = ["subject", "output", "shape", "max abs", "mean abs", "max rel", "mean rel", "rtol", "atol", "result"]
        rows = [[c.subject, c.output, "x".join(map(str, c.shape)) or "scalar", _num(c.max_abs), _num(c.mean_abs),
                 _num(c.max_rel), _num(c.mean_rel), f"{c.rtol:g}", f"{c.atol:g}",
                 ("PASSED" if c.passed else "FAILED") + (f" ({c.note})" if c.note else "")] for c in self.checks]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])

    def verdict(self) -> str:
        subjects = list(dict.fromkeys(c.subject for c in self.checks))
        if self.passed:
            return (f"PASSED: {len(self.checks)} output{'s' if len(self.checks) != 1 else ''} of "
                    f"{', '.join(subjects)} within tolerance of {self.reference}")
        bad = "; ".join(f"{c.subject} {c.output}: " + (c.note or f"max abs {_num(c.max_abs)} > atol + rtol*max|ref| "
                                                        f"= {_num(c.atol + c.rtol * c.ref_max)} (max rel {_num(c.max_rel)})")
                        for c in self.failures)
        return f"FAILED: {bad or 'nothing was checked'}"

    def __str__(self) -> str:
        src = ", ".join(f"'{n}' {s}" for n, s in self.inputs.items())
        return f"reference: {self.reference}; inputs {src} ({self.input_source})\n{self.table()}\n{self.verdict()}"

    def __repr__(self) -> str:
        return f"<VerifyResult {'PASSED' if self.passed else 'FAILED'}: {len(self.checks)} checks>\n{self}"


def _num(v: float) -> str:
    return f"{v:.2e}" if math.isfinite(v) else "inf"


def verify(subjects: list[Subject], reference: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *,
           where: str = "the model", input_source: str = "") -> VerifyResult:
    """Run every subject and ONNX Runtime (on `reference`) on the same inputs and compare the outputs.

    The result keeps each subject's outputs in `arrays` (subject -> output name -> array; the
    reference's under 'onnxruntime'), for `outputs_npz`.
    """
    import onnxruntime as ort

    ref = reference_outputs(reference, inputs, where)
    result = VerifyResult(f"ONNX Runtime {ort.__version__} (CPU) on {where}",
                          {k: list(v.shape) for k, v in inputs.items()}, input_source, input_arrays=dict(inputs))
    result.arrays["onnxruntime"] = ref
    for s in subjects:
        got = s.run(inputs)
        result.arrays[s.label] = got
        for name, r in ref.items():
            result.checks.append(compare_output(s.label, name, got.get(name), r, s.atol, s.rtol))
    return result


def outputs_npz(result: VerifyResult) -> bytes:
    """An .npz of the inputs (by input name: the file feeds `--inputs` again) and every subject's
    outputs as '<subject>:<output>' (the reference's as 'onnxruntime:<output>')."""
    arrays = dict(result.input_arrays)
    for subject, outs in result.arrays.items():
        arrays.update({f"{subject}:{name}": a for name, a in outs.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---- the flows `sparsecnn verify` runs -----------------------------------------------------------

def given_or_random(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray] | None, input_source: str,
                    batch: int | None, seed: int, where: str, input_shape: tuple[int, ...] | None = None
                    ) -> tuple[dict[str, np.ndarray], str]:
    """(input arrays, what they are): `inputs` checked against `model`, else random of its size."""
    if inputs is not None:
        return check_inputs(inputs, model, input_source or "the inputs"), input_source
    return random_inputs(model, batch, seed, where, input_shape), f"random, seed {seed}"


def engine_subject(engine, atol: float | None = None, rtol: float | None = None) -> Subject:
    """An engine as a verify subject, at its dtype's tolerance where `atol`/`rtol` are not given."""
    d_atol, d_rtol = default_tolerance(engine.options.dtype, engine.options.tf32)
    return Subject(engine.runtime, engine_runner(engine), d_atol if atol is None else float(atol),
                   d_rtol if rtol is None else float(rtol))


def check_runtimes(model: onnx.ModelProto, runtimes: list[str], device: str = "auto", *, dtype: str = "fp32",
                   tf32: bool = False, options: Mapping[str, dict] | None = None,
                   inputs: Mapping[str, np.ndarray] | None = None, input_source: str = "", batch: int | None = None,
                   seed: int = 0, atol: float | None = None, rtol: float | None = None, where: str = "the model",
                   quiet: bool = False, calibration: torch.Tensor | None = None,
                   input_shape: tuple[int, ...] | None = None) -> VerifyResult:
    """Rewrite and compile `model` (the pruned ONNX) for each runtime, run all on the same inputs
    (`inputs` by name, else random of the model's size) and compare every output with ONNX Runtime's.
    `options`: per runtime its typed settings (runtimes.options.validate_for_runtimes); `calibration`:
    the input batch runtimes that choose on activations compile on (converter/calibration.py)."""
    from ..runtimes import compile_engine, require_runtime, resolve_device
    from .source import stage

    rts = [require_runtime(n) for n in runtimes]  # an unknown or unavailable runtime fails before any work
    dev = resolve_device(device)
    arrays, source = given_or_random(model, inputs, input_source, batch, seed, where, input_shape)
    subjects = []
    for rt in rts:
        opts = {"dtype": dtype, "tf32": tf32, "extra": dict((options or {}).get(rt.name, {}))}
        with stage(f"compiling for runtime '{rt.name}' on {dev} ({dtype})", quiet):
            engine = compile_engine(rt, rt.rewrite(model, opts), dev, opts, calibration=calibration)
        subjects.append(engine_subject(engine, atol, rtol))
    with stage(f"running {len(subjects)} engine{'s' if len(subjects) != 1 else ''} and ONNX Runtime", quiet):
        return verify(subjects, model, arrays, where=where, input_source=source)


def check_engine_file(path: str, device: str = "auto", *, reference: str | None = None,
                      inputs: Mapping[str, np.ndarray] | None = None, input_source: str = "", batch: int | None = None,
                      seed: int = 0, atol: float | None = None, rtol: float | None = None,
                      quiet: bool = False, input_shape: tuple[int, ...] | None = None) -> VerifyResult:
    """A saved engine against ONNX Runtime on `reference` (the pruned ONNX file it was built from);
    without one, on the engine's own model where ONNX Runtime can run it (the torch runtime keeps
    the pruned ONNX as it is)."""
    from ..common.onnxio import load_onnx
    from ..runtimes import load_engine
    from .source import stage

    with stage(f"loading {path}", quiet):
        engine = load_engine(path, None if device == "auto" else device)
    if reference:
        model, where = load_onnx(reference), Path(reference).name
    else:
        custom = sorted({n.op_type for n in engine.model.graph.node if n.domain not in ("", "ai.onnx")})
        if custom:
            raise UserError(f"{path} holds runtime '{engine.runtime}''s rewritten model ({', '.join(custom[:3])}: "
                            "custom ops ONNX Runtime cannot run); give --onnx FILE, the pruned ONNX file it was "
                            "built from")
        model, where = engine.model, f"{Path(path).name}'s model"
    ref_in = [n for n, _, _ in model_inputs(model)]
    ref_out = [o.name for o in model.graph.output]
    if sorted(ref_in) != sorted(engine.input_names) or sorted(ref_out) != sorted(engine.output_names):
        raise UserError(f"{reference} has inputs {ref_in} and outputs {ref_out}; the engine {list(engine.input_names)} "
                        f"and {list(engine.output_names)}: give the ONNX file the engine was built from")
    arrays, source = given_or_random(model, inputs, input_source, batch, seed, where, input_shape)
    subject = engine_subject(engine, atol, rtol)
    with stage("running the engine and ONNX Runtime", quiet):
        return verify([subject], model, arrays, where=where, input_source=source)
