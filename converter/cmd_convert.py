"""`sparsecnn convert`: model -> pruned ONNX (the hand-off file) and, with --engine, an engine."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_calibration_args, add_engine_args, add_input_spec_args, add_prune_args, add_source_args

HELP = """\
Export a model to ONNX with BatchNorm folded, prune it, and write the pruned model: a
plain ONNX file whose pruned weights are zeros (every runtime starts from this file).
With --engine, also rewrite it for --runtime and save the compiled engine (ecr and hybrid
choose their activation-sparse kernels on --calibration images: give images like your data).
The model's input spec (size, normalisation, class names) is stored in both files, so
`run` and `compare` need no flags: a registry model or checkpoint brings its own; for an
ONNX file from elsewhere give --mean/--std (and --input-shape if its size is not fixed).
"""

EXAMPLES = """\
examples:
  sparsecnn convert resnet18 --prune 2:4 -o r18-24.onnx
  sparsecnn convert vgg19 --weights vgg19_fmnist.pt --prune 0.9 --scope global -o v90.onnx
  sparsecnn convert model.onnx --prune 0.8 --exclude 'layer4.*' -o model-80.onnx
  sparsecnn convert mobilenet_v2.onnx --mean imagenet --std imagenet --labels classes.txt -o mnv2.onnx
  sparsecnn convert trafficcamnet --opset 13 -o tcn.onnx          # for TensorRT 8.2 on Jetson Nano
  sparsecnn convert resnet18 --prune 0.9 -o r.onnx --runtime torch --engine r.engine --device cuda --dtype fp16
  sparsecnn convert vgg19 --weights v.pt --prune 0.9 -o v.onnx --runtime ecr --engine v.engine --calibration photos/
