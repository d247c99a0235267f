// A minimal CUDA emulator for tests: compiles kernel sources as host C++ (g++ -std=c++20)
// and runs every CUDA thread of a block as a host thread, blocks one after another.
// Supports what sparsecnn's kernels use: threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// dynamic shared memory, __shfl_xor_sync with a full mask, __ldg, atomicAdd(float, float2, float4), fp16
// conversions, the CUDA vector types and the tensor-core mma of runtimes/cuda/mma.cuh (at the end).
// Kernels must not return early before a barrier.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <bit>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <thread>
#include <vector>

// Device code sees the H100's architecture unless the including source defines another first
// (e.g. 530, the Jetson Nano's): arch-guarded paths run here as they run on the card.
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared arrays: one copy for all host threads, which run one block at a time.
#define __shared__ static

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

struct __half { unsigned short bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

using std::max;
using std::min;

template <typename T> inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

namespace emu {
struct BlockState {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> exchange;
  std::vector<unsigned> mma_regs;  // per lane: the registers an emulated mma reads from the whole warp
  void* smem;
  std::mutex subwarp_mutex;  // __syncwarp(mask): one barrier per (warp, mask), made on first use
  std::map<unsigned long long, std::unique_ptr<std::barrier<>>> subwarp_barriers;
  unsigned nthreads = 0;
};
inline thread_local BlockState* tl_state = nullptr;
template <typename T> inline T* dynamic_smem() { return static_cast<T*>(tl_state->smem); }

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  const unsigned nt = block.x * block.y * block.z;
  std::barrier<> bar(nt);
  BlockState state;
  state.block_barrier = &bar;
  for (unsigned w = 0; w < (nt + 31) / 32; ++w)
    state.warp_barriers.emplace_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
  state.exchange.assign(nt, 0.f);
  state.mma_regs.assign(((nt + 31) / 32) * 32 * 9, 0u);
  state.nthreads = nt;
  std::vector<float4> smem((smem_bytes + 15) / 16 + 1);
  state.smem = smem.data();
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      tl_state = &state;
      threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      blockDim = block;
      gridDim = grid;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = uint3{bx, by, bz};
            kernel(args...);
            bar.arrive_and_wait();
          }
    });
  }
  for (auto& th : threads) th.join();
}
// Launch with the parameter block behind `params` (its type: the kernel's parameter type).
template <typename P>
void launch_params(void (*kernel)(P), dim3 grid, dim3 block, size_t smem_bytes, const void* params) {
  launch(kernel, grid, block, smem_bytes, *static_cast<const std::remove_cv_t<std::remove_reference_t<P>>*>(params));
}
}  // namespace emu

inline void __syncthreads() { emu::tl_state->block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*full mask only*/, float v, int lane_mask) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned warp = t / 32, lane = t % 32;
  auto& bar = *emu::tl_state->warp_barriers[warp];
  emu::tl_state->exchange[t] = v;
  bar.arrive_and_wait();
  const float r = emu::tl_state->exchange[warp * 32 + (lane ^ (unsigned)lane_mask)];
  bar.arrive_and_wait();
  return r;
}

// Barrier of the threads of this warp named in `mask` (all of them must call it with that mask).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned warp = t / 32;
  auto& st = *emu::tl_state;
  const unsigned live = std::min(32u, st.nthreads - 32 * warp);
  const unsigned lanes = live == 32 ? 0xffffffffu : ((1u << live) - 1u);
  std::barrier<>* bar;
  {
    std::lock_guard<std::mutex> lock(st.subwarp_mutex);
    auto& slot = st.subwarp_barriers[(static_cast<unsigned long long>(warp) << 32) | mask];
    if (!slot) slot = std::make_unique<std::barrier<>>(std::popcount(mask & lanes));
    bar = slot.get();
  }
  bar->arrive_and_wait();
}

// Warp votes, shuffles by lane, bit tricks, cache-hinted loads/stores, fences and integer atomics
// (the ECR kernels). Every lane of the warp must take part (full mask).
inline unsigned __ballot_sync(unsigned /*full mask only*/, int pred) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned warp = t / 32;
  auto& st = *emu::tl_state;
  auto& bar = *st.warp_barriers[warp];
  st.exchange[t] = pred ? 1.f : 0.f;
  bar.arrive_and_wait();
  unsigned m = 0;
  const unsigned live = std::min(32u, st.nthreads - 32 * warp);
  for (unsigned l = 0; l < live; ++l)
    if (st.exchange[warp * 32 + l] != 0.f) m |= 1u << l;
  bar.arrive_and_wait();
  return m;
}
inline float __shfl_sync(unsigned /*full mask only*/, float v, int src_lane) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned warp = t / 32;
  auto& bar = *emu::tl_state->warp_barriers[warp];
  emu::tl_state->exchange[t] = v;
  bar.arrive_and_wait();
  const float r = emu::tl_state->exchange[warp * 32 + ((unsigned)src_lane & 31u)];
  bar.arrive_and_wait();
  return r;
}
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(int x) { return x ? std::countr_zero((unsigned)x) + 1 : 0; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
// sm_90's vector atomics: each element is one atomic add (as on the card: not one atomic whole).
inline float2 atomicAdd(float2* p, float2 v) { return float2{atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y)}; }
inline float4 atomicAdd(float4* p, float4 v) {
  return float4{atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y), atomicAdd(&p->z, v.z), atomicAdd(&p->w, v.w)};
}

