"""ECR and PECR, the feature-map-sparse formats of Conv_Pool (Xu, Fan, Yu, Fu, arXiv:1909.09927),
generalised from the paper's single-channel harness to real layers, and their reference ops.

A convolution seen as a GEMM reads, for each output position p = (n, oy, ox), one im2col row
of K = Cin*kh*kw input values; column k = (c*kh + i)*kw + j (the order of
`passes.csr.gemm_view`). After a ReLU most of those values are zero.

ECR (per output position; the CSR of the im2col matrix [P, K], P = N*OH*OW):
    values     [nnz]  float  the non-zero inputs of each receptive field, row by row
    kernel_idx [nnz]  int32  their column k, i.e. which weight of every filter they meet
    row_end    [P]    int32  end pointer: row p holds entries [row_end[p-1], row_end[p])
                             (row_end[-1] := 0); an empty window has start == end and its
                             output is the bias alone, written with no multiply.

PECR (per pooling window; the conv windows a max-pool reads, then pooled):
    values, kernel_idx       as in ECR, grouped by pooling window, then by conv window
    counts     [Q, ph*pw] int32  non-zeros of each conv window of each pooling window
                                 (row-major over the pool window); -1 marks a cell outside
                                 the conv output (pool padding, ceil mode): no conv there
    pool_ptr   [Q+1] int64       pooling window q holds entries [pool_ptr[q], pool_ptr[q+1])
    Q = N*QH*QW. The pooled value is max(0, max over cells of conv + bias): the max starts
    at 0, which is the ReLU between the conv and the pool.

Op schemas (domain `sparsecnn`, version 1; also in docs/ops.md):

    EcrConv(X, W, B?) -> Y
        X [N, Cin, H, W] dense feature map (its zeros are skipped), W [Cout, Cin, kh, kw]
        constant, B [Cout] optional. Y [N, Cout, OH, OW] = conv(X, W) + B, then ReLU if
        relu=1. Attributes: kernel_shape [kh, kw], strides [sh, sw], pads [top, left,
        bottom, right] (explicit, ONNX order), relu (int, default 1), input_shape
        [Cin, H, W] and output_shape [Cout, OH, OW] (informational; -1 where unknown).
    EcrConvPool(X, W, B?) -> Y
        max_pool(relu(conv(X, W) + B)). Attributes as EcrConv (relu is always 1) plus
        pool_kernel_shape [ph, pw], pool_strides, pool_pads [top, left, bottom, right],
        pool_ceil_mode (int); output_shape is the pooled [Cout, QH, QW].

Groups and dilations other than 1 are not part of these ops (the fusion pass leaves such
layers dense). The reference builders below run on any device in plain PyTorch; every GPU
kernel is tested against them (DESIGN contract 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..csr.layout import CSR, csr_from_dense
from ..graph import SPARSECNN_DOMAIN
from ..node import NodeContext

ECR_CONV = "EcrConv"
ECR_CONV_POOL = "EcrConvPool"


@dataclass(frozen=True)
class ConvGeometry:
    """One 2-D convolution (groups 1, dilation 1) on an input of known size."""

    n: int
    cin: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right

    @property
    def oh(self) -> int:
        return (self.h + self.pads[0] + self.pads[2] - self.kh) // self.sh + 1

    @property
    def ow(self) -> int:
        return (self.w + self.pads[1] + self.pads[3] - self.kw) // self.sw + 1

    @property
    def k(self) -> int:
        return self.cin * self.kh * self.kw

    @property
    def positions(self) -> int:
        return self.n * self.oh * self.ow


@dataclass(frozen=True)
class PoolGeometry:
    """A max-pool over the conv output (oh x ow); `ceil_mode` as in ONNX / PyTorch."""

    kh: int
    kw: int
    sh: int
    sw: int
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    ceil_mode: bool = False

    def out_size(self, oh: int, ow: int) -> tuple[int, int]:
        return (_pool_len(oh, self.kh, self.sh, self.pads[0], self.pads[2], self.ceil_mode),
                _pool_len(ow, self.kw, self.sw, self.pads[1], self.pads[3], self.ceil_mode))

    @property
    def window(self) -> int:
        return self.kh * self.kw


def max_pool(y: torch.Tensor, pool: PoolGeometry) -> torch.Tensor:
    """The max-pool PECR (and CsrConvPool) fuses, as a torch op (ONNX pads, possibly asymmetric; ceil mode)."""
    t, left, b, r = pool.pads
    if (t, left) != (b, r):
        y, t, left = F.pad(y, (left, r, t, b), value=float("-inf")), 0, 0
    return F.max_pool2d(y, (pool.kh, pool.kw), (pool.sh, pool.sw), (t, left), ceil_mode=pool.ceil_mode)


def _pool_len(n: int, k: int, s: int, p0: int, p1: int, ceil: bool) -> int:
    span = n + p0 + p1 - k
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p0:  # the last window must start inside the input or left pad
        out -= 1
    return out


def im2col(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """[N, Cin, H, W] -> the im2col matrix [N*OH*OW, K], rows in (n, oy, ox) order."""
    top, left, bottom, right = g.pads
    xp = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(xp, (g.kh, g.kw), stride=(g.sh, g.sw))  # [N, K, OH*OW]
    return cols.transpose(1, 2).reshape(-1, g.k)


# --- ECR ------------------------------------------------------------------------------------

@dataclass
class ECR:
    csr: CSR  # rows: output positions (n, oy, ox); columns: kernel index k
    geometry: ConvGeometry

    @property
    def values(self) -> torch.Tensor:
        return self.csr.values

    @property
    def kernel_idx(self) -> torch.Tensor:
        return self.csr.col_idx

    @property
    def row_end(self) -> torch.Tensor:
        return self.csr.row_ptr[1:]

    @property
    def empty(self) -> torch.Tensor:
        """[P] bool: windows with no non-zero input (their output is the bias, no multiply)."""
        return self.csr.row_lengths() == 0

    @property
    def density(self) -> float:
        return self.csr.density


def ecr_encode(x: torch.Tensor, g: ConvGeometry) -> ECR:
    """The compressed im2col rows of feature map `x` for convolution `g`."""
    return ECR(csr_from_dense(im2col(x, g)), g)


def ecr_decode(ecr: ECR) -> torch.Tensor:
    """The dense im2col matrix [P, K] back from its ECR form."""
    return ecr.csr.to_dense()


def _segment_matmul(values: torch.Tensor, kernel_idx: torch.Tensor, lengths: torch.Tensor,
                    wmat: torch.Tensor, rows_out: int, chunk: int = 1 << 20) -> torch.Tensor:
    """out[r] = sum over row r's entries of value * wmat[kernel_idx]  (wmat [K, Cout], fp64-safe)."""
    out = torch.zeros(rows_out, wmat.shape[1], dtype=wmat.dtype, device=wmat.device)
    rows = torch.repeat_interleave(torch.arange(rows_out, device=lengths.device), lengths.clamp_min(0))
    for start in range(0, values.numel(), chunk):  # bounded memory: nnz x Cout products per chunk
        v = values[start:start + chunk].to(wmat.dtype)
        k = kernel_idx[start:start + chunk].long()
        out.index_add_(0, rows[start:start + chunk].to(out.device), v[:, None] * wmat[k])
    return out


