// The launch every fused op shares: one thread block of kChainThreads per (batch, head) chain, its
// scratch in dynamic shared memory when it fits, else in a global slice per chain given by the
// caller. `Chain` supplies the op: `using Params = ...;` (with B, H, workspace, max_smem, stream)
// and `static __device__ void run(const Params&, float* ws, int bi, int hi)`.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ttt {

constexpr int kChainThreads = 256;

template <typename Chain>
__global__ void __launch_bounds__(kChainThreads, 1)
    chain_kernel(const typename Chain::Params p, float* ws_global, int64_t ws_elems) {
  extern __shared__ __align__(16) float ttt_smem[];
  float* ws = ws_global != nullptr ? ws_global + static_cast<int64_t>(blockIdx.x) * ws_elems : ttt_smem;
  const int bi = static_cast<int>(blockIdx.x) / p.H, hi = static_cast<int>(blockIdx.x) % p.H;
  Chain::run(p, ws, bi, hi);
}

// Launches on p.stream; no host synchronisation. `elems`: scratch floats per chain.
// Returns "" or the reason it could not launch.
template <typename Chain>
const char* launch_chain(const typename Chain::Params& p, int64_t elems) {
  float* ws = static_cast<float*>(p.workspace);
  size_t smem = 0;
  auto kernel = chain_kernel<Chain>;
  if (ws == nullptr) {
    smem = static_cast<size_t>(elems) * sizeof(float);
    if (static_cast<int64_t>(smem) > p.max_smem)
      return "the chain scratch does not fit in shared memory and no global workspace was given";
    if (smem > 48 * 1024) {
      cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return cudaGetErrorString(err);
    }
  }
  const int blocks = p.B * p.H;
  if (blocks == 0) return "";
  kernel<<<blocks, kChainThreads, smem, reinterpret_cast<cudaStream_t>(p.stream)>>>(p, ws, elems);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace ttt
