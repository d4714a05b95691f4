// Stubs for a build without nvcc (TTT_ENABLE_CUDA=OFF): the CUDA entry points report why.
#include "ttt_params.h"

namespace ttt {
const char* linear_fwd_cuda(const LinearParams&) { return "ttt-cuda was built without CUDA"; }
const char* linear_bwd_cuda(const LinearParams&) { return "ttt-cuda was built without CUDA"; }
const char* mlp_fwd_cuda(const MLPParams&) { return "ttt-cuda was built without CUDA"; }
const char* mlp_bwd_cuda(const MLPParams&) { return "ttt-cuda was built without CUDA"; }
const char* titans_fwd_cuda(const TitansParams&) { return "ttt-cuda was built without CUDA"; }
const char* titans_bwd_cuda(const TitansParams&) { return "ttt-cuda was built without CUDA"; }
bool linear_scratch_in_shared(const LinearParams&, bool) { return false; }
bool titans_scratch_in_shared(const TitansParams&, bool) { return false; }
bool mlp_scratch_in_shared(const MLPParams&, bool) { return false; }
}  // namespace ttt
