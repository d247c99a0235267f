"""Where a model comes from: a registry name (+ weights), a sparsecnn checkpoint, or an ONNX file."""
from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..common.errors import UserError
from ..common.onnxio import get_input_spec, graph_inputs, load_onnx, set_input_spec
from ..models.registry import (IMAGENET_MEAN, IMAGENET_STD, MODELS, InputSpec, get_entry, load_model,
                               load_state_dict_file)
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


@dataclass(frozen=True)
class SpecFlags:
    """The input-spec flags a user gave (`options.add_input_spec_args`); None where not given."""

    shape: tuple[int, ...] | None = None  # C,H,W or N,C,H,W
    mean: tuple[float, ...] | str | None = None  # numbers or a named normalisation ('imagenet')
    std: tuple[float, ...] | str | None = None
    scale: float | None = None
    labels: str | None = None  # a file, one class name per line

    @classmethod
    def from_args(cls, args) -> "SpecFlags":
        return cls(*(getattr(args, k, None) for k in ("input_shape", "mean", "std", "scale", "labels")))

    @property
    def batch(self) -> int | None:
        """N of an NxCxHxW --input-shape."""
        return self.shape[0] if self.shape and len(self.shape) == 4 else None

    def given(self) -> bool:
        return any(v is not None for v in (self.shape, self.mean, self.std, self.scale, self.labels))


# named normalisations for --mean/--std and prune(mean=..., std=...): name -> (mean, std)
NORMALISATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
_ADD_NORMALISATION = ("--mean and --std (e.g. --mean imagenet --std imagenet), or --scale alone for a model that "
                      "only scales its pixels")


@dataclass(frozen=True)
class ModelInput:
    """What is known about a model's image input: its stored spec, its ONNX graph and the flags, merged."""

    where: str
    name: str
    shape: tuple[int, ...] | None  # without the batch axis (C, H, W for images), when known
    batch: int | None  # the graph's fixed batch; None when the batch axis is dynamic
    spec: InputSpec | None  # complete (size and normalisation): what images need, what convert stores
    missing: tuple[str, ...] = ()  # the flags that would complete it
    rank: int = 4

    def require_spec(self) -> InputSpec:
        if self.rank != 4:
            raise UserError(f"{self.where}: input '{self.name}' has {self.rank} dimensions, not an image batch "
                            "(NxCxHxW); run it with --random")
        if self.spec is None:
            raise UserError(f"{self.where} carries no input spec (size, normalisation) for images: add "
                            f"{' and '.join(self.missing)}; `sparsecnn convert` stores them in the files it writes")
        return self.spec

    def require_shape(self) -> tuple[int, ...]:
        if self.shape is None:
            raise UserError(f"{self.where}: input '{self.name}' has no fixed size; add --input-shape CxHxW")
        return self.shape

    def batch_for(self, given: int | None, flags: SpecFlags, default: int) -> int:
        """The batch a run uses: the graph's fixed batch, else --batch, N of --input-shape, `default`."""
        if self.batch is not None:
            if given is not None and given != self.batch:
                raise UserError(f"{self.where}: input '{self.name}' has a fixed batch of {self.batch}; drop "
                                f"--batch {given}, or export the model with a dynamic batch axis")
            return self.batch
        if given is not None and flags.batch is not None and given != flags.batch:
            raise UserError(f"--batch {given} disagrees with --input-shape {_dims(flags.shape)}; give one of them")
        return given or flags.batch or default


def _dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def graph_input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """The first graph input that is not a weight: its name and dims (None where not fixed)."""
    name, dims, _ = graph_inputs(model)[0]
    return name, dims or []


def _classes(model: onnx.ModelProto) -> int | None:
    """K of a classifier's single [N, K] output, when fixed."""
    outs = model.graph.output
    if len(outs) != 1:
        return None
    dims = outs[0].type.tensor_type.shape.dim
    return (dims[1].dim_value or None) if len(dims) == 2 and dims[1].HasField("dim_value") else None


