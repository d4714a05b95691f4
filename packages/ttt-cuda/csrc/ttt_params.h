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
  // Start inside a mini-batch (a streaming state cut there): token 0 sits at in-mini-batch position
  // `offset`; the first segment holds the min(b - offset, L) tokens that finish that mini-batch,
  // with the state's start weights W0/b0 and what its earlier tokens read, G0/gb0 (grad_sum).
  int offset = 0;
  // 1: the call ends inside its first mini-batch (b None, or b > offset + L): one segment that
  // never completes, mini_batch_size = offset + L (the scratch is sized by it)
  int unbounded = 0;
  // The options of the semantics (ttt_options.h): the token loss's target and the output.
  int value_target = 0;     // 1: target v_j (reconstruction_target "value"); 0: v_j - k_j
  int output_residual = 1;  // 1: o_i = q_i + LN_h(f_{W_i}(q_i)); 0: o_i = LN_h(f_{W_i}(q_i))

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
  const void* G0 = nullptr;     // [B, H, D, D] acc or null: grad_sum of the state (offset > 0)
  const void* gb0 = nullptr;    // [B, H, D] acc or null

  // ---- forward outputs ----------------------------------------------------------------------
  void* o = nullptr;         // [B, H, L, D] dtype, contiguous
  void* W_end = nullptr;     // [B, H, D, D] acc: weights after the last mini-batch
  void* b_end = nullptr;     // [B, H, D] acc
  void* W_starts = nullptr;  // [B, H, nseg, D, D] acc: each segment's start weights (for bwd)
  void* b_starts = nullptr;  // [B, H, nseg, D] acc

  // ---- backward inputs / outputs --------------------------------------------------------------
  const void* dO = nullptr;     // [B, H, L, D] dtype (strided as above)
  const void* dW_end = nullptr; // [B, H, D, D] acc or null (zero)
  const void* db_end = nullptr; // [B, H, D] acc or null (zero)
  const void* dW_starts = nullptr;  // [B, H, nseg, D, D] acc or null: gradient of W_starts
  const void* db_starts = nullptr;  // [B, H, nseg, D] acc or null
  void* dq = nullptr;           // [B, H, L, D] dtype, contiguous
  void* dk = nullptr;
  void* dv = nullptr;
  void* deta = nullptr;   // [B, H, L] acc
  void* dW0 = nullptr;    // [B, H, D, D] acc
  void* db0 = nullptr;    // [B, H, D] acc
  void* dG0 = nullptr;    // [B, H, D, D] acc (written when G0 is given)
  void* dgb0 = nullptr;   // [B, H, D] acc
  void* dln_w = nullptr;  // [B, H, D] acc: per-sample partials (summed over B by the caller)
  void* dln_b = nullptr;  // [B, H, D] acc
  void* dscale = nullptr; // [B, H, b] acc: per-sample partials

  // ---- scratch --------------------------------------------------------------------------------
  void* workspace = nullptr;  // CUDA: global scratch [B*H, workspace_elems] or null = shared memory
  int64_t max_smem = 0;       // CUDA: the device's opt-in shared memory per block (bytes)
  int64_t stream = 0;         // CUDA: cudaStream_t as an integer (0 = legacy default stream)

  // Segments: runs of tokens inside one mini-batch. The first starts at position `offset`.
  TTT_PARAMS_HD int first_segment_len() const {
    const int room = mini_batch_size - offset;
    return L < room ? L : room;
  }
  TTT_PARAMS_HD int num_segments() const {
    const int rest = L - first_segment_len();
    return 1 + (rest + mini_batch_size - 1) / mini_batch_size;
  }
};

