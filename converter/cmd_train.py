"""`sparsecnn train`: train a registry classifier on Fashion-MNIST (or an ImageFolder) to a checkpoint.

The checkpoint is plain data (loads with weights_only=True): {"format", "arch",
"num_classes", "input" (InputSpec), "state_dict", "train" (how it was made: data, recipe,
seed, per-epoch history, validation and test top-1)}. Every other command takes it as a
model: `sparsecnn convert r18.pt --prune 2:4`, `sparsecnn compare r18.pt`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..common.errors import UserError
from ..common.fileio import atomic_path
from ..models.registry import InputSpec, get_entry, load_model
from .data import ImageData, TensorImages, fashion_mnist_spec, load_data
from .finetune import FitConfig, FitResult, evaluate_top1, fit, fold_batchnorm

CHECKPOINT_FORMAT = "sparsecnn-checkpoint"


@dataclass(frozen=True)
class Recipe:
    """How a model is trained on Fashion-MNIST on a GPU (the CPU mode shrinks data and epochs)."""

    size: int                 # input height = width
    fit: FitConfig            # training from scratch
    finetune: FitConfig       # fine-tuning after pruning (epochs set per method by `compare`)
    train_as: str | None = None  # a torchvision variant trained instead, then folded into the registry model
    note: str = ""


RECIPES: dict[str, Recipe] = {
    # ImageNet stem (stride 4): 64x64 leaves 2x2 in layer4.
    "resnet18": Recipe(64, FitConfig(epochs=18, lr=0.2, batch_size=512, warmup_epochs=2, grad_clip=5.0),
                       FitConfig(lr=0.02, batch_size=512, warmup_epochs=0.3, grad_clip=5.0, patience=3)),
    # Five 2x2 max-pools: 32x32 leaves the last block at 2x2 and a 1x1 map before the classifier.
    # VGG-19 without BatchNorm sits at chance for hundreds of steps from a random start, so it
    # trains as vgg19_bn and the BatchNorms are folded into the convolutions afterwards: the
    # same network as vgg19. Fine-tuning puts a temporary BatchNorm back after every conv
    # (finetune.BatchNormScaffold) and folds it again: without it, AdamW at 1e-4 lost 4.8
    # points at 90% sparsity on the H100 and SGD at useful rates diverges.
    "vgg19": Recipe(32, FitConfig(epochs=18, lr=0.1, batch_size=512, warmup_epochs=2, grad_clip=5.0),
                    FitConfig(lr=0.02, batch_size=512, warmup_epochs=0.3, grad_clip=5.0, patience=3,
                              batchnorm_scaffold=True),
                    train_as="vgg19_bn", note="trained as vgg19_bn; BatchNorm folded into the convolutions"),
}
DEFAULT_RECIPE = Recipe(32, FitConfig(epochs=10, lr=0.1, batch_size=256, warmup_epochs=1, grad_clip=5.0),
                        FitConfig(lr=0.02, batch_size=256, warmup_epochs=0.3, grad_clip=5.0, patience=3))
CPU_SUBSET, CPU_EPOCHS, CPU_SIZE, CPU_EVAL = 2000, 2, 32, 1000

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
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier on Fashion-MNIST to a checkpoint", description=HELP,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="registry model name (resnet18, vgg19, tinynet, tinyresnet, ...)")
    p.add_argument("-o", "--output", required=True, help="checkpoint file to write (.pt)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: the Debian package's files) or an ImageFolder "
                                  "directory (with train/ and val/ sub-folders, or one folder used for both)")
    p.add_argument("--size", type=int, help="input height and width in pixels (default: 64 for resnet18, 32 else)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the model's recipe; 2 on CPU)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer (default sgd with Nesterov momentum)")
    p.add_argument("--subset", type=int, help="train on the first N training images only (CPU default 2000)")
    p.add_argument("--eval-subset", type=int, help="validate and test on the first N images only (CPU default 1000)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed for initial weights, shuffling and augmentation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch still)")
    p.set_defaults(func=run)


def recipe_for(arch: str) -> Recipe:
    return RECIPES.get(arch, DEFAULT_RECIPE)


def fold_batchnorm_into(trained: nn.Module, target: nn.Module) -> None:
    """Copy `trained` (with Conv -> BatchNorm pairs) into `target` (the same net without them).

    Each BatchNorm is folded into its Conv (w * g / sqrt(v + eps), (b - m) * g / sqrt(v + eps) + beta);
    convolutions and linear layers are matched in order and must agree in shape.
    """
    from ..passes.masks import conv_bn_pairs

    pairs = conv_bn_pairs(trained)
    mods = dict(trained.named_modules())
    src = [(n, m) for n, m in trained.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    dst = [(n, m) for n, m in target.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(src) != len(dst):
        raise RuntimeError(f"cannot fold: {len(src)} weight layers trained, {len(dst)} in the target")
    with torch.no_grad():
        for (sn, s), (dn, d) in zip(src, dst):
            if s.weight.shape != d.weight.shape or d.bias is None:
                raise RuntimeError(f"cannot fold {sn} {tuple(s.weight.shape)} into {dn} {tuple(d.weight.shape)}")
            if sn in pairs:
                w, b = fold_batchnorm(s.weight, s.bias, mods[pairs[sn]])
            else:
                w, b = s.weight.detach(), s.bias.detach() if s.bias is not None else torch.zeros_like(d.bias)
            d.weight.copy_(w.to(d.weight.dtype))
            d.bias.copy_(b.to(d.bias.dtype))


def build_for_training(arch: str, recipe: Recipe, num_classes: int, seed: int) -> nn.Module:
    if recipe.train_as:
        import torchvision.models as tvm

        torch.manual_seed(seed)
        return getattr(tvm, recipe.train_as)(weights=None, num_classes=num_classes)
    model, _, _ = load_model(arch, num_classes=num_classes, seed=seed)
    return model


def finalize(arch: str, recipe: Recipe, trained: nn.Module, num_classes: int) -> nn.Module:
    """The registry's architecture holding the trained weights (folding BatchNorm where trained with it)."""
    if not recipe.train_as:
        return trained
    target, _, _ = load_model(arch, num_classes=num_classes)
    fold_batchnorm_into(trained.cpu().eval(), target)
    return target


