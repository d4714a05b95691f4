// The fused TTT-MLP math for one (batch, head) chain, written once for the CPU and the GPU.
//
// Fast model f(x) = gelu_tanh(x W1 + b1) W2 + b2 (W1 [D, F], W2 [F, D]). Per segment of n tokens
// (start weights W1, b1, W2, b2; target t_j = v_j - k_j or v_j, formed in load_kqt;
// A_ij = c_ij eta_j, a_j = e eta_j as in ttt_linear_chain.h):
//   keys:    Z1 = K W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2, G2 = d l / d Z2 (the LN loss, rows)
//            G1 = (G2 W2^T) * gelu'(Z1)                                   (d l / d Z1)
//   queries: Zq1 = Q W1 + b1 - [A * (Q K^T + 1)] G1,    Xq2 = gelu(Zq1)
//            Zq2 = Xq2 W2 + b2 - [A * (Xq2 X2^T + 1)] G2,  o = q + LN(Zq2) (or LN(Zq2):
//            output_row, ttt_options.h)
//   end:     W1 -= K^T diag(a) G1, b1 -= a^T G1, W2 -= X2^T diag(a) G2, b2 -= a^T G2
// (the dual form of ttt-core's scan: query i sees W_i = W_start - s_i sum_{j<=i} eta_j grad l_j).
// A call that starts inside a mini-batch (offset > 0) carries the state's grad_sum (G1w, g1b,
// G2w, g2b) into its first segment: Zq1 -= s_i (q_i G1w + g1b), Zq2 -= s_i (xq2_i G2w + g2b), and
// the end update subtracts e times it too (e = s_{off+n-1}, or 1 for an unscaled cut end).
// The backward walks the segments in reverse, recomputing them from the stored start weights.
#pragma once
#include "ttt_linear_chain.h"  // schedule macros, mm_acc, LayerNorm rows

