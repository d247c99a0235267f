"""`sparsecnn compare`: accuracy of a model's pruned versions, one-shot and fine-tuned.

The comparison itself is converter/compare.py; this module parses the arguments and prints.
"""
from __future__ import annotations

import argparse
import sys

from ..common.errors import UserError
from .options import add_input_spec_args, batch_size, int_range, positive_float, positive_int, unit_float

HELP = """\
Compare a model with its pruned versions on real data: dense vs each pruning method
one-shot vs pruned + fine-tuned with masks (unstructured: pruned gradually while training).
Every variant is exported to ONNX with BatchNorm folded and evaluated through that file,
the form you deploy. With labels: top-1 (and top-5); always: agreement with the dense model
(top-1 agreement and output cosine; for detectors such as trafficcamnet, coverage-map
cells agreeing at --cov-threshold and their mean absolute difference). Model sizes: the
ONNX file and the compressed form (CSR for unstructured, 2:4 values + indices, the smaller
ONNX for channel pruning). Data: Fashion-MNIST's test set by default, or --data FOLDER.
On a CPU, fine-tuning uses the first 1000 training images for 1 epoch per method.
"""

EXAMPLES = """\
examples:
  sparsecnn train resnet18 -o r18.pt && sparsecnn compare r18.pt --json r18.json --plot r18.png
  sparsecnn compare r18.pt --methods 2:4 0.9 channel:0.5 --finetune-epochs 0    # one-shot only
  sparsecnn compare r18.pt --subset 500 --device cpu --finetune-epochs 1 --train-subset 500
  sparsecnn compare resnet18 --weights IMAGENET1K_V1 --data /data/imagenet/val --subset 5000
  sparsecnn compare trafficcamnet --data photos/ --subset 16 --methods 2:4 0.5   # label-free
  sparsecnn compare model.onnx --methods 2:4 0.8                                # one-shot, ONNX passes
  sparsecnn compare mobilenet_v2.onnx --mean imagenet --std imagenet --data photos/ --methods 0.5
"""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a sparsecnn checkpoint (from `sparsecnn train`), a registry model name, or an "
                                  "ONNX file (one-shot 2:4 and unstructured only)")
    p.add_argument("--weights", help="weights for a registry model (see `convert --help`)")
    p.add_argument("--num-classes", type=int_range(1, 10**6), help="classifier size of a registry model")
    p.add_argument("--methods", nargs="+", default=["2:4", "0.9", "channel:0.5"], metavar="METHOD",
                   help="2:4, a sparsity such as 0.9 (unstructured magnitude), channel:F (remove the fraction F "
                        "of FLOPs by whole filters); default: 2:4 0.9 channel:0.5")
    p.add_argument("--scope", choices=["layer", "global"], default="layer",
                   help="unstructured: same sparsity per layer, or one threshold over all (default layer)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: the Debian package's files) or an ImageFolder "
                                  "directory (labelled by sub-folder; a test/ or val/ sub-folder is used if present)")
    p.add_argument("--subset", type=positive_int, help="evaluate on the first N images only")
    p.add_argument("--finetune-epochs", type=int_range(0, 10000), metavar="N",
                   help="epochs of fine-tuning per method (0: one-shot only; default on GPU: 2:4 5, "
                        "unstructured 12, channel 10; on CPU 1)")
    p.add_argument("--train-subset", type=positive_int, help="fine-tune on the first N training images (CPU default 1000)")
    p.add_argument("--lr", type=positive_float, help="fine-tuning learning rate for 2:4 (x2.5 for the others); default: "
                                            "the model's recipe")
    p.add_argument("--batch-size", type=batch_size, help="fine-tuning batch size (default: the recipe's; 64 on CPU)")
    p.add_argument("--eval-batch", type=batch_size, default=250, help="evaluation batch size (default 250)")
    p.add_argument("--runtime", default="torch", help="runtime that runs the ONNX files (default torch)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--cov-threshold", type=unit_float, default=0.5, help="detectors: coverage value that marks a cell")
    p.add_argument("--seed", type=int, default=0, help="seed for fine-tuning")
    p.add_argument("--json", metavar="FILE|-", help="write all results (per-epoch fine-tuning history included) to "
                   "this file, or to stdout with '-' (the table then goes to stderr); `bench --accuracy` reads it")
    p.add_argument("--plot", help="write a plot of accuracy vs sparsity to this .png/.svg/.pdf")
    p.add_argument("--markdown", help="write the table as Markdown to this file")
    p.add_argument("--save-dir", help="also write every variant's ONNX file to this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_input_spec_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..common.fileio import check_output_folder, check_outputs, write_text_atomic
    from . import distributed
    from .compare import (compare_model, finetune_data, finetune_plan, format_table, load_subject, markdown_table,
                          parse_methods, plot_results, write_json)
    from .data import load_data
    from .source import SpecFlags

    methods = parse_methods(args.methods)  # bad methods fail before any work
    json_file = args.json if args.json != "-" else None  # '-': stdout
    for out, suffixes in ((json_file, (".json",)), (args.plot, (".png", ".svg", ".pdf")), (args.markdown, (".md",))):
        if out and not out.endswith(suffixes):
            raise UserError(f"{out}: expected a {' or '.join(suffixes)} file")
    check_outputs({"--json": json_file, "--plot": args.plot, "--markdown": args.markdown},
                  [args.source, args.weights])  # before the comparison runs, not after
    if args.save_dir:
        check_output_folder(args.save_dir, "--save-dir")
    device = distributed.start(args.device)  # under torchrun: this rank's GPU, the process group joined
    main = distributed.is_main()
    data = load_data(args.data, "test").subset(args.subset)
    subject = load_subject(args.source, args.weights, args.num_classes, quiet=not main, flags=SpecFlags.from_args(args))
    plan = finetune_plan(subject.arch, device, epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                         seed=args.seed, scope=args.scope)
    train = val = None
    if plan is not None and subject.module is not None:
        train, val = finetune_data(args.data, data, device, args.train_subset)
    distributed.main_only(print)(
        f"comparing {subject.label} on {data.name} ({len(data)} images) on {device}"
        + (f" x {distributed.world_size()} processes" if distributed.is_distributed() else "") + ": "
        + ", ".join(m.label for m in methods)
        + (f"; fine-tuning on {len(train)} images" if plan and train is not None else "; one-shot only"),
        file=sys.stderr)
    results = compare_model(subject, methods, data, device, train=train, val=val, plan=plan,
                            runtime=args.runtime, batch_size=args.eval_batch, cov_threshold=args.cov_threshold,
                            save_dir=args.save_dir, progress=not args.no_progress,
                            log=lambda s: print(s, file=sys.stderr))
    failed = any(r.get("error") for r in results["rows"])
    if not main:  # rank 0 prints and writes for all
        return 1 if failed else 0
    text = sys.stderr if args.json == "-" else sys.stdout  # stdout carries the JSON alone then
    print(format_table([results]), file=text)
    if args.json == "-":
        from .layer_report import write_json as write_json_or_stdout

        write_json_or_stdout({"results": [results]}, "-")
    elif args.json:
        write_json({"results": [results]}, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        write_text_atomic(args.markdown, markdown_table([results]))
        print(f"wrote {args.markdown}", file=text)
    if args.plot:
        plot_results([results], args.plot)
        print(f"wrote {args.plot}", file=text)
    return 1 if failed else 0
