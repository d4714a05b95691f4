// The fused TTT-Linear math for one (batch, head) chain, written once for the CPU and the GPU.
//
// Per segment of n tokens at in-mini-batch positions off..off+n-1 (start weights W [D, D], b [D];
// target t_j = v_j - k_j, or v_j (ttt_options.h); a segment is a whole mini-batch except where a
// streaming state cuts one):
//   Z = K W + b,  X = LN(Z) (rstd = 1/sigma),  U = gamma * (gamma * X + beta - T)
//   G = rstd * (U - mean(U) - X * mean(U * X))          rows: d l_j / d z_j
//   A_ij = c_ij eta_j, c_ij = s_{off+i} [j <= i] (causal) or 1 (non-causal);  a_j = e * eta_j
//   P = A * (Q K^T + 1),  Z' = Q W + b - s (Q Gw + gb) - P G  (= q_i W_i + b_i)
//   o = q + LN(Z'), or LN(Z') without the output residual (ttt_options.h)
//   W <- W - e Gw - K^T diag(a) G,  b <- b - e gb - a^T G           (the next start weights)
// Gw, gb: what the earlier tokens of a cut mini-batch read (the state's grad_sum; first segment
// only, else zero). e = s_{off+n-1} (causal), 1 (non-causal, or an unscaled cut end).
// The backward walks the mini-batches in reverse, recomputing the forward from the stored start
// weights, and differentiates each line above (see the comments in linear_bwd_chain).
//
// Parallel loops: on the GPU TTT_PAR_FOR strides over the block's threads and TTT_SYNC is
// __syncthreads(); on the CPU they are a plain loop and a no-op. Every output element is written
// by one thread in a fixed order, so both paths are deterministic (no atomics). The products
// (mm_acc, ttt_products.h) keep each element's order of operations on both schedules.
#pragma once
#include <math.h>

#include "ttt_params.h"

