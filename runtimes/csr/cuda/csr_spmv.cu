// Sparse (CSR) weight x a few activation rows: fully connected layers at small batch.
//
//   Y[b, m] = sum over the non-zeros (m, k): W[m, k] * X[b, k]     (b < NB per block row)
//
// One warp per output row (row swizzle: `row_order`, longest first); the lanes stride over
// the row's aligned groups of four entries (ROMA: the first group starts at row_ptr rounded
// down to a multiple of 4, entries outside the row are masked), one vector load each for
// values and column indices, a warp-shuffle reduction, bias, residual and ReLU fused. Streams
// values + uint16 columns once: bound by memory bandwidth, as a batch-1 FC layer must be.
// `chunk_ptr` is the row pointer here (one chunk); `offsets` are plain column indices.
#include "csr_common.cuh"

namespace csr {

template <typename T, int NB>
__global__ void __launch_bounds__(256) csr_spmv(const Params p) {
  const int lane = threadIdx.x & 31;
  const int slot = (int)blockIdx.x * 8 + (threadIdx.x >> 5);
  const bool active = slot < p.M;  // no early return: every lane takes part in the shuffles
  const int row = active ? p.row_order[slot] : 0;
  const int begin = active ? p.chunk_ptr[row] : 0;
  const int end = active ? p.chunk_ptr[row + 1] : 0;
  const int b0 = (int)blockIdx.y * NB;
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;

#pragma unroll 2
  for (int q = (begin & ~3) + 4 * lane; q < end; q += 128) {
    float v[4];
    int k[4];
    load_values4(values + q, v);
    load_offsets4(p.offsets + q, k);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (q + i < begin || q + i >= end) continue;
#pragma unroll
      for (int b = 0; b < NB; ++b)
        if (b0 + b < p.batch) acc[b] += v[i] * to_float(__ldg(x + (long long)(b0 + b) * p.x_batch + k[i]));
    }
  }
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], s);

  if (active && lane == 0) {
    const float bias = p.bias != nullptr ? p.bias[row] : 0.f;
    const T* residual = static_cast<const T*>(p.residual);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      if (b0 + b >= p.batch) continue;
      float val = acc[b] + bias;
      if (residual != nullptr) val += to_float(__ldg(residual + (long long)(b0 + b) * p.r_batch + (long long)row * p.r_cs));
      if (p.relu) val = fmaxf(val, 0.f);
      static_cast<T*>(p.y)[(long long)(b0 + b) * p.y_batch + (long long)row * p.y_cs] = from_float<T>(val);
    }
  }
}

}  // namespace csr
