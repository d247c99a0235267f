"""Activation sparsity: how many inputs of each Conv are exactly zero on real images.

Feature-map-sparse kernels (ECR/PECR) skip those zeros, so this is what decides whether
they pay. `conv_input_sparsity` runs a model through the shared executor and records, per
Conv (or fused sparsecnn conv op) and per image, the fraction of zero input values.

Images come from `load_profile_images`: Fashion-MNIST or an ImageFolder through
converter/data.py, a flat folder of images, or random noise.
"""
from __future__ import annotations

import textwrap
import statistics
from pathlib import Path

import onnx
import torch

from ..common.errors import UserError
from ..models.registry import InputSpec
from .figures import save_figure

CONV_OPS = ("Conv", "sparsecnn::EcrConv", "sparsecnn::EcrConvPool")


def load_profile_images(source: str, spec: InputSpec, limit: int = 64, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(images [N, C, H, W] prepared for `spec`, description) from 'fashion-mnist' (its test split),
    a folder converter/data.py reads (Fashion-MNIST idx files, an ImageFolder), a flat folder or
    file of images, or 'random' (normal noise)."""
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(limit, *spec.shape, generator=g), f"{limit} random normal images"
    from .data import load_data

    path = Path(source)
    if source.lower() in ("fashion-mnist", "fashion_mnist", "fmnist") or path.is_dir():
        try:
            data = load_data(source, "test").subset(limit)
        except UserError:
            if not path.is_dir():
                raise
            data = None  # a flat folder of images: read below
        if data is not None:
            x = torch.cat([b for b, _ in data.batches(spec, max(1, limit))])[:limit]
            return x, f"{x.shape[0]} images of {data.name}"
    from .images import image_files, load_images

    files = image_files(path)[:limit]
    return load_images(files, spec), f"{len(files)} images from {path}"


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
    return save_figure(fig, path, dpi=130)


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
