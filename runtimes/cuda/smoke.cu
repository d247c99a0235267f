// A tiny kernel that exercises the NVRTC path end to end (compile, load, launch on
// PyTorch's stream, fp16 headers): y = a * x + b, in fp32 and fp16.
#include <cuda_fp16.h>

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__global__ void axpb(const T* __restrict__ x, float* __restrict__ y, float a, float b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * to_float(x[i]) + b;
}
