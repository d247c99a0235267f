"""Command-line options several verbs share, defined once."""
from __future__ import annotations

import argparse
import math

from ..common.errors import UserError

# --- argparse types: a bad number is a one-line usage error (exit 2) before any work --------------
# Largest batch a command accepts: beyond it the input alone outgrows any card's memory.
MAX_BATCH = 4096


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        v = _int(text)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: give {lo} to {hi}" if hi is not None
                                             else f"{v} is out of range: give at least {lo}")
        return v

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


positive_int = int_range(1)
nonnegative_int = int_range(0)
batch_size = int_range(1, MAX_BATCH)


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return v


def positive_float(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return v


def unit_float(text: str) -> float:
    """A finite number in [0, 1] (thresholds, fractions)."""
    v = _float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return v


def opset(text: str) -> int:
    from ..common.onnxio import OPSET_CEILING, OPSET_FLOOR

    return int_range(OPSET_FLOOR, OPSET_CEILING)(text)


positive_float.__name__ = unit_float.__name__ = "number"
opset.__name__ = "opset"


def mark_given(dest: str):
    """An argparse action storing the value and setting `<dest>_given`: a default can then be told
    from the same value given on purpose (convert --runtime without --engine)."""
    class StoreGiven(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, self.dest, values)
            setattr(namespace, f"{dest}_given", True)

    return StoreGiven


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="registry model name (see `sparsecnn inspect --models`), a sparsecnn "
                                  "checkpoint (.pt) or an ONNX file")
    p.add_argument("--weights", help="state-dict file, or a torchvision weights name such as IMAGENET1K_V1 "
                                     "(needs the internet once); default: random weights, seed 0")
    p.add_argument("--num-classes", type=int_range(1, 10**6), help="classifier size (default: the model's, or the checkpoint's)")
    p.add_argument("--opset", type=opset, default=17, action=mark_given("opset"),
                   help="ONNX opset of the export (13 for TensorRT 8.2 on the original Jetson Nano; default 17); an "
                        "ONNX file keeps its own unless this is given, then it is converted to it")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", metavar="SPEC", help="'2:4' (2 of every 4 input channels zero, TensorRT's rule), "
                                                   "a sparsity such as 0.9 (unstructured magnitude), or 'none'")
    p.add_argument("--scope", choices=["layer", "global"], default="layer", action=mark_given("scope"),
                   help="unstructured pruning: same sparsity in every layer, or one threshold over all (default layer)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                   help="extra layers to leave dense (module, weight or node names as `inspect` shows them, globs "
                        "allowed); stems, classifiers and detection heads are excluded already")


def prune_passes(args) -> list:
    """The passes --prune, --scope and --exclude mean (add_prune_args), checked before any work: a
    flag the --prune setting makes moot is a UserError, not ignored."""
    from ..passes.prune import parse_prune, prune_pipeline

    pipeline = prune_pipeline(args.prune, args.scope, args.exclude)  # a bad --prune fails here
    parsed = parse_prune(args.prune)
    if getattr(args, "scope_given", False) and (parsed is None or parsed[0] != "unstructured"):
        raise UserError(f"--scope spreads an unstructured sparsity (--prune 0.9) over the layers; "
                        f"--prune {args.prune or 'none'} has none to spread: drop --scope")
    if args.exclude and parsed is None:
        raise UserError("--exclude names layers to leave dense when pruning; without --prune nothing is pruned: "
                        "add --prune or drop --exclude")
    return pipeline


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="torch", action=mark_given("runtime"), help="runtime to compile for (see `sparsecnn doctor`; default torch)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", action=mark_given("dtype"),
                   help="precision (default fp32)")
    p.add_argument("--tf32", action="store_true", help="let fp32 convolutions and GEMMs use TF32 tensor cores")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations for cuDNN")
    p.add_argument("--no-cuda-graph", action="store_true", help="run eagerly instead of replaying a CUDA graph")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="a setting of the chosen runtime, repeatable; `sparsecnn doctor --options RUNTIME` lists "
                        "each runtime's (e.g. csr_weight_budget=0.25 caps the csr engine's weights at 25%% of "
                        "dense fp32, dense_conv=best picks each dense conv's fastest kernel); an unknown key or a "
                        "bad value is an error")


# Calibration images a folder gives by default (here, not in converter/calibration.py: verbs import
# this module to build --help and must load no heavy library): enough for each layer's input
# sparsity to settle, few enough that every candidate is checked and timed on a small batch.
CALIBRATION_IMAGES = 16


