// CUDA kernel of the fused Titans-form TTT-Linear ops: one thread block per (batch, head) chain
// runs the chain math of ttt_titans_chain.h / ttt_titans_backward.h; P, the current weights and
// the momentum (fp32) plus the tiles live in shared memory when they fit, else in a global slice.
#pragma once
#include "ttt_chain_launch.cuh"
#include "ttt_titans_chain.h"

namespace ttt {

template <typename scalar_t, int kD, bool kBackward>
struct TitansChain {
  using Params = TitansParams;
  static constexpr bool kMayUseShared = true;
  static __device__ __forceinline__ void run(const TitansParams& p, float* ws, int bi, int hi) {
    if constexpr (kBackward) {
      titans_bwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
    } else {
      titans_fwd_chain<scalar_t, float>(p, ws, kD, bi, hi);
    }
  }
};

// One instantiation's entry for the dispatcher (ttt_titans_cuda.cu): launch, or ask whether its
// scratch runs from shared memory. Returns "" or the reason.
template <typename scalar_t, int kD, bool kBackward>
const char* launch_titans(const TitansParams& p, ChainCall call) {
  using Chain = TitansChain<scalar_t, kD, kBackward>;
  return run_chain<Chain>(p, titans_workspace_elems(kD, p.mini_batch_size, kBackward), call);
}

}  // namespace ttt

// One explicit instantiation per (dtype, head dim): forward and backward.
#define TTT_INSTANTIATE_TITANS(scalar_t, kD)                                      \
  namespace ttt {                                                                  \
  template const char* launch_titans<scalar_t, kD, false>(const TitansParams&, ChainCall); \
  template const char* launch_titans<scalar_t, kD, true>(const TitansParams&, ChainCall); \
  }