// TTT-MLP: f(x) = gelu_tanh(x W1 + b1) W2 + b2. The LinearParams fields keep their meaning with
// W0/b0 (and W_end, W_starts, dW0, G0, dG0, ...) standing for W1 [D, F] / b1 [F]; these add
// W2 [F, D] / b2 [D] (and layer 2's grad_sum G20/gb20 for a start inside a mini-batch).
struct MLPParams : LinearParams {
  int F = 0;                       // hidden width (4 D in ttt-core)
  const void* W20 = nullptr;       // [B, H, F, D] acc: start weights of layer 2
  const void* b20 = nullptr;       // [B, H, D] acc
  void* W2_end = nullptr;          // [B, H, F, D] acc
  void* b2_end = nullptr;          // [B, H, D] acc
  void* W2_starts = nullptr;       // [B, H, nseg, F, D] acc
  void* b2_starts = nullptr;       // [B, H, nseg, D] acc
  const void* dW2_end = nullptr;   // [B, H, F, D] acc or null (zero)
  const void* db2_end = nullptr;   // [B, H, D] acc or null
  const void* dW2_starts = nullptr;  // [B, H, nseg, F, D] acc or null
  const void* db2_starts = nullptr;  // [B, H, nseg, D] acc or null
  void* dW20 = nullptr;            // [B, H, F, D] acc
  void* db20 = nullptr;            // [B, H, D] acc
  const void* G20 = nullptr;       // [B, H, F, D] acc or null: layer 2's grad_sum (offset > 0)
  const void* gb20 = nullptr;      // [B, H, D] acc
  void* dG20 = nullptr;            // [B, H, F, D] acc (written when G20 is given)
  void* dgb20 = nullptr;           // [B, H, D] acc
};

// The Titans form (causal): per token j of a segment, gradients at the segment's gradient point P
// (W0/b0, then each completed segment's end), momentum S and weights W:
//   S_j = m_j S_{j-1} - eta_j grad l_j(P),  W_j = (1 - a_j) W_{j-1} + S_j,  o_j from W_j.
// W_end/b_end are the weights after the last token, W_starts/b_starts each segment's P. These
// fields are layer 1's (the linear model's only layer); TitansMLPParams adds layer 2's.
struct TitansFields {
  const void* mom = nullptr;        // [B, H, L] acc: momentum m_j
  const void* dec = nullptr;        // [B, H, L] acc: decay a_j
  const void* C0 = nullptr;         // [B, H, Din, Dout] acc: weights W at the start (= W0 at offset 0)
  const void* cb0 = nullptr;        // [B, H, Dout] acc
  const void* S0 = nullptr;         // [B, H, Din, Dout] acc: momentum at the start
  const void* sb0 = nullptr;        // [B, H, Dout] acc
  void* S_end = nullptr;            // [B, H, Din, Dout] acc: momentum after the last token
  void* sb_end = nullptr;           // [B, H, Dout] acc
  void* S_starts = nullptr;         // [B, H, nseg, Din, Dout] acc: momentum at each segment start
  void* sb_starts = nullptr;        // [B, H, nseg, Dout] acc
  const void* dS_end = nullptr;     // [B, H, Din, Dout] acc or null (zero)
  const void* dsb_end = nullptr;    // [B, H, Dout] acc or null
  void* dC0 = nullptr;              // [B, H, Din, Dout] acc
  void* dcb0 = nullptr;             // [B, H, Dout] acc
  void* dS0 = nullptr;              // [B, H, Din, Dout] acc
  void* dsb0 = nullptr;             // [B, H, Dout] acc
  void* dmom = nullptr;             // [B, H, L] acc
  void* ddec = nullptr;             // [B, H, L] acc
};

// TTT-Linear in the Titans form: W0/b0 [D, D] / [D] and the Titans fields of its one layer.
struct TitansParams : LinearParams, TitansFields {};

// TTT-MLP in the Titans form: MLPParams (layer 1 W0/b0, layer 2 W20/b20 as P, their W_end /
// W_starts / dW*), the Titans fields of layer 1 and these of layer 2 [F, D] / [D].
// A mini-batch is read in blocks of at most titans_mlp_block(mini_batch_size) tokens (the chain's
// n x n tiles stay small); the per-block starts hold P (W_starts.., MLPParams), W (C_starts..)
// and S (S_starts.., S2_starts..) at each block start, [B, H, nblk, ...].
struct TitansMLPParams : MLPParams, TitansFields {
  void* C_starts = nullptr;         // [B, H, nblk, D, F] acc: layer 1's W at each block start
  void* cb_starts = nullptr;        // [B, H, nblk, F] acc
  void* C2_starts = nullptr;        // [B, H, nblk, F, D] acc
  void* cb2_starts = nullptr;       // [B, H, nblk, D] acc
  const void* C20 = nullptr;        // [B, H, F, D] acc: layer 2's weights W at the start
  const void* cb20 = nullptr;       // [B, H, D] acc
  const void* S20 = nullptr;        // [B, H, F, D] acc: layer 2's momentum at the start
  const void* sb20 = nullptr;       // [B, H, D] acc
  void* S2_end = nullptr;           // [B, H, F, D] acc
  void* sb2_end = nullptr;          // [B, H, D] acc
  void* S2_starts = nullptr;        // [B, H, nseg, F, D] acc
  void* sb2_starts = nullptr;       // [B, H, nseg, D] acc
  const void* dS2_end = nullptr;    // [B, H, F, D] acc or null (zero)
  const void* dsb2_end = nullptr;   // [B, H, D] acc or null
  void* dC20 = nullptr;             // [B, H, F, D] acc
  void* dcb20 = nullptr;            // [B, H, D] acc
  void* dS20 = nullptr;             // [B, H, F, D] acc
  void* dsb20 = nullptr;            // [B, H, D] acc
};

