"""What a pruned model costs in accuracy and what it saves in bytes.

- `predict`: run a model (an Engine from any runtime, or a torch module) over a data set.
- Metrics against labels (top-1, top-5) and, label-free, against the dense model's outputs:
  top-1 agreement and output cosine for classifiers; for detectors such as TrafficCamNet,
  the coverage map: agreement of thresholded cells and mean absolute difference.
- Model sizes: the dense ONNX file, and the compressed form a sparse runtime stores (CSR
  for unstructured, values + 2-bit indices for 2:4; a channel-pruned model is simply a
  smaller dense ONNX file).
"""
from __future__ import annotations

from typing import Callable

import onnx
import torch

from ..models.registry import InputSpec
from .data import ImageData


@torch.no_grad()
def predict(model: Callable, data: ImageData, spec: InputSpec, device: torch.device | str, batch_size: int = 250,
            progress: bool = False, desc: str = "evaluating") -> tuple[list[torch.Tensor], torch.Tensor]:
    """(outputs concatenated over the data set on the CPU, one tensor per model output; labels)."""
    outs: list[list[torch.Tensor]] = []
    labels = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc=desc, unit="img", leave=False, dynamic_ncols=True)
    for x, y in data.batches(spec, batch_size, device):
        res = model(x)
        res = res if isinstance(res, (tuple, list)) else (res,)
        for i, r in enumerate(res):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(r.float().cpu())
        labels.append(y.cpu())
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    return [torch.cat(o) for o in outs], torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of rows whose label is among the k largest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * float((top == labels[:, None]).any(1).float().mean())


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Label-free: how often the top-1 class matches the reference's, and mean per-image output cosine."""
    agree = 100.0 * float((logits.argmax(1) == reference.argmax(1)).float().mean())
    cos = torch.nn.functional.cosine_similarity(logits.flatten(1).double(), reference.flatten(1).double(), dim=1)
    return {"agree_top1": agree, "cosine": float(cos.mean())}


def coverage_agreement(cov: torch.Tensor, reference: torch.Tensor, threshold: float = 0.5) -> dict:
    """Detector coverage maps [N, classes, H, W]: share of cells on the same side of `threshold`
    as the reference's, the same among cells either map marks (what a detector would report),
    and the mean absolute difference of the values."""
    a, b = cov > threshold, reference > threshold
    either = a | b
    return {"cell_agreement": 100.0 * float((a == b).float().mean()),
            "positive_cell_agreement": 100.0 * float((a & b).sum() / either.sum()) if bool(either.any()) else None,
            "mean_abs_diff": float((cov.double() - reference.double()).abs().mean()),
            "cells": int(cov.numel()), "positive_cells_reference": int(b.sum())}


def is_classifier_output(outputs: list[torch.Tensor]) -> bool:
    return len(outputs) == 1 and outputs[0].dim() == 2


def coverage_output(names: list[str], outputs: list[torch.Tensor]) -> int:
    """Index of the coverage map among a detector's outputs: the one named '*cov*', else the first."""
    for i, n in enumerate(names):
        if "cov" in n.lower():
            return i
    return 0


def metrics(outputs: list[torch.Tensor], labels: torch.Tensor | None, reference: list[torch.Tensor] | None,
            output_names: list[str], cov_threshold: float = 0.5) -> dict:
    """All accuracy numbers for one model's outputs; `labels` None when they do not apply."""
    out: dict = {}
    if is_classifier_output(outputs):
        logits = outputs[0]
        if labels is not None:
            out["top1"] = topk_accuracy(logits, labels, 1)
            if logits.shape[1] > 5:
                out["top5"] = topk_accuracy(logits, labels, 5)
        if reference is not None:
            out.update(agreement(logits, reference[0]))
    elif reference is not None:
        i = coverage_output(output_names, outputs)
        out.update(coverage_agreement(outputs[i], reference[i], cov_threshold))
        out["coverage_output"] = output_names[i] if i < len(output_names) else str(i)
        out["cosine"] = float(torch.nn.functional.cosine_similarity(
            outputs[i].flatten(1).double(), reference[i].flatten(1).double(), dim=1).mean())
    return out


# --- sizes ----------------------------------------------------------------------------------

def csr_bytes(rows: int, nnz: int, value_bytes: int = 4, index_bytes: int = 4) -> int:
    """CSR of a GEMM-view weight [rows, K]: values + column indices per non-zero, row pointers."""
    return nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes


def two_four_bytes(params: int, value_bytes: int = 4) -> int:
    """2:4 compressed weight: half the values plus a 2-bit index per kept value (cuSPARSELt's layout)."""
    kept = params // 2
    return kept * value_bytes + (kept * 2 + 7) // 8


def model_sizes(model: onnx.ModelProto, form: str) -> dict:
    """Bytes of the ONNX file and of its compressed form.

    `form`: 'dense' (the file as is), 'csr' (prunable layers as CSR) or '2:4' (prunable
    layers that satisfy 2:4 in compressed 2:4 form). Everything else stays as in the file.
    """
    import numpy as np

    from ..passes.graph import initializer_map, weight_nodes
    from ..passes.masks import is_2to4
    from ..passes.prune import prunable_weights

    onnx_bytes = model.ByteSize()
    inits = initializer_map(model)
    prunable = {w for _, w, _ in prunable_weights(model)}
    compressed, converted = onnx_bytes, 0
    weights = nonzeros = pr_params = pr_nonzeros = 0
    for _, name, axis in weight_nodes(model):
        arr = onnx.numpy_helper.to_array(inits[name])
        nnz = int(np.count_nonzero(arr))
        weights += arr.size
        nonzeros += nnz
        if name not in prunable:
            continue
        pr_params += arr.size
        pr_nonzeros += nnz
        if form == "csr":
            compressed += csr_bytes(arr.shape[0], nnz, arr.itemsize) - arr.nbytes
            converted += 1
        elif form == "2:4" and arr.shape[axis] % 4 == 0 and is_2to4(torch.from_numpy(np.array(arr)), axis):
            compressed += two_four_bytes(arr.size, arr.itemsize) - arr.nbytes
            converted += 1
    return {"onnx_bytes": onnx_bytes, "compressed_bytes": compressed, "compressed_form": form,
            "layers_compressed": converted, "weights": weights, "nonzero_weights": nonzeros,
            "prunable_sparsity": 1.0 - pr_nonzeros / max(1, pr_params)}
