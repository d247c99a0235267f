"""Labelled images for training and accuracy: Fashion-MNIST (offline, Debian) or any ImageFolder.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (four gzipped idx
files under /usr/share/datasets/fashion-mnist) and is read through torchvision's
`FashionMNIST` class, never downloaded: the files are unpacked once into the layout that
class expects (<cache>/FashionMNIST/raw/). Its 28x28 grey images are adapted to a model's
input on the fly (resize, 1 -> 3 channels, normalise), on the GPU when there is one, so a
whole training run keeps the data set in GPU memory and needs no loader workers.

An ImageFolder directory (one sub-folder per class, e.g. an ImageNet validation folder)
is read with torchvision's `ImageFolder` and prepared per image like `sparsecnn run` does.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..common.errors import UserError
from ..common.fileio import atomic_path
from ..models.registry import InputSpec

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "SPARSECNN_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_LABELS = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                        "sneaker", "bag", "ankle boot")
# Pixel statistics of the 60k training images (after scaling to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
# The last 5000 training images are held out for early stopping (the files are already shuffled).
FASHION_MNIST_VAL = 5000

HOW_TO_GET = ("install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist`, set "
              f"{FASHION_MNIST_ENV} to a folder holding its four idx files (.gz or not), or give --data "
              "an ImageFolder directory (one sub-folder of images per class)")


def fashion_mnist_spec(size: int = 32, channels: int = 3) -> InputSpec:
    """The input spec of a model trained on Fashion-MNIST at `size` x `size`."""
    return InputSpec(channels, size, size, scale=1.0 / 255.0, mean=(FASHION_MNIST_MEAN,) * channels,
                     std=(FASHION_MNIST_STD,) * channels, num_classes=10, labels=FASHION_MNIST_LABELS)


def _has_fashion_mnist(folder: Path) -> bool:
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    return folder.is_dir() and all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names)


def find_fashion_mnist(folder: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST idx files, or a UserError saying how to get them."""
    candidates = [Path(folder)] if folder else [Path(p) for p in (os.environ.get(FASHION_MNIST_ENV),) if p]
    candidates += [] if folder else [Path(p) for p in FASHION_MNIST_DIRS]
    for c in candidates:
        if _has_fashion_mnist(c):
            return c
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise UserError(f"Fashion-MNIST not found (looked in {looked}); {HOW_TO_GET}")


