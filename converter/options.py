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
                   help="a runtime-specific setting, repeatable; the runtime's docs list them (e.g. "
                        "csr_weight_budget=0.25 caps the csr engine's weights at 25%% of dense fp32, "
                        "dense_conv=best picks each dense conv's fastest kernel)")


def parse_value(text: str):
    """'0.25' -> 0.25, '15' -> 15, 'true'/'false' -> bool, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def runtime_extra(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option '{pair}' is not KEY=VALUE (e.g. --option csr_weight_budget=0.25)")
        out[key.strip()] = parse_value(value)
    return out


def compile_options(args) -> dict:
    return {"dtype": args.dtype, "tf32": args.tf32, "channels_last": args.channels_last,
            "cuda_graph": not args.no_cuda_graph, "extra": runtime_extra(getattr(args, "options", []))}
