// CUDA kernel of the fused TTT-Linear ops: one thread block per (batch, head) chain runs the chain
// math of ttt_linear_chain.h; the fast weight W (fp32) and every mini-batch tile stay in shared
// memory across the whole sequence (or in a global scratch slice when they do not fit).
#pragma once
#include <cuda_runtime.h>

#include "ttt_linear_chain.h"

namespace ttt {

constexpr int kLinearThreads = 256;

template <typename scalar_t, int kD, bool kBackward>
__global__ void __launch_bounds__(kLinearThreads, 1)
    linear_chain_kernel(const LinearParams p, float* ws_global, int64_t ws_elems) {
  extern __shared__ __align__(16) float ttt_smem[];
  float* ws = ws_global != nullptr ? ws_global + static_cast<int64_t>(blockIdx.x) * ws_elems : ttt_smem;
  const int bi = static_cast<int>(blockIdx.x) / p.H, hi = static_cast<int>(blockIdx.x) % p.H;
  if constexpr (kBackward) {
    linear_bwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
  } else {
    linear_fwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
  }
}

// Launches on p.stream; no host synchronisation. Returns "" or the reason it could not launch.
template <typename scalar_t, int kD, bool kBackward>
const char* launch_linear(const LinearParams& p) {
  const int64_t elems = linear_workspace_elems(kD, p.mini_batch_size, kBackward);
  float* ws = static_cast<float*>(p.workspace);
  size_t smem = 0;
  auto kernel = linear_chain_kernel<scalar_t, kD, kBackward>;
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
  kernel<<<blocks, kLinearThreads, smem, reinterpret_cast<cudaStream_t>(p.stream)>>>(p, ws, elems);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace ttt

// One explicit instantiation per (dtype, head dim): forward and backward.
#define TTT_INSTANTIATE_LINEAR(scalar_t, kD)                                      \
  namespace ttt {                                                                  \
  template const char* launch_linear<scalar_t, kD, false>(const LinearParams&);    \
  template const char* launch_linear<scalar_t, kD, true>(const LinearParams&);     \
  }
