// Dispatch of the CUDA TTT-Linear ops over (dtype, head dim); the instantiations live in
// kernels/ttt_linear_<dtype>_d<D>.cu so they compile in parallel.
#include "ttt_chain_launch.cuh"

namespace ttt {

template <typename scalar_t, int kD, bool kBackward>
const char* launch_linear(const LinearParams& p, ChainCall call);

namespace {
const char* dispatch(const LinearParams& p, bool backward, ChainCall call) {
  return with_linear_kernel(p, [&](auto t, auto d) {
    using scalar_t = typename decltype(t)::type;
    constexpr int kD = decltype(d)::value;
    return backward ? launch_linear<scalar_t, kD, true>(p, call)
                    : launch_linear<scalar_t, kD, false>(p, call);
  });
}
}  // namespace

TTT_CUDA_ENTRIES(linear, LinearParams)

}  // namespace ttt
