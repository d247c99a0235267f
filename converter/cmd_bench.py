"""`sparsecnn bench`: honest speed numbers -- whole network, per layer, GEMM sweep -- with plots."""
from __future__ import annotations

import argparse
import sys

from ..common.errors import UserError
from .options import MAX_BATCH, int_range, positive_float

HELP = """\
Time models x runtimes x prune settings x precision regimes x batch sizes on one device in
one run, against two dense baselines measured in the same run:

  eager        PyTorch eager on the dense nn.Module (what users have)
  best dense   the torch runtime, whole network in one CUDA graph, each conv on whichever
               is fastest for that layer on this device: cuDNN NCHW, cuDNN NHWC or
               im2col + cuBLAS (compile option extra={"dense_conv": "best"})

Speedups are reported against both; claims are against the best dense engine (the fastest
dense engine of the run). Regimes: fp16 (tensor cores), fp32-cuda-core (fp32 with TF32 off
in cuDNN and cuBLAS: the seed libraries' regime and that of GPUs without tensor cores),
fp32 (TF32 allowed). Each configuration is timed twice and the spread reported; each
engine is also timed per layer, with the share of time the runtime accelerates and the
whole-network speedup that share allows.

The word `spmm` among the models (or --gemm) runs the GEMM-level sweep: conv layers as GEMMs
at batch 1 (VGG-19 / ResNet-18's; any model's with --gemm-shapes), sparsity 0.5-0.98, cuBLAS
(fp32, TF32, fp16) vs cuSPARSE (torch CSR) vs every registered sparse method, checked vs fp64.

Writes to --out: bench.json (every raw number, card, driver, versions), bench.md (tables)
and PNG plots: gemm_speedup.png (speedup vs sparsity), layers_<model>.png (per-layer
speedup; VGG-19 when benchmarked), summary.png (Table-1 style: size, speedup, accuracy).
Per layer, bench.md says what pruning did and what each runtime ran and why (the report
`sparsecnn inspect ENGINE` shows). On a CPU, naming no MODEL runs the quick harness (--quick);
name a model to time it on the CPU anyway (slow; CPU timings say little). A speedup resting
on a noisy measurement (runs differing by over 10 %, or p90 over 1.5x the fastest sample)
is marked '?', with a warning. Exit status 1 when a part failed (one line says which;
everything else is still written); parts a runtime or the device does not support
(minkowski in fp16, GPU kernels on a CPU) are skipped and listed, not failures.
"""

EXAMPLES = """\
examples:
  sparsecnn bench --quick                                   whole harness on tiny nets (CPU is fine)
  sparsecnn bench resnet18 vgg19 --batch 1,32 --regimes fp16,fp32-cuda-core
  sparsecnn bench vgg19 --runtimes csr --prune 0.9,0.95 --accuracy compare.json
  sparsecnn bench spmm --gemm-shapes seed,resnet50,trafficcamnet   GEMM sweep only, with two models' convs
  sparsecnn bench resnet18 vgg19 --batch 1,32 --devices all  one process per GPU, whole configurations each
  sparsecnn bench trafficcamnet --dense cudnn,cudnn_nhwc,im2col,best --flush-l2
  sparsecnn bench --report-only out/bench.json --accuracy acc.json   re-render tables and plots

accuracy file (--accuracy): JSON, a list of rows (or {"rows": [...]}) such as
  {"model": "vgg19", "prune": "0.9", "top1": 0.921, "fine_tuned": true}
prune may also be given as "sparsity" or "method" ("2:4"); accuracy as top1 / accuracy / acc
(fraction or percent); a fine-tuned row wins over a one-shot row of the same setting.
"""

