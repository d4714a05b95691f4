// Row-wise LayerNorm pieces shared by the TTT-MLP and Titans chains (the TTT-Linear chain inlines
// the same arithmetic): the forward LN / LN-loss gradient of n rows and its backward.
#pragma once
#include "ttt_linear_chain.h"

namespace ttt {

// Rows of `x` [n, D] normalised in place (x <- (x - mu) rstd), rstd stored; with `tgt`, also the
// LN-loss gradient G (and U = gamma (gamma x + beta - t) when U is given), as ttt_linear_chain.h.
template <typename acc_t>
TTT_HD void ln_rows(int n, int D, acc_t eps, const acc_t* lnw, const acc_t* lnb, acc_t* x,
                    acc_t* rstd, const acc_t* tgt, acc_t* G, acc_t* U) {
  const acc_t invD = acc_t(1) / static_cast<acc_t>(D);
  TTT_PAR_FOR(i, n) {
    acc_t* r = x + i * D;
    acc_t mu = 0, var = 0;
    for (int d = 0; d < D; ++d) mu += r[d];
    mu *= invD;
    for (int d = 0; d < D; ++d) var += (r[d] - mu) * (r[d] - mu);
    const acc_t rs = rsqrt_acc(var * invD + eps);
    rstd[i] = rs;
    for (int d = 0; d < D; ++d) r[d] = (r[d] - mu) * rs;
    if (tgt != nullptr) {
      acc_t* g = G + i * D;
      acc_t mu_u = 0, mu_ux = 0;
      for (int d = 0; d < D; ++d) {
        const acc_t u = lnw[d] * (lnw[d] * r[d] + lnb[d] - tgt[i * D + d]);
        g[d] = u;
        mu_u += u;
        mu_ux += u * r[d];
      }
      mu_u *= invD, mu_ux *= invD;
      for (int d = 0; d < D; ++d) {
        if (U != nullptr) U[i * D + d] = g[d];
        g[d] = rs * (g[d] - mu_u - r[d] * mu_ux);
      }
    }
  }
}

// Backward of ln_rows with a target: given dG (rows d/dG), writes dZ (d/dZ of the rows that were
// normalised into x) and dU over U. x, G, U, rstd as ln_rows left them.
//   G = rstd (U - mean U - X mean(U X)), U = gamma (gamma X + beta - T), X = LN(Z)
template <typename acc_t>
TTT_HD void ln_loss_grad_bwd_rows(int n, int D, const acc_t* lnw, const acc_t* x, const acc_t* G,
                                  const acc_t* rstd, const acc_t* dG, acc_t* U, acc_t* dZ) {
  const acc_t invD = acc_t(1) / static_cast<acc_t>(D);
  TTT_PAR_FOR(i, n) {
    const acc_t* dg = dG + i * D;
    const acc_t* xr = x + i * D;
    const acc_t* gg = G + i * D;
    acc_t* u = U + i * D;
    acc_t* dz = dZ + i * D;
    const acc_t rs = rstd[i];
    acc_t m1 = 0, m2 = 0, xu = 0, gdg = 0;
    for (int d = 0; d < D; ++d) m1 += dg[d], m2 += dg[d] * xr[d], xu += xr[d] * u[d], gdg += gg[d] * dg[d];
    m1 *= invD, m2 *= invD;
    const acc_t xdg = m2 * static_cast<acc_t>(D);
    acc_t m3 = 0, m4 = 0;
    for (int d = 0; d < D; ++d) {
      const acc_t du = rs * (dg[d] - m1 - xr[d] * m2);
      const acc_t dx = -(rs * invD) * (xu * dg[d] + xdg * u[d]) + lnw[d] * lnw[d] * du;
      u[d] = du, dz[d] = dx;
      m3 += dx, m4 += dx * xr[d];
    }
    m3 *= invD, m4 *= invD;
    const acc_t dsig = -rs * gdg;  // d/d sigma, sigma = 1/rstd
    for (int d = 0; d < D; ++d) dz[d] = rs * (dz[d] - m3 - xr[d] * m4) + dsig * xr[d] * invD;
  }
}

// Backward of the output LN: DZ = d/dZ' of gamma * LN(Z') + beta for upstream dO (rows of x =
// LN(Z') normalised, rstd their 1/sigma).
template <typename acc_t>
TTT_HD void ln_out_bwd_rows(int n, int D, const acc_t* lnw, const acc_t* x, const acc_t* rstd,
                            const acc_t* dO, acc_t* DZ) {
  const acc_t invD = acc_t(1) / static_cast<acc_t>(D);
  TTT_PAR_FOR(i, n) {
    const acc_t* xr = x + i * D;
    const acc_t* g = dO + i * D;
    acc_t m1 = 0, m2 = 0;
    for (int d = 0; d < D; ++d) m1 += g[d] * lnw[d], m2 += g[d] * lnw[d] * xr[d];
    m1 *= invD, m2 *= invD;
    for (int d = 0; d < D; ++d) DZ[i * D + d] = rstd[i] * (g[d] * lnw[d] - m1 - xr[d] * m2);
  }
}

}  // namespace ttt
