"""`sparsecnn train`: train a registry classifier on Fashion-MNIST (or an ImageFolder) to a checkpoint.

The training itself is converter/training.py; this module parses the arguments and prints.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .options import batch_size, int_range, positive_float, positive_int

HELP = """\
Train a registry model (resnet18, vgg19, the tiny test nets) with 10 classes on
Fashion-MNIST and write a sparsecnn checkpoint. On a GPU it trains on all 55000 training
images (5000 more are held out for validation) and reports top-1 on the 10000 test
images. On a CPU it runs a small-subset mode (the first 2000 images, 2 epochs, 32x32)
that finishes in a few minutes, good for trying the flow, not for accuracy claims.
The run is seeded: the same command on the same machine gives the same checkpoint.
"""

EXAMPLES = """\
examples:
  sparsecnn train resnet18 -o runs/resnet18-fmnist.pt            # GPU: all 55000 images, 18 epochs
  sparsecnn train vgg19 -o runs/vgg19-fmnist.pt
  sparsecnn train resnet18 -o r18-cpu.pt --device cpu             # small-subset mode, a few minutes
  sparsecnn train tinynet -o tiny.pt --subset 1000 --epochs 1
  sparsecnn train resnet18 --data /data/my-folder -o r18.pt       # an ImageFolder with train/ and val/
  sparsecnn train resnet18 --prune 0.9 -o r18-90.pt               # pruned gradually to 90% while training
  torchrun --nproc-per-node 4 -m sparsecnn.converter.cli train resnet18 -o r18.pt   # 4 GPUs, same result file
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="registry model name (resnet18, vgg19, tinynet, tinyresnet, ...)")
    p.add_argument("-o", "--output", required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: the Debian package's files) or an ImageFolder "
                                  "directory (with train/ and val/ sub-folders, or one folder used for both)")
    p.add_argument("--size", type=int_range(8, 4096), help="input height and width in pixels (default: 64 for resnet18, 32 else)")
    p.add_argument("--epochs", type=int_range(1, 10000), help="training epochs (default: the model's recipe; 2 on CPU)")
    p.add_argument("--batch-size", type=batch_size, help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer (default sgd with Nesterov momentum)")
    p.add_argument("--subset", type=positive_int, help="train on the first N training images only (CPU default 2000)")
    p.add_argument("--eval-subset", type=positive_int, help="validate and test on the first N images only (CPU default 1000)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed for initial weights, shuffling and augmentation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch still)")
    p.add_argument("--prune", type=float, metavar="SPARSITY",
                   help="prune while training: unstructured magnitude per layer, gradually (cubic schedule over "
                        "the first 60%% of the epochs) to this sparsity, e.g. 0.9; stem and classifier stay dense")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..common.fileio import check_output
    from . import distributed
    from .training import load_splits, save_checkpoint, train_model, training_plan, training_spec

    arch = args.model
    out = check_output(args.output, [args.data], "--output")
    device = distributed.start(args.device)  # under torchrun: this rank's GPU, the process group joined
    say = distributed.main_only(print)
    cfg, size, subset, eval_subset = training_plan(
        arch, device, size=args.size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, seed=args.seed, subset=args.subset, eval_subset=args.eval_subset)
    train, val, test = load_splits(args.data, subset, eval_subset)
    spec = training_spec(arch, train, size, args.size)
    size = spec.height
    if device.type == "cpu":
        say(f"CPU: small-subset mode, {len(train)} training images, {cfg.epochs} epoch(s) at {size}x{size} "
            "(a GPU trains on all of them; give --subset/--epochs/--size to change)", file=sys.stderr)
    say(f"training {arch} on {train.name} ({len(train)} images, {train.num_classes} classes) at {size}x{size}, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, seed {cfg.seed}, on {device}"
        + (f" x {distributed.world_size()} processes" if distributed.is_distributed() else "")
        + (f", pruned gradually to {args.prune:g}" if args.prune is not None else ""),
        file=sys.stderr)
    command = "sparsecnn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    outcome = train_model(arch, device, train, val, test, spec, cfg, progress=not args.no_progress,
                          log=lambda s: print(s, file=sys.stderr), command=command, prune=args.prune)
    save_checkpoint(outcome.checkpoint, out)
    meta = outcome.checkpoint["train"]
    say(f"wrote {out}: {arch}, {train.num_classes} classes, input {size}x{size}; validation top-1 "
        f"{_pct(meta['val_top1_after_folding'] or meta['val_top1'])}, test top-1 {_pct(meta['test_top1'])} "
        f"on {meta['test_images']} images, {meta['seconds']:.0f} s")
    return 0


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}%"
