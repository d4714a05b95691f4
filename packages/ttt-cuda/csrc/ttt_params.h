// Parameters of the fused TTT-Linear ops: one plain struct, filled by the Python side through the
// pybind11 binding (pointers as integers, shapes, strides in elements, the CUDA stream).
// No torch, no CUDA and no pybind11 headers here: the kernels library and the binding share it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TTT_PARAMS_HD __host__ __device__
#else
#define TTT_PARAMS_HD
#endif

namespace ttt {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

struct LinearParams {
  // ---- shapes -------------------------------------------------------------------------------
  int B = 0, H = 0, L = 0, D = 0;  // q, k, v: [B, H, L, D]; the fast weight W is [D, D]
  int mini_batch_size = 16;        // b; the last mini-batch holds L - (nmb - 1) * b tokens
  int causal = 1;                  // 1: query i sees W_i; 0: every query sees the end weights
  double eps = 1e-6;               // LayerNorm epsilon
  DType dtype = DType::kFloat32;   // dtype of q, k, v, o, dO, dq, dk, dv
  // 1: a shorter last mini-batch ends with W_start - sum_j eta_j grad_j (no token scale), so that
  // W_start - W_end is the streaming state's grad_sum (causal, output_final_state, L % b != 0)
  int end_unscaled = 0;

  // ---- strides (elements) of the [B, H, L, D] inputs; the last dim must be contiguous --------
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  int64_t do_sb = 0, do_sh = 0, do_sl = 0;  // upstream gradient dO (backward only)

  // ---- inputs (device pointers); "acc" = float32 (float64 for the CPU float64 path) ---------
  const void* q = nullptr;    // [B, H, L, D] dtype
  const void* k = nullptr;    // [B, H, L, D] dtype
  const void* v = nullptr;    // [B, H, L, D] dtype
  const void* eta = nullptr;  // [B, H, L] acc, contiguous: per-token inner learning rate
  const void* ln_w = nullptr;   // [H, D] acc
  const void* ln_b = nullptr;   // [H, D] acc
  const void* scale = nullptr;  // [b] acc: token scale s_i (causal only)
  const void* W0 = nullptr;     // [B, H, D, D] acc: start weights
  const void* b0 = nullptr;     // [B, H, D] acc: start bias

  // ---- forward outputs ----------------------------------------------------------------------
  void* o = nullptr;         // [B, H, L, D] dtype, contiguous
  void* W_end = nullptr;     // [B, H, D, D] acc: weights after the last mini-batch
  void* b_end = nullptr;     // [B, H, D] acc
  void* W_starts = nullptr;  // [B, H, nmb, D, D] acc: each mini-batch's start weights (for bwd)
  void* b_starts = nullptr;  // [B, H, nmb, D] acc

  // ---- backward inputs / outputs --------------------------------------------------------------
  const void* dO = nullptr;     // [B, H, L, D] dtype (strided as above)
  const void* dW_end = nullptr; // [B, H, D, D] acc or null (zero)
  const void* db_end = nullptr; // [B, H, D] acc or null (zero)
  const void* dW_starts = nullptr;  // [B, H, nmb, D, D] acc or null: gradient of W_starts
  const void* db_starts = nullptr;  // [B, H, nmb, D] acc or null
  void* dq = nullptr;           // [B, H, L, D] dtype, contiguous
  void* dk = nullptr;
  void* dv = nullptr;
  void* deta = nullptr;   // [B, H, L] acc
  void* dW0 = nullptr;    // [B, H, D, D] acc
  void* db0 = nullptr;    // [B, H, D] acc
  void* dln_w = nullptr;  // [B, H, D] acc: per-sample partials (summed over B by the caller)
  void* dln_b = nullptr;  // [B, H, D] acc
  void* dscale = nullptr; // [B, H, b] acc: per-sample partials

  // ---- scratch --------------------------------------------------------------------------------
  void* workspace = nullptr;  // CUDA: global scratch [B*H, workspace_elems] or null = shared memory
  int64_t max_smem = 0;       // CUDA: the device's opt-in shared memory per block (bytes)
  int64_t stream = 0;         // CUDA: cudaStream_t as an integer (0 = legacy default stream)

  TTT_PARAMS_HD int num_mini_batches() const { return (L + mini_batch_size - 1) / mini_batch_size; }
};

// Scratch elements (acc type) one (batch, head) chain needs; the same layout on CPU and GPU.
int64_t linear_workspace_elems(int D, int mini_batch_size, bool backward);

// C++ CPU implementation (float32 / float64 inputs; acc type = input type).
void linear_fwd_cpu(const LinearParams& p);
void linear_bwd_cpu(const LinearParams& p);
// The same on `threads` real threads per chain with barriers: a CPU check of the CUDA phase
// structure (tests only; see ttt_linear_cpu_block.cpp).
void linear_cpu_block(const LinearParams& p, bool backward, int threads);

// CUDA implementation (float32 / bfloat16 / float16 inputs, float32 state), head dim 64 or 128.
// Returns an empty string on success, else the reason (unsupported shape, launch error).
const char* linear_fwd_cuda(const LinearParams& p);
const char* linear_bwd_cuda(const LinearParams& p);

}  // namespace ttt
