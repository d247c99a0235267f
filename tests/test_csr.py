import torch

from sparsecnn.passes.csr.layout import csr_from_dense, gemm_view


def test_csr_roundtrip_with_empty_rows_and_swizzle_order():
    torch.manual_seed(0)
    a = torch.randn(7, 13) * (torch.rand(7, 13) < 0.3)
    a[2] = 0  # an empty row
    a[5] = torch.randn(13)  # a full row
    csr = csr_from_dense(a)
    torch.testing.assert_close(csr.to_dense(), a, rtol=0, atol=0)
    lengths = (a != 0).sum(1)
    assert csr.nnz == int(lengths.sum())
    assert csr.row_order[0].item() == 5 and csr.row_order[-1].item() == 2
    ordered = lengths[csr.row_order.long()]
    assert all(x >= y for x, y in zip(ordered.tolist(), ordered[1:].tolist()))
    assert csr.col_idx.dtype == torch.int32 and csr.row_ptr.dtype == torch.int32


def test_gemm_view_column_order_is_cin_then_kernel_row_then_col():
    w = torch.zeros(2, 3, 2, 2)
    w[1, 2, 1, 0] = 7.0
    csr = csr_from_dense(gemm_view(w))
    assert csr.shape == (2, 12)
    assert csr.col_idx.tolist() == [(2 * 2 + 1) * 2 + 0]
