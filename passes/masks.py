"""Which weights to zero: the pruning rules, in one place.

The ONNX prune passes and masked fine-tuning both call these on torch tensors, so a model
pruned before or after fine-tuning follows the same rule.
"""
from __future__ import annotations

import math

import torch

from ..common.errors import UserError


def _channels_last_groups(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """View `weight` as [..., groups of 4 along `axis`] with the 4 in the last dimension."""
    moved = weight.movedim(axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)


def mask_2to4(weight: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Keep the two largest |w| in every 4 consecutive entries along `axis` (input channels).

    For a conv weight [Cout, Cin, kh, kw] that is TensorRT's rule: for each output channel
    and kernel position, two of every four consecutive input channels are zero.
    """
    if weight.shape[axis] % 4:
        raise ValueError(f"2:4 needs the input-channel axis to be a multiple of 4, got {weight.shape[axis]}")
    groups = _channels_last_groups(weight.detach().abs().float(), axis)
    # Stable sort keeps the lower index on ties, so the mask is deterministic.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    moved_shape = list(weight.movedim(axis, -1).shape)
    return keep.reshape(moved_shape).movedim(-1, axis)


def is_2to4(weight: torch.Tensor, axis: int = 1) -> bool:
    """At most two non-zeros in every group of four along `axis`."""
    if weight.shape[axis] % 4:
        return False
    groups = _channels_last_groups(weight.detach(), axis)
    return bool(((groups != 0).sum(-1) <= 2).all())


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0 or math.isnan(sparsity):
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def mask_magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) entries of smallest magnitude."""
    sparsity = check_sparsity(sparsity)
    n_zero = round(sparsity * weight.numel())
    flat = weight.detach().abs().flatten().float()
    if n_zero == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    # Linear-time selection instead of a full sort (VGG-19's 100M-weight layer); entries
    # tied at the threshold are zeroed lowest index first so exactly n_zero are zero.
    threshold = torch.kthvalue(flat, n_zero).values
    keep = flat > threshold
    ties = torch.nonzero(flat == threshold).flatten()
    n_below = int((flat < threshold).sum())
    keep[ties[n_zero - n_below:]] = True
    return keep.view_as(weight)


def masks_magnitude(weights: dict[str, torch.Tensor], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Magnitude masks reaching `sparsity` per layer, or over all given layers together."""
    sparsity = check_sparsity(sparsity)
    if scope == "layer":
        return {k: mask_magnitude(w, sparsity) for k, w in weights.items()}
    if scope != "global":
        raise UserError(f"pruning scope must be 'layer' or 'global', got '{scope}'")
    if not weights:
        return {}
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    keep = mask_magnitude(flat, sparsity)
    out, start = {}, 0
    for k, w in weights.items():
        out[k] = keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return out


def cubic_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule: s_t = s_f + (s_i - s_f)(1 - t/T)^3, clamped at T."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return final + (initial - final) * (1.0 - t) ** 3