def _csv(text: str | None) -> list[str] | None:  # None: the flag was not given; []: given empty
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="registry names or ONNX files (default resnet18); the word 'spmm' runs the GEMM sweep")
    p.add_argument("--quick", action="store_true",
                   help="the whole harness on tiny nets and tiny GEMMs (CI; the default on a CPU when no MODEL "
                        "is named)")
    p.add_argument("--runtimes", help="comma-separated runtimes to benchmark on the pruned models (default: every "
                                      "available runtime except the torch baseline)")
    p.add_argument("--prune", default="0.9", help="comma-separated prune settings for the runtimes: none, 2:4 or a "
                                                  "sparsity (default 0.9)")
    p.add_argument("--scope", choices=["layer", "global"], default="layer", help="unstructured pruning scope")
    p.add_argument("--regimes", default="fp16,fp32-cuda-core",
                   help="comma-separated: fp16, fp32-cuda-core (TF32 off), fp32 (TF32 on) (default fp16,fp32-cuda-core)")
    p.add_argument("--batch", help="comma-separated batch sizes (default 1; --quick: 1,2)")
    p.add_argument("--dense", default="cudnn,best",
                   help="dense torch-runtime engines to time: cudnn, cudnn_nhwc, im2col, im2col_nhwc, best "
                        "(default cudnn,best; best is always included)")
    p.add_argument("--runtime-dense-conv", default="best",
                   help="dense_conv setting for the layers a runtime leaves dense (default best)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="a runtime setting, repeatable, given to every benchmarked runtime that declares it "
                        "(`sparsecnn doctor --options RUNTIME` lists them; e.g. guard=false, "
                        "csr_weight_budget=0.25); a key none of them declares is an error")
    p.add_argument("--calibration", metavar="DIR|FILE.npz", help="images (or prepared inputs) the activation-sparse "
                   "runtimes (ecr, hybrid) choose on; without it they choose on random input and say so")
    p.add_argument("--weights", help="weights for registry models (state dict or torchvision name; default random)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--devices", help="split the configurations (model x regime x batch) over these devices, one "
                                     "process each: 'all' (every visible GPU) or e.g. cuda:0,cuda:1")
    p.add_argument("--no-per-layer", action="store_true", help="skip the per-layer timing")
    p.add_argument("--flush-l2", action="store_true",
                   help="overwrite L2 before every timed run (cold weights: the edge-device situation)")
    p.add_argument("--budget-ms", type=positive_float, default=300.0,
                   help="about how long one timing of one configuration lasts; sets the repetitions (default 300)")
    p.add_argument("--repeats", type=int_range(1, 100), default=2, help="timings per configuration, for the spread (default 2)")
    p.add_argument("--gemm", action="store_true", help="also run the GEMM sweep (as the word spmm does)")
    p.add_argument("--gemm-methods", help="comma-separated GEMM methods (default: all registered)")
    p.add_argument("--gemm-regimes", default="fp32-cuda-core,fp32,fp16", help="GEMM sweep regimes (default: all three)")
    p.add_argument("--gemm-sparsities", help="comma-separated sparsities (default 0.5,0.7,0.8,0.9,0.95,0.98)")
    p.add_argument("--gemm-shapes", help="shape sets: seed (the default), registry models or ONNX files (their convs)")
    p.add_argument("--accuracy", help="JSON of accuracies from another command, shown in the summary (see below)")
    p.add_argument("--report-only", metavar="JSON", help="re-render bench.md and the plots from a bench.json")
    p.add_argument("-o", "--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in _csv(text)]
    except ValueError:
        raise UserError(f"{what} takes comma-separated integers, got '{text}'") from None
    if not vals or any(v < 1 or v > MAX_BATCH for v in vals):
        raise UserError(f"{what} needs positive integers up to {MAX_BATCH}, got '{text}'")
    return vals


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in _csv(text)]
    except ValueError:
        raise UserError(f"{what} takes comma-separated numbers, got '{text}'") from None
    if not vals or any(not 0.0 <= v < 1.0 for v in vals):
        raise UserError(f"{what} needs sparsities in [0, 1), got '{text}'")
    return vals


def run(args) -> int:
    from ..common.fileio import check_output_folder
    from ..runtimes import resolve_device
    from .bench import load_accuracy, run_bench
    from .bench_report import outcome_lines, rerender, short_table, write_json, write_reports
    from .bench_shards import parse_devices
    from .regimes import parse_regimes

    out = check_output_folder(args.out, "-o")
    accuracy = load_accuracy(args.accuracy) if args.accuracy else None
    if args.report_only:
        files = rerender(args.report_only, out, accuracy)
        print(f"wrote {out / 'bench.md'} and {', '.join(files) or 'no plots'}")
        return 0
    models = list(args.models)
    devices = parse_devices(args.devices) if args.devices else [resolve_device(args.device)]
    quick = args.quick
    if not quick and devices[0].type == "cpu" and not [m for m in models if m != "spmm"]:
        quick = True  # a bounded default: the full sweep on a CPU runs for hours and says little
        print("bench: no GPU and no MODEL named: running the quick harness (tiny nets and GEMMs); name a model "
              "to time it on the CPU", file=sys.stderr)
    result = run_bench(
        models=[m for m in models if m != "spmm"], gemm=args.gemm or "spmm" in models, quick=quick,
        regimes=parse_regimes(args.regimes), batches=_ints(args.batch or ("1,2" if quick else "1"), "--batch"),
        prunes=_csv(args.prune) or ["none"], dense=_csv(args.dense) or [], runtime_dense_conv=args.runtime_dense_conv,
        runtimes=_csv(args.runtimes), devices=devices, scope=args.scope, gemm_shapes=_csv(args.gemm_shapes),
        weights=args.weights, per_layer=not args.no_per_layer, flush_l2=args.flush_l2,
        budget_ms=args.budget_ms, repeats=args.repeats, progress=not args.no_progress, accuracy=accuracy,
        gemm_sparsities=_floats(args.gemm_sparsities, "--gemm-sparsities") if args.gemm_sparsities else None,
        gemm_methods=_csv(args.gemm_methods) or None, gemm_regimes=[r.name for r in parse_regimes(args.gemm_regimes)],
        options=args.options, log=lambda line: print(line, file=sys.stderr), calibration=args.calibration)
    out.mkdir(parents=True, exist_ok=True)
    files = write_reports(result, out)
    write_json(result, out / "bench.json")
    print(short_table(result))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f" and {', '.join(files)}" if files else ""))
    notes, failed = outcome_lines(result, out / "bench.md")
    for line in notes:
        print(line, file=sys.stderr)
    return 1 if failed else 0
