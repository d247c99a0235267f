// ECR convolution and PECR convolution + max-pooling on the dense feature map (Conv_Pool,
// Xu et al., arXiv:1909.09927), generalised to real layers: all input channels, all filters,
// batch, strides, asymmetric pads, any max-pool (kernel, stride, pads, ceil mode).
//
// Three kernels share the tiles, the K chunks, split-K and the epilogue (ecr_finish):
// ecr_conv_pool (below: "warp" variants), ecr_list_conv_pool ("list" variants, which write each
// compressed row to shared memory and then multiply without ballots or shuffles, prefetching the
// next chunk's input) and ecr_row_conv_pool (end of the file: "row" variants, 3x3 kernels at
// stride 1 along x: per input row a bit-mask of its non-zeros, the weights in registers; each
// position's ECR row is taken input by input). The compile-time timing of the runtime picks, per
// layer, whichever variant is fastest on the layer's real input.
//
// One block owns a tile of (pooled) outputs of one image and CT = 32*VEC output channels;
// gridDim.z splits the K = Cin*kh*kw reduction (split-K) when the layer has too few tiles to
// fill the GPU. The block walks K in chunks of `cc` input channels (kc = cc*kh*kw entries):
//   1. cp.async brings the chunk's weights W^T[k][c0..c0+CT) into shared memory (double
//      buffered: the next chunk streams in while this one is used), plain loads bring the
//      chunk's input patch (the receptive fields of the tile, zero-padded at the borders);
//   2. for each conv position of the tile, its warp builds the chunk's compressed im2col row
//      (ECR) on the fly: each lane reads one window entry, a ballot keeps the non-zeros,
//      their kernel index is k = (c*kh + i)*kw + j (never the harness's i*j+i);
//   3. the warp applies all CT filters to that compressed row: every non-zero is broadcast
//      to the 32 lanes, each lane multiplies it with VEC consecutive weights of row k
//      (coalesced, W was transposed to [K, Cout] at compile time) and accumulates in fp32
//      registers. Empty windows cost no multiply; their output is the bias alone.
// Accumulators live in registers, owned by exactly one thread each (no shared counters to
// race on); the output is written, never accumulated into. The one buffer that is
// accumulated into, the split-K workspace, starts zeroed and every launch leaves it zeroed.
// Epilogue: bias, then for ECR the optional ReLU and the conv output; for PECR every pooled
// output is the max over its conv window starting at 0 (which is the ReLU), and only the
// pooled value reaches global memory. With split-K each block adds its partial sums into the
// tile's fp32 workspace slot (atomics: the sum order, and so the last bits, vary run to run);
// the last block of a tile (atomic ticket) reads the total, zeroes the slot, runs the
// epilogue and resets the ticket, so workspace and tickets are zero again for the next launch.
// The kernels also compile as host C++ against tests/cuda_emu.h (SPARSECNN_EMU): the tests run
// them on the CPU, thread by thread (cp.async becomes a plain copy there).
#ifdef SPARSECNN_EMU
#include "cuda_emu.h"
#define ECR_DYNAMIC_SMEM(name) float4* name = emu::dynamic_smem<float4>()
#else
#include <cuda_fp16.h>
#define ECR_DYNAMIC_SMEM(name) extern __shared__ float4 name[]
#endif

struct EcrParams {
  int n_img, cin, h, w;
  int cout, cout_pad;             // cout_pad: row length of wt and bias (multiple of CT)
  int kh, kw, sh, sw, pad_t, pad_l;
  int oh, ow;                     // conv output size
  int pkh, pkw, psh, psw, ppad_t, ppad_l;  // max-pool (1,1,1,1,0,0 without a pool)
  int qh, qw;                     // output size (pooled, or = oh, ow)
  int tqy, tqx;                   // outputs per tile
  int cry, crx;                   // conv positions per tile: (tqy-1)*psh + pkh, ...
  int patch_h, patch_w;           // input rows/cols per tile: (cry-1)*sh + kh, ...
  int tiles_y, tiles_x;
  int cc, kc, chunks;             // channels per chunk, kc = cc*kh*kw, chunks = ceil(cin/cc)
  int chunks_per_split, splits;
  int relu, pool;
};

// Blocks per SM asked of ptxas (register budget) for ecr_conv_pool: 3 (<= 85 registers), and for
// 16 positions per warp (and the 8-warp row kernels) 2 (<= 128) where that compiles without spills
// (sm_90), else 1.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ECR_WIDE_MIN_BLOCKS 2
#else
#define ECR_WIDE_MIN_BLOCKS 1
#endif

template <typename T> __device__ __forceinline__ float load_act(const T* p);
template <> __device__ __forceinline__ float load_act<float>(const float* p) { return __ldg(p); }
template <> __device__ __forceinline__ float load_act<__half>(const __half* p) { return __half2float(__ldg(p)); }
template <typename T> __device__ __forceinline__ void store_act(T* p, float v);
template <> __device__ __forceinline__ void store_act<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void store_act<__half>(__half* p, float v) { *p = __float2half_rn(v); }

