// Sputnik's SpMM kernel (Gale et al., SC'20; google-research/sputnik, Apache-2.0:
// sputnik/spmm/cuda_spmm.cu.cc with sparse_tile.h, dense_tile.h, compute_utils.h,
// output_tile.h, predicate_utils.h, memory_aligner.h, barrier.h), ported to one NVRTC source.
// Ported from cuda_spmm.cu.cc and sparse_tile.h as published; the other headers' roles
// (DenseTile, ComputeUtils, OutputTile, PredicatesN, MemoryAligner, Barrier) are rebuilt
// from how cuda_spmm.cu.cc uses them.
//
//   Y[m, n] = sum over the non-zeros (m, k) of A: A[m, k] * B[k, n]     (+ bias[m], ReLU)
//
// The design, as Sputnik's:
// * 1-D tiling of the output: a block of W x Y threads owns Y output rows x BX columns; each
//   row belongs to one *subwarp* of W threads (subwarps synchronise among themselves only).
// * Row swizzle: the block's rows come from `row_order` (longest first).
// * Sparse tile: per step, a subwarp stages BK non-zeros of its row in shared memory - the
//   values and the column indices pre-scaled to element offsets of B's rows (col * ldb) -
//   with vector loads of SV values (and SV uint16 indices) per thread.
// * Dense operand straight from global memory: for each staged non-zero every thread loads
//   its BX/W columns of that row of B as DV-wide vectors (__ldg), relying on L1/L2 (no
//   shared-memory staging of B) - all BK x (BX/W) values in flight before the FMAs.
// * ROMA: the row start is rounded down to a multiple of SV so every sparse load is an
//   aligned vector load; the non-zeros before the row start are zeroed in shared memory
//   after the first tile (only when the row has at least one full tile; otherwise the
//   residue path handles it with scalar loads). Rows are never padded.
// * Residue: the last < BK non-zeros are staged with scalar loads into zeroed tiles and
//   computed in groups of four (entries past the row are value 0, offset 0).
// * Epilogue: bias, residual (Conv -> Add -> Relu) and ReLU fused; vector stores (and residual
//   loads) where the output row allows, else scalars.
//
// Differences from the original, and why: one source for fp32 and fp16 (T) instead of the
// half2 "mixed" variants - fp16 values and B, staged values and sums in fp32; column
// indices are uint16 in global memory for both (6 bytes a non-zero at fp32: the engine's
// memory bar) and scaled to int offsets when staged; ReLU is a flag (Sputnik applies it
// whenever a bias is given); the predicate is on B's readable columns `n_load` (the explicit
// im2col below pads its rows) and the store predicate on N, so B needs no padding when N is
// a multiple of DV; a tile whose dense rows exceed 128 registers a thread (the 64-wide fp32
// tile) loads them in parts, which NVRTC otherwise spills. blockIdx.z walks a batch.
//
// Also here, to feed this SpMM for k x k convolutions: an explicit im2col (one thread per four
// output columns), B[(c*kh + r)*kw + s][oy*Wo + ox] with rows padded to ldb with zeros; and,
// for stride-1 convs, four shifted copies of the padded input (shift4) whose rows the
// kernel addresses through per-k offsets (k_offsets) instead of materialising im2col.
#include "csr_common.cuh"

