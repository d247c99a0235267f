// Sparse (CSR) x dense products for convolutions and GEMMs, after Sputnik (Gale et al., SC'20).
//
//   Y[m, pixel] = sum over the non-zeros (m, k) of W: W[m, k] * B[k, pixel]
//
// Design (Sputnik's, adapted to batch-1 CNN layers where the dense operand must be reused):
// * 1-D tiling of the output: a block owns one tile of output pixels (the N dimension) for
//   NT/32 warps x RPT output rows; one warp ("subwarp" of 32) per output row, lanes across
//   the tile's pixels.
// * Row swizzle: the block's rows come from `row_order` (longest first), so warps of a block
//   and blocks launched together carry similar work.
// * The dense operand of the tile is staged in shared memory in K chunks (double-buffered,
//   cp.async for fp32) and reused by every row of the block.
//   - VEC = false, implicit im2col: for a conv the chunk is the input *window* of the output
//     tile (chunk_c channels x win_h x win_w, zero outside the image); the non-zero
//     (cin, r, s) of a row reads window[cin][ty*sh + r*dh][tx*sw + s*dw] for its pixels:
//     stride, padding and dilation honoured, im2col never materialised.
//   - VEC = true, plain SpMM (1x1 convs, GEMM sweep): the chunk is chunk_c rows x tile_w
//     columns of B, staged with 16-byte vector copies; each lane owns P consecutive columns
//     and reads them as one vector.
// * Column indices pre-scaled to offsets: `offsets[e]` is entry e's position inside the
//   staged chunk (cin_local*win_h*win_w + r*dh*win_w + s*dw, or k_local*tile_w), computed
//   once at compile time, stored as uint16.
// * ROMA + residue: a row segment is read in aligned vector groups of four entries
//   (csr_common.cuh); pixels past the image edge are computed and masked at the store.
// * Epilogue: bias, residual (Conv -> Add -> Relu) and ReLU fused; or, split over K (blockIdx.z),
//   fp32 atomic accumulation (bias and residual from split 0).
// * SS (staged sparse, Sputnik's SparseTile): the block's non-zeros of the next K chunk are
//   packed at compile time into one contiguous run per (row block, chunk), each row's segment
//   padded to a multiple of four with zero values, and copied into shared memory with cp.async
//   together with the dense chunk, so the multiply loop reads values and offsets there
//   (broadcast loads, latency hidden by the double buffer) instead of from L1/L2 per group.
//
// fp32 and fp16 storage; shared memory and accumulators are fp32 (fp16 operands, fp32 sums).
#include "csr_common.cuh"

