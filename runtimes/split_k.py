"""Split-K, shared by the kernels' hosts (csr's CUDA-core and tensor-core convs, cusparselt's mma.sp
conv): when a layer's grid is too small for the GPU, K is cut into slices (blockIdx.z) whose blocks
add fp32 partial sums into one buffer.

- `split_wanted(blocks, sms, cap)`: the one rule - slices enough that the grid covers about two
  waves of the SMs; none when it fills them already.
- `split_count(blocks, chunks, sms, cap)`: that rule applied to `chunks` K chunks, evened out.
- `run_split`: the host's side of a launch that may split - a zeroed fp32 buffer, then the ReLU
  (partial sums cannot take it) and the cast.
"""
from __future__ import annotations

from typing import Callable

import torch


def split_wanted(blocks: int, sms: int, cap: int | None = None) -> int:
    """K slices a grid of `blocks` blocks wants: enough for about two waves of `sms` SMs, 1 when it
    fills them already; at most `cap` (at least 1)."""
    want = 1 if blocks >= sms else -(-2 * sms // max(1, blocks))
    return want if cap is None else max(1, min(want, cap))


def even_split(chunks: int, want: int) -> int:
    """Slices of `chunks` K chunks, at most `want`, each ceil(chunks / slices) chunks long
    (no empty slice)."""
    per = -(-chunks // max(1, min(chunks, want)))
    return -(-chunks // per)


def split_count(blocks: int, chunks: int, sms: int, cap: int | None = None) -> int:
    """The split-K rule: how many slices `chunks` K chunks make for a grid of `blocks` blocks on
    `sms` SMs (1: no split). A slice is ceil(chunks / count) chunks."""
    return even_split(chunks, split_wanted(blocks, sms, cap))


def run_split(launch: Callable[[torch.Tensor], None], shape, dtype: torch.dtype, device, split: bool,
              relu: bool) -> torch.Tensor:
    """Allocate the output of `shape` and `launch(y)` into it. Split: y is a zeroed fp32 buffer the
    slices add into; the ReLU and the cast to `dtype` happen here, after the launch."""
    if not split:
        y = torch.empty(shape, dtype=dtype, device=device)
        launch(y)
        return y
    acc = torch.zeros(shape, dtype=torch.float32, device=device)
    launch(acc)
    if relu:
        acc.relu_()
    return acc.to(dtype)


__all__ = ["even_split", "run_split", "split_count", "split_wanted"]