def _cache_root() -> Path:
    root = os.environ.get("SPARSECNN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsecnn"
    return Path(root) / "data"


def _idx_files(source: Path) -> dict[str, Path]:
    """Each Fashion-MNIST idx file's name -> the file in `source` (plain preferred over .gz)."""
    return {name: (source / name if (source / name).is_file() else source / f"{name}.gz")
            for pair in FASHION_MNIST_FILES.values() for name in pair}


def _content_key(files: list[Path]) -> str:
    """A hash of the files' bytes: two folders holding the same names (MNIST and Fashion-MNIST)
    must never share a cache entry."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def _torchvision_root(source: Path) -> Path:
    """A folder laid out as torchvision's FashionMNIST expects, unpacked from `source` once,
    cached under the hash of the source files' content."""
    files = _idx_files(source)
    root = _cache_root() / f"idx-{_content_key(list(files.values()))}"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            target = raw / name
            plain, packed = source / name, source / f"{name}.gz"
            if target.is_file():  # the folder's name is the content's hash: present means current
                continue
            with atomic_path(target) as tmp:
                if plain.is_file():
                    shutil.copyfile(plain, tmp)
                else:
                    with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return root


class ImageData:
    """A labelled image set; `batches` yields (model-ready inputs, labels) on a device."""

    name: str = ""
    num_classes: int = 0
    labels: tuple[str, ...] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, spec: InputSpec, batch_size: int, device: torch.device | str = "cpu", *,
                shuffle: bool = False, augment: bool = False, generator: torch.Generator | None = None,
                channels_last: bool = False,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `batch_size` images. `shard` = (rank, world): the global batches of the one-process
        run (same order, same augmentation draws), of which this rank gets its contiguous part
        (`shard_slice`); with world > 1 a last batch smaller than `world` is dropped, so every rank
        takes the same number of steps."""
        raise NotImplementedError

    def subset(self, n: int | None) -> "ImageData":
        raise NotImplementedError

    def shard(self, rank: int, world: int) -> "ImageData":
        """Rank `rank`'s contiguous share of the images out of `world` (for sharded evaluation: the
        shares cover the set once, no padding, no duplicates)."""
        raise NotImplementedError


def shard_slice(n: int, shard: tuple[int, int]) -> slice:
    """Rank's contiguous part of n items split over `world` ranks (parts differ by at most one)."""
    rank, world = shard
    return slice(rank * n // world, (rank + 1) * n // world)


def global_batch_starts(n: int, batch_size: int, world: int) -> range:
    """Start of every global batch; one smaller than `world` ranks is dropped (it cannot feed them all)."""
    last = n - (n % batch_size if n % batch_size else batch_size)
    stop = last if world > 1 and n - last < world else n
    return range(0, stop, batch_size)


@dataclass
class TensorImages(ImageData):
    """Images held as one uint8 tensor [N, C, H, W] (Fashion-MNIST): fast to move to the GPU whole."""

    images: torch.Tensor
    targets: torch.Tensor
    name: str = "tensor images"
    num_classes: int = 10
    labels: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.targets.numel())

    def subset(self, n: int | None) -> "TensorImages":
        """The first `n` images (the Fashion-MNIST files are shuffled, so this is a fair sample)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise UserError(f"a subset needs at least 1 image, got {n}")
        return replace(self, images=self.images[:n], targets=self.targets[:n], name=f"{self.name} (first {n})")

    def slice(self, start: int, stop: int | None, name: str) -> "TensorImages":
        return replace(self, images=self.images[start:stop], targets=self.targets[start:stop], name=name)

    def shard(self, rank: int, world: int) -> "TensorImages":
        part = shard_slice(len(self), (rank, world))
        return self if world == 1 else self.slice(part.start, part.stop, self.name)

    def to(self, device: torch.device | str) -> "TensorImages":
        return replace(self, images=self.images.to(device), targets=self.targets.to(device))

    def batches(self, spec, batch_size, device="cpu", *, shuffle=False, augment=False, generator=None,
                channels_last=False, shard=(0, 1)):
        device = torch.device(device)
        images, targets = self.images.to(device), self.targets.to(device)  # no copy when already there
        n = len(self)
        gdev = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gdev).to(device) if shuffle else None
        for start in global_batch_starts(n, batch_size, shard[1]):
            stop = min(n, start + batch_size)
            part = shard_slice(stop - start, shard)
            idx = order[start:stop] if order is not None else slice(start, stop)
            mine = idx[part] if order is not None else slice(start + part.start, start + part.stop)
            if augment:  # draws for the whole global batch, so every rank's share is the one-process run's
                x = augment_uint8(images[idx], generator)[part]
            else:
                x = images[mine]
            yield prepare(x, spec, channels_last), targets[mine]


def augment_uint8(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill) and a random horizontal flip, per image.

    Works on the raw uint8 batch on its own device, before resizing, so it costs almost nothing.
    Random draws come from `generator` (seeded runs repeat); a generator on the batch's GPU
    keeps the host from waiting on a copy every step.
    """
    n, c, h, w = x.shape
    dev = x.device
    gdev = generator.device if generator is not None else dev
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(dev)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None])[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=dev)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def prepare(x: torch.Tensor, spec: InputSpec, channels_last: bool = False) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> the model's input: scaled, resized (bilinear), channels, normalised."""
    y = x.float() * spec.scale
    if tuple(y.shape[-2:]) != (spec.height, spec.width):
        y = F.interpolate(y, size=(spec.height, spec.width), mode="bilinear", align_corners=False,
                          antialias=y.shape[-2] > spec.height)
    if y.shape[1] != spec.channels:
        if y.shape[1] == 1:
            y = y.expand(-1, spec.channels, -1, -1)
        elif spec.channels == 1:
            y = y.mean(1, keepdim=True)
        else:
            raise UserError(f"images have {y.shape[1]} channels; the model wants {spec.channels}")
    if spec.mean is not None:
        mean, std = _normalisers(tuple(spec.mean), tuple(spec.std), y.device)
        y = (y - mean) / std
    y = y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()
    return y


_NORMALISERS: dict = {}