namespace csr {

// P consecutive outputs of one row (plus `add`: bias and residual) as one vector store (or one
// vector atomic on sm_90 for split-K); false when the address is not aligned for it (the
// caller stores scalars).
template <typename T, int P>
__device__ __forceinline__ bool store_vector(const Params& p, long long idx, const float (&acc)[P], const float (&add)[P]) {
  if (p.accumulate) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    float* dst = static_cast<float*>(p.y) + idx;
    if (reinterpret_cast<unsigned long long>(dst) % (4 * P) != 0) return false;
    if constexpr (P == 4) {
      atomicAdd(reinterpret_cast<float4*>(dst),
                make_float4(acc[0] + add[0], acc[1] + add[1], acc[2] + add[2], acc[3] + add[3]));
      return true;
    } else if constexpr (P == 2) {
      atomicAdd(reinterpret_cast<float2*>(dst), make_float2(acc[0] + add[0], acc[1] + add[1]));
      return true;
    }
#endif
    return false;
  }
  float v[P];
#pragma unroll
  for (int j = 0; j < P; ++j) v[j] = p.relu ? fmaxf(acc[j] + add[j], 0.f) : acc[j] + add[j];
  T* dst = static_cast<T*>(p.y) + idx;
  if (reinterpret_cast<unsigned long long>(dst) % (sizeof(T) * P) != 0) return false;
  if constexpr (sizeof(T) == 4 && P == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else if constexpr (sizeof(T) == 4 && P == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
  } else if constexpr (sizeof(T) == 2 && P == 4) {
    uint2 w;
    w.x = (unsigned)__half_as_ushort(__float2half_rn(v[0])) | ((unsigned)__half_as_ushort(__float2half_rn(v[1])) << 16);
    w.y = (unsigned)__half_as_ushort(__float2half_rn(v[2])) | ((unsigned)__half_as_ushort(__float2half_rn(v[3])) << 16);
    *reinterpret_cast<uint2*>(dst) = w;
  } else if constexpr (sizeof(T) == 2 && P == 2) {
    *reinterpret_cast<unsigned*>(dst) =
        (unsigned)__half_as_ushort(__float2half_rn(v[0])) | ((unsigned)__half_as_ushort(__float2half_rn(v[1])) << 16);
  } else {
    return false;
  }
  return true;
}

// Output pixel j of a lane: strided across the tile for windows (pixel lane + 32j of the
// tile, row-major), P consecutive columns for VEC. False if it lies outside the tile/image.
template <bool VEC, int P>
__device__ __forceinline__ bool pixel_of(const Params& p, int lane, int j, int ty0, int tx0, int& oy, int& ox) {
  if (VEC) {
    oy = 0;
    ox = tx0 + lane * P + j;
    return ox < p.Wo;
  }
  const int pix = lane + 32 * j;
  const int ty = pix / p.tile_w, tx = pix - ty * p.tile_w;
  oy = ty0 + ty;
  ox = tx0 + tx;
  return pix < p.tile_h * p.tile_w && oy < p.Ho && ox < p.Wo;
}

template <typename T, int P, int NT, bool VEC>
__device__ __forceinline__ void stage_chunk(const Params& p, const T* __restrict__ x, float* __restrict__ buf, int q,
                                            int iy0, int ix0, const unsigned char* __restrict__ k_used) {
  constexpr int kWarps = NT / 32;
  const int c0 = q * p.chunk_c;
  const int cc = min(p.chunk_c, p.C - c0);
  if (VEC) {
    // Rows of the dense operand: chunk rows k = c0 .. c0+cc, columns ix0 .. ix0 + 32*P. Rows no
    // row of this block uses are skipped (never read: at 98% sparsity a quarter of B).
    constexpr int kVecPerRow = 8 * P;  // 4 columns per vector
    for (int i = threadIdx.x; i < cc * kVecPerRow; i += NT) {
      const int cl = i / kVecPerRow;
      const int v = i - cl * kVecPerRow;
      if (k_used != nullptr && !k_used[c0 + cl]) continue;
      const int n = ix0 + 4 * v;
      const T* row = x + (long long)(c0 + cl) * p.x_cs;
      float* dst = buf + cl * (32 * P) + 4 * v;
      if (p.vec_stage) {
        const int live = min(4, max(0, p.W - n));
        stage4(dst, row + (live > 0 ? n : 0), live);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) stage1(dst + j, row + (n + j < p.W ? (long long)(n + j) * p.x_ws : 0), n + j < p.W);
      }
    }
  } else {
    // Window rows (channel, wy): a warp per row, lanes across x. Zero outside the image.
    const int win_hw = p.win_h * p.win_w;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int r = warp; r < cc * p.win_h; r += kWarps) {
      const int cl = r / p.win_h;
      const int wy = r - cl * p.win_h;
      const int iy = iy0 + wy;
      const bool row_ok = (unsigned)iy < (unsigned)p.H;
      const T* src = x + (long long)(c0 + cl) * p.x_cs + (long long)(row_ok ? iy : 0) * p.x_hs;
      float* dst = buf + cl * win_hw + wy * p.win_w;
      for (int wx = lane; wx < p.win_w; wx += 32) {
        const int ix = ix0 + wx;
        const bool ok = row_ok && (unsigned)ix < (unsigned)p.W;
        stage1(dst + wx, src + (ok ? (long long)ix * p.x_ws : 0), ok);
      }
    }
  }
}

// Staged sparse: the (row block, chunk) run of packed entries [bp[0], bp[rows]) into vb / ob.
template <typename T, int NT>
__device__ __forceinline__ void stage_sparse(const Params& p, const int* __restrict__ bp, int rows, T* vb,
                                             unsigned short* ob) {
  const int b0 = bp[0];
  const int groups = (bp[rows] - b0) >> 2;  // segments are padded to multiples of four
  const T* vals = static_cast<const T*>(p.values) + b0;
  const unsigned short* offs = p.offsets + b0;
  for (int g = threadIdx.x; g < groups; g += NT) {
    stage_bytes<4 * sizeof(T)>(vb + 4 * g, vals + 4 * g);
    stage_bytes<8>(ob + 4 * g, offs + 4 * g);
  }
}

