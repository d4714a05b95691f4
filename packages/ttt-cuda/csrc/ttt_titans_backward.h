// Backward of the Titans-form TTT-Linear chain (ttt_titans_chain.h). Segments in reverse, each
// recomputed from its stored P and S_0; carries dW (d/d weights after the segment) and dS
// (d/d momentum after it). Since a segment that follows a completed one starts from W_0 = P =
// the previous end weights, both of its weight gradients join the carry.
#pragma once
#include "ttt_titans_chain.h"

namespace ttt {

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
    titans_copy(c.W, c.bw, p.W_starts, p.b_starts, D, slot, true);
    titans_copy(c.S, c.sb, p.S_starts, p.sb_starts, D, slot, true);
    if (s == 0) titans_copy(c.Wc, c.bc, p.C0, p.cb0, D, bh, true);
    else titans_copy(c.Wc, c.bc, p.W_starts, p.b_starts, D, slot, true);  // W_0 = P
    TTT_PAR_FOR(e, n * D) {  // dQ starts as dO (the residual)
      const int64_t i = e / D, col = e % D;
      c.dQ[e] = ld<scalar_t, acc_t>(p.dO, bi * p.do_sb + hi * p.do_sh + (t0 + i) * p.do_sl + col);
    }
    TTT_SYNC();
    titans_recompute<scalar_t, acc_t>(p, c, D, bi, hi, g, true);

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
    TTT_PAR_FOR(e, n * D) {
      const int j = e / D, col = e % D;
      const acc_t wj = c.Cx[last + j] * c.eta[j], uj = c.Mx[last + j] * c.eta[j];
      acc_t kw = c.db[col], ks = c.dsb[col], dk = 0;
      for (int d = 0; d < D; ++d) {
        kw += c.K[j * D + d] * c.dW[d * D + col];
        ks += c.K[j * D + d] * c.dS[d * D + col];
        dk += c.G[j * D + d] * (wj * c.dW[col * D + d] + uj * c.dS[col * D + d]);
      }
      c.KdW[e] = kw, c.KdS[e] = ks, c.dK[e] = -dk;
    }
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
    TTT_PAR_FOR(e, n * n) {
      const int i = e / n, t = e % n;
      acc_t sum = 0;
      if (t <= i)
        for (int d = 0; d < D; ++d) sum += c.DZ[i * D + d] * c.G[t * D + d];
      c.dPm[e] = -sum;
    }
    TTT_SYNC();
    // B3: dG; dCx, dMl (upstream of the coefficients); deta; dQ through QW and QS
    TTT_PAR_FOR(e, n * D) {
      const int t = e / D, col = e % D;
      const acc_t wt = c.Cx[last + t] * c.eta[t], ut = c.Mx[last + t] * c.eta[t];
      acc_t sum = wt * c.KdW[e] + ut * c.KdS[e];
      for (int i = t; i < n; ++i) sum += c.Pm[i * n + t] * c.DZ[i * D + col];
      c.dG[e] = -sum;
    }
    TTT_PAR_FOR(e, n * (n + 2)) {
      const int j = e / (n + 2), ci = e % (n + 2), col = titans_col(ci, n, bmax);
      acc_t v = 0;
      if (ci == n) {
        v = c.dDv[j];
      } else if (ci == n + 1) {
        v = c.dc0[j];
      } else if (j >= ci) {
        acc_t qk = 0;
        for (int d = 0; d < D; ++d) qk += c.Q[j * D + d] * c.K[ci * D + d];
        v = c.dPm[j * n + ci] * c.eta[ci] * (qk + acc_t(1));
        if (j == n - 1) v += c.dw[ci] * c.eta[ci];
      }
      c.dCx[j * NC + col] = v;
    }
    TTT_PAR_FOR(t, n + 1) {  // dMl of the steps (du eta) and of W_0 (0); S_0's is set in B2
      c.dMl[titans_col(t, n, bmax)] = t < n ? c.du[t] * c.eta[t] : acc_t(0);
    }
    TTT_PAR_FOR(t, n) {
      acc_t sum = c.dw[t] * c.Cx[last + t] + c.du[t] * c.Mx[last + t];
      for (int i = t; i < n; ++i) {
        acc_t qk = 0;
        for (int d = 0; d < D; ++d) qk += c.Q[i * D + d] * c.K[t * D + d];
        sum += c.dPm[i * n + t] * c.Cx[i * NC + t] * (qk + acc_t(1));
      }
      static_cast<acc_t*>(p.deta)[row + t] = sum;
    }
    TTT_PAR_FOR(e, n * D) {
      const int i = e / D, d = e % D;
      acc_t sw = 0, ss = 0;
      for (int col = 0; col < D; ++col) {
        sw += c.DZ[i * D + col] * c.Wc[d * D + col];
        ss += c.DZ[i * D + col] * c.S[d * D + col];
      }
      c.dQ[e] += c.Cx[i * NC + bmax] * sw + c.Cx[i * NC + bmax + 1] * ss;
    }
    TTT_SYNC();
    // B4: the scalar recurrences in reverse, per source: d/da_j and d/dm_j partials (cA, cM);
    // dSqk = dPm * C * eta over Pm
    TTT_PAR_FOR(ci, n + 2) {
      const int col = titans_col(ci, n, bmax), j0 = ci < n ? ci : 0;
      const acc_t w_init = ci == n ? acc_t(1) : acc_t(0), s_init = ci == n + 1 ? acc_t(1) : acc_t(0);
      for (int j = 0; j < n; ++j) c.cA[j * NC + col] = 0, c.cM[j * NC + col] = 0;
      acc_t gw = 0, gs = 0;  // (1 - a_{j+1}) adj(w_{j+1}), m_{j+1} adj(s_{j+1})
      for (int j = n - 1; j >= j0; --j) {
        if (ci < n && j == j0) break;  // w_t = s_t = 1: constants
        const acc_t aw = c.dCx[j * NC + col] + gw;
        const acc_t as = gs + aw + (j == n - 1 ? c.dMl[col] : acc_t(0));
        const acc_t w_prev = j > 0 ? c.Cx[(j - 1) * NC + col] : w_init;
        const acc_t s_prev = j > 0 ? c.Mx[(j - 1) * NC + col] : s_init;
        c.cA[j * NC + col] = -aw * w_prev;  // w_j = (1 - a_j) w_{j-1} + s_j
        c.cM[j * NC + col] = as * s_prev;   // s_j = m_j s_{j-1}
        gw = (acc_t(1) - c.dec[j]) * aw;
        gs = c.m[j] * as;
      }
    }
    TTT_PAR_FOR(e, n * n) {
      const int i = e / n, t = e % n;
      c.Pm[e] = c.dPm[e] * c.Cx[i * NC + t] * c.eta[t];
    }
    TTT_SYNC();
    // B5: ddecay, dmomentum; dQ += dSqk K, dK += dSqk^T Q; rows through G = dl/dZ at P:
    // dZ (over KdW) and dU (over U)
    TTT_PAR_FOR(j, n) {
      acc_t sa = 0, sm = 0;
      for (int ci = 0; ci < n + 2; ++ci) {
        const int col = titans_col(ci, n, bmax);
        sa += c.cA[j * NC + col], sm += c.cM[j * NC + col];
      }
      static_cast<acc_t*>(p.ddec)[row + j] = sa;
      static_cast<acc_t*>(p.dmom)[row + j] = sm;
    }
    TTT_PAR_FOR(e, n * D) {
      const int i = e / D, col = e % D;
      acc_t sq = 0, sk = 0;
      for (int j = 0; j < n; ++j) {
        sq += c.Pm[i * n + j] * c.K[j * D + col];
        sk += c.Pm[j * n + i] * c.Q[j * D + col];
      }
      c.dQ[e] += sq, c.dK[e] += sk;
    }
    ln_loss_grad_bwd_rows(n, D, lnw, c.X, c.G, c.rstd, c.dG, c.U, c.KdW);
    TTT_SYNC();
    // B6: LN params through U; dk, dv, dq; the weight gradients of this segment join the carries:
    //   d W_0 = sum_i D_i q_i^T DZ_i + D_last dW,  d P = K^T dZ (+ the stored P's gradient),
    //   d S_0 = sum_i c0_i q_i^T DZ_i + c0_last dW + m dS
    TTT_PAR_FOR(col, D) {
      acc_t sw = 0, sb = 0;
      for (int i = 0; i < n; ++i) {
        const int e = i * D + col;
        sw += c.U[e] * (acc_t(2) * lnw[col] * c.X[e] + lnb[col] - c.T[e]);
        sb += c.U[e] * lnw[col];
      }
      c.dlnw[col] += sw, c.dlnb[col] += sb;
    }
    TTT_PAR_FOR(e, n * D) {
      const int j = e / D, d = e % D;
      acc_t sum = 0;
      for (int col = 0; col < D; ++col) sum += c.KdW[j * D + col] * c.W[d * D + col];
      const acc_t gdu = lnw[d] * c.U[e];
      static_cast<scalar_t*>(p.dk)[row * D + e] = static_cast<scalar_t>(c.dK[e] + sum + gdu);
      static_cast<scalar_t*>(p.dv)[row * D + e] = static_cast<scalar_t>(-gdu);
      static_cast<scalar_t*>(p.dq)[row * D + e] = static_cast<scalar_t>(c.dQ[e]);
    }
    const acc_t Dl = c.Cx[last + bmax], c0l = c.Cx[last + bmax + 1], ml = c.Mx[last + bmax + 1];
    const acc_t* dPs = static_cast<const acc_t*>(p.dW_starts);
    const acc_t* dbs = static_cast<const acc_t*>(p.db_starts);
    TTT_PAR_FOR(e, D * D + D) {
      const bool bias = e >= D * D;
      const int d = bias ? -1 : e / D, col = bias ? e - D * D : e % D;
      acc_t w0 = 0, pz = 0, s0 = 0;
      for (int i = 0; i < n; ++i) {
        const acc_t qi = bias ? acc_t(1) : c.Q[i * D + d], ki = bias ? acc_t(1) : c.K[i * D + d];
        w0 += c.Cx[i * NC + bmax] * qi * c.DZ[i * D + col];
        s0 += c.Cx[i * NC + bmax + 1] * qi * c.DZ[i * D + col];
        pz += ki * c.KdW[i * D + col];
      }
      acc_t& dW = bias ? c.db[col] : c.dW[e];
      acc_t& dS = bias ? c.dsb[col] : c.dS[e];
      w0 += Dl * dW;
      s0 += c0l * dW + ml * dS;
      if (dPs != nullptr) pz += bias ? dbs[slot * D + col] : dPs[slot * DD + e];
      if (s == 0) {  // the start's P and W_0 are separate inputs (W0/b0 and C0/cb0)
        if (bias) static_cast<acc_t*>(p.dcb0)[bh * D + col] = w0;
        else static_cast<acc_t*>(p.dC0)[bh * DD + e] = w0;
        dW = pz;
      } else {
        dW = w0 + pz;
      }
      dS = s0;
    }
    TTT_SYNC();
  }
  titans_copy(c.dW, c.db, p.dW0, p.db0, D, bh, false);
  titans_copy(c.dS, c.dsb, p.dS0, p.dsb0, D, bh, false);
  TTT_PAR_FOR(d, D) {
    static_cast<acc_t*>(p.dln_w)[bh * D + d] = c.dlnw[d];
    static_cast<acc_t*>(p.dln_b)[bh * D + d] = c.dlnb[d];
  }
}

}  // namespace ttt
