"""Dense 2-D convolution engines for one Conv layer, and the per-layer choice among them.

The torch runtime's compile option `extra={"dense_conv": MODE}` selects how dense Conv
layers run (every runtime that compiles through the shared executor and passes its
`extra` on gets the same choice for the layers it leaves dense):

    cudnn        F.conv2d on the activation as it comes (NCHW; PyTorch's own heuristics)
    cudnn_nhwc   F.conv2d on channels-last (NHWC) activations and weights
    im2col       F.unfold (im2col) + cuBLAS: W[Cout, Cin*kh*kw] @ cols[Cin*kh*kw, Ho*Wo] per
                 image (one batched GEMM); a 1x1 stride-1 unpadded conv is the GEMM alone
    im2col_nhwc  a strided view of the padded NHWC activation copied to cols[N*Ho*Wo, kh*kw*Cin],
                 one GEMM for the whole batch, output NHWC; a 1x1 stride-1 conv copies nothing
    best         per layer and input shape, the fastest of the above, measured on the device
                 the first time the layer sees that shape

How `best` decides (measured, not guessed): each candidate runs the layer on the input it
actually receives, *including the conversion of that input to the candidate's layout*
(an NHWC candidate after an NCHW layer pays the transpose), by the one chooser
(runtimes/chooser.py: checked against cuDNN NCHW, then CUDA-graph replays of the layer alone,
interleaved, so launch overhead and clock drift do not decide; eager on CPU). Layers are decided in
network order during the first (warm-up) run, so each sees the layout its predecessors
chose. The cuDNN candidates run with `cudnn.benchmark` on (cuDNN tries its algorithms and
keeps the fastest) unless `extra={"cudnn_benchmark": False}`. Layout costs the greedy
choice cannot see (an Add of an NHWC and an NCHW tensor) are caught one level up: the torch
runtime also captures the network with every conv on cuDNN NCHW and on cuDNN NHWC and keeps
the fastest of the three whole-network graphs (base.Engine's plan step; `engine.plans` says which won).

im2col candidates are skipped when their column buffer would exceed
`extra={"im2col_max_bytes": ...}` (default 2 GiB) and for grouped convolutions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...common.errors import UserError
from ...common.shapes import conv_out_size

MODES = ("cudnn", "cudnn_nhwc", "im2col", "im2col_nhwc")
CHOICES = MODES + ("best",)
DEFAULT_IM2COL_MAX_BYTES = 2 << 30

LABELS = {
    "cudnn": "cuDNN conv, NCHW",
    "cudnn_nhwc": "cuDNN conv, NHWC",
    "im2col": "im2col (F.unfold) + cuBLAS GEMM, NCHW",
    "im2col_nhwc": "im2col (strided NHWC view) + cuBLAS GEMM, NHWC",
}


def check_mode(mode: Any) -> str:
    if mode not in CHOICES:
        raise UserError(f"unknown dense_conv setting {mode!r}; choose one of {', '.join(CHOICES)} "
                        "(e.g. extra={'dense_conv': 'best'})")
    return mode


def shape_key(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


class DenseConv:
    """One 2-D Conv layer with a constant weight, runnable by each dense engine in MODES.

    Callable as the executor step `(x, weight, bias=None) -> y`; the weight argument is
    ignored (the layer keeps its own copies in each engine's layout).
    """

    def __init__(self, name: str, weight: torch.Tensor, stride, dilation, groups: int, pads_for,
                 mode: str, info: dict, options: dict | None = None):
        options = options or {}
        self.name = name
        self.mode = check_mode(mode)
        self.w = weight.contiguous()
        self.cout, cin_g, self.kh, self.kw = weight.shape
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.pads_for = pads_for  # x -> ONNX pads [hb, wb, he, we]
        self.info = info
        self.tune_cudnn = bool(options.get("cudnn_benchmark", mode == "best"))
        self.im2col_max_bytes = int(options.get("im2col_max_bytes", DEFAULT_IM2COL_MAX_BYTES))
        self.reps = int(options.get("choose_reps", 30))
        self.decided: dict[str, str] = dict((options.get("dense_conv_decisions") or {}).get(name, {}))
        self.override: str | None = None  # a whole-network plan being tried forces one mode
        self.last_key: str | None = None
        self._layouts: dict[str, torch.Tensor] = {}
        info["dense_conv"] = mode
        if groups != 1 and mode.startswith("im2col"):  # grouped im2col is not implemented: cuDNN runs it
            self.mode = mode = "cudnn_nhwc" if mode == "im2col_nhwc" else "cudnn"
            info["dense_conv_reason"] = f"grouped conv (groups={groups}): im2col not implemented, {LABELS[mode]}"
        if mode != "best":
            info["kernel"] = LABELS[mode]
        else:
            info["kernel"] = "best dense engine (per layer, chosen at first run)"
            info["choices"] = {}

    # --- weight layouts, built on first use -------------------------------------------------
    def _weight(self, layout: str) -> torch.Tensor:
        if layout not in self._layouts:
            if layout == "nhwc4d":
                t = self.w.contiguous(memory_format=torch.channels_last)
            elif layout == "gemm":  # [Cout, Cin*kh*kw], unfold's column order
                t = self.w.reshape(self.cout, -1).contiguous()
            else:  # "gemm_nhwc_t": [kh*kw*Cin, Cout] as the transposed view of [Cout, kh*kw*Cin]
                t = self.w.permute(0, 2, 3, 1).reshape(self.cout, -1).contiguous().t()
            self._layouts[layout] = t
        return self._layouts[layout]

    # --- the engines ------------------------------------------------------------------------
    def _pads(self, x) -> tuple[int, int, int, int]:
        hb, wb, he, we = self.pads_for(x)
        return hb, wb, he, we

    def _out_hw(self, hp: int, wp: int) -> tuple[int, int]:
        return (conv_out_size(hp, 0, self.kh, self.stride[0], self.dilation[0]),
                conv_out_size(wp, 0, self.kw, self.stride[1], self.dilation[1]))

    def _cudnn(self, x, bias, nhwc: bool):
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        w = self._weight("nhwc4d") if nhwc else self.w
        hb, wb, he, we = self._pads(x)
        saved = torch.backends.cudnn.benchmark
        if self.tune_cudnn:
            torch.backends.cudnn.benchmark = True
        try:
            if (hb, wb) == (he, we):
                return F.conv2d(x, w, bias, self.stride, (hb, wb), self.dilation, self.groups)
            return F.conv2d(F.pad(x, (wb, we, hb, he)), w, bias, self.stride, 0, self.dilation, self.groups)
        finally:
            torch.backends.cudnn.benchmark = saved

    def _gemm_bias(self, a, b, bias):
        """a @ b (+ bias per output channel along rows of the result's channel axis)."""
        return torch.addmm(bias, a, b) if bias is not None else torch.mm(a, b)

    def _im2col(self, x, bias):
        x = x.contiguous()
        n, c, h, w = x.shape
        hb, wb, he, we = self._pads(x)
        pointwise = (self.kh, self.kw) == (1, 1) and self.stride == (1, 1) and not any((hb, wb, he, we))
        if pointwise:
            cols, (ho, wo) = x.reshape(n, c, h * w), (h, w)
        else:
            if (hb, wb) != (he, we):
                x, pad = F.pad(x, (wb, we, hb, he)), (0, 0)
            else:
                pad = (hb, wb)
            ho, wo = self._out_hw(x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1])
            cols = F.unfold(x, (self.kh, self.kw), self.dilation, pad, self.stride)
        wg = self._weight("gemm")
        if n == 1:
            bcol = bias[:, None] if bias is not None else None
            out = self._gemm_bias(wg, cols[0], bcol)
        elif bias is not None:
            out = torch.baddbmm(bias.view(1, -1, 1), wg.expand(n, -1, -1), cols)
        else:
            out = torch.matmul(wg, cols)
        return out.view(n, self.cout, ho, wo)

    def _im2col_nhwc(self, x, bias):
        xh = x.permute(0, 2, 3, 1).contiguous()  # no copy when x is already channels-last
        n, h, w, c = xh.shape
        hb, wb, he, we = self._pads(x)
        if (self.kh, self.kw) == (1, 1) and self.stride == (1, 1) and not any((hb, wb, he, we)):
            cols, (ho, wo) = xh.view(n * h * w, c), (h, w)
        else:
            if any((hb, wb, he, we)):
                xh = F.pad(xh, (0, 0, wb, we, hb, he))
            ho, wo = self._out_hw(xh.shape[1], xh.shape[2])
            sn, sh, sw, sc = xh.stride()
            view = xh.as_strided((n, ho, wo, self.kh, self.kw, c),
                                 (sn, sh * self.stride[0], sw * self.stride[1], sh * self.dilation[0],
                                  sw * self.dilation[1], sc))
            cols = view.reshape(n * ho * wo, self.kh * self.kw * c)
        out = self._gemm_bias(cols, self._weight("gemm_nhwc_t"), bias)
        return out.view(n, ho, wo, self.cout).permute(0, 3, 1, 2)

    def run_mode(self, mode: str, x, bias=None):
        if mode == "cudnn":
            return self._cudnn(x, bias, False)
        if mode == "cudnn_nhwc":
            return self._cudnn(x, bias, True)
        if mode == "im2col":
            return self._im2col(x, bias)
        return self._im2col_nhwc(x, bias)

    # --- the choice -------------------------------------------------------------------------
    def cols_bytes(self, x) -> int:
        hb, wb, he, we = self._pads(x)
        ho, wo = self._out_hw(x.shape[2] + hb + he, x.shape[3] + wb + we)
        return x.shape[0] * ho * wo * x.shape[1] * self.kh * self.kw * x.element_size()

    def candidates(self, x) -> tuple[list[str], dict[str, str]]:
        """Modes that may run this layer on `x`, and why the others may not."""
        skipped = {}
        modes = ["cudnn", "cudnn_nhwc"]
        if self.groups != 1:
            skipped["im2col"] = skipped["im2col_nhwc"] = f"grouped conv (groups={self.groups})"
        elif self.cols_bytes(x) > self.im2col_max_bytes:
            skipped["im2col"] = skipped["im2col_nhwc"] = (
                f"column buffer {self.cols_bytes(x) / 2**30:.1f} GiB > im2col_max_bytes")
        else:
            modes += ["im2col", "im2col_nhwc"]
        return modes, skipped

    def dense_candidates(self, x, bias=None, epilogue=None) -> list:
        """This layer's dense forms as chooser candidates `fn(x, *rest)`, named `dense:<mode>`:
        the same dense baselines every runtime's per-layer choice is measured against.
        `epilogue(y, *rest)` adds what a fused sparse op also does (residual add, ReLU)."""
        from ..chooser import Candidate

        modes, _ = self.candidates(x)
        out = []
        for mode in modes:
            if epilogue is None:
                fn = (lambda t, *rest, m=mode: self.run_mode(m, t, bias))
            else:
                fn = (lambda t, *rest, m=mode: epilogue(self.run_mode(m, t, bias), *rest))
            out.append(Candidate(f"dense:{mode}", fn, dense=True, library="torch", detail={"kernel": LABELS[mode]}))
        return out

    def decide(self, x, bias) -> str:
        """The fastest dense form on this input (the one chooser: checked against cuDNN NCHW,
        timed interleaved in CUDA graphs)."""
        from ..chooser import Chooser

        key = shape_key(x.shape)
        _, skipped = self.candidates(x)
        chooser = Chooser(x.device, x.dtype, tf32=torch.backends.cudnn.allow_tf32 and x.dtype == torch.float32,
                          reps=self.reps)
        decision = chooser.choose(self.name, self.dense_candidates(x, bias), (x,), reference="dense:cudnn")
        chosen = decision.chosen.split(":", 1)[1]
        self.decided[key] = chosen
        times = {name.split(":", 1)[1]: ms for name, ms in decision.times_ms.items()}
        self.info["choices"][key] = {"chosen": chosen, "layer_best": chosen, "ms": times,
                                     **({"skipped": skipped} if skipped else {}),
                                     **({"rejected": decision.rejected} if decision.rejected else {})}
        self.info["kernel"] = LABELS[chosen]
        return chosen

    def set_choice(self, key: str, mode: str, why: str) -> None:
        """Force `mode` for input shape `key` (a whole-network plan won over the per-layer one)."""
        self.decided[key] = mode
        entry = self.info.setdefault("choices", {}).setdefault(key, {})
        entry.update(chosen=mode, why=why)
        self.info["kernel"] = LABELS[mode]

    def __call__(self, x, weight=None, bias=None):
        if self.override is not None:
            return self.run_mode(self.override, x, bias)
        if self.mode != "best":
            return self.run_mode(self.mode, x, bias)
        key = shape_key(x.shape)
        self.last_key = key
        mode = self.decided.get(key)
        if mode is None:
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return self.run_mode("cudnn", x, bias)  # cannot measure inside a capture
            mode = self.decide(x, bias)
        return self.run_mode(mode, x, bias)


def build_dense_conv(ctx, weight, kernel, stride, dilation, groups, mode: str, pads_for) -> DenseConv | None:
    """A DenseConv for this node, or None where only the plain path applies (with the reason)."""
    check_mode(mode)
    if weight is None or weight.dim() != 4 or len(kernel) != 2:
        ctx.info["dense_conv_reason"] = "plain torch conv: weight not constant or conv not 2-D"
        return None
    from ...passes.graph import node_label

    return DenseConv(node_label(ctx.node), weight, stride, dilation, groups, pads_for, mode, ctx.info, ctx.options)
