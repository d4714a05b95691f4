// C++ CPU implementation of the fused TTT-Linear ops: the chain math of ttt_linear_chain.h run over
// the (batch, head) chains on `threads` threads, one thread per chain (ttt_cpu_chains.h).
#include <stdexcept>
#include <vector>

#include "ttt_cpu_chains.h"
#include "ttt_linear_chain.h"

namespace ttt {

int64_t linear_workspace_elems(int D, int mini_batch_size, bool backward) {
  ChainBuffers<float> c;
  return carve_chain<float>(nullptr, D, mini_batch_size, backward, &c);
}

namespace {
template <typename acc_t, bool kBackward>
void run_cpu(const LinearParams& p, int threads) {
  const int64_t elems = linear_workspace_elems(p.D, p.mini_batch_size, kBackward);
  const double work = 6.0 * p.L * p.D * p.D * (kBackward ? 2.5 : 1.0);
  for_each_chain<acc_t>(p.B, p.H, elems, threads, work, [&](acc_t* ws, int bi, int hi) {
    if (kBackward)
      linear_bwd_chain<acc_t, acc_t>(p, ws, p.D, bi, hi);
    else
      linear_fwd_chain<acc_t, acc_t>(p, ws, p.D, bi, hi);
  });
}

template <bool kBackward>
void dispatch_cpu(int threads, const LinearParams& p) {
  if (p.B < 0 || p.H < 0 || p.L < 1 || p.D < 1 || p.mini_batch_size < 1)
    throw std::invalid_argument("ttt linear (cpu): bad shape parameters");
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal))
    throw std::invalid_argument("ttt linear (cpu): offset must be in [0, mini_batch_size), causal");
  switch (p.dtype) {
    case DType::kFloat32: return run_cpu<float, kBackward>(p, threads);
    case DType::kFloat64: return run_cpu<double, kBackward>(p, threads);
    default: throw std::invalid_argument("ttt linear (cpu): dtype must be float32 or float64");
  }
}
}  // namespace

void linear_fwd_cpu(const LinearParams& p, int threads) { dispatch_cpu<false>(threads, p); }
void linear_bwd_cpu(const LinearParams& p, int threads) { dispatch_cpu<true>(threads, p); }

}  // namespace ttt
