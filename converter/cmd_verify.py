"""`sparsecnn verify`: runtimes (or a saved engine) against ONNX Runtime on the pruned ONNX, per output.

The checks themselves are converter/verify.py; this module parses the arguments and prints.
"""
from __future__ import annotations

import argparse
import sys

from ..common.errors import UserError
from .options import add_calibration_args, add_prune_args, add_source_args, batch_size, input_shape, mark_given

HELP = """\
Check that engines compute what the pruned ONNX model says. SOURCE is the pruned ONNX file, a
registry model or checkpoint (exported, and pruned with --prune), or a saved .engine. Each
runtime given compiles the model (or the engine is loaded) and runs on the same inputs as ONNX Runtime on the CPU,
the independent reference; per output it prints the max and mean absolute error and the same
relative to max |reference|, and PASSED when max |got - ref| <= atol + rtol * max |ref|.
Default tolerance: atol 0, rtol by precision (fp32 1e-4, fp16 2e-2, fp32 with --tf32 5e-3;
common/numerics.py). Inputs: random (standard normal, --seed, --batch) or --inputs FILE.npz.
exit status: 0 every output within tolerance, 1 a mismatch, 2 a usage or input error.
"""

EXAMPLES = """\
examples:
  sparsecnn verify r18-90.onnx --runtimes torch,csr --device cpu    two runtimes vs ONNX Runtime
  sparsecnn verify resnet18 --prune 0.9 --runtimes csr              export, prune, compile, check
  sparsecnn verify r.engine --onnx r18-90.onnx                      a saved engine vs the file it came from
  sparsecnn run r18-90.onnx --random --batch 4 --save-inputs -o in.npz
  sparsecnn verify r18-90.onnx --inputs in.npz --runtimes csr       the same inputs again, by input name
  sparsecnn verify r18-90.onnx --runtimes csr --dtype fp16 --device cuda --json -   machine-readable
  sparsecnn verify r18-90.onnx --runtimes csr --save-outputs outs.npz   every output kept, for a closer look
  sparsecnn verify v90.onnx --runtimes ecr --calibration photos/ --device cuda   ecr's kernels chosen on real images
"""


