"""Shape arithmetic every runtime and pass shares (no torch: code generators use it too)."""
from __future__ import annotations


def conv_out_size(size: int, pads: int, kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """Output length of a convolution along one axis (`pads`: both sides together)."""
    return (size + pads - dilation * (kernel - 1) - 1) // stride + 1


def same_pads(in_size, kernel, stride, dilation=None, upper: bool = True) -> list[int]:
    """ONNX auto_pad SAME_UPPER / SAME_LOWER as explicit pads [begin..., end...].

    Output length is ceil(n / stride); the total padding needed for it (with the dilated
    kernel extent (k - 1) * d + 1) is split in half, the odd one at the end for SAME_UPPER
    and at the beginning for SAME_LOWER. The one copy every pass and op uses (through
    `explicit_pads` where the attributes are at hand).
    """
    dilation = dilation or [1] * len(kernel)
    begins, ends = [], []
    for n, k, s, d in zip(in_size, kernel, stride, dilation):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def explicit_pads(auto_pad, pads, in_size, kernel, stride, dilation=None) -> list[int] | None:
    """A conv's or pool's ONNX padding as explicit pads [begin..., end...], from its `auto_pad`
    (str or bytes; NOTSET when None) and `pads` attributes; None where SAME padding needs an
    input size that is unknown (`in_size` None, or a dim None or <= 0)."""
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if auto == "NOTSET":
        return [int(p) for p in pads] if pads else [0] * (2 * len(kernel))
    if auto == "VALID":
        return [0] * (2 * len(kernel))
    if in_size is None or any(n is None or n <= 0 for n in in_size):
        return None
    return same_pads(list(in_size), kernel, stride, dilation, upper=auto == "SAME_UPPER")
