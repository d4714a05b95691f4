// Dispatch of the CUDA TTT-Linear ops over (dtype, head dim); the instantiations live in
// kernels/ttt_linear_<dtype>_d<D>.cu so they compile in parallel.
#include "ttt_chain_launch.cuh"

namespace ttt {

template <typename scalar_t, int kD, bool kBackward>
const char* launch_linear(const LinearParams& p, ChainCall call);

namespace {
template <bool kBackward>
const char* dispatch(const LinearParams& p, ChainCall call) {
  return with_head_dim_64_or_128(p.D, [&](auto d) {
    const char* err = chain_shape_error(p);
    if (err[0] != '\0') return err;
    return with_input_dtype(p.dtype, [&](auto t) {
      return launch_linear<typename decltype(t)::type, decltype(d)::value, kBackward>(p, call);
    });
  });
}
}  // namespace

const char* linear_fwd_cuda(const LinearParams& p) { return dispatch<false>(p, ChainCall::kLaunch); }
const char* linear_bwd_cuda(const LinearParams& p) { return dispatch<true>(p, ChainCall::kLaunch); }
bool linear_scratch_in_shared(const LinearParams& p, bool backward) {
  const char* r = backward ? dispatch<true>(p, ChainCall::kQueryShared)
                           : dispatch<false>(p, ChainCall::kQueryShared);
  return r[0] == '\0';
}

}  // namespace ttt
