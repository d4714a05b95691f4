// Titans-form TTT-Linear forward + backward kernels, inputs float, head dim 128 (fp32 state).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ttt_titans_kernel.cuh"

TTT_INSTANTIATE_TITANS(float, 128)
