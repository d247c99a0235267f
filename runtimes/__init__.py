"""Runtime registry: each runtime is one module, imported only when asked for.

Heavy libraries (TensorRT, MinkowskiEngine, cuda-python) are imported inside a runtime's
functions, never here, so the CLI and `doctor` work without them.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import ModuleType

# `import torch as _torch`: importing the subpackage runtimes/torch/ binds the name `torch`
# in this package's namespace, which would shadow PyTorch here.
import torch as _torch

from ..common.errors import UserError

RUNTIME_MODULES: dict[str, str] = {
    "torch": "sparsecnn.runtimes.torch.runtime",
    "cusparselt": "sparsecnn.runtimes.cusparselt.runtime",
    "tensorrt": "sparsecnn.runtimes.tensorrt.runtime",
    "csr": "sparsecnn.runtimes.csr.runtime",
    "ecr": "sparsecnn.runtimes.ecr.runtime",
    "sparsert": "sparsecnn.runtimes.sparsert.runtime",
    "minkowski": "sparsecnn.runtimes.minkowski.runtime",
    "hybrid": "sparsecnn.runtimes.hybrid.runtime",
}


def runtime_names() -> list[str]:
    return list(RUNTIME_MODULES)


def get_runtime(name: str) -> ModuleType:
    if name not in RUNTIME_MODULES:
        raise UserError(f"unknown runtime '{name}'; known runtimes: {', '.join(RUNTIME_MODULES)}")
    return importlib.import_module(RUNTIME_MODULES[name])


def availability() -> dict[str, tuple[bool, str]]:
    out = {}
    for name in RUNTIME_MODULES:
        try:
            out[name] = get_runtime(name).available()
        except Exception as exc:  # a broken runtime module must not break `doctor`
            out[name] = (False, f"cannot import: {type(exc).__name__}: {exc}")
    return out


def require_runtime(name: str) -> ModuleType:
    rt = get_runtime(name)
    ok, reason = rt.available()
    if not ok:
        raise UserError(f"runtime '{name}' is not available here: {reason}")
    return rt


def resolve_device(device: str | None) -> _torch.device:
    if device in (None, "auto"):
        return _torch.device("cuda" if _torch.cuda.is_available() else "cpu")
    try:
        dev = _torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not _torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return dev


def takes_calibration(rt: ModuleType | str) -> bool:
    """Whether runtime `rt` chooses on activations, so that its compile takes `calibration=` (an
    input batch, normalised as the model expects): ecr's and hybrid's ECR/PECR kernels skip input
    zeros, so their speed, and the choice, depend on the activation values."""
    rt = get_runtime(rt) if isinstance(rt, str) else rt
    # Read from the runtime's own compile signature, not from a list of names here: the contract's
    # compile(model, device, options, state) is every runtime's, and a runtime that chooses on
    # activations adds `calibration=` in its own folder; a list here would fall out of step with it.
    try:
        return "calibration" in inspect.signature(rt.compile).parameters
    except (TypeError, ValueError):  # a compiled or wrapped callable without a readable signature
        return False


def compile_engine(rt_or_name: ModuleType | str, model, device, options=None, state: dict | None = None,
                   calibration: _torch.Tensor | None = None):
    """The one call that compiles an engine (every flow: convert, run, verify, compare, the API,
    the studies, load_engine): `rt.compile(model, device, options, state=state)`, with
    `calibration` passed on only to a runtime that takes it (`takes_calibration`); the others
    choose on weights and shapes alone, and the caller says that it was ignored."""
    rt = require_runtime(rt_or_name) if isinstance(rt_or_name, str) else rt_or_name
    kwargs = {"calibration": calibration} if calibration is not None and takes_calibration(rt) else {}
    return rt.compile(model, device, options, state=state, **kwargs)


def load_engine(path: str | Path, device: str | None = None, read: tuple | None = None):
    """Rebuild a saved engine on `device` (default: the one it was compiled for, if present).
    `read`: what `base.read_engine(path)` returned, when the caller has already read the file."""
    from .base import CompileOptions, read_engine
    from .options import validate_saved

    manifest, model, files = read or read_engine(path)  # the one validator: sizes, manifest schema, model
    rt = require_runtime(manifest["runtime"])
    options = CompileOptions.from_dict(manifest["options"])
    # an engine saved by another version may carry options this one does not declare: drop them, say so
    options.extra = validate_saved(manifest["runtime"], options.extra)
    dev = resolve_device(device or manifest["options"].get("device"))
    state = dict(manifest.get("state") or {})
    if files:
        state["files"] = files
    try:
        engine = compile_engine(rt, model, dev, options, state=state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # the file was validated; what is left is its saved state, which only the runtime reads
        raise UserError(f"{path}: its saved state does not fit runtime '{manifest['runtime']}' "
                        f"({type(exc).__name__}: {exc}); rebuild the engine") from exc
    if not engine.measured_again:
        engine.plans.update(state.get("plans") or {})  # whole-graph plans: replayed, not re-timed
    return engine