namespace csr {

struct SpmmParams {
  const void* values;               // [nnz + pad] T
  const unsigned short* col_idx;    // [nnz + pad] column of each non-zero
  const int* row_ptr;               // [M + 1]
  const int* row_order;             // [M] rows by length, longest first
  const int* k_offsets;             // [K] element offset of B's row k (shifted conv), or null: k * ldb
  const float* bias;                // [M] or null
  const void* x;                    // B: [K][ldb] per image (T)
  void* y;                          // Y: [M][ldy] per image (T)
  long long x_batch, y_batch;       // element strides between images
  int M, K, N;                      // N: output columns
  int n_load;                       // columns of B that may be read (>= N, a multiple of DV)
  int ldb, ldy;                     // row strides of B and Y in elements
  int relu;
  int vec_store;                    // Y rows (ldy, y_batch, base) aligned for DV-wide stores
  int out_pitch, out_w;             // out_pitch > 0: column n is pixel (n / out_pitch, n % out_pitch),
                                    // stored at row * out_w + col when col < out_w (shifted conv)
  // Residual (Conv -> Add -> Relu): R (T), Y's shape, added before the ReLU; row m, pixel q at
  // m * ldr + q * r_ps (q as Y's pixel, after out_pitch); or null.
  const void* residual;
  long long r_batch;                // element stride between images
  int ldr, r_ps;                    // row and pixel strides in elements
};

template <int N>
struct IndexFrag {
  typedef typename VecBits<2 * N>::type Bits;
  Bits bits;
  __device__ __forceinline__ void load(const unsigned short* p) { bits = __ldg(reinterpret_cast<const Bits*>(p)); }
  __device__ __forceinline__ int get(int i) const { return reinterpret_cast<const unsigned short*>(&bits)[i]; }
};

// Subwarp barrier (Sputnik's Barrier): rows of a block are independent; W < 32 threads of a
// row synchronise with a masked __syncwarp, a warp-wide row with a full one.
template <int W>
__device__ __forceinline__ unsigned subwarp_mask(int ty) {
  if constexpr (W >= 32) {
    return 0xffffffffu;
  } else {
    return ((1u << W) - 1u) << ((ty * W) & 31);
  }
}

// Config (Sputnik's SpmmConfig): Y rows a block, BK non-zeros a step, BX output columns a
// block, W threads a row, SV sparse values a load, DV columns a dense load, MINB blocks an SM
// for the launch bounds (0: no minimum).
template <typename T, int Y, int BK, int BX, int W, int SV, int DV, int MINB>
__global__ void __launch_bounds__(W * Y, MINB) sputnik_spmm(const SpmmParams p) {
  constexpr int kThreadItemsX = BX / W / DV;     // dense vectors per thread and non-zero
  constexpr int kThreadItemsK = BK / W / SV;     // sparse vector loads per thread and tile
  constexpr int kScalarItemsK = BK / W;          // residue: scalar loads per thread
  constexpr int kCols = BX / W;                  // output columns per thread
  // Dense rows in registers at once: the whole tile (Sputnik) unless that exceeds 128 words,
  // which would spill (Sputnik's 64-wide fp32 tile under NVRTC), then the tile in parts.
  constexpr int kFragWords = BK * kCols * (int)sizeof(T) / 4;
  constexpr int kFragK = kFragWords > 128 ? BK * 128 / kFragWords : BK;
  static_assert(BK % kFragK == 0, "tile parts");
  static_assert(BX % (W * DV) == 0 && BK % (W * SV) == 0 && kThreadItemsK >= 1, "bad Sputnik config");
  static_assert(BK % 4 == 0 && SV - 1 < W, "residue groups of 4; the ROMA prefix is masked in one step");
  static_assert(sizeof(T) * DV <= 16 && sizeof(T) * SV <= 16, "vector loads are at most 16 bytes");

  const int ty = threadIdx.x / W, tx = threadIdx.x - (threadIdx.x / W) * W;
  const int slot = (int)blockIdx.x * Y + ty;
  if (slot >= p.M) return;  // the whole subwarp: rows never share a barrier
  const int row = p.row_order[slot];
  const unsigned mask = subwarp_mask<W>(ty);
  const T* values = static_cast<const T*>(p.values);
  const T* dense = static_cast<const T*>(p.x) + (long long)blockIdx.z * p.x_batch;

  // The dense columns of this thread: vector x covers col0 + x*W*DV .. + DV (interleaved so
  // a subwarp's loads of one B row are contiguous).
  const int col0 = (int)blockIdx.y * BX + tx * DV;
  bool pred[kThreadItemsX];
#pragma unroll
  for (int x = 0; x < kThreadItemsX; ++x) pred[x] = col0 + x * W * DV + DV <= p.n_load;

  int row_offset = p.row_ptr[row];
  int nonzeros = p.row_ptr[row + 1] - row_offset;
  // ROMA: align the start for vector loads when there is at least one full tile.
  int values_to_mask = row_offset & (SV - 1);
  if (nonzeros + values_to_mask >= BK) {
    nonzeros += values_to_mask;
    row_offset -= values_to_mask;
  } else {
    values_to_mask = 0;
  }

  __align__(16) __shared__ float values_tile_array[BK * Y];
  __align__(16) __shared__ int offsets_tile_array[BK * Y];
  float* values_tile = values_tile_array + BK * ty;
  int* offsets_tile = offsets_tile_array + BK * ty;

  Frag<T, DV> dense_fragment[kFragK][kThreadItemsX];
#pragma unroll
  for (int k = 0; k < kFragK; ++k)
#pragma unroll
    for (int x = 0; x < kThreadItemsX; ++x) dense_fragment[k][x].zero();  // predicated-off loads stay zero
  float acc[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) acc[i] = 0.f;

  const T* values_ptr = values + row_offset + tx * SV;
  const unsigned short* col_ptr = p.col_idx + row_offset + tx * SV;
  const int ldb = p.ldb;
  const int* __restrict__ k_offsets = p.k_offsets;
  // Column index -> element offset of that row of B (Sputnik scales by the row length).
  auto row_offset_of = [&](int c) { return k_offsets != nullptr ? __ldg(k_offsets + c) : c * ldb; };

  // SparseTile::Load: BK values and pre-scaled offsets of this row into shared memory.
  auto load_sparse = [&]() {
#pragma unroll
    for (int i = 0; i < kThreadItemsK; ++i) {
      Frag<T, SV> v;
      IndexFrag<SV> c;
      v.load(values_ptr + i * W * SV);
      c.load(col_ptr + i * W * SV);
#pragma unroll
      for (int j = 0; j < SV; ++j) {
        values_tile[tx * SV + i * W * SV + j] = v.get(j);
        offsets_tile[tx * SV + i * W * SV + j] = row_offset_of(c.get(j));
      }
    }
    values_ptr += BK;
    col_ptr += BK;
  };
  // DenseTile::Load + ComputeUtils::TileMAC: the tile's dense vectors in flight, then the FMAs
  // (in kFragK-row halves when the whole tile would not fit the registers).
  auto load_dense_and_mac = [&]() {
#pragma unroll
    for (int k0 = 0; k0 < BK; k0 += kFragK) {
#pragma unroll
      for (int k = 0; k < kFragK; ++k) {
        const T* b = dense + offsets_tile[k0 + k] + col0;
#pragma unroll
        for (int x = 0; x < kThreadItemsX; ++x)
          if (pred[x]) dense_fragment[k][x].load(b + x * W * DV);
      }
#pragma unroll
      for (int k = 0; k < kFragK; ++k) {
        const float v = values_tile[k0 + k];
#pragma unroll
        for (int x = 0; x < kThreadItemsX; ++x)
#pragma unroll
          for (int j = 0; j < DV; ++j) acc[x * DV + j] += v * dense_fragment[k][x].get(j);
      }
    }
  };

  if (nonzeros >= BK) {
    load_sparse();
    __syncwarp(mask);
    // MemoryAligner::MaskPrefix: zero the entries before the row start.
    if (tx < values_to_mask) {
      values_tile[tx] = 0.f;
      offsets_tile[tx] = 0;
    }
    __syncwarp(mask);
    load_dense_and_mac();
    nonzeros -= BK;
  }
  for (; nonzeros >= BK; nonzeros -= BK) {
    __syncwarp(mask);
    load_sparse();
    __syncwarp(mask);
    load_dense_and_mac();
  }

  // Residue: zero the tiles, stage the last < BK entries with scalar loads, compute by fours.
  __syncwarp(mask);
#pragma unroll
  for (int i = 0; i < kScalarItemsK; ++i) {
    values_tile[tx + i * W] = 0.f;
    offsets_tile[tx + i * W] = 0;
  }
  __syncwarp(mask);
  {
    const T* vr = values_ptr - tx * SV + tx;
    const unsigned short* cr = col_ptr - tx * SV + tx;
#pragma unroll
    for (int i = 0; i < kScalarItemsK; ++i) {
      if (tx + i * W < nonzeros) {
        values_tile[tx + i * W] = to_float(vr[i * W]);
        offsets_tile[tx + i * W] = row_offset_of((int)cr[i * W]);
      }
    }
  }
  __syncwarp(mask);
  for (int k = 0; k < nonzeros; k += 4) {
    Frag<T, DV> frag[4][kThreadItemsX];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const T* b = dense + offsets_tile[k + u] + col0;
#pragma unroll
      for (int x = 0; x < kThreadItemsX; ++x) {
        frag[u][x].zero();
        if (pred[x]) frag[u][x].load(b + x * W * DV);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float v = values_tile[k + u];
#pragma unroll
      for (int x = 0; x < kThreadItemsX; ++x)
#pragma unroll
        for (int j = 0; j < DV; ++j) acc[x * DV + j] += v * frag[u][x].get(j);
    }
  }

  // OutputTile::Store with the bias (+ residual) (+ ReLU) epilogue.
  const float bias = p.bias != nullptr ? p.bias[row] : 0.f;
  T* out = static_cast<T*>(p.y) + (long long)blockIdx.z * p.y_batch + (long long)row * p.ldy;
  const T* residual = p.residual != nullptr
      ? static_cast<const T*>(p.residual) + (long long)blockIdx.z * p.r_batch + (long long)row * p.ldr : nullptr;
#pragma unroll
  for (int x = 0; x < kThreadItemsX; ++x) {
    const int col = col0 + x * W * DV;
    float add[DV];
#pragma unroll
    for (int j = 0; j < DV; ++j) add[j] = bias;
    if (residual != nullptr) {
      if (p.out_pitch > 0) {  // shifted conv: column n is pixel (n / out_pitch, n % out_pitch)
#pragma unroll
        for (int j = 0; j < DV; ++j) {
          const int n = col + j;
          const int oy = n / p.out_pitch, ox = n - (n / p.out_pitch) * p.out_pitch;
          if (n < p.N && ox < p.out_w) add[j] += to_float(__ldg(residual + (long long)(oy * p.out_w + ox) * p.r_ps));
        }
      } else if (col + DV <= p.N) {
        add_residual<T, DV>(residual + (long long)col * p.r_ps, p.r_ps, add);
      } else {
#pragma unroll
        for (int j = 0; j < DV; ++j)
          if (col + j < p.N) add[j] += to_float(__ldg(residual + (long long)(col + j) * p.r_ps));
      }
    }
    __align__(16) T v[DV];
#pragma unroll
    for (int j = 0; j < DV; ++j) {
      float r = acc[x * DV + j] + add[j];
      if (p.relu) r = fmaxf(r, 0.f);
      v[j] = from_float<T>(r);
    }
    if (p.out_pitch > 0) {  // shifted conv: drop the columns past the image's width
#pragma unroll
      for (int j = 0; j < DV; ++j) {
        const int n = col + j;
        const int oy = n / p.out_pitch, ox = n - (n / p.out_pitch) * p.out_pitch;
        if (n < p.N && ox < p.out_w) out[oy * p.out_w + ox] = v[j];
      }
    } else if (p.vec_store && col + DV <= p.N) {
      typedef typename VecBits<sizeof(T) * DV>::type Bits;
      *reinterpret_cast<Bits*>(out + col) = *reinterpret_cast<const Bits*>(v);
    } else {
#pragma unroll
      for (int j = 0; j < DV; ++j)
        if (col + j < p.N) out[col + j] = v[j];
    }
  }
}

// Explicit im2col for the SpMM above: B[(c*kh + r)*kw + s][n] for output pixel n = oy*Wo + ox,
// zero outside the image and for n in [Ho*Wo, ldb). Params as the conv kernels' (x strides
// x_cs/x_hs/x_ws, B row stride y_cs = ldb, image strides x_batch / y_batch). Four columns a
// thread, one vector store (ldb is a multiple of 4).
template <typename T>
__global__ void __launch_bounds__(256) im2col4(const Params p) {
  const int n0 = 4 * ((int)blockIdx.x * 256 + (int)threadIdx.x);
  if (n0 >= p.y_cs) return;
  const int k = (int)blockIdx.y;
  const int rs = p.kh * p.kw;
  const int c = k / rs, r = (k - c * rs) / p.kw, s = k - c * rs - r * p.kw;
  const T* x = static_cast<const T*>(p.x) + (long long)blockIdx.z * p.x_batch + (long long)c * p.x_cs;
  const int npix = p.Ho * p.Wo;
  __align__(16) T v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = n0 + j;
    const int oy = n / p.Wo, ox = n - (n / p.Wo) * p.Wo;
    const int iy = oy * p.sh - p.ph + r * p.dh, ix = ox * p.sw - p.pw + s * p.dw;
    const bool ok = n < npix && (unsigned)iy < (unsigned)p.H && (unsigned)ix < (unsigned)p.W;
    v[j] = ok ? x[(long long)iy * p.x_hs + (long long)ix * p.x_ws] : from_float<T>(0.f);
  }
  T* dst = static_cast<T*>(p.y) + (long long)blockIdx.z * p.y_batch + (long long)k * p.y_cs + n0;
  typedef typename VecBits<4 * sizeof(T)>::type Bits;
  *reinterpret_cast<Bits*>(dst) = *reinterpret_cast<const Bits*>(v);
}

