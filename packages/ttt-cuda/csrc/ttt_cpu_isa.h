// The CPU chain entry points, built once per instruction set: each ttt_<op>_cpu.cpp is compiled
// with TTT_CPU_NS = ttt_cpu_base (the portable x86-64 / any-CPU build) and, where CMake enables
// it, again with TTT_CPU_NS = ttt_cpu_avx2 (-mavx2); ttt_cpu.cpp picks one at run time. The two
// give the same bits (ttt_products.h: vector lanes round as scalar code, no contraction).
// Declarations only: the ISA builds contain the chain math and nothing else (no standard-library
// templates whose AVX2 copies the linker could pick for the portable build).
#pragma once
#include "ttt_params.h"

// Runs chain (bi, hi) of one op, forward or backward, with the chain's scratch `ws` (float or
// double: the acc type of p.dtype, float32 or float64 inputs).
#define TTT_DECLARE_CPU_CHAINS(ns)                                                         \
  namespace ns {                                                                           \
  void linear_chain(const ::ttt::LinearParams& p, void* ws, int bi, int hi, bool backward); \
  void mlp_chain(const ::ttt::MLPParams& p, void* ws, int bi, int hi, bool backward);       \
  void titans_chain(const ::ttt::TitansParams& p, void* ws, int bi, int hi, bool backward); \
  void titans_mlp_chain(const ::ttt::TitansMLPParams& p, void* ws, int bi, int hi,          \
                        bool backward);                                                     \
  }

TTT_DECLARE_CPU_CHAINS(ttt_cpu_base)
TTT_DECLARE_CPU_CHAINS(ttt_cpu_avx2)

// Opens the ISA build's namespace around a chain header (the header then defines
// TTT_CPU_NS::ttt::..., distinct symbols per ISA).
#define TTT_CPU_ISA_BEGIN           \
  namespace TTT_CPU_NS {            \
  namespace ttt {                   \
  using ::ttt::DType;               \
  using ::ttt::LinearParams;        \
  using ::ttt::MLPParams;           \
  using ::ttt::TitansParams;        \
  using ::ttt::TitansMLPParams;     \
  }
#define TTT_CPU_ISA_END }

// Calls chain(ws) with the scratch typed as the acc type of `dtype` (double for float64 inputs,
// float for float32): the one dtype switch of the ops' chain entry points.
template <typename Chain>
inline void with_acc_type(::ttt::DType dtype, void* ws, Chain chain) {
  if (dtype == ::ttt::DType::kFloat64)
    chain(static_cast<double*>(ws));
  else
    chain(static_cast<float*>(ws));
}
