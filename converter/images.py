"""Images from files, prepared the way a model's input spec says."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..common.errors import UserError
from ..models.registry import InputSpec

# Grey modes wider than 8 bits and their full-scale value (16-bit PNG and TIFF open as these).
WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff", ".gif"}


class NoImages(UserError):
    """A folder holding no file with an image suffix (callers may say so in their own words)."""


def image_files(path: str | Path) -> list[Path]:
    """The image file, or a folder's images (by suffix, sorted); each one's header is read here, so a
    file that is no image (a text file named .png) fails before any work, not after the batches before it."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise NoImages(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {p}")
    else:
        raise UserError(f"input not found: {p}")
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f):  # the header only: pixels are read batch by batch (a cut-short file fails then)
                pass
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {f}: {exc}") from None
    return files


def preprocess(image, spec: InputSpec) -> torch.Tensor:
    """A PIL image -> [C, H, W] float tensor: resized, scaled, normalised per the spec."""
    from PIL import Image

    if image.mode in WIDE_MODES:
        # PIL's convert() to "L"/"RGB" clips these at 255 instead of scaling: scale to 0..255 here
        arr = np.asarray(image, dtype=np.float32) * (255.0 / WIDE_MODES[image.mode])
        image = Image.fromarray(arr, mode="F").resize((spec.width, spec.height), Image.BILINEAR)
        arr = np.array(image, dtype=np.float32)[..., None]  # a copy: torch warns on the image's read-only view
        arr = np.repeat(arr, spec.channels, axis=2) if spec.channels != 1 else arr
    else:
        image = image.convert("RGB" if spec.channels == 3 else "L").resize((spec.width, spec.height),
                                                                           Image.BILINEAR)
        arr = np.asarray(image, dtype=np.float32)
    x = torch.from_numpy(arr if arr.ndim == 3 else arr[..., None]).permute(2, 0, 1) * spec.scale
    if spec.mean is not None:
        x = (x - torch.tensor(spec.mean).view(-1, 1, 1)) / torch.tensor(spec.std).view(-1, 1, 1)
    return x


def load_images(files: list[Path], spec: InputSpec) -> torch.Tensor:
    """The files as one batch, each prepared per the spec (`image_batches` for a folder of any size)."""
    from PIL import Image, UnidentifiedImageError

    batch = []
    for f in files:
        try:
            with Image.open(f) as im:
                batch.append(preprocess(im, spec))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {f}: {exc}") from None
    return torch.stack(batch)


def image_batches(files: list[Path], spec: InputSpec, batch: int):
    """(files, [B, C, H, W] tensor) per `batch` files, read as they are needed: a folder of any size
    takes one batch of memory."""
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        yield chunk, load_images(chunk, spec)
