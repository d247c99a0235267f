"""Training a registry classifier to a sparsecnn checkpoint: recipes, the CPU small-subset mode, the loop.

The checkpoint is plain data (loads with weights_only=True): {"format", "arch",
"num_classes", "input" (InputSpec), "state_dict", "train" (how it was made: data, recipe,
seed, per-epoch history, validation and test top-1)}. `sparsecnn train` writes it; every
other command takes it as a model.

With `prune` the net is pruned while it trains (unstructured magnitude, per layer, on the
cubic schedule over the first GRADUAL_SHARE of the epochs; the model's stem and classifier
left dense). Under torchrun every rank trains (finetune.fit) and rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..common.errors import UserError
from ..common.fileio import atomic_path
from ..models.registry import InputSpec, get_entry, load_model
from . import distributed
from .data import ImageData, TensorImages, fashion_mnist_spec, load_data
from .finetune import GRADUAL_SHARE, FitConfig, FitResult, GradualPruning, evaluate_top1, fit, fold_batchnorm_into


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

def recipe_for(arch: str) -> Recipe:
    return RECIPES.get(arch, DEFAULT_RECIPE)


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
                log=print, command: str | None = None, prune: float | None = None) -> TrainOutcome:
    """Train registry model `arch` (pruned gradually to sparsity `prune` if given) and return it
    (eval mode, CPU) with its checkpoint dict."""
    entry = get_entry(arch)
    if entry.name == "trafficcamnet":
        raise UserError("trafficcamnet is a detector; `train` trains classifiers (resnet18, vgg19, tiny nets)")
    recipe = recipe or recipe_for(arch)
    num_classes = train.num_classes
    if isinstance(train, TensorImages) and device.type == "cuda":
        train = train.to(device)  # the whole set in GPU memory: no loader, no host copies per step
        val = val.to(device) if isinstance(val, TensorImages) else val
    model = build_for_training(arch, recipe, num_classes, cfg.seed)
    gradual = None
    if prune is not None:
        from ..passes.masks import check_sparsity

        gradual = GradualPruning(check_sparsity(prune), end_epoch=GRADUAL_SHARE * cfg.epochs, exclude=entry.exclude)
    t0 = time.perf_counter()
    result = fit(model, train, val, spec, device, cfg, gradual=gradual, label=f"train {arch}", progress=progress,
                 log=log)
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
        "command": command or "", "prune": None if gradual is None else dataclasses.asdict(gradual),
        "processes": distributed.world_size(),
    }
    meta = json.loads(json.dumps(meta))  # plain data only: the checkpoint must load with weights_only=True
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "num_classes": num_classes,
            "input": spec.to_dict(), "state_dict": {k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()},
            "train": meta}
    return TrainOutcome(final, spec, ckpt, result)


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write `ckpt` atomically; under torchrun rank 0 alone writes (every rank holds the same)."""
    path = Path(path)
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def training_plan(arch: str, device: torch.device, *, size: int | None = None, epochs: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, optimizer: str | None = None,
                  seed: int | None = None, subset: int | None = None,
                  eval_subset: int | None = None) -> tuple[FitConfig, int, int | None, int | None]:
    """(fit config, input size, train subset, eval subset): the recipe, shrunk on a CPU, then the overrides."""
    get_entry(arch)  # an unknown model fails before any data is read
    recipe = recipe_for(arch)
    cpu = device.type == "cpu"
    overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                   "optimizer": optimizer, "seed": seed}.items() if v is not None}
    base = recipe.fit
    if cpu:  # small-subset mode: smaller batches, so a few hundred images still make several steps
        base = dataclasses.replace(base, epochs=CPU_EPOCHS, batch_size=min(base.batch_size, 64),
                                   lr=min(base.lr, 0.05), warmup_epochs=0.5)
    if optimizer == "adamw" and lr is None:
        overrides["lr"] = 1e-3
    cfg = dataclasses.replace(base, **overrides)
    size = size or (CPU_SIZE if cpu else recipe.size)
    subset = subset if subset is not None else (CPU_SUBSET if cpu else None)
    eval_subset = eval_subset if eval_subset is not None else (CPU_EVAL if cpu else None)
    return cfg, size, subset, eval_subset


def load_splits(data: str | None, subset: int | None, eval_subset: int | None) -> tuple[ImageData, ImageData, ImageData]:
    """(train, val, test) of Fashion-MNIST or an ImageFolder, each cut to its subset."""
    return (load_data(data, "train").subset(subset), load_data(data, "val").subset(eval_subset),
            load_data(data, "test").subset(eval_subset))


def training_spec(arch: str, train: ImageData, size: int, size_given: int | None) -> InputSpec:
    """Fashion-MNIST at `size`; an ImageFolder keeps the model's own input spec (ImageNet
    normalisation), resized only when a size was given."""
    entry = get_entry(arch)
    if isinstance(train, TensorImages):
        spec = fashion_mnist_spec(size, entry.input.channels)
    else:
        size = size_given or entry.input.height
        spec = dataclasses.replace(entry.input, height=size, width=size, num_classes=train.num_classes,
                                   labels=train.labels)
    if spec.height < 8:
        raise UserError(f"--size must be at least 8 pixels, got {spec.height}")
    return spec
