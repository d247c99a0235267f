"""`sparsecnn inspect`: per-layer shape, sparsity, 2:4 compliance and bytes of any ONNX model."""
from __future__ import annotations

import argparse
import json

from .options import add_source_args
from .source import load_source


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer sparsity table of an ONNX model",
                       description="Print, for each Conv/Gemm/MatMul weight: shape, sparsity, whether it is "
                                   "2:4 along input channels, whether pruning may touch it, and the bytes its "
                                   "dense and non-zero forms take.",
                       epilog="examples:\n  sparsecnn inspect r18-2to4.onnx\n  sparsecnn inspect vgg19 --json\n"
                              "  sparsecnn inspect --models\n  sparsecnn inspect --ops",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.set_defaults(source=None)
    p.add_argument("--json", action="store_true", help="print JSON (one object per layer, plus a summary)")
    p.add_argument("--models", action="store_true", help="list the model registry and exit")
    p.add_argument("--ops", action="store_true", help="list the ONNX ops the executor runs and exit")
    p.set_defaults(func=run)
    # `source` is optional only for --models / --ops.
    p._actions[[a.dest for a in p._actions].index("source")].nargs = "?"


def run(args) -> int:
    from ..common.errors import UserError
    from ..passes.inspect import format_table, layer_table, sparsity_summary

    if args.models:
        from ..models.registry import MODELS

        for e in MODELS.values():
            print(f"{e.name:<14} {'x'.join(map(str, e.input.shape)):<12} {e.description}")
        return 0
    if args.ops:
        from ..runtimes.ops import STANDARD_OPS
        from ..runtimes.torch_runtime import reference_ops

        for dom, op in sorted(list(STANDARD_OPS) + list(reference_ops())):
            print(f"{dom + '::' if dom else ''}{op}")
        return 0
    if not args.source:
        raise UserError("give a model to inspect (an ONNX file or a registry name), or --models / --ops")
    src = load_source(args.source, args.weights, args.num_classes, args.opset, quiet=args.json)
    rows = layer_table(src.model)
    if args.json:
        print(json.dumps({"layers": [r.to_dict() for r in rows], "summary": sparsity_summary(rows)}, indent=1))
    else:
        print(format_table(rows))
    return 0