// cp.async needs sm_80. Before it (Jetson Nano, TX2, Xavier) and on the CPU emulator the copies are
// plain loads and stores, finished when issued: the __syncthreads after each wait publishes them,
// and a buffer is only overwritten after the barrier that ends its readers, as cp.async needs too.
#if defined(SPARSECNN_EMU) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 800
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
}
__device__ __forceinline__ void cp_async4_zfill(void* smem, const void* gmem, bool read) {
  *static_cast<float*>(smem) = read ? *static_cast<const float*>(gmem) : 0.f;
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N> __device__ __forceinline__ void cp_async_wait() {}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
// 4 bytes, or 4 zero bytes when !read (the source is not read then, so it may point anywhere)
__device__ __forceinline__ void cp_async4_zfill(void* smem, const void* gmem, bool read) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(read ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

template <int VEC> struct Row;
template <> struct Row<2> {
  float v[2];
  __device__ __forceinline__ void load(const float* p) { float2 t = *reinterpret_cast<const float2*>(p); v[0] = t.x; v[1] = t.y; }
};
template <> struct Row<4> {
  float v[4];
  __device__ __forceinline__ void load(const float* p) {
    float4 t = *reinterpret_cast<const float4*>(p); v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
  }
};

template <> struct Row<8> {
  float v[8];
  __device__ __forceinline__ void load(const float* p) {
    float4 t = *reinterpret_cast<const float4*>(p), u = *reinterpret_cast<const float4*>(p + 4);
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w; v[4] = u.x; v[5] = u.y; v[6] = u.z; v[7] = u.w;
  }
};

// split-K: vector atomics (one RED per 2 or 4 floats) where the GPU has them (sm_90)
template <int VEC> __device__ __forceinline__ void red_add_vec(float* p, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(v[0], v[1]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; j += 4)
      atomicAdd(reinterpret_cast<float4*>(p + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
  }
#else
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(p + j, v[j]);
#endif
}
template <int VEC> __device__ __forceinline__ void load_vec_cg(float* acc, const float* p) {
  if (VEC == 2) {
    float2 t = __ldcg(reinterpret_cast<const float2*>(p)); acc[0] = t.x; acc[1] = t.y;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      float4 t = __ldcg(reinterpret_cast<const float4*>(p + j));
      acc[j] = t.x; acc[j + 1] = t.y; acc[j + 2] = t.z; acc[j + 3] = t.w;
    }
  }
}
template <int VEC> __device__ __forceinline__ void store_vec_cg(float* p, const float* v) {
  if (VEC == 2) {
    __stcg(reinterpret_cast<float2*>(p), make_float2(v[0], v[1]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) __stcg(reinterpret_cast<float4*>(p + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
  }
}

// cp.async of K chunk ch's weights W^T[ch*kc .. +kc)[c0 .. c0+CT) into dst [kc][CT] (all kernels)
template <int CT, int THREADS>
__device__ __forceinline__ void load_weight_chunk(float* dst, const float* __restrict__ wt, const int ch, const int kc,
                                                  const EcrParams& p, const int c0, const int tid) {
  constexpr int PIECES = CT / 4;              // 16-byte pieces of a row
  constexpr int ROW_STEP = THREADS / PIECES;  // rows a pass of the block covers
  static_assert(THREADS % PIECES == 0, "each thread keeps one column of pieces");
  // each thread copies one column of pieces, walking down the rows with running pointers
  const int row0 = tid / PIECES, col = (tid - row0 * PIECES) * 4;
  const float* src = wt + (static_cast<size_t>(ch) * kc + row0) * p.cout_pad + c0 + col;
  const size_t src_step = static_cast<size_t>(ROW_STEP) * p.cout_pad;
  float* d = dst + row0 * CT + col;
  for (int row = row0; row < kc; row += ROW_STEP, src += src_step, d += ROW_STEP * CT) cp_async16(d, src);
}

// Shared memory (floats): W chunk buffers 2 x [kc][CT], patch [cc][patch_h][patch_w], entry
// offsets [kc] and window bases [RMAX] (ints), then (GROUP = 4, 16-byte aligned) WARPS x 32
// float4 segment buffers; the epilogue reuses the front as a [CT][RMAX+1] staging tile.
// The conv position (index in the tile's region) of slot s of a warp: groups of GROUP
// consecutive positions, group g of the block owned by warp g % WARPS (GROUP = 1: the slots
// of a warp are WARPS positions apart).
template <int WARPS, int GROUP>
__device__ __forceinline__ int slot_pos(int s, int warp) {
  return ((s / GROUP) * WARPS + warp) * GROUP + (s % GROUP);
}

// The end of a block, shared by the kernels: split-K reduction (if any), bias, ReLU/max-pool,
// stores. acc[s] holds the sums of slot s (conv position slot_of(s, warp) of the tile), valid bit s says
// the position is a real conv output. Callers have synchronised the block after their last
// use of shared memory, which the epilogue reuses as its staging tile.
template <int WARPS, int GROUP> struct GroupSlots {
  __device__ __forceinline__ int operator()(int s, int warp) const { return slot_pos<WARPS, GROUP>(s, warp); }
};
template <typename T, int VEC, int PPW, int WARPS, typename Slots>
__device__ __forceinline__ void ecr_finish(float (&acc)[PPW][VEC], const unsigned valid, const Slots& slot_of, float* smem,
                                           const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                                           int* __restrict__ tickets, const EcrParams& p, int* s_last, const int img,
                                           const int c0, const int ry0, const int rx0, const int qy0, const int qx0,
                                           const int R) {
  constexpr int CT = 32 * VEC;
  constexpr int RMAX = PPW * WARPS;
  constexpr int THREADS = WARPS * 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  if (p.splits > 1) {
    // every split adds its partial sums into the tile's fp32 slot; the last one to arrive
    // (atomic ticket) reads the total, puts the slot back to zero and runs the epilogue
    float* slot = ws + (static_cast<size_t>(blockIdx.x) * gridDim.y + blockIdx.y) * (RMAX * CT);
#pragma unroll
    for (int s = 0; s < PPW; ++s)
      if ((valid >> s) & 1u) red_add_vec<VEC>(slot + slot_of(s, warp) * CT + lane * VEC, acc[s]);
    __threadfence();
    __syncthreads();
    int* ticket = tickets + blockIdx.x * gridDim.y + blockIdx.y;
    if (tid == 0) *s_last = atomicAdd(ticket, 1) == p.splits - 1;
    __syncthreads();
    if (!*s_last) return;
    __threadfence();
#pragma unroll
    for (int s = 0; s < PPW; ++s) {
      if (!((valid >> s) & 1u)) continue;
      float* q = slot + slot_of(s, warp) * CT + lane * VEC;
      load_vec_cg<VEC>(acc[s], q);
      const float zero[VEC] = {};
      store_vec_cg<VEC>(q, zero);
    }
    if (tid == 0) *ticket = 0;  // ready for the next launch (and the next CUDA-graph replay)
  }

  // epilogue: [CT][RMAX+1] staging tile, then coalesced NCHW stores
  constexpr int RS = RMAX + 1;
  float* st = smem;
  float b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) b[j] = bias[c0 + lane * VEC + j];
#pragma unroll
  for (int s = 0; s < PPW; ++s) {
    if (!((valid >> s) & 1u)) continue;
    const int r = slot_of(s, warp);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = acc[s][j] + b[j];
      if (!p.pool && p.relu) v = fmaxf(v, 0.f);
      st[(lane * VEC + j) * RS + r] = v;
    }
  }
  __syncthreads();
  if (!p.pool) {
    for (int i = tid; i < CT * R; i += THREADS) {
      const int cl = i / R, r = i - cl * R, co = c0 + cl;
      const int ry = r / p.crx, rx = r - ry * p.crx, cy = ry0 + ry, cx = rx0 + rx;
      if (co < p.cout && cy < p.oh && cx < p.ow)
        store_act(y + ((static_cast<size_t>(img) * p.cout + co) * p.oh + cy) * p.ow + cx, st[cl * RS + r]);
    }
  } else {
    const int tq = p.tqy * p.tqx;
    for (int i = tid; i < CT * tq; i += THREADS) {
      const int cl = i / tq, q = i - cl * tq, co = c0 + cl;
      const int qy = qy0 + q / p.tqx, qx = qx0 + (q - (q / p.tqx) * p.tqx);
      if (co >= p.cout || qy >= p.qh || qx >= p.qw) continue;
      float m = 0.f;  // the max starts at 0: the ReLU before the pool
      for (int a = 0; a < p.pkh; ++a) {
        const int cy = qy * p.psh - p.ppad_t + a;
        if (cy < 0 || cy >= p.oh) continue;
        for (int c = 0; c < p.pkw; ++c) {
          const int cx = qx * p.psw - p.ppad_l + c;
          if (cx < 0 || cx >= p.ow) continue;
          m = fmaxf(m, st[cl * RS + (cy - ry0) * p.crx + (cx - rx0)]);
        }
      }
      store_act(y + ((static_cast<size_t>(img) * p.cout + co) * p.qh + qy) * p.qw + qx, m);
    }
  }
}

// GROUP = 1: a warp applies the filters to one position's compressed row at a time.
// GROUP = 4: a warp walks the union of the compressed rows of four positions: each weight
// row read from shared memory then serves all four (the entries of the positions where that
// input is zero multiply a zero), which cuts shared-memory traffic per useful multiply when
// the rows overlap, i.e. at moderate sparsity.
template <typename T, int VEC, int PPW, int WARPS, int GROUP>
__global__ void __launch_bounds__(WARPS * 32, PPW >= 16 ? ECR_WIDE_MIN_BLOCKS : 3)
ecr_conv_pool(const T* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ bias,
              T* __restrict__ y, float* __restrict__ ws, int* __restrict__ tickets, const EcrParams p) {
  constexpr int CT = 32 * VEC;
  constexpr int RMAX = PPW * WARPS;
  constexpr int THREADS = WARPS * 32;
  constexpr unsigned FULL = 0xffffffffu;
  static_assert(GROUP == 1 || (GROUP == 4 && PPW % 4 == 0), "GROUP is 1 or 4 (and divides PPW)");
  ECR_DYNAMIC_SMEM(smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kc = p.kc;
  float* wbuf0 = smem;
  float* wbuf1 = smem + kc * CT;
  float* patch = smem + 2 * kc * CT;
  const int patch_size = p.cc * p.patch_h * p.patch_w;
  int* offs = reinterpret_cast<int*>(patch + patch_size);

  // which tile, which output channels, which part of K
  const int tiles = p.tiles_y * p.tiles_x;
  const int img = blockIdx.x / tiles;
  const int t_in = blockIdx.x - img * tiles;
  const int ty = t_in / p.tiles_x, tx = t_in - ty * p.tiles_x;
  const int qy0 = ty * p.tqy, qx0 = tx * p.tqx;
  const int ry0 = qy0 * p.psh - p.ppad_t, rx0 = qx0 * p.psw - p.ppad_l;  // first conv row/col
  const int iy0 = ry0 * p.sh - p.pad_t, ix0 = rx0 * p.sw - p.pad_l;        // first input row/col
  const int c0 = blockIdx.y * CT;
  const int ch_begin = blockIdx.z * p.chunks_per_split;
  const int ch_end = min(p.chunks, ch_begin + p.chunks_per_split);
  const int R = p.cry * p.crx;

  for (int e = tid; e < kc; e += THREADS) {  // window entry e -> offset in the patch
    const int khw = p.kh * p.kw;
    const int cl = e / khw, rest = e - cl * khw, i = rest / p.kw, j = rest - i * p.kw;
    offs[e] = (cl * p.patch_h + i) * p.patch_w + j;
  }

  // conv position r of the tile starts its window at patch offset bases[r]
  int* bases = offs + kc;
  // GROUP = 4: per warp, the 32 entries of a segment for the group's four positions
  float4* ubufs = reinterpret_cast<float4*>(smem + ((2 * kc * CT + patch_size + kc + RMAX + 3) & ~3));
  for (int r = tid; r < RMAX; r += THREADS) {
    const int ry = r / p.crx, rx = r - ry * p.crx;
    bases[r] = ry * p.sh * p.patch_w + rx * p.sw;
  }
  // the conv positions this warp owns
  unsigned valid = 0;
#pragma unroll
  for (int s = 0; s < PPW; ++s) {
    const int r = slot_pos<WARPS, GROUP>(s, warp);
    const int ry = r / p.crx, rx = r - ry * p.crx;
    const int cy = ry0 + ry, cx = rx0 + rx;
    if (r < R && cy >= 0 && cy < p.oh && cx >= 0 && cx < p.ow) valid |= 1u << s;
  }
  float acc[PPW][VEC];
#pragma unroll
  for (int s = 0; s < PPW; ++s)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[s][j] = 0.f;

  auto load_weights = [&](int ch, float* dst) { load_weight_chunk<CT, THREADS>(dst, wt, ch, kc, p, c0, tid); };

  if (ch_begin < ch_end) load_weights(ch_begin, wbuf0);
  cp_async_commit();
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int stage = (ch - ch_begin) & 1;
    if (ch + 1 < ch_end) load_weights(ch + 1, stage ? wbuf0 : wbuf1);
    cp_async_commit();
    // this chunk's input patch, zero outside the image (the conv's zero padding)
    const int plane = p.patch_h * p.patch_w;
    for (int i = tid; i < patch_size; i += THREADS) {
      const int cl = i / plane, rest = i - cl * plane;
      const int py = rest / p.patch_w, px = rest - py * p.patch_w;
      const int c = ch * p.cc + cl, iy = iy0 + py, ix = ix0 + px;
      float v = 0.f;
      if (c < p.cin && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w)
        v = load_act(x + ((static_cast<size_t>(img) * p.cin + c) * p.h + iy) * p.w + ix);
      patch[i] = v;
    }
    cp_async_wait<1>();  // this chunk's weights have landed (the next chunk's may still fly)
    __syncthreads();
    const float* wc = stage ? wbuf1 : wbuf0;
    if (GROUP == 1) {
#pragma unroll
      for (int s = 0; s < PPW; ++s) {
        if (!((valid >> s) & 1u)) continue;  // warp-uniform
        const float* pb = patch + bases[slot_pos<WARPS, GROUP>(s, warp)];
        for (int e0 = 0; e0 < kc; e0 += 32) {
          const int e = e0 + lane;
          const float v = e < kc ? pb[offs[e]] : 0.f;
          unsigned m = __ballot_sync(FULL, v != 0.f);  // the compressed row of these 32 entries
          const float* wrow = wc + e0 * CT + lane * VEC;
          while (m) {
            const int s0 = __ffs(m) - 1;
            m &= m - 1;
            const float a0 = __shfl_sync(FULL, v, s0);
            Row<VEC> w0;
            w0.load(wrow + s0 * CT);
            if (m) {
              const int s1 = __ffs(m) - 1;
              m &= m - 1;
              const float a1 = __shfl_sync(FULL, v, s1);
              Row<VEC> w1;
              w1.load(wrow + s1 * CT);
#pragma unroll
              for (int j = 0; j < VEC; ++j) acc[s][j] = fmaf(a1, w1.v[j], fmaf(a0, w0.v[j], acc[s][j]));
            } else {
#pragma unroll
              for (int j = 0; j < VEC; ++j) acc[s][j] = fmaf(a0, w0.v[j], acc[s][j]);
            }
          }
        }
      }
    } else {
      float4* ubuf = ubufs + warp * 32;
#pragma unroll
      for (int g = 0; g < PPW / 4; ++g) {
        const unsigned gv = (valid >> (4 * g)) & 0xfu;
        if (!gv) continue;  // warp-uniform
        const float* pb0 = patch + bases[slot_pos<WARPS, GROUP>(4 * g + 0, warp)];
        const float* pb1 = patch + bases[slot_pos<WARPS, GROUP>(4 * g + 1, warp)];
        const float* pb2 = patch + bases[slot_pos<WARPS, GROUP>(4 * g + 2, warp)];
        const float* pb3 = patch + bases[slot_pos<WARPS, GROUP>(4 * g + 3, warp)];
        for (int e0 = 0; e0 < kc; e0 += 32) {
          const int e = e0 + lane;
          float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
          if (e < kc) {
            const int o = offs[e];
            if (gv & 1u) v.x = pb0[o];
            if (gv & 2u) v.y = pb1[o];
            if (gv & 4u) v.z = pb2[o];
            if (gv & 8u) v.w = pb3[o];
          }
          const bool nz = v.x != 0.f || v.y != 0.f || v.z != 0.f || v.w != 0.f;
          unsigned m = __ballot_sync(FULL, nz);  // the union of the four compressed rows
          if (!m) continue;
          __syncwarp();  // the previous segment's reads of ubuf are done
          if (nz) ubuf[lane] = v;
          __syncwarp();
          const float* wrow = wc + e0 * CT + lane * VEC;
          while (m) {
            const int s0 = __ffs(m) - 1;
            m &= m - 1;
            const float4 a0 = ubuf[s0];
            Row<VEC> w0;
            w0.load(wrow + s0 * CT);
            if (m) {
              const int s1 = __ffs(m) - 1;
              m &= m - 1;
              const float4 a1 = ubuf[s1];
              Row<VEC> w1;
              w1.load(wrow + s1 * CT);
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                acc[4 * g + 0][j] = fmaf(a1.x, w1.v[j], fmaf(a0.x, w0.v[j], acc[4 * g + 0][j]));
                acc[4 * g + 1][j] = fmaf(a1.y, w1.v[j], fmaf(a0.y, w0.v[j], acc[4 * g + 1][j]));
                acc[4 * g + 2][j] = fmaf(a1.z, w1.v[j], fmaf(a0.z, w0.v[j], acc[4 * g + 2][j]));
                acc[4 * g + 3][j] = fmaf(a1.w, w1.v[j], fmaf(a0.w, w0.v[j], acc[4 * g + 3][j]));
              }
            } else {
#pragma unroll
              for (int j = 0; j < VEC; ++j) {
                acc[4 * g + 0][j] = fmaf(a0.x, w0.v[j], acc[4 * g + 0][j]);
                acc[4 * g + 1][j] = fmaf(a0.y, w0.v[j], acc[4 * g + 1][j]);
                acc[4 * g + 2][j] = fmaf(a0.z, w0.v[j], acc[4 * g + 2][j]);
                acc[4 * g + 3][j] = fmaf(a0.w, w0.v[j], acc[4 * g + 3][j]);
              }
            }
          }
        }
      }
    }
    __syncthreads();  // the next chunk overwrites the patch and this weight buffer
  }
  cp_async_wait<0>();
  ecr_finish<T, VEC, PPW, WARPS>(acc, valid, GroupSlots<WARPS, GROUP>{}, smem, bias, y, ws, tickets, p, &s_last, img, c0, ry0, rx0, qy0, qx0, R);
}

// --- list kernel: each compressed row written to shared memory, then a multiply-only loop ---
//
// ecr_list_conv_pool walks K in the same chunks, tiles and split-K slots as ecr_conv_pool. The
// block's RMAX conv positions form groups of G consecutive positions; warp w owns groups
// w, w + WARPS, ... For each of its groups and each K chunk the warp
//   1. writes the group's compressed row to its own list in shared memory: 32 window entries at
//      a time, a ballot keeps those where any of the G positions has a non-zero input, and
//      each kept lane stores {its G input values, k*CT} at the list's end plus its rank among
//      the kept lanes (k = (c*kh + i)*kw + j, the kernel index; G = 1 is exactly the ECR row,
//      an entry is one 8-byte (G = 1) or 16-byte (G = 2, 3) broadcast read, G = 4 adds a 4-byte one;
//      G > 1 the union of the group's rows, where a zero input multiplies a zero). One warp
//      writes each list and the count is a warp-uniform register: nothing to race on;
//   2. walks the list: per entry, a broadcast read of the entry, VEC consecutive weights of
//      row k per lane, G*VEC FMAs; no ballots or shuffles in this loop, and its loads do not
//      depend on the previous entry, so they issue ahead.
// The next chunk's patch comes through PREFETCH registers per thread, loaded before and
// stored after the multiplies; its weights come by cp.async (double buffered): global latency
// hides behind the work. Empty windows have empty lists: no multiply, bias alone.
// A warp's list of kc entries in shared memory, EF floats per entry: G = 1 {v, k} 8 bytes;
// G = 2, 3 {v..., k} one 16-byte vector; G = 4 the values as kc float4, then the kc k's
// (structure of arrays: a warp's stores hit every bank once, not a 32-byte stride).
template <int G> struct ListLayout { static constexpr int EF = G == 1 ? 2 : (G <= 3 ? 4 : 8); };

template <int G> __device__ __forceinline__ void store_entry(float* list, int kc, int i, const float (&v)[G], int k) {
  if constexpr (G == 1) {
    *reinterpret_cast<float2*>(list + 2 * i) = make_float2(v[0], __int_as_float(k));
  } else if constexpr (G == 2) {
    *reinterpret_cast<float4*>(list + 4 * i) = make_float4(v[0], v[1], __int_as_float(k), 0.f);
  } else if constexpr (G == 3) {
    *reinterpret_cast<float4*>(list + 4 * i) = make_float4(v[0], v[1], v[2], __int_as_float(k));
  } else {
    *reinterpret_cast<float4*>(list + 4 * i) = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<int*>(list + 4 * kc)[i] = k;
  }
}
template <int G> __device__ __forceinline__ void load_entry(const float* list, int kc, int i, float (&v)[G], int& k) {
  if constexpr (G == 1) {
    const float2 t = *reinterpret_cast<const float2*>(list + 2 * i);
    v[0] = t.x; k = __float_as_int(t.y);
  } else {
    const float4 t = *reinterpret_cast<const float4*>(list + 4 * i);
    v[0] = t.x;
    if constexpr (G >= 2) v[1] = t.y;
    if constexpr (G == 2) k = __float_as_int(t.z);
    if constexpr (G >= 3) v[2] = t.z;
    if constexpr (G == 3) k = __float_as_int(t.w);
    if constexpr (G == 4) { v[3] = t.w; k = reinterpret_cast<const int*>(list + 4 * kc)[i]; }
  }
}

// Shared memory (floats): W chunk buffers 2 x [kc][CT], patch [cc][patch_h][patch_w], entry
// offsets [kc] and window bases [RMAX] (ints), then (16-byte aligned) one list of kc entries
// per warp; the epilogue reuses the front as a [CT][RMAX+1] staging tile.
// Registers: the accumulators (PPW*VEC) set how many 8-warp blocks an SM is asked to hold
// (3: <= 85 registers, 2: <= 128); a 16-warp block gets 128 registers.
template <int ACC, int WARPS> constexpr int list_min_blocks() { return WARPS >= 16 ? 1 : (ACC <= 16 ? 3 : 2); }

template <typename T, int VEC, int PPW, int WARPS, int G, int PREFETCH>
__global__ void __launch_bounds__(WARPS * 32, list_min_blocks<PPW * VEC, WARPS>())
ecr_list_conv_pool(const T* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ bias,
                   T* __restrict__ y, float* __restrict__ ws, int* __restrict__ tickets, const EcrParams p) {
  constexpr int CT = 32 * VEC;
  constexpr int THREADS = WARPS * 32;
  constexpr int GPW = PPW / G;  // groups per warp
  constexpr unsigned FULL = 0xffffffffu;
  static_assert(G >= 1 && G <= 4, "G is 1 to 4");
  static_assert(PPW % G == 0 && PPW <= 32, "a warp owns whole groups (and at most 32 positions)");
  ECR_DYNAMIC_SMEM(smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kc = p.kc;
  float* wbuf0 = smem;
  float* wbuf1 = smem + kc * CT;
  float* patch = smem + 2 * kc * CT;
  const int patch_size = p.cc * p.patch_h * p.patch_w;
  int* offs = reinterpret_cast<int*>(patch + patch_size);
  int* bases = offs + kc;
  constexpr int RMAX = PPW * WARPS;
  float* list = smem + ((2 * kc * CT + patch_size + kc + RMAX + 3) & ~3) + warp * kc * ListLayout<G>::EF;

  const int tiles = p.tiles_y * p.tiles_x;
  const int img = blockIdx.x / tiles;
  const int t_in = blockIdx.x - img * tiles;
  const int ty = t_in / p.tiles_x, tx = t_in - ty * p.tiles_x;
  const int qy0 = ty * p.tqy, qx0 = tx * p.tqx;
  const int ry0 = qy0 * p.psh - p.ppad_t, rx0 = qx0 * p.psw - p.ppad_l;
  const int iy0 = ry0 * p.sh - p.pad_t, ix0 = rx0 * p.sw - p.pad_l;
  const int c0 = blockIdx.y * CT;
  const int ch_begin = blockIdx.z * p.chunks_per_split;
  const int ch_end = min(p.chunks, ch_begin + p.chunks_per_split);
  const int R = p.cry * p.crx;

  for (int e = tid; e < kc; e += THREADS) {  // window entry e -> offset in the patch
    const int khw = p.kh * p.kw;
    const int cl = e / khw, rest = e - cl * khw, i = rest / p.kw, j = rest - i * p.kw;
    offs[e] = (cl * p.patch_h + i) * p.patch_w + j;
  }
  for (int r = tid; r < RMAX; r += THREADS) {  // conv position r of the tile starts its window here
    const int ry = r / p.crx, rx = r - ry * p.crx;
    bases[r] = ry * p.sh * p.patch_w + rx * p.sw;
  }
  unsigned valid = 0;  // slot s = gi*G + q of this warp: position slot_pos(s, warp), a conv output?
#pragma unroll
  for (int s = 0; s < PPW; ++s) {
    const int r = slot_pos<WARPS, G>(s, warp);
    const int ry = r / p.crx, rx = r - ry * p.crx;
    const int cy = ry0 + ry, cx = rx0 + rx;
    if (r < R && cy >= 0 && cy < p.oh && cx >= 0 && cx < p.ow) valid |= 1u << s;
  }
  float acc[PPW][VEC];
#pragma unroll
  for (int s = 0; s < PPW; ++s)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[s][j] = 0.f;

  auto load_weights = [&](int ch, float* dst) { load_weight_chunk<CT, THREADS>(dst, wt, ch, kc, p, c0, tid); };
  // the chunk's input patch, zero outside the image (the conv's zero padding); the plan keeps
  // patch_size <= PREFETCH * THREADS. Patch element tid + u*THREADS reads input element
  // xoff[u] = (cl*h + iy)*w + ix past the chunk's first channel, the same for every chunk
  // (-1: outside the image or the patch); channel cl exists iff xoff[u] < (cin - ch*cc)*h*w.
  int xoff[PREFETCH];
  {
    const int plane = p.patch_h * p.patch_w;
#pragma unroll
    for (int u = 0; u < PREFETCH; ++u) {
      const int i = tid + u * THREADS;
      const int cl = i / plane, rest = i - cl * plane;
      const int py = rest / p.patch_w, px = rest - py * p.patch_w;
      const int iy = iy0 + py, ix = ix0 + px;
      xoff[u] = (i < patch_size && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w) ? (cl * p.h + iy) * p.w + ix : -1;
    }
  }
  const int hw = p.h * p.w;
  auto fetch_patch = [&](int ch, float (&v)[PREFETCH]) {
    const T* xc = x + (static_cast<size_t>(img) * p.cin + ch * p.cc) * hw;
    const int limit = (p.cin - ch * p.cc) * hw;
#pragma unroll
    for (int u = 0; u < PREFETCH; ++u) v[u] = (xoff[u] >= 0 && xoff[u] < limit) ? load_act(xc + xoff[u]) : 0.f;
  };
  auto store_patch = [&](const float (&v)[PREFETCH]) {
#pragma unroll
    for (int u = 0; u < PREFETCH; ++u) {
      const int i = tid + u * THREADS;
      if (i < patch_size) patch[i] = v[u];
    }
  };

  load_weights(ch_begin, wbuf0);
  cp_async_commit();
  {
    float v[PREFETCH];
    fetch_patch(ch_begin, v);
    store_patch(v);
  }
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int stage = (ch - ch_begin) & 1;
    const bool more = ch + 1 < ch_end;
    if (more) load_weights(ch + 1, stage ? wbuf0 : wbuf1);
    cp_async_commit();
    float next[PREFETCH];
    if (more) fetch_patch(ch + 1, next);  // in flight during the multiplies
    cp_async_wait<1>();  // this chunk's weights have landed (the next chunk's may still fly)
    __syncthreads();     // ... for every thread, as have this chunk's patch, offsets and bases
    const float* wl = (stage ? wbuf1 : wbuf0) + lane * VEC;
#pragma unroll
    for (int gi = 0; gi < GPW; ++gi) {
      const unsigned gv = (valid >> (gi * G)) & ((1u << G) - 1u);
      if (!gv) continue;  // warp-uniform: no conv output in this group
      const float* pb[G];
#pragma unroll
      for (int q = 0; q < G; ++q) pb[q] = patch + bases[slot_pos<WARPS, G>(gi * G + q, warp)];
      // 1. the group's (union) compressed row of this chunk -> this warp's list
      int n = 0;
      for (int e0 = 0; e0 < kc; e0 += 32) {
        const int e = e0 + lane;
        float v[G];
        bool nz = false;
        if (e < kc) {
          const int o = offs[e];
#pragma unroll
          for (int q = 0; q < G; ++q) {
            v[q] = ((gv >> q) & 1u) ? pb[q][o] : 0.f;
            nz |= v[q] != 0.f;
          }
        }
        const unsigned m = __ballot_sync(FULL, nz);
        if (nz) store_entry<G>(list, kc, n + __popc(m & lanes_below), v, e * CT);
        n += __popc(m);
      }
      __syncwarp();  // the list is written
      // 2. every entry meets CT filters (entries in flight hide the entry -> weight load latency:
      // 4 with few accumulators, 2, or 1 when 64 accumulators leave no registers)
#pragma unroll(PPW * VEC >= 64 ? 1 : (PPW * VEC <= 32 ? 4 : 2))
      for (int j = 0; j < n; ++j) {
        float a[G];
        int k;
        load_entry<G>(list, kc, j, a, k);
        Row<VEC> w;
        w.load(wl + k);
#pragma unroll
        for (int q = 0; q < G; ++q)
#pragma unroll
          for (int jj = 0; jj < VEC; ++jj) acc[gi * G + q][jj] = fmaf(a[q], w.v[jj], acc[gi * G + q][jj]);
      }
      __syncwarp();  // the list is read before the next group rewrites it
    }
    __syncthreads();  // every warp is done with this patch and weight buffer
    if (more) store_patch(next);
  }
  cp_async_wait<0>();
  __syncthreads();  // the last patch stores (none) and reads are over: the epilogue reuses shared memory
  ecr_finish<T, VEC, PPW, WARPS>(acc, valid, GroupSlots<WARPS, G>{}, smem, bias, y, ws, tickets, p, &s_last, img, c0, ry0, rx0, qy0, qx0, R);
}

// --- row kernel: row bit-masks, weights held in registers ---------------------------------
//
// ecr_row_conv_pool, for KH x KW = 3x3 kernels at stride 1 along x (VGG's convs): warp w owns PY
// consecutive conv rows of the tile, G conv columns each (slot s = py*G + x, position
// (w*PY + py)*crx + x of the tile's conv region). Per K chunk of cc channels:
//   1. the chunk's input patch lands in shared memory as one 32-float row per (channel, input
//      row), column u = input column ix0 + u (u < patch_w = crx + KW - 1, zero elsewhere and
//      outside the image). fp32: cp.async, double buffered with the weights, so the next chunk
//      streams in while this one is multiplied; fp16: loaded and widened by the threads.
//   2. per (channel c, kernel row i) the warp loads the KW weight vectors W[c,i,0..KW) of its
//      lanes' VEC output channels into registers; per conv row, one ballot over the input row
//      gives the bit-mask of its non-zero columns (each input is tested KH times, once per
//      kernel row, not KH*KW times as when building each window's list), and the warp walks the
//      set bits: the non-zero input at column u multiplies W[c,i,j] into the accumulators of
//      positions x = u - j, j < KW. For position x these are exactly the non-zeros of its window
//      row (its ECR row, taken input by input). Each column's code is unrolled, which
//      keeps every accumulator index a compile-time constant, so nothing leaves registers.
//      SCAN picks how the bits are tested: 1 every column, 2 pairs first, 4 quads first. (A
//      jump from set bit to set bit through a switch on u lost at every sparsity up to 95 % on
//      the H100, 1.1-1.5x slower: NVCC compiles the switch to a tree of compares.)
//      SHARE_ROWS (3x3 kernels at stride 1, PY >= 2): the warp walks its PY + 2 input rows instead,
//      each once, with all 9 weight vectors of the channel in registers: an input row is tested,
//      loaded and scanned once for the up to 3 conv rows it serves (PY = 2: 4 scans, not 6).
// Per non-zero input: a test and up to KW*VEC FMAs, no load: the row's values come by broadcast
// 16-byte loads, and the KW weight vectors are read once per (c, i) for all inputs of the warp's rows.
// The loops walk running pointers (the kernel rows unrolled) and the patch copy keeps one offset per
// row: the H100 profile of 12-06 found half the instructions in address arithmetic.
// Shared memory (floats): W chunk buffers 2 x [kc][CT], patch buffers 2 x [cc*patch_h][32], row
// offsets [cc*patch_h] (ints); the epilogue reuses the front as its staging tile.
template <int PY, int G> struct RowSlots {
  int crx;
  __device__ __forceinline__ int operator()(int s, int warp) const { return (warp * PY + s / G) * crx + s % G; }
};

// the input at column U of a warp row meets weight j of the positions x = U - j
template <int U, int G, int KW, int VEC>
__device__ __forceinline__ void row_input(float (&acc)[G][VEC], const float a, const Row<VEC> (&w)[KW]) {
#pragma unroll
  for (int j = 0; j < KW; ++j) {
    if (U - j >= 0 && U - j < G) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[U - j][v] = fmaf(a, w[j].v[v], acc[U - j][v]);
    }
  }
}

// The warp-uniform tests of columns [LO, HI) of mask m: SCAN 1 one per column; SCAN 2 one per pair
// of columns, then one per column of a pair that has a non-zero; SCAN 4 quads, then pairs, then
// columns (fewer tests at high sparsity). The row's values a[] are in registers; f(Col<U>{}, a[U])
// does the FMAs of the non-zero input at column U.
template <int U> struct Col {
  static constexpr int value = U;
};
template <int LO, int HI, int SCAN, typename F>
__device__ __forceinline__ void scan_columns(const unsigned m, const float* a, F& f) {
  if constexpr (LO < HI) {
    constexpr int E = LO + SCAN < HI ? LO + SCAN : HI;  // this block of columns: [LO, E)
    if constexpr (E - LO == 1) {
      if ((m >> LO) & 1u) f(Col<LO>{}, a[LO]);
    } else {
      if (m & (((2u << (E - LO - 1)) - 1u) << LO)) scan_columns<LO, E, SCAN / 2>(m, a, f);
    }
    scan_columns<E, HI, SCAN>(m, a, f);
  }
}

// a patch row's first NU values, by broadcast 16-byte loads
template <int NU> __device__ __forceinline__ void row_values(float (&a)[(NU + 3) & ~3], const float* prow) {
#pragma unroll
  for (int q = 0; q < (NU + 3) / 4; ++q) {
    const float4 t = reinterpret_cast<const float4*>(prow)[q];
    a[4 * q] = t.x; a[4 * q + 1] = t.y; a[4 * q + 2] = t.z; a[4 * q + 3] = t.w;
  }
}

// Where a block's tile starts (image, first pooled output, first conv position). The row kernel
// computes it again after its main loop from a fresh read of the block index, so none of it is
// kept in registers (or spilled) across the loop.
struct TileOrigin {
  int img, qy0, qx0, ry0, rx0;
};
__device__ __forceinline__ TileOrigin tile_origin(const EcrParams& p, const int bx) {
  const int tiles = p.tiles_y * p.tiles_x;
  const int img = bx / tiles, t_in = bx - img * tiles;
  const int ty = t_in / p.tiles_x, tx = t_in - ty * p.tiles_x;
  const int qy0 = ty * p.tqy, qx0 = tx * p.tqx;
  return {img, qy0, qx0, qy0 * p.psh - p.ppad_t, qx0 * p.psw - p.ppad_l};
}
__device__ __forceinline__ int block_x_reread() {
#ifdef SPARSECNN_EMU
  return blockIdx.x;
#else
  unsigned v;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));  // volatile: not merged with the first read
  return static_cast<int>(v);
