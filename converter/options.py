"""Command-line options several verbs share, defined once."""
from __future__ import annotations

import argparse

from ..common.errors import UserError


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="registry model name (see `sparsecnn inspect --models`), a sparsecnn "
                                  "checkpoint (.pt) or an ONNX file")
    p.add_argument("--weights", help="state-dict file, or a torchvision weights name such as IMAGENET1K_V1 "
                                     "(needs the internet once); default: random weights, seed 0")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the model's, or the checkpoint's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (13 for TensorRT 8.2 on the original "
                                                         "Jetson Nano; default 17)")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", metavar="SPEC", help="'2:4' (2 of every 4 input channels zero, TensorRT's rule), "
                                                   "a sparsity such as 0.9 (unstructured magnitude), or 'none'")
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="unstructured pruning: same sparsity in every layer, or one threshold over all (default layer)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                   help="extra layers to leave dense (module or weight names, globs allowed); stems, "
                        "classifiers and detection heads are excluded already")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="torch", help="runtime to compile for (see `sparsecnn doctor`; default torch)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="precision (default fp32)")
    p.add_argument("--tf32", action="store_true", help="let fp32 convolutions and GEMMs use TF32 tensor cores")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations for cuDNN")
    p.add_argument("--no-cuda-graph", action="store_true", help="run eagerly instead of replaying a CUDA graph")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="a setting of the chosen runtime, repeatable; `sparsecnn doctor --options RUNTIME` lists "
                        "each runtime's (e.g. csr_weight_budget=0.25 caps the csr engine's weights at 25%% of "
                        "dense fp32, dense_conv=best picks each dense conv's fastest kernel); an unknown key or a "
                        "bad value is an error")


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
