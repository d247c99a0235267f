// 2:4 sparse implicit-GEMM convolution on sparse tensor cores (mma.sp, sm_80+), fp16 in, fp32 accumulate.
//
//   Y[n, m] = sum_k A[m, k] B[k, n]   M = Cout, K = kh*kw*Cin (tap-major: k = (r*kw + s)*Cin + c),
//                                     N = batch*Ho*Wo, B[k, n] = X[img, ho*sh - pt + r*dh, wo*sw - pl + s*dw, c]
//
// * Activations NHWC fp16, output NHWC fp16 (Y[n, m] at n*M + m); im2col is never materialised.
// * A, the 2:4 weight, arrives in register order (built on the host by runtimes/cusparselt/mma_conv.py from
//   the portable layout): per 16-row tile mt and 32-column chunk kc, lane l's four fragment registers as
//   one uint4 (`wfrag[(mt*KC + kc)*32 + l]`) and its metadata word (`wmeta[...]`, PTX's layout, see
//   runtimes/cuda/mma.cuh): one coalesced 16-byte load per lane and m-tile, no shared memory for A. K is
//   padded to a multiple of 32, M to a multiple of 16, with zero values (metadata positions 0, 1).
// * A K chunk is 32 consecutive columns of the tap-major K: a run of input channels of one tap when
//   Cin % 32 == 0, otherwise it can straddle two taps. It is gathered in groups of four channels (2:4
//   needs Cin % 4 == 0, so a group never straddles a tap and is one 8-byte load), zero outside the
//   image (padding), stride and dilation honoured, into shared memory as sB[n][k] (pitch 40 halves:
//   the fragment reads of a warp hit 32 distinct banks). Double-buffered through registers: the next
//   chunk's loads are issued before the current chunk's mma and stored after them (no cp.async, so the
//   same code builds for every architecture).
// * Block: 128 threads, 4 warps as 2 (M) x 2 (N), block tile 64 x 64; a warp computes 2 m-tiles x 4
//   n-tiles of 16 x 8, 8 mma.sp per chunk.
// * Epilogue fused at the store: bias, residual (NHWC, the output's shape), ReLU. Split-K (blockIdx.z
//   takes chunks_per_split chunks) adds fp32 partial sums into a zeroed workspace [N, M] with atomics;
//   conv2to4_finish then applies the epilogue and writes fp16.
// * Before sm_80 the mma traps (mma.cuh): the host never launches this there, but the source compiles.
#include "mma.cuh"

struct Conv2to4Params {       // mirrored by Conv2to4Params in runtimes/cusparselt/mma_conv.py: same order and types
  const uint4* wfrag;         // [Mt][KC][32] A fragments in register order
  const unsigned* wmeta;      // [Mt][KC][32] metadata words (lanes with t >= 2: unused)
  const __half* x;            // NHWC [batch, H, W, Cin]
  const float* bias;          // [M] or null
  const __half* residual;     // NHWC [batch, Ho, Wo, M] or null
  __half* y;                  // NHWC [batch, Ho, Wo, M]
  float* ws;                  // split-K: fp32 [N, M], zeroed; null without split-K
  int M, Mt, K, KC;           // output channels, 16-row tiles, K = kh*kw*Cin, 32-column chunks
  int Cin, H, W, Ho, Wo, N;   // N = batch*Ho*Wo
  int kw, sh, sw, pt, pl, dh, dw;
  int chunks_per_split;
  int relu;
};

namespace two_four {
constexpr int kThreads = 128, kBM = 64, kBN = 64, kKC = 32, kPitch = 40;
constexpr int kLoads = kKC / 4 * kBN / kThreads;  // 8-byte gathers per thread and chunk (4)

struct Pixel {  // one output pixel's input origin, for the gather
  long long base;  // img*H*W*Cin; -1 past N
  int hi, wi;      // ho*sh - pt, wo*sw - pl
};

__device__ __forceinline__ uint2 gather(const Conv2to4Params& p, const Pixel& px, int kc, int grp) {
  const int k = kc * kKC + grp * 4;
  uint2 v = {0u, 0u};
  if (px.base < 0 || k >= p.K) return v;
  const int tap = k / p.Cin, c = k - tap * p.Cin;
  const int r = tap / p.kw, s = tap - r * p.kw;
  const int h = px.hi + r * p.dh, w = px.wi + s * p.dw;
  if (h < 0 || h >= p.H || w < 0 || w >= p.W) return v;
  return *reinterpret_cast<const uint2*>(p.x + px.base + (static_cast<long long>(h) * p.W + w) * p.Cin + c);
}
}  // namespace two_four

