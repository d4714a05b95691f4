// The fused single-token streaming step on the CPU (see ttt_step_cpu.h for the math). One chain per
// (sample, head), computed start to end by one thread from its inputs alone, so the result is
// bit-identical whatever the thread count. Built with -ffp-contract=off like the chains: each
// product and sum rounds alone; the column loops are contiguous and vectorise without reordering.
// The LayerNorm / LN-loss gradient, gelu and the options' rules (the loss target, the output) are
// the chains' own (ttt_ln_rows.h, ttt_mlp_chain.h, ttt_options.h), compiled here in a namespace of
// this file as the ISA builds compile them in theirs. The layer step (ttt_layer_step_cpu) wraps the
// step in the TTTLayer's projections, rates, post-norm and gate.
#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "ttt_cpu_chains.h"
#include "ttt_cpu_isa.h"
#include "ttt_params.h"
#include "ttt_step_cpu.h"

#define TTT_CPU_NS ttt_step_math
TTT_CPU_ISA_BEGIN
#include "ttt_mlp_chain.h"  // ln_rows, gelu_tanh, loss_target, output_rows
TTT_CPU_ISA_END

namespace ttt {
namespace {

template <typename acc_t>
const acc_t* cptr(std::uintptr_t p) {
  return reinterpret_cast<const acc_t*>(p);
}

template <typename acc_t>
acc_t* mptr(std::uintptr_t p) {
  return reinterpret_cast<acc_t*>(p);
}

// One chain's slice of a [B, H, rows, cols] tensor (nullptr when absent).
struct Slice {
  int64_t chain;  // bi * H + hi
  template <typename T>
  T* of(std::uintptr_t base, int64_t rows, int64_t cols) const {
    return base == 0 ? nullptr : reinterpret_cast<T*>(base) + chain * rows * cols;
  }
};

namespace chain = ::ttt_step_math::ttt;

// s[r] = sum_i w[r][i] x[i] for kRows rows at once. Each row's sum is the same sequence of
// operations whatever kRows: 8 interleaved partial sums (lane j in element j % kL of the vector
// acc[r][j / kL]), added in a fixed order at the end, then the tail; so its bits do not depend on
// the thread, the ISA or how many rows go together. Several rows at once keep the vector units
// busy where one row's sum waits on its own additions, and stream the rows from memory side by
// side.
template <int kRows, typename acc_t>
void dots(int n, const acc_t* const* w, const acc_t* __restrict__ x, acc_t* s) {
  using V = typename chain::Vec<acc_t>::type;
  constexpr int kLanes = 8, kL = chain::Vec<acc_t>::kLanes, kV = kLanes / kL;  // kV vectors of kL
  V acc[kRows][kV] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int v = 0; v < kV; ++v) {
      V xv;
      __builtin_memcpy(&xv, x + i + v * kL, sizeof(V));
      for (int r = 0; r < kRows; ++r) {
        V wv;
        __builtin_memcpy(&wv, w[r] + i + v * kL, sizeof(V));
        acc[r][v] += wv * xv;
      }
    }
  for (int r = 0; r < kRows; ++r) {
    acc_t sum = 0;
    for (int j = 0; j < kLanes; ++j) sum += acc[r][j / kL][j % kL];
    for (int k = i; k < n; ++k) sum += w[r][k] * x[k];
    s[r] = sum;
  }
}

// sum_i a[i] b[i] over n (one row of `dots`).
template <typename acc_t>
acc_t dot(int n, const acc_t* a, const acc_t* b) {
  acc_t s;
  dots<1>(n, &a, b, &s);
  return s;
}

// y[c] = b[c] + sum_r x[r] W[r, c]: x [rows], W [rows, cols], b [cols] -> y [cols].
template <typename acc_t>
void affine(int rows, int cols, const acc_t* x, const acc_t* __restrict__ W, const acc_t* b,
            acc_t* __restrict__ y) {
  for (int c = 0; c < cols; ++c) y[c] = b[c];
  for (int r = 0; r < rows; ++r) {
    const acc_t xr = x[r];
    const acc_t* __restrict__ w = W + static_cast<int64_t>(r) * cols;
    for (int c = 0; c < cols; ++c) y[c] += xr * w[c];
  }
}

// One fast weight [rows, cols] of one chain: its update by the token's outer product x^T eg
// (eg = eta g) and its use on the query side, y[c] += sum_r xq[r] W[r, c] (a bias: rows = 1,
// x = xq = 1). Absent inputs are a zero row (stride 0) or P; absent outputs go to a scratch row.
template <typename acc_t>
struct Update {
  int rows, cols;
  const acc_t* P;      // start weights
  const acc_t* carry;  // G or S (nullptr: zeros)
  const acc_t* cur;    // Titans C (nullptr: P)
  acc_t* w_out;        // W (nullptr: not kept)
  acc_t* carry_out;    // G' or S' (nullptr: not kept)
};

template <typename acc_t>
void update_and_apply(const StepParams& p, const Update<acc_t>& u, const acc_t* x, const acc_t* eg,
                      const acc_t* xq, acc_t m, acc_t a, acc_t* zeros, acc_t* discard,
                      acc_t* __restrict__ y) {
  const acc_t s = static_cast<acc_t>(p.scale);
  for (int r = 0; r < u.rows; ++r) {
    const int64_t at = static_cast<int64_t>(r) * u.cols;
    const acc_t* __restrict__ P = u.P + at;
    const acc_t* __restrict__ carry = u.carry != nullptr ? u.carry + at : zeros;
    acc_t* __restrict__ w_out = u.w_out != nullptr ? u.w_out + at : discard;
    acc_t* __restrict__ carry_out = u.carry_out != nullptr ? u.carry_out + at : discard + u.cols;
    const acc_t xr = x[r], xqr = xq[r];
    if (p.titans) {
      const acc_t* __restrict__ C = (u.cur != nullptr ? u.cur : u.P) + at;
      for (int c = 0; c < u.cols; ++c) {
        const acc_t S = m * carry[c] - xr * eg[c];  // S' = m S - eta x^T g
        const acc_t W = (1 - a) * C[c] + S;         // W' = (1 - a) C + S'
        carry_out[c] = S, w_out[c] = W;
        y[c] += xqr * W;
      }
    } else {
      for (int c = 0; c < u.cols; ++c) {
        const acc_t G = carry[c] + xr * eg[c];  // G' = G + eta x^T g
        const acc_t W = P[c] - s * G;           // W = P - s G'
        carry_out[c] = G, w_out[c] = W;
        y[c] += xqr * W;
      }
    }
  }
}

template <typename acc_t>
void step_chain(const StepParams& p, acc_t* ws, int bi, int hi) {
  const int D = p.D, F = p.F, H = p.H;
  const bool mlp = F > 0;
  const int hidden = mlp ? F : D;  // width of layer 1's output
  const Slice at{static_cast<int64_t>(bi) * H + hi};
  const acc_t* q = cptr<acc_t>(p.q) + bi * p.q_sb + hi * p.q_sh;
  const acc_t* k = cptr<acc_t>(p.k) + bi * p.k_sb + hi * p.k_sh;
  const acc_t* v = cptr<acc_t>(p.v) + bi * p.v_sb + hi * p.v_sh;
  const acc_t eta = cptr<acc_t>(p.eta)[bi * p.eta_sb + hi * p.eta_sh];
  const acc_t m = p.momentum == 0 ? 0 : cptr<acc_t>(p.momentum)[bi * p.m_sb + hi * p.m_sh];
  const acc_t a = p.decay == 0 ? 0 : cptr<acc_t>(p.decay)[bi * p.a_sb + hi * p.a_sh];
  const acc_t* lnw = cptr<acc_t>(p.ln_w) + hi * D;
  const acc_t* lnb = cptr<acc_t>(p.ln_b) + hi * D;
  const acc_t eps = static_cast<acc_t>(p.eps);

  // scratch (ws_elems): layer 1's key/query pre-activations and activations, gradients, a zero
  // row and a discard row pair, the outputs' pre-LN rows
  const int wide = hidden > D ? hidden : D;
  acc_t* h_k = ws;            // [hidden] k W1 + b1 at P
  acc_t* a_k = h_k + hidden;  // [hidden] gelu(h_k) (MLP)
  acc_t* g1 = a_k + hidden;   // [hidden] eta * d l / d(h_k)
  acc_t* h_q = g1 + hidden;   // [hidden] q W1 + b1 at the query's weights
  acc_t* a_q = h_q + hidden;  // [hidden] gelu(h_q) (MLP)
  acc_t* gp_k = a_q + hidden;  // [hidden] gelu'(h_k) (MLP)
  acc_t* z = gp_k + hidden;    // [D] key-side output of the last layer (normalised in place)
  acc_t* g = z + D;            // [D] its LN-loss gradient, then eta * that
  acc_t* target = g + D;       // [D]
  acc_t* y = target + D;      // [D] query-side output (MLP)
  acc_t* zeros = y + D;       // [wide]
  acc_t* discard = zeros + wide;  // [2 wide]
  for (int c = 0; c < wide; ++c) zeros[c] = 0;
  const acc_t one = 1;

  for (int d = 0; d < D; ++d) target[d] = chain::loss_target<acc_t>(p.value_target, v[d], k[d]);
  // layer l's weight and bias, every pointer of this chain (TTT-Linear: layer 2 absent, F = 0)
  const auto layer = [&](int l, int rows, int cols) {
    const auto W = [&](const StepWeights& w) { return l == 1 ? w.W1 : w.W2; };
    const auto b = [&](const StepWeights& w) { return l == 1 ? w.b1 : w.b2; };
    return std::pair<Update<acc_t>, Update<acc_t>>{
        {rows, cols, at.of<const acc_t>(W(p.params), rows, cols),
         at.of<const acc_t>(W(p.carry), rows, cols),
         at.of<const acc_t>(W(p.current), rows, cols),
         at.of<acc_t>(W(p.weights_out), rows, cols),
         at.of<acc_t>(W(p.carry_out), rows, cols)},
        {1, cols, at.of<const acc_t>(b(p.params), 1, cols),
         at.of<const acc_t>(b(p.carry), 1, cols),
         at.of<const acc_t>(b(p.current), 1, cols),
         at.of<acc_t>(b(p.weights_out), 1, cols),
         at.of<acc_t>(b(p.carry_out), 1, cols)}};
  };
  const auto [W1, b1] = layer(1, D, hidden);
  const auto [W2, b2] = layer(2, F, D);

  // key side at P: the last layer's output z and its gradient, then layer 1's gradient (MLP)
  affine(D, hidden, k, W1.P, b1.P, h_k);  // (hidden,)
  if (!mlp) {
    for (int c = 0; c < D; ++c) z[c] = h_k[c];
  } else {
    for (int f = 0; f < F; ++f) {
      const chain::Gelu<acc_t> gl = chain::gelu_tanh(h_k[f]);
      a_k[f] = gl.g, gp_k[f] = gl.d1;
    }
    affine(F, D, a_k, W2.P, b2.P, z);  // (D,)
  }
  acc_t rstd;  // g = d/dz 0.5 ||LN_h(z) - target||^2 of the last layer (ttt-core's ln_loss_grad)
  chain::ln_rows(1, D, eps, lnw, lnb, z, &rstd, target, g, static_cast<acc_t*>(nullptr));
  for (int f = 0; f < F; ++f) {  // MLP: eta g1 = eta (g2 W2^T) * gelu'(h_k), at P
    const acc_t s = dot(D, g, W2.P + static_cast<int64_t>(f) * D);  // (g2 W2^T)[f]
    g1[f] = eta * (s * gp_k[f]);
  }
  for (int d = 0; d < D; ++d) g[d] = eta * g[d];  // eta g of the last layer

  // update every layer and run the query through the updated weights
  acc_t* out = mlp ? y : h_q;  // pre-LN output of the fast model for q
  for (int c = 0; c < hidden; ++c) h_q[c] = 0;
  update_and_apply(p, W1, k, mlp ? g1 : g, q, m, a, zeros, discard, h_q);
  update_and_apply(p, b1, &one, mlp ? g1 : g, &one, m, a, zeros, discard, h_q);
  if (mlp) {
    for (int f = 0; f < F; ++f) a_q[f] = chain::gelu_tanh(h_q[f]).g;
    for (int d = 0; d < D; ++d) y[d] = 0;
    update_and_apply(p, W2, a_k, g, a_q, m, a, zeros, discard, y);
    update_and_apply(p, b2, &one, g, &one, m, a, zeros, discard, y);
  }

  // o = q + LN_h(f_W(q)), or LN_h(f_W(q)) without the residual
  acc_t* o = mptr<acc_t>(p.o) + at.chain * D;
  chain::ln_rows(1, D, eps, lnw, lnb, out, &rstd, static_cast<const acc_t*>(nullptr),
                 static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));  // normalised in place
  chain::output_rows(p.output_residual, 1, D, q, out, lnw, lnb, o);
}

}  // namespace

