"""CSR over a layer's GEMM view, the weight format of the unstructured sparse runtimes.

A Conv weight W[Cout, Cin, kh, kw] (groups = 1) is the GEMM operand A[M, K] with M = Cout
and K = Cin*kh*kw, column k = (cin*kh + r)*kw + s (PyTorch's flatten order); a Gemm /
MatMul weight is A[out, in]. CSR stores the non-zeros row by row:

    values   [nnz]   the weights (fp32 in the ONNX file)
    col_idx  [nnz]   int32 column of each value
    row_ptr  [M+1]   int32, row i holds values[row_ptr[i]:row_ptr[i+1]]
    row_order[M]     int32, rows sorted by non-zero count, longest first (stable): Sputnik's
                     row swizzle, so blocks that start together get similar work

Empty rows are allowed (row_ptr[i] == row_ptr[i+1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CSR:
    values: torch.Tensor     # [nnz] float
    col_idx: torch.Tensor    # [nnz] int32
    row_ptr: torch.Tensor    # [M+1] int32
    row_order: torch.Tensor  # [M] int32
    shape: tuple[int, int]   # (M, K)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        m, k = self.shape
        return self.nnz / max(1, m * k)

    def row_lengths(self) -> torch.Tensor:
        return (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)

    def row_indices(self) -> torch.Tensor:
        """[nnz] int64: the row of each non-zero (row_ptr expanded), on row_ptr's device."""
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.row_ptr.device), self.row_lengths())

    def to_dense(self) -> torch.Tensor:
        m, k = self.shape
        dense = torch.zeros(m, k, dtype=self.values.dtype)
        dense[self.row_indices(), self.col_idx.long()] = self.values
        return dense

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CSR":
        return CSR(self.values.to(device, dtype or self.values.dtype), self.col_idx.to(device),
                   self.row_ptr.to(device), self.row_order.to(device), self.shape)


def gemm_view(weight: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A conv weight [Cout, Cin, kh, kw] or a matrix [M, K] as the GEMM operand [M, K]."""
    w = torch.as_tensor(weight)
    return w.reshape(w.shape[0], -1)


def csr_from_dense(matrix: torch.Tensor | np.ndarray) -> CSR:
    """CSR of a 2-D matrix's non-zeros, with the longest-row-first order."""
    a = torch.as_tensor(matrix)
    if a.dim() != 2:
        raise ValueError(f"CSR needs a 2-D matrix, got shape {tuple(a.shape)}")
    nz = a != 0
    lengths = nz.sum(dim=1)
    row_ptr = torch.zeros(a.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(lengths, 0)
    rows, cols = torch.nonzero(nz, as_tuple=True)  # row-major order: rows ascending, columns ascending
    order = torch.sort(lengths, descending=True, stable=True).indices
    return CSR(a[rows, cols].contiguous(), cols.to(torch.int32), row_ptr.to(torch.int32),
               order.to(torch.int32), (int(a.shape[0]), int(a.shape[1])))
