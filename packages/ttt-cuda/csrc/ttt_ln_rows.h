// Row-wise LayerNorm pieces shared by the three chains: the forward LN / LN-loss gradient of n
// rows of D columns and their backward. Include it after the schedule macros (TTT_HD,
// TTT_PAR_FOR: ttt_linear_chain.h defines them) and ttt_products.h (TTT_ROW_SCHEDULE).
//
// Each row's sums run over d = 0, 1, ... in order. On the GPU (and the CPU block check) a thread
// takes one row; on the CPU a group of kRowGroup rows is computed side by side (the r loops
// below), so the core overlaps the rows' independent add chains instead of waiting on one. Every
// row still sees the same operations in the same order, so both schedules give the same bits.
#pragma once

namespace ttt {

TTT_HD float rsqrt_acc(float x) { return 1.0f / sqrtf(x); }
TTT_HD double rsqrt_acc(double x) { return 1.0 / sqrt(x); }

#if TTT_ROW_SCHEDULE
constexpr int kRowGroup = 8;
#else
constexpr int kRowGroup = 1;
#endif

// Runs group<R>(i0) over the n rows: groups of kRowGroup rows, then the rest one by one.
template <typename Group>
TTT_HD void for_row_groups(int n, Group group) {
  const int full = n / kRowGroup;
  TTT_PAR_FOR(gi, full) { group.template run<kRowGroup>(gi * kRowGroup); }
  TTT_PAR_FOR(i, n - full * kRowGroup) { group.template run<1>(full * kRowGroup + i); }
}

// Rows of `x` [n, D] normalised in place (x <- (x - mu) rstd), rstd stored; with `tgt`, also the
// LN-loss gradient G = d l / d z (and U = gamma (gamma x + beta - t) when U is given):
//   U = gamma * (gamma * X + beta - T),  G = rstd * (U - mean(U) - X * mean(U * X))
template <typename acc_t>
struct LnRows {
  int D;
  acc_t eps;
  const acc_t *lnw, *lnb;
  acc_t *x, *rstd;
  const acc_t* tgt;
  acc_t *G, *U;

  template <int R>
  TTT_HD void run(int i0) const {
    const acc_t invD = acc_t(1) / static_cast<acc_t>(D);
    acc_t mu[R], var[R], rs[R];
    for (int r = 0; r < R; ++r) mu[r] = 0, var[r] = 0;
    acc_t* xr = x + static_cast<int64_t>(i0) * D;
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < R; ++r) mu[r] += xr[r * D + d];
    for (int r = 0; r < R; ++r) mu[r] *= invD;
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < R; ++r) var[r] += (xr[r * D + d] - mu[r]) * (xr[r * D + d] - mu[r]);
    for (int r = 0; r < R; ++r) rs[r] = rsqrt_acc(var[r] * invD + eps), rstd[i0 + r] = rs[r];
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < D; ++d) xr[r * D + d] = (xr[r * D + d] - mu[r]) * rs[r];
    if (tgt == nullptr) return;
    const acc_t* tr = tgt + static_cast<int64_t>(i0) * D;
    acc_t* g = G + static_cast<int64_t>(i0) * D;
    acc_t mu_u[R], mu_ux[R];
    for (int r = 0; r < R; ++r) mu_u[r] = 0, mu_ux[r] = 0;
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < R; ++r) {
        const int e = r * D + d;
        const acc_t u = lnw[d] * (lnw[d] * xr[e] + lnb[d] - tr[e]);
        g[e] = u;
        mu_u[r] += u;
        mu_ux[r] += u * xr[e];
      }
    for (int r = 0; r < R; ++r) mu_u[r] *= invD, mu_ux[r] *= invD;
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < D; ++d) {
        const int e = r * D + d;
        if (U != nullptr) U[static_cast<int64_t>(i0) * D + e] = g[e];
        g[e] = rs[r] * (g[e] - mu_u[r] - xr[e] * mu_ux[r]);
      }
  }
};

template <typename acc_t>
TTT_HD void ln_rows(int n, int D, acc_t eps, const acc_t* lnw, const acc_t* lnb, acc_t* x,
                    acc_t* rstd, const acc_t* tgt, acc_t* G, acc_t* U) {
  for_row_groups(n, LnRows<acc_t>{D, eps, lnw, lnb, x, rstd, tgt, G, U});
}

// Backward of ln_rows with a target: given dG (rows d/dG), writes dZ (d/dZ of the rows that were
// normalised into x) and dU over U. x, G, U, rstd as ln_rows left them.
//   G = rstd (U - mean U - X mean(U X)), U = gamma (gamma X + beta - T), X = LN(Z)
template <typename acc_t>
struct LnLossGradBwdRows {
  int D;
  const acc_t *lnw, *x, *G, *rstd, *dG;
  acc_t *U, *dZ;