#endif
}
// valid bit s = py*G + x: slot s of warp `warp` is a conv position of the layer (row kernel): the
// columns x in [max(0, -rx0), min(crx, ow - rx0)) of each conv row that lies in the tile and the layer
template <int PY, int G>
__device__ __forceinline__ unsigned row_slots_valid(const EcrParams& p, const TileOrigin& t, const int warp) {
  const int xlo = max(0, -t.rx0), xhi = min(p.crx, p.ow - t.rx0);
  const unsigned cols = xhi > xlo ? ((2u << (xhi - 1)) - 1u) & ~((1u << xlo) - 1u) : 0u;  // xhi <= G <= 32
  unsigned valid = 0;
#pragma unroll
  for (int py = 0; py < PY; ++py) {
    const int ry = warp * PY + py, cy = t.ry0 + ry;
    if (ry < p.cry && cy >= 0 && cy < p.oh) valid |= cols << (py * G);
  }
  return valid;
}

// Blocks per SM asked of ptxas for the row kernel: 8-warp blocks with at most 32 accumulators per
// thread 3 (<= 85 registers: more warps to hide latency), with 64 2 where that does not spill (sm_90)
template <int ACC, int WARPS> constexpr int row_min_blocks() {
  return WARPS >= 16 ? 1 : (WARPS >= 8 ? (ACC <= 32 ? 3 : ECR_WIDE_MIN_BLOCKS) : 4);
}

