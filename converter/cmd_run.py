"""`sparsecnn run`: run an engine, ONNX file or registry model on images or random input."""
from __future__ import annotations

import argparse
import sys
import time

from ..common.errors import UserError
from .options import add_calibration_args, add_engine_args, add_input_spec_args, batch_size, int_range, positive_int

EXAMPLES = """\
examples:
  sparsecnn run r18.engine --input cat.jpg --topk 5
  sparsecnn run vgg19-0.9.onnx --input photos/ --device cuda --dtype fp16 -o outputs.npz
  sparsecnn run mobilenet_v2.onnx --input photos/ --mean imagenet --std imagenet --labels classes.txt
  sparsecnn run my.onnx --input photos/ --input-shape 3x224x224 --mean 0.5 --std 0.5   # dynamic H, W
  sparsecnn run r18.engine --random --batch 32 --timing        # min/median/mean/p90/p99, images/s
  sparsecnn run trafficcamnet --random --batch 2 -o outputs.npz
  sparsecnn run v90.onnx --runtime ecr --calibration photos/ --input photos/   # ecr chooses on real images
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", epilog=EXAMPLES,
                       description="Run a saved engine (.engine), an ONNX file or a registry model. Images "
                                   "are resized and normalised per the model's input spec (stored by `convert`, "
                                   "or given with --input-shape/--mean/--std); a folder is read --batch images "
                                   "at a time. Classifiers print the top-k classes, other models their output "
                                   "shapes. A saved engine runs as it was built.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="engine file, ONNX file or registry model name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="an image file or a folder of images")
    src.add_argument("--random", action="store_true", help="random input (the default without --input)")
    p.add_argument("--batch", type=batch_size, help="images per batch (default: the model's fixed batch, else "
                                                    "32 for a folder, 1 for random input)")
    p.add_argument("--seed", type=int, default=0, help="seed for random input")
    p.add_argument("--topk", type=positive_int, default=5, help="classes to print per image (default 5)")
    p.add_argument("-o", "--output", help="write all outputs to this .npz file (filled batch by batch)")
    p.add_argument("--save-inputs", action="store_true", help="also store the inputs in the .npz, by input name "
                                                                "(the reference that scripts/jetson_deploy.py checks against)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timing", action="store_true", help="also time the model alone on the first batch: min, "
                                                         "median, mean, p90, p99 and images/s after a warm-up")
    p.add_argument("--warmup", type=int_range(0, 10000), default=10, help="--timing: calls before timing (default 10)")
    p.add_argument("--iterations", type=int_range(1, 100000),
                   help="--timing: timed calls (default: as many as fill about 3 s, at least 10)")
    p.add_argument("--weights", help="weights for a registry model (see `convert --help`)")
    add_engine_args(p)
    add_calibration_args(p, "when `run` builds an engine from an ONNX file or registry model (a saved "
                            "engine keeps the choices it was built with)")
    add_input_spec_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..common.fileio import check_output
    from .inference import FOLDER_BATCH, NpzWriter, run_batches, time_engine, timing_lines, topk_lines
    from .options import compile_options
    from .source import SpecFlags, engine_settings_given, load_runnable

    if args.output and not args.output.endswith(".npz"):
        raise UserError(f"--output must name an .npz file, got {args.output}")
    if args.output:
        check_output(args.output, [args.model, args.weights, args.input], "--output")
    if args.save_inputs and not args.output:
        raise UserError("--save-inputs stores the inputs in the -o .npz file; add -o FILE.npz")
    files = None
    if args.input:
        from .images import image_files

        files = image_files(args.input)  # a missing input fails before the model is built
    if args.calibration and not args.model.endswith(".engine"):
        from .calibration import check_path

        check_path(args.calibration)  # so does a missing calibration source
    flags = SpecFlags.from_args(args)
    engine_file = args.model.endswith(".engine")
    opts = None if engine_file else compile_options(args)
    t0 = time.perf_counter()
    engine, inp = load_runnable(args.model, runtime=args.runtime, device=args.device, weights=args.weights,
                                options=opts, flags=flags, images=files is not None,
                                given=engine_settings_given(args) if engine_file else None,
                                calibration=args.calibration, calibration_images=args.calibration_images)
    setup_s = time.perf_counter() - t0
    if files is not None:
        from .images import image_batches

        spec = inp.require_spec()
        batch = min(inp.batch_for(args.batch, flags, FOLDER_BATCH), inp.batch or len(files))
        batches, total = image_batches(files, spec, batch), len(files)
    else:
        batch = inp.batch_for(args.batch, flags, 1)
        x = torch.randn(batch, *inp.require_shape(), generator=torch.Generator().manual_seed(args.seed))
        batches, total = [(None, x)], batch
    labels = inp.spec.labels if inp.spec else None

    def lines(names, start, outputs):
        if len(outputs) != 1 or outputs[0].dim() != 2:
            return []
        if labels and len(labels) != outputs[0].shape[1]:
            raise UserError(f"{len(labels)} labels for {outputs[0].shape[1]} classes; give --labels a file with "
                            f"{outputs[0].shape[1]} names")
        who = [f.name for f in names] if names else [f"input {start + i}" for i in range(outputs[0].shape[0])]
        return topk_lines(outputs[0], args.topk, who, labels)

    writer = NpzWriter(args.output, total) if args.output else None
    try:
        stats = run_batches(engine, batches, total, fixed_batch=inp.batch, writer=writer,
                            save_inputs=args.save_inputs, lines=lines, progress=not args.no_progress)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.close()
    classifier = len(stats.outputs) == 1 and len(next(iter(stats.outputs.values())).shape) == 2
    for name, o in ([] if classifier else stats.outputs.items()):
        print(o.line(name))
    rest = stats.images - min(batch, stats.images)
    what = ("image" if files else "input") + ("s" if stats.images > 1 else "")
    print(f"ran {engine.runtime} on {engine.device} ({engine.options.dtype}): {stats.images} {what} in "
          f"{stats.batches} batch{'es' if stats.batches > 1 else ''} of {batch}; set-up {setup_s:.2f} s, first batch {stats.first_ms:.1f} ms (includes the engine's plan for "
          "its shape)" + (f", then {rest / stats.rest_s:.1f} images/s end to end" if rest and stats.rest_s else ""))
    if args.output:
        print(f"wrote {args.output}")
    if args.timing:
        t = time_engine(engine, stats.first_input, args.warmup, args.iterations)
        for line in timing_lines(t, stats.first_input.shape[0], args.warmup):
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    return 0