@dataclass
class TrainOutcome:
    model: nn.Module
    spec: InputSpec
    checkpoint: dict
    result: FitResult


def train_model(arch: str, device: torch.device, train: ImageData, val: ImageData | None, test: ImageData | None,
                spec: InputSpec, cfg: FitConfig, recipe: Recipe | None = None, progress: bool = True,
                log=print, command: str | None = None) -> TrainOutcome:
    """Train registry model `arch` and return it (eval mode, CPU) with its checkpoint dict."""
    entry = get_entry(arch)
    if entry.name == "trafficcamnet":
        raise UserError("trafficcamnet is a detector; `train` trains classifiers (resnet18, vgg19, tiny nets)")
    recipe = recipe or recipe_for(arch)
    num_classes = train.num_classes
    if isinstance(train, TensorImages) and device.type == "cuda":
        train = train.to(device)  # the whole set in GPU memory: no loader, no host copies per step
        val = val.to(device) if isinstance(val, TensorImages) else val
    model = build_for_training(arch, recipe, num_classes, cfg.seed)
    t0 = time.perf_counter()
    result = fit(model, train, val, spec, device, cfg, label=f"train {arch}", progress=progress, log=log)
    final = finalize(arch, recipe, model, num_classes).to(device)
    folded_val = evaluate_top1(final, val, spec, device, cfg=cfg) if val is not None and recipe.train_as else None
    test_top1 = evaluate_top1(final, test, spec, device, cfg=cfg) if test is not None else None
    final = final.cpu().eval()
    meta = {
        "data": train.name, "train_images": len(train), "val_images": len(val) if val is not None else 0,
        "test_images": len(test) if test is not None else 0, "test_top1": test_top1,
        "val_top1": result.best_val_top1, "val_top1_after_folding": folded_val, "best_epoch": result.best_epoch,
        "config": cfg.to_dict(), "history": result.history, "seconds": time.perf_counter() - t0,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": str(torch.__version__), "trained_as": recipe.train_as or arch, "note": recipe.note,
        "command": command or "",
    }
    meta = json.loads(json.dumps(meta))  # plain data only: the checkpoint must load with weights_only=True
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "num_classes": num_classes,
            "input": spec.to_dict(), "state_dict": {k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()},
            "train": meta}
    return TrainOutcome(final, spec, ckpt, result)


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def plan(args, arch: str, device: torch.device) -> tuple[FitConfig, int, int | None, int | None]:
    """(fit config, input size, train subset, eval subset) from the recipe, the CPU mode and the flags."""
    recipe = recipe_for(arch)
    cpu = device.type == "cpu"
    overrides = {k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                   "optimizer": args.optimizer, "seed": args.seed}.items() if v is not None}
    base = recipe.fit
    if cpu:  # small-subset mode: smaller batches, so a few hundred images still make several steps
        base = dataclasses.replace(base, epochs=CPU_EPOCHS, batch_size=min(base.batch_size, 64),
                                   lr=min(base.lr, 0.05), warmup_epochs=0.5)
    if args.optimizer == "adamw" and args.lr is None:
        overrides["lr"] = 1e-3
    cfg = dataclasses.replace(base, **overrides)
    size = args.size or (CPU_SIZE if cpu else recipe.size)
    subset = args.subset if args.subset is not None else (CPU_SUBSET if cpu else None)
    eval_subset = args.eval_subset if args.eval_subset is not None else (CPU_EVAL if cpu else None)
    return cfg, size, subset, eval_subset


