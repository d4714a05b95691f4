// C++ CPU implementation of the fused TTT-MLP ops: the chain math of ttt_mlp_chain.h run serially,
// one (batch, head) chain after the other, with heap scratch.
#include <stdexcept>
#include <vector>

#include "ttt_mlp_chain.h"

namespace ttt {

int64_t mlp_workspace_elems(int D, int F, int mini_batch_size, bool backward) {
  MLPBuffers<float> c;
  return carve_mlp<float>(nullptr, D, F, mini_batch_size, backward, &c);
}

namespace {
template <typename acc_t, bool kBackward>
void run_cpu(const MLPParams& p) {
  std::vector<acc_t> ws(mlp_workspace_elems(p.D, p.F, p.mini_batch_size, kBackward));
  for (int bi = 0; bi < p.B; ++bi)
    for (int hi = 0; hi < p.H; ++hi) {
      if (kBackward)
        mlp_bwd_chain<acc_t, acc_t>(p, ws.data(), p.D, p.F, bi, hi);
      else
        mlp_fwd_chain<acc_t, acc_t>(p, ws.data(), p.D, p.F, bi, hi);
    }
}

template <bool kBackward>
void dispatch_cpu(const MLPParams& p) {
  if (p.B < 0 || p.H < 0 || p.L < 1 || p.D < 1 || p.F < 1 || p.mini_batch_size < 1)
    throw std::invalid_argument("ttt mlp (cpu): bad shape parameters");
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal))
    throw std::invalid_argument("ttt mlp (cpu): offset must be in [0, mini_batch_size), causal");
  if ((p.G0 == nullptr) != (p.G20 == nullptr))
    throw std::invalid_argument("ttt mlp (cpu): grad_sum needs both layers (G0 and G20)");
  switch (p.dtype) {
    case DType::kFloat32: return run_cpu<float, kBackward>(p);
    case DType::kFloat64: return run_cpu<double, kBackward>(p);
    default: throw std::invalid_argument("ttt mlp (cpu): dtype must be float32 or float64");
  }
}
}  // namespace

void mlp_fwd_cpu(const MLPParams& p) { dispatch_cpu<false>(p); }
void mlp_bwd_cpu(const MLPParams& p) { dispatch_cpu<true>(p); }

}  // namespace ttt