// Tensor-core mma (runtimes/cuda/mma.cuh), fragment by fragment as the PTX ISA lays them out (the
// layouts are written out in mma.cuh): each lane deposits its A, B (and metadata) registers in its
// warp's scratch, then computes its own four outputs from all 32 lanes' registers. fp16 x fp16
// products are exact in fp32; each output sums them in fp32 in k order (the card's order is not
// specified, so results may differ from it in the last bits). Every lane of a full warp must call.
namespace emu {
constexpr unsigned kMmaWords = 9;  // a[4], b[4], metadata
inline float mma_half(unsigned reg, unsigned which) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(which ? reg >> 16 : reg & 0xffffu)));
}
// This lane's scratch row, after checking the warp is whole; sets `lane` and the warp's first row.
inline unsigned* mma_deposit(unsigned& lane, unsigned*& warp_regs) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned warp = t / 32;
  lane = t % 32;
  auto& st = *tl_state;
  if (st.nthreads - 32 * warp < 32) {
    std::fprintf(stderr, "emulated mma: warp %u has fewer than 32 threads\n", warp);
    std::abort();
  }
  warp_regs = st.mma_regs.data() + warp * 32 * kMmaWords;
  return warp_regs + lane * kMmaWords;
}
inline void mma_warp_barrier() {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  tl_state->warp_barriers[t / 32]->arrive_and_wait();
}

inline void mma_m16n8k16_f16f32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
  unsigned lane, *regs;
  unsigned* mine = mma_deposit(lane, regs);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
  mma_warp_barrier();
  const unsigned g = lane / 4, tq = lane % 4;
  float out[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * tq + (i & 1);
    float acc = c[i];
    for (unsigned k = 0; k < 16; ++k) {
      // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k & 1
      const unsigned* ar = regs + ((row % 8) * 4 + (k % 8) / 2) * kMmaWords;
      const float av = mma_half(ar[(row / 8) + 2 * (k / 8)], k & 1);
      // B[k][col]: lane col * 4 + (k % 8) / 2, register k / 8, half k & 1
      const unsigned* br = regs + (col * 4 + (k % 8) / 2) * kMmaWords;
      const float bv = mma_half(br[4 + k / 8], k & 1);
      acc += av * bv;
    }
    out[i] = acc;
  }
  mma_warp_barrier();  // nobody overwrites the scratch before every lane has read it
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline void mma_sp_m16n8k32_f16f32(float d[4], const unsigned a[4], const unsigned b[4], const float c[4],
                                   unsigned meta) {
  unsigned lane, *regs;
  unsigned* mine = mma_deposit(lane, regs);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  for (int i = 0; i < 4; ++i) mine[4 + i] = b[i];
  mine[8] = meta;
  mma_warp_barrier();
  const unsigned g = lane / 4, tq = lane % 4;
  float out[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * tq + (i & 1);
    float acc = c[i];
    for (unsigned q = 0; q < 8; ++q) {  // the 4-column groups of the row
      // kept values: lane (row % 8) * 4 + q % 4, register (row >= 8) + 2 (q >= 4), halves 0 and 1
      const unsigned areg = regs[((row % 8) * 4 + q % 4) * kMmaWords + (row / 8) + 2 * (q / 4)];
      // metadata (selector 0): lane (row % 8) * 4 + q / 4, bits 16 (row >= 8) + 4 (q % 4)
      const unsigned m = regs[((row % 8) * 4 + q / 4) * kMmaWords + 8] >> (16 * (row / 8) + 4 * (q % 4));
      const unsigned p0 = m & 3u, p1 = (m >> 2) & 3u;
      if (p0 >= p1) {  // ordered metadata: two distinct positions, ascending (mma.cuh)
        std::fprintf(stderr, "emulated mma.sp: row %u group %u metadata %u,%u not ascending\n", row, q, p0, p1);
        std::abort();
      }
      for (unsigned j = 0; j < 2; ++j) {
        const unsigned k = 4 * q + (j ? p1 : p0);
        // B[k][col]: lane col * 4 + (k % 8) / 2, register k / 8, half k & 1
        const unsigned* br = regs + (col * 4 + (k % 8) / 2) * kMmaWords;
        acc += mma_half(areg, j) * mma_half(br[4 + k / 8], k & 1);
      }
    }
    out[i] = acc;
  }
  mma_warp_barrier();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
}  // namespace emu
