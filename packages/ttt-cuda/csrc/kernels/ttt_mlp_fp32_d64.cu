// TTT-MLP forward + backward kernels, inputs float, D = 64, F = 256 (fp32 state).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../ttt_mlp_kernel.cuh"

TTT_INSTANTIATE_MLP(float, 64, 256)