// Shifted copies for a stride-1 conv without im2col: the zero-padded input xpad [C][Hp][Wp]
// (flattened) written four times, copy j shifted by j elements: copy_j[i] = xpad[i + j]. On
// the output grid n = oy*Wp + ox (ox < Wp; columns ox >= Wo are computed and dropped), B's
// row k = (c, r, s) is xpad[o_k + n] with o_k = c*Hp*Wp + r*dh*Wp + s*dw, i.e. copy
// (o_k % 4) at the 4-aligned offset o_k - o_k % 4: every dense load is an aligned vector
// of up to four elements. Params: x strides as the conv kernels', C, H, W, ph/pw (top/left
// padding), win_h/win_w = Hp/Wp, y_cs = elements per copy, y_batch = 4 * y_cs.
template <typename T>
__global__ void __launch_bounds__(256) shift4(const Params p) {
  const int i = (int)blockIdx.x * 256 + (int)threadIdx.x;
  if (i >= p.y_cs) return;
  const int j = (int)blockIdx.y;
  const int q = i + j;
  const int plane = p.win_h * p.win_w;
  const int c = q / plane;
  const int rem = q - c * plane;
  const int hp = rem / p.win_w, wp = rem - (rem / p.win_w) * p.win_w;
  const int iy = hp - p.ph, ix = wp - p.pw;
  const bool ok = c < p.C && (unsigned)iy < (unsigned)p.H && (unsigned)ix < (unsigned)p.W;
  const T* x = static_cast<const T*>(p.x) + (long long)blockIdx.z * p.x_batch;
  T* dst = static_cast<T*>(p.y) + (long long)blockIdx.z * p.y_batch + (long long)j * p.y_cs + i;
  *dst = ok ? x[(long long)c * p.x_cs + (long long)iy * p.x_hs + (long long)ix * p.x_ws] : from_float<T>(0.f);
}

}  // namespace csr
