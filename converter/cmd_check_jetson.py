"""`sparsecnn check-jetson`: will TensorRT 8.2 on a Jetson Nano parse this model, and how fast might it be?"""
from __future__ import annotations

import argparse
import json

from ..common.errors import UserError
from .options import add_source_args, batch_size

EXAMPLES = """\
examples:
  sparsecnn check-jetson r18-2to4.onnx                       the TensorRT 8.2 (JetPack 4.6) check
  sparsecnn check-jetson trafficcamnet --opset 13 --roofline  export, check, estimate Nano / Orin Nano
  sparsecnn check-jetson vgg19 --opset 13 --roofline --board orin-nano --batch 4 --json
  sparsecnn check-jetson resnet18 --opset 13 --board all --summary   runtimes, kernels, estimate per board

Then deploy on the board (Python 3.6+, TensorRT and NumPy only):
  sparsecnn run model.onnx --random --save-inputs -o ref.npz   # on the host: reference in and out
  python3 jetson_deploy.py model.onnx --ref ref.npz --fp16      # on the Jetson (copy trt_compat.py along)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("check-jetson",
                       description="Check an ONNX model (or a registry model exported at --opset) against what "
                                   "TensorRT 8.2 on the original Jetson Nano (JetPack 4.6) can parse: opset <= 13, "
                                   "the op support matrix and its restrictions, tensor types. Exits 1 when it would "
                                   "fail. With --roofline, also print a per-layer and whole-network roofline "
                                   "ESTIMATE (from published peak FLOP/s and bandwidth, not a measurement) for "
                                   "Jetson Nano and Jetson Orin Nano 8GB.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--roofline", action="store_true", help="also print the roofline estimate")
    from ..common.peaks import BOARDS

    p.add_argument("--board", choices=[*BOARDS, "both", "all"], default=None,
                   help="a Jetson board: which runtimes and kernels apply there, the roofline estimate and what it "
                        "cannot predict ('both': nano and orin-nano, the --roofline default; 'all': every board)")
    p.add_argument("--batch", type=batch_size, default=1, help="batch size for --roofline (default 1)")
    p.add_argument("--summary", action="store_true", help="--roofline without the per-layer rows")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--write-fp16", metavar="OUT.onnx", help="also write an fp16 copy of the model (fp32 inputs and "
                                                           "outputs kept): what strongly-typed TensorRT 10.12+ / 11 "
                                                           "needs for an fp16 engine")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import asdict

    from ..passes.jetson import board_runtimes, check_trt82
    from ..common.peaks import BOARDS
    from ..passes.roofline import CANNOT_PREDICT, estimate, format_estimate
    from ..runtimes.nvrtc import KERNEL_FAMILIES, kernel_notes
    from .source import load_source

    if args.write_fp16:
        from ..common.fileio import check_output

        check_output(args.write_fp16, [args.source, args.weights], "--write-fp16")
    if getattr(args, "opset_given", False) and args.source.endswith(".onnx"):  # was ignored without a word
        raise UserError(f"--opset sets the opset a registry model is exported at; {args.source} is checked as it is "
                        f"(a converted copy is not the file you deploy): convert it first with `sparsecnn convert "
                        f"{args.source} --opset {args.opset} -o FILE.onnx`")
    src = load_source(args.source, args.weights, args.num_classes, args.opset, quiet=args.json)
    report = check_trt82(src.model)
    if args.write_fp16:
        from ..common.onnxio import save_onnx
        from ..runtimes.tensorrt.runtime import fp16_onnx

        save_onnx(fp16_onnx(src.model), args.write_fp16)
    board = args.board or ("both" if args.roofline else None)
    boards = {None: [], "both": ["nano", "orin-nano"], "all": list(BOARDS)}.get(board, [board])
    estimates = [estimate(src.model, BOARDS[b], args.batch) for b in boards]
    fits = {b: board_runtimes(BOARDS[b]) for b in boards} if args.board else {}
    if args.json:
        print(json.dumps({"trt82": report.to_dict(), "roofline": estimates,
                          "boards": {b: {"runtimes": [asdict(f) for f in fs],
                                         "kernels": {fam: kernel_notes(BOARDS[b].sm, fam) for fam in KERNEL_FAMILIES}}
                                     for b, fs in fits.items()},
                          **({"cannot_predict": list(CANNOT_PREDICT)} if fits else {})}, indent=1))
        return 0 if report.ok else 1
    print(report.format())
    for b, est in zip(boards, estimates):
        if b in fits:
            bd = BOARDS[b]
            print(f"\n{bd.name} ({bd.sm}, {bd.jetpack}, Python {bd.python}): runtimes")
            for f in fits[b]:
                print(f"  {f.runtime:<11} {'yes' if f.applies else 'no ':<4} {f.why}")
            print("\n".join(f"  kernels     {kernel_notes(bd.sm, fam)}" for fam in KERNEL_FAMILIES))
        print()
        print(format_estimate(est, per_layer=not args.summary))
    if fits:
        print("\nwhat the estimate cannot predict:")
        print("\n".join(f"  - {c}" for c in CANNOT_PREDICT))
    return 0 if report.ok else 1