// NT threads (8 or 16 warps). The minimum of blocks per SM caps registers so that three
// 256-thread blocks share an SM (the shared-memory budget allows three) unless the
// accumulators (RPT x P) are many enough that the cap would spill; then two.
template <typename T, int P, int RPT, int NT, bool VEC, bool SS = false>
__global__ void __launch_bounds__(NT, NT >= 512 ? 1 : (P * RPT >= 16 ? 2 : 3)) csr_conv(const Params p) {
  constexpr int kWarps = NT / 32;
  constexpr int kRows = kWarps * RPT;
  CSR_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tile_y = (int)blockIdx.y / p.tiles_w;
  const int tile_x = (int)blockIdx.y - tile_y * p.tiles_w;
  const int ty0 = tile_y * p.tile_h, tx0 = tile_x * p.tile_w;
  const int img = (int)blockIdx.z / p.nsplit;
  const int split = (int)blockIdx.z - img * p.nsplit;
  const int q_begin = split * p.chunks_per_split;
  const int q_end = min(p.nchunks, q_begin + p.chunks_per_split);
  const T* x = static_cast<const T*>(p.x) + img * p.x_batch;
  const T* values = static_cast<const T*>(p.values);
  const int buf_floats = VEC ? p.chunk_c * 32 * P : p.chunk_c * p.win_h * p.win_w;

  // This lane's pixels: strided across the tile for windows (consecutive lanes read
  // consecutive shared-memory words; base = byte offset in a channel's window), P
  // consecutive columns for VEC (one vector read; base = column in the tile).
  // (Output coordinates are recomputed in the epilogue: fewer registers live in the main loop.)
  int base[P];
#pragma unroll
  for (int j = 0; j < P; ++j) {
    if (VEC) {
      base[j] = lane * P + j;
    } else {
      int oy, ox;
      const bool live = pixel_of<VEC, P>(p, lane, j, ty0, tx0, oy, ox);
      const int ty = oy - ty0, tx = ox - tx0;
      base[j] = 4 * (live ? ty * p.sh * p.win_w + tx * p.sw : 0);  // bytes: one add per load
    }
  }
  int rows[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int slot = (int)blockIdx.x * kRows + warp + i * kWarps;
    rows[i] = slot < p.M ? p.row_order[slot] : -1;
  }
  float acc[RPT][P];
#pragma unroll
  for (int i = 0; i < RPT; ++i)
#pragma unroll
    for (int j = 0; j < P; ++j) acc[i][j] = 0.f;

  const int iy0 = ty0 * p.sh - p.ph, ix0 = VEC ? tx0 : tx0 * p.sw - p.pw;
  const int nq = q_end - q_begin;
  const unsigned char* k_used = p.k_used != nullptr ? p.k_used + (long long)blockIdx.x * p.C : nullptr;
  // Each row's segment bounds for the current chunk; the next chunk's end is loaded one chunk
  // ahead so its latency hides behind the current chunk's work.
  int seg_begin[RPT], seg_end[RPT];
  // SS: this block's packed runs, [chunk][slot]; segments relative to the chunk's run start.
  const int* bp = SS ? p.blk_ptr + (long long)blockIdx.x * p.nchunks * (kRows + 1) : nullptr;
  const int ss_off = (2 * buf_floats + 3) & ~3;  // 16-byte aligned start of the sparse buffers
  T* ss_vals = reinterpret_cast<T*>(smem + ss_off);
  unsigned short* ss_offs = reinterpret_cast<unsigned short*>(ss_vals + 2 * p.ss_cap);
  // SS: row i's segment of chunk q, relative to the start of the chunk's run
  auto ss_segment = [&](int q, int i, bool live, int& begin, int& end) {  // (0, 0) unless live
    const int* b = bp + (long long)q * (kRows + 1);
    const int slot = warp + i * kWarps;
    begin = live ? b[slot] - b[0] : 0;
    end = live ? b[slot + 1] - b[0] : 0;
  };
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    if (SS) {
      ss_segment(q_begin, i, nq > 0, seg_begin[i], seg_end[i]);
      continue;
    }
    const int* cp = p.chunk_ptr + (long long)(rows[i] < 0 ? 0 : rows[i]) * (p.nchunks + 1);
    seg_begin[i] = (rows[i] >= 0 && nq > 0) ? cp[q_begin] : 0;
    seg_end[i] = (rows[i] >= 0 && nq > 0) ? cp[q_begin + 1] : 0;
  }
  if (nq > 0) {
    stage_chunk<T, P, NT, VEC>(p, x, smem, q_begin, iy0, ix0, k_used);
    if (SS) stage_sparse<T, NT>(p, bp + (long long)q_begin * (kRows + 1), kRows, ss_vals, ss_offs);
  }
  stage_commit();
  for (int t = 0; t < nq; ++t) {
    const int q = q_begin + t;
    const float* cur = smem + (t & 1) * buf_floats;
    int seg_next[RPT], seg_next_begin[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      if (SS) {
        ss_segment(q + 1, i, t + 1 < nq, seg_next_begin[i], seg_next[i]);
      } else {
        seg_next[i] = (rows[i] >= 0 && t + 1 < nq) ? p.chunk_ptr[(long long)rows[i] * (p.nchunks + 1) + q + 2] : 0;
        seg_next_begin[i] = seg_end[i];
      }
    }
    if (t + 1 < nq) {
      stage_chunk<T, P, NT, VEC>(p, x, smem + ((t + 1) & 1) * buf_floats, q + 1, iy0, ix0, k_used);
      if (SS)
        stage_sparse<T, NT>(p, bp + (long long)(q + 1) * (kRows + 1), kRows, ss_vals + ((t + 1) & 1) * p.ss_cap,
                            ss_offs + ((t + 1) & 1) * p.ss_cap);
    }
    stage_commit();
    stage_wait_all_but_newest();
    __syncthreads();
    const T* vb = ss_vals + (t & 1) * p.ss_cap;
    const unsigned short* ob = ss_offs + (t & 1) * p.ss_cap;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      if (rows[i] < 0) continue;
      auto apply = [&](float v, int o) {
        if (VEC) {
          const float* b = cur + o + lane * P;
          if constexpr (P == 4) {
            const float4 b4 = *reinterpret_cast<const float4*>(b);
            acc[i][0] += v * b4.x; acc[i][1] += v * b4.y; acc[i][2] += v * b4.z; acc[i][3] += v * b4.w;
          } else if constexpr (P == 2) {
            const float2 b2 = *reinterpret_cast<const float2*>(b);
            acc[i][0] += v * b2.x; acc[i][1] += v * b2.y;
          } else {
#pragma unroll
            for (int j = 0; j < P; ++j) acc[i][j] += v * b[j];
          }
        } else {
          const char* at = reinterpret_cast<const char*>(cur + o);
#pragma unroll
          for (int j = 0; j < P; ++j) acc[i][j] += v * *reinterpret_cast<const float*>(at + base[j]);
        }
      };
      if (SS) {
        for (int e = seg_begin[i]; e < seg_end[i]; e += 4) {  // padded entries are (0, offset 0)
          float v[4];
          int o[4];
          load_values4<true>(vb + e, v);
          load_offsets4<true>(ob + e, o);
#pragma unroll
          for (int u = 0; u < 4; ++u) apply(v[u], o[u]);
        }
      } else {
        roma_segment(values, p.offsets, seg_begin[i], seg_end[i], apply);
      }
    }
    __syncthreads();  // the buffers just read are staged into two iterations from now
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      seg_begin[i] = seg_next_begin[i];
      seg_end[i] = seg_next[i];
    }
  }

  // Epilogue: bias (+ residual) (+ ReLU) and the store, or fp32 atomic accumulation across K
  // splits (bias and residual added once, by split 0; the host applies the ReLU after).
  int oy[P], ox[P];
  bool live[P];