def _weight_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [Cout, Cin, kh, kw] -> [K, Cout], the transposed GEMM view the kernels read."""
    return weight.reshape(weight.shape[0], -1).t().to(dtype)


def ecr_conv(ecr: ECR, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
    """Convolution from ECR rows: per row, each stored input times all Cout filters' weight k."""
    g = ecr.geometry
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    out = _segment_matmul(ecr.values, ecr.kernel_idx, ecr.csr.row_lengths(), _weight_matrix(weight, acc_dtype),
                          g.positions)
    if bias is not None:
        out += bias.to(acc_dtype)
    if relu:
        out.clamp_(min=0)
    return out.reshape(g.n, g.oh, g.ow, -1).permute(0, 3, 1, 2).contiguous()


# --- PECR -----------------------------------------------------------------------------------

@dataclass
class PECR:
    values: torch.Tensor      # [nnz]
    kernel_idx: torch.Tensor  # [nnz] int32
    counts: torch.Tensor      # [Q, ph*pw] int32, -1 = no conv window at this cell
    pool_ptr: torch.Tensor    # [Q+1] int64
    geometry: ConvGeometry
    pool: PoolGeometry

    @property
    def out_size(self) -> tuple[int, int]:
        return self.pool.out_size(self.geometry.oh, self.geometry.ow)


def pool_window_positions(g: ConvGeometry, pool: PoolGeometry) -> torch.Tensor:
    """[N*QH*QW, ph*pw] int64: the conv output position (row of the im2col matrix) each cell of
    each pooling window reads, or -1 where the cell falls outside the conv output."""
    qh, qw = pool.out_size(g.oh, g.ow)
    qy = torch.arange(qh).view(qh, 1, 1, 1)
    qx = torch.arange(qw).view(1, qw, 1, 1)
    i = torch.arange(pool.kh).view(1, 1, pool.kh, 1)
    j = torch.arange(pool.kw).view(1, 1, 1, pool.kw)
    cy = qy * pool.sh - pool.pads[0] + i
    cx = qx * pool.sw - pool.pads[1] + j
    valid = (cy >= 0) & (cy < g.oh) & (cx >= 0) & (cx < g.ow)
    pos = (cy * g.ow + cx).expand(qh, qw, pool.kh, pool.kw)
    valid = valid.expand_as(pos)
    per_image = torch.where(valid, pos, torch.full_like(pos, -1)).reshape(1, qh * qw, pool.window)
    offsets = (torch.arange(g.n) * g.oh * g.ow).view(-1, 1, 1)
    out = torch.where(per_image >= 0, per_image + offsets, torch.full_like(per_image, -1))
    return out.reshape(-1, pool.window)


