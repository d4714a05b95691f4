// TTT-MLP forward + backward kernels, inputs __nv_bfloat16, D = 64, F = 256 (fp32 state).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ttt_mlp_kernel.cuh"

TTT_INSTANTIATE_MLP(__nv_bfloat16, 64, 256)
