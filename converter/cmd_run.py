"""`sparsecnn run`: run an engine, ONNX file or registry model on images or random input."""
from __future__ import annotations

import argparse
import io
import time

from ..common.errors import UserError
from .options import add_engine_args, batch_size, positive_int

EXAMPLES = """\
examples:
  sparsecnn run r18.engine --input cat.jpg --topk 5
  sparsecnn run vgg19-0.9.onnx --input photos/ --device cuda --dtype fp16
  sparsecnn run trafficcamnet --random --batch 2 -o outputs.npz
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", epilog=EXAMPLES,
                       description="Run a saved engine (.engine), an ONNX file or a registry model. Images "
                                   "are resized and normalised per the model's input spec; classifiers print "
                                   "the top-k classes, other models their output shapes.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="engine file, ONNX file or registry model name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", help="an image file or a folder of images")
    src.add_argument("--random", action="store_true", help="random input (the default without --input)")
    p.add_argument("--batch", type=batch_size, default=1, help="batch size for random input (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for random input")
    p.add_argument("--topk", type=positive_int, default=5, help="classes to print per image (default 5)")
    p.add_argument("-o", "--output", help="write all outputs to this .npz file")
    p.add_argument("--save-inputs", action="store_true", help="also store the inputs in the .npz, by input name "
                                                                "(the reference that scripts/jetson_deploy.py checks against)")
    p.add_argument("--weights", help="weights for a registry model (see `convert --help`)")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from ..common.fileio import check_output, write_bytes_atomic
    from .options import compile_options
    from .source import fixed_input_shape, load_runnable

    if args.output and not args.output.endswith(".npz"):
        raise UserError(f"--output must name an .npz file, got {args.output}")
    if args.output:
        check_output(args.output, [args.model, args.weights, args.input], "--output")
    files = None
    if args.input:
        from .images import image_files

        files = image_files(args.input)  # a missing input fails before the model is built
    opts = None if args.model.endswith(".engine") else compile_options(args)
    engine, spec = load_runnable(args.model, runtime=args.runtime, device=args.device, weights=args.weights,
                                 options=opts)
    if files is not None:
        if spec is None:
            raise UserError(f"{args.model} carries no input spec (size, normalisation); export it with "
                            "`sparsecnn convert` or run it with --random")
        from .images import load_images

        x = load_images(files, spec)
    else:
        shape = spec.shape if spec else fixed_input_shape(engine)
        x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    outputs = engine(x)
    elapsed = time.perf_counter() - t0
    names = engine.output_names
    print(f"ran {engine.runtime} on {engine.device} ({engine.options.dtype}), batch {x.shape[0]}: {elapsed * 1e3:.1f} ms "
          "(first call, includes set-up)")
    if len(outputs) == 1 and outputs[0].dim() == 2:
        labels = spec.labels if spec and spec.labels else None
        probs = torch.softmax(outputs[0], dim=1)
        k = min(args.topk, probs.shape[1])
        top = probs.topk(k, dim=1)
        for i in range(x.shape[0]):
            who = files[i].name if files else f"input {i}"
            picks = ", ".join(f"{labels[c] if labels else c} {p:.3f}" for p, c in zip(top.values[i].tolist(), top.indices[i].tolist()))
            print(f"{who}: {picks}")
    else:
        for n, o in zip(names, outputs):
            print(f"{n}: shape {list(o.shape)}, min {o.min():.4g}, mean {o.mean():.4g}, max {o.max():.4g}")
    if args.output:
        buf = io.BytesIO()
        # outputs live on the engine's device (and in its dtype): numpy wants host memory
        arrays = {n: o.detach().cpu().numpy() for n, o in zip(names, outputs)}
        if getattr(args, "save_inputs", False):
            arrays.update({n: x.detach().cpu().numpy() for n, x in zip(engine.input_names, [x])})
        np.savez(buf, **arrays)
        write_bytes_atomic(args.output, buf.getvalue())
        print(f"wrote {args.output}")
    return 0
