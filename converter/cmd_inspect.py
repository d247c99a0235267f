"""`sparsecnn inspect`: the per-layer report of a model, a runtime-rewritten ONNX file or an engine file."""
from __future__ import annotations

import argparse

from .options import add_source_args, int_range


def add_parser(sub) -> None:
    p = sub.add_parser("inspect",
                       description="Print, for each Conv/Gemm/MatMul weight: shape, sparsity, whether it is 2:4 "
                                   "along input channels, and whether pruning pruned it or left it dense and by "
                                   "which rule (stem, head, --exclude, ...). On a runtime-rewritten ONNX file "
                                   "(convert --sparse-onnx) also its custom sparsecnn ops; on an engine file "
                                   "(convert --engine) also what the runtime runs per layer (kernel or library), "
                                   "why (faster by X, slower, rejected as a wrong result, ...), the layer's "
                                   "measured time and the whole-graph plan.",
                       epilog="examples:\n  sparsecnn inspect r18-2to4.onnx\n  sparsecnn inspect vgg19 --json\n"
                              "  sparsecnn inspect r.engine                     what the runtime chose per layer\n"
                              "  sparsecnn inspect r-csr.onnx --json report.json\n"
                              "  sparsecnn inspect --models\n  sparsecnn inspect --ops\n"
                              "  sparsecnn inspect fmnist_vgg19.pt --activations fashion-mnist --plot act.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.set_defaults(source=None)
    p.add_argument("--json", nargs="?", const="-", metavar="FILE|-",
                   help="the report as JSON (one object per layer, a summary, custom ops, plans) to FILE, or to "
                        "stdout with '-' or nothing")
    p.add_argument("--models", action="store_true", help="list the model registry and exit")
    p.add_argument("--ops", action="store_true", help="list the ONNX ops the executor runs and exit")
    p.add_argument("--activations", metavar="DATA",
                   help="instead of weights, profile activation sparsity: run the model on DATA ('fashion-mnist', "
                        "an image folder, or 'random') and report per Conv the fraction of zero inputs (mean and "
                        "spread over images), which is what feature-map-sparse kernels (runtime ecr) skip")
    p.add_argument("--samples", type=int_range(1, 100000), default=64, help="images to profile with --activations (default 64)")
    p.add_argument("--plot", metavar="PNG", help="with --activations: save a per-layer plot of the zero fractions")
    p.add_argument("--device", default="cpu", help="with --activations: cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=run)
    # `source` is optional only for --models / --ops.
    p._actions[[a.dest for a in p._actions].index("source")].nargs = "?"


def run(args) -> int:
    from ..common.errors import UserError
    from .layer_report import build_report, engine_file_report
    from .source import load_source

    if args.models:
        from ..models.registry import MODELS

        for e in MODELS.values():
            print(f"{e.name:<14} {'x'.join(map(str, e.input.shape)):<12} {e.description}")
        return 0
    if args.ops:
        from ..runtimes.ops import STANDARD_OPS
        from ..runtimes.torch.runtime import reference_ops

        for dom, op in sorted(list(STANDARD_OPS) + list(reference_ops())):
            print(f"{dom + '::' if dom else ''}{op}")
        return 0
    if not args.source:
        raise UserError("give a model to inspect (an ONNX file or a registry name), or --models / --ops")
    if args.json and args.json != "-":
        from ..common.fileio import check_output

        check_output(args.json, [args.source, args.weights], "--json")
    quiet = bool(args.json) and args.json == "-"
    if _is_engine(args.source):
        if args.activations:
            raise UserError("--activations profiles a model, not an engine file; give the ONNX file it was built from")
        return _report(args, engine_file_report(args.source))
    src = load_source(args.source, args.weights, args.num_classes, args.opset, quiet=quiet,
                      opset_given=getattr(args, "opset_given", False))
    if args.activations:
        return _activations(args, src)
    sparse = _rewritten(src.model)
    return _report(args, build_report(pruned=None if sparse else src.model, sparse=src.model if sparse else None,
                                      source=src.label))


def _is_engine(path: str) -> bool:
    """An engine file (`convert --engine`): a zip holding engine.json, whatever its name."""
    import zipfile

    if path.endswith(".engine"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return "engine.json" in z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _rewritten(model) -> bool:
    from ..passes.graph import SPARSECNN_DOMAIN

    return any(n.domain == SPARSECNN_DOMAIN for n in model.graph.node)


def _report(args, report: dict) -> int:
    from .layer_report import format_report, write_json

    if args.json:
        written = write_json(report, args.json)
        if written:
            print(format_report(report))
            print(f"wrote {written}")
    else:
        print(format_report(report))
    return 0


def _activations(args, src) -> int:
    from ..common.errors import UserError
    from ..runtimes import resolve_device
    from .activations import conv_input_sparsity, format_sparsity_table, load_profile_images, plot_sparsity

    if src.spec is None:
        raise UserError(f"{src.label} carries no input spec (size, normalisation); export it with sparsecnn "
                        "or use a registry model / sparsecnn checkpoint")
    if args.plot:
        from ..common.fileio import check_output

        check_output(args.plot, [args.source, args.weights], "--plot")
    images, what = load_profile_images(args.activations, src.spec, args.samples)
    rows = conv_input_sparsity(src.model, images, resolve_device(args.device))
    if args.json:
        from .layer_report import write_json

        written = write_json({"model": src.label, "data": what, "layers": rows}, args.json)
        if written:
            print(f"wrote {written}")
    else:
        print(f"{src.label}: zero inputs per conv over {what}")
        print(format_sparsity_table(rows))
    if args.plot:
        plot_sparsity(rows, args.plot, f"{src.label}: conv input sparsity ({what})")
        if args.json != "-":
            print(f"plot written to {args.plot}")
    return 0
