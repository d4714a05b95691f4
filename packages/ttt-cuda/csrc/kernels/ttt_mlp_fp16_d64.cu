// TTT-MLP forward + backward kernels, inputs __half, D = 64, F = 256 (fp32 state).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ttt_mlp_kernel.cuh"

TTT_INSTANTIATE_MLP(__half, 64, 256)