def _normalisers(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as [1, C, 1, 1] tensors on `device`, made once: a fresh host-to-GPU copy per
    batch would make the host wait for the GPU every step."""
    key = (mean, std, str(device))
    if key not in _NORMALISERS:
        _NORMALISERS[key] = (torch.tensor(mean, device=device).view(1, -1, 1, 1),
                             torch.tensor(std, device=device).view(1, -1, 1, 1))
    return _NORMALISERS[key]


class FolderImages(ImageData):
    """torchvision ImageFolder: one sub-folder per class; images are read and prepared per batch."""

    def __init__(self, root: Path, indices: list[int] | None = None):
        from torchvision.datasets import ImageFolder

        from .images import IMAGE_SUFFIXES

        try:
            self.dataset = ImageFolder(str(root), is_valid_file=lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
        except (FileNotFoundError, OSError) as exc:
            raise UserError(f"{root} is not an ImageFolder directory ({exc}); it needs one sub-folder of "
                            f"images per class. Otherwise {HOW_TO_GET}") from None
        if len(self.dataset.classes) < 2:
            # one class: every label is right, accuracy reads 100 % and training learns nothing
            raise UserError(f"{root} has {len(self.dataset.classes)} class folder(s) "
                            f"({', '.join(self.dataset.classes)}); labelled data needs at least 2, one "
                            "sub-folder of images per class")
        self.root = root
        self.indices = list(range(len(self.dataset))) if indices is None else indices
        self.name = f"ImageFolder {root}"
        self.num_classes = len(self.dataset.classes)
        self.labels = tuple(self.dataset.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, n: int | None) -> "FolderImages":
        """`n` images spread over all classes (every k-th in the sorted listing), not the first class only."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise UserError(f"a subset needs at least 1 image, got {n}")
        step = len(self) / n
        out = FolderImages.__new__(FolderImages)
        out.__dict__.update(self.__dict__)
        out.indices = [self.indices[int(i * step)] for i in range(n)]
        out.name = f"{self.name} ({n} of {len(self)})"
        return out

    def shard(self, rank: int, world: int) -> "FolderImages":
        if world == 1:
            return self
        out = FolderImages.__new__(FolderImages)
        out.__dict__.update(self.__dict__)
        out.indices = self.indices[shard_slice(len(self), (rank, world))]
        return out

    def batches(self, spec, batch_size, device="cpu", *, shuffle=False, augment=False, generator=None,
                channels_last=False, shard=(0, 1)):
        from PIL import Image, UnidentifiedImageError

        from .images import preprocess

        order = self.indices
        if shuffle:
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        for start in global_batch_starts(len(order), batch_size, shard[1]):
            xs, ys = [], []
            batch = order[start:start + batch_size]
            part = shard_slice(len(batch), shard)
            for j, i in enumerate(batch):
                # every rank draws the flips of the whole global batch but reads only its own images
                flip = augment and torch.rand(1, generator=generator).item() < 0.5
                if not part.start <= j < part.stop:
                    continue
                path, target = self.dataset.samples[i]
                try:
                    with Image.open(path) as im:
                        x = preprocess(im, spec)
                except (UnidentifiedImageError, OSError) as exc:
                    raise UserError(f"cannot read image {path}: {exc}") from None
                if flip:
                    x = x.flip(-1)
                xs.append(x)
                ys.append(target)
            x = torch.stack(xs).to(device)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            yield x, torch.tensor(ys, device=device)


def fashion_mnist(split: str, folder: str | os.PathLike | None = None) -> TensorImages:
    """Fashion-MNIST 'train' (first 55000), 'val' (last 5000 of train), 'trainval' or 'test' (10000)."""
    from torchvision.datasets import FashionMNIST

    source = find_fashion_mnist(folder)
    train = split in ("train", "val", "trainval")
    if split not in ("train", "val", "trainval", "test"):
        raise UserError(f"unknown split '{split}'; use train, val, trainval or test")
    try:
        ds = FashionMNIST(str(_torchvision_root(source)), train=train, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        raise UserError(f"Fashion-MNIST files in {source} cannot be read ({type(exc).__name__}: {exc}); "
                        f"reinstall them: {HOW_TO_GET}") from None
    _check_idx(ds.data, ds.targets, source)
    data = TensorImages(ds.data[:, None].contiguous(), ds.targets.long(), name=f"Fashion-MNIST {split}",
                        num_classes=10, labels=FASHION_MNIST_LABELS)
    n = len(data)
    if split == "train":
        return data.slice(0, n - FASHION_MNIST_VAL, "Fashion-MNIST train")
    if split == "val":
        return data.slice(n - FASHION_MNIST_VAL, None, "Fashion-MNIST val")
    return data


def _check_idx(images: torch.Tensor, targets: torch.Tensor, source: Path) -> None:
    """The idx files must agree with each other and with 10 classes: a wrong file gives wrong numbers."""
    if images.dim() != 3 or images.shape[0] != targets.numel() or images.shape[0] == 0:
        raise UserError(f"Fashion-MNIST files in {source} disagree: {tuple(images.shape)} images, "
                        f"{targets.numel()} labels; reinstall them: {HOW_TO_GET}")
    labels = targets.long()
    if int(labels.min()) < 0 or int(labels.max()) >= len(FASHION_MNIST_LABELS):
        raise UserError(f"Fashion-MNIST labels in {source} fall outside 0-{len(FASHION_MNIST_LABELS) - 1}; "
                        f"reinstall them: {HOW_TO_GET}")
    if int(labels.unique().numel()) < 2:
        raise UserError(f"Fashion-MNIST labels in {source} hold a single class; reinstall them: {HOW_TO_GET}")


def _split_folder(root: Path, split: str) -> Path:
    """An ImageFolder root may hold train/ and val/ (or test/) sub-folders; pick the split's."""
    names = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test", "val", "valid", "validation"),
             "trainval": ("train",)}[split]
    for n in names:
        if (root / n).is_dir():
            return root / n
    return root


def load_data(data: str | os.PathLike | None, split: str = "test") -> ImageData:
    """Resolve --data: None or 'fashion-mnist' -> the Debian Fashion-MNIST; a folder of idx files ->
    Fashion-MNIST from there; any other folder -> ImageFolder (its `split` sub-folder if present)."""
    if data is None or str(data).lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return fashion_mnist(split)
    path = Path(data)
    if not path.is_dir():
        raise UserError(f"data folder not found: {path}; {HOW_TO_GET}")
    if _has_fashion_mnist(path):
        return fashion_mnist(split, path)
    if not any(p.is_dir() for p in path.iterdir()):
        raise UserError(f"{path} holds neither the Fashion-MNIST idx files nor class sub-folders; {HOW_TO_GET}")
    return FolderImages(_split_folder(path, split))
