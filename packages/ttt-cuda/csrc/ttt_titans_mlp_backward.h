// Backward of the Titans-form TTT-MLP chain (ttt_titans_mlp_chain.h). Blocks in reverse, each
// recomputed from its stored P, W_0 and S_0; carries dW (d/d each layer's weights after the block,
// in m.dW1..m.db2), dS (d/d its momentum) and dP (d/d the gradient point after it); where a block
// completes its mini-batch, P after it is W after it: dW += dP, dP <- 0. Per block, with dY2 =
// the output LN's backward:
//   end update (per layer, against the carries):  XdW = X dW + db, XdS = X dS + dsb,
//     dX -= diag(cw) g dW^T + diag(cu) g dS^T,  dg = -(cw XdW + cu XdS),
//     d cw_t = -XdW_t . g_t, d cu_t = -XdS_t . g_t;  D_last, c0_last, m get <W_0, dW>, <S_0, dW>,
//     <S_0, dS>;  then dS <- m dS + c0_last dW, dW <- D_last dW
//   reads (titans_read_bwd, layer 2 with dY2, then layer 1 with dY1 = dh2 * gelu'(Y1))
//   coefficients: titans_coefs_bwd (ttt_titans_backward.h) -> dmom, ddec
//   key pass at P: through G1 = H1 * gelu'(Z1), H1 = G2 P2^T, G2 = lnloss(Z2), Z2 = X2 P2 + pb2,
//     X2 = gelu(Z1), Z1 = K P1 + pb1 -> dk, dv, d LN, dP
// The first block's W_0, P and S_0 are the inputs C0.., W0.., S0..: dC0 = dW, dW0 = dP, dS0 = dS.
#pragma once
#include "ttt_titans_backward.h"   // titans_coefs_bwd
#include "ttt_titans_mlp_chain.h"

