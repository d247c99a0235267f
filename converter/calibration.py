"""Calibration input: what an activation-sparse runtime chooses its kernels on.

ecr's and hybrid's ECR/PECR kernels skip the zeros of a layer's input feature map, so whether
one beats the layer's dense forms depends on the activations it will really see. Those runtimes
take `calibration=` (an input batch, normalised as the model expects) and run it through the
network at compile time; without it they choose on a random input and their per-layer report
says so. Weight-sparse and dense runtimes choose on weights and shapes alone and ignore it
(`runtimes.takes_calibration` reads that from each runtime's compile).

A calibration source is a folder of images (an ImageFolder or a flat folder, read with the
model's input spec through converter/images.py, as `run --input` reads them), an .npz holding
the input array by input name (`run --save-inputs` writes one; read and checked as `verify
--inputs` does), or, from Python, a tensor or array.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from ..common.errors import UserError
from ..models.registry import InputSpec
from ..runtimes import takes_calibration
from .images import IMAGE_SUFFIXES, NoImages, image_files, load_images
from .options import CALIBRATION_IMAGES


def check_path(path: str | Path, flag: str = "--calibration") -> Path:
    """`path` as a calibration source that exists: a folder holding images, an .npz or an image file
    (checked before the model is built, so a typo costs nothing)."""
    p = _source_path(path, flag)
    if p.is_dir():
        _images_in(p, flag)
    return p


def _source_path(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} not found: {p}")
    if p.is_file() and p.suffix.lower() != ".npz" and p.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{flag} {p} is neither a folder of images nor an .npz file (input arrays by input name, "
                        "as `sparsecnn run MODEL --random --save-inputs -o FILE.npz` writes)")
    return p


def _images_in(folder: Path, flag: str) -> list[Path]:
    try:
        return image_files(folder)  # an unreadable image is its own one-line error, naming the file
    except NoImages:
        raise UserError(f"{flag} {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or its "
                        "subfolders; give a folder of images (an ImageFolder or a flat folder) or an .npz "
                        "file") from None


def spread(files: Sequence[Path], n: int) -> list[Path]:
    """At most `n` of `files`, evenly spaced: an ImageFolder's sorted files come class by class, and
    the first n would all be of its first class."""
    if len(files) <= n:
        return list(files)
    return [files[i * len(files) // n] for i in range(n)]


def read_calibration(source, model: onnx.ModelProto, spec: InputSpec | None, images: int | None = None,
                     flag: str = "--calibration") -> torch.Tensor:
    """The calibration batch [N, C, H, W] (float32, CPU) for `model`'s single input from `source`: a
    folder or image file (at most `images` images, default CALIBRATION_IMAGES, prepared per `spec`),
    an .npz (the first `images` rows of the input's array), a tensor or an array (as given). The
    checks are `verify --inputs`'s: the input's name, its sizes, floats, no NaN."""
    from .verify import check_inputs, model_inputs, read_inputs

    images = CALIBRATION_IMAGES if images is None else images
    names = [n for n, _, _ in model_inputs(model)]
    if len(names) != 1:
        raise UserError(f"{flag}: the model has {len(names)} inputs ({', '.join(names)}); calibration feeds a "
                        "model with one image input")
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return torch.from_numpy(check_inputs({names[0]: source}, model, flag)[names[0]])
    p = _source_path(source, flag)
    if p.suffix.lower() == ".npz" and p.is_file():
        arrays = check_inputs(read_inputs(p), model, f"{flag} {p}")
        return torch.from_numpy(arrays[names[0]][:images].copy())
    files = _images_in(p, flag) if p.is_dir() else [p]
    if spec is None:
        raise UserError(f"{flag} {p}: the model carries no input spec (size, normalisation) to prepare images "
                        "with; give --mean/--std (and --input-shape), or an .npz of prepared inputs")
    x = load_images(spread(files, images), spec)
    return torch.from_numpy(check_inputs({names[0]: x}, model, f"{flag} {p}")[names[0]])


def ignored_by(runtime: ModuleType, flag: str = "--calibration") -> str:
    return f"runtime {runtime.name} chooses on weights and shapes only, not on activations; {flag} ignored"


def calibration_for(runtimes: Sequence[ModuleType], source, model: onnx.ModelProto, spec: InputSpec | None,
                    images: int | None = None, flag: str = "--calibration",
                    warn: Callable[[str], None] | None = None) -> torch.Tensor | None:
    """The calibration batch if any of `runtimes` takes one (None when `source` is None); each runtime
    that ignores it is named through `warn` (a line, not an error: the engine is still right)."""
    if source is None:
        return None
    ignoring = [rt for rt in runtimes if not takes_calibration(rt)]
    for rt in ignoring:
        if warn is not None:
            warn(ignored_by(rt, flag))
    if len(ignoring) == len(runtimes):
        return None
    return read_calibration(source, model, spec, images, flag)
