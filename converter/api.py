"""The Python API (`import sparsecnn`): the CLI's flow as functions, for notebooks and scripts.

    prune(model, "0.9")   -> PrunedModel   an nn.Module, an ONNX file or ModelProto, or a registry model
    compile(pruned, ...)  -> Engine        runtimes/base.py's Engine: callable on tensors, .report(), .save()
    verify(engine)        -> VerifyResult  every output against ONNX Runtime on the pruned ONNX
    compare(model, ...)   -> Comparison    accuracy: dense vs each pruning method (converter/compare.py)
    load(path)            -> Engine        a saved engine file
    load_images(path, m)  -> (tensor, files) images prepared per a model's input spec

Each function calls what the CLI verb calls (export, prune passes, runtime registry, the verify
library), so the API and `sparsecnn convert / run / verify / compare` cannot drift apart: the same
layers stay dense (a registry model's list; for anything else its stems and heads, the rule a foreign
ONNX file gets), the same options are validated, the same errors are raised (`UserError`, one line
naming the fix). docs/api.md is the worked example, executed by tests/test_api.py.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ..common.errors import UserError
from ..common.onnxio import get_input_spec, save_onnx, set_input_spec, validate_model
from ..models.registry import InputSpec
from ..passes.graph import copy_model
from . import verify as _verify


# The pruned ONNX each compiled engine came from, for verify(engine) without onnx= (no reference
# from the engine is kept: it goes with the engine).
_SOURCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(repr=False)
class PrunedModel:
    """A pruned model: the plain ONNX model whose pruned weights are zeros (the hand-off every runtime
    starts from, DESIGN contract 1), its input spec and what the prune passes did."""

    onnx: onnx.ModelProto
    spec: InputSpec | None
    label: str
    sparsity: str | None = None  # what prune() was asked for: '0.9', '2:4' or None (dense)
    passes: list[str] = field(default_factory=list)  # each prune pass's counters, as the CLI prints them

    def save(self, path: str | Path) -> Path:
        """Write the ONNX file (atomically); `sparsecnn run / verify / convert --engine` read it."""
        from ..common.fileio import check_output

        check_output(path, (), "ONNX file")
        return save_onnx(self.onnx, path)

    def layers(self) -> list[dict]:
        """Per weight layer: name, shape, sparsity, whether it was prunable, 2:4 compliance, bytes."""
        from ..passes.inspect import layer_table

        return [r.to_dict() for r in layer_table(self.onnx)]

    def summary(self) -> dict:
        """Prunable layers, their sparsity, 2:4 layers, bytes dense and non-zero (`sparsecnn inspect`)."""
        from ..passes.inspect import layer_table, sparsity_summary

        return sparsity_summary(layer_table(self.onnx))

    def __repr__(self) -> str:
        s = self.summary()
        dense = [r["weight"].removesuffix(".weight") for r in self.layers() if not r["prunable"]]
        shown = ", ".join(dense) if len(dense) <= 4 else f"{', '.join(dense[:3])}, ..., {dense[-1]}"
        return (f"PrunedModel({self.label}, prune {self.sparsity or 'none'}: {s['prunable_layers']} prunable layers "
                f"at sparsity {s['prunable_sparsity']:.4f}, {s['two_four_layers']} layers 2:4; {len(dense)} left dense: "
                f"{shown or 'none'}; weights {s['dense_bytes'] / 2**20:.1f} MiB dense, "
                f"{s['nonzero_bytes'] / 2**20:.1f} MiB non-zero)")


# ---- prune ---------------------------------------------------------------------------------------

def prune(model, sparsity: str | float | None = "0.9", *, exclude: Sequence[str] = (), scope: str = "layer",
          input_shape: Sequence[int] | None = None, mean: Sequence[float] | str | None = None,
          std: Sequence[float] | str | None = None, scale: float | None = None, labels: Sequence[str] | None = None,
          input_name: str = "input", output_names: Sequence[str] | None = None, weights: str | None = None,
          num_classes: int | None = None, opset: int | None = None) -> PrunedModel:
    """Export `model` to ONNX with BatchNorm folded and prune it, as `sparsecnn convert --prune` does.

    model: an `nn.Module` (give `input_shape`), an ONNX file path or `onnx.ModelProto`, a registry
        model name (`weights`, `num_classes` as in the CLI) or a sparsecnn checkpoint path.
    sparsity: 0.9 / '0.9' (unstructured magnitude), '2:4' (2 of every 4 input channels), or 'none'.
    exclude: more layers to leave dense (module, weight or ONNX node names, globs allowed). Stems and classifiers
        are left dense already: a registry model's own list; for anything else every weight layer that
        reads the input or reaches an output without another weight layer (the CLI's rule for ONNX files).
    scope: 'layer' (every layer at `sparsity`) or 'global' (one threshold over all prunable layers).
    input_shape, mean, std, scale, labels: the input spec (C, H, W; pixels x scale, default 1/255,
        then (x - mean) / std per channel; 'imagenet' names ImageNet's mean and std; class names),
        stored in the ONNX file so `load_images` and `sparsecnn run` prepare images. An nn.Module
        needs `input_shape` (input_name, output_names name its ONNX input and outputs); an ONNX
        file from elsewhere takes them as `convert --input-shape/--mean/--std/--scale` do.
    opset: the ONNX opset a module or registry model is exported at (default 17); an ONNX file keeps
        its own unless it is given, then it is converted to it (as `convert --opset`).

    Depthwise convs are pruned like any layer (as the CLI does) with a warning naming them: their
    3x3 filters have 9 weights, so 0.9 empties most of their channels, and the csr runtime runs
    grouped convs dense anyway; `exclude` them to keep them dense.
    """
    from ..passes.graph import run_pipeline
    from ..passes.prune import check_exclusions, depthwise_weights, prunable_weights, prune_pipeline

    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if scope not in ("layer", "global"):
        raise UserError(f"scope must be 'layer' or 'global', got {scope!r}")
    pipeline = prune_pipeline(None if sparsity is None else str(sparsity), scope, exclude,
                              what="prune()'s sparsity")  # a bad value fails before any work
    dense, spec, label = _dense_onnx(model, input_shape=input_shape, mean=mean, std=std, scale=scale, labels=labels,
                                     input_name=input_name, output_names=output_names, weights=weights,
                                     num_classes=num_classes, opset=opset)
    check_exclusions(dense, exclude)  # before any work, and for prune 'none' too
    pruned, results = run_pipeline(dense, pipeline) if pipeline else (dense, [])
    if any(r.counters.get("pruned_depthwise") for r in results):
        prunable = {w for _, w, _ in prunable_weights(dense, exclude)}
        names = [w.removesuffix(".weight") for w in depthwise_weights(dense) if w in prunable]
        warnings.warn(f"pruned {len(names)} depthwise convs at {sparsity} ({', '.join(names[:3])}"
                      f"{', ...' if len(names) > 3 else ''}): a 3x3 depthwise filter has 9 weights, so most of their "
                      "channels lose all of them, and csr runs grouped convs dense anyway; keep them dense with "
                      f"exclude=[...] (e.g. exclude={names[:2]!r})", UserWarning, stacklevel=2)
    return PrunedModel(pruned, spec, label, None if not pipeline else str(sparsity), [r.summary() for r in results])


def _dense_onnx(model, *, input_shape, mean, std, scale, labels, input_name, output_names, weights, num_classes,
                opset) -> tuple[onnx.ModelProto, InputSpec | None, str]:
    """(dense ONNX with BatchNorm folded and its exclusion list, input spec, label) of any model form."""
    if isinstance(model, nn.Module):
        if weights is not None or num_classes is not None:
            raise UserError("weights= and num_classes= are for a registry model; load an nn.Module's weights "
                            "with module.load_state_dict(...) before prune()")
        return _export_module(model, input_shape, mean, std, 1.0 / 255.0 if scale is None else scale, labels,
                              input_name, output_names, opset or 17)
    if isinstance(model, PrunedModel):
        raise UserError("this model is pruned already; prune the dense model (or its ONNX file) instead")
    if input_name != "input" or output_names is not None:
        raise UserError("input_name and output_names name an nn.Module's ONNX export; an ONNX file or registry "
                        "model has its own")
    from .source import load_source, resolve_input

    flags = _spec_flags(input_shape, mean, std, scale)
    if isinstance(model, onnx.ModelProto):
        from .source import ready_for_pruning

        where = "the given ONNX model"
        validate_model(model, where)
        model = ready_for_pruning(model)
        if opset is not None:  # as --opset converts an ONNX file
            from .source import convert_opset

            model = convert_opset(model, opset, where)
        stored = get_input_spec(model, where)
        inp = resolve_input(model, InputSpec.from_dict(stored, where) if stored else None, flags, where)
        label = model.graph.name or "onnx"
    elif isinstance(model, (str, Path)):
        src = load_source(str(model), weights, num_classes, opset or 17, quiet=True, flags=flags,
                          opset_given=opset is not None)
        model, inp, label = src.model, src.input, src.label
    else:
        raise UserError(f"prune() takes an nn.Module, an ONNX file path or onnx.ModelProto, or a registry model "
                        f"name; got {type(model).__name__}")
    spec = inp.spec
    if spec is None and (flags.given() or labels is not None):  # what was given is stored whole or not at all
        inp.require_spec()
    if spec is not None:
        if labels is not None:
            spec = dataclasses.replace(spec, labels=tuple(labels))
            spec._check(label)
        model = copy_model(model)  # the caller's ModelProto keeps its metadata
        set_input_spec(model, spec.to_dict())
    return model, spec, label


def _spec_flags(input_shape, mean, std, scale):
    """The input-spec arguments as `convert`'s flags (source.SpecFlags): a file or registry model's
    spec is completed or overridden by the same rules as on the command line."""
    from .source import SpecFlags

    def per_channel(v):
        return v.lower() if isinstance(v, str) else tuple(float(x) for x in v) if v is not None else None

    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    return SpecFlags(shape, per_channel(mean), per_channel(std), scale)


def _export_module(module: nn.Module, input_shape, mean, std, scale, labels, input_name, output_names, opset
                   ) -> tuple[onnx.ModelProto, InputSpec, str]:
    import numbers

    from .export import export_onnx
    from .source import normalisation
    from .verify import eval_mode

    if input_shape is None:
        raise UserError("give input_shape=(channels, height, width), e.g. (3, 224, 224): an nn.Module does not "
                        "say what input it takes")
    dims = tuple(input_shape)[-3:] if len(tuple(input_shape)) in (3, 4) else ()
    if not dims or not all(isinstance(d, numbers.Integral) and d > 0 for d in dims):
        raise UserError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
    shape = tuple(int(d) for d in dims)
    mean, std = normalisation(mean, std, shape[0], ("mean", "std"))
    label = type(module).__name__
    # export runs on the CPU: a module elsewhere is copied, never moved; its modes come back as they were
    cpu = module if all(p.device.type == "cpu" for p in module.parameters()) else copy.deepcopy(module).cpu()
    with eval_mode(cpu):
        try:
            with torch.no_grad():
                out = cpu(torch.zeros(1, *shape))
        except Exception as exc:  # noqa: BLE001 - the user's module refused the input: say which input
            raise UserError(f"{label} fails on an input of shape {[1, *shape]} ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); give the "
                            "input_shape=(C, H, W) it takes") from None
        spec = _module_spec(label, shape, out, mean, std, scale, labels, input_name, output_names)
        return export_onnx(cpu, spec, None, opset), spec, label  # None: stems and heads dense, the ONNX-file rule


def _module_spec(label, shape, out, mean, std, scale, labels, input_name, output_names):
    """The InputSpec of a module from its output on one input: output names and classes."""
    outs = list(out.values()) if isinstance(out, Mapping) else list(out) if isinstance(out, (tuple, list)) else [out]
    if output_names is None:
        output_names = (["logits"] if outs[0].dim() == 2 else ["output"]) if len(outs) == 1 else \
            [f"output{i}" for i in range(len(outs))]
    if len(output_names) != len(outs):
        raise UserError(f"output_names has {len(output_names)} names; {label} returns {len(outs)} outputs")
    classes = int(outs[0].shape[1]) if len(outs) == 1 and outs[0].dim() == 2 else None
    try:
        spec = InputSpec(*shape, scale=float(scale), mean=mean, std=std, input_name=input_name,
                         output_names=tuple(output_names), num_classes=classes,
                         labels=tuple(labels) if labels is not None else None)
        spec._check(label)
    except TypeError as exc:
        raise UserError(f"bad input spec for {label}: {exc}") from None
    return spec


# ---- compile, load -------------------------------------------------------------------------------

def _as_onnx(model, what: str = "model") -> tuple[onnx.ModelProto, str]:
    """(ModelProto, label) of a PrunedModel, a ModelProto or an ONNX file path."""
    if isinstance(model, PrunedModel):
        return model.onnx, model.label
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "the ONNX model"
    if isinstance(model, (str, Path)):
        from ..common.onnxio import load_onnx

        if not str(model).endswith(".onnx"):
            raise UserError(f"{what} {model} is not an .onnx file; prune() a registry model or module first")
        return load_onnx(model), Path(model).name
    raise UserError(f"{what} must be a PrunedModel (from prune()), an onnx.ModelProto or an .onnx file path; "
                    f"got {type(model).__name__}")


def compile(model, runtime: str = "torch", device: str = "auto", dtype: str = "fp32", *, tf32: bool = False,
            channels_last: bool = False, cuda_graph: bool = True, options: Mapping | None = None,
            calibration=None, calibration_images: int | None = None):
    """Rewrite the pruned model for `runtime` and compile it on `device`, as `convert --engine` does.

    runtime: torch, csr, sparsert, ecr, cusparselt, tensorrt, minkowski, hybrid (`sparsecnn doctor` says
        which run here; on a CPU torch and csr have reference paths). options: the runtime's settings
        (`sparsecnn doctor --options RUNTIME`), e.g. {"csr_weight_budget": 0.25}; an unknown key or
        a bad value is a UserError.
    calibration: the inputs a runtime that chooses on activations (ecr, hybrid: their ECR/PECR kernels
        skip input zeros) chooses its kernels on, as `convert --calibration` gives them: a tensor or
        array [N, C, H, W] already normalised as the model expects, a folder of images (an ImageFolder
        or a flat folder, prepared per the model's input spec; at most `calibration_images`, default
        16, evenly spaced over its sorted files) or an .npz holding the input array by input name (its
        first `calibration_images` rows). Without it those runtimes choose on a random input and
        `engine.report()` says so; other runtimes choose on weights and shapes and ignore it (a warning
        says so).
    Returns the Engine (runtimes/base.py): `engine(x)` returns a tuple of fp32 tensors, one per output;
    `engine.report()` says per layer what ran; `engine.save(path)` writes an engine file.
    """
    import numbers

    from ..runtimes import compile_engine, require_runtime, resolve_device
    from ..runtimes.options import validate
    from .calibration import calibration_for, check_path

    if dtype not in _verify.DTYPES:
        raise UserError(f"dtype must be one of {', '.join(_verify.DTYPES)}, got {dtype!r}")
    if calibration_images is not None and (isinstance(calibration_images, bool)
                                           or not isinstance(calibration_images, numbers.Integral)
                                           or calibration_images < 1):
        raise UserError(f"calibration_images must be an integer >= 1, got {calibration_images!r}")
    if isinstance(calibration, (str, Path)):
        check_path(calibration, "calibration=")  # a missing folder or file fails before any work
    onnx_model, _ = _as_onnx(model)
    rt = require_runtime(runtime)
    extra = validate(runtime, dict(options or {}))
    dev = resolve_device(device)
    opts = {"dtype": dtype, "tf32": bool(tf32), "channels_last": bool(channels_last), "cuda_graph": bool(cuda_graph),
            "extra": extra}
    sparse = rt.rewrite(onnx_model, opts)
    calib = None
    if calibration is not None:
        stored = get_input_spec(onnx_model)
        spec = model.spec if isinstance(model, PrunedModel) else InputSpec.from_dict(stored) if stored else None
        calib = calibration_for([rt], calibration, sparse, spec, calibration_images, "calibration=",
                                warn=lambda line: warnings.warn(line, UserWarning, stacklevel=4))
    engine = compile_engine(rt, sparse, dev, opts, calibration=calib)
    _SOURCES[engine] = model if isinstance(model, PrunedModel) else onnx_model
    return engine


def load(path: str | Path, device: str | None = None):
    """A saved engine file, rebuilt on `device` (default: the one it was compiled for, if present)."""
    from ..runtimes import load_engine

    return load_engine(path, device)


# ---- verify --------------------------------------------------------------------------------------

def verify(engine_or_model, onnx=None, inputs=None, *, atol: float | None = None, rtol: float | None = None,
           batch: int | None = None, seed: int = 0) -> _verify.VerifyResult:
    """Run `engine_or_model` and ONNX Runtime (CPU) on the same inputs and compare every output.

    engine_or_model: an Engine (from compile() or load()), or any callable on tensors such as an
        nn.Module (checked against the ONNX file exported from it, e.g. prune(module, 'none')).
    onnx: the reference: a PrunedModel, onnx.ModelProto or .onnx path; for an engine from compile()
        the model it was compiled from is the default.
    inputs: None (standard-normal of the model's size, `batch` (default: its fixed batch, else 1) and
        `seed`: what `sparsecnn verify` and `run --random` draw), a tensor or array (the single input),
        {input name: tensor or array},
        or an .npz path (arrays by input name, as `sparsecnn run --save-inputs` writes).
    atol, rtol: an output passes when max|got - ref| <= atol + rtol * max|ref|; defaults: atol 0, rtol
        the engine's dtype tolerance from common/numerics.py (fp32 1e-4, fp16 2e-2, TF32 5e-3).
    Returns a VerifyResult: `.passed`, `.outputs` (per output max/mean abs and rel error), printable.
    """
    from ..runtimes.base import Engine

    is_engine = isinstance(engine_or_model, Engine)
    if onnx is None:
        onnx = _SOURCES.get(engine_or_model) if is_engine else None
        if onnx is None:
            raise UserError("give onnx=: the pruned ONNX model (PrunedModel, ModelProto or .onnx path) that "
                            + ("this engine was built from" if is_engine else "this model should reproduce"))
    reference, where = _as_onnx(onnx, "onnx=")
    if not is_engine and not callable(engine_or_model):
        raise UserError(f"verify() takes an Engine or a callable model; got {type(engine_or_model).__name__}")
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise UserError(f"{name} must be a number >= 0, got {v!r}")
    arrays, source = _inputs(inputs, reference, batch, seed, where)
    if is_engine:
        subject = _verify.engine_subject(engine_or_model, atol, rtol)
    else:
        d_atol, d_rtol = _verify.default_tolerance("fp32")
        names_in = [n for n, _, _ in _verify.model_inputs(reference)]
        subject = _verify.Subject(type(engine_or_model).__name__,
                                  _verify.callable_runner(engine_or_model, names_in,
                                                          [o.name for o in reference.graph.output]),
                                  d_atol if atol is None else float(atol), d_rtol if rtol is None else float(rtol))
    return _verify.verify([subject], reference, arrays, where=where, input_source=source)


def _inputs(inputs, reference: onnx.ModelProto, batch: int | None, seed: int, where: str):
    if inputs is None:
        return _verify.random_inputs(reference, batch, seed, where), f"random, seed {seed}"
    if isinstance(inputs, (str, Path)):
        return _verify.check_inputs(_verify.read_inputs(inputs), reference, str(inputs)), str(inputs)
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        names = [n for n, _, _ in _verify.model_inputs(reference)]
        if len(names) != 1:
            raise UserError(f"{where} has {len(names)} inputs ({', '.join(names)}); give inputs={{name: array}}")
        inputs = {names[0]: inputs}
    if isinstance(inputs, Mapping):
        return _verify.check_inputs(inputs, reference, "inputs="), "given"
    raise UserError(f"inputs must be a tensor, an array, {{input name: array}} or an .npz path; got "
                    f"{type(inputs).__name__}")


# ---- images --------------------------------------------------------------------------------------

def load_images(path: str | Path, model) -> tuple[torch.Tensor, list[Path]]:
    """An image file or a folder of images (recursively, sorted), resized and normalised the way
    `model`'s input spec says (a PrunedModel, Engine, ModelProto, .onnx path or InputSpec): the batch
    tensor [N, C, H, W] and the files in batch order."""
    from .images import image_files
    from .images import load_images as _load

    files = image_files(path)  # a missing path fails before the model is read
    spec = _spec_of(model)
    return _load(files, spec), files


def _spec_of(model) -> InputSpec:
    from ..runtimes.base import Engine

    if isinstance(model, InputSpec):
        return model
    if isinstance(model, PrunedModel) and model.spec is not None:
        return model.spec
    onnx_model = model.model if isinstance(model, Engine) else _as_onnx(model)[0]
    stored = get_input_spec(onnx_model)
    if stored is None:
        raise UserError("the model carries no input spec (size, normalisation); prune() an nn.Module with "
                        "input_shape/mean/std, or pass an InputSpec")
    return InputSpec.from_dict(stored)


# ---- compare -------------------------------------------------------------------------------------

class Comparison(dict):
    """compare()'s results (converter/compare.py's JSON-ready dict); prints as the CLI's table."""

    def __str__(self) -> str:
        from .compare import format_table

        return format_table([self])

    def _repr_pretty_(self, p, cycle) -> None:  # IPython / Jupyter
        p.text(str(self))


def compare(model, methods: Sequence[str] = ("2:4", "0.9", "channel:0.5"), data: str | Path | None = None, *,
            exclude: Sequence[str] = (), input_shape: Sequence[int] | None = None, mean=None, std=None,
            scale: float | None = None,
            weights: str | None = None, num_classes: int | None = None, subset: int | None = None,
            device: str = "auto", runtime: str = "torch", batch_size: int = 250,
            progress: bool = False) -> Comparison:
    """Accuracy of `model` pruned each way, one-shot, against the dense model (`sparsecnn compare
    --finetune-epochs 0`): top-1/top-5 on labelled data, agreement with the dense outputs, sizes.

    model: an nn.Module, a registry model name or a sparsecnn checkpoint path (input_shape, mean,
        std, scale as for prune()); an ONNX file is compared by `sparsecnn compare FILE.onnx`.
    methods: '2:4', a sparsity such as '0.9', 'channel:F' (remove the fraction F of FLOPs; needs
        torch-pruning). exclude: more layers every method leaves dense, as for prune(). data:
        Fashion-MNIST (default, Debian's dataset-fashion-mnist) or an ImageFolder directory; subset:
        the first N images. Fine-tuning with masks is the CLI's (`sparsecnn compare`).
    """
    from ..passes.graph import prune_exclusions, set_prune_exclusions, weight_nodes
    from ..passes.masks import is_excluded
    from ..passes.prune import check_exclusions
    from ..runtimes import resolve_device
    from .compare import Subject, compare_model, load_subject, parse_methods
    from .data import load_data

    parsed = parse_methods([str(m) for m in methods])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    dev = resolve_device(device)
    if isinstance(model, nn.Module):
        dense, spec, label = _export_module(model, input_shape, mean, std, 1.0 / 255.0 if scale is None else scale,
                                            None, "input", None, 17)
        subject = Subject(label, spec, (), copy.deepcopy(model).cpu().eval(), dense)
    elif isinstance(model, (str, Path)) and not str(model).endswith(".onnx"):
        subject = load_subject(str(model), weights, num_classes, quiet=True,
                               flags=_spec_flags(input_shape, mean, std, scale))
    else:
        raise UserError("compare() takes an nn.Module, a registry model name or a checkpoint path; compare an "
                        "ONNX file with `sparsecnn compare FILE.onnx --methods 2:4 0.9`")
    # every method leaves the same layers dense: the model's own list and `exclude`, in the ONNX
    # metadata (one-shot passes) and as module names (channel pruning, fine-tuning)
    check_exclusions(subject.dense_onnx, exclude)
    dense_list = [w for n, w, _ in weight_nodes(subject.dense_onnx)
                  if is_excluded(w, prune_exclusions(subject.dense_onnx) + exclude, n.name)]
    set_prune_exclusions(subject.dense_onnx, dense_list)
    subject = dataclasses.replace(subject, exclude=tuple(w.removesuffix(".weight") for w in dense_list))
    images = load_data(data, "test").subset(subset)
    return Comparison(compare_model(subject, parsed, images, dev, runtime=runtime, batch_size=batch_size,
                                    progress=progress, log=lambda s: None))
