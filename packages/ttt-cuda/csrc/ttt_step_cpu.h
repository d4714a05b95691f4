// The fused single-token streaming step on the CPU: one call per token and layer reads the state a
// TTTState holds and writes o and the next state's tensors (no torch, plain pointers).
//
// Per (sample, head) chain, for a fast model of one layer (TTT-Linear) or two (TTT-MLP), with
// start weights P of the current mini-batch (every gradient is taken at P):
//   key side:  x_l, g_l = the inputs and output gradients of every fast layer for the key k
//              (g of the last layer = d/dz 0.5 ||LN_h(z) - target||^2, target = v - k or v)
//   plain:     G' = G + eta x^T g;  the query sees W = P - s G'   (G = 0 at offset 0)
//   Titans:    S' = m S - eta x^T g;  W = (1 - a) C + S'           (S = 0, C = P when absent)
//   output:    o = q + LN_h(f_W(q))   (or LN_h(f_W(q)) without the residual)
// A bias is the same update with x = 1. s (the token scale of the state's offset) is computed by
// the caller (TTTState.token_scale_at: the one rule), so is which tensors the next state keeps.
#pragma once
#include <cstdint>

namespace ttt {

// Pointers of one (sample, head)-batched fast-weight dict, in layer order W1, b1 (, W2, b2): every
// tensor contiguous [B, H, rows, cols] in the acc type (biases [B, H, 1, cols]); 0 = absent.
struct StepWeights {
  std::uintptr_t W1 = 0, b1 = 0, W2 = 0, b2 = 0;
};

struct StepParams {
  int B = 0, H = 0, D = 0;
  int F = 0;                  // TTT-MLP hidden width; 0 for TTT-Linear
  bool float64 = false;       // fp64 inputs and state (else fp32)
  bool titans = false;        // the Titans recurrence (momentum/decay) instead of grad_sum
  bool value_target = false;  // target v (else v - k)
  bool output_residual = true;
  double eps = 1e-6;
  double scale = 1.0;  // plain form: s of this token's in-mini-batch position
  // per-token inputs: q, k, v [B, H, 1, D] with unit stride over D; eta, momentum, decay
  // [B, H, 1]; strides (in elements) over B and H
  std::uintptr_t q = 0, k = 0, v = 0, eta = 0, momentum = 0, decay = 0;  // momentum/decay: 0 = 0
  int64_t q_sb = 0, q_sh = 0, k_sb = 0, k_sh = 0, v_sb = 0, v_sh = 0;
  int64_t eta_sb = 0, eta_sh = 0, m_sb = 0, m_sh = 0, a_sb = 0, a_sh = 0;
  std::uintptr_t ln_w = 0, ln_b = 0;  // [H, D]
  StepWeights params;                 // P, the mini-batch's start weights
  StepWeights carry;                  // plain: grad_sum G; Titans: momentum S (absent: zeros)
  StepWeights current;                // Titans: C, the weights after the last token (absent: P)
  std::uintptr_t o = 0;               // out: [B, H, 1, D] contiguous
  StepWeights weights_out;            // out: W (absent: not kept)
  StepWeights carry_out;              // out: G' or S' (absent: not kept)
};

// Runs every (sample, head) chain, on up to `threads` threads (the result does not depend on it).
void ttt_step_cpu(const StepParams& p, int threads);

// The whole single-token step of a ttt-core TTTLayer (ttt_core/layer.py) around the step above,
// for x [B, C] (the layer's input of one token per sample), W = H D, N = 3 W + n_rates H:
//   h   = x rsqrt(mean(x^2) + pre_eps) pre_w           [B, C] (the block's RMS pre-norm, or h = x)
//   z   = h W_in^T + b_in                             [B, N]: q | k | v | rate logits
//         (b_in: the q/k/v bias [3 W], or none, then the rate bias [n_rates H])
//   eta = eta_scale sigmoid(z_lr)                     [B, H] (Titans: momentum = sigmoid(z_m),
//         decay = sigmoid(z_a), [B, H] each)
//   o   = the step on q, k, v [B, H, 1, D] (StepParams' state and options)     [B, W]
//   y   = tanh(alpha) * (post_norm(o) W_out^T + b_out)  (+ x: the block's residual)  [B, C]
// post_norm: a LayerNorm over W (weight, bias, eps) or none; the tanh gate and b_out optional.
struct LayerStepParams {
  int C = 0;               // model width
  int n_rates = 1;         // 1 (lr) or 3 (lr | momentum | decay)
  double eta_scale = 1.0;  // base_lr / D
  double post_eps = 1e-6;
  bool pre_norm = false;   // the RMS pre-norm of x (pre_w: its weight [C]; 0: none, scale 1)
  double pre_eps = 1e-6;
  bool residual = false;         // y += x
  std::uintptr_t x = 0;          // [B, C] contiguous
  std::uintptr_t pre_w = 0;      // [C]; 0: no weight
  std::uintptr_t in_w = 0;       // [N, C] contiguous
  std::uintptr_t in_b = 0;       // [3 W]; 0: no q/k/v bias
  std::uintptr_t rate_bias = 0;  // [n_rates H]
  std::uintptr_t post_w = 0, post_b = 0;  // [W] each; 0: no post norm
  std::uintptr_t out_w = 0;               // [C, W] contiguous
  std::uintptr_t out_b = 0;               // [C]; 0: no bias
  std::uintptr_t gate = 0;                // alpha [C]; 0: no gate
  std::uintptr_t y = 0;                   // out: [B, C] contiguous
};

// `step` holds the state, the options and B, H, D, F; its per-token inputs (q, k, v, eta,
// momentum, decay and their strides) and o are set here from the projection. The result does not
// depend on `threads`.
void ttt_layer_step_cpu(const LayerStepParams& lp, const StepParams& step, int threads);

}  // namespace ttt
