// Backward of the Titans-form TTT-Linear chain (ttt_titans_chain.h). Segments in reverse, each
// recomputed from its stored P and S_0; carries dW (d/d weights after the segment) and dS
// (d/d momentum after it). Since a segment that follows a completed one starts from W_0 = P =
// the previous end weights, both of its weight gradients join the carry.
#pragma once
#include "ttt_titans_chain.h"

namespace ttt {

// Backward of titans_coefs: from dCx, the gradient of every Cx entry (w_j of each source), and
// dMl [NC], that of each source's last s (M_t, m), the per-token dmom, ddec [n] (written). Runs
// each source's recurrence s_j = m_j s_{j-1}, w_j = (1 - a_j) w_{j-1} + s_j in reverse; cA, cM
// [n, NC] hold the per-(token, source) partials, summed per token in a fixed order.
template <typename acc_t>
TTT_HD void titans_coefs_bwd(int n, int bmax, const acc_t* m, const acc_t* dec, const acc_t* Cx,
                             const acc_t* Mx, const acc_t* dCx, const acc_t* dMl, acc_t* cA,
                             acc_t* cM, acc_t* dmom, acc_t* ddec) {
  const int NC = bmax + 2;
  TTT_PAR_FOR(ci, n + 2) {
    const int col = titans_col(ci, n, bmax), j0 = ci < n ? ci : 0;
    const acc_t w_init = ci == n ? acc_t(1) : acc_t(0), s_init = ci == n + 1 ? acc_t(1) : acc_t(0);
    for (int j = 0; j < n; ++j) cA[j * NC + col] = 0, cM[j * NC + col] = 0;
    acc_t gw = 0, gs = 0;  // (1 - a_{j+1}) adj(w_{j+1}), m_{j+1} adj(s_{j+1})
    for (int j = n - 1; j >= j0; --j) {
      if (ci < n && j == j0) break;  // w_t = s_t = 1: constants
      const acc_t aw = dCx[j * NC + col] + gw;
      const acc_t as = gs + aw + (j == n - 1 ? dMl[col] : acc_t(0));
      const acc_t w_prev = j > 0 ? Cx[(j - 1) * NC + col] : w_init;
      const acc_t s_prev = j > 0 ? Mx[(j - 1) * NC + col] : s_init;
      cA[j * NC + col] = -aw * w_prev;  // w_j = (1 - a_j) w_{j-1} + s_j
      cM[j * NC + col] = as * s_prev;   // s_j = m_j s_{j-1}
      gw = (acc_t(1) - dec[j]) * aw;
      gs = m[j] * as;
    }
  }
  TTT_SYNC();
  TTT_PAR_FOR(j, n) {
    acc_t sa = 0, sm = 0;
    for (int ci = 0; ci < n + 2; ++ci) {
      const int col = titans_col(ci, n, bmax);
      sa += cA[j * NC + col], sm += cM[j * NC + col];
    }
    ddec[j] = sa;
    dmom[j] = sm;
  }
}

template <typename scalar_t, typename acc_t>
TTT_HD void titans_bwd_chain(const TitansParams& p, acc_t* ws, int D, int bi, int hi) {
  TitansBuffers<acc_t> c;
  const int bmax = p.mini_batch_size, NC = bmax + 2;
  carve_titans<acc_t>(ws, D, bmax, true, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi, DD = static_cast<int64_t>(D) * D;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  {
    const acc_t* dWe = static_cast<const acc_t*>(p.dW_end);
    const acc_t* dbe = static_cast<const acc_t*>(p.db_end);
    const acc_t* dSe = static_cast<const acc_t*>(p.dS_end);
    const acc_t* dsbe = static_cast<const acc_t*>(p.dsb_end);
    TTT_PAR_FOR(e, D * D) {
      c.dW[e] = dWe != nullptr ? dWe[bh * DD + e] : acc_t(0);
      c.dS[e] = dSe != nullptr ? dSe[bh * DD + e] : acc_t(0);
    }
    TTT_PAR_FOR(d, D) {
      c.db[d] = dbe != nullptr ? dbe[bh * D + d] : acc_t(0);
      c.dsb[d] = dsbe != nullptr ? dsbe[bh * D + d] : acc_t(0);
      c.dlnw[d] = 0, c.dlnb[d] = 0;
    }
  }
  const int nseg = p.num_segments();
  for (int s = nseg - 1; s >= 0; --s) {
    const Segment g = segment(p, s);
    const int t0 = g.t0, n = g.n, last = (n - 1) * NC;
    const int64_t slot = bh * nseg + s, row = bh * p.L + t0;
    titans_copy(c.W, c.bw, p.W_starts, p.b_starts, D, D, slot, true);
    titans_copy(c.S, c.sb, p.S_starts, p.sb_starts, D, D, slot, true);
    if (s == 0) titans_copy(c.Wc, c.bc, p.C0, p.cb0, D, D, bh, true);
    else titans_copy(c.Wc, c.bc, p.W_starts, p.b_starts, D, D, slot, true);  // W_0 = P
    TTT_PAR_FOR2(e, i, col, n, D) {  // dQ holds dO until the output LN's backward has read it
      c.dQ[e] = ld<scalar_t, acc_t>(p.dO, bi * p.do_sb + hi * p.do_sh + (t0 + i) * p.do_sl + col);
    }
    TTT_SYNC();
    titans_recompute<scalar_t, acc_t>(p, c, D, bi, hi, g, true);
    // B0: per-row coefficients: the end update's w_t = C_last,t eta_t and u_t = M_t eta_t, the
    // query rows' D_i and c0_i; QK = Q K^T
    TTT_PAR_FOR(i, n) {
      c.cw[i] = c.Cx[last + i] * c.eta[i], c.cu[i] = c.Mx[last + i] * c.eta[i];
      c.cD[i] = c.Cx[i * NC + bmax], c.cS[i] = c.Cx[i * NC + bmax + 1];
    }
    TTT_PAR_FOR(e, n * n) { c.QK[e] = 0; }
    TTT_SYNC();
    mm_acc<+1, false, true>(n, n, D, c.Q, D, c.K, D, c.QK, n);

    // B1: output LN; the end update against the carries (K dW + db, K dS + dsb, <., .> partials)
    ln_out_bwd_rows(n, D, lnw, c.Xp, c.rstdp, c.dQ, c.DZ);
    TTT_PAR_FOR(col, D) {
      acc_t sw = 0, sb = 0, rw = c.bc[col] * c.db[col], r1 = c.sb[col] * c.db[col];
      acc_t r2 = c.sb[col] * c.dsb[col];
      for (int i = 0; i < n; ++i) sw += c.dQ[i * D + col] * c.Xp[i * D + col], sb += c.dQ[i * D + col];
      for (int d = 0; d < D; ++d) {
        const int e = d * D + col;
        rw += c.Wc[e] * c.dW[e], r1 += c.S[e] * c.dW[e], r2 += c.S[e] * c.dS[e];
      }
      c.dlnw[col] += sw, c.dlnb[col] += sb;
      c.rW[col] = rw, c.rS1[col] = r1, c.rS2[col] = r2;
    }
    // KdW = K dW + db, KdS = K dS + dsb, dK = -(diag(w) G dW^T + diag(u) G dS^T)
    TTT_PAR_FOR2(e, i, col, n, D) { c.KdW[e] = c.db[col], c.KdS[e] = c.dsb[col], c.dK[e] = 0; }
    TTT_SYNC();
    // dQ: dO through the output residual (o = q + ...), zero without it
    TTT_PAR_FOR(e, n * D) { c.dQ[e] = output_dq<acc_t>(p.output_residual, c.dQ[e]); }
    mm_acc<+1, false, false>(n, D, D, c.K, D, c.dW, D, c.KdW, D);
    mm_acc<+1, false, false>(n, D, D, c.K, D, c.dS, D, c.KdS, D);
    mm_acc<-1, false, true, kPerRow>(n, D, D, c.G, D, c.dW, D, c.dK, D, c.cw);
    mm_acc<-1, false, true, kPerRow>(n, D, D, c.G, D, c.dS, D, c.dK, D, c.cu);
    TTT_SYNC();
    // B2: dw, du (end-update coefficients); dD, dc0 (query rows, + the end update at row n-1);
    // dPm = -DZ G^T
    TTT_PAR_FOR(i, n) {
      acc_t w = 0, u = 0, dd = 0, dc = 0;
      for (int d = 0; d < D; ++d) {
        w += c.KdW[i * D + d] * c.G[i * D + d];
        u += c.KdS[i * D + d] * c.G[i * D + d];
        dd += c.QW[i * D + d] * c.DZ[i * D + d];
        dc += c.QS[i * D + d] * c.DZ[i * D + d];
      }
      if (i == n - 1) {
        acc_t ml = 0;
        for (int d = 0; d < D; ++d) dd += c.rW[d], dc += c.rS1[d], ml += c.rS2[d];
        c.dMl[bmax + 1] = ml;
      }
      c.dw[i] = -w, c.du[i] = -u, c.dDv[i] = dd, c.dc0[i] = dc;
    }
    TTT_PAR_FOR(e, n * n) { c.dPm[e] = 0; }
    TTT_SYNC();
    mm_acc<-1, false, true>(n, n, D, c.DZ, D, c.G, D, c.dPm, n);
    TTT_SYNC();
    TTT_PAR_FOR2(e, i, j, n, n) {  // the lower triangle (t <= i) only
      if (j > i) c.dPm[e] = 0;
    }
    TTT_SYNC();
    // B3: dG; dCx, dMl (upstream of the coefficients); deta; dQ through QW and QS
    TTT_PAR_FOR2(e, t, col, n, D) {  // dG = -(w KdW + u KdS) - Pm^T DZ (Pm is zero above the diagonal)
      c.dG[e] = -(c.cw[t] * c.KdW[e] + c.cu[t] * c.KdS[e]);
    }
    TTT_SYNC();
    mm_acc<-1, true, false>(n, D, n, c.Pm, n, c.DZ, D, c.dG, D);
    TTT_PAR_FOR(e, n * (n + 2)) {
      const int j = e / (n + 2), ci = e % (n + 2), col = titans_col(ci, n, bmax);
      acc_t v = 0;
      if (ci == n) {
        v = c.dDv[j];
      } else if (ci == n + 1) {
        v = c.dc0[j];
      } else if (j >= ci) {
        v = c.dPm[j * n + ci] * c.eta[ci] * (c.QK[j * n + ci] + acc_t(1));
        if (j == n - 1) v += c.dw[ci] * c.eta[ci];
      }
      c.dCx[j * NC + col] = v;
    }
    TTT_PAR_FOR(t, n + 1) {  // dMl of the steps (du eta) and of W_0 (0); S_0's is set in B2
      c.dMl[titans_col(t, n, bmax)] = t < n ? c.du[t] * c.eta[t] : acc_t(0);
    }
    TTT_PAR_FOR(t, n) {
      acc_t sum = c.dw[t] * c.Cx[last + t] + c.du[t] * c.Mx[last + t];
      for (int i = t; i < n; ++i) sum += c.dPm[i * n + t] * c.Cx[i * NC + t] * (c.QK[i * n + t] + acc_t(1));
      static_cast<acc_t*>(p.deta)[row + t] = sum;
    }
    mm_acc<+1, false, true, kPerRow>(n, D, D, c.DZ, D, c.Wc, D, c.dQ, D, c.cD);  // + diag(D) DZ W_0^T
    mm_acc<+1, false, true, kPerRow>(n, D, D, c.DZ, D, c.S, D, c.dQ, D, c.cS);   // + diag(c0) DZ S_0^T
    TTT_SYNC();
    // B4: the scalar recurrences in reverse: ddecay, dmomentum; dSqk = dPm * C * eta over Pm
    titans_coefs_bwd(n, bmax, c.m, c.dec, c.Cx, c.Mx, c.dCx, c.dMl, c.cA, c.cM,
                     static_cast<acc_t*>(p.dmom) + row, static_cast<acc_t*>(p.ddec) + row);
    TTT_PAR_FOR2(e, i, t, n, n) {
      c.Pm[e] = c.dPm[e] * c.Cx[i * NC + t] * c.eta[t];
    }
    TTT_SYNC();
    // B5: dQ += dSqk K, dK += dSqk^T Q; rows through G = dl/dZ at P: dZ (over KdW) and dU (over U)
    mm_acc<+1, false, false>(n, D, n, c.Pm, n, c.K, D, c.dQ, D);  // dQ += dSqk K
    mm_acc<+1, true, false>(n, D, n, c.Pm, n, c.Q, D, c.dK, D);   // dK += dSqk^T Q
    ln_loss_grad_bwd_rows(n, D, lnw, c.X, c.G, c.rstd, c.dG, c.U, c.KdW);
    TTT_SYNC();
    // B6: LN params through U; dk, dv, dq; the weight gradients of this segment join the carries:
    //   d W_0 = sum_i D_i q_i^T DZ_i + D_last dW,  d P = K^T dZ (+ the stored P's gradient),
    //   d S_0 = sum_i c0_i q_i^T DZ_i + c0_last dW + m dS
    ln_loss_param_grads(n, D, lnw, lnb, c.X, c.T, c.U, c.dlnw, c.dlnb);
    mm_acc<+1, false, true>(n, D, D, c.KdW, D, c.W, D, c.dK, D);  // dK += dZ P^T
    TTT_SYNC();
    TTT_PAR_FOR2(e, i, col, n, D) {
      const acc_t dt = -(lnw[col] * c.U[e]);  // dv = dT; dk = dK + its share through T
      const acc_t dk = c.dK[e] + loss_target_dk<acc_t>(p.value_target, dt);
      static_cast<scalar_t*>(p.dk)[row * D + e] = static_cast<scalar_t>(dk);
      static_cast<scalar_t*>(p.dv)[row * D + e] = static_cast<scalar_t>(dt);
      static_cast<scalar_t*>(p.dq)[row * D + e] = static_cast<scalar_t>(c.dQ[e]);
    }
    const acc_t Dl = c.Cx[last + bmax], c0l = c.Cx[last + bmax + 1], ml = c.Mx[last + bmax + 1];
    TTT_PAR_FOR(e, D * D + D) {  // the carries' terms through the end update
      const bool bias = e >= D * D;
      acc_t& dW = bias ? c.db[e - D * D] : c.dW[e];
      acc_t& dS = bias ? c.dsb[e - D * D] : c.dS[e];
      dS = ml * dS + c0l * dW;
      dW = Dl * dW;
    }
    TTT_SYNC();
    mm_acc<+1, true, false, kPerK>(D, D, n, c.Q, D, c.DZ, D, c.dS, D, c.cS);  // + Q^T diag(c0) DZ
    mm_acc<+1, true, false, kPerK>(D, D, n, c.Q, D, c.DZ, D, c.dW, D, c.cD);  // + Q^T diag(D) DZ
    mm_acc<+1, true, false>(1, D, n, c.cS, 1, c.DZ, D, c.dsb, D);
    mm_acc<+1, true, false>(1, D, n, c.cD, 1, c.DZ, D, c.db, D);
    TTT_SYNC();
    if (s == 0) {  // the start's W_0 is the input C0/cb0 (its P is W0/b0): d W_0 leaves the carry
      TTT_PAR_FOR(e, D * D + D) {
        const bool bias = e >= D * D;
        acc_t& dW = bias ? c.db[e - D * D] : c.dW[e];
        static_cast<acc_t*>(bias ? p.dcb0 : p.dC0)[bias ? bh * D + (e - D * D) : bh * DD + e] = dW;
        dW = 0;
      }
      TTT_SYNC();
    }
    // d P = K^T dZ (+ the stored P's gradient)
    mm_acc<+1, true, false>(D, D, n, c.K, D, c.KdW, D, c.dW, D);
    TTT_PAR_FOR(col, D) {
      acc_t sum = 0;
      for (int i = 0; i < n; ++i) sum += c.KdW[i * D + col];
      c.db[col] += sum;
    }
    TTT_SYNC();
    const acc_t* dPs = static_cast<const acc_t*>(p.dW_starts);
    const acc_t* dbs = static_cast<const acc_t*>(p.db_starts);
    if (dPs != nullptr) {
      TTT_PAR_FOR(e, D * D + D) {
        if (e < D * D) c.dW[e] += dPs[slot * DD + e];
        else c.db[e - D * D] += dbs[slot * D + (e - D * D)];
      }
      TTT_SYNC();
    }
  }
  titans_copy(c.dW, c.db, p.dW0, p.db0, D, D, bh, false);
  titans_copy(c.dS, c.dsb, p.dS0, p.dsb0, D, D, bh, false);
  TTT_PAR_FOR(d, D) {
    static_cast<acc_t*>(p.dln_w)[bh * D + d] = c.dlnw[d];
    static_cast<acc_t*>(p.dln_b)[bh * D + d] = c.dlnb[d];
  }
}

}  // namespace ttt
