// Backward of the fused TTT-MLP chain (see ttt_mlp_chain.h for the forward it differentiates).
// Segments in reverse; each is recomputed from its stored start weights, then every line of the
// forward is differentiated in phases separated by TTT_SYNC. dW1/db1/dW2/db2 carry d/dW_start
// backwards through the segments. Every element is written by one thread (deterministic).
#pragma once
#include "ttt_mlp_chain.h"

namespace ttt {

template <typename scalar_t, typename acc_t>
TTT_HD void mlp_bwd_chain(const MLPParams& p, acc_t* ws, int D, int F, int bi, int hi) {
  MLPBuffers<acc_t> c;
  const int bmax = p.mini_batch_size;
  carve_mlp<acc_t>(ws, D, F, bmax, true, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const int64_t DF = static_cast<int64_t>(D) * F;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  const acc_t* scale = static_cast<const acc_t*>(p.scale);
  {  // the carried gradients start as those of the end weights
    const acc_t* dW1e = static_cast<const acc_t*>(p.dW_end);
    const acc_t* db1e = static_cast<const acc_t*>(p.db_end);
    const acc_t* dW2e = static_cast<const acc_t*>(p.dW2_end);
    const acc_t* db2e = static_cast<const acc_t*>(p.db2_end);
    TTT_PAR_FOR(e, D * F) {
      c.dW1[e] = dW1e != nullptr ? dW1e[bh * DF + e] : acc_t(0);
      c.dW2[e] = dW2e != nullptr ? dW2e[bh * DF + e] : acc_t(0);
    }
    TTT_PAR_FOR(f, F) { c.db1[f] = db1e != nullptr ? db1e[bh * F + f] : acc_t(0); }
    TTT_PAR_FOR(d, D) {
      c.db2[d] = db2e != nullptr ? db2e[bh * D + d] : acc_t(0);
      c.dlnw[d] = 0, c.dlnb[d] = 0;
    }
    TTT_PAR_FOR(i, bmax) { c.dscale[i] = 0; }
  }
  const int nseg = p.num_segments();
  for (int s = nseg - 1; s >= 0; --s) {
    const Segment g = segment(p, s);
    const int t0 = g.t0, n = g.n;
    const acc_t e_end = end_coef(p, scale, g);
    // the state's grad_sum (first segment of a call started inside a mini-batch), else null
    const acc_t* G1w = g.G ? static_cast<const acc_t*>(p.G0) + bh * DF : nullptr;
    const acc_t* g1b = g.G ? static_cast<const acc_t*>(p.gb0) + bh * F : nullptr;
    const acc_t* G2w = g.G ? static_cast<const acc_t*>(p.G20) + bh * DF : nullptr;
    const acc_t* g2b = g.G ? static_cast<const acc_t*>(p.gb20) + bh * D : nullptr;
    const int64_t slot = bh * nseg + s;
    mlp_copy(c, D, F, slot, true, p.W_starts, p.b_starts, p.W2_starts, p.b2_starts);
    TTT_PAR_FOR2(e, i, col, n, D) {  // dQ holds dO until the output LN's backward has read it
      c.dQ[e] = ld<scalar_t, acc_t>(p.dO, bi * p.do_sb + hi * p.do_sh + (t0 + i) * p.do_sl + col);
    }
    TTT_SYNC();
    mlp_recompute<scalar_t, acc_t>(p, c, D, F, bi, hi, g, true);

    // B1: output LN (DZ = d/dZq2); the end update against the carried dW_end (not yet moved)
    ln_out_bwd_rows(n, D, lnw, c.Xp, c.rstdp, c.dQ, c.DZ);
    add_col_sums(n, D, c.dlnw, [&](int i, int col) { return c.dQ[i * D + col] * c.Xp[i * D + col]; });
    add_col_sums(n, D, c.dlnb, [&](int i, int col) { return c.dQ[i * D + col]; });
    // KdW1 = K dW1_end + db1_end;  dX2 = -diag(a) G2 dW2_end^T
    TTT_PAR_FOR2(e, i, col, n, F) { c.KdW1[e] = c.db1[col], c.dX2[e] = 0; }
    mm_acc<+1, false, false>(n, F, D, c.K, D, c.dW1, F, c.KdW1, F);
    mm_acc<-1, false, true, kPerRow>(n, F, D, c.G2, D, c.dW2, D, c.dX2, F, c.a);
    // XdW2 = X2 dW2_end + db2_end;  dK = -diag(a) G1 dW1_end^T
    TTT_PAR_FOR2(e, i, col, n, D) { c.XdW2[e] = c.db2[col], c.dK[e] = 0; }
    mm_acc<+1, false, false>(n, D, F, c.X2, F, c.dW2, D, c.XdW2, D);
    mm_acc<-1, false, true, kPerRow>(n, D, F, c.G1, F, c.dW1, F, c.dK, D, c.a);
    if (g.G && p.causal && !g.unscaled_end) {  // <grad_sum, d end weights> partials (for d e)
      TTT_PAR_FOR(f, F) {
        acc_t s = g1b[f] * c.db1[f];
        for (int d = 0; d < D; ++d) s += G1w[d * F + f] * c.dW1[d * F + f];
        c.red1[f] = s;
      }
      TTT_PAR_FOR(d, D) {
        acc_t s = g2b[d] * c.db2[d];
        for (int f = 0; f < F; ++f) s += G2w[f * D + d] * c.dW2[f * D + d];
        c.red2[d] = s;
      }
    }
    TTT_SYNC();
    // B2: dQ = dO through the output residual (zero without it); da; layer 2 of the queries:
    // dP2 = -DZ G2^T, dXq2 = DZ W2^T, dG2 = -a XdW2 - P2^T DZ
    TTT_PAR_FOR(e, n * D) { c.dQ[e] = output_dq<acc_t>(p.output_residual, c.dQ[e]); }
    row_dots(n, F, c.KdW1, c.G1, c.da, false);  // da = -(rows of KdW1 . G1 + XdW2 . G2)
    row_dots(n, D, c.XdW2, c.G2, c.da, true);
    TTT_SYNC();
    TTT_PAR_FOR(j, n) { c.da[j] = -c.da[j]; }
    TTT_PAR_FOR(e, n * n) { c.dP2[e] = 0; }
    mm_acc<-1, false, true>(n, n, D, c.DZ, D, c.G2, D, c.dP2, n);
    TTT_PAR_FOR(e, n * F) { c.dXq2[e] = 0; }
    mm_acc<+1, false, true>(n, F, D, c.DZ, D, c.W2, D, c.dXq2, F);
    if (G2w != nullptr) {  // with grad_sum: Zq2 -= s_i (xq2_i G2w + g2b)
      if (p.causal)
        mm_acc<-1, false, true, kPerRow>(n, F, D, c.DZ, D, G2w, D, c.dXq2, F, scale + g.off);
      else
        mm_acc<-1, false, true>(n, F, D, c.DZ, D, G2w, D, c.dXq2, F);
    }
    TTT_PAR_FOR2(e, i, col, n, D) { c.dG2[e] = -(c.a[i] * c.XdW2[e]); }
    mm_acc<-1, true, false>(n, D, n, c.P2, n, c.DZ, D, c.dG2, D);
    TTT_SYNC();
    // B3: through P2 = A * (Xq2 X2^T + 1): dS2 = dP2 * A (in dP1, free until B4),
    // dXq2 += dS2 X2, dX2 += dS2^T Xq2; then dZq1 = dXq2 * gelu'(Zq1), in place
    TTT_PAR_FOR2(e, i, j, n, n) { c.dP1[e] = c.dP2[e] * coef(p, scale, g, i, j) * c.eta[j]; }
    TTT_SYNC();
    mm_acc<+1, false, false>(n, F, n, c.dP1, n, c.X2, F, c.dXq2, F);
    mm_acc<+1, true, false>(n, F, n, c.dP1, n, c.Xq2, F, c.dX2, F);
    TTT_PAR_FOR(e, n * F) { c.dXq2[e] = c.dXq2[e] * c.GPq[e]; }  // GPq = gelu'(Zq1)
    TTT_SYNC();
    // B4: layer 1 of the queries: dP1 = -dZq1 G1^T, dG1 = -a KdW1 - P1^T dZq1, dQ += dZq1 W1^T
    TTT_PAR_FOR(e, n * n) { c.dP1[e] = 0; }
    mm_acc<-1, false, true>(n, n, F, c.dXq2, F, c.G1, F, c.dP1, n);
    TTT_PAR_FOR2(e, i, col, n, F) { c.dG1[e] = -(c.a[i] * c.KdW1[e]); }
    mm_acc<-1, true, false>(n, F, n, c.P1, n, c.dXq2, F, c.dG1, F);
    mm_acc<+1, false, true>(n, D, F, c.dXq2, F, c.W1, F, c.dQ, D);
    if (G1w != nullptr) {  // with grad_sum: Zq1 -= s_i (q_i G1w + g1b)
      if (p.causal)
        mm_acc<-1, false, true, kPerRow>(n, D, F, c.dXq2, F, G1w, F, c.dQ, D, scale + g.off);
      else
        mm_acc<-1, false, true>(n, D, F, c.dXq2, F, G1w, F, c.dQ, D);
    }
    TTT_SYNC();
    // B5: through P1 = A * (S1 + 1); dA = dP1 * (S1 + 1) + dP2 * (S2 + 1) over dP2 (S1 = Q K^T,
    // S2 = Xq2 X2^T as mlp_recompute left them);
    // through G1 = H1 * gelu'(Z1): dZ1 = dG1 * H1 * gelu''(Z1) (over KdW1), dH1 = dG1 * GP
    TTT_PAR_FOR(e, n * F) {
      const acc_t dg1 = c.dG1[e];
      c.KdW1[e] = dg1 * c.H1[e] * c.GPP[e];  // GPP = gelu''(Z1)
      c.dG1[e] = dg1 * c.GP[e];
    }
    TTT_SYNC();
    TTT_PAR_FOR2(e, i, j, n, n) {  // dA over dP2; dS1 = dP1 * A over dP1
      const acc_t cf = coef(p, scale, g, i, j);
      const acc_t dp1 = c.dP1[e];
      c.dP2[e] = cf != acc_t(0) ? dp1 * (c.S1[e] + acc_t(1)) + c.dP2[e] * (c.S2[e] + acc_t(1))
                                : acc_t(0);
      c.dP1[e] = dp1 * cf * c.eta[j];
    }
    TTT_SYNC();
    // B6: dQ += dS1 K, dK += dS1^T Q, dG2 += dH1 W2; deta and the token-scale gradient from dA, da
    mm_acc<+1, false, false>(n, D, n, c.dP1, n, c.K, D, c.dQ, D);
    mm_acc<+1, true, false>(n, D, n, c.dP1, n, c.Q, D, c.dK, D);
    mm_acc<+1, false, false>(n, D, F, c.dG1, F, c.W2, D, c.dG2, D);
    acc_t* deta = static_cast<acc_t*>(p.deta) + bh * p.L + t0;
    TTT_PAR_FOR(j, n) {
      acc_t s = c.da[j] * e_end;
      for (int i = 0; i < n; ++i) s += c.dP2[i * n + j] * coef(p, scale, g, i, j);
      deta[j] = s;
    }
    if (p.causal) {
      TTT_PAR_FOR(i, n) {
        acc_t s = 0;
        for (int j = 0; j <= i; ++j) s += c.dP2[i * n + j] * c.eta[j];
        if (g.G) {  // the grad_sum terms of the queries
          for (int f = 0; f < F; ++f) s -= c.QG1[i * F + f] * c.dXq2[i * F + f];
          for (int d = 0; d < D; ++d) s -= c.XqG2[i * D + d] * c.DZ[i * D + d];
        }
        if (i == n - 1 && !g.unscaled_end) {  // the end update's e = s_{off+n-1}
          for (int j = 0; j < n; ++j) s += c.da[j] * c.eta[j];
          if (g.G) {
            for (int f = 0; f < F; ++f) s -= c.red1[f];
            for (int d = 0; d < D; ++d) s -= c.red2[d];
          }
        }
        c.dscale[g.off + i] += s;
      }
    }
    TTT_SYNC();
    // B7 rows: through G2 = rstd (U - mean U - X mean(U X)), U = gamma (gamma X + beta - T),
    // X = LN(Z2): dZ2, and dU over U (as ttt_linear_chain.h)
    ln_loss_grad_bwd_rows(n, D, lnw, c.X, c.G2, c.rstd, c.dG2, c.U, c.dZ2);
    TTT_SYNC();
    // B8: d gamma, d beta through U; dv = dT = -gamma dU, dK += its share through T;
    // through Z2 = X2 W2 + b2 and X2 = gelu(Z1): dX2 += dZ2 W2^T, dZ1 += dX2 * gelu'(Z1)
    ln_loss_param_grads(n, D, lnw, lnb, c.X, c.T, c.U, c.dlnw, c.dlnb);
    const int64_t row0 = (bh * p.L + t0) * D;
    TTT_PAR_FOR2(e, i, col, n, D) {
      const acc_t dt = -(lnw[col] * c.U[e]);
      c.dK[e] += loss_target_dk<acc_t>(p.value_target, dt);
      static_cast<scalar_t*>(p.dv)[row0 + e] = static_cast<scalar_t>(dt);
    }
    mm_acc<+1, false, true>(n, F, D, c.dZ2, D, c.W2, D, c.dX2, F);  // dX2 += dZ2 W2^T
    TTT_PAR_FOR(e, n * F) { c.KdW1[e] += c.dX2[e] * c.GP[e]; }
    TTT_SYNC();
    // B9: through Z1 = K W1 + b1: dK += dZ1 W1^T; the weight gradients of this segment join the
    // carry: dW1 += Q^T dZq1 + K^T dZ1, dW2 += Xq2^T DZ + dH1^T G2 + X2^T dZ2 (and the biases)
    mm_acc<+1, false, true>(n, D, F, c.KdW1, F, c.W1, F, c.dK, D);  // dK += dZ1 W1^T
    TTT_PAR_FOR(e, n * D) {
      static_cast<scalar_t*>(p.dk)[row0 + e] = static_cast<scalar_t>(c.dK[e]);
      static_cast<scalar_t*>(p.dq)[row0 + e] = static_cast<scalar_t>(c.dQ[e]);
    }
    // with grad_sum: d G1w = -e dW1_end - Q^T diag(s) dZq1, d G2w = -e dW2_end - Xq2^T diag(s) DZ
    // (and the biases), read from the carries before this segment joins them
    acc_t* dG1w = g.G ? static_cast<acc_t*>(p.dG0) + bh * DF : nullptr;
    acc_t* dg1b = g.G ? static_cast<acc_t*>(p.dgb0) + bh * F : nullptr;
    acc_t* dG2w = g.G ? static_cast<acc_t*>(p.dG20) + bh * DF : nullptr;
    acc_t* dg2b = g.G ? static_cast<acc_t*>(p.dgb20) + bh * D : nullptr;
    if (dG1w != nullptr) {
      TTT_PAR_FOR(e, D * F) { dG1w[e] = -e_end * c.dW1[e]; }
      if (p.causal)
        mm_acc<-1, true, false, kPerK>(D, F, n, c.Q, D, c.dXq2, F, dG1w, F, scale + g.off);
      else
        mm_acc<-1, true, false>(D, F, n, c.Q, D, c.dXq2, F, dG1w, F);
    }
    mm_acc_terms<+1, true>(D, F, {MMTerm<acc_t>{n, c.Q, D, c.dXq2, F},   // dW1 += Q^T dZq1
                                  MMTerm<acc_t>{n, c.K, D, c.KdW1, F}},  //      + K^T dZ1
                           c.dW1, F);
    if (dg1b != nullptr) {
      grad_sum_bias_grad(p, scale, g, e_end, F, c.dXq2, c.db1, dg1b);
      TTT_SYNC();
    }
    add_col_sums(n, F, c.db1, [&](int i, int f) { return c.dXq2[i * F + f] + c.KdW1[i * F + f]; });
    if (dG2w != nullptr) {
      TTT_PAR_FOR(e, F * D) { dG2w[e] = -e_end * c.dW2[e]; }
      if (p.causal)
        mm_acc<-1, true, false, kPerK>(F, D, n, c.Xq2, F, c.DZ, D, dG2w, D, scale + g.off);
      else
        mm_acc<-1, true, false>(F, D, n, c.Xq2, F, c.DZ, D, dG2w, D);
    }
    mm_acc_terms<+1, true>(F, D, {MMTerm<acc_t>{n, c.Xq2, F, c.DZ, D},  // dW2 += Xq2^T DZ
                                  MMTerm<acc_t>{n, c.dG1, F, c.G2, D},  //      + dH1^T G2
                                  MMTerm<acc_t>{n, c.X2, F, c.dZ2, D}},  //     + X2^T dZ2
                           c.dW2, D);
    if (dg2b != nullptr) {
      grad_sum_bias_grad(p, scale, g, e_end, D, c.DZ, c.db2, dg2b);
      TTT_SYNC();
    }
    add_col_sums(n, D, c.db2, [&](int i, int d) { return c.DZ[i * D + d] + c.dZ2[i * D + d]; });
    TTT_SYNC();
    if (p.dW_starts != nullptr) {  // the stored start weights are outputs too
      const acc_t* dW1s = static_cast<const acc_t*>(p.dW_starts) + slot * DF;
      const acc_t* db1s = static_cast<const acc_t*>(p.db_starts) + slot * F;
      const acc_t* dW2s = static_cast<const acc_t*>(p.dW2_starts) + slot * DF;
      const acc_t* db2s = static_cast<const acc_t*>(p.db2_starts) + slot * D;
      TTT_PAR_FOR(e, D * F) { c.dW1[e] += dW1s[e], c.dW2[e] += dW2s[e]; }
      TTT_PAR_FOR(f, F) { c.db1[f] += db1s[f]; }
      TTT_PAR_FOR(d, D) { c.db2[d] += db2s[d]; }
      TTT_SYNC();
    }
  }
  TTT_PAR_FOR(e, D * F) {
    static_cast<acc_t*>(p.dW0)[bh * DF + e] = c.dW1[e];
    static_cast<acc_t*>(p.dW20)[bh * DF + e] = c.dW2[e];
  }
  TTT_PAR_FOR(f, F) { static_cast<acc_t*>(p.db0)[bh * F + f] = c.db1[f]; }
  TTT_PAR_FOR(d, D) {
    static_cast<acc_t*>(p.db20)[bh * D + d] = c.db2[d];
    static_cast<acc_t*>(p.dln_w)[bh * D + d] = c.dlnw[d];
    static_cast<acc_t*>(p.dln_b)[bh * D + d] = c.dlnb[d];
  }
  TTT_PAR_FOR(i, bmax) { static_cast<acc_t*>(p.dscale)[bh * bmax + i] = c.dscale[i]; }
}

}  // namespace ttt
