// The fused TTT-MLP math in the Titans form for one (batch, head) chain (CPU; the header compiles
// for the block schedule too, but there is no CUDA kernel of it).
//
// Fast model f(x) = gelu_tanh(x W1 + b1) W2 + b2 (W1 [D, F], W2 [F, D]); per token j of a segment
// of n tokens, gradients at the segment's gradient point P (ttt_titans_chain.h, per layer):
//   S_j = m_j S_{j-1} - eta_j grad l_j(P),   W_j = (1 - a_j) W_{j-1} + S_j,   o_j from W_j.
// Both layers share the coefficients of ttt_titans_chain.h (titans_coefs: C_it, D_i, c0_i, M_t, m).
//   keys at P (mlp_keys):  Z1 = K P1 + pb1, X2 = gelu(Z1), Z2 = X2 P2 + pb2,
//                          G2 = d l / d Z2 (the LN loss), G1 = (G2 P2^T) * gelu'(Z1)
//   layer l reads its queries' inputs h_l (h_1 = Q, h_2 = gelu(Y1)) against the keys' inputs X_l
//   (X_1 = K, X_2 = X2) and gradients g_l (G1, G2) with its W_0 (Wc_l) and S_0 (S_l), titans_read:
//     Y_l = D_i (h_l Wc_l + bc_l) + c0_i (h_l S_l + sb_l) - [C * eta * (h_l X_l^T + 1)] g_l
//   o = q + LN(Y2) (or LN(Y2): output_row)
//   end, per layer (titans_layer_update):
//     Wc_l <- D_last Wc_l + c0_last S_l - X_l^T diag(C_last eta) g_l,
//     S_l <- m S_l - X_l^T diag(M eta) g_l (biases alike); P <- Wc when the segment completes its
//     mini-batch.
// Blocks: a segment longer than kTitansMLPBlock tokens is read in blocks of that many that carry
// (W_0, S_0) from one to the next while every gradient stays at P (exactly as a streaming cut
// inside a mini-batch; ttt-core's torch backend does the same with its BLOCK): the n x n tiles
// of the reads stay small, the key pass and the updates cost the same per token.
// The backward (ttt_titans_mlp_backward.h) walks the blocks in reverse from the stored P, W_0, S_0.
#pragma once
#include "ttt_mlp_chain.h"     // MLPBuffers, mlp_keys, gelu_tanh
#include "ttt_titans_chain.h"  // titans_coefs, TitansLayer, titans_read, titans_layer_update

