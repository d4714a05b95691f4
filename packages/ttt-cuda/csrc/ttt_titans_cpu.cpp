// The fused Titans-form TTT-Linear chain on the CPU: the math of ttt_titans_chain.h for one (batch, head)
// chain, compiled once per instruction set (ttt_cpu_isa.h); ttt_cpu.cpp runs the chains.
#include <math.h>

#include <cstdint>

#include "ttt_cpu_isa.h"

TTT_CPU_ISA_BEGIN
#include "ttt_titans_chain.h"
TTT_CPU_ISA_END

namespace TTT_CPU_NS {

void titans_chain(const ::ttt::TitansParams& p, void* ws, int bi, int hi, bool backward) {
  if (p.dtype == ::ttt::DType::kFloat64) {
    double* w = static_cast<double*>(ws);
    if (backward)
      ttt::titans_bwd_chain<double, double>(p, w, p.D, bi, hi);
    else
      ttt::titans_fwd_chain<double, double>(p, w, p.D, bi, hi);
  } else {
    float* w = static_cast<float*>(ws);
    if (backward)
      ttt::titans_bwd_chain<float, float>(p, w, p.D, bi, hi);
    else
      ttt::titans_fwd_chain<float, float>(p, w, p.D, bi, hi);
  }
}

}  // namespace TTT_CPU_NS
