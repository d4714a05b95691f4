// CUDA kernel of the fused TTT-MLP ops: one thread block per (batch, head) chain runs the chain
// math of ttt_mlp_chain.h / ttt_mlp_backward.h. W1 [D, F] and W2 [F, D] (fp32, 2 D F floats =
// 128 KB at D = 64, F = 256) plus the tiles exceed shared memory, so the chain scratch lives in a
// global slice per chain (L2-resident), given by the caller.
#pragma once
#include "ttt_chain_launch.cuh"
#include "ttt_mlp_chain.h"

namespace ttt {

template <typename scalar_t, int kD, int kF, bool kBackward>
struct MLPChain {
  using Params = MLPParams;
  static constexpr bool kMayUseShared = false;
  static __device__ __forceinline__ void run(const MLPParams& p, float* ws, int bi, int hi) {
    if constexpr (kBackward) {
      mlp_bwd_chain<scalar_t, float>(p, ws, kD, kF, bi, hi);
    } else {
      mlp_fwd_chain<scalar_t, float>(p, ws, kD, kF, bi, hi);
    }
  }
};

// One instantiation's entry for the dispatcher (ttt_mlp_cuda.cu): launch, or ask whether its
// scratch runs from shared memory. Returns "" or the reason.
template <typename scalar_t, int kD, int kF, bool kBackward>
const char* launch_mlp(const MLPParams& p, ChainCall call) {
  using Chain = MLPChain<scalar_t, kD, kF, kBackward>;
  return run_chain<Chain>(p, mlp_workspace_elems(kD, kF, p.mini_batch_size, kBackward), call);
}

}  // namespace ttt

// One explicit instantiation per (dtype, D, F): forward and backward.
#define TTT_INSTANTIATE_MLP(scalar_t, kD, kF)                                       \
  namespace ttt {                                                                    \
  template const char* launch_mlp<scalar_t, kD, kF, false>(const MLPParams&, ChainCall); \
  template const char* launch_mlp<scalar_t, kD, kF, true>(const MLPParams&, ChainCall); \
  }