#if defined(__CUDACC__)
#define TTT_HD __host__ __device__ __forceinline__
#else
#define TTT_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define TTT_TID (static_cast<int>(threadIdx.x))
#define TTT_NT (static_cast<int>(blockDim.x))
#define TTT_SYNC() __syncthreads()
#define TTT_PAR_FOR(i, N) for (int i = TTT_TID; i < (N); i += TTT_NT)
#elif defined(TTT_EMULATE_BLOCK)  // CPU check of the phase structure: see ttt_cpu_block.cpp
#define TTT_TID (::ttt_block::tid)
#define TTT_NT (::ttt_block::nt)
#define TTT_SYNC() (::ttt_block::sync())
#define TTT_PAR_FOR(i, N) for (int i = TTT_TID; i < (N); i += TTT_NT, ::ttt_block::maybe_yield())
#else
#define TTT_TID 0
#define TTT_NT 1
#define TTT_SYNC() ((void)0)
#define TTT_PAR_FOR(i, N) for (int i = TTT_TID; i < (N); i += TTT_NT)
#endif
// TTT_PAR_FOR2(e, i, j, N, M): the elements e = i * M + j of an N x M tile, spread over the
// threads as TTT_PAR_FOR(e, N * M) spreads them; on the CPU two plain loops (no division per
// element). The body sees e, i and j.
#if defined(__CUDA_ARCH__) || defined(TTT_EMULATE_BLOCK)
#define TTT_PAR_FOR2(e, i, j, N, M) \
  TTT_PAR_FOR(e, (N) * (M))         \
  for (int i = e / (M), j = e % (M), e##_once = ((void)i, (void)j, 1); e##_once; e##_once = 0)
#else
#define TTT_PAR_FOR2(e, i, j, N, M) \
  for (int i = 0; i < (N); ++i)     \
    for (int j = 0, e = i * (M); j < (M); ++j, ++e)
#endif

#include "ttt_products.h"  // mm_acc: the products, tiled on the CPU, strided over threads on the GPU
#include "ttt_ln_rows.h"   // the row-wise LayerNorm passes
#include "ttt_options.h"   // the loss target and the output: the options' rules

namespace ttt {

// Scratch of one chain: n <= bmax rows of D columns per buffer.
template <typename acc_t>
struct ChainBuffers {
  acc_t *W, *bw;                                   // [D, D], [D] current start weights
  acc_t *K, *Q, *T, *X, *G, *Xp, *S, *P, *QG, *eta, *a, *rstd;  // forward (S = Q K^T, QG = Q Gw + gb)
  acc_t *U, *DZ, *dQ, *dK, *KdW, *dP, *rstdp, *da, *red;     // backward only
  acc_t *dW, *db, *dlnw, *dlnb, *dscale;               // backward accumulators
};

// Lays the buffers out from `base` (or only counts when base is null); returns the element count.
template <typename acc_t>
TTT_HD int64_t carve_chain(acc_t* base, int D, int bmax, bool bwd, ChainBuffers<acc_t>* c) {
  int64_t off = 0;
  auto take = [&](acc_t** ptr, int64_t n) {
    if (ptr != nullptr) *ptr = base == nullptr ? nullptr : base + off;
    off += (n + 3) / 4 * 4;  // 16-byte aligned for float
  };
  const int64_t nD = static_cast<int64_t>(bmax) * D, nn = static_cast<int64_t>(bmax) * bmax;
  take(&c->W, static_cast<int64_t>(D) * D);
  take(&c->bw, D);
  take(&c->K, nD), take(&c->Q, nD), take(&c->T, nD), take(&c->X, nD), take(&c->G, nD);
  take(&c->Xp, nD), take(&c->S, nn), take(&c->P, nn), take(&c->QG, nD), take(&c->eta, bmax), take(&c->a, bmax);
  take(&c->rstd, bmax);
  if (bwd) {
    take(&c->U, nD), take(&c->DZ, nD), take(&c->dQ, nD), take(&c->dK, nD), take(&c->KdW, nD);
    take(&c->dP, nn), take(&c->rstdp, bmax), take(&c->da, bmax), take(&c->red, D);
    take(&c->dW, static_cast<int64_t>(D) * D), take(&c->db, D), take(&c->dlnw, D);
    take(&c->dlnb, D), take(&c->dscale, bmax);
  }
  return off;
}

// A run of n tokens [t0, t0 + n) inside one mini-batch, at in-mini-batch positions off.. ; `G`:
// it carries the state's grad_sum (the first segment of a call that starts inside a mini-batch).
struct Segment {
  int t0, n, off;
  bool completes, unscaled_end, G;
};

TTT_HD Segment segment(const LinearParams& p, int s) {
  const int b = p.mini_batch_size, first = p.first_segment_len();
  Segment g;
  g.t0 = s == 0 ? 0 : first + (s - 1) * b;
  g.off = s == 0 ? p.offset : 0;
  g.n = s == 0 ? first : ((p.L - g.t0) < b ? (p.L - g.t0) : b);
  g.completes = !p.unbounded && g.off + g.n == b;
  // see LinearParams::end_unscaled: only the last segment can be incomplete
  g.unscaled_end = p.end_unscaled && p.causal && !g.completes;
  g.G = s == 0 && p.G0 != nullptr;
  return g;
}

// s_{off+i}: the token scale of segment row i (1 when non-causal).
template <typename acc_t>
TTT_HD acc_t row_scale(const LinearParams& p, const acc_t* scale, const Segment& g, int i) {
  return p.causal ? scale[g.off + i] : acc_t(1);
}

template <typename acc_t>
TTT_HD acc_t coef(const LinearParams& p, const acc_t* scale, const Segment& g, int i, int j) {
  if (!p.causal) return acc_t(1);
  return j <= i ? scale[g.off + i] : acc_t(0);
}

// e: the coefficient of the segment's steps (and of grad_sum) in its end update (a_j = e * eta_j).
template <typename acc_t>
TTT_HD acc_t end_coef(const LinearParams& p, const acc_t* scale, const Segment& g) {
  return g.unscaled_end ? acc_t(1) : row_scale(p, scale, g, g.n - 1);
}

// The gradient of the state's grad_sum bias in a cut segment's backward, before db joins this
// segment's sum: dgb[col] = -e db_end[col] - sum_i s_i X[i, col] (X: the rows [n, C] through
// which each query read it).
template <typename acc_t>
TTT_HD void grad_sum_bias_grad(const LinearParams& p, const acc_t* scale, const Segment& g,
                               acc_t e_end, int C, const acc_t* X, const acc_t* db, acc_t* dgb) {
  TTT_PAR_FOR(col, C) {
    acc_t sg = 0;
    for (int i = 0; i < g.n; ++i) sg += row_scale(p, scale, g, i) * X[i * C + col];
    dgb[col] = -e_end * db[col] - sg;
  }
}

template <typename scalar_t, typename acc_t>
TTT_HD acc_t ld(const void* ptr, int64_t idx) {
  return static_cast<acc_t>(static_cast<const scalar_t*>(ptr)[idx]);
}

// Loads tokens [t0, t0 + n) of chain (bi, hi) and recomputes Z, X, (U), G, P, Z' into the buffers.
// On return X and Xp hold the normalised rows, rstd / rstdp (if given) their 1/sigma.
// Rows t0 .. t0+n-1 of this chain's keys K, queries Q and targets T (V - K, or V: loss_target)
// into n x D scratch tiles (acc_t), read through the strides of q, k, v (every op's params extend
// LinearParams): the one place every chain forms the target.
template <typename scalar_t, typename acc_t>
TTT_HD void load_kqt(const LinearParams& p, acc_t* K, acc_t* Q, acc_t* T, int D, int bi, int hi,
                     int t0, int n) {
  TTT_PAR_FOR2(e, i, col, n, D) {
    const int64_t t = t0 + i;
    const acc_t kv = ld<scalar_t, acc_t>(p.k, bi * p.k_sb + hi * p.k_sh + t * p.k_sl + col);
    K[e] = kv;
    Q[e] = ld<scalar_t, acc_t>(p.q, bi * p.q_sb + hi * p.q_sh + t * p.q_sl + col);
    const acc_t vv = ld<scalar_t, acc_t>(p.v, bi * p.v_sb + hi * p.v_sh + t * p.v_sl + col);
    T[e] = loss_target<acc_t>(p.value_target, vv, kv);
  }
}

template <typename scalar_t, typename acc_t>
TTT_HD void chain_recompute(const LinearParams& p, const ChainBuffers<acc_t>& c, int D, int bi,
                            int hi, const Segment& g, bool bwd) {
  const int t0 = g.t0, n = g.n;
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t* eta = static_cast<const acc_t*>(p.eta) + (static_cast<int64_t>(bi) * p.H + hi) * p.L;
  const acc_t eps = static_cast<acc_t>(p.eps);
  // load K, Q, the targets T (rows of this mini-batch) and eta
  load_kqt<scalar_t, acc_t>(p, c.K, c.Q, c.T, D, bi, hi, t0, n);
  TTT_PAR_FOR(i, n) { c.eta[i] = eta[t0 + i]; }
  TTT_SYNC();
  const acc_t e_end = end_coef(p, scale, g);
  TTT_PAR_FOR(j, n) { c.a[j] = e_end * c.eta[j]; }
  // Z = K W + b
  TTT_PAR_FOR2(e, i, col, n, D) { c.X[e] = c.bw[col]; }
  mm_acc<+1, false, false>(n, D, D, c.K, D, c.W, D, c.X, D);
  TTT_SYNC();
  // rows: X = LN(Z), G = d l / d z (and U for the backward)
  ln_rows(n, D, eps, lnw, lnb, c.X, c.rstd, c.T, c.G, bwd ? c.U : nullptr);
  // S = Q K^T (kept: the backward reads it again), P = A * (S + 1)
  TTT_PAR_FOR(e, n * n) { c.S[e] = 0; }
  mm_acc<+1, false, true>(n, n, D, c.Q, D, c.K, D, c.S, n);
  TTT_PAR_FOR2(e, i, j, n, n) {
    const acc_t cf = coef(p, scale, g, i, j);
    c.P[e] = cf != acc_t(0) ? cf * c.eta[j] * (c.S[e] + acc_t(1)) : acc_t(0);
  }
  if (g.G) {  // QG = Q Gw + gb (the state's grad_sum seen by every query of the segment)
    const acc_t* Gw = static_cast<const acc_t*>(p.G0) + bh * D * D;
    const acc_t* gb = static_cast<const acc_t*>(p.gb0) + bh * D;
    TTT_PAR_FOR2(e, i, col, n, D) { c.QG[e] = gb[col]; }
    mm_acc<+1, false, false>(n, D, D, c.Q, D, Gw, D, c.QG, D);
  }
  TTT_SYNC();
  // Z' = Q W + b - P G - s (Q Gw + gb)
  TTT_PAR_FOR2(e, i, col, n, D) { c.Xp[e] = c.bw[col]; }
  mm_acc<+1, false, false>(n, D, D, c.Q, D, c.W, D, c.Xp, D);
  mm_acc<-1, false, false>(n, D, n, c.P, n, c.G, D, c.Xp, D);
  if (g.G) {
    TTT_PAR_FOR2(e, i, col, n, D) { c.Xp[e] -= row_scale(p, scale, g, i) * c.QG[e]; }
  }
  TTT_SYNC();
  // rows: Xp = LN(Z') (its rstd is kept for the backward; the forward reuses rstd, read by no one after G)
  ln_rows<acc_t>(n, D, eps, lnw, lnb, c.Xp, bwd ? c.rstdp : c.rstd, nullptr, nullptr, nullptr);
  TTT_SYNC();
}

// W <- W - e Gw - K^T diag(a) G, b <- b - e gb - a^T G (reads K, G, a of the current segment).
template <typename acc_t>
TTT_HD void chain_update(const LinearParams& p, const ChainBuffers<acc_t>& c, int D, int bi,
                         int hi, const Segment& g) {
  const int n = g.n;
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t e_end = end_coef(p, static_cast<const acc_t*>(p.scale), g);
  const acc_t* Gw = g.G ? static_cast<const acc_t*>(p.G0) + bh * D * D : nullptr;
  const acc_t* gb = g.G ? static_cast<const acc_t*>(p.gb0) + bh * D : nullptr;
  if (Gw != nullptr) {
    TTT_PAR_FOR(e, D * D) { c.W[e] -= e_end * Gw[e]; }
    TTT_PAR_FOR(col, D) { c.bw[col] -= e_end * gb[col]; }
  }
  mm_acc<-1, true, false, kPerK>(D, D, n, c.K, D, c.G, D, c.W, D, c.a);  // W -= K^T diag(a) G
  mm_acc<-1, true, false>(1, D, n, c.a, 1, c.G, D, c.bw, D);             // b -= a^T G
  TTT_SYNC();
}

// Forward of chain (bi, hi): o, W_end, b_end and (if p.W_starts) every mini-batch's start weights.
template <typename scalar_t, typename acc_t>
TTT_HD void linear_fwd_chain(const LinearParams& p, acc_t* ws, int D, int bi, int hi) {
  ChainBuffers<acc_t> c;
  carve_chain<acc_t>(ws, D, p.mini_batch_size, false, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  TTT_PAR_FOR(e, D * D) { c.W[e] = static_cast<const acc_t*>(p.W0)[bh * D * D + e]; }
  TTT_PAR_FOR(e, D) { c.bw[e] = static_cast<const acc_t*>(p.b0)[bh * D + e]; }
  TTT_SYNC();
  const int nmb = p.num_segments();
  for (int mb = 0; mb < nmb; ++mb) {
    const Segment g = segment(p, mb);
    const int t0 = g.t0, n = g.n;
    if (p.W_starts != nullptr) {
      acc_t* Ws = static_cast<acc_t*>(p.W_starts) + (bh * nmb + mb) * D * D;
      acc_t* bs = static_cast<acc_t*>(p.b_starts) + (bh * nmb + mb) * D;
      TTT_PAR_FOR(e, D * D) { Ws[e] = c.W[e]; }
      TTT_PAR_FOR(e, D) { bs[e] = c.bw[e]; }
    }
    chain_recompute<scalar_t, acc_t>(p, c, D, bi, hi, g, false);
    // o = q + gamma * LN(Z') + beta (or without q)
    scalar_t* o = static_cast<scalar_t*>(p.o) + (bh * p.L + t0) * D;
    output_rows(p.output_residual, n, D, c.Q, c.Xp, lnw, lnb, o);
    chain_update(p, c, D, bi, hi, g);
  }
  TTT_PAR_FOR(e, D * D) { static_cast<acc_t*>(p.W_end)[bh * D * D + e] = c.W[e]; }
  TTT_PAR_FOR(e, D) { static_cast<acc_t*>(p.b_end)[bh * D + e] = c.bw[e]; }
}

// Backward of chain (bi, hi), mini-batches in reverse order; dW / db carry d/dW_start backwards.
template <typename scalar_t, typename acc_t>
TTT_HD void linear_bwd_chain(const LinearParams& p, acc_t* ws, int D, int bi, int hi) {
  ChainBuffers<acc_t> c;
  const int bmax = p.mini_batch_size;
  carve_chain<acc_t>(ws, D, bmax, true, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t* dWe = static_cast<const acc_t*>(p.dW_end);
  const acc_t* dbe = static_cast<const acc_t*>(p.db_end);
  TTT_PAR_FOR(e, D * D) { c.dW[e] = dWe != nullptr ? dWe[bh * D * D + e] : acc_t(0); }
  TTT_PAR_FOR(e, D) {
    c.db[e] = dbe != nullptr ? dbe[bh * D + e] : acc_t(0);
    c.dlnw[e] = 0;
    c.dlnb[e] = 0;
  }
  TTT_PAR_FOR(e, bmax) { c.dscale[e] = 0; }
  const int nmb = p.num_segments();
  for (int mb = nmb - 1; mb >= 0; --mb) {
    const Segment g = segment(p, mb);
    const int t0 = g.t0, n = g.n, off = g.off;
    const acc_t e_end = end_coef(p, scale, g);
    const acc_t* Gw = g.G ? static_cast<const acc_t*>(p.G0) + bh * D * D : nullptr;
    const acc_t* gb = g.G ? static_cast<const acc_t*>(p.gb0) + bh * D : nullptr;
    const acc_t* Ws = static_cast<const acc_t*>(p.W_starts) + (bh * nmb + mb) * D * D;
    const acc_t* bs = static_cast<const acc_t*>(p.b_starts) + (bh * nmb + mb) * D;
    TTT_PAR_FOR(e, D * D) { c.W[e] = Ws[e]; }
    TTT_PAR_FOR(e, D) { c.bw[e] = bs[e]; }
    TTT_PAR_FOR2(e, i, col, n, D) {  // dQ holds dO until the output LN's backward has read it
      c.dQ[e] = ld<scalar_t, acc_t>(p.dO, bi * p.do_sb + hi * p.do_sh + (t0 + i) * p.do_sl + col);
      c.dK[e] = 0;
    }
    TTT_SYNC();
    chain_recompute<scalar_t, acc_t>(p, c, D, bi, hi, g, true);
    // output LN: DZ = d/dZ' of gamma * LN(Z') + beta
    ln_out_bwd_rows(n, D, lnw, c.Xp, c.rstdp, c.dQ, c.DZ);
    // d gamma, d beta of the output LN
    add_col_sums(n, D, c.dlnw, [&](int i, int col) { return c.dQ[i * D + col] * c.Xp[i * D + col]; });
    add_col_sums(n, D, c.dlnb, [&](int i, int col) { return c.dQ[i * D + col]; });
    TTT_PAR_FOR(e, n * D) { c.KdW[e] = 0; }
    mm_acc<+1, false, false>(n, D, D, c.K, D, c.dW, D, c.KdW, D);  // KdW = K dW_end
    if (g.G && !g.unscaled_end && p.causal) {  // <Gw, dW_end> + <gb, db_end> per column
      TTT_PAR_FOR(col, D) {
        acc_t s = gb[col] * c.db[col];
        for (int d = 0; d < D; ++d) s += Gw[d * D + col] * c.dW[d * D + col];
        c.red[col] = s;
      }
    }
    TTT_SYNC();
    // dQ: dO through the output residual (o = q + ...), zero without it
    TTT_PAR_FOR(e, n * D) { c.dQ[e] = output_dq<acc_t>(p.output_residual, c.dQ[e]); }
    // da_j = -(k_j dW_end + db_end) . g_j   (from W_end = W - K^T diag(a) G, b_end = b - a^T G)
    TTT_PAR_FOR(j, n) {
      acc_t s = 0;
      for (int d = 0; d < D; ++d) s += (c.KdW[j * D + d] + c.db[d]) * c.G[j * D + d];
      c.da[j] = -s;
    }
    // dK = -diag(a) G dW_end^T (dK is zero here) ; dP = -DZ G^T
    mm_acc<-1, false, true, kPerRow>(n, D, D, c.G, D, c.dW, D, c.dK, D, c.a);
    TTT_PAR_FOR(e, n * n) { c.dP[e] = 0; }
    mm_acc<-1, false, true>(n, n, D, c.DZ, D, c.G, D, c.dP, n);
    TTT_SYNC();
    // dG = -a (K dW_end + db_end) - P^T DZ, in place over KdW
    TTT_PAR_FOR2(e, i, col, n, D) { c.KdW[e] = -(c.a[i] * (c.KdW[e] + c.db[col])); }
    mm_acc<-1, true, false>(n, D, n, c.P, n, c.DZ, D, c.KdW, D);
    TTT_SYNC();  // dG reads db before it moves on to d/dW_start
    // through Z' = Q W + b - s (Q Gw + gb) - P G: dW += Q^T DZ, db += sum DZ, dQ += DZ W^T;
    // with grad_sum: dGw = -e dW_end - Q^T diag(s) DZ, dgb likewise, dQ -= s DZ Gw^T
    acc_t* dGw = g.G ? static_cast<acc_t*>(p.dG0) + bh * D * D : nullptr;
    acc_t* dgb = g.G ? static_cast<acc_t*>(p.dgb0) + bh * D : nullptr;
    if (dGw != nullptr) {  // dGw = -e dW_end - Q^T diag(s) DZ (s_i = 1 when non-causal)
      TTT_PAR_FOR(e, D * D) { dGw[e] = -e_end * c.dW[e]; }
      if (p.causal)
        mm_acc<-1, true, false, kPerK>(D, D, n, c.Q, D, c.DZ, D, dGw, D, scale + off);
      else
        mm_acc<-1, true, false>(D, D, n, c.Q, D, c.DZ, D, dGw, D);
    }
    mm_acc<+1, true, false>(D, D, n, c.Q, D, c.DZ, D, c.dW, D);  // dW += Q^T DZ
    if (dgb != nullptr) {
      grad_sum_bias_grad(p, scale, g, e_end, D, c.DZ, c.db, dgb);
      TTT_SYNC();
    }
    add_col_sums(n, D, c.db, [&](int i, int col) { return c.DZ[i * D + col]; });  // db += sum DZ
    mm_acc<+1, false, true>(n, D, D, c.DZ, D, c.W, D, c.dQ, D);  // dQ += DZ W^T
    if (Gw != nullptr) {                                           // dQ -= diag(s) DZ Gw^T
      if (p.causal)
        mm_acc<-1, false, true, kPerRow>(n, D, D, c.DZ, D, Gw, D, c.dQ, D, scale + off);
      else
        mm_acc<-1, false, true>(n, D, D, c.DZ, D, Gw, D, c.dQ, D);
    }
    // through P = A * (S + 1), S = Q K^T (as chain_recompute left it), A_ij = c_ij eta_j and
    // a_j = c_{n-1,j} eta_j
    TTT_SYNC();
    acc_t* deta = static_cast<acc_t*>(p.deta) + bh * p.L + t0;
    TTT_PAR_FOR(j, n) {
      acc_t s = c.da[j] * e_end;
      for (int i = 0; i < n; ++i) {
        const acc_t cf = coef(p, scale, g, i, j);
        if (cf == acc_t(0)) continue;
        s += c.dP[i * n + j] * (c.S[i * n + j] + acc_t(1)) * cf;
      }
      deta[j] = s;
    }
    if (p.causal) {
      TTT_PAR_FOR(i, n) {
        acc_t s = 0;
        for (int j = 0; j <= i; ++j) s += c.dP[i * n + j] * (c.S[i * n + j] + acc_t(1)) * c.eta[j];
        if (g.G) {  // Z' -= s_i (q_i Gw + gb)
          for (int col = 0; col < D; ++col) s -= c.QG[i * D + col] * c.DZ[i * D + col];
        }
        if (i == n - 1 && !g.unscaled_end) {  // the end update's e = s_{off+n-1}
          for (int j = 0; j < n; ++j) s += c.da[j] * c.eta[j];
          if (g.G)
            for (int col = 0; col < D; ++col) s -= c.red[col];
        }
        c.dscale[off + i] += s;
      }
    }
    TTT_SYNC();
    TTT_PAR_FOR2(e, i, j, n, n) {  // dS = dP * A, the gradient of S (stored over P, read by dG above)
      c.P[e] = c.dP[e] * coef(p, scale, g, i, j) * c.eta[j];
    }
    TTT_SYNC();
    mm_acc<+1, false, false>(n, D, n, c.P, n, c.K, D, c.dQ, D);  // dQ += dS K
    mm_acc<+1, true, false>(n, D, n, c.P, n, c.Q, D, c.dK, D);   // dK += dS^T Q
    // rows: through G = rstd * (U - mean U - X mean(U X)), U = gamma (gamma X + beta - T),
    // X = LN(Z). Writes dZ over DZ and dU over U (dG is in KdW).
    ln_loss_grad_bwd_rows(n, D, lnw, c.X, c.G, c.rstd, c.KdW, c.U, c.DZ);
    TTT_SYNC();
    ln_loss_param_grads(n, D, lnw, lnb, c.X, c.T, c.U, c.dlnw, c.dlnb);  // d gamma, d beta through U
    const int64_t row0 = (bh * p.L + t0) * D;
    mm_acc<+1, false, true>(n, D, D, c.DZ, D, c.W, D, c.dK, D);  // dK += dZ W^T
    TTT_PAR_FOR2(e, i, col, n, D) {  // dT = -gamma dU = dv; dk = dK + its share through T
      const acc_t dt = -(lnw[col] * c.U[e]);
      const acc_t dk = c.dK[e] + loss_target_dk<acc_t>(p.value_target, dt);
      static_cast<scalar_t*>(p.dk)[row0 + e] = static_cast<scalar_t>(dk);
      static_cast<scalar_t*>(p.dv)[row0 + e] = static_cast<scalar_t>(dt);
      static_cast<scalar_t*>(p.dq)[row0 + e] = static_cast<scalar_t>(c.dQ[e]);
    }
    mm_acc<+1, true, false>(D, D, n, c.K, D, c.DZ, D, c.dW, D);  // dW += K^T dZ
    add_col_sums(n, D, c.db, [&](int i, int col) { return c.DZ[i * D + col]; });  // db += sum dZ
    TTT_SYNC();
    if (p.dW_starts != nullptr) {  // W_starts[mb] is an output too: its gradient joins dW_start
      const acc_t* dWs = static_cast<const acc_t*>(p.dW_starts) + (bh * nmb + mb) * D * D;
      const acc_t* dbs = static_cast<const acc_t*>(p.db_starts) + (bh * nmb + mb) * D;
      TTT_PAR_FOR(e, D * D) { c.dW[e] += dWs[e]; }
      TTT_PAR_FOR(e, D) { c.db[e] += dbs[e]; }
      TTT_SYNC();
    }
  }
  TTT_PAR_FOR(e, D * D) { static_cast<acc_t*>(p.dW0)[bh * D * D + e] = c.dW[e]; }
  TTT_PAR_FOR(e, D) {
    static_cast<acc_t*>(p.db0)[bh * D + e] = c.db[e];
    static_cast<acc_t*>(p.dln_w)[bh * D + e] = c.dlnw[e];
    static_cast<acc_t*>(p.dln_b)[bh * D + e] = c.dlnb[e];
  }
  TTT_PAR_FOR(e, bmax) { static_cast<acc_t*>(p.dscale)[bh * bmax + e] = c.dscale[e]; }
}

}  // namespace ttt