namespace ttt {

// Backward of titans_read for the read's output gradient dY [n, Dout] (QW, QS, Pm as the read
// left them; HX = h X^T [n, n]; cD, cS [n]: D_i, c0_i). Accumulates dh, dX [n, Din], dg [n, Dout],
// the carries dW, db, dS, dsb (W_0's and S_0's terms), dDv, dc0 [n] (D_i's, c0_i's), dCx's step
// columns and deta [n]; dPm [n, n] is scratch.
//   y = D_i QW + c0_i QS - Pm g,  QW = h W_0 + b_0,  QS = h S_0 + sb_0,
//   Pm_it = C_it eta_t (HX_it + 1) (t <= i):  dPm = -dY g^T, dg -= Pm^T dY,
//   dh += diag(D) dY W_0^T + diag(c0) dY S_0^T + dSqk X,  dX += dSqk^T h  (dSqk = dPm C eta)
template <typename acc_t>
TTT_HD void titans_read_bwd(const TitansLayer<acc_t>& l, int n, int bmax, const acc_t* Cx,
                            const acc_t* eta, const acc_t* HX, const acc_t* dY, const acc_t* cD,
                            const acc_t* cS, acc_t* dPm, acc_t* dh, acc_t* dX, acc_t* dg,
                            acc_t* dW, acc_t* db, acc_t* dS, acc_t* dsb, acc_t* dDv, acc_t* dc0,
                            acc_t* dCx, acc_t* deta) {
  const int NC = bmax + 2, Din = l.Din, Dout = l.Dout;
  row_dots(n, Dout, l.QW, dY, dDv, true);
  row_dots(n, Dout, l.QS, dY, dc0, true);
  TTT_PAR_FOR(e, n * n) { dPm[e] = 0; }
  mm_acc<-1, false, true>(n, n, Dout, dY, Dout, l.g, Dout, dPm, n);
  TTT_SYNC();
  TTT_PAR_FOR2(e, i, t, n, n) {  // the lower triangle (t <= i) only
    if (t > i) dPm[e] = 0;
  }
  mm_acc<-1, true, false>(n, Dout, n, l.Pm, n, dY, Dout, dg, Dout);            // dg -= Pm^T dY
  mm_acc<+1, false, true, kPerRow>(n, Din, Dout, dY, Dout, l.Wc, Dout, dh, Din, cD);  // + diag(D) dY W_0^T
  mm_acc<+1, false, true, kPerRow>(n, Din, Dout, dY, Dout, l.S, Dout, dh, Din, cS);   // + diag(c0) dY S_0^T
  TTT_SYNC();
  TTT_PAR_FOR2(e, i, t, n, n) {  // d C_it (the steps' columns)
    if (t <= i) dCx[i * NC + t] += dPm[e] * eta[t] * (HX[e] + acc_t(1));
  }
  TTT_PAR_FOR(t, n) {  // d eta_t
    acc_t sum = 0;
    for (int i = t; i < n; ++i) sum += dPm[i * n + t] * Cx[i * NC + t] * (HX[i * n + t] + acc_t(1));
    deta[t] += sum;
  }
  TTT_SYNC();
  TTT_PAR_FOR2(e, i, t, n, n) { dPm[e] = dPm[e] * Cx[i * NC + t] * eta[t]; }  // dSqk
  TTT_SYNC();
  mm_acc<+1, false, false>(n, Din, n, dPm, n, l.X, Din, dh, Din);  // dh += dSqk X
  mm_acc<+1, true, false>(n, Din, n, dPm, n, l.h, Din, dX, Din);   // dX += dSqk^T h
  // the carries: d W_0 += h^T diag(D) dY, d S_0 += h^T diag(c0) dY (biases: D^T dY, c0^T dY)
  mm_acc<+1, true, false, kPerK>(Din, Dout, n, l.h, Din, dY, Dout, dW, Dout, cD);
  mm_acc<+1, true, false, kPerK>(Din, Dout, n, l.h, Din, dY, Dout, dS, Dout, cS);
  mm_acc<+1, true, false>(1, Dout, n, cD, 1, dY, Dout, db, Dout);
  mm_acc<+1, true, false>(1, Dout, n, cS, 1, dY, Dout, dsb, Dout);
  TTT_SYNC();
}

// A layer's carries through its end update: dS <- m dS + c0_last dW, dW <- D_last dW.
template <typename acc_t>
TTT_HD void titans_carry_move(int nw, int Dout, acc_t Dl, acc_t c0l, acc_t ml, acc_t* dW,
                              acc_t* db, acc_t* dS, acc_t* dsb) {
  TTT_PAR_FOR(e, nw + Dout) {
    const bool bias = e >= nw;
    acc_t& w = bias ? db[e - nw] : dW[e];
    acc_t& s = bias ? dsb[e - nw] : dS[e];
    s = ml * s + c0l * w;
    w = Dl * w;
  }
}

// dst[e] = src[slot * count + e], or 0 without src.
template <typename acc_t>
TTT_HD void titans_load_or_zero(acc_t* dst, const void* src, int64_t count, int64_t slot) {
  const acc_t* s = static_cast<const acc_t*>(src);
  TTT_PAR_FOR(e, count) { dst[e] = s != nullptr ? s[slot * count + e] : acc_t(0); }
}

// <W_0, dW>, <S_0, dW>, <S_0, dS> of one layer per output column c (into r0, r1, r2 [Dout]).
template <typename acc_t>
TTT_HD void titans_carry_dots(const TitansLayer<acc_t>& l, const acc_t* dW, const acc_t* db,
                              const acc_t* dS, const acc_t* dsb, acc_t* r0, acc_t* r1, acc_t* r2) {
  const int Din = l.Din, Dout = l.Dout;
  TTT_PAR_FOR(col, Dout) {
    acc_t rw = l.bc[col] * db[col], rs = l.sb[col] * db[col], rm = l.sb[col] * dsb[col];
    for (int d = 0; d < Din; ++d) {
      const int e = d * Dout + col;
      rw += l.Wc[e] * dW[e], rs += l.S[e] * dW[e], rm += l.S[e] * dS[e];
    }
    r0[col] = rw, r1[col] = rs, r2[col] = rm;
  }
}

// carry += dP, dP <- 0 (count elements).
template <typename acc_t>
TTT_HD void titans_join_carry(int64_t count, acc_t* dP, acc_t* carry) {
  TTT_PAR_FOR(e, count) { carry[e] += dP[e], dP[e] = 0; }
}

// acc += src's slot (count elements each).
template <typename acc_t>
TTT_HD void titans_add_slot(int64_t count, acc_t* acc, const void* src, int64_t slot) {
  const acc_t* s = static_cast<const acc_t*>(src) + slot * count;
  TTT_PAR_FOR(e, count) { acc[e] += s[e]; }
}

template <typename scalar_t, typename acc_t>
TTT_HD void titans_mlp_bwd_chain(const TitansMLPParams& p, acc_t* ws, int D, int F, int bi,
                                 int hi) {
  TitansMLPBuffers<acc_t> c;
  const int bmax = titans_mlp_block(p.mini_batch_size), NC = bmax + 2, R = F + D;
  carve_titans_mlp<acc_t>(ws, D, F, bmax, true, &c);
  const MLPBuffers<acc_t>& m = c.m;
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi, DF = static_cast<int64_t>(D) * F;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  // the carries start as the gradients of the end weights and momentum (zero where not given)
  titans_load_or_zero(m.dW1, p.dW_end, DF, bh), titans_load_or_zero(m.db1, p.db_end, F, bh);
  titans_load_or_zero(m.dW2, p.dW2_end, DF, bh), titans_load_or_zero(m.db2, p.db2_end, D, bh);
  titans_load_or_zero(c.dS1, p.dS_end, DF, bh), titans_load_or_zero(c.dsb1, p.dsb_end, F, bh);
  titans_load_or_zero(c.dS2, p.dS2_end, DF, bh), titans_load_or_zero(c.dsb2, p.dsb2_end, D, bh);
  TTT_PAR_FOR(e, DF) { c.dP1[e] = 0, c.dP2[e] = 0; }
  TTT_PAR_FOR(f, F) { c.dpb1[f] = 0; }
  TTT_PAR_FOR(d, D) { c.dpb2[d] = 0, m.dlnw[d] = 0, m.dlnb[d] = 0; }
  TTT_SYNC();
  const int nblk = titans_mlp_count_blocks(p);
  for (int b = nblk - 1; b >= 0; --b) {
    const Segment g = titans_mlp_block_at(p, b);
    const int t0 = g.t0, n = g.n, last = (n - 1) * NC;
    const int64_t row = bh * p.L + t0, slot = bh * nblk + b;
    acc_t* deta = static_cast<acc_t*>(p.deta) + row;
    titans_mlp_copy_starts(p, c, D, F, slot, true);  // P, W_0, S_0
    if (g.completes) {  // P after this block is W after it
      titans_join_carry(DF, c.dP1, m.dW1), titans_join_carry<acc_t>(F, c.dpb1, m.db1);
      titans_join_carry(DF, c.dP2, m.dW2), titans_join_carry<acc_t>(D, c.dpb2, m.db2);
    }
    TTT_PAR_FOR2(e, i, col, n, D) {  // dQ holds dO until the output LN's backward has read it
      m.dQ[e] = ld<scalar_t, acc_t>(p.dO, bi * p.do_sb + hi * p.do_sh + (t0 + i) * p.do_sl + col);
    }
    TTT_SYNC();
    titans_mlp_recompute<scalar_t, acc_t>(p, c, D, F, bi, hi, g, true);
    const TitansLayer<acc_t> l1 = titans_mlp_layer1(c, D, F), l2 = titans_mlp_layer2(c, D, F);

    // B0: per-row coefficients (cw_t = C_last,t eta_t, cu_t = M_t eta_t, D_i, c0_i); the reads'
    // h X^T: HX1 = Q K^T, HX2 = Xq2 X2^T
    TTT_PAR_FOR(i, n) {
      c.cw[i] = c.Cx[last + i] * m.eta[i], c.cu[i] = c.Mx[last + i] * m.eta[i];
      c.cD[i] = c.Cx[i * NC + bmax], c.cS[i] = c.Cx[i * NC + bmax + 1];
    }
    TTT_PAR_FOR(e, n * n) { c.HX1[e] = 0, c.HX2[e] = 0; }
    mm_acc<+1, false, true>(n, n, D, m.Q, D, m.K, D, c.HX1, n);
    mm_acc<+1, false, true>(n, n, F, m.Xq2, F, m.X2, F, c.HX2, n);
    TTT_SYNC();

    // B1: output LN (DZ = dY2); the end update against the carries (not yet moved):
    // KdW1 = K dW1 + db1, KdS1 = K dS1 + dsb1, XdW2 = X2 dW2 + db2, XdS2 = X2 dS2 + dsb2;
    // dK = -(diag(cw) G1 dW1^T + diag(cu) G1 dS1^T), dX2 = -(diag(cw) G2 dW2^T + diag(cu) G2 dS2^T)
    ln_out_bwd_rows(n, D, lnw, m.Xp, m.rstdp, m.dQ, m.DZ);
    add_col_sums(n, D, m.dlnw, [&](int i, int col) { return m.dQ[i * D + col] * m.Xp[i * D + col]; });
    add_col_sums(n, D, m.dlnb, [&](int i, int col) { return m.dQ[i * D + col]; });
    TTT_PAR_FOR2(e, i, col, n, F) { m.KdW1[e] = m.db1[col], c.KdS1[e] = c.dsb1[col], m.dX2[e] = 0; }
    TTT_PAR_FOR2(e, i, col, n, D) { m.XdW2[e] = m.db2[col], c.XdS2[e] = c.dsb2[col], m.dK[e] = 0; }
    mm_acc<+1, false, false>(n, F, D, m.K, D, m.dW1, F, m.KdW1, F);
    mm_acc<+1, false, false>(n, F, D, m.K, D, c.dS1, F, c.KdS1, F);
    mm_acc<+1, false, false>(n, D, F, m.X2, F, m.dW2, D, m.XdW2, D);
    mm_acc<+1, false, false>(n, D, F, m.X2, F, c.dS2, D, c.XdS2, D);
    mm_acc<-1, false, true, kPerRow>(n, D, F, m.G1, F, m.dW1, F, m.dK, D, c.cw);
    mm_acc<-1, false, true, kPerRow>(n, D, F, m.G1, F, c.dS1, F, m.dK, D, c.cu);
    mm_acc<-1, false, true, kPerRow>(n, F, D, m.G2, D, m.dW2, D, m.dX2, F, c.cw);
    mm_acc<-1, false, true, kPerRow>(n, F, D, m.G2, D, c.dS2, D, m.dX2, F, c.cu);
    titans_carry_dots(l1, m.dW1, m.db1, c.dS1, c.dsb1, c.red, c.red + R, c.red + 2 * R);
    titans_carry_dots(l2, m.dW2, m.db2, c.dS2, c.dsb2, c.red + F, c.red + R + F, c.red + 2 * R + F);
    TTT_SYNC();
    // B2: dQ = dO through the output residual; d cw, d cu; deta's end-update terms; dg1 = -(cw
    // KdW1 + cu KdS1), dg2 = -(cw XdW2 + cu XdS2) (over dG1, dG2); zeroed accumulators
    TTT_PAR_FOR(e, n * D) { m.dQ[e] = output_dq<acc_t>(p.output_residual, m.dQ[e]); }
    row_dots(n, F, m.KdW1, m.G1, c.dw, false), row_dots(n, D, m.XdW2, m.G2, c.dw, true);
    row_dots(n, F, c.KdS1, m.G1, c.du, false), row_dots(n, D, c.XdS2, m.G2, c.du, true);
    TTT_SYNC();
    TTT_PAR_FOR(i, n) {
      c.dw[i] = -c.dw[i], c.du[i] = -c.du[i], c.dDv[i] = 0, c.dc0[i] = 0;
      deta[i] = c.dw[i] * c.Cx[last + i] + c.du[i] * c.Mx[last + i];
    }
    TTT_PAR_FOR2(e, i, col, n, F) { m.dG1[e] = -(c.cw[i] * m.KdW1[e] + c.cu[i] * c.KdS1[e]), m.dXq2[e] = 0; }
    TTT_PAR_FOR2(e, i, col, n, D) { m.dG2[e] = -(c.cw[i] * m.XdW2[e] + c.cu[i] * c.XdS2[e]); }
    TTT_PAR_FOR(e, n * NC) { c.dCx[e] = 0; }
    TTT_SYNC();
    {
      const acc_t Dl = c.Cx[last + bmax], c0l = c.Cx[last + bmax + 1], ml = c.Mx[last + bmax + 1];
      titans_carry_move(D * F, F, Dl, c0l, ml, m.dW1, m.db1, c.dS1, c.dsb1);
      titans_carry_move(F * D, D, Dl, c0l, ml, m.dW2, m.db2, c.dS2, c.dsb2);
    }
    TTT_SYNC();
    // B3: layer 2's read with dY2 = DZ (dh2 into dXq2); dY1 = dXq2 * gelu'(Y1), in place
    titans_read_bwd(l2, n, bmax, c.Cx, m.eta, c.HX2, m.DZ, c.cD, c.cS, c.dPm2, m.dXq2, m.dX2,
                    m.dG2, m.dW2, m.db2, c.dS2, c.dsb2, c.dDv, c.dc0, c.dCx, deta);
    TTT_PAR_FOR(e, n * F) { m.dXq2[e] = m.dXq2[e] * m.GPq[e]; }  // GPq = gelu'(Y1)
    TTT_SYNC();
    // B4: layer 1's read with dY1 (dh1 into dQ, dX1 into dK)
    titans_read_bwd(l1, n, bmax, c.Cx, m.eta, c.HX1, m.dXq2, c.cD, c.cS, c.dPm1, m.dQ, m.dK,
                    m.dG1, m.dW1, m.db1, c.dS1, c.dsb1, c.dDv, c.dc0, c.dCx, deta);
    // B5: the coefficients: W_0's and S_0's columns of dCx (+ the end update's D_last, c0_last
    // at the last row), the steps' d C_last,t (d cw eta) and d M_t (d cu eta), S_0's d m
    TTT_PAR_FOR(j, n) {
      acc_t rw = 0, rs = 0;
      if (j == n - 1)
        for (int r = 0; r < R; ++r) rw += c.red[r], rs += c.red[R + r];
      c.dCx[j * NC + bmax] = c.dDv[j] + rw, c.dCx[j * NC + bmax + 1] = c.dc0[j] + rs;
      c.dCx[last + j] += c.dw[j] * m.eta[j];
      c.dMl[j] = c.du[j] * m.eta[j];
    }
    if (TTT_TID == 0) {
      acc_t rm = 0;
      for (int r = 0; r < R; ++r) rm += c.red[2 * R + r];
      c.dMl[bmax] = 0, c.dMl[bmax + 1] = rm;
    }
    TTT_SYNC();
    titans_coefs_bwd(n, bmax, c.mom, c.dec, c.Cx, c.Mx, c.dCx, c.dMl, c.cA, c.cM,
                     static_cast<acc_t*>(p.dmom) + row, static_cast<acc_t*>(p.ddec) + row);
    // B6: the key pass at P. Through G1 = H1 * gelu'(Z1): dZ1 = dG1 * H1 * gelu''(Z1) (over
    // KdW1), dH1 = dG1 * GP (over dG1); through H1 = G2 P2^T: dG2 += dH1 P2
    TTT_PAR_FOR(e, n * F) {
      const acc_t dg1 = m.dG1[e];
      m.KdW1[e] = dg1 * m.H1[e] * m.GPP[e];  // GPP = gelu''(Z1)
      m.dG1[e] = dg1 * m.GP[e];
    }
    TTT_SYNC();
    mm_acc<+1, false, false>(n, D, F, m.dG1, F, m.W2, D, m.dG2, D);
    TTT_SYNC();
    // rows through G2 = rstd (U - mean U - X mean(U X)): dZ2, and dU over U
    ln_loss_grad_bwd_rows(n, D, lnw, m.X, m.G2, m.rstd, m.dG2, m.U, m.dZ2);
    TTT_SYNC();
    // B7: d gamma, d beta through U; dv = dT = -gamma dU, dK += its share through T; through
    // Z2 = X2 P2 + pb2 and X2 = gelu(Z1): dX2 += dZ2 P2^T, dZ1 += dX2 * gelu'(Z1)
    ln_loss_param_grads(n, D, lnw, lnb, m.X, m.T, m.U, m.dlnw, m.dlnb);
    TTT_PAR_FOR2(e, i, col, n, D) {
      const acc_t dt = -(lnw[col] * m.U[e]);
      m.dK[e] += loss_target_dk<acc_t>(p.value_target, dt);
      static_cast<scalar_t*>(p.dv)[row * D + e] = static_cast<scalar_t>(dt);
    }
    mm_acc<+1, false, true>(n, F, D, m.dZ2, D, m.W2, D, m.dX2, F);  // dX2 += dZ2 P2^T
    TTT_PAR_FOR(e, n * F) { m.KdW1[e] += m.dX2[e] * m.GP[e]; }
    TTT_SYNC();
    mm_acc<+1, false, true>(n, D, F, m.KdW1, F, m.W1, F, m.dK, D);  // dK += dZ1 P1^T
    TTT_PAR_FOR(e, n * D) {
      static_cast<scalar_t*>(p.dk)[row * D + e] = static_cast<scalar_t>(m.dK[e]);
      static_cast<scalar_t*>(p.dq)[row * D + e] = static_cast<scalar_t>(m.dQ[e]);
    }
    TTT_SYNC();
    // B8: the key pass's d P joins P's carry: dP1 += K^T dZ1, dP2 += dH1^T G2 + X2^T dZ2 (and
    // the biases), plus the stored P's own gradient
    mm_acc<+1, true, false>(D, F, n, m.K, D, m.KdW1, F, c.dP1, F);
    mm_acc<+1, true, false>(F, D, n, m.dG1, F, m.G2, D, c.dP2, D);
    mm_acc<+1, true, false>(F, D, n, m.X2, F, m.dZ2, D, c.dP2, D);
    TTT_PAR_FOR(f, F) {
      acc_t sum = 0;
      for (int i = 0; i < n; ++i) sum += m.KdW1[i * F + f];
      c.dpb1[f] += sum;
    }
    TTT_PAR_FOR(d, D) {
      acc_t sum = 0;
      for (int i = 0; i < n; ++i) sum += m.dZ2[i * D + d];
      c.dpb2[d] += sum;
    }
    TTT_SYNC();
    if (p.dW_starts != nullptr) {
      titans_add_slot(DF, c.dP1, p.dW_starts, slot), titans_add_slot(F, c.dpb1, p.db_starts, slot);
      titans_add_slot(DF, c.dP2, p.dW2_starts, slot), titans_add_slot(D, c.dpb2, p.db2_starts, slot);
      TTT_SYNC();
    }
  }
  titans_copy(m.dW1, m.db1, p.dC0, p.dcb0, D, F, bh, false);
  titans_copy(m.dW2, m.db2, p.dC20, p.dcb20, F, D, bh, false);
  titans_copy(c.dP1, c.dpb1, p.dW0, p.db0, D, F, bh, false);
  titans_copy(c.dP2, c.dpb2, p.dW20, p.db20, F, D, bh, false);
  titans_copy(c.dS1, c.dsb1, p.dS0, p.dsb0, D, F, bh, false);
  titans_copy(c.dS2, c.dsb2, p.dS20, p.dsb20, F, D, bh, false);
  TTT_PAR_FOR(d, D) {
    static_cast<acc_t*>(p.dln_w)[bh * D + d] = m.dlnw[d];
    static_cast<acc_t*>(p.dln_b)[bh * D + d] = m.dlnb[d];
  }
}

}  // namespace ttt
