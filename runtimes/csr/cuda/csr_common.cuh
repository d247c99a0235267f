// Shared pieces of the CSR kernels (after Sputnik, Gale et al., SC'20): the parameter block,
// fp16/fp32 conversions, the ROMA walk over a CSR row segment, and cp.async staging.
//
// The kernels also compile as host C++ against tests/cuda_emu.h (SPARSECNN_EMU), which runs
// each CUDA thread as a host thread: the CPU tests execute the very same kernel code.
#pragma once
#ifdef SPARSECNN_EMU
#include "cuda_emu.h"
#define CSR_DYNAMIC_SMEM(name) float* name = emu::dynamic_smem<float>()
#else
#include <cuda_fp16.h>
#define CSR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) float name[]
#endif

namespace csr {

// One parameter block for every CSR kernel (passed by value; mirrored by CsrParams in
// runtimes/csr/kernels.py - keep the two in the same order).
struct Params {
  const void* values;             // [nnz + 4] T, zero-padded: a ROMA group never reads past the end
  const unsigned short* offsets;  // [nnz + 4] per entry: operand offset, pre-scaled for the kernel's layout
  const int* chunk_ptr;           // [M][nchunks + 1]: where each K chunk starts in row m (row_ptr when 1 chunk)
  const int* row_order;           // [M] rows by length, longest first (row swizzle)
  const float* bias;              // [M] or null
  const unsigned char* k_used;    // [row blocks][C]: 1 if a row of the block has an entry in K row c (or null)
  const void* x;                  // input activation / dense operand
  void* y;                        // output (float when accumulate)
  long long x_batch, y_batch;     // element strides between images (batch rows for GEMM)
  int M;                          // rows of the sparse matrix (output channels / features)
  int C, H, W;                    // input channels (K rows of the dense operand), height, width
  int Ho, Wo;                     // output height, width
  int kh, kw, sh, sw, ph, pw, dh, dw;
  int x_cs, x_hs, x_ws;           // input strides in elements
  int y_cs, y_hs, y_ws;           // output strides in elements
  int tile_h, tile_w, tiles_w;    // output tile of one block, tiles per row of tiles
  int win_h, win_w;               // staged input window per channel (row pitch for the GEMM layout)
  int chunk_c;                    // input channels per K chunk
  int nchunks;                    // chunks over all input channels
  int chunks_per_split, nsplit;   // split-K: each blockIdx.z slice takes chunks_per_split chunks
  int batch;                      // images (GEMM: rows of the activation)
  int relu;                       // ReLU in the epilogue
  int accumulate;                 // split-K: atomically add fp32 partial sums (bias and residual from slice 0,
                                  // no ReLU: the host applies it after)
  int vec_stage;                  // dense operand rows are 16-byte aligned: stage with vector copies
  // Residual (Conv -> Add -> Relu): T, the output's shape (any strides), added before the ReLU; or null.
  const void* residual;
  long long r_batch;              // element stride between images
  int r_cs, r_hs, r_ws;           // channel, row, column strides in elements
  const int* blk_ptr;             // staged-sparse plans: [row blocks][nchunks][rows a block + 1] entry starts
  int ss_cap;                     // staged-sparse plans: entries one shared-memory buffer holds (multiple of 8)
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// A vector of BYTES bytes moved as one load/store.
template <int BYTES> struct VecBits;
template <> struct VecBits<2> { typedef unsigned short type; };
template <> struct VecBits<4> { typedef unsigned type; };
template <> struct VecBits<8> { typedef uint2 type; };
template <> struct VecBits<16> { typedef uint4 type; };

// N consecutive elements of T as one vector, unpacked to floats.
template <typename T, int N>
struct Frag {
  typedef typename VecBits<sizeof(T) * N>::type Bits;
  Bits bits;
  __device__ __forceinline__ void load(const T* p) { bits = __ldg(reinterpret_cast<const Bits*>(p)); }
  __device__ __forceinline__ void zero() { bits = Bits(); }
  __device__ __forceinline__ float get(int i) const { return to_float(reinterpret_cast<const T*>(&bits)[i]); }
};

// Add the residual's N elements r[0], r[stride], ... to `out` (fp32 sums of T values): one
// vector load when they are consecutive and aligned for it, else scalar loads.
template <typename T, int N>
__device__ __forceinline__ void add_residual(const T* r, long long stride, float (&out)[N]) {
  if constexpr (N > 1 && sizeof(T) * N <= 16) {
    if (stride == 1 && reinterpret_cast<unsigned long long>(r) % (sizeof(T) * N) == 0) {
      Frag<T, N> f;
      f.load(r);
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] += f.get(j);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] += to_float(__ldg(r + j * stride));
}

__device__ __forceinline__ float half_bits(unsigned bits) { return __half2float(__ushort_as_half((unsigned short)bits)); }

// One vector load: through the read-only cache from global memory, plain from shared memory.
template <bool SHARED, typename V>
__device__ __forceinline__ V vector_load(const void* p) {
  if constexpr (SHARED) {
    return *reinterpret_cast<const V*>(p);
  } else {
    return __ldg(reinterpret_cast<const V*>(p));
  }
}

// Four sparse entries starting at a 4-aligned index: one vector load for the values and one
// for the offsets (the arrays' base pointers are 16-byte aligned); SHARED: from a staged copy.
template <bool SHARED = false>
__device__ __forceinline__ void load_values4(const float* p, float v[4]) {
  const float4 t = vector_load<SHARED, float4>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
template <bool SHARED = false>
__device__ __forceinline__ void load_values4(const __half* p, float v[4]) {
  const uint2 t = vector_load<SHARED, uint2>(p);
  v[0] = half_bits(t.x & 0xffffu); v[1] = half_bits(t.x >> 16);
  v[2] = half_bits(t.y & 0xffffu); v[3] = half_bits(t.y >> 16);
}
template <bool SHARED = false>
__device__ __forceinline__ void load_offsets4(const unsigned short* p, int o[4]) {
  const uint2 t = vector_load<SHARED, uint2>(p);
  o[0] = (int)(t.x & 0xffffu); o[1] = (int)(t.x >> 16); o[2] = (int)(t.y & 0xffffu); o[3] = (int)(t.y >> 16);
}

// Visit the CSR entries [begin, end) of one row (segment) in aligned groups of four.
// Reverse-offset memory alignment (ROMA): the walk starts at begin rounded down to a multiple
// of 4 so every load is an aligned vector load, and masks the entries before `begin` (and
// from `end` on, the residue) instead of padding rows. One group is loaded ahead.
template <typename T, typename Fn>
__device__ __forceinline__ void roma_segment(const T* __restrict__ values, const unsigned short* __restrict__ offsets,
                                             int begin, int end, Fn&& fn) {
  int q = begin & ~3;
  if (q >= end) return;
  float v[4];
  int o[4];
  load_values4(values + q, v);
  load_offsets4(offsets + q, o);
  for (;;) {
    const int next = q + 4;
    const bool more = next < end;
    float vn[4] = {0.f, 0.f, 0.f, 0.f};
    int on[4] = {0, 0, 0, 0};
    if (more) {
      load_values4(values + next, vn);
      load_offsets4(offsets + next, on);
    }
    if (q >= begin && next <= end) {
#pragma unroll
      for (int i = 0; i < 4; ++i) fn(v[i], o[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (q + i >= begin && q + i < end) fn(v[i], o[i]);
    }
    if (!more) break;
    q = next;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = vn[i];
      o[i] = on[i];
    }
  }
}

// ---- staging into shared memory -------------------------------------------------------
// fp32 uses cp.async (sm_80+): copies run in the background while the block computes on the
// other buffer; `valid = false` zero-fills (padding). fp16 converts through registers.
// Before sm_80 (Jetson Nano, TX2, Xavier) and on the CPU emulator, the same copies are plain
// loads and stores, finished when issued: the kernels' __syncthreads after each wait publishes
// them, and a buffer is only written once every thread is done reading it, as cp.async needs.
#if !defined(SPARSECNN_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define CSR_CP_ASYNC 1
#else
#define CSR_CP_ASYNC 0
#endif
__device__ __forceinline__ void stage1(float* dst, const float* src, bool valid) {
#if !CSR_CP_ASYNC
  *dst = valid ? *src : 0.f;
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
#endif
}
__device__ __forceinline__ void stage1(float* dst, const __half* src, bool valid) {
  *dst = valid ? __half2float(*src) : 0.f;
}
// Four consecutive elements, 16-byte aligned source; the first `n` (0..4) are real, the rest zero.
__device__ __forceinline__ void stage4(float* dst, const float* src, int n) {
#if !CSR_CP_ASYNC
  for (int i = 0; i < 4; ++i) dst[i] = i < n ? src[i] : 0.f;
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(4 * n) : "memory");
#endif
}
__device__ __forceinline__ void stage4(float* dst, const __half* src, int n) {
  float4 out;
  if (n == 4) {
    const uint2 t = *reinterpret_cast<const uint2*>(src);
    out.x = half_bits(t.x & 0xffffu); out.y = half_bits(t.x >> 16);
    out.z = half_bits(t.y & 0xffffu); out.w = half_bits(t.y >> 16);
  } else {
    out.x = n > 0 ? __half2float(src[0]) : 0.f;
    out.y = n > 1 ? __half2float(src[1]) : 0.f;
    out.z = n > 2 ? __half2float(src[2]) : 0.f;
    out.w = 0.f;
  }
  *reinterpret_cast<float4*>(dst) = out;
}
// N bytes (8 or 16), both addresses N-aligned: the staged-sparse copies of values and offsets.
template <int N>
__device__ __forceinline__ void stage_bytes(void* dst, const void* src) {
#if !CSR_CP_ASYNC
  if constexpr (N == 16) {
    *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
  } else {
    *static_cast<uint2*>(dst) = *static_cast<const uint2*>(src);
  }
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (N == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(N) : "memory");
  }
#endif
}
__device__ __forceinline__ void stage_commit() {
#if CSR_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most one group (the newest) is still in flight.
__device__ __forceinline__ void stage_wait_all_but_newest() {
#if CSR_CP_ASYNC
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

}  // namespace csr
