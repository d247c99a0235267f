// Unstructured-sparse fp16 convolution on tensor cores: "load sparse, compute dense"
// (Flash-LLM, Xia et al., VLDB'24), applied to conv layers at small N (batch-1 pixels).
//
//   Y[m, n] = sum_k W[m, k] * B[k, n],   W [M = Cout, K = Cin*kh*kw] sparse fp16,
//   B = im2col(x) [K, N = Ho*Wo], gathered per K tile (never materialised), fp32 sums.
//
// Weight format, "tiled CSL" (built by runtimes/csr/tensor_core.py): the GEMM view is cut into
// TM x 64 tiles; tile (mt, kt)'s non-zeros are one run of 32-bit words
// (in-tile position << 16 | fp16 bits), the position already scaled to the padded shared-memory
// row (row * kAPitch + col). Runs are ordered m tile, then k tile, padded to a multiple of four
// words (one 16-byte load each) with words aimed at a scratch slot past the tile;
// tile_ptr[mt * k_tiles + kt] is where a run starts.
//
// A block owns a TM x TN output tile (4 warps, each TM/4 rows x all TN columns, Flash-LLM's
// split for skinny N) and walks its K range in tiles of 64, two buffers deep:
//   1. the next tile's sparse words and its B gather go to registers (loads in flight),
//   2. the current tile is multiplied from shared memory with mma.m16n8k16 (fp32 accumulate),
//   3. the registers are written out: the words scattered into the zeroed A buffer (dense fp16
//      tile), the gathered B pairs stored k-contiguous ([n][k]: one 32-bit load per mma
//      B register, as A's rows are for its A registers).
// Epilogue at the store: bias, residual (the output's shape, pixels flat), ReLU; or, split over
// K (blockIdx.z), fp32 atomics into a workspace (bias and residual from split 0, the host's
// ReLU after), as csr_conv.cu does.
//
// mma.m16n8k16 needs sm_80. Below it the same kernel multiplies the expanded tiles with fp32
// FMAs in the mma fragment layout (correct, slow): it only exists so one source builds for every
// arch; the host never offers this kernel there (nvrtc.py "mma.sync m16n8k16").
#include "csr_common.cuh"
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define CSR_TC_MMA 1
#include "mma.cuh"
#else
#define CSR_TC_MMA 0
#endif

namespace csr {

constexpr int kTcThreads = 128;  // 4 warps
constexpr int kTileK = 64;
constexpr int kAPitch = kTileK + 8;  // halves a shared row: fragment loads hit 32 different banks
constexpr int kBPitch = kTileK + 8;

// Mirrored by TcParams in runtimes/csr/tensor_core.py (same order, same C types).
struct TcParams {
  const unsigned* words;     // tiled CSL words (position << 16 | fp16 bits)
  const int* tile_ptr;       // [m_tiles * k_tiles + 1] run starts (multiples of 4)
  const int* k_tab;          // [k_tiles * 64]: K row k as (c << 16 | r*dh << 8 | s*dw), -1 past K
  const float* bias;         // [M] or null
  const void* x;             // input [batch][C][H][W], any strides
  void* y;                   // output [batch][M][N] (pixels flat), fp16; fp32 when accumulate
  const void* residual;      // the output's shape, pixels flat (stride r_ps), fp16; or null
  long long x_batch, y_batch, r_batch;
  int M, N, C, H, W, Wo;     // N = Ho * Wo
  int sh, sw, ph, pw;
  int x_cs, x_hs, x_ws;
  int y_cs, y_ps, r_cs, r_ps;
  int k_tiles, tiles_per_split, nsplit;
  int relu, accumulate;
};

// Block-local copies of one K tile in flight: its sparse words (RV vectors of four a thread;
// a denser tile's remainder is scattered straight from global memory) and its B pairs.
template <int TN, int RV>
struct TcTileRegs {
  uint4 words[RV];
  unsigned b[TN / 4];  // k pairs (2 fp16) this thread gathers, for one column n
};

template <int TM>
__device__ __forceinline__ void tc_scatter(unsigned short* a, const uint4& v) {
  a[v.x >> 16] = (unsigned short)(v.x & 0xffffu);
  a[v.y >> 16] = (unsigned short)(v.y & 0xffffu);
  a[v.z >> 16] = (unsigned short)(v.z & 0xffffu);
  a[v.w >> 16] = (unsigned short)(v.w & 0xffffu);
}

// Step 1: the tile's words and B pairs into registers. This thread gathers column
// n_local = tid % TN for k pairs tid / TN + j * (128 / TN).
template <int TM, int TN, int RV>
__device__ __forceinline__ void tc_load(const TcParams& p, const unsigned short* __restrict__ x, int mt, int kt,
                                        int iy0, int ix0, bool n_ok, TcTileRegs<TN, RV>& regs, int& run0, int& nvec) {
  const int t = mt * p.k_tiles + kt;
  run0 = p.tile_ptr[t];
  nvec = (p.tile_ptr[t + 1] - run0) >> 2;
  const uint4* w = reinterpret_cast<const uint4*>(p.words + run0);
#pragma unroll
  for (int i = 0; i < RV; ++i) {
    const int v = threadIdx.x + i * kTcThreads;
    if (v < nvec) regs.words[i] = __ldg(w + v);
  }
  constexpr int kPairStep = kTcThreads / TN;
  const int* tab = p.k_tab + kt * kTileK;
#pragma unroll
  for (int j = 0; j < TN / 4; ++j) {
    const int kp = (int)threadIdx.x / TN + j * kPairStep;
    unsigned pair = 0;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int code = __ldg(tab + 2 * kp + e);
      const int iy = iy0 + ((code >> 8) & 0xff), ix = ix0 + (code & 0xff);
      if (code >= 0 && n_ok && (unsigned)iy < (unsigned)p.H && (unsigned)ix < (unsigned)p.W)
        pair |= (unsigned)__ldg(x + (code >> 16) * p.x_cs + iy * p.x_hs + ix * p.x_ws) << (16 * e);
    }
    regs.b[j] = pair;
  }
}

