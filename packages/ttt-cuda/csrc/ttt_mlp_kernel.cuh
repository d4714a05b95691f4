// CUDA kernel of the fused TTT-MLP ops: one thread block per (batch, head) chain runs the chain
// math of ttt_mlp_chain.h / ttt_mlp_backward.h. W1 [D, F] and W2 [F, D] (fp32, 2 D F floats =
// 128 KB at D = 64, F = 256) plus the tiles exceed shared memory, so the chain scratch lives in a
// global slice per chain (L2-resident), given by the caller.
#pragma once
#include <cuda_runtime.h>

#include "ttt_mlp_chain.h"

namespace ttt {

constexpr int kMLPThreads = 256;

template <typename scalar_t, int kD, int kF, bool kBackward>
__global__ void __launch_bounds__(kMLPThreads, 1)
    mlp_chain_kernel(const MLPParams p, float* ws_global, int64_t ws_elems) {
  extern __shared__ __align__(16) float ttt_smem[];
  float* ws = ws_global != nullptr ? ws_global + static_cast<int64_t>(blockIdx.x) * ws_elems : ttt_smem;
  const int bi = static_cast<int>(blockIdx.x) / p.H, hi = static_cast<int>(blockIdx.x) % p.H;
  if constexpr (kBackward) {
    mlp_bwd_chain<scalar_t, float>(p, ws, kD, kF, bi, hi);
  } else {
    mlp_fwd_chain<scalar_t, float>(p, ws, kD, kF, bi, hi);
  }
}

// Launches on p.stream; no host synchronisation. Returns "" or the reason it could not launch.
template <typename scalar_t, int kD, int kF, bool kBackward>
const char* launch_mlp(const MLPParams& p) {
  const int64_t elems = mlp_workspace_elems(kD, kF, p.mini_batch_size, kBackward);
  float* ws = static_cast<float*>(p.workspace);
  size_t smem = 0;
  auto kernel = mlp_chain_kernel<scalar_t, kD, kF, kBackward>;
  if (ws == nullptr) {
    smem = static_cast<size_t>(elems) * sizeof(float);
    if (static_cast<int64_t>(smem) > p.max_smem)
      return "the MLP chain scratch does not fit in shared memory and no global workspace was given";
    if (smem > 48 * 1024) {
      cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return cudaGetErrorString(err);
    }
  }
  const int blocks = p.B * p.H;
  if (blocks == 0) return "";
  kernel<<<blocks, kMLPThreads, smem, reinterpret_cast<cudaStream_t>(p.stream)>>>(p, ws, elems);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace ttt

// One explicit instantiation per (dtype, D, F): forward and backward.
#define TTT_INSTANTIATE_MLP(scalar_t, kD, kF)                                       \
  namespace ttt {                                                                    \
  template const char* launch_mlp<scalar_t, kD, kF, false>(const MLPParams&);        \
  template const char* launch_mlp<scalar_t, kD, kF, true>(const MLPParams&);         \
  }
