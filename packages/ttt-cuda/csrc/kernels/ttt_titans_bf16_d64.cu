// Titans-form TTT-Linear forward + backward kernels, inputs __nv_bfloat16, head dim 64 (fp32 state).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ttt_titans_kernel.cuh"

TTT_INSTANTIATE_TITANS(__nv_bfloat16, 64)