  template <int R>
  TTT_HD void run(int i0) const {
    const acc_t invD = acc_t(1) / static_cast<acc_t>(D);
    const int64_t o = static_cast<int64_t>(i0) * D;
    const acc_t *dg = dG + o, *xr = x + o, *gg = G + o;
    acc_t *u = U + o, *dz = dZ + o;
    acc_t m1[R], m2[R], xu[R], gdg[R], m3[R], m4[R];
    for (int r = 0; r < R; ++r) m1[r] = 0, m2[r] = 0, xu[r] = 0, gdg[r] = 0, m3[r] = 0, m4[r] = 0;
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < R; ++r) {
        const int e = r * D + d;
        m1[r] += dg[e], m2[r] += dg[e] * xr[e], xu[r] += xr[e] * u[e], gdg[r] += gg[e] * dg[e];
      }
    for (int r = 0; r < R; ++r) m1[r] *= invD, m2[r] *= invD;
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < R; ++r) {
        const int e = r * D + d;
        const acc_t rs = rstd[i0 + r], xdg = m2[r] * static_cast<acc_t>(D);
        const acc_t du = rs * (dg[e] - m1[r] - xr[e] * m2[r]);
        const acc_t dx = -(rs * invD) * (xu[r] * dg[e] + xdg * u[e]) + lnw[d] * lnw[d] * du;
        u[e] = du, dz[e] = dx;
        m3[r] += dx, m4[r] += dx * xr[e];
      }
    for (int r = 0; r < R; ++r) m3[r] *= invD, m4[r] *= invD;
    for (int r = 0; r < R; ++r) {
      const acc_t rs = rstd[i0 + r];
      const acc_t dsig = -rs * gdg[r];  // d/d sigma, sigma = 1/rstd
      for (int d = 0; d < D; ++d) {
        const int e = r * D + d;
        dz[e] = rs * (dz[e] - m3[r] - xr[e] * m4[r]) + dsig * xr[e] * invD;
      }
    }
  }
};

template <typename acc_t>
TTT_HD void ln_loss_grad_bwd_rows(int n, int D, const acc_t* lnw, const acc_t* x, const acc_t* G,
                                  const acc_t* rstd, const acc_t* dG, acc_t* U, acc_t* dZ) {
  for_row_groups(n, LnLossGradBwdRows<acc_t>{D, lnw, x, G, rstd, dG, U, dZ});
}

// out[i] = (out[i] if accumulate, else 0) + sum_c A[i, c] B[i, c] for the n rows of two [n, C]
// tiles, each row's terms added in order of c; on the CPU kRowGroup rows side by side, so their
// add chains overlap (the same bits as one row at a time).
template <typename acc_t>
struct RowDots {
  int C;
  const acc_t *A, *B;
  acc_t* out;
  bool accumulate;

  template <int R>
  TTT_HD void run(int i0) const {
    acc_t s[R];
    for (int r = 0; r < R; ++r) s[r] = accumulate ? out[i0 + r] : acc_t(0);
    const int64_t o = static_cast<int64_t>(i0) * C;
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) s[r] += A[o + r * C + c] * B[o + r * C + c];
    for (int r = 0; r < R; ++r) out[i0 + r] = s[r];
  }
};

template <typename acc_t>
TTT_HD void row_dots(int n, int C, const acc_t* A, const acc_t* B, acc_t* out, bool accumulate) {
  for_row_groups(n, RowDots<acc_t>{C, A, B, out, accumulate});
}

// d gamma, d beta of the LN loss through U = gamma (gamma X + beta - T), from dU (what
// ln_loss_grad_bwd_rows leaves over U), accumulated per column over the n rows in order:
//   d gamma += sum_i dU_i (2 gamma X_i + beta - T_i),  d beta += sum_i dU_i gamma
template <typename acc_t>
TTT_HD void ln_loss_param_grads(int n, int D, const acc_t* lnw, const acc_t* lnb, const acc_t* X,
                                const acc_t* T, const acc_t* dU, acc_t* dlnw, acc_t* dlnb) {
  TTT_PAR_FOR(col, D) {
    acc_t sw = 0, sb = 0;
    for (int i = 0; i < n; ++i) {
      const int e = i * D + col;
      sw += dU[e] * (acc_t(2) * lnw[col] * X[e] + lnb[col] - T[e]);
      sb += dU[e] * lnw[col];
    }
    dlnw[col] += sw, dlnb[col] += sb;
  }
}

// Backward of the output LN: DZ = d/dZ' of gamma * LN(Z') + beta for upstream dO (rows of x =
// LN(Z') normalised, rstd their 1/sigma).
template <typename acc_t>
struct LnOutBwdRows {
  int D;
  const acc_t *lnw, *x, *rstd, *dO;
  acc_t* DZ;

  template <int R>
  TTT_HD void run(int i0) const {
    const acc_t invD = acc_t(1) / static_cast<acc_t>(D);
    const int64_t o = static_cast<int64_t>(i0) * D;
    const acc_t *xr = x + o, *g = dO + o;
    acc_t m1[R], m2[R];
    for (int r = 0; r < R; ++r) m1[r] = 0, m2[r] = 0;
    for (int d = 0; d < D; ++d)
      for (int r = 0; r < R; ++r) {
        const int e = r * D + d;
        m1[r] += g[e] * lnw[d], m2[r] += g[e] * lnw[d] * xr[e];
      }
    for (int r = 0; r < R; ++r) m1[r] *= invD, m2[r] *= invD;
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < D; ++d) {
        const int e = r * D + d;
        DZ[o + e] = rstd[i0 + r] * (g[e] * lnw[d] - m1[r] - xr[e] * m2[r]);
      }
  }
};

template <typename acc_t>
TTT_HD void ln_out_bwd_rows(int n, int D, const acc_t* lnw, const acc_t* x, const acc_t* rstd,
                            const acc_t* dO, acc_t* DZ) {
  for_row_groups(n, LnOutBwdRows<acc_t>{D, lnw, x, rstd, dO, DZ});
}

}  // namespace ttt