def _tolerance(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return v


_tolerance.__name__ = "number"


def add_parser(sub) -> None:
    p = sub.add_parser("verify", description=HELP, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    add_prune_args(p)
    p.add_argument("--runtimes", default="torch", action=mark_given("runtimes"), metavar="NAME[,NAME..]",
                   help="runtimes to check, comma-separated (default torch; `sparsecnn doctor` lists them)")
    p.add_argument("--onnx", metavar="FILE", help="for a saved .engine: the pruned ONNX file it was built from "
                                                  "(default: the engine's own model, when ONNX Runtime can run it: "
                                                  "the torch runtime's)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], help="precision the runtimes compile for (default fp32)")
    p.add_argument("--tf32", action="store_true", help="let fp32 convolutions and GEMMs use TF32 tensor cores")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="a setting of a chosen runtime, repeatable (`sparsecnn doctor --options RUNTIME`)")
    p.add_argument("--inputs", metavar="FILE.npz", help="inputs by input name (`run --save-inputs -o FILE.npz` "
                                                        "writes one; other arrays in it are ignored)")
    p.add_argument("--batch", type=batch_size, help="batch size of random inputs (default: the model's fixed "
                                                     "batch, else 1)")
    p.add_argument("--input-shape", type=input_shape, metavar="CxHxW",
                   help="size of random inputs where the ONNX file leaves height and width open (e.g. 3x224x224, "
                        "or 2x3x224x224 with the batch); a file `convert` wrote carries its own")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0, as `run --random`)")
    p.add_argument("--atol", type=_tolerance, help="absolute slack (default 0)")
    p.add_argument("--rtol", type=_tolerance, help="tolerance relative to max |reference| (default by --dtype)")
    p.add_argument("--save-outputs", metavar="FILE.npz",
                   help="write the inputs (by name) and every output ('RUNTIME:OUTPUT', 'onnxruntime:OUTPUT')")
    p.add_argument("--json", metavar="FILE|-", help="write the results as JSON to FILE, or to stdout with '-' "
                                                    "(the table then goes to stderr)")
    add_calibration_args(p, "when it compiles (the kernels checked are the ones it chose)")
    p.set_defaults(func=run)


def _runtimes(text: str) -> list[str]:
    from ..runtimes import require_runtime

    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError("--runtimes names no runtime; give e.g. --runtimes torch,csr")
    for n in names:
        require_runtime(n)  # unknown or not available here: one line, before the model is built
    return names


def run(args) -> int:
    from ..common.fileio import check_outputs, write_bytes_atomic, write_text_atomic
    from .calibration import calibration_for, check_path
    from .verify import check_engine_file, check_runtimes, outputs_npz, read_inputs

    engine_file = args.source.endswith(".engine")
    for flag, path in (("--save-outputs", args.save_outputs), ("--inputs", args.inputs)):
        if path and not path.endswith(".npz"):
            raise UserError(f"{flag} must name an .npz file, got {path}")
    if engine_file:
        given = [f for f, on in (("--runtimes", getattr(args, "runtimes_given", False)), ("--prune", args.prune),
                                 ("--scope", getattr(args, "scope_given", False)),
                                 ("--dtype", args.dtype), ("--tf32", args.tf32), ("--option", args.options),
                                 ("--weights", args.weights), ("--exclude", args.exclude),
                                 ("--calibration", args.calibration)) if on]
        if given:
            one = len(given) == 1
            raise UserError(f"{args.source} is a saved engine: it runs as it was built, so {', '.join(given)} "
                            f"{'does' if one else 'do'} not apply; drop {'it' if one else 'them'} (or verify the "
                            f"ONNX file with {'it' if one else 'them'})")
    elif args.onnx:
        raise UserError(f"--onnx names a saved engine's reference; {args.source} is itself the reference here, "
                        "drop --onnx")
    json_file = args.json if args.json and args.json != "-" else None
    check_outputs({"--save-outputs": args.save_outputs, "--json": json_file},
                  [args.source, args.weights, args.inputs, args.onnx])  # before any work
    if args.inputs and args.input_shape:
        raise UserError("--input-shape sizes random inputs; --inputs gives the inputs themselves: drop one")
    arrays = read_inputs(args.inputs) if args.inputs else None  # a missing file fails before the model loads
    if args.calibration:
        check_path(args.calibration)  # so does a missing calibration source
    common = {"inputs": arrays, "input_source": args.inputs or "", "batch": args.batch, "seed": args.seed,
              "atol": args.atol, "rtol": args.rtol, "input_shape": args.input_shape}
    if engine_file:
        result = check_engine_file(args.source, args.device, reference=args.onnx, **common)
    else:
        from ..passes.graph import run_pipeline
        from .options import options_per_runtime, prune_passes
        from .source import load_source, stage

        pipeline = prune_passes(args)
        runtimes = _runtimes(args.runtimes)
        options = options_per_runtime(runtimes, args.options)
        src = load_source(args.source, args.weights, args.num_classes, args.opset,
                          opset_given=getattr(args, "opset_given", False))
        model = src.model
        if pipeline:
            with stage(f"pruning ({args.prune})"):
                model, results = run_pipeline(model, pipeline)
            for r in results:
                print(r.summary(), file=sys.stderr)
        from ..runtimes import get_runtime

        calibration = calibration_for([get_runtime(n) for n in runtimes], args.calibration, model, src.spec,
                                      args.calibration_images,
                                      warn=lambda line: print(f"warning: {line}", file=sys.stderr))
        result = check_runtimes(model, runtimes, args.device, dtype=args.dtype or "fp32", tf32=args.tf32,
                                options=options, where=src.label, calibration=calibration, **common)
    text = str(result)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(result.to_json())
    elif json_file:
        write_text_atomic(json_file, result.to_json() + "\n")
        print(f"wrote {json_file}")
    if args.save_outputs:
        write_bytes_atomic(args.save_outputs, outputs_npz(result))
        print(f"wrote {args.save_outputs}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0 if result.passed else 1