def pecr_encode(x: torch.Tensor, g: ConvGeometry, pool: PoolGeometry) -> PECR:
    """Per pooling window, the compressed rows of its conv windows."""
    cols = im2col(x, g)
    where = pool_window_positions(g, pool).to(cols.device)
    valid = where >= 0
    rows = cols[where.clamp_min(0).reshape(-1)] * valid.reshape(-1, 1)  # invalid cells: empty rows
    csr = csr_from_dense(rows)
    counts = csr.row_lengths().reshape(where.shape).to(torch.int32)
    counts = torch.where(valid, counts, torch.full_like(counts, -1))
    per_window = counts.clamp_min(0).sum(dim=1).to(torch.int64)
    pool_ptr = torch.zeros(where.shape[0] + 1, dtype=torch.int64)
    pool_ptr[1:] = torch.cumsum(per_window.cpu(), 0)
    return PECR(csr.values, csr.col_idx, counts, pool_ptr, g, pool)


def pecr_decode(pecr: PECR) -> tuple[torch.Tensor, torch.Tensor]:
    """([Q, ph*pw, K] dense conv-window rows, [Q, ph*pw] validity) back from PECR."""
    lengths = pecr.counts.clamp_min(0).reshape(-1).to(torch.int64)
    row_ptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(lengths, 0)
    csr = CSR(pecr.values, pecr.kernel_idx, row_ptr.to(torch.int32), torch.zeros(0, dtype=torch.int32),
              (lengths.numel(), pecr.geometry.k))
    return csr.to_dense().reshape(*pecr.counts.shape, -1), pecr.counts >= 0


def pecr_conv_pool(pecr: PECR, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """max(0, max over each pooling window's conv windows of (their ECR product + bias))."""
    g = pecr.geometry
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    q, win = pecr.counts.shape
    conv = _segment_matmul(pecr.values, pecr.kernel_idx, pecr.counts.reshape(-1).to(torch.int64),
                           _weight_matrix(weight, acc_dtype), q * win).reshape(q, win, -1)
    if bias is not None:
        conv += bias.to(acc_dtype)
    conv.masked_fill_(~(pecr.counts >= 0).to(conv.device).unsqueeze(-1), float("-inf"))
    pooled = conv.amax(dim=1).clamp_(min=0)  # the max starts at 0: the ReLU
    qh, qw = pecr.out_size
    return pooled.reshape(g.n, qh, qw, -1).permute(0, 3, 1, 2).contiguous()


# --- geometry from an op's attributes -----------------------------------------------------

def dense_conv_relu_pool(x, w, b, g: ConvGeometry, relu: bool = True, pool: PoolGeometry | None = None):
    """F.conv2d -> relu -> max_pool2d on the dense tensors: the oracle every ECR/PECR encoder,
    reference op and kernel is checked against (no ECR code in it)."""
    y = F.conv2d(F.pad(x, (g.pads[1], g.pads[3], g.pads[0], g.pads[2])), w, b, stride=(g.sh, g.sw))
    if relu or pool:
        y = torch.relu(y)
    if pool:
        t, l, bo, r = pool.pads
        y = F.max_pool2d(F.pad(y, (l, r, t, bo), value=float("-inf")), (pool.kh, pool.kw), (pool.sh, pool.sw),
                         ceil_mode=pool.ceil_mode)
    return y


def conv_geometry(attrs: dict, x_shape) -> ConvGeometry:
    n, c, h, w = (int(v) for v in x_shape)
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", [1, 1])
    pads = tuple(int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
    return ConvGeometry(n, c, h, w, int(kh), int(kw), int(sh), int(sw), pads)


def pool_geometry(attrs: dict) -> PoolGeometry:
    kh, kw = attrs["pool_kernel_shape"]
    sh, sw = attrs.get("pool_strides", [1, 1])
    pads = tuple(int(p) for p in attrs.get("pool_pads", [0, 0, 0, 0]))
    return PoolGeometry(int(kh), int(kw), int(sh), int(sw), pads, bool(attrs.get("pool_ceil_mode", 0)))


# --- reference builders (contract 2) ------------------------------------------------------

def _reference_ecr_conv(ctx: NodeContext):
    attrs = dict(ctx.attrs)
    relu = bool(attrs.get("relu", 1))
    ctx.info.update(kernel="reference EcrConv (PyTorch)", format="ecr")

    def run(x, w, b=None):
        g = conv_geometry(attrs, x.shape)
        y = ecr_conv(ecr_encode(x, g), w, b, relu)
        return y.to(x.dtype)

    return run


def _reference_ecr_conv_pool(ctx: NodeContext):
    attrs = dict(ctx.attrs)
    pool = pool_geometry(attrs)
    ctx.info.update(kernel="reference EcrConvPool (PyTorch)", format="pecr")

    def run(x, w, b=None):
        g = conv_geometry(attrs, x.shape)
        return pecr_conv_pool(pecr_encode(x, g, pool), w, b).to(x.dtype)

    return run


OPS = {
    (SPARSECNN_DOMAIN, ECR_CONV): _reference_ecr_conv,
    (SPARSECNN_DOMAIN, ECR_CONV_POOL): _reference_ecr_conv_pool,
}