#pragma unroll
  for (int j = 0; j < P; ++j) live[j] = pixel_of<VEC, P>(p, lane, j, ty0, tx0, oy[j], ox[j]);
  bool all_live = true;
#pragma unroll
  for (int j = 0; j < P; ++j) all_live = all_live && live[j];
  const bool first = !p.accumulate || split == 0;
  const T* residual = first ? static_cast<const T*>(p.residual) : nullptr;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    if (rows[i] < 0) continue;
    const int row = rows[i];
    const float b = (p.bias != nullptr && first) ? p.bias[row] : 0.f;
    // Residual: P consecutive columns (VEC) as one vector load when contiguous and aligned;
    // otherwise read per pixel at the store (fewer registers live than staging them all).
    const T* r = residual != nullptr ? residual + img * p.r_batch + (long long)row * p.r_cs : nullptr;
    const bool res_vec = VEC && all_live && r != nullptr;
    float add[P];
#pragma unroll
    for (int j = 0; j < P; ++j) add[j] = b;
    if (res_vec) add_residual<T, P>(r + (long long)ox[0] * p.r_ws, p.r_ws, add);
    if (VEC && P > 1 && p.y_ws == 1 && all_live) {  // this lane's P consecutive outputs as one vector, when aligned
      const long long idx = img * p.y_batch + (long long)row * p.y_cs + ox[0];
      if (store_vector<T, P>(p, idx, acc[i], add)) continue;
    }
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (!live[j]) continue;
      const long long idx = img * p.y_batch + (long long)row * p.y_cs + (long long)oy[j] * p.y_hs + (long long)ox[j] * p.y_ws;
      float val = acc[i][j] + add[j];
      if (r != nullptr && !res_vec) val += to_float(__ldg(r + (long long)oy[j] * p.r_hs + (long long)ox[j] * p.r_ws));
      if (p.accumulate) {
        atomicAdd(static_cast<float*>(p.y) + idx, val);
      } else {
        if (p.relu) val = fmaxf(val, 0.f);
        static_cast<T*>(p.y)[idx] = from_float<T>(val);
      }
    }
  }
}

}  // namespace csr
