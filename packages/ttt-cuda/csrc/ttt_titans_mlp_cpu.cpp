// The fused Titans-form TTT-MLP chain on the CPU: the math of ttt_titans_mlp_chain.h for one
// (batch, head) chain, compiled once per instruction set (ttt_cpu_isa.h); ttt_cpu.cpp runs the chains.
#include <math.h>

#include <cstdint>
#include <type_traits>

#include "ttt_cpu_isa.h"

TTT_CPU_ISA_BEGIN
#include "ttt_titans_mlp_chain.h"
TTT_CPU_ISA_END

namespace TTT_CPU_NS {

void titans_mlp_chain(const ::ttt::TitansMLPParams& p, void* ws, int bi, int hi, bool backward) {
  with_acc_type(p.dtype, ws, [&](auto* w) {
    using acc_t = std::remove_pointer_t<decltype(w)>;
    if (backward)
      ttt::titans_mlp_bwd_chain<acc_t, acc_t>(p, w, p.D, p.F, bi, hi);
    else
      ttt::titans_mlp_fwd_chain<acc_t, acc_t>(p, w, p.D, p.F, bi, hi);
  });
}

}  // namespace TTT_CPU_NS