def run(args) -> int:
    from ..runtimes import resolve_device

    arch = args.model
    entry = get_entry(arch)
    out = Path(args.output)
    if not out.parent.is_dir() and str(out.parent) not in ("", "."):
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    device = resolve_device(args.device)
    cfg, size, subset, eval_subset = plan(args, arch, device)
    train = load_data(args.data, "train").subset(subset)
    val = load_data(args.data, "val").subset(eval_subset)
    test = load_data(args.data, "test").subset(eval_subset)
    if isinstance(train, TensorImages):  # Fashion-MNIST
        spec = fashion_mnist_spec(size, entry.input.channels)
    else:  # an ImageFolder keeps the model's own input spec (ImageNet normalisation), resized if asked
        size = args.size or entry.input.height
        spec = dataclasses.replace(entry.input, height=size, width=size, num_classes=train.num_classes,
                                   labels=train.labels)
    if size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {size}")
    if device.type == "cpu":
        print(f"CPU: small-subset mode, {len(train)} training images, {cfg.epochs} epoch(s) at {size}x{size} "
              "(a GPU trains on all of them; give --subset/--epochs/--size to change)", file=sys.stderr)
    print(f"training {arch} on {train.name} ({len(train)} images, {train.num_classes} classes) at {size}x{size}, "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, seed {cfg.seed}, on {device}",
          file=sys.stderr)
    command = "sparsecnn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    outcome = train_model(arch, device, train, val, test, spec, cfg, progress=not args.no_progress,
                          log=lambda s: print(s, file=sys.stderr), command=command)
    save_checkpoint(outcome.checkpoint, out)
    meta = outcome.checkpoint["train"]
    print(f"wrote {out}: {arch}, {train.num_classes} classes, input {size}x{size}; validation top-1 "
          f"{_pct(meta['val_top1_after_folding'] or meta['val_top1'])}, test top-1 {_pct(meta['test_top1'])} "
          f"on {meta['test_images']} images, {meta['seconds']:.0f} s")
    return 0


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}%"