template <typename T, int VEC, int G, int PY, int WARPS, int KH, int KW, int SCAN, bool SHARE_ROWS>
__global__ void __launch_bounds__(WARPS * 32, row_min_blocks<PY * G * VEC, WARPS>())
ecr_row_conv_pool(const T* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ bias,
                  T* __restrict__ y, float* __restrict__ ws, int* __restrict__ tickets, const EcrParams p) {
  constexpr int CT = 32 * VEC;
  constexpr int THREADS = WARPS * 32;
  constexpr int PPW = PY * G;
  constexpr int NU = G + KW - 1;  // input columns of a warp row
  constexpr unsigned FULL = 0xffffffffu;
  constexpr bool ASYNC = sizeof(T) == 4;  // fp32 rows are copied by cp.async
  static_assert(NU <= 32 && PPW <= 32, "a warp row's inputs fit one mask word, its positions the valid bits");
  static_assert(SCAN == 1 || SCAN == 2 || SCAN == 4, "SCAN tests every column (1), pairs first (2) or quads (4)");
  static_assert(!SHARE_ROWS || KH == 3, "sharing input rows is written for 3 kernel rows");
  ECR_DYNAMIC_SMEM(smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kc = p.kc;
  const int rows = p.cc * p.patch_h;  // patch rows of a chunk
  float* wbuf0 = smem;
  float* wbuf1 = smem + kc * CT;
  float* pbuf0 = smem + 2 * kc * CT;
  float* pbuf1 = pbuf0 + rows * 32;
  int* rowoff = reinterpret_cast<int*>(pbuf1 + rows * 32);

  const TileOrigin t0 = tile_origin(p, blockIdx.x);
  const int img = t0.img;
  const int iy0 = t0.ry0 * p.sh - p.pad_t, ix0 = t0.rx0 - p.pad_l;  // stride 1 along x
  const int c0 = blockIdx.y * CT;
  const int ch_begin = blockIdx.z * p.chunks_per_split;
  const int ch_end = min(p.chunks, ch_begin + p.chunks_per_split);
  const int hw = p.h * p.w;

  // patch row r = cl*patch_h + pr holds input row iy0 + pr of channel cl: offset (cl*h + iy)*w
  // past the chunk's first channel, -1 outside the image
  for (int r = tid; r < rows; r += THREADS) {
    const int cl = r / p.patch_h, iy = iy0 + (r - cl * p.patch_h);
    rowoff[r] = (iy >= 0 && iy < p.h) ? (cl * p.h + iy) * p.w : -1;
  }
  const unsigned valid = row_slots_valid<PY, G>(p, t0, warp);
  unsigned row_valid = 0;  // bit py: conv row py of this warp has a position of the layer
#pragma unroll
  for (int py = 0; py < PY; ++py) row_valid |= ((valid >> (py * G)) & ((2u << (G - 1)) - 1u)) ? 1u << py : 0u;
  float acc[PY][G][VEC];
#pragma unroll
  for (int py = 0; py < PY; ++py)
#pragma unroll
    for (int s = 0; s < G; ++s)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[py][s][v] = 0.f;

  auto load_weights = [&](int ch, float* dst) { load_weight_chunk<CT, THREADS>(dst, wt, ch, kc, p, c0, tid); };
  const int ix = ix0 + lane;
  const bool col_in = lane < p.patch_w && ix >= 0 && ix < p.w;
  auto load_rows = [&](int ch, float* dst) {  // lane = column; rows warp, warp + WARPS, ...
    const T* xc = x + (static_cast<size_t>(img) * p.cin + ch * p.cc) * hw + ix;  // read only where col_in
    // channels past cin read as zero; so do rows outside the image (offset -1, a huge unsigned)
    const unsigned limit = col_in ? (p.cin - ch * p.cc) * hw : 0u;
    float* d = dst + warp * 32 + lane;
    for (int r = warp; r < rows; r += WARPS, d += WARPS * 32) {
      const int o = rowoff[r];
      const bool in = static_cast<unsigned>(o) < limit;
      if constexpr (ASYNC) cp_async4_zfill(d, xc + o, in);  // not read unless in (as CUTLASS's zfill)
      else *d = in ? load_act(xc + o) : 0.f;
    }
  };

  __syncthreads();  // rowoff
  if (ch_begin < ch_end) {
    load_weights(ch_begin, wbuf0);
    load_rows(ch_begin, pbuf0);
  }
  cp_async_commit();
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int stage = (ch - ch_begin) & 1;
    if (ch + 1 < ch_end) {
      load_weights(ch + 1, stage ? wbuf0 : wbuf1);
      load_rows(ch + 1, stage ? pbuf0 : pbuf1);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this chunk's weights and rows have landed (the next chunk's may still fly)
    __syncthreads();     // ... for every thread
    const float* wc = (stage ? wbuf1 : wbuf0) + lane * VEC;
    const float* pc = stage ? pbuf1 : pbuf0;
    // running pointers, advanced per channel: the warp's first input row, the channel's weights (the
    // loops keep no index arithmetic)
    const int ystep = p.sh * 32;  // floats between the input rows of consecutive conv rows
    const float* rb = pc + warp * PY * ystep;
    const float* wl = wc;
    if (SHARE_ROWS && row_valid == (1u << PY) - 1u) {
      // 3x3 at stride 1, every conv row of the warp in the layer: input row r of the warp serves conv
      // rows py = r - i, so each input row is tested and loaded once for all of them
#pragma unroll 1
      for (int cl = 0; cl < p.cc; ++cl, rb += p.patch_h * 32, wl += KH * KW * CT) {
        Row<VEC> w[KH][KW];
#pragma unroll
        for (int i = 0; i < KH; ++i)
#pragma unroll
          for (int j = 0; j < KW; ++j) w[i][j].load(wl + (i * KW + j) * CT);
#pragma unroll
        for (int r = 0; r < PY + 2; ++r) {
          const unsigned m = __ballot_sync(FULL, rb[r * 32 + lane] != 0.f);
          if (!m) continue;  // warp-uniform
          float a[(NU + 3) & ~3];
          row_values<NU>(a, rb + r * 32);
          auto fma_rows = [&](auto col, const float v) {
#pragma unroll
            for (int py = 0; py < PY; ++py)
              if (r - py >= 0 && r - py < 3) row_input<decltype(col)::value, G, KW, VEC>(acc[py], v, w[r - py]);
          };
          scan_columns<0, NU, SCAN>(m, a, fma_rows);
        }
      }
    } else if (row_valid) {  // warp-uniform; the kernel rows unrolled
#pragma unroll 1
      for (int cl = 0; cl < p.cc; ++cl, rb += p.patch_h * 32, wl += KH * KW * CT) {
#pragma unroll
        for (int i = 0; i < KH; ++i) {
          unsigned m[PY], any = 0;
#pragma unroll
          for (int py = 0; py < PY; ++py) {  // the non-zero columns of the input row of conv row py
            const float v = ((row_valid >> py) & 1u) ? rb[py * ystep + i * 32 + lane] : 0.f;
            m[py] = __ballot_sync(FULL, v != 0.f);
            any |= m[py];
          }
          if (any) {  // warp-uniform: skip when these input rows are all zero
            Row<VEC> w[KW];
#pragma unroll
            for (int j = 0; j < KW; ++j) w[j].load(wl + (i * KW + j) * CT);
#pragma unroll
            for (int py = 0; py < PY; ++py) {
              if (m[py]) {
                float a[(NU + 3) & ~3];
                row_values<NU>(a, rb + py * ystep + i * 32);
                auto fma_row = [&](auto col, const float v) { row_input<decltype(col)::value, G, KW, VEC>(acc[py], v, w); };
                scan_columns<0, NU, SCAN>(m[py], a, fma_row);
              }
            }
          }
        }
      }
    }
    __syncthreads();  // every warp is done with these rows and this weight buffer
  }
  cp_async_wait<0>();
  __syncthreads();  // the epilogue reuses shared memory
  const TileOrigin t = tile_origin(p, block_x_reread());
  ecr_finish<T, VEC, PPW, WARPS>(reinterpret_cast<float (&)[PPW][VEC]>(acc), valid,
                                 RowSlots<PY, G>{p.crx}, smem, bias, y, ws, tickets, p, &s_last, t.img,
                                 static_cast<int>(blockIdx.y) * CT, t.ry0, t.rx0, t.qy0, t.qx0, p.cry * p.crx);
}