namespace ttt {

#if defined(__CUDA_ARCH__)
TTT_HD float tanh_acc(float x) { return tanhf(x); }
#else
// fp32 tanh on the CPU as a branch-free rational function (the [13/6] minimax form Eigen uses,
// within a few ulp of tanhf), so the compiler vectorises the gelu loops; libm's tanhf is a scalar
// call and was half of the TTT-MLP chain's time.
inline float tanh_acc(float x) {
  const float xc = x < -9.0f ? -9.0f : (x > 9.0f ? 9.0f : x);
  const float x2 = xc * xc;
  float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = x2 * p + -8.60467152213735e-11f;
  p = x2 * p + 5.12229709037114e-08f;
  p = x2 * p + 1.48572235717979e-05f;
  p = x2 * p + 6.37261928875436e-04f;
  p = x2 * p + 4.89352455891786e-03f;
  float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = x2 * q + 2.26843463243900e-03f;
  q = x2 * q + 4.89352518554385e-03f;
  return xc * p / q;
}
#endif
TTT_HD double tanh_acc(double x) { return tanh(x); }

// gelu_tanh and its first two derivatives (u = c (x + k x^3), t = tanh(u)):
//   g = x (1 + t) / 2,  g' = (1 + t) / 2 + x (1 - t^2) u' / 2,
//   g'' = (1 - t^2) (u' + x (u'' - 2 t u'^2) / 2)
template <typename acc_t>
struct Gelu {
  acc_t g, d1, d2;
};

template <typename acc_t>
TTT_HD Gelu<acc_t> gelu_tanh(acc_t x) {
  const acc_t c = acc_t(0.7978845608028654), k = acc_t(0.044715);
  const acc_t u = c * (x + k * x * x * x), du = c * (acc_t(1) + acc_t(3) * k * x * x);
  const acc_t ddu = acc_t(6) * c * k * x;
  const acc_t t = tanh_acc(u), sech2 = acc_t(1) - t * t;
  Gelu<acc_t> r;
  r.g = acc_t(0.5) * x * (acc_t(1) + t);
  r.d1 = acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * x * sech2 * du;
  r.d2 = sech2 * (du + acc_t(0.5) * x * (ddu - acc_t(2) * t * du * du));
  return r;
}

// The elementwise gelu pass over m values of z: g = gelu(z), and with kDerivs >= 1 d1 = gelu'(z),
// with kDerivs = 2 d2 = gelu''(z) (one tanh per value). The tiles are distinct (__restrict__), so
// the CPU loop vectorises without a run-time overlap check, whatever surrounds the call.
template <int kDerivs, typename acc_t>
TTT_HD void gelu_pass(int m, const acc_t* __restrict__ z, acc_t* __restrict__ g,
                      acc_t* __restrict__ d1, acc_t* __restrict__ d2) {
  TTT_PAR_FOR(e, m) {
    const Gelu<acc_t> gl = gelu_tanh(z[e]);
    g[e] = gl.g;
    if (kDerivs >= 1) d1[e] = gl.d1;
    if (kDerivs >= 2) d2[e] = gl.d2;
  }
}

// Scratch of one chain (n <= bmax rows): weights, forward tiles, backward tiles and accumulators.
template <typename acc_t>
struct MLPBuffers {
  acc_t *W1, *b1, *W2, *b2;                                       // [D,F] [F] [F,D] [D]
  acc_t *K, *Q, *T, *X, *G2, *Xp;                                 // [n, D]
  acc_t *Z1, *X2, *GP, *G1, *Zq1, *Xq2;                           // [n, F]
  acc_t *GPP, *GPq;  // backward [n, F]: gelu''(Z1), gelu'(Zq1), from the recompute's gelu passes
  acc_t *S1, *S2, *P1, *P2, *eta, *a, *rstd, *rstdp;              // [n, n], [n]
  acc_t *QG1, *XqG2, *red1, *red2;  // grad_sum terms: [n, F], [n, D]; bwd partials [F], [D]
  acc_t *U, *H1, *DZ, *dZ2, *dQ, *dK, *dG2, *XdW2;                // backward [n, D] / H1 [n, F]
  acc_t *dG1, *dX2, *dXq2, *KdW1, *dP1, *dP2, *da;                // backward [n, F] / [n, n] / [n]
  acc_t *dW1, *db1, *dW2, *db2, *dlnw, *dlnb, *dscale;            // backward accumulators
};

template <typename acc_t>
TTT_HD int64_t carve_mlp(acc_t* base, int D, int F, int bmax, bool bwd, MLPBuffers<acc_t>* c) {
  int64_t off = 0;
  auto take = [&](acc_t** ptr, int64_t n) {
    *ptr = base == nullptr ? nullptr : base + off;
    off += (n + 3) / 4 * 4;  // 16-byte aligned for float
  };
  const int64_t nD = static_cast<int64_t>(bmax) * D, nF = static_cast<int64_t>(bmax) * F;
  const int64_t nn = static_cast<int64_t>(bmax) * bmax, DF = static_cast<int64_t>(D) * F;
  take(&c->W1, DF), take(&c->b1, F), take(&c->W2, DF), take(&c->b2, D);
  take(&c->K, nD), take(&c->Q, nD), take(&c->T, nD), take(&c->X, nD), take(&c->G2, nD);
  take(&c->Xp, nD), take(&c->Z1, nF), take(&c->X2, nF), take(&c->GP, nF), take(&c->G1, nF);
  take(&c->Zq1, nF), take(&c->Xq2, nF), take(&c->S1, nn), take(&c->S2, nn), take(&c->P1, nn), take(&c->P2, nn), take(&c->eta, bmax);
  take(&c->a, bmax), take(&c->rstd, bmax), take(&c->rstdp, bmax), take(&c->QG1, nF);
  take(&c->XqG2, nD);
  if (bwd) {
    take(&c->red1, F), take(&c->red2, D), take(&c->GPP, nF), take(&c->GPq, nF);
    take(&c->U, nD), take(&c->H1, nF), take(&c->DZ, nD), take(&c->dZ2, nD), take(&c->dQ, nD);
    take(&c->dK, nD), take(&c->dG2, nD), take(&c->XdW2, nD), take(&c->dG1, nF);
    take(&c->dX2, nF), take(&c->dXq2, nF), take(&c->KdW1, nF), take(&c->dP1, nn);
    take(&c->dP2, nn), take(&c->da, bmax), take(&c->dW1, DF), take(&c->db1, F);
    take(&c->dW2, DF), take(&c->db2, D), take(&c->dlnw, D), take(&c->dlnb, D);
    take(&c->dscale, bmax);
  }
  return off;
}

// The key pass of a segment at the start weights in c (K and T loaded): Z1 = K W1 + b1,
// X2 = gelu(Z1), GP = gelu'(Z1), Z2 = X2 W2 + b2 normalised into X, G2 = dl/dZ2 (U with bwd),
// G1 = (G2 W2^T) * gelu'(Z1) (H1 = G2 W2^T and GPP = gelu''(Z1) kept with bwd: the backward
// reads them instead of evaluating the tanh again). Also the Titans form's key pass.
template <typename acc_t>
TTT_HD void mlp_keys(const MLPBuffers<acc_t>& c, int n, int D, int F, acc_t eps, const acc_t* lnw,
                     const acc_t* lnb, bool bwd) {
  TTT_PAR_FOR2(e, i, col, n, F) { c.Z1[e] = c.b1[col]; }
  mm_acc<+1, false, false>(n, F, D, c.K, D, c.W1, F, c.Z1, F);
  if (bwd)
    gelu_pass<2>(n * F, c.Z1, c.X2, c.GP, c.GPP);
  else
    gelu_pass<1>(n * F, c.Z1, c.X2, c.GP, static_cast<acc_t*>(nullptr));
  TTT_SYNC();
  TTT_PAR_FOR2(e, i, col, n, D) { c.X[e] = c.b2[col]; }  // Z2 = X2 W2 + b2 (into X)
  mm_acc<+1, false, false>(n, D, F, c.X2, F, c.W2, D, c.X, D);
  TTT_SYNC();
  ln_rows(n, D, eps, lnw, lnb, c.X, c.rstd, c.T, c.G2, bwd ? c.U : nullptr);  // G2 = dl/dZ2
  TTT_SYNC();
  // G1 = (G2 W2^T) * gelu'(Z1)  (H1 = G2 W2^T kept for the backward)
  TTT_PAR_FOR(e, n * F) { c.G1[e] = 0; }
  mm_acc<+1, false, true>(n, F, D, c.G2, D, c.W2, D, c.G1, F);
  TTT_PAR_FOR(e, n * F) {
    if (bwd) c.H1[e] = c.G1[e];
    c.G1[e] = c.G1[e] * c.GP[e];
  }
  TTT_SYNC();
}

// Xq2 = gelu(Zq1) (the queries' hidden rows); with bwd also GPq = gelu'(Zq1) for the backward.
// Also the Titans form's.
template <typename acc_t>
TTT_HD void mlp_query_gelu(const MLPBuffers<acc_t>& c, int n, int F, bool bwd) {
  if (bwd)
    gelu_pass<1>(n * F, c.Zq1, c.Xq2, c.GPq, static_cast<acc_t*>(nullptr));
  else
    gelu_pass<0>(n * F, c.Zq1, c.Xq2, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
}

// Loads the segment's tokens and recomputes every forward tile from the start weights in c.
template <typename scalar_t, typename acc_t>
TTT_HD void mlp_recompute(const MLPParams& p, const MLPBuffers<acc_t>& c, int D, int F, int bi,
                          int hi, const Segment& g, bool bwd) {
  const int t0 = g.t0, n = g.n;
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  const acc_t* eta = static_cast<const acc_t*>(p.eta) + bh * p.L;
  const acc_t eps = static_cast<acc_t>(p.eps);
  load_kqt<scalar_t, acc_t>(p, c.K, c.Q, c.T, D, bi, hi, t0, n);
  TTT_PAR_FOR(i, n) { c.eta[i] = eta[t0 + i]; }
  TTT_SYNC();
  const acc_t e_end = end_coef(p, scale, g);
  TTT_PAR_FOR(j, n) { c.a[j] = e_end * c.eta[j]; }
  mlp_keys(c, n, D, F, eps, lnw, lnb, bwd);
  // S1 = Q K^T (kept for the backward), P1 = A * (S1 + 1)
  TTT_PAR_FOR(e, n * n) { c.S1[e] = 0; }
  mm_acc<+1, false, true>(n, n, D, c.Q, D, c.K, D, c.S1, n);
  TTT_PAR_FOR2(e, i, j, n, n) {
    const acc_t cf = coef(p, scale, g, i, j);
    c.P1[e] = cf != acc_t(0) ? cf * c.eta[j] * (c.S1[e] + acc_t(1)) : acc_t(0);
  }
  if (g.G) {  // QG1 = Q G1w + g1b (layer 1's grad_sum seen by every query)
    const acc_t* Gw = static_cast<const acc_t*>(p.G0) + bh * D * F;
    const acc_t* gb = static_cast<const acc_t*>(p.gb0) + bh * F;
    TTT_PAR_FOR2(e, i, col, n, F) { c.QG1[e] = gb[col]; }
    mm_acc<+1, false, false>(n, F, D, c.Q, D, Gw, F, c.QG1, F);
  }
  TTT_SYNC();
  // Zq1 = Q W1 + b1 - P1 G1 - s QG1, Xq2 = gelu(Zq1)
  TTT_PAR_FOR2(e, i, col, n, F) { c.Zq1[e] = c.b1[col]; }
  mm_acc<+1, false, false>(n, F, D, c.Q, D, c.W1, F, c.Zq1, F);
  mm_acc<-1, false, false>(n, F, n, c.P1, n, c.G1, F, c.Zq1, F);
  if (g.G) {
    TTT_PAR_FOR2(e, i, col, n, F) { c.Zq1[e] -= row_scale(p, scale, g, i) * c.QG1[e]; }
  }
  mlp_query_gelu(c, n, F, bwd);
  TTT_SYNC();
  // S2 = Xq2 X2^T (kept for the backward), P2 = A * (S2 + 1)
  TTT_PAR_FOR(e, n * n) { c.S2[e] = 0; }
  mm_acc<+1, false, true>(n, n, F, c.Xq2, F, c.X2, F, c.S2, n);
  TTT_PAR_FOR2(e, i, j, n, n) {
    const acc_t cf = coef(p, scale, g, i, j);
    c.P2[e] = cf != acc_t(0) ? cf * c.eta[j] * (c.S2[e] + acc_t(1)) : acc_t(0);
  }
  if (g.G) {  // XqG2 = Xq2 G2w + g2b (layer 2's grad_sum)
    const acc_t* Gw = static_cast<const acc_t*>(p.G20) + bh * F * D;
    const acc_t* gb = static_cast<const acc_t*>(p.gb20) + bh * D;
    TTT_PAR_FOR2(e, i, col, n, D) { c.XqG2[e] = gb[col]; }
    mm_acc<+1, false, false>(n, D, F, c.Xq2, F, Gw, D, c.XqG2, D);
  }
  TTT_SYNC();
  // Zq2 = Xq2 W2 + b2 - P2 G2 - s XqG2 (into Xp)
  TTT_PAR_FOR2(e, i, col, n, D) { c.Xp[e] = c.b2[col]; }
  mm_acc<+1, false, false>(n, D, F, c.Xq2, F, c.W2, D, c.Xp, D);
  mm_acc<-1, false, false>(n, D, n, c.P2, n, c.G2, D, c.Xp, D);
  if (g.G) {
    TTT_PAR_FOR2(e, i, col, n, D) { c.Xp[e] -= row_scale(p, scale, g, i) * c.XqG2[e]; }
  }
  TTT_SYNC();
  ln_rows<acc_t>(n, D, eps, lnw, lnb, c.Xp, c.rstdp, nullptr, nullptr, nullptr);
  TTT_SYNC();
}

// W1 -= e G1w + K^T diag(a) G1, b1 -= e g1b + a^T G1, W2 -= e G2w + X2^T diag(a) G2,
// b2 -= e g2b + a^T G2 (the grad_sum terms in the first segment of a call started inside one).
template <typename acc_t>
TTT_HD void mlp_update(const MLPParams& p, const MLPBuffers<acc_t>& c, int D, int F, int64_t bh,
                       const Segment& g) {
  const int n = g.n;
  const acc_t e_end = end_coef(p, static_cast<const acc_t*>(p.scale), g);
  const acc_t* G1w = g.G ? static_cast<const acc_t*>(p.G0) + bh * D * F : nullptr;
  const acc_t* g1b = g.G ? static_cast<const acc_t*>(p.gb0) + bh * F : nullptr;
  const acc_t* G2w = g.G ? static_cast<const acc_t*>(p.G20) + bh * F * D : nullptr;
  const acc_t* g2b = g.G ? static_cast<const acc_t*>(p.gb20) + bh * D : nullptr;
  if (g.G) {
    TTT_PAR_FOR(e, D * F) { c.W1[e] -= e_end * G1w[e]; }
    TTT_PAR_FOR(e, F * D) { c.W2[e] -= e_end * G2w[e]; }
    TTT_PAR_FOR(f, F) { c.b1[f] -= e_end * g1b[f]; }
    TTT_PAR_FOR(col, D) { c.b2[col] -= e_end * g2b[col]; }
  }
  mm_acc<-1, true, false, kPerK>(D, F, n, c.K, D, c.G1, F, c.W1, F, c.a);    // K^T diag(a) G1
  mm_acc<-1, true, false, kPerK>(F, D, n, c.X2, F, c.G2, D, c.W2, D, c.a);   // X2^T diag(a) G2
  mm_acc<-1, true, false>(1, F, n, c.a, 1, c.G1, F, c.b1, F);
  mm_acc<-1, true, false>(1, D, n, c.a, 1, c.G2, D, c.b2, D);
  TTT_SYNC();
}

// Copies (W1, b1, W2, b2) between the chain buffers and [B, H, (nseg,) ...] tensors.
template <typename acc_t>
TTT_HD void mlp_copy(const MLPBuffers<acc_t>& c, int D, int F, int64_t slot, bool to_buffers,
                     const void* W1, const void* b1, const void* W2, const void* b2) {
  const int64_t DF = static_cast<int64_t>(D) * F;
  acc_t* w1 = const_cast<acc_t*>(static_cast<const acc_t*>(W1)) + slot * DF;
  acc_t* w2 = const_cast<acc_t*>(static_cast<const acc_t*>(W2)) + slot * DF;
  acc_t* v1 = const_cast<acc_t*>(static_cast<const acc_t*>(b1)) + slot * F;
  acc_t* v2 = const_cast<acc_t*>(static_cast<const acc_t*>(b2)) + slot * D;
  TTT_PAR_FOR(e, D * F) {
    if (to_buffers) c.W1[e] = w1[e], c.W2[e] = w2[e];
    else w1[e] = c.W1[e], w2[e] = c.W2[e];
  }
  TTT_PAR_FOR(f, F) {
    if (to_buffers) c.b1[f] = v1[f];
    else v1[f] = c.b1[f];
  }
  TTT_PAR_FOR(d, D) {
    if (to_buffers) c.b2[d] = v2[d];
    else v2[d] = c.b2[d];
  }
}

// Forward of chain (bi, hi): o, the end weights and every segment's start weights.
template <typename scalar_t, typename acc_t>
TTT_HD void mlp_fwd_chain(const MLPParams& p, acc_t* ws, int D, int F, int bi, int hi) {
  MLPBuffers<acc_t> c;
  carve_mlp<acc_t>(ws, D, F, p.mini_batch_size, false, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  mlp_copy(c, D, F, bh, true, p.W0, p.b0, p.W20, p.b20);
  TTT_SYNC();
  const int nseg = p.num_segments();
  for (int s = 0; s < nseg; ++s) {
    const Segment g = segment(p, s);
    mlp_copy(c, D, F, bh * nseg + s, false, p.W_starts, p.b_starts, p.W2_starts, p.b2_starts);
    mlp_recompute<scalar_t, acc_t>(p, c, D, F, bi, hi, g, false);
    scalar_t* o = static_cast<scalar_t*>(p.o) + (bh * p.L + g.t0) * D;
    // o = q + gamma * LN(Zq2) + beta (or without q)
    output_rows(p.output_residual, g.n, D, c.Q, c.Xp, lnw, lnb, o);
    mlp_update(p, c, D, F, bh, g);
  }
  mlp_copy(c, D, F, bh, false, p.W_end, p.b_end, p.W2_end, p.b2_end);
}

}  // namespace ttt

#include "ttt_mlp_backward.h"