namespace ttt {

constexpr int kTitansMLPBlock = 32;  // tokens per block at most

// Tokens per block (and the chain's tile rows): the mini-batch, at most kTitansMLPBlock.
TTT_HD int titans_mlp_block(int mini_batch_size) {
  return mini_batch_size < kTitansMLPBlock ? mini_batch_size : kTitansMLPBlock;
}

// Blocks of segment g (n tokens): ceil(n / bq).
TTT_HD int titans_mlp_blocks_in(const Segment& g, int bq) { return (g.n + bq - 1) / bq; }

// Block r of segment g: its tokens [t0 + r bq, ...); it completes the mini-batch only if it ends
// the segment that does.
TTT_HD Segment titans_mlp_block_of(const Segment& g, int r, int bq) {
  Segment blk = g;
  blk.t0 = g.t0 + r * bq, blk.off = g.off + r * bq;
  blk.n = g.n - r * bq < bq ? g.n - r * bq : bq;
  blk.completes = g.completes && r * bq + blk.n == g.n;
  return blk;
}

// All blocks of a call.
TTT_HD int titans_mlp_count_blocks(const LinearParams& p) {
  const int bq = titans_mlp_block(p.mini_batch_size), nseg = p.num_segments();
  int count = 0;
  for (int s = 0; s < nseg; ++s) count += titans_mlp_blocks_in(segment(p, s), bq);
  return count;
}

// Block i of a call (segments in order, each split into blocks).
TTT_HD Segment titans_mlp_block_at(const LinearParams& p, int i) {
  const int bq = titans_mlp_block(p.mini_batch_size);
  for (int s = 0;; ++s) {
    const Segment seg = segment(p, s);
    const int nb = titans_mlp_blocks_in(seg, bq);
    if (i < nb) return titans_mlp_block_of(seg, i, bq);
    i -= nb;
  }
}

// Scratch of one chain: the TTT-MLP chain's buffers (P in W1..b2, the key pass, the queries'
// Zq1 = Y1, Xq2 = gelu(Y1), Xp = Y2, P1 / P2 = the layers' Pm) plus the Titans form's.
template <typename acc_t>
struct TitansMLPBuffers {
  MLPBuffers<acc_t> m;
  acc_t *W1c, *b1c, *W2c, *b2c;      // W_0 [D, F] [F] [F, D] [D]
  acc_t *S1, *sb1, *S2, *sb2;        // S_0, the same shapes
  acc_t *QW1, *QS1, *QW2, *QS2;      // [n, F] x2, [n, D] x2
  acc_t *Cx, *Mx, *mom, *dec, *cw, *cu;  // [n, NC] x2, [n] x4
  // backward
  acc_t *dS1, *dsb1, *dS2, *dsb2;    // the momentum carries (m.dW1..: the weights' carries)
  acc_t *dP1, *dpb1, *dP2, *dpb2;    // P's carries
  acc_t *KdS1, *XdS2, *HX1, *HX2;    // [n, F], [n, D], [n, n] x2: X dS + dsb, h X^T
  acc_t *cD, *cS;                    // [n]: D_i, c0_i
  acc_t *dPm1, *dPm2, *dCx, *cA, *cM, *dMl;  // [n, n] x2, [n, NC] x3, [NC]
  acc_t *dw, *du, *dDv, *dc0, *red;  // [n] x4; red [3, F + D]: <W_0, dW>, <S_0, dW>, <S_0, dS>
};

template <typename acc_t>
TTT_HD int64_t carve_titans_mlp(acc_t* base, int D, int F, int bmax, bool bwd,
                                TitansMLPBuffers<acc_t>* c) {
  int64_t off = carve_mlp<acc_t>(base, D, F, bmax, bwd, &c->m);
  auto take = [&](acc_t** ptr, int64_t n) {
    *ptr = base == nullptr ? nullptr : base + off;
    off += (n + 3) / 4 * 4;  // 16-byte aligned for float
  };
  const int64_t DF = static_cast<int64_t>(D) * F, nD = static_cast<int64_t>(bmax) * D;
  const int64_t nF = static_cast<int64_t>(bmax) * F, nn = static_cast<int64_t>(bmax) * bmax;
  const int64_t nC = static_cast<int64_t>(bmax) * (bmax + 2);
  take(&c->W1c, DF), take(&c->b1c, F), take(&c->W2c, DF), take(&c->b2c, D);
  take(&c->S1, DF), take(&c->sb1, F), take(&c->S2, DF), take(&c->sb2, D);
  take(&c->QW1, nF), take(&c->QS1, nF), take(&c->QW2, nD), take(&c->QS2, nD);
  take(&c->Cx, nC), take(&c->Mx, nC), take(&c->mom, bmax), take(&c->dec, bmax);
  take(&c->cw, bmax), take(&c->cu, bmax);
  if (bwd) {
    take(&c->dS1, DF), take(&c->dsb1, F), take(&c->dS2, DF), take(&c->dsb2, D);
    take(&c->dP1, DF), take(&c->dpb1, F), take(&c->dP2, DF), take(&c->dpb2, D);
    take(&c->KdS1, nF), take(&c->XdS2, nD), take(&c->cD, bmax), take(&c->cS, bmax), take(&c->HX1, nn);
    take(&c->HX2, nn), take(&c->dPm1, nn), take(&c->dPm2, nn), take(&c->dCx, nC);
    take(&c->cA, nC), take(&c->cM, nC), take(&c->dMl, bmax + 2), take(&c->dw, bmax);
    take(&c->du, bmax), take(&c->dDv, bmax), take(&c->dc0, bmax), take(&c->red, 3 * (F + D));
  }
  return off;
}

// The two layers' TitansLayer views (ttt_titans_chain.h) over the chain's buffers.
template <typename acc_t>
TTT_HD TitansLayer<acc_t> titans_mlp_layer1(const TitansMLPBuffers<acc_t>& c, int D, int F) {
  return {D, F, c.m.Q, c.m.K, c.m.G1, c.W1c, c.b1c, c.S1, c.sb1, c.QW1, c.QS1, c.m.P1};
}
template <typename acc_t>
TTT_HD TitansLayer<acc_t> titans_mlp_layer2(const TitansMLPBuffers<acc_t>& c, int D, int F) {
  return {F, D, c.m.Xq2, c.m.X2, c.m.G2, c.W2c, c.b2c, c.S2, c.sb2, c.QW2, c.QS2, c.m.P2};
}

// Loads the block and recomputes the coefficients, the key pass at P and both layers' reads
// from P (m.W1..), W_0 and S_0 in c; Xp = LN(Y2) normalised (rstdp).
template <typename scalar_t, typename acc_t>
TTT_HD void titans_mlp_recompute(const TitansMLPParams& p, const TitansMLPBuffers<acc_t>& c,
                                 int D, int F, int bi, int hi, const Segment& g, bool bwd) {
  const int t0 = g.t0, n = g.n, bmax = titans_mlp_block(p.mini_batch_size);
  const int64_t row = (static_cast<int64_t>(bi) * p.H + hi) * p.L + t0;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  const acc_t eps = static_cast<acc_t>(p.eps);
  load_kqt<scalar_t, acc_t>(p, c.m.K, c.m.Q, c.m.T, D, bi, hi, t0, n);
  TTT_PAR_FOR(i, n) {
    c.m.eta[i] = static_cast<const acc_t*>(p.eta)[row + i];
    c.mom[i] = static_cast<const acc_t*>(p.mom)[row + i];
    c.dec[i] = static_cast<const acc_t*>(p.dec)[row + i];
  }
  TTT_SYNC();
  titans_coefs(n, bmax, c.mom, c.dec, c.Cx, c.Mx);
  mlp_keys(c.m, n, D, F, eps, lnw, lnb, bwd);
  titans_read(titans_mlp_layer1(c, D, F), n, bmax, c.Cx, c.m.eta, c.m.Zq1);  // Y1 (n, F)
  mlp_query_gelu(c.m, n, F, bwd);
  TTT_SYNC();
  titans_read(titans_mlp_layer2(c, D, F), n, bmax, c.Cx, c.m.eta, c.m.Xp);  // Y2 (n, D)
  ln_rows<acc_t>(n, D, eps, lnw, lnb, c.m.Xp, c.m.rstdp, nullptr, nullptr, nullptr);
  TTT_SYNC();
}

// Both layers' end updates (titans_layer_update); when the block completes, P <- W_0.
template <typename acc_t>
TTT_HD void titans_mlp_update(const TitansMLPParams& p, const TitansMLPBuffers<acc_t>& c, int D,
                              int F, const Segment& g) {
  const int n = g.n, bmax = titans_mlp_block(p.mini_batch_size), NC = bmax + 2;
  const int last = (n - 1) * NC;
  const acc_t Dl = c.Cx[last + bmax], c0l = c.Cx[last + bmax + 1], ml = c.Mx[last + bmax + 1];
  TTT_PAR_FOR(t, n) { c.cw[t] = c.Cx[last + t] * c.m.eta[t], c.cu[t] = c.Mx[last + t] * c.m.eta[t]; }
  TTT_SYNC();
  titans_layer_update(titans_mlp_layer1(c, D, F), n, Dl, c0l, ml, c.cw, c.cu);
  titans_layer_update(titans_mlp_layer2(c, D, F), n, Dl, c0l, ml, c.cw, c.cu);
  if (g.completes) {
    TTT_PAR_FOR(e, D * F) { c.m.W1[e] = c.W1c[e], c.m.W2[e] = c.W2c[e]; }
    TTT_PAR_FOR(f, F) { c.m.b1[f] = c.b1c[f]; }
    TTT_PAR_FOR(d, D) { c.m.b2[d] = c.b2c[d]; }
    TTT_SYNC();
  }
}

// Copies the chain's P, W_0 and S_0 between the buffers and the [B, H, (nblk,) ...] tensors of
// slot: the start tensors (P W0.., W C0.., S S0..) or the block starts.
template <typename acc_t>
TTT_HD void titans_mlp_copy_starts(const TitansMLPParams& p, const TitansMLPBuffers<acc_t>& c,
                                   int D, int F, int64_t slot, bool to_buffers) {
  mlp_copy(c.m, D, F, slot, to_buffers, p.W_starts, p.b_starts, p.W2_starts, p.b2_starts);
  titans_copy(c.W1c, c.b1c, p.C_starts, p.cb_starts, D, F, slot, to_buffers);
  titans_copy(c.W2c, c.b2c, p.C2_starts, p.cb2_starts, F, D, slot, to_buffers);
  titans_copy(c.S1, c.sb1, p.S_starts, p.sb_starts, D, F, slot, to_buffers);
  titans_copy(c.S2, c.sb2, p.S2_starts, p.sb2_starts, F, D, slot, to_buffers);
}

// Forward of chain (bi, hi): o, the end weights and momentum, each block's P, W_0 and S_0.
template <typename scalar_t, typename acc_t>
TTT_HD void titans_mlp_fwd_chain(const TitansMLPParams& p, acc_t* ws, int D, int F, int bi,
                                 int hi) {
  TitansMLPBuffers<acc_t> c;
  carve_titans_mlp<acc_t>(ws, D, F, titans_mlp_block(p.mini_batch_size), false, &c);
  const int64_t bh = static_cast<int64_t>(bi) * p.H + hi;
  const acc_t* lnw = static_cast<const acc_t*>(p.ln_w) + static_cast<int64_t>(hi) * D;
  const acc_t* lnb = static_cast<const acc_t*>(p.ln_b) + static_cast<int64_t>(hi) * D;
  mlp_copy(c.m, D, F, bh, true, p.W0, p.b0, p.W20, p.b20);
  titans_copy(c.W1c, c.b1c, p.C0, p.cb0, D, F, bh, true);
  titans_copy(c.W2c, c.b2c, p.C20, p.cb20, F, D, bh, true);
  titans_copy(c.S1, c.sb1, p.S0, p.sb0, D, F, bh, true);
  titans_copy(c.S2, c.sb2, p.S20, p.sb20, F, D, bh, true);
  TTT_SYNC();
  const int nblk = titans_mlp_count_blocks(p);
  for (int b = 0; b < nblk; ++b) {
    const Segment g = titans_mlp_block_at(p, b);
    titans_mlp_copy_starts(p, c, D, F, bh * nblk + b, false);
    titans_mlp_recompute<scalar_t, acc_t>(p, c, D, F, bi, hi, g, false);
    scalar_t* o = static_cast<scalar_t*>(p.o) + (bh * p.L + g.t0) * D;
    // o = q + gamma * LN(Y2) + beta (or without q)
    output_rows(p.output_residual, g.n, D, c.m.Q, c.m.Xp, lnw, lnb, o);
    titans_mlp_update(p, c, D, F, g);
  }
  titans_copy(c.W1c, c.b1c, p.W_end, p.b_end, D, F, bh, false);
  titans_copy(c.W2c, c.b2c, p.W2_end, p.b2_end, F, D, bh, false);
  titans_copy(c.S1, c.sb1, p.S_end, p.sb_end, D, F, bh, false);
  titans_copy(c.S2, c.sb2, p.S2_end, p.sb2_end, F, D, bh, false);
}

}  // namespace ttt

#include "ttt_titans_mlp_backward.h"
