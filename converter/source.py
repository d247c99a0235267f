"""Where a model comes from: a registry name (+ weights), a sparsecnn checkpoint, or an ONNX file."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..common.errors import UserError
from ..common.onnxio import get_input_spec, load_onnx
from ..models.registry import MODELS, InputSpec, get_entry, load_model, load_state_dict_file
from ..passes.fold_bn import fold_bn, inline_constant_identities
from ..passes.graph import run_pipeline


@contextmanager
def stage(message: str, quiet: bool = False):
    """Print '<message> ... done in X s' around a step of a long command (to stderr)."""
    if quiet:
        yield
        return
    print(f"{message} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


@dataclass
class Source:
    model: onnx.ModelProto  # dense (or already pruned) ONNX with BN folded
    spec: InputSpec | None
    label: str


def checkpoint_arch(path: str) -> str | None:
    obj = load_state_dict_file(path)
    return obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None


def load_source(source: str, weights: str | None = None, num_classes: int | None = None, opset: int = 17,
                quiet: bool = False) -> Source:
    """Resolve `source` to a dense ONNX model ready for the prune passes."""
    from .export import export_onnx

    path = Path(source)
    if source.endswith(".onnx") or (path.is_file() and path.suffix == ".onnx"):
        with stage(f"loading {source}", quiet):
            model = load_onnx(path)
            if any(n.op_type == "BatchNormalization" for n in model.graph.node):
                model, _ = run_pipeline(model, [(inline_constant_identities, {}), (fold_bn, {})])
        spec = get_input_spec(model, path)
        return Source(model, InputSpec.from_dict(spec, str(path)) if spec else None, path.name)
    arch = source
    if source not in MODELS and (path.suffix in {".pt", ".pth", ".ckpt"} or path.exists()):
        arch = checkpoint_arch(source)
        if arch is None:
            raise UserError(f"{source} is a checkpoint without an architecture name; give the model and the "
                            f"file separately: `{Path(sys.argv[0]).name} ... resnet18 --weights {source}`")
        weights = source
    get_entry(arch)  # an unknown name fails before any progress is printed
    with stage(f"building {arch}" + (f" with weights {weights}" if weights else " (random weights, seed 0)"), quiet):
        module, spec, entry = load_model(arch, weights, num_classes)
    with stage(f"exporting {arch} to ONNX (opset {opset}, BatchNorm folded)", quiet):
        model = export_onnx(module, spec, entry.exclude, opset)
    return Source(model, spec, arch)


def load_runnable(model: str, *, runtime: str, device: str, weights: str | None = None,
                  options: dict | None = None):
    """(engine, input spec or None) for `sparsecnn run`: an engine file loads as saved (on `device`
    unless "auto"); an ONNX file or a registry model is rewritten and compiled for `runtime`."""
    from ..runtimes import load_engine, require_runtime, resolve_device

    if model.endswith(".engine"):
        engine = load_engine(model, None if device == "auto" else device)
        spec = get_input_spec(engine.model, model)
        return engine, InputSpec.from_dict(spec, model) if spec else None
    rt = require_runtime(runtime)
    dev = resolve_device(device)
    src = load_source(model, weights)
    return rt.compile(rt.rewrite(src.model, options), dev, options), src.spec


def fixed_input_shape(engine) -> tuple[int, ...]:
    """The engine's first input shape without the batch axis; a UserError when it is not fixed."""
    for vi in engine.model.graph.input:
        if vi.name == engine.input_names[0]:
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim][1:]
            if all(dims):
                return tuple(dims)
    raise UserError("the model's input size is not fixed; give images with --input")
