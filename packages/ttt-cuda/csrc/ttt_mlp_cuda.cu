// Dispatch of the CUDA TTT-MLP ops over the input dtype (D = 64, F = 256); the instantiations
// live in kernels/ttt_mlp_<dtype>_d64.cu so they compile in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ttt_params.h"

namespace ttt {

template <typename scalar_t, int kD, int kF, bool kBackward>
const char* launch_mlp(const MLPParams& p);

namespace {
template <bool kBackward>
const char* dispatch(const MLPParams& p) {
  if (p.D != 64 || p.F != 256) return "the CUDA TTT-MLP kernels take D = 64 and F = 256";
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal))
    return "offset must be in [0, mini_batch_size) and needs causal";
  if ((p.G0 == nullptr) != (p.G20 == nullptr)) return "grad_sum needs both layers (G0 and G20)";
  switch (p.dtype) {
    case DType::kFloat32: return launch_mlp<float, 64, 256, kBackward>(p);
    case DType::kBFloat16: return launch_mlp<__nv_bfloat16, 64, 256, kBackward>(p);
    case DType::kFloat16: return launch_mlp<__half, 64, 256, kBackward>(p);
    default: return "dtype must be float32, bfloat16 or float16 for the CUDA kernels";
  }
}
}  // namespace

const char* mlp_fwd_cuda(const MLPParams& p) { return dispatch<false>(p); }
const char* mlp_bwd_cuda(const MLPParams& p) { return dispatch<true>(p); }

}  // namespace ttt