"""


def add_parser(sub) -> None:
    p = sub.add_parser("convert", description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    add_prune_args(p)
    p.add_argument("-o", "--output", help="pruned ONNX file to write (default: <model>[-<prune>].onnx)")
    add_engine_args(p)
    p.add_argument("--engine", help="also write a compiled engine for --runtime to this file")
    p.add_argument("--sparse-onnx", help="also write the runtime-rewritten ONNX (custom sparse ops) to this file")
    p.add_argument("--json", metavar="FILE|-", help="write the per-layer report (pruning rule, sparsity, what the "
                   "runtime runs and why) as JSON to FILE, or to stdout with '-' (the other lines then go to stderr)")
    add_calibration_args(p, "when --engine is built")
    add_input_spec_args(p)
    p.set_defaults(func=run)


def _default_output(label: str, prune: str | None) -> str:
    stem = Path(label).stem
    suffix = "" if not prune or prune == "none" else "-" + prune.replace(":", "to")
    return f"{stem}{suffix}.onnx"


def run(args) -> int:
    if getattr(args, "json", None) == "-":  # stdout carries the JSON report alone; every other line goes to stderr
        import contextlib

        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return _run(args, stdout)
    return _run(args, sys.stdout)


def _run(args, stdout) -> int:
    from ..common.errors import UserError
    from ..common.fileio import check_outputs
    from ..common.memory import trim_heap
    from ..common.onnxio import save_onnx
    from ..passes.graph import Owned, run_pipeline
    from . import layer_report
    from ..runtimes import compile_engine, require_runtime, resolve_device
    from .calibration import calibration_for, check_path
    from .options import compile_options, prune_passes
    from ..common.onnxio import set_input_spec
    from .source import SpecFlags, load_source, stage

    pipeline = prune_passes(args)  # validates --prune, --scope and --exclude before any work
    if not (args.engine or args.sparse_onnx) and (getattr(args, "runtime_given", False) or args.options):
        raise UserError(f"--runtime {args.runtime} / --option take effect only with --engine FILE or "
                        "--sparse-onnx FILE; add one, or drop them")
    # engine settings given without the file they shape: refused, not ignored (the rewrite takes the
    # precision and layout settings too, so --sparse-onnx is enough for those)
    unused = [flag for flag, on, needs_engine in (
        ("--device", args.device != "auto", True), ("--no-cuda-graph", args.no_cuda_graph, True),
        ("--dtype", getattr(args, "dtype_given", False), False), ("--tf32", args.tf32, False),
        ("--channels-last", args.channels_last, False)) if on and not (args.engine or (args.sparse_onnx and not needs_engine))]
    if unused:
        one = len(unused) == 1
        raise UserError(f"{', '.join(unused)} {'sets' if one else 'set'} how an engine is built; {'it takes' if one else 'they take'} "
                        f"effect only with --engine FILE: add one, or drop {'it' if one else 'them'}")
    if args.calibration and not args.engine:
        raise UserError("--calibration is what an engine's kernels are chosen on; it takes effect only with "
                        "--engine FILE: add one, or drop it")
    if args.calibration:
        check_path(args.calibration)  # a missing folder or file fails before any work
    opts = compile_options(args)  # and --option against --runtime
    runtime = require_runtime(args.runtime) if (args.engine or args.sparse_onnx) else None
    device = resolve_device(args.device) if args.engine else None
    inputs = [args.source, args.weights]
    json_file = args.json if args.json != "-" else None
    if args.output:  # every target checked before any work (the default name is known only later)
        check_outputs({"-o": args.output, "--engine": args.engine, "--sparse-onnx": args.sparse_onnx, "--json": json_file},
                      inputs)
    flags = SpecFlags.from_args(args)
    src = load_source(args.source, args.weights, args.num_classes, args.opset, flags=flags,
                      opset_given=getattr(args, "opset_given", False))
    if src.spec is None and flags.given():  # what was given is stored whole or not at all
        src.input.require_spec()
    out = Path(args.output or _default_output(src.label, args.prune))
    check_outputs({"-o": out, "--engine": args.engine, "--sparse-onnx": args.sparse_onnx, "--json": json_file}, inputs)
    model, src.model = src.model, None  # one dense model in memory: pruning's copy replaces it
    if src.spec is not None:
        set_input_spec(model, src.spec.to_dict())
    else:
        print(f"note: {src.label} carries no input spec; give --mean/--std (and --input-shape if its size is not "
              "fixed) to store one, or `run` and `compare` will ask for them with images", file=sys.stderr)
    if pipeline:
        with stage(f"pruning ({args.prune}{', ' + args.scope if args.prune != '2:4' else ''})"):
            handed, model = Owned(model), None  # prune frees the dense model once it has read its weights
            model, results = run_pipeline(handed, pipeline)
        trim_heap()  # the dense model was freed into the heap: the rewrite and save start from one model
        for r in results:
            print(r.summary(), file=sys.stderr)
    sparse = engine = None
    if runtime is not None:  # every step that can fail runs before the first file is written
        with stage(f"rewriting for runtime '{runtime.name}'"):
            sparse = runtime.rewrite(model, opts)
        if args.engine:
            calibration = calibration_for([runtime], args.calibration, sparse, src.spec, args.calibration_images,
                                          warn=lambda line: print(f"warning: {line}", file=sys.stderr))
            with stage(f"compiling for {device} ({args.dtype})"
                       + (f", calibrated on {len(calibration)} inputs" if calibration is not None else "")):
                engine = compile_engine(runtime, sparse, device, opts, calibration=calibration)
    save_onnx(model, out)
    report = layer_report.convert_report(model, args, sparse=sparse, engine=engine, device=device, source=src.label)
    s = report["summary"]
    print(f"wrote {out}: {s['prunable_layers']} prunable layers at sparsity {s['prunable_sparsity']:.4f}, "
          f"{s['two_four_layers']} layers 2:4; weights {s['dense_bytes'] / 2**20:.1f} MiB dense, "
          f"{s['nonzero_bytes'] / 2**20:.1f} MiB non-zero")
    if args.sparse_onnx:
        save_onnx(sparse, args.sparse_onnx)
        print(f"wrote {args.sparse_onnx} ({Path(args.sparse_onnx).stat().st_size / 2**20:.1f} MiB)")
    if engine is not None:
        engine.save(args.engine)
        print(f"wrote {args.engine}: runtime {runtime.name} on {device}, {args.dtype}")
    layer_report.emit(report, table=runtime is not None, json_dest=args.json, stdout=stdout)
    return 0
