// CUDA kernel of the fused Titans-form TTT-Linear ops: one thread block per (batch, head) chain
// runs the chain math of ttt_titans_chain.h / ttt_titans_backward.h; P, the current weights and
// the momentum (fp32) plus the tiles live in shared memory when they fit, else in a global slice.
#pragma once
#include <cuda_runtime.h>

#include "ttt_titans_chain.h"

namespace ttt {

constexpr int kTitansThreads = 256;

template <typename scalar_t, int kD, bool kBackward>
__global__ void __launch_bounds__(kTitansThreads, 1)
    titans_chain_kernel(const TitansParams p, float* ws_global, int64_t ws_elems) {
  extern __shared__ __align__(16) float ttt_smem[];
  float* ws = ws_global != nullptr ? ws_global + static_cast<int64_t>(blockIdx.x) * ws_elems : ttt_smem;
  const int bi = static_cast<int>(blockIdx.x) / p.H, hi = static_cast<int>(blockIdx.x) % p.H;
  if constexpr (kBackward) {
    titans_bwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
  } else {
    titans_fwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
  }
}

// Launches on p.stream; no host synchronisation. Returns "" or the reason it could not launch.
template <typename scalar_t, int kD, bool kBackward>
const char* launch_titans(const TitansParams& p) {
  const int64_t elems = titans_workspace_elems(kD, p.mini_batch_size, kBackward);
  float* ws = static_cast<float*>(p.workspace);
  size_t smem = 0;
  auto kernel = titans_chain_kernel<scalar_t, kD, kBackward>;
  if (ws == nullptr) {
    smem = static_cast<size_t>(elems) * sizeof(float);
    if (static_cast<int64_t>(smem) > p.max_smem)
      return "the Titans chain scratch does not fit in shared memory and no global workspace was given";
    if (smem > 48 * 1024) {
      cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return cudaGetErrorString(err);
    }
  }
  const int blocks = p.B * p.H;
  if (blocks == 0) return "";
  kernel<<<blocks, kTitansThreads, smem, reinterpret_cast<cudaStream_t>(p.stream)>>>(p, ws, elems);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace ttt

// One explicit instantiation per (dtype, head dim): forward and backward.
#define TTT_INSTANTIATE_TITANS(scalar_t, kD)                                      \
  namespace ttt {                                                                  \
  template const char* launch_titans<scalar_t, kD, false>(const TitansParams&);    \
  template const char* launch_titans<scalar_t, kD, true>(const TitansParams&);     \
  }
