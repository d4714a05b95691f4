// The fused TTT-Linear math in the Titans form for one (batch, head) chain (CPU and GPU).
//
// Per token j of a segment of n tokens, gradients are taken at the segment's gradient point P:
//   S_j = m_j S_{j-1} - eta_j grad l_j(P),   W_j = (1 - a_j) W_{j-1} + S_j,   o_j from W_j.
// Unrolled over the segment (S_0, W_0: momentum and weights at its start; W_0 = P except where a
// streaming state starts inside a mini-batch), with per-source coefficients
//   W_i = D_i W_0 + c0_i S_0 - sum_{t<=i} C_it eta_t X_t^T g_t,   S_last = m S_0 - sum_t M_t ...
// where every source (token t's step, W_0, S_0) runs the scalar recurrence
//   s_j = m_j s_{j-1},  w_j = (1 - a_j) w_{j-1} + s_j
// from (w, s) = (1, 1) at j = t (a step), (1, 0) before token 0 (W_0) or (0, 1) (S_0):
// C_it = w_i, M_t = s_{n-1} of step t; D_i = w_i of W_0; c0_i = w_i, m = s_{n-1} of S_0.
// Cx / Mx hold w / s per (row j, source column): steps in columns 0..n-1, W_0 in column bmax,
// S_0 in column bmax + 1 (row stride NC = bmax + 2). Then, as ttt-core's dual form,
//   Z'_i = D_i (q_i W_0 + b_0) + c0_i (q_i S_0 + sb_0) - sum_t C_it eta_t (q_i . k_t + 1) g_t.
// o_i = q_i + LN(Z'_i) (or LN(Z'_i): output_row); the target t_j = v_j - k_j or v_j (load_kqt).
// Token scale does not apply. When a segment completes, P <- W_last.
#pragma once
#include "ttt_linear_chain.h"  // schedule macros, mm_acc, LayerNorm rows

