// Dispatch of the CUDA Titans-form TTT-Linear ops over (dtype, head dim); the instantiations
// live in kernels/ttt_titans_<dtype>_d<D>.cu so they compile in parallel.
#include "ttt_chain_launch.cuh"

namespace ttt {

template <typename scalar_t, int kD, bool kBackward>
const char* launch_titans(const TitansParams& p, ChainCall call);

namespace {
const char* dispatch(const TitansParams& p, bool backward, ChainCall call) {
  if (!p.causal) return "the Titans form needs causal";
  return with_linear_kernel(p, [&](auto t, auto d) {
    using scalar_t = typename decltype(t)::type;
    constexpr int kD = decltype(d)::value;
    return backward ? launch_titans<scalar_t, kD, true>(p, call)
                    : launch_titans<scalar_t, kD, false>(p, call);
  });
}
}  // namespace

TTT_CUDA_ENTRIES(titans, TitansParams)

}  // namespace ttt