// Step 3: the registers into the shared tiles (A zeroed beforehand by the whole block).
template <int TM, int TN, int RV>
__device__ __forceinline__ void tc_store(const TcParams& p, unsigned short* a, unsigned short* b,
                                         const TcTileRegs<TN, RV>& regs, int run0, int nvec) {
#pragma unroll
  for (int i = 0; i < RV; ++i) {
    const int v = threadIdx.x + i * kTcThreads;
    if (v < nvec) tc_scatter<TM>(a, regs.words[i]);
  }
  // a tile denser than the registers hold: the rest straight from global memory
  const uint4* w = reinterpret_cast<const uint4*>(p.words + run0);
  for (int v = threadIdx.x + RV * kTcThreads; v < nvec; v += kTcThreads) tc_scatter<TM>(a, __ldg(w + v));
  constexpr int kPairStep = kTcThreads / TN;
  const int n_local = (int)threadIdx.x % TN;
#pragma unroll
  for (int j = 0; j < TN / 4; ++j) {
    const int kp = (int)threadIdx.x / TN + j * kPairStep;
    *reinterpret_cast<unsigned*>(b + n_local * kBPitch + 2 * kp) = regs.b[j];
  }
}

template <int TM>
__device__ __forceinline__ void tc_zero(unsigned short* a) {
  constexpr int kVecs = (TM * kAPitch + 8) / 8;
  uint4* a4 = reinterpret_cast<uint4*>(a);
  uint4 z;
  z.x = z.y = z.z = z.w = 0u;
  for (int i = threadIdx.x; i < kVecs; i += kTcThreads) a4[i] = z;
}

__device__ __forceinline__ unsigned tc_word(const unsigned short* s, int idx) {
  return *reinterpret_cast<const unsigned*>(s + idx);
}

#if !CSR_TC_MMA
// Before sm_80: d = a * b + c for this lane's elements of the m16n8k16 fragments, with FMAs on
// the shared tiles (the fragment registers are not exchanged across lanes).
__device__ __forceinline__ void tc_fma_fragment(float d[4], const unsigned short* a, const unsigned short* b, int kk,
                                                int lane) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll 1
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
    float s = 0.f;
#pragma unroll 1
    for (int k = 0; k < 16; ++k)
      s += half_bits(a[row * kAPitch + kk + k]) * half_bits(b[col * kBPitch + kk + k]);
    d[i] += s;
  }
}
#endif

