// C++ CPU implementation of the fused TTT-MLP ops: the chain math of ttt_mlp_chain.h run over
// the (batch, head) chains on `threads` threads, one thread per chain (ttt_cpu_chains.h).
#include <stdexcept>
#include <vector>

#include "ttt_cpu_chains.h"
#include "ttt_mlp_chain.h"

namespace ttt {

int64_t mlp_workspace_elems(int D, int F, int mini_batch_size, bool backward) {
  MLPBuffers<float> c;
  return carve_mlp<float>(nullptr, D, F, mini_batch_size, backward, &c);
}

namespace {
template <typename acc_t, bool kBackward>
void run_cpu(const MLPParams& p, int threads) {
  const int64_t elems = mlp_workspace_elems(p.D, p.F, p.mini_batch_size, kBackward);
  const double work = 12.0 * p.L * p.D * p.F * (kBackward ? 2.5 : 1.0);
  for_each_chain<acc_t>(p.B, p.H, elems, threads, work, [&](acc_t* ws, int bi, int hi) {
    if (kBackward)
      mlp_bwd_chain<acc_t, acc_t>(p, ws, p.D, p.F, bi, hi);
    else
      mlp_fwd_chain<acc_t, acc_t>(p, ws, p.D, p.F, bi, hi);
  });
}

template <bool kBackward>
void dispatch_cpu(int threads, const MLPParams& p) {
  if (p.B < 0 || p.H < 0 || p.L < 1 || p.D < 1 || p.F < 1 || p.mini_batch_size < 1)
    throw std::invalid_argument("ttt mlp (cpu): bad shape parameters");
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal))
    throw std::invalid_argument("ttt mlp (cpu): offset must be in [0, mini_batch_size), causal");
  if ((p.G0 == nullptr) != (p.G20 == nullptr))
    throw std::invalid_argument("ttt mlp (cpu): grad_sum needs both layers (G0 and G20)");
  switch (p.dtype) {
    case DType::kFloat32: return run_cpu<float, kBackward>(p, threads);
    case DType::kFloat64: return run_cpu<double, kBackward>(p, threads);
    default: throw std::invalid_argument("ttt mlp (cpu): dtype must be float32 or float64");
  }
}
}  // namespace

void mlp_fwd_cpu(const MLPParams& p, int threads) { dispatch_cpu<false>(threads, p); }
void mlp_bwd_cpu(const MLPParams& p, int threads) { dispatch_cpu<true>(threads, p); }

}  // namespace ttt
