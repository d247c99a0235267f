"""Which weights to zero: the pruning rules, in one place.

The ONNX prune passes and masked fine-tuning both call these on torch tensors, so a model
pruned before or after fine-tuning follows the same rule. `masks_for` is the one entry
point by method name; `module_masks` applies it to a torch module's Conv / Linear weights,
ranking magnitudes as they will be after BatchNorm folding (what the ONNX passes see).
Channel pruning, which removes whole filters instead of zeroing weights, is in channel.py.
"""
from __future__ import annotations

import fnmatch
import math
from collections import Counter

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


def is_2to4(weight: torch.Tensor, axis: int = 1, chunk: int = 1 << 22) -> bool:
    """At most two non-zeros in every group of four along `axis`. Checked `chunk` elements at a time
    along another axis: regrouping copies, and VGG-19's fc6 alone is 392 MiB."""
    if weight.shape[axis] % 4:
        return False
    weight = weight.detach()
    other = next((d for d in range(weight.dim()) if d != axis), None)
    step = weight.shape[other] if other is None else max(1, chunk * weight.shape[other] // max(1, weight.numel()))
    for part in ([weight] if other is None else weight.split(step, dim=other)):
        groups = _channels_last_groups(part, axis)
        if not bool(((groups != 0).sum(-1) <= 2).all()):
            return False
    return True


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0 or math.isnan(sparsity):
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def mask_magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly round(sparsity * numel) entries of smallest magnitude."""
    sparsity = check_sparsity(sparsity)
    n_zero = round(sparsity * weight.numel())
    if n_zero == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    if weight.device.type == "cpu" and weight.numel() > _LEAN_ABOVE:
        return _mask_magnitude_lean(weight.detach(), n_zero)
    flat = weight.detach().abs().flatten().float()
    # Linear-time selection instead of a full sort (VGG-19's 100M-weight layer); entries
    # tied at the threshold are zeroed lowest index first so exactly n_zero are zero.
    threshold = torch.kthvalue(flat, n_zero).values
    keep = flat > threshold
    ties = torch.nonzero(flat == threshold).flatten()
    n_below = int((flat < threshold).sum())
    keep[ties[n_zero - n_below:]] = True
    return keep.view_as(weight)


_LEAN_ABOVE = 1 << 20  # elements: larger CPU weights take the lean path (same mask, a quarter of the memory)
_CHUNK = 1 << 20  # 4 MiB of fp32 magnitudes: larger chunks left 75 MiB of heap behind them (a 64 MiB layer's mask)


def _mask_magnitude_lean(weight: torch.Tensor, n_zero: int) -> torch.Tensor:
    """`mask_magnitude`'s rule for a large CPU weight with one float copy of it at a time, not four
    (kthvalue's copy and indices, the magnitudes, the comparisons): the threshold by an in-place
    partition of the magnitudes, then the mask chunk by chunk, ties at the threshold zeroed lowest
    index first. VGG-19's fc6 (392 MiB) took 1.5 GB more than its own size."""
    mags = weight.abs().flatten().float().numpy()  # the one copy
    mags.partition(n_zero - 1)
    threshold = float(mags[n_zero - 1])
    del mags
    flat = weight.flatten()
    keep = torch.empty(flat.numel(), dtype=torch.bool)
    n_below = 0
    for start in range(0, flat.numel(), _CHUNK):
        n_below += int((flat[start:start + _CHUNK].abs().float() < threshold).sum())
    ties_to_zero = n_zero - n_below
    for start in range(0, flat.numel(), _CHUNK):
        mag = flat[start:start + _CHUNK].abs().float()
        part = mag > threshold
        tied = torch.nonzero(mag == threshold).flatten()
        if ties_to_zero < len(tied):
            part[tied[max(ties_to_zero, 0):]] = True
        ties_to_zero -= len(tied)
        keep[start:start + _CHUNK] = part
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


PRUNE_METHODS = ("2:4", "unstructured")


def masks_for(weights: dict[str, torch.Tensor], method: str, sparsity: float | None = None, scope: str = "layer",
              axes: dict[str, int] | None = None) -> tuple[dict[str, torch.Tensor], Counter]:
    """Keep-masks for `weights` by `method` ('2:4' or 'unstructured'), with counters.

    2:4 runs along each weight's input-channel axis (`axes`, default 1); a layer whose
    input channels are not a multiple of 4 gets no mask and is counted as skipped.
    """
    counters: Counter = Counter()
    if method == "2:4":
        masks = {}
        for name, w in weights.items():
            axis = (axes or {}).get(name, 1)
            if w.shape[axis] % 4:
                counters["skipped_channels_not_multiple_of_4"] += 1
                continue
            masks[name] = mask_2to4(w, axis)
        counters["pruned"] = len(masks)
        return masks, counters
    if method == "unstructured":
        masks = masks_magnitude(weights, sparsity if sparsity is not None else 0.0, scope)
        counters["pruned"] = len(masks)
        return masks, counters
    raise UserError(f"unknown pruning method '{method}'; use one of {', '.join(PRUNE_METHODS)} (or channel)")


def is_excluded(weight: str, patterns, node: str | None = None) -> bool:
    """Whether weight `weight` (or its module, the name without '.weight', or `node`, the name of the ONNX
    node using it) matches a pattern (globs allowed). A file exported elsewhere names its folded weights
    'onnx::Conv_123': its node names ('/features/features.1/conv/Conv', what inspect and warnings show)
    are the names a user can give."""
    module = weight.removesuffix(".weight")
    return any(fnmatch.fnmatchcase(weight, p) or fnmatch.fnmatchcase(module, p) or
               (node is not None and fnmatch.fnmatchcase(node, p)) for p in patterns)


def module_weights(module: torch.nn.Module, exclude=()) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """Prunable weights of a torch module: {'layer1.0.conv1.weight': (parameter, input-channel axis)}.

    Conv and Linear weights, named as export names them in the ONNX file, minus `exclude`
    (module or weight names, globs allowed).
    """
    from torch import nn

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and isinstance(m.weight, nn.Parameter):
            wname = f"{name}.weight"
            if not is_excluded(wname, exclude):
                out[wname] = (m.weight, 1)
    return out


def conv_bn_pairs(module: torch.nn.Module) -> dict[str, str]:
    """{conv module name: batch-norm module name} for every Conv whose only consumer is a BatchNorm.

    The same rule as the ONNX fold_bn pass; found by tracing with torch.fx. A model that
    does not trace gets no pairs (plain magnitudes are ranked then).
    """
    from torch import nn

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # data-dependent control flow and the like: fall back to raw magnitudes
        return {}
    mods = dict(module.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), nn.modules.conv._ConvNd) and len(src.users) == 1):
            pairs[src.target] = node.target
    return pairs


