// TTT-Linear forward + backward kernels, inputs __half, head dim 64 (fp32 state).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ttt_linear_kernel.cuh"

TTT_INSTANTIATE_LINEAR(__half, 64)
