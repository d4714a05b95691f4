// CUDA kernel of the fused TTT-Linear ops: one thread block per (batch, head) chain runs the chain
// math of ttt_linear_chain.h; the fast weight W (fp32) and every mini-batch tile stay in shared
// memory across the whole sequence (or in a global scratch slice when they do not fit).
#pragma once
#include "ttt_chain_launch.cuh"
#include "ttt_linear_chain.h"

namespace ttt {

template <typename scalar_t, int kD, bool kBackward>
struct LinearChain {
  using Params = LinearParams;
  static constexpr bool kMayUseShared = true;
  static __device__ __forceinline__ void run(const LinearParams& p, float* ws, int bi, int hi) {
    if constexpr (kBackward) {
      linear_bwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
    } else {
      linear_fwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
    }
  }
};

// One instantiation's entry for the dispatcher (ttt_linear_cuda.cu): launch, or ask whether its
// scratch runs from shared memory. Returns "" or the reason.
template <typename scalar_t, int kD, bool kBackward>
const char* launch_linear(const LinearParams& p, ChainCall call) {
  using Chain = LinearChain<scalar_t, kD, kBackward>;
  return run_chain<Chain>(p, linear_workspace_elems(kD, p.mini_batch_size, kBackward), call);
}

}  // namespace ttt

// One explicit instantiation per (dtype, head dim): forward and backward.
#define TTT_INSTANTIATE_LINEAR(scalar_t, kD)                                      \
  namespace ttt {                                                                  \
  template const char* launch_linear<scalar_t, kD, false>(const LinearParams&, ChainCall); \
  template const char* launch_linear<scalar_t, kD, true>(const LinearParams&, ChainCall); \
  }