def folded_magnitudes(module: torch.nn.Module, names, pairs: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """|weight| as it will be after BatchNorm folding: scaled per output channel by |gamma| / sqrt(var + eps)."""
    pairs = conv_bn_pairs(module) if pairs is None else pairs
    mods = dict(module.named_modules())
    params = dict(module.named_parameters())
    out = {}
    for name in names:
        w = params[name].detach().abs().float()
        bn_name = pairs.get(name.removesuffix(".weight"))
        bn = mods.get(bn_name) if bn_name else None
        if bn is not None and bn.running_var is not None:
            gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(bn.running_var)
            scale = (gamma / torch.sqrt(bn.running_var.float() + bn.eps)).abs()
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        out[name] = w
    return out


def module_masks(module: torch.nn.Module, method: str, sparsity: float | None = None, scope: str = "layer",
                 exclude=(), fold_bn: bool = True, pairs: dict[str, str] | None = None
                 ) -> tuple[dict[str, torch.Tensor], Counter]:
    """`masks_for` over a torch module's prunable weights (see `module_weights`).

    With `fold_bn`, magnitudes are ranked as the ONNX passes rank them after BatchNorm is
    folded into the Conv, so pruning before or after export picks the same weights.
    """
    weights = module_weights(module, exclude)
    mags = folded_magnitudes(module, weights, pairs) if fold_bn else {k: p.detach() for k, (p, _) in weights.items()}
    return masks_for(mags, method, sparsity, scope, {k: a for k, (_, a) in weights.items()})
