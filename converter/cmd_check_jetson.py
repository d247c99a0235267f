"""`sparsecnn check-jetson`: will TensorRT 8.2 on a Jetson Nano parse this model, and how fast might it be?"""
from __future__ import annotations

import argparse
import json

from .options import add_source_args

EXAMPLES = """\
examples:
  sparsecnn check-jetson r18-2to4.onnx                       the TensorRT 8.2 (JetPack 4.6) check
  sparsecnn check-jetson trafficcamnet --opset 13 --roofline  export, check, estimate Nano / Orin Nano
  sparsecnn check-jetson vgg19 --opset 13 --roofline --board orin-nano --batch 4 --json

Then deploy on the board (Python 3.6+, TensorRT and NumPy only):
  sparsecnn run model.onnx --random --save-inputs -o ref.npz   # on the host: reference in and out
  python3 jetson_deploy.py model.onnx --ref ref.npz --fp16      # on the Jetson (copy trt_compat.py along)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("check-jetson", help="TensorRT 8.2 compatibility check and Jetson roofline estimate",
                       description="Check an ONNX model (or a registry model exported at --opset) against what "
                                   "TensorRT 8.2 on the original Jetson Nano (JetPack 4.6) can parse: opset <= 13, "
                                   "the op support matrix and its restrictions, tensor types. Exits 1 when it would "
                                   "fail. With --roofline, also print a per-layer and whole-network roofline "
                                   "ESTIMATE (from published peak FLOP/s and bandwidth, not a measurement) for "
                                   "Jetson Nano and Jetson Orin Nano 8GB.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--roofline", action="store_true", help="also print the roofline estimate")
    p.add_argument("--board", choices=["nano", "orin-nano", "both"], default="both", help="board(s) for --roofline")
    p.add_argument("--batch", type=int, default=1, help="batch size for --roofline (default 1)")
    p.add_argument("--summary", action="store_true", help="--roofline without the per-layer rows")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--write-fp16", metavar="OUT.onnx", help="also write an fp16 copy of the model (fp32 inputs and "
                                                           "outputs kept): what strongly-typed TensorRT 10.12+ / 11 "
                                                           "needs for an fp16 engine")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..common.errors import UserError
    from ..passes.jetson import check_trt82
    from ..passes.roofline import BOARDS, estimate, format_estimate
    from .source import load_source

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    src = load_source(args.source, args.weights, args.num_classes, args.opset, quiet=args.json)
    report = check_trt82(src.model)
    if args.write_fp16:
        from ..common.onnxio import save_onnx
        from ..runtimes.tensorrt.runtime import fp16_onnx

        save_onnx(fp16_onnx(src.model), args.write_fp16)
    boards = [] if not args.roofline else (list(BOARDS) if args.board == "both" else [args.board])
    estimates = [estimate(src.model, BOARDS[b], args.batch) for b in boards]
    if args.json:
        print(json.dumps({"trt82": report.to_dict(), "roofline": estimates}, indent=1))
    else:
        print(report.format())
        for est in estimates:
            print()
            print(format_estimate(est, per_layer=not args.summary))
    return 0 if report.ok else 1