def add_calibration_args(p: argparse.ArgumentParser, when: str) -> None:
    """--calibration and --calibration-images; `when`: the verb's clause saying when they apply."""
    g = p.add_argument_group("calibration (for runtimes that choose kernels on activations: ecr, hybrid)")
    g.add_argument("--calibration", metavar="DIR|FILE.npz",
                   help="real inputs the runtime chooses its kernels on " + when + ": ecr's and hybrid's ECR/PECR "
                        "kernels skip the zeros of each layer's input, so whether one beats dense depends on "
                        "the data; give images like those you will run. A folder of images (an ImageFolder or a "
                        "flat folder, prepared per the model's input spec) or an .npz holding the input array by "
                        "input name (`run --save-inputs` writes one). Without it they choose on a random input, and "
                        "each layer's row of engine.report() (kept in the engine file) says so; other runtimes "
                        "choose on weights and shapes and ignore it (a warning says so)")
    g.add_argument("--calibration-images", type=int_range(1, MAX_BATCH), default=CALIBRATION_IMAGES, metavar="N",
                   help=f"at most N calibration images (default {CALIBRATION_IMAGES}): from a folder evenly spaced "
                        "over its sorted files (every class of an ImageFolder), from an .npz its first N; they "
                        "run as one batch, and the kernels are chosen at that batch size")


# --- the input spec: what images become before they reach the model ---------------------------------
# Named normalisations for --mean / --std (resolved in converter/source.py, which knows the values).
NORMALISATIONS = ("imagenet",)


def input_shape(text: str) -> tuple[int, ...]:
    """CxHxW or NxCxHxW (also with commas), each a positive integer."""
    try:
        dims = tuple(int(t) for t in text.replace(",", "x").replace("X", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) not in (3, 4) or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"'{text}' is not CxHxW or NxCxHxW (e.g. 3x224x224 or 1x3x224x224)")
    return dims


def per_channel(text: str) -> tuple[float, ...] | str:
    """Comma-separated numbers (one per channel, or one for all) or a named normalisation."""
    if text.strip().lower() in NORMALISATIONS:
        return text.strip().lower()
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not comma-separated numbers (e.g. 0.485,0.456,0.406) "
                                         f"or one of {', '.join(NORMALISATIONS)}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"'{text}' holds a value that is not finite")
    return values


def pixel_scale(text: str) -> float:
    """A positive number, or a fraction such as 1/255."""
    num, sep, den = text.partition("/")
    v = _float(num) / (positive_float(den) if sep else 1.0)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return v


input_shape.__name__ = "shape"
per_channel.__name__ = pixel_scale.__name__ = "number"


def add_input_spec_args(p: argparse.ArgumentParser) -> None:
    """How images are prepared for a model that does not say so itself (an ONNX file from elsewhere);
    stored by `convert` in the files it writes, so later commands need none of these."""
    g = p.add_argument_group("input spec (what images become; give it where a model carries none, or replace "
                             "what it carries; `convert` stores it in the files it writes)")
    g.add_argument("--input-shape", type=input_shape, metavar="CxHxW",
                   help="the model's input, e.g. 3x224x224 or 1x3x224x224 (default: the ONNX file's fixed shape); "
                        "images are resized to it; a registry model or checkpoint is exported at this size")
    g.add_argument("--mean", type=per_channel, metavar="M[,M..]",
                   help="per-channel mean subtracted after --scale, e.g. 0.485,0.456,0.406 or 'imagenet'")
    g.add_argument("--std", type=per_channel, metavar="S[,S..]",
                   help="per-channel std divided by after the mean, e.g. 0.229,0.224,0.225 or 'imagenet'")
    g.add_argument("--scale", type=pixel_scale, metavar="X",
                   help="pixel values (0..255) are multiplied by this first (default 1/255); alone, without "
                        "--mean/--std, for a model that only scales its input")
    g.add_argument("--labels", metavar="FILE", help="class names, one per line in class order (printed by `run`)")


def runtime_extra(pairs: list[str]) -> dict[str, str]:
    """--option KEY=VALUE pairs as {key: value string}; typing is the runtime's (runtimes/options.py)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option '{pair}' is not KEY=VALUE (e.g. --option csr_weight_budget=0.25)")
        out[key.strip()] = value.strip()
    return out


def compile_options(args) -> dict:
    """The CompileOptions dict of an engine verb, its --option values checked against --runtime."""
    from ..runtimes.options import validate

    extra = validate(args.runtime, runtime_extra(getattr(args, "options", [])))
    return {"dtype": args.dtype, "tf32": args.tf32, "channels_last": args.channels_last,
            "cuda_graph": not args.no_cuda_graph, "extra": extra}


def options_per_runtime(runtimes: list[str], pairs: list[str]) -> dict[str, dict]:
    """For a verb that runs several runtimes (bench): per runtime the typed --option values it
    declares; a key no selected runtime declares is an error."""
    from ..runtimes.options import validate_for_runtimes

    return validate_for_runtimes(runtimes, runtime_extra(pairs))
