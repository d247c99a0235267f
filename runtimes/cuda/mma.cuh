// Tensor-core fragment helpers: the one home of sparsecnn's inline-PTX `mma` wrappers.
//
//   mma_m16n8k16_f16f32     D[16x8] = A[16x16] B[16x8] + C      (dense, fp16 in, fp32 accumulate)
//   mma_sp_m16n8k32_f16f32  D[16x8] = A[16x32] B[32x8] + C      (A 2:4 sparse, stored as 16x16 + metadata)
//
// Fragments are the PTX ISA's (9.7.14.5.8 mma.m16n8k16, 9.7.14.6.2.2 sparse mma.m16n8k32 .f16):
// with g = lane / 4 and t = lane % 4, and a register holding two fp16 values (the lower column/k
// index in the low 16 bits, see pack_halves),
//
//   dense A (row):  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   dense B (col):  b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C and D:        c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
//
//   sparse A:       the dense-A layout over the compressed 16x16 matrix: a[0] = the two kept
//                   values of row g's 4-column group t (columns 4t..4t+3), a[1] row g+8's,
//                   a[2] / a[3] the same for group t+4 (columns 16+4t..16+4t+3)
//   sparse B:       b[j] = B[2t+8j, 2t+8j+1][g], j = 0..3
//   metadata:       sparsity selector 0: lanes with t = 0 and t = 1 of each quad supply it. Lane
//                   (g, t) holds, in bits 0-15, row g's groups 4t..4t+3 and in bits 16-31 row
//                   g+8's, 4 bits per group (group 4t+i at bits 4i..4i+3 of the half): the
//                   first kept value's position (0..3) in bits 0-1, the second's in bits 2-3.
//                   Lanes t = 2, 3 are ignored.
//
// Metadata ordering: every group's two positions are distinct and ascending (first < second),
// which is what PTX 8.5's `mma.sp::ordered_metadata` requires and what plain `mma.sp` computes
// the same product for. We emit plain `mma.sp`: NVRTC 12.4 (PTX ISA 8.4, CI's oldest leg) does
// not know `::ordered_metadata`, and NVRTC 13 still accepts `mma.sp` for sm_80-sm_90. The portable
// 2:4 layout (passes/two_four/layout.py) already stores positions ascending, two distinct per
// group, so host code copies them as they are.
//
// Architectures: the instructions exist from sm_80 (`has_feature(arch, "2:4 sparse tensor cores")`,
// runtimes/nvrtc.py). Older targets (Jetson Nano/TX2/Xavier, sm_53/62/72) still compile this
// header: the bodies trap, and the host never offers these kernels there.
//
// CPU emulation (tests/cuda_emu.h, SPARSECNN_EMU): each lane deposits its registers in a per-warp
// scratch and computes its own d[] from all 32 lanes' inputs by the layouts above; products of
// fp16 values are exact in fp32, sums are fp32. All 32 lanes of the warp must call (as on the card).
#pragma once
#ifdef SPARSECNN_EMU
#include "cuda_emu.h"
#else
#include <cuda_fp16.h>
#endif

// Two fp16 values as one fragment register: `lo` (the lower column / k index) in bits 0-15.
__device__ __forceinline__ unsigned pack_halves(__half lo, __half hi) {
  return static_cast<unsigned>(__half_as_ushort(lo)) | (static_cast<unsigned>(__half_as_ushort(hi)) << 16);
}

__device__ __forceinline__ void mma_m16n8k16_f16f32(float d[4], const unsigned a[4], const unsigned b[2],
                                                    const float c[4]) {
#if defined(SPARSECNN_EMU)
  emu::mma_m16n8k16_f16f32(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  (void)a; (void)b; (void)c;
  d[0] = d[1] = d[2] = d[3] = 0.f;
  __trap();  // no m16n8k16 before sm_80: the host never launches this here
#endif
}

__device__ __forceinline__ void mma_sp_m16n8k32_f16f32(float d[4], const unsigned a[4], const unsigned b[4],
                                                       const float c[4], unsigned meta) {
#if defined(SPARSECNN_EMU)
  emu::mma_sp_m16n8k32_f16f32(d, a, b, c, meta);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
      "{%12,%13,%14,%15}, %16, 0x0;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(meta));
#else
  (void)a; (void)b; (void)c; (void)meta;
  d[0] = d[1] = d[2] = d[3] = 0.f;
  __trap();  // no sparse tensor cores before sm_80: the host never launches this here
#endif
}