extern "C" __global__ void __launch_bounds__(128) conv2to4_mma(const Conv2to4Params p) {
  using namespace two_four;
  __align__(16) __shared__ __half sB[2][kBN * kPitch];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp / 2, wn = warp % 2;
  const int n0 = blockIdx.x * kBN;
  const int mt0 = blockIdx.y * (kBM / 16) + wm * 2;  // this warp's first m-tile
  const int kc_begin = blockIdx.z * p.chunks_per_split;
  const int kc_end = min(p.KC, kc_begin + p.chunks_per_split);

  // gather slots: idx = tid + kThreads*i -> group idx % 8 (fast: 8 lanes read 64 contiguous bytes), pixel idx / 8
  Pixel px[kLoads];
  for (int i = 0; i < kLoads; ++i) {
    const int n = n0 + (tid + kThreads * i) / 8;
    if (n < p.N) {
      const int img = n / (p.Ho * p.Wo), rest = n - img * p.Ho * p.Wo;
      const int ho = rest / p.Wo, wo = rest - ho * p.Wo;
      px[i] = Pixel{static_cast<long long>(img) * p.H * p.W * p.Cin, ho * p.sh - p.pt, wo * p.sw - p.pl};
    } else {
      px[i] = Pixel{-1, 0, 0};
    }
  }
  const int grp = tid % 8;
  uint2 staged[kLoads];

  float acc[2][4][4];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  if (kc_begin < kc_end) {
    for (int i = 0; i < kLoads; ++i) staged[i] = gather(p, px[i], kc_begin, grp);
    for (int i = 0; i < kLoads; ++i)
      *reinterpret_cast<uint2*>(&sB[0][((tid + kThreads * i) / 8) * kPitch + grp * 4]) = staged[i];
  }
  __syncthreads();
  int buf = 0;
  for (int kc = kc_begin; kc < kc_end; ++kc) {
    const bool more = kc + 1 < kc_end;
    if (more)  // the next chunk's loads fly while this one multiplies
      for (int i = 0; i < kLoads; ++i) staged[i] = gather(p, px[i], kc + 1, grp);
    for (int i = 0; i < 2; ++i) {
      const int mt = mt0 + i;
      if (mt >= p.Mt) continue;  // warp-uniform: the whole warp skips (Cout past the last tile)
      const long long at = (static_cast<long long>(mt) * p.KC + kc) * 32 + lane;
      const uint4 af = p.wfrag[at];
      const unsigned a[4] = {af.x, af.y, af.z, af.w};
      const unsigned meta = p.wmeta[at];
      for (int j = 0; j < 4; ++j) {
        const __half* col = &sB[buf][(wn * 32 + j * 8 + g) * kPitch + 2 * t];
        const unsigned b[4] = {*reinterpret_cast<const unsigned*>(col), *reinterpret_cast<const unsigned*>(col + 8),
                               *reinterpret_cast<const unsigned*>(col + 16), *reinterpret_cast<const unsigned*>(col + 24)};
        mma_sp_m16n8k32_f16f32(acc[i][j], a, b, acc[i][j], meta);
      }
    }
    if (more)
      for (int i = 0; i < kLoads; ++i)
        *reinterpret_cast<uint2*>(&sB[buf ^ 1][((tid + kThreads * i) / 8) * kPitch + grp * 4]) = staged[i];
    __syncthreads();
    buf ^= 1;
  }

  // epilogue: lane holds D[g (+8)][2t, 2t+1] of each 16 x 8 tile
  for (int i = 0; i < 2; ++i) {
    const int mt = mt0 + i;
    if (mt >= p.Mt) continue;
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) {
        const int m = mt * 16 + g + 8 * (e / 2);
        const int n = n0 + wn * 32 + j * 8 + 2 * t + (e & 1);
        if (m >= p.M || n >= p.N) continue;
        const long long o = static_cast<long long>(n) * p.M + m;
        float v = acc[i][j][e];
        if (p.ws != nullptr) {
          atomicAdd(p.ws + o, v);
          continue;
        }
        if (p.bias != nullptr) v += p.bias[m];
        if (p.residual != nullptr) v += __half2float(p.residual[o]);
        if (p.relu) v = fmaxf(v, 0.f);
        p.y[o] = __float2half_rn(v);
      }
  }
}

// Split-K's finishing pass: Y = epilogue(workspace), one thread per output element.
extern "C" __global__ void conv2to4_finish(const Conv2to4Params p) {
  const long long o = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= static_cast<long long>(p.N) * p.M) return;
  const int m = static_cast<int>(o % p.M);
  float v = p.ws[o];
  if (p.bias != nullptr) v += p.bias[m];
  if (p.residual != nullptr) v += __half2float(p.residual[o]);
  if (p.relu) v = fmaxf(v, 0.f);
  p.y[o] = __float2half_rn(v);
}
