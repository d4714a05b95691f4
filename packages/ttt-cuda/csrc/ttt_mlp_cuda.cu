// Dispatch of the CUDA TTT-MLP ops over the input dtype (D = 64, F = 256); the instantiations
// live in kernels/ttt_mlp_<dtype>_d64.cu so they compile in parallel.
#include "ttt_chain_launch.cuh"

namespace ttt {

template <typename scalar_t, int kD, int kF, bool kBackward>
const char* launch_mlp(const MLPParams& p, ChainCall call);

namespace {
const char* dispatch(const MLPParams& p, bool backward, ChainCall call) {
  if (p.D != 64 || p.F != 256) return "the CUDA TTT-MLP kernels take D = 64 and F = 256";
  const char* err = chain_shape_error(p);
  if (err[0] != '\0') return err;
  if ((p.G0 == nullptr) != (p.G20 == nullptr)) return "grad_sum needs both layers (G0 and G20)";
  return with_input_dtype(p.dtype, [&](auto t) {
    using scalar_t = typename decltype(t)::type;
    return backward ? launch_mlp<scalar_t, 64, 256, true>(p, call)
                    : launch_mlp<scalar_t, 64, 256, false>(p, call);
  });
}
}  // namespace

TTT_CUDA_ENTRIES(mlp, MLPParams)  // MLP: never in shared memory (D = 64, F = 256)

}  // namespace ttt
