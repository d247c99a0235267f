// Test-only kernels for runtimes/cuda/mma.cuh: one warp loads one tile from plain row-major arrays into
// fragment registers by the PTX ISA's layouts (written out in mma.cuh), runs one mma and stores D.
// Run on the CPU emulator (tests/test_mma.py) and, in the GPU suite, on the card: the same source
// checks the emulation and the hardware against a torch matmul.
#include "mma.cuh"

// D[16][8] = A[16][16] B[16][8] + C; `bt` is B transposed ([8][16], B column-major), C and D row-major.
__global__ void mma_dense_tile(const __half* a, const __half* bt, const float* c, float* d) {
  const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  unsigned ar[4], br[2];
  float cr[4], dr[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i & 1), col = 2 * t + 8 * (i / 2);
    ar[i] = pack_halves(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  for (unsigned j = 0; j < 2; ++j) {
    const unsigned k = 2 * t + 8 * j;
    br[j] = pack_halves(bt[g * 16 + k], bt[g * 16 + k + 1]);
  }
  for (unsigned i = 0; i < 4; ++i) cr[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k16_f16f32(dr, ar, br, cr);
  for (unsigned i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)] = dr[i];
}

// D[16][8] = A[16][32] B[32][8] + C with A 2:4 in the portable layout (passes/two_four/layout.py):
// `values` [16][16] (two kept values per group of 4, ascending), `positions` [16][4] bytes (2 bits per
// kept value, 4 per byte, first slot in the low bits); `bt` is B transposed ([8][32]).
__global__ void mma_sp_tile(const __half* values, const unsigned char* positions, const __half* bt, const float* c,
                            float* d) {
  const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  unsigned ar[4], br[4];
  float cr[4], dr[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i & 1), col = 2 * t + 8 * (i / 2);  // compressed column
    ar[i] = pack_halves(values[row * 16 + col], values[row * 16 + col + 1]);
  }
  for (unsigned j = 0; j < 4; ++j) {
    const unsigned k = 2 * t + 8 * j;
    br[j] = pack_halves(bt[g * 32 + k], bt[g * 32 + k + 1]);
  }
  // The portable positions of groups 4t..4t+3 of a row are bytes 2t, 2t+1: already PTX's 16 bits.
  // Lanes t = 2, 3 supply nothing (selector 0); an invalid word there must be ignored.
  unsigned meta = 0;
  if (t < 2) {
    const unsigned lo = positions[g * 4 + 2 * t] | (positions[g * 4 + 2 * t + 1] << 8);
    const unsigned hi = positions[(g + 8) * 4 + 2 * t] | (positions[(g + 8) * 4 + 2 * t + 1] << 8);
    meta = lo | (hi << 16);
  }
  for (unsigned i = 0; i < 4; ++i) cr[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)];
  mma_sp_m16n8k32_f16f32(dr, ar, br, cr, meta);
  for (unsigned i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + (i & 1)] = dr[i];
}
