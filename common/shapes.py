"""Shape arithmetic every runtime and pass shares (no torch: code generators use it too)."""
from __future__ import annotations


def conv_out_size(size: int, pads: int, kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """Output length of a convolution along one axis (`pads`: both sides together)."""
    return (size + pads - dilation * (kernel - 1) - 1) // stride + 1