namespace ttt {

template <typename acc_t>
struct TitansBuffers {
  acc_t *W, *bw, *Wc, *bc, *S, *sb;              // [D, D], [D]: P, W_0 (current), S_0
  acc_t *K, *Q, *T, *X, *G, *Xp, *QW, *QS;       // [n, D]
  acc_t *Pm, *Cx, *Mx;                           // [n, n], [n, NC], [n, NC]
  acc_t *eta, *m, *dec, *rstd, *rstdp;           // [n]
  acc_t *U, *DZ, *dQ, *dK, *KdW, *KdS, *dG;      // backward [n, D]
  acc_t *dPm, *dCx, *cA, *cM, *dMl;              // backward [n, n], [n, NC] x3, [NC]
  acc_t *dw, *du, *dDv, *dc0, *rW, *rS1, *rS2;   // backward [n] x4, [D] x3
  acc_t *cw, *cu, *cD, *cS, *QK;                 // backward [n] x4: C_last eta, M eta, D_i, c0_i; [n, n]
  acc_t *dW, *db, *dS, *dsb, *dlnw, *dlnb;       // backward carries / accumulators
};

template <typename acc_t>
TTT_HD int64_t carve_titans(acc_t* base, int D, int bmax, bool bwd, TitansBuffers<acc_t>* c) {
  int64_t off = 0;
  auto take = [&](acc_t** ptr, int64_t n) {
    *ptr = base == nullptr ? nullptr : base + off;
    off += (n + 3) / 4 * 4;  // 16-byte aligned for float
  };
  const int64_t DD = static_cast<int64_t>(D) * D, nD = static_cast<int64_t>(bmax) * D;
  const int64_t nn = static_cast<int64_t>(bmax) * bmax, nC = static_cast<int64_t>(bmax) * (bmax + 2);
  take(&c->W, DD), take(&c->bw, D), take(&c->Wc, DD), take(&c->bc, D), take(&c->S, DD);
  take(&c->sb, D), take(&c->K, nD), take(&c->Q, nD), take(&c->T, nD), take(&c->X, nD);
  take(&c->G, nD), take(&c->Xp, nD), take(&c->QW, nD), take(&c->QS, nD), take(&c->Pm, nn);
  take(&c->Cx, nC), take(&c->Mx, nC), take(&c->eta, bmax), take(&c->m, bmax);
  take(&c->dec, bmax), take(&c->rstd, bmax), take(&c->rstdp, bmax);
  if (bwd) {
    take(&c->U, nD), take(&c->DZ, nD), take(&c->dQ, nD), take(&c->dK, nD), take(&c->KdW, nD);
    take(&c->KdS, nD), take(&c->dG, nD), take(&c->dPm, nn), take(&c->dCx, nC);
    take(&c->cA, nC), take(&c->cM, nC), take(&c->dMl, bmax + 2), take(&c->dw, bmax);
    take(&c->du, bmax), take(&c->dDv, bmax), take(&c->dc0, bmax), take(&c->rW, D);
    take(&c->rS1, D), take(&c->rS2, D), take(&c->dW, DD), take(&c->db, D), take(&c->dS, DD);
    take(&c->dsb, D), take(&c->dlnw, D), take(&c->dlnb, D);
    take(&c->cw, bmax), take(&c->cu, bmax), take(&c->cD, bmax), take(&c->cS, bmax);
    take(&c->QK, nn);
  }
  return off;
}

// Column of source index ci in Cx / Mx: steps 0..n-1, then W_0 (bmax) and S_0 (bmax + 1).
TTT_HD int titans_col(int ci, int n, int bmax) { return ci < n ? ci : bmax + (ci - n); }

// The scalar recurrence of every source (the header comment): Cx / Mx [n, NC] hold w / s per row
// j and source column (titans_col), from the segment's momentum m and decay dec [n].
template <typename acc_t>
TTT_HD void titans_coefs(int n, int bmax, const acc_t* m, const acc_t* dec, acc_t* Cx, acc_t* Mx) {
  const int NC = bmax + 2;
  TTT_PAR_FOR(ci, n + 2) {
    const int col = titans_col(ci, n, bmax), j0 = ci < n ? ci : 0;
    acc_t w = ci == n ? acc_t(1) : acc_t(0), s = ci == n + 1 ? acc_t(1) : acc_t(0);
    for (int j = 0; j < n; ++j) {
      if (j < j0) {
        w = 0, s = 0;
      } else if (ci < n && j == j0) {
        w = 1, s = 1;
      } else {
        s = m[j] * s;
        w = (acc_t(1) - dec[j]) * w + s;
      }
      Cx[j * NC + col] = w, Mx[j * NC + col] = s;
    }
  }
  TTT_SYNC();
}

// One fast layer of a segment, y = x W + b with Din inputs and Dout outputs: the queries' inputs
// h [n, Din], the keys' inputs X [n, Din] and output gradients g [n, Dout] at P, the weights W_0
// (Wc [Din, Dout], bc [Dout]) and momentum S_0 (S, sb) at the segment start, and the read's
// tiles QW, QS [n, Dout], Pm [n, n].
template <typename acc_t>
struct TitansLayer {
  int Din, Dout;
  const acc_t *h, *X, *g;
  acc_t *Wc, *bc, *S, *sb;
  acc_t *QW, *QS, *Pm;
};

// The read of a layer (the dual form of h_i W_i): QW = h W_0 + b_0, QS = h S_0 + sb_0,
// Pm = C * eta * (h X^T + 1) (lower triangle), y = D_i QW + c0_i QS - Pm g  [n, Dout].
template <typename acc_t>
TTT_HD void titans_read(const TitansLayer<acc_t>& l, int n, int bmax, const acc_t* Cx,
                        const acc_t* eta, acc_t* y) {
  const int NC = bmax + 2, Din = l.Din, Dout = l.Dout;
  TTT_PAR_FOR2(e, i, col, n, Dout) { l.QW[e] = l.bc[col], l.QS[e] = l.sb[col]; }
  mm_acc<+1, false, false>(n, Dout, Din, l.h, Din, l.Wc, Dout, l.QW, Dout);
  mm_acc<+1, false, false>(n, Dout, Din, l.h, Din, l.S, Dout, l.QS, Dout);
  TTT_PAR_FOR(e, n * n) { l.Pm[e] = 0; }
  mm_acc<+1, false, true>(n, n, Din, l.h, Din, l.X, Din, l.Pm, n);
  TTT_PAR_FOR2(e, i, t, n, n) {
    l.Pm[e] = t <= i ? Cx[i * NC + t] * eta[t] * (l.Pm[e] + acc_t(1)) : acc_t(0);
  }
  TTT_SYNC();
  TTT_PAR_FOR2(e, i, col, n, Dout) {  // Pm is zero above the diagonal
    y[e] = Cx[i * NC + bmax] * l.QW[e] + Cx[i * NC + bmax + 1] * l.QS[e];
  }
  mm_acc<-1, false, false>(n, Dout, n, l.Pm, n, l.g, Dout, y, Dout);
  TTT_SYNC();
}

// The end update of a layer: W_0 <- Dl W_0 + c0l S_0 - X^T diag(cw) g, S_0 <- ml S_0 -
// X^T diag(cu) g (biases alike), with cw_t = C_last,t eta_t, cu_t = M_t eta_t [n].
template <typename acc_t>
TTT_HD void titans_layer_update(const TitansLayer<acc_t>& l, int n, acc_t Dl, acc_t c0l, acc_t ml,
                                const acc_t* cw, const acc_t* cu) {
  const int Din = l.Din, Dout = l.Dout, nw = Din * Dout;
  TTT_PAR_FOR(e, nw + Dout) {  // the start terms, then the steps' sums below
    const bool bias = e >= nw;
    const int col = bias ? e - nw : e;
    acc_t& w = bias ? l.bc[col] : l.Wc[e];
    acc_t& s = bias ? l.sb[col] : l.S[e];
    w = Dl * w + c0l * s;
    s = ml * s;
  }
  TTT_SYNC();
  mm_acc<-1, true, false, kPerK>(Din, Dout, n, l.X, Din, l.g, Dout, l.Wc, Dout, cw);
  mm_acc<-1, true, false, kPerK>(Din, Dout, n, l.X, Din, l.g, Dout, l.S, Dout, cu);
  mm_acc<-1, true, false>(1, Dout, n, cw, 1, l.g, Dout, l.bc, Dout);
  mm_acc<-1, true, false>(1, Dout, n, cu, 1, l.g, Dout, l.sb, Dout);
  TTT_SYNC();
}

// Loads the segment and recomputes Cx, Mx, X, G (U), QW, QS, Pm, Xp from P, W_0 and S_0 in c.
template <typename scalar_t, typename acc_t>
TTT_HD void titans_recompute(const TitansParams& p, const TitansBuffers<acc_t>& c, int D, int bi,
                             int hi, const Segment& g, bool bwd) {
  const int t0 = g.t0, n = g.n, bmax = p.mini_batch_size;
  const int64_t row = (static_cast<int64_t>(bi) * p.H + hi) * p.L + t0;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  load_kqt<scalar_t, acc_t>(p, c.K, c.Q, c.T, D, bi, hi, t0, n);
  TTT_PAR_FOR(i, n) {
    c.eta[i] = static_cast<const acc_t*>(p.eta)[row + i];
    c.m[i] = static_cast<const acc_t*>(p.mom)[row + i];
    c.dec[i] = static_cast<const acc_t*>(p.dec)[row + i];
  }
  TTT_SYNC();
  titans_coefs(n, bmax, c.m, c.dec, c.Cx, c.Mx);
  // Z = K P + b (into X), G = d l / d Z
  TTT_PAR_FOR2(e, i, col, n, D) { c.X[e] = c.bw[col]; }
  mm_acc<+1, false, false>(n, D, D, c.K, D, c.W, D, c.X, D);
  TTT_SYNC();
  ln_rows(n, D, static_cast<acc_t>(p.eps), lnw, lnb, c.X, c.rstd, c.T, c.G, bwd ? c.U : nullptr);
  TTT_SYNC();
  // Z' = D_i (Q W_0 + b_0) + c0_i (Q S_0 + sb_0) - Pm G
  const TitansLayer<acc_t> layer{D, D, c.Q, c.K, c.G, c.Wc, c.bc, c.S, c.sb, c.QW, c.QS, c.Pm};
  titans_read(layer, n, bmax, c.Cx, c.eta, c.Xp);
  ln_rows<acc_t>(n, D, static_cast<acc_t>(p.eps), lnw, lnb, c.Xp, c.rstdp, nullptr, nullptr,
                 nullptr);
  TTT_SYNC();
}

// W_0 <- D_last W_0 + c0_last S_0 - K^T diag(C_last eta) G,  S_0 <- m S_0 - K^T diag(M eta) G
// (biases alike); when the segment completes, P <- W_0. Pm (free once Z' is formed) holds the
// coefficients C_last,t eta_t (row 0) and M_t eta_t (row 1; at n = 1 the carve's padding).
template <typename acc_t>
TTT_HD void titans_update(const TitansParams& p, const TitansBuffers<acc_t>& c, int D,
                          const Segment& g) {
  const int n = g.n, bmax = p.mini_batch_size, NC = bmax + 2, last = (n - 1) * NC;
  const acc_t Dl = c.Cx[last + bmax], c0l = c.Cx[last + bmax + 1], ml = c.Mx[last + bmax + 1];
  acc_t* cw = c.Pm;
  acc_t* cu = c.Pm + n;
  TTT_PAR_FOR(t, n) { cw[t] = c.Cx[last + t] * c.eta[t], cu[t] = c.Mx[last + t] * c.eta[t]; }
  const TitansLayer<acc_t> layer{D, D, c.Q, c.K, c.G, c.Wc, c.bc, c.S, c.sb, c.QW, c.QS, c.Pm};
  titans_layer_update(layer, n, Dl, c0l, ml, cw, cu);
  if (g.completes) {
    TTT_PAR_FOR(e, D * D + D) {
      if (e < D * D) c.W[e] = c.Wc[e];
      else c.bw[e - D * D] = c.bc[e - D * D];
    }
    TTT_SYNC();
  }
}

// Copies a [Din, Dout] + [Dout] pair between buffers and a [B, H, (nseg,) ...] tensor slot.
template <typename acc_t>
TTT_HD void titans_copy(acc_t* W, acc_t* b, const void* Wt, const void* bt, int Din, int Dout,
                        int64_t slot, bool to_buffers) {
  const int64_t nw = static_cast<int64_t>(Din) * Dout;
  acc_t* wt = const_cast<acc_t*>(static_cast<const acc_t*>(Wt)) + slot * nw;
  acc_t* vt = const_cast<acc_t*>(static_cast<const acc_t*>(bt)) + slot * Dout;
  TTT_PAR_FOR(e, nw + Dout) {
    acc_t& buf = e < nw ? W[e] : b[e - nw];
    acc_t& ten = e < nw ? wt[e] : vt[e - nw];
    if (to_buffers) buf = ten;
    else ten = buf;
  }
}

// Forward of chain (bi, hi): o, the end weights and momentum, each segment's P and S_0.
template <typename scalar_t, typename acc_t>
TTT_HD void titans_fwd_chain(const TitansParams& p, acc_t* ws, int D, int bi, int hi) {
  TitansBuffers<acc_t> c;
  carve_titans<acc_t>(ws, D, p.mini_batch_size, false, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  titans_copy(c.W, c.bw, p.W0, p.b0, D, D, bh, true);
  titans_copy(c.Wc, c.bc, p.C0, p.cb0, D, D, bh, true);
  titans_copy(c.S, c.sb, p.S0, p.sb0, D, D, bh, true);
  TTT_SYNC();
  const int nseg = p.num_segments();
  for (int s = 0; s < nseg; ++s) {
    const Segment g = segment(p, s);
    titans_copy(c.W, c.bw, p.W_starts, p.b_starts, D, D, bh * nseg + s, false);
    titans_copy(c.S, c.sb, p.S_starts, p.sb_starts, D, D, bh * nseg + s, false);
    titans_recompute<scalar_t, acc_t>(p, c, D, bi, hi, g, false);
    scalar_t* o = static_cast<scalar_t*>(p.o) + (bh * p.L + g.t0) * D;
    // o = q + gamma * LN(Z') + beta (or without q)
    output_rows(p.output_residual, g.n, D, c.Q, c.Xp, lnw, lnb, o);
    titans_update(p, c, D, g);
  }
  titans_copy(c.Wc, c.bc, p.W_end, p.b_end, D, D, bh, false);
  titans_copy(c.S, c.sb, p.S_end, p.sb_end, D, D, bh, false);
}

}  // namespace ttt

#include "ttt_titans_backward.h"