// TM rows (64 or 128) x TN pixels (16, 32 or 64) a block; RV word vectors a thread in registers.
template <int TM, int TN, int RV>
__global__ void __launch_bounds__(kTcThreads) csr_tc(const TcParams p) {
  constexpr int kWarpRows = TM / 4;
  constexpr int kMT = kWarpRows / 16;  // m16 tiles a warp
  constexpr int kNT = TN / 8;          // n8 tiles a warp
  constexpr int kABuf = TM * kAPitch + 8;  // + the scratch slot padding words aim at
  constexpr int kBBuf = TN * kBPitch;
  CSR_DYNAMIC_SMEM(smem_f);
  unsigned short* smem = reinterpret_cast<unsigned short*>(smem_f);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (int)blockIdx.x * TN, mt = (int)blockIdx.y;
  const int img = (int)blockIdx.z / p.nsplit, split = (int)blockIdx.z - img * p.nsplit;
  const int kt0 = split * p.tiles_per_split;
  const int kt1 = min(p.k_tiles, kt0 + p.tiles_per_split);
  const unsigned short* x = static_cast<const unsigned short*>(p.x) + img * p.x_batch;

  // this thread's gather column
  const int n = n0 + (int)threadIdx.x % TN;
  const bool n_ok = n < p.N;
  const int oy = n_ok ? n / p.Wo : 0, ox = n_ok ? n - (n / p.Wo) * p.Wo : 0;
  const int iy0 = oy * p.sh - p.ph, ix0 = ox * p.sw - p.pw;

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  TcTileRegs<TN, RV> regs;
  int run0 = 0, nvec = 0;
  if (kt0 < kt1) {
    tc_zero<TM>(smem);
    tc_load<TM, TN, RV>(p, x, mt, kt0, iy0, ix0, n_ok, regs, run0, nvec);
    __syncthreads();
    tc_store<TM, TN, RV>(p, smem, smem + 2 * kABuf, regs, run0, nvec);
    __syncthreads();
  }
  for (int kt = kt0; kt < kt1; ++kt) {
    const int cur = (kt - kt0) & 1;
    unsigned short* a_cur = smem + cur * kABuf;
    unsigned short* a_next = smem + (cur ^ 1) * kABuf;
    unsigned short* b_cur = smem + 2 * kABuf + cur * kBBuf;
    unsigned short* b_next = smem + 2 * kABuf + (cur ^ 1) * kBBuf;
    const bool more = kt + 1 < kt1;
    if (more) {  // step 1 for the next tile; its A buffer was last read before the previous barrier
      tc_load<TM, TN, RV>(p, x, mt, kt + 1, iy0, ix0, n_ok, regs, run0, nvec);
      tc_zero<TM>(a_next);
    }
    // step 2
    const unsigned short* a = a_cur + warp * kWarpRows * kAPitch;
    const unsigned short* b = b_cur;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
#if CSR_TC_MMA
      const int g = lane >> 2, q = lane & 3;
      unsigned bf[kNT][2];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        bf[j][0] = tc_word(b, (j * 8 + g) * kBPitch + kk + 2 * q);
        bf[j][1] = tc_word(b, (j * 8 + g) * kBPitch + kk + 8 + 2 * q);
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const unsigned short* ai = a + i * 16 * kAPitch;
        unsigned af[4];
        af[0] = tc_word(ai, g * kAPitch + kk + 2 * q);
        af[1] = tc_word(ai, (g + 8) * kAPitch + kk + 2 * q);
        af[2] = tc_word(ai, g * kAPitch + kk + 8 + 2 * q);
        af[3] = tc_word(ai, (g + 8) * kAPitch + kk + 8 + 2 * q);
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma_m16n8k16_f16f32(acc[i][j], af, bf[j], acc[i][j]);
      }
#else
#pragma unroll 1
      for (int i = 0; i < kMT; ++i)
#pragma unroll 1
        for (int j = 0; j < kNT; ++j) tc_fma_fragment(acc[i][j], a + i * 16 * kAPitch, b + j * 8 * kBPitch, kk, lane);
#endif
    }
    __syncthreads();  // the next A buffer is zeroed; this tile's buffers are free after step 2
    if (more) tc_store<TM, TN, RV>(p, a_next, b_next, regs, run0, nvec);
    __syncthreads();
  }

  // Epilogue: this lane's accumulators are rows g, g + 8 and columns 2q, 2q + 1 of each
  // 16 x 8 fragment.
  const bool first = !p.accumulate || split == 0;
  const __half* res = first ? static_cast<const __half*>(p.residual) : nullptr;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = mt * TM + warp * kWarpRows + i * 16 + g + 8 * h;
      if (m >= p.M) continue;
      const float bias = (p.bias != nullptr && first) ? p.bias[m] : 0.f;
      const long long yrow = img * p.y_batch + (long long)m * p.y_cs;
      const __half* rrow = res != nullptr ? res + img * p.r_batch + (long long)m * p.r_cs : nullptr;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int c = n0 + j * 8 + 2 * q;
        float v[2] = {acc[i][j][2 * h] + bias, acc[i][j][2 * h + 1] + bias};
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (rrow != nullptr && c + e < p.N) v[e] += __half2float(rrow[(long long)(c + e) * p.r_ps]);
        if (p.accumulate) {
          float* out = static_cast<float*>(p.y) + yrow;
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (c + e < p.N) atomicAdd(out + (long long)(c + e) * p.y_ps, v[e]);
          continue;
        }
        __half* out = static_cast<__half*>(p.y) + yrow;
        if (p.relu) v[0] = fmaxf(v[0], 0.f), v[1] = fmaxf(v[1], 0.f);
        const unsigned short h0 = __half_as_ushort(__float2half_rn(v[0]));
        const unsigned short h1 = __half_as_ushort(__float2half_rn(v[1]));
        if (c + 1 < p.N && p.y_ps == 1 && ((yrow + c) & 1) == 0) {  // the pair as one 32-bit store
          *reinterpret_cast<unsigned*>(out + c) = (unsigned)h0 | ((unsigned)h1 << 16);
        } else {
          if (c < p.N) out[(long long)c * p.y_ps] = __ushort_as_half(h0);
          if (c + 1 < p.N) out[(long long)(c + 1) * p.y_ps] = __ushort_as_half(h1);
        }
      }
    }
  }
}

}  // namespace csr