// Scratch elements (acc type) one (batch, head) chain needs; the same layout on CPU and GPU.
int64_t linear_workspace_elems(int D, int mini_batch_size, bool backward);
int64_t titans_workspace_elems(int D, int mini_batch_size, bool backward);
int64_t mlp_workspace_elems(int D, int F, int mini_batch_size, bool backward);
int64_t titans_mlp_workspace_elems(int D, int F, int mini_batch_size, bool backward);
// The Titans-form TTT-MLP's blocks of a call (the op's [B, H, nblk, ...] starts).
int titans_mlp_num_blocks(int L, int mini_batch_size, int offset, bool unbounded);

// Whether the CPU entry points run the AVX2 build of the chains (x86-64 builds with TTT_CPU_AVX2
// on a CPU that has AVX2; the results are the same bits either way).
bool cpu_uses_avx2();

// C++ CPU implementation (float32 / float64 inputs; acc type = input type): the (batch, head)
// chains spread over `threads` threads, one thread per chain (the result does not depend on it).
void linear_fwd_cpu(const LinearParams& p, int threads);
void linear_bwd_cpu(const LinearParams& p, int threads);
// The same on `threads` real threads per chain with barriers: a CPU check of the CUDA phase
// structure (tests only; see ttt_cpu_block.cpp).
void linear_cpu_block(const LinearParams& p, bool backward, int threads);

// CUDA implementation (float32 / bfloat16 / float16 inputs, float32 state), head dim 64 or 128.
// Returns an empty string on success, else the reason (unsupported shape, launch error).
const char* linear_fwd_cuda(const LinearParams& p);
const char* linear_bwd_cuda(const LinearParams& p);
// CUDA: whether the op's scratch (dynamic + the kernel's static shared memory) fits in p.max_smem,
// so the kernel runs from shared memory; false: the caller gives a global workspace. The launcher
// uses the same check (ttt_chain_launch.cuh). Always false for TTT-MLP and without CUDA.
bool linear_scratch_in_shared(const LinearParams& p, bool backward);
bool titans_scratch_in_shared(const TitansParams& p, bool backward);
bool mlp_scratch_in_shared(const MLPParams& p, bool backward);

// TTT-MLP: the C++ CPU path (float32 / float64), the block-schedule check, and the CUDA kernels
// (float32 / bfloat16 / float16 inputs, D = 64 and F = 256).
void mlp_fwd_cpu(const MLPParams& p, int threads);
void mlp_bwd_cpu(const MLPParams& p, int threads);
void mlp_cpu_block(const MLPParams& p, bool backward, int threads);
const char* mlp_fwd_cuda(const MLPParams& p);
const char* mlp_bwd_cuda(const MLPParams& p);

// Titans-form TTT-Linear: the same four entry points (CUDA: head dim 64 or 128).
void titans_fwd_cpu(const TitansParams& p, int threads);
void titans_bwd_cpu(const TitansParams& p, int threads);
void titans_cpu_block(const TitansParams& p, bool backward, int threads);
const char* titans_fwd_cuda(const TitansParams& p);
const char* titans_bwd_cuda(const TitansParams& p);

// Titans-form TTT-MLP: the C++ CPU path (float32 / float64) and its block-schedule check; no
// CUDA kernel (the CUDA backend refuses the call).
void titans_mlp_fwd_cpu(const TitansMLPParams& p, int threads);
void titans_mlp_bwd_cpu(const TitansMLPParams& p, int threads);
void titans_mlp_cpu_block(const TitansMLPParams& p, bool backward, int threads);

}  // namespace ttt