void ttt_step_cpu(const StepParams& p, int threads) {
  const int hidden = p.F > 0 ? p.F : p.D;
  const int wide = hidden > p.D ? hidden : p.D;
  const int64_t ws_elems = 6 * static_cast<int64_t>(hidden) + 4 * p.D + 3 * wide;
  const double flops = p.F > 0 ? 14.0 * p.D * p.F : 6.0 * p.D * p.D;  // per chain, rough
  if (p.float64)
    for_each_chain<double>(p.B, p.H, ws_elems, threads, flops,
                           [&](double* ws, int bi, int hi) { step_chain<double>(p, ws, bi, hi); });
  else
    for_each_chain<float>(p.B, p.H, ws_elems, threads, flops,
                          [&](float* ws, int bi, int hi) { step_chain<float>(p, ws, bi, hi); });
}

namespace {

// Chain i of `matvec_rows`: rows j = 0 .. kBlock-1 of its blocks i, i + chains, ..., read
// kRows blocks side by side, one row of each at a time (`dots`; a block past the matrix repeats
// the chain's first row, its sums unused).
template <int kRows, typename acc_t>
void matvec_chain(int i, int chains, int kBlock, int B, int rows, int cols, const acc_t* x,
                  const acc_t* W, const acc_t* bias, acc_t* y) {
  for (int j = 0; j < kBlock; ++j) {
    if (i * kBlock + j >= rows) break;  // the chain's first block ends the matrix
    int n[kRows];  // the rows read side by side: row j of each of the chain's blocks, or -1
    const acc_t* w[kRows];
    for (int k = 0; k < kRows; ++k) {
      n[k] = (i + k * chains) * kBlock + j;
      if (n[k] >= rows) n[k] = -1;
      w[k] = W + static_cast<int64_t>(n[k] >= 0 ? n[k] : n[0]) * cols;
    }
    for (int b = 0; b < B; ++b) {
      acc_t s[kRows];
      dots<kRows>(cols, w, x + static_cast<int64_t>(b) * cols, s);
      acc_t* yb = y + static_cast<int64_t>(b) * rows;
      for (int k = 0; k < kRows; ++k)
        if (n[k] >= 0) yb[n[k]] = bias != nullptr ? bias[n[k]] + s[k] : s[k];
    }
  }
}

// y[b, n] = bias[n] + sum_c W[n, c] x[b, c] (no bias: 0 +): x [B, cols], W [rows, cols] ->
// y [B, rows]. Every output is one dot() in a fixed order. The rows go in blocks over the threads;
// a single-token step reads W cold from memory, and several streams of pages in flight read it
// faster than one: each chain reads its blocks (up to 8, `chains` blocks apart) side by side, in
// the fewest of 1, 2, 4 or 8 rows at once that holds them (`matvec_chain`). Moshi layer, dim 1024,
// 1 thread: the TTT block's fused step ~330 us in the model against ~480 us with 4 blocks read in
// turns, one row's dot at a time.
template <typename acc_t>
void matvec_rows(int B, int rows, int cols, const acc_t* x, const acc_t* W, const acc_t* bias,
                 acc_t* y, int threads) {
  constexpr int kBlock = 64, kStreams = 8;
  const int blocks = (rows + kBlock - 1) / kBlock;
  // as many chains as threads, or a multiple of it (each thread gets the same number of blocks),
  // and up to kStreams blocks per chain: chain i reads blocks i, i + chains, ...
  const int t = std::max(threads, 1);
  const int chains = std::min(blocks, t * ((blocks + t * kStreams - 1) / (t * kStreams)));
  const int streams = (blocks + chains - 1) / chains;
  const double work = 2.0 * streams * kBlock * cols * B;
  for_each_chain<acc_t>(1, chains, 0, threads, work, [&](acc_t*, int, int i) {
    if (streams > 4)
      matvec_chain<8>(i, chains, kBlock, B, rows, cols, x, W, bias, y);
    else if (streams > 2)
      matvec_chain<4>(i, chains, kBlock, B, rows, cols, x, W, bias, y);
    else if (streams > 1)
      matvec_chain<2>(i, chains, kBlock, B, rows, cols, x, W, bias, y);
    else
      matvec_chain<1>(i, chains, kBlock, B, rows, cols, x, W, bias, y);
  });
}

// Rows of x [B, n] normalised in place by the chains' LayerNorm rows (ttt_ln_rows.h: (x - mean)
// rstd, biased variance), then the affine w, b [n]. rstd: scratch [B].
template <typename acc_t>
void layer_norm_rows(int B, int n, acc_t eps, const acc_t* w, const acc_t* b, acc_t* x,
                     acc_t* rstd) {
  chain::ln_rows(B, n, eps, w, b, x, rstd, static_cast<const acc_t*>(nullptr),
                 static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
  for (int r = 0; r < B; ++r) {
    acc_t* row = x + static_cast<int64_t>(r) * n;
    for (int i = 0; i < n; ++i) row[i] = row[i] * w[i] + b[i];
  }
}

// Rows of x [B, n] scaled by their inverse root mean square, then by w [n] (none: 1):
// h = x rsqrt(mean(x^2) + eps) w.
template <typename acc_t>
void rms_norm_rows(int B, int n, acc_t eps, const acc_t* w, const acc_t* x, acc_t* h) {
  for (int r = 0; r < B; ++r) {
    const acc_t* xr = x + static_cast<int64_t>(r) * n;
    acc_t* hr = h + static_cast<int64_t>(r) * n;
    const acc_t rstd = 1 / std::sqrt(dot(n, xr, xr) / n + eps);
    for (int i = 0; i < n; ++i) hr[i] = w != nullptr ? xr[i] * rstd * w[i] : xr[i] * rstd;
  }
}

template <typename acc_t>
void layer_step(const LayerStepParams& lp, StepParams p, int threads) {
  const int B = p.B, H = p.H, Wd = p.H * p.D, C = lp.C;
  const int n_rates = lp.n_rates * H;
  const int N = 3 * Wd + n_rates;
  std::vector<acc_t> z(static_cast<size_t>(B) * N);        // [B, N] q | k | v | rate logits
  std::vector<acc_t> rates(static_cast<size_t>(B) * n_rates);  // [B, n_rates H]
  std::vector<acc_t> o(static_cast<size_t>(B) * Wd);        // [B, W] the step's output
  const acc_t* x = cptr<acc_t>(lp.x);
  std::vector<acc_t> h;  // [B, C] the pre-normed x
  if (lp.pre_norm) {
    h.resize(static_cast<size_t>(B) * C);
    rms_norm_rows(B, C, static_cast<acc_t>(lp.pre_eps),
                  lp.pre_w != 0 ? cptr<acc_t>(lp.pre_w) : static_cast<const acc_t*>(nullptr), x,
                  h.data());
  }
  matvec_rows(B, N, C, lp.pre_norm ? h.data() : x, cptr<acc_t>(lp.in_w),
              static_cast<const acc_t*>(nullptr), z.data(), threads);
  const acc_t* in_b = lp.in_b != 0 ? cptr<acc_t>(lp.in_b) : nullptr;
  const acc_t* rate_bias = cptr<acc_t>(lp.rate_bias);
  const acc_t eta_scale = static_cast<acc_t>(lp.eta_scale);
  for (int b = 0; b < B; ++b) {
    acc_t* zb = z.data() + static_cast<size_t>(b) * N;
    if (in_b != nullptr)
      for (int i = 0; i < 3 * Wd; ++i) zb[i] = in_b[i] + zb[i];
    for (int r = 0; r < n_rates; ++r) {
      const acc_t s = 1 / (1 + std::exp(-(rate_bias[r] + zb[3 * Wd + r])));  // sigmoid
      rates[static_cast<size_t>(b) * n_rates + r] = r < H ? s * eta_scale : s;  // eta | m | a
    }
  }
  // the step's token inputs: views of z ([B, H, 1, D] with strides N over B, D over H) and rates
  const auto base = reinterpret_cast<std::uintptr_t>(z.data());
  p.q = base, p.k = base + Wd * sizeof(acc_t), p.v = base + 2 * Wd * sizeof(acc_t);
  p.q_sb = p.k_sb = p.v_sb = N;
  p.q_sh = p.k_sh = p.v_sh = p.D;
  const auto at = [&](int first) { return reinterpret_cast<std::uintptr_t>(rates.data() + first); };
  p.eta = at(0), p.eta_sb = n_rates, p.eta_sh = 1;
  if (lp.n_rates == 3) {
    p.momentum = at(H), p.m_sb = n_rates, p.m_sh = 1;
    p.decay = at(2 * H), p.a_sb = n_rates, p.a_sh = 1;
  }
  p.o = reinterpret_cast<std::uintptr_t>(o.data());
  ttt_step_cpu(p, threads);
  if (lp.post_w != 0) {
    std::vector<acc_t> rstd(B);
    layer_norm_rows(B, Wd, static_cast<acc_t>(lp.post_eps), cptr<acc_t>(lp.post_w),
                    cptr<acc_t>(lp.post_b), o.data(), rstd.data());
  }
  acc_t* y = mptr<acc_t>(lp.y);
  matvec_rows(B, C, Wd, o.data(), cptr<acc_t>(lp.out_w),
              lp.out_b != 0 ? cptr<acc_t>(lp.out_b) : static_cast<const acc_t*>(nullptr), y,
              threads);
  if (lp.gate != 0) {
    const acc_t* alpha = cptr<acc_t>(lp.gate);
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < C; ++c) y[static_cast<int64_t>(b) * C + c] *= std::tanh(alpha[c]);
  }
  if (lp.residual)
    for (int64_t i = 0; i < static_cast<int64_t>(B) * C; ++i) y[i] = x[i] + y[i];
}

}  // namespace

void ttt_layer_step_cpu(const LayerStepParams& lp, const StepParams& step, int threads) {
  if (step.float64)
    layer_step<double>(lp, step, threads);
  else
    layer_step<float>(lp, step, threads);
}

}  // namespace ttt
