"""Activation sparsity: how many inputs of each Conv are exactly zero on real images.

Feature-map-sparse kernels (ECR/PECR) skip those zeros, so this is what decides whether
they pay. `conv_input_sparsity` runs a model through the shared executor and records, per
Conv (or fused sparsecnn conv op) and per image, the fraction of zero input values.

Images come from `load_profile_images`: a Fashion-MNIST folder (the idx .gz files of
Debian's dataset-fashion-mnist), any image folder, or random noise. The Fashion-MNIST reader
here is deliberately minimal; converter/data.py's loader replaces it where present.
"""
from __future__ import annotations

import gzip
import textwrap
import statistics
from pathlib import Path

import numpy as np
import onnx
import torch

from ..common.errors import UserError
from ..models.registry import InputSpec

CONV_OPS = ("Conv", "sparsecnn::EcrConv", "sparsecnn::EcrConvPool")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx_images(path: Path, limit: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        head = f.read(16)
        if len(head) != 16 or int.from_bytes(head[:4], "big") != 0x803:
            raise UserError(f"{path} is not an idx3 image file (bad magic number)")
        n, rows, cols = (int.from_bytes(head[i:i + 4], "big") for i in (4, 8, 12))
        n = min(n, limit)
        data = f.read(n * rows * cols)
    if len(data) != n * rows * cols:
        raise UserError(f"{path} is truncated; reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8).reshape(n, rows, cols)


def _fashion_mnist_file(folder: Path) -> Path | None:
    for name in ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def prepare_gray(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 [N, h, w] grayscale -> [N, C, H, W] the way `spec` wants (resized, replicated, normalised)."""
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    if x.shape[-2:] != (spec.height, spec.width):
        x = torch.nn.functional.interpolate(x, size=(spec.height, spec.width), mode="bilinear", align_corners=False)
    x = x.expand(-1, spec.channels, -1, -1) * spec.scale
    if spec.mean is not None:
        x = (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    return x.contiguous()


def load_profile_images(source: str, spec: InputSpec, limit: int = 64, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(images [N, C, H, W], description) from 'fashion-mnist', a folder, an image file or 'random'."""
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(limit, *spec.shape, generator=g), f"{limit} random normal images"
    folder = Path(FASHION_MNIST_DIR if source == "fashion-mnist" else source)
    idx = _fashion_mnist_file(folder) if folder.is_dir() else (folder if folder.name.endswith("idx3-ubyte.gz") else None)
    if idx is not None:
        raw = _read_idx_images(idx, limit)
        split = "test" if idx.name.startswith("t10k") else "training"
        return prepare_gray(raw, spec), f"{len(raw)} Fashion-MNIST {split} images"
    if source == "fashion-mnist":
        raise UserError(f"Fashion-MNIST not found under {FASHION_MNIST_DIR}; `apt-get install dataset-fashion-mnist` "
                        "or give an image folder")
    from .images import image_files, load_images

    files = image_files(folder)[:limit]
    return load_images(files, spec), f"{len(files)} images from {folder}"


def conv_input_sparsity(model: onnx.ModelProto, images: torch.Tensor, device: str | torch.device = "cpu",
                        batch_size: int = 16) -> list[dict]:
    """Per Conv: the zero fraction of its input, mean and spread over `images` (one value per image)."""
    from ..runtimes.executor import Executor
    from ..runtimes.reference_ops import reference_ops

    ex = Executor(model, device, "fp32", ops=reference_ops())
    per_layer: dict[str, dict] = {}

    def before(step, args):
        if step.op_type not in CONV_OPS:
            return
        x = args[0]
        zeros = (x == 0).reshape(x.shape[0], -1).float().mean(dim=1).tolist()
        row = per_layer.setdefault(step.name, {"node": step.name, "op": step.op_type, "input": step.inputs[0],
                                               "weight": step.inputs[1] if len(step.inputs) > 1 else "",
                                               "input_shape": list(x.shape[1:]), "per_image": []})
        row["per_image"].extend(zeros)

    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(ex.device)
            ex.walk(batch, before=before)
    rows = []
    for row in per_layer.values():
        v = row["per_image"]
        rows.append({**row, "images": len(v), "mean": statistics.fmean(v), "std": statistics.pstdev(v),
                     "min": min(v), "max": max(v)})
    return rows


def format_sparsity_table(rows: list[dict]) -> str:
    head = f"{'conv':<40} {'input shape':<14} {'zeros mean':>10} {'std':>7} {'min':>7} {'max':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r["input_shape"]))
        lines.append(f"{r['node'][-40:]:<40} {shape:<14} {r['mean']:>10.3f} {r['std']:>7.3f} {r['min']:>7.3f} {r['max']:>7.3f}")
    return "\n".join(lines)


def plot_sparsity(rows: list[dict], path: str | Path, title: str) -> Path:
    """One box per Conv: the zero fraction of its input over the images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..common.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2))
    ax.boxplot([[100 * v for v in r["per_image"]] for r in rows], showfliers=False)
    ax.plot(range(1, len(rows) + 1), [100 * r["mean"] for r in rows], "o-", color="tab:red", label="mean")
    ax.set_xticks(range(1, len(rows) + 1))
    ax.set_xticklabels([_short(r["node"]) for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("zero inputs (% of the conv's input values)")
    ax.set_xlabel("conv layer (in network order)")
    ax.set_ylim(0, 100)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=130)
    plt.close(fig)
    return target


def _short(name: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1'; '/features/features.4/Conv' -> 'features.4';
    '/layer2/downsample/downsample.0/Conv' -> 'layer2.downsample.0'."""
    parts = [p for p in name.split("/") if p and p != "Conv"]
    if not parts:
        return name
    label = parts[-1]
    for p in reversed(parts[:-1]):  # one enclosing module that the label does not already name
        if not label.startswith(p):
            return f"{p}.{label}"
    return label