def read_labels(path: str) -> tuple[str, ...]:
    """Class names from a text file, one per line in class order (trailing blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--labels file not found: {p}")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"--labels {p} is not UTF-8 text (one class name per line)") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"--labels {p} is empty; give one class name per line")
    if "" in lines:
        raise UserError(f"--labels {p}: line {lines.index('') + 1} is empty; give one class name per line")
    return tuple(lines)


def _per_channel(value, channels: int, flag: str) -> tuple[float, ...]:
    if len(value) == 1:
        return tuple(value) * channels
    if len(value) != channels:
        raise UserError(f"{flag} has {len(value)} values; the model's input has {channels} channels (give "
                        f"{channels}, or one for all)")
    return tuple(value)


def resolve_input(model: onnx.ModelProto, stored: InputSpec | None, flags: SpecFlags, where: str) -> ModelInput:
    """Merge the model's stored spec, its graph's fixed input shape and the flags (flags win; a flag that
    contradicts the graph is a UserError)."""
    name, dims = graph_input(model)
    if len(dims) != 4:
        if flags.shape:
            raise UserError(f"{where}: input '{name}' has {len(dims)} dimensions, not an image batch (NxCxHxW); "
                            "drop --input-shape")
        fixed = tuple(dims[1:]) if dims and all(dims[1:]) else None
        return ModelInput(where, name, fixed, dims[0] if dims else None, None, rank=len(dims))
    if flags.shape:
        want = ([None] if len(flags.shape) == 3 else []) + list(flags.shape)
        if any(g is not None and w is not None and g != w for g, w in zip(dims, want)):
            fixed = _dims([g if g is not None else (w if i else None) for i, (g, w) in enumerate(zip(dims, want))])
            raise UserError(f"--input-shape {_dims(flags.shape)} disagrees with {where}'s input '{name}' "
                            f"({_dims(dims)}); give {fixed} or drop it")
        shape = tuple(flags.shape[-3:])
    elif stored is not None:
        shape = stored.shape
    else:
        shape = tuple(dims[1:]) if all(dims[1:]) else None
    missing = [] if shape else [f"--input-shape CxHxW (input '{name}' is {_dims(dims)})"]
    mean = std = None
    known = stored is not None or flags.mean is not None or flags.scale is not None
    if flags.mean is not None or flags.std is not None:
        if shape is None:
            return ModelInput(where, name, None, dims[0], None, tuple(missing))
        mean, std = normalisation(flags.mean, flags.std, shape[0])
    elif stored is not None:
        mean, std = stored.mean, stored.std
    if not known:
        missing.append(_ADD_NORMALISATION)
    classes = stored.num_classes if stored is not None and stored.num_classes else _classes(model)
    labels = read_labels(flags.labels) if flags.labels else (stored.labels if stored is not None else None)
    if labels and classes and len(labels) != classes:
        raise UserError(f"--labels {flags.labels} names {len(labels)} classes; {where} has {classes} outputs"
                        if flags.labels else f"{where}: its stored labels name {len(labels)} of {classes} classes")
    spec = None
    if not missing:
        scale = flags.scale if flags.scale is not None else (stored.scale if stored is not None else 1.0 / 255.0)
        outputs = tuple(o.name for o in model.graph.output)
        spec = InputSpec(*shape, scale=scale, mean=mean, std=std, input_name=name, output_names=outputs,
                         num_classes=classes, labels=labels)
        spec._check(where)
    return ModelInput(where, name, shape, dims[0], spec, tuple(missing))


def normalisation(mean, std, channels: int, names: tuple[str, str] = ("--mean", "--std")):
    """(mean, std) per channel for an input of `channels` channels, each given as numbers (one for all
    channels, or one per channel) or a name of NORMALISATIONS; (None, None) when neither is given.
    The one check of normalisation for the CLI's flags and the Python API's arguments (`names`)."""
    import math

    if (mean is None) != (std is None):
        raise UserError(f"{names[0]} and {names[1]} go together; give both (e.g. imagenet for both) or neither")
    if mean is None:
        return None, None

    def per_channel(value, name: str, which: int) -> tuple[float, ...]:
        if isinstance(value, str):
            if value.lower() not in NORMALISATIONS:
                raise UserError(f"{name}: unknown normalisation '{value}'; give numbers per channel or one of "
                                f"{', '.join(NORMALISATIONS)}")
            named = NORMALISATIONS[value.lower()][which]
            if len(named) != channels:
                raise UserError(f"{name} '{value}' is for {len(named)} channels; the model's input has {channels}")
            return tuple(named)
        try:
            numbers = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise UserError(f"{name} takes numbers or a name such as imagenet, not {value!r}") from None
        if not numbers or not all(math.isfinite(v) for v in numbers):
            raise UserError(f"{name} needs finite numbers, got {value!r}")
        return _per_channel(numbers, channels, name)

    mean, std = per_channel(mean, names[0], 0), per_channel(std, names[1], 1)
    if any(v <= 0 for v in std):
        raise UserError(f"{names[1]} {','.join(map(str, std))} has a value <= 0")
    return mean, std


def spec_with_flags(spec: InputSpec, flags: SpecFlags, where: str) -> InputSpec:
    """A registry model's or checkpoint's spec with the flags applied: --input-shape (it is exported at
    that size; the channels must be its own), --mean/--std, --scale and --labels replace its own."""
    changes = {}
    if flags.shape:
        c, h, w = flags.shape[-3:]
        if c != spec.channels:
            raise UserError(f"--input-shape {_dims(flags.shape)} has {c} channels; {where} takes {spec.channels}")
        changes.update(height=h, width=w)
    if flags.mean is not None or flags.std is not None:
        changes["mean"], changes["std"] = normalisation(flags.mean, flags.std, spec.channels)
    if flags.scale is not None:
        changes["scale"] = flags.scale
    if flags.labels:
        labels = read_labels(flags.labels)
        if spec.num_classes and len(labels) != spec.num_classes:
            raise UserError(f"--labels {flags.labels} names {len(labels)} classes; {where} has {spec.num_classes}")
        changes["labels"] = labels
    return dataclasses.replace(spec, **changes)


@dataclass
class Source:
    model: onnx.ModelProto  # dense (or already pruned) ONNX with BN folded
    spec: InputSpec | None  # complete input spec (stored, or from the flags), None when not known
    label: str
    input: ModelInput | None = None  # what is known of the input, and what is missing
    path: Path | None = None  # the ONNX file it was read from (None: exported here)


def checkpoint_arch(path: str) -> str | None:
    obj = load_state_dict_file(path)
    return obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None


def ready_for_pruning(model: onnx.ModelProto) -> onnx.ModelProto:
    """An ONNX model from elsewhere (a file or a notebook's ModelProto) in the form our own export
    gives: BatchNorm folded into the convs, constants behind Identity nodes inlined. torch's exporter
    folds BatchNorm itself in eval mode but still deduplicates equal initializers (a fresh model's
    folded biases are all zeros) behind Identity nodes, and a bias behind one is no constant to the
    rewrites (csr kept 47 of torchvision ResNet-50's 53 convs dense for it)."""
    if any(n.op_type in ("BatchNormalization", "Identity") for n in model.graph.node):
        from .export import EXPORT_PIPELINE

        model, _ = run_pipeline(model, EXPORT_PIPELINE)
    return model


def load_source(source: str, weights: str | None = None, num_classes: int | None = None, opset: int = 17,
                quiet: bool = False, flags: SpecFlags | None = None, opset_given: bool = False) -> Source:
    """Resolve `source` to a dense ONNX model ready for the prune passes; `flags` complete or override
    its input spec (an ONNX file from elsewhere carries none). A registry model or checkpoint is
    exported at `opset`; an ONNX file keeps its own unless `opset_given` (--opset on the command
    line), then it is converted to it (every verb alike: verify and inspect ignored it)."""
    from .export import export_onnx

    flags = flags or SpecFlags()
    path = Path(source)
    if source.endswith(".onnx") or (path.is_file() and path.suffix == ".onnx"):
        given = [f for f, v in (("--weights", weights), ("--num-classes", num_classes)) if v is not None]
        if given:  # an ONNX file holds its weights and classifier: these would be ignored
            one = len(given) == 1
            raise UserError(f"{source} is an ONNX file: it holds its own weights and classifier, so "
                            f"{' and '.join(given)} {'does' if one else 'do'} not apply; drop {'it' if one else 'them'}")
        with stage(f"loading {source}", quiet):
            model = ready_for_pruning(load_onnx(path))
        if opset_given:
            with stage(f"converting {path.name} to opset {opset} (onnx.version_converter)", quiet):
                model = convert_opset(model, opset, path.name)
        stored = get_input_spec(model, path)
        inp = resolve_input(model, InputSpec.from_dict(stored, str(path)) if stored else None, flags, str(path))
        return Source(model, inp.spec, path.name, inp, path)
    arch = source
    if source not in MODELS and (path.suffix in {".pt", ".pth", ".ckpt"} or path.exists()):
        arch = checkpoint_arch(source)
        if arch is None:
            raise UserError(f"{source} is a checkpoint without an architecture name; give the model and the "
                            f"file separately: `{Path(sys.argv[0]).name} ... resnet18 --weights {source}`")
        if weights is not None and weights != source:
            raise UserError(f"{source} is a checkpoint: it holds the weights, so --weights {weights} does not apply; "
                            f"drop it, or give the model name: `{Path(sys.argv[0]).name} ... {arch} --weights {weights}`")
        weights = source
    get_entry(arch)  # an unknown name fails before any progress is printed
    with stage(f"building {arch}" + (f" with weights {weights}" if weights else " (random weights, seed 0)"), quiet):
        module, spec, entry = load_model(arch, weights, num_classes)
    spec = spec_with_flags(spec, flags, arch)
    with stage(f"exporting {arch} to ONNX (opset {opset}, BatchNorm folded)", quiet):
        model = export_onnx(module, spec, entry.exclude, opset, release=True)  # its weights move into the model
    del module
    inp = resolve_input(model, spec, SpecFlags(), arch)
    return Source(model, inp.spec, arch, inp)


def engine_settings_given(args) -> dict[str, tuple[str, object]]:
    """The engine settings named on a command line ({flag as typed: (engine key, value)}): what a saved
    engine must agree with."""
    given = {}
    if getattr(args, "runtime_given", False):
        given[f"--runtime {args.runtime}"] = ("runtime", args.runtime)
    if getattr(args, "dtype_given", False):
        given[f"--dtype {args.dtype}"] = ("dtype", args.dtype)
    for flag, key, value in (("--tf32", "tf32", True), ("--channels-last", "channels_last", True),
                             ("--no-cuda-graph", "cuda_graph", False)):
        if getattr(args, flag.lstrip("-").replace("-", "_"), False):
            given[flag] = (key, value)
    for pair in getattr(args, "options", None) or []:
        given[f"--option {pair}"] = ("extra", pair)
    return given


def check_engine_settings(path: str, manifest: dict, given: dict[str, tuple[str, object]]) -> None:
    """A saved engine runs as it was built: a setting given on the command line that differs from the
    engine's (runtime, dtype, tf32, ...) is a UserError naming what the engine holds."""
    from ..runtimes.options import declared_options, validate
    from .options import runtime_extra

    held = {"runtime": manifest["runtime"], **manifest["options"]}
    declared = declared_options(manifest["runtime"])
    wrong = []
    for flag, (key, value) in given.items():
        if key == "extra":  # checked against the engine's runtime; a setting it did not save is its default
            typed = validate(manifest["runtime"], runtime_extra([value]))
            if any((held.get("extra") or {}).get(k, declared[k].default) != v for k, v in typed.items()):
                wrong.append(flag)
        elif key in held and held[key] != value:
            wrong.append(flag)
    if wrong:
        onoff = {True: "on", False: "off"}
        holds = ", ".join(f"{k.replace('_', ' ')} {onoff.get(held[k], held[k])}"
                          for k in ("dtype", "tf32", "channels_last", "cuda_graph") if k in held)
        extra = "; options " + ", ".join(f"{k}={v}" for k, v in held["extra"].items()) if held.get("extra") else ""
        raise UserError(f"{path} holds a {held['runtime']} engine ({holds}{extra}); it runs as built, not with "
                        f"{' '.join(wrong)}: drop {'it' if len(wrong) == 1 else 'them'}, or build another engine with `sparsecnn convert MODEL "
                        "... --engine FILE`")


def load_runnable(model: str, *, runtime: str, device: str, weights: str | None = None,
                  options: dict | None = None, flags: SpecFlags | None = None, images: bool = False,
                  given: dict | None = None, calibration: str | None = None, calibration_images: int | None = None):
    """(engine, ModelInput) for `sparsecnn run`: an engine file loads as saved (on `device` unless
    "auto"; `given`, the engine settings on the command line, must agree with it); an ONNX file or a
    registry model is rewritten and compiled for `runtime`, on `calibration` (a folder of images or an
    .npz, converter/calibration.py) where the runtime chooses on activations. With `images`, a
    missing input spec fails before any compilation."""
    from ..runtimes import compile_engine, load_engine, require_runtime, resolve_device
    from .calibration import calibration_for

    flags = flags or SpecFlags()
    if model.endswith(".engine"):
        from ..runtimes.base import read_engine

        if calibration:
            raise UserError(f"{model} is a saved engine: its kernels were chosen when it was built; drop "
                            "--calibration (it applies when `run` builds an engine from an ONNX file or registry "
                            "model, and to `convert --engine`)")
        read = read_engine(model)  # once: load_engine rebuilds from what was read here
        manifest, saved = read[0], read[1]
        check_engine_settings(model, manifest, given or {})
        stored = get_input_spec(saved, model)
        inp = resolve_input(saved, InputSpec.from_dict(stored, model) if stored else None, flags, model)
        if images:
            inp.require_spec()
        return load_engine(model, None if device == "auto" else device, read=read), inp
    rt = require_runtime(runtime)
    dev = resolve_device(device)
    src = load_source(model, weights, flags=flags)
    if images:
        src.input.require_spec()
    if src.spec is not None:  # the engine carries what it was given (ecr calibrates on images of this spec)
        set_input_spec(src.model, src.spec.to_dict())
    sparse = rt.rewrite(src.model, options)
    calib = calibration_for([rt], calibration, sparse, src.spec, calibration_images,
                            warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    return compile_engine(rt, sparse, dev, options, calibration=calib), src.input


def convert_opset(model: onnx.ModelProto, opset: int, where: str) -> onnx.ModelProto:
    """`model` at default-domain `opset` (onnx.version_converter as passes/opset.py helps it, then the
    checker); a model already there comes back as is; one the converter cannot take there is a UserError naming why."""
    from ..passes.opset import convert_version

    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if have == opset:
        return model
    try:
        converted = convert_version(model, opset)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError, checker ValidationError, ...
        why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot convert {where} from opset {have} to {opset} (onnx.version_converter: "
                        f"{why.split(': ')[-1][:160]}); re-export it at opset {opset}, or drop --opset to keep "
                        f"{have}") from None
    return converted
