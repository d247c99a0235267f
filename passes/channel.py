"""Channel pruning: remove whole filters so the model becomes a smaller dense model.

Unlike 2:4 and unstructured pruning (masks.py), this changes layer shapes, so it works on
the torch module before export; the export of the result is an ordinary, smaller ONNX
file that every runtime runs as is (the way NVIDIA's pruned TrafficCamNet went from
44.3 MB to 5.2 MB). Which channels are coupled (a residual sum, a BatchNorm, the Linear
after a flatten) comes from Torch-Pruning's dependency graph, not from hand-written rules.

Filters are ranked by the L2 norm of their whole coupled group (Torch-Pruning's
GroupMagnitudeImportance), and the model is pruned in rounds until its FLOPs fall to the
target. Layers named in `exclude` keep their output channels (stems, classifiers,
detection heads); their input channels still follow the layers before them.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..common.errors import UserError
from .masks import is_excluded


@dataclass
class ChannelPruneResult:
    module: nn.Module
    counters: Counter = field(default_factory=Counter)
    flops_before: int = 0   # multiply-adds x 2 at the example input's size
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (out channels before, after)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / max(1, self.flops_before)

    def summary(self) -> str:
        return (f"prune_channels: FLOPs {self.flops_before / 1e9:.3f} -> {self.flops_after / 1e9:.3f} G "
                f"({self.flops_ratio:.1%}), params {self.params_before / 1e6:.2f} -> {self.params_after / 1e6:.2f} M, "
                + ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items())))


def _torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise UserError("channel pruning needs Torch-Pruning: pip install 'sparsecnn[prune]' "
                        "(the torch-pruning package)") from None
    return tp


def _out_channels(module: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
            for n, m in module.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def count_flops(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(FLOPs = 2 x multiply-adds, parameters) of one forward pass on `example`, per Torch-Pruning."""
    tp = _torch_pruning()
    was_training = module.training
    module.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, example)
    module.train(was_training)
    return int(2 * macs), int(params)


def prune_channels(module: nn.Module, example: torch.Tensor, flops_reduction: float, exclude=(),
                   round_to: int | None = 8, tolerance: float = 0.03, max_rounds: int = 6) -> ChannelPruneResult:
    """A copy of `module` with whole filters removed until FLOPs are about (1 - flops_reduction) x before.

    `example` is one input batch (its size sets the FLOPs). Rounds stop once FLOPs are
    within `tolerance` (relative) of the target. `round_to` keeps channel counts multiples
    of 8 (tensor-core friendly and 2:4-compatible).
    """
    if not 0.0 < flops_reduction < 1.0 or math.isnan(flops_reduction):
        raise UserError(f"channel pruning takes the fraction of FLOPs to remove, in (0, 1); got {flops_reduction}")
    tp = _torch_pruning()
    model = copy.deepcopy(module).eval()
    example = example.to(next(model.parameters()).device)
    before = _out_channels(model)
    flops0, params0 = count_flops(model, example)
    target = (1.0 - flops_reduction) * flops0
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and is_excluded(f"{n}.weight", exclude)]
    counters: Counter = Counter(ignored_layers=len(ignored))
    flops = flops0
    for _ in range(max_rounds):
        if flops <= target * (1.0 + tolerance):
            break
        # FLOPs of a layer scale with in x out channels, so a ratio r per layer gives ~(1 - r)^2.
        ratio = min(0.9, max(0.02, 1.0 - math.sqrt(target / flops)))
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
        with torch.no_grad():
            pruner.step()
        counters["rounds"] += 1
        new_flops, _ = count_flops(model, example)
        if new_flops >= flops:  # nothing left that may be pruned
            counters["stopped_nothing_prunable"] += 1
            break
        flops = new_flops
    flops1, params1 = count_flops(model, example)
    after = _out_channels(model)
    channels = {n: (before[n], after[n]) for n in before if n in after}
    counters["layers_narrowed"] = sum(1 for b, a in channels.values() if a < b)
    model.train(module.training)
    return ChannelPruneResult(model, counters, flops0, flops1, params0, params1, channels)
