// Dispatch of the CUDA TTT-Linear ops over (dtype, head dim); the instantiations live in
// kernels/ttt_linear_<dtype>_d<D>.cu so they compile in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ttt_params.h"

namespace ttt {

template <typename scalar_t, int kD, bool kBackward>
const char* launch_linear(const LinearParams& p);

namespace {
template <bool kBackward>
const char* dispatch(const LinearParams& p) {
  if (p.D != 64 && p.D != 128) return "head dim must be 64 or 128 for the CUDA kernels";
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal))
    return "offset must be in [0, mini_batch_size) and needs causal";
  const bool d64 = p.D == 64;
  switch (p.dtype) {
    case DType::kFloat32:
      return d64 ? launch_linear<float, 64, kBackward>(p) : launch_linear<float, 128, kBackward>(p);
    case DType::kBFloat16:
      return d64 ? launch_linear<__nv_bfloat16, 64, kBackward>(p)
                 : launch_linear<__nv_bfloat16, 128, kBackward>(p);
    case DType::kFloat16:
      return d64 ? launch_linear<__half, 64, kBackward>(p) : launch_linear<__half, 128, kBackward>(p);
    default:
      return "dtype must be float32, bfloat16 or float16 for the CUDA kernels";
  }
}
}  // namespace

const char* linear_fwd_cuda(const LinearParams& p) { return dispatch<false>(p); }
const char* linear_bwd_cuda(const LinearParams& p) { return dispatch<true>(p); }

}  // namespace ttt
