// The two options of ttt-core's semantics, each rule written once: the three chains (forward and
// backward) and the single-token step (ttt_step_cpu.cpp) call these. Include it after the schedule
// macros (TTT_HD, TTT_PAR_FOR2: ttt_linear_chain.h defines them).
//   reconstruction_target: the token loss 0.5 ||LN_h(f_W(k_j)) - t_j||^2 has t_j = v_j - k_j
//                          ("residual", the TTT paper) or t_j = v_j ("value", Titans)
//   output_residual:       o_i = q_i + LN_h(f_{W_i}(q_i)) (true) or LN_h(f_{W_i}(q_i)) (false)
#pragma once

namespace ttt {

// The target row t_j of the token loss from v_j and k_j.
template <typename acc_t>
TTT_HD acc_t loss_target(bool value_target, acc_t v, acc_t k) {
  return value_target ? v : v - k;
}

// d/dk_j through the target, from dt = d/dt_j: -dt for t = v - k, 0 for t = v (dv_j = dt).
template <typename acc_t>
TTT_HD acc_t loss_target_dk(bool value_target, acc_t dt) {
  return value_target ? acc_t(0) : -dt;
}

// The output o_i from y_i = LN_h(f_{W_i}(q_i)).
template <typename acc_t>
TTT_HD acc_t output_row(bool output_residual, acc_t q, acc_t y) {
  return output_residual ? q + y : y;
}

// The output rows of a segment, o [n, D], from q [n, D] and x = LN(Z') [n, D] (normalised rows):
// o = q + gamma * x + beta, or gamma * x + beta without the output residual (output_row). Every op
// and the single-token step write their output through it.
template <typename scalar_t, typename acc_t>
TTT_HD void output_rows(bool output_residual, int n, int D, const acc_t* q, const acc_t* x,
                        const acc_t* lnw, const acc_t* lnb, scalar_t* o) {
  TTT_PAR_FOR2(e, i, col, n, D) {
    const acc_t y = lnw[col] * x[e] + lnb[col];
    o[e] = static_cast<scalar_t>(output_row<acc_t>(output_residual, q[e], y));
  }
}

// d/dq_i through the residual of the output, from dO = d/do_i (the path through y is apart).
template <typename acc_t>
TTT_HD acc_t output_dq(bool output_residual, acc_t dO) {
  return output_residual ? dO : acc_t(0);
}

}  // namespace ttt
