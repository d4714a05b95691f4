// The CPU entry points of all the ops: argument checks, the scratch size, the instruction set
// (AVX2 where the CPU has it and the build carries it, else the portable build: the same bits),
// and the (batch, head) chains spread over `threads` threads (ttt_cpu_chains.h).
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "ttt_cpu_chains.h"
#include "ttt_cpu_isa.h"
#include "ttt_mlp_chain.h"
#include "ttt_titans_chain.h"
#include "ttt_titans_mlp_chain.h"

namespace ttt {

int64_t linear_workspace_elems(int D, int mini_batch_size, bool backward) {
  ChainBuffers<float> c;
  return carve_chain<float>(nullptr, D, mini_batch_size, backward, &c);
}

int64_t mlp_workspace_elems(int D, int F, int mini_batch_size, bool backward) {
  MLPBuffers<float> c;
  return carve_mlp<float>(nullptr, D, F, mini_batch_size, backward, &c);
}

int64_t titans_mlp_workspace_elems(int D, int F, int mini_batch_size, bool backward) {
  TitansMLPBuffers<float> c;
  return carve_titans_mlp<float>(nullptr, D, F, titans_mlp_block(mini_batch_size), backward, &c);
}

int titans_mlp_num_blocks(int L, int mini_batch_size, int offset, bool unbounded) {
  if (mini_batch_size < 1 || offset < 0 || offset >= mini_batch_size)  // the count divides by it
    throw std::invalid_argument(
        "ttt titans_mlp (cpu): mini_batch_size must be >= 1 and offset in [0, mini_batch_size)");
  LinearParams p;
  p.L = L, p.mini_batch_size = mini_batch_size, p.offset = offset, p.unbounded = unbounded;
  return titans_mlp_count_blocks(p);
}

int64_t titans_workspace_elems(int D, int mini_batch_size, bool backward) {
  TitansBuffers<float> c;
  return carve_titans<float>(nullptr, D, mini_batch_size, backward, &c);
}

namespace {
// Whether the entry points may run the AVX2 build: the environment variable TTT_CPU_ISA ("base"
// or "avx2"; unset: "avx2") caps the build they pick, so that the same call can be run on each
// build and compared bit for bit (tests/test_cpu_threads.py).
bool avx2_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("TTT_CPU_ISA");
    const std::string isa = v == nullptr ? "avx2" : v;
    if (isa != "base" && isa != "avx2")
      throw std::invalid_argument("TTT_CPU_ISA must be base or avx2 (or unset), got '" + isa + "'");
    return isa == "avx2";
  }();
  return allowed;
}
}  // namespace

// Whether the CPU entry points run the AVX2 build.
bool cpu_uses_avx2() {
#if defined(TTT_CPU_HAVE_AVX2)
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes && avx2_allowed();
#else
  return false;
#endif
}

// The chain function of the best instruction set this build carries, this CPU runs and
// TTT_CPU_ISA allows.
#if defined(TTT_CPU_HAVE_AVX2)
#define TTT_CPU_CHAIN(name) (cpu_uses_avx2() ? ttt_cpu_avx2::name : ttt_cpu_base::name)
#else
#define TTT_CPU_CHAIN(name) (ttt_cpu_base::name)
#endif

namespace {
template <typename Params>
using ChainFn = void (*)(const Params&, void*, int, int, bool);

void check_common(const LinearParams& p, const char* op, bool causal_only) {
  if (p.B < 0 || p.H < 0 || p.L < 1 || p.D < 1 || p.mini_batch_size < 1)
    throw std::invalid_argument(std::string("ttt ") + op + " (cpu): bad shape parameters");
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal) ||
      (causal_only && !p.causal))
    throw std::invalid_argument(std::string("ttt ") + op +
                                " (cpu): offset must be in [0, mini_batch_size), causal");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat64)
    throw std::invalid_argument(std::string("ttt ") + op + " (cpu): dtype must be float32 or float64");
}

// The large outputs a call writes once, front to back (the forward's per-segment start weights:
// nseg copies of the weights, and o; the backward's dq, dk, dv), are fresh torch allocations
// each call, so the chains' first touch page-faults every 4 KB of them: for TTT-MLP at B=2, H=4,
// L=2048, D=64 that is 134 MB of start weights per forward. Asking for transparent huge pages
// (Linux; the kernel's default "madvise" mode grants them only on request) makes that one fault
// per 2 MB. A hint only: no result depends on it, and where it is refused nothing changes.
void advise_huge_pages(const void* ptr, int64_t elems, DType dtype) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096;
  const int64_t bytes = elems * (dtype == DType::kFloat64 ? 8 : 4);
  if (ptr == nullptr || bytes < (int64_t{2} << 20)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr, (void)elems, (void)dtype;
#endif
}

// advise_huge_pages for the forward's o and start weights W_starts [B, H, nseg, D, Dw] (Dw = D,
// or F for TTT-MLP's layer 1), or the backward's dq, dk, dv: [B, H, L, D] each.
void advise_outputs(const LinearParams& p, bool backward, int64_t Dw) {
  const int64_t BHLD = static_cast<int64_t>(p.B) * p.H * p.L * p.D;
  if (backward) {
    for (const void* t : {p.dq, p.dk, p.dv}) advise_huge_pages(t, BHLD, p.dtype);
    return;
  }
  advise_huge_pages(p.o, BHLD, p.dtype);
  advise_huge_pages(p.W_starts, static_cast<int64_t>(p.B) * p.H * p.num_segments() * p.D * Dw, p.dtype);
}

template <typename Params>
void run(const Params& p, ChainFn<Params> chain, int64_t elems, double flops_per_chain,
         int threads, bool backward) {
  auto each = [&](auto* ws, int bi, int hi) { chain(p, ws, bi, hi, backward); };
  if (p.dtype == DType::kFloat64)
    for_each_chain<double>(p.B, p.H, elems, threads, flops_per_chain, each);
  else
    for_each_chain<float>(p.B, p.H, elems, threads, flops_per_chain, each);
}
}  // namespace

void linear_fwd_cpu(const LinearParams& p, int threads) {
  check_common(p, "linear", false);
  advise_outputs(p, false, p.D);
  run(p, TTT_CPU_CHAIN(linear_chain),
      linear_workspace_elems(p.D, p.mini_batch_size, false), 8.0 * p.L * p.D * p.D, threads, false);
}
void linear_bwd_cpu(const LinearParams& p, int threads) {
  check_common(p, "linear", false);
  advise_outputs(p, true, p.D);
  run(p, TTT_CPU_CHAIN(linear_chain),
      linear_workspace_elems(p.D, p.mini_batch_size, true), 20.0 * p.L * p.D * p.D, threads, true);
}

void mlp_fwd_cpu(const MLPParams& p, int threads) {
  check_common(p, "mlp", false);
  if (p.F < 1) throw std::invalid_argument("ttt mlp (cpu): bad shape parameters");
  if ((p.G0 == nullptr) != (p.G20 == nullptr))
    throw std::invalid_argument("ttt mlp (cpu): grad_sum needs both layers (G0 and G20)");
  advise_outputs(p, false, p.F);
  advise_huge_pages(p.W2_starts, static_cast<int64_t>(p.B) * p.H * p.num_segments() * p.F * p.D, p.dtype);
  run(p, TTT_CPU_CHAIN(mlp_chain),
      mlp_workspace_elems(p.D, p.F, p.mini_batch_size, false), 16.0 * p.L * p.D * p.F, threads,
      false);
}
void mlp_bwd_cpu(const MLPParams& p, int threads) {
  check_common(p, "mlp", false);
  if (p.F < 1) throw std::invalid_argument("ttt mlp (cpu): bad shape parameters");
  if ((p.G0 == nullptr) != (p.G20 == nullptr))
    throw std::invalid_argument("ttt mlp (cpu): grad_sum needs both layers (G0 and G20)");
  advise_outputs(p, true, p.F);
  run(p, TTT_CPU_CHAIN(mlp_chain),
      mlp_workspace_elems(p.D, p.F, p.mini_batch_size, true), 40.0 * p.L * p.D * p.F, threads, true);
}

void titans_mlp_fwd_cpu(const TitansMLPParams& p, int threads) {
  check_common(p, "titans_mlp", true);
  if (p.F < 1) throw std::invalid_argument("ttt titans_mlp (cpu): bad shape parameters");
  run(p, TTT_CPU_CHAIN(titans_mlp_chain),
      titans_mlp_workspace_elems(p.D, p.F, p.mini_batch_size, false), 20.0 * p.L * p.D * p.F,
      threads, false);
}
void titans_mlp_bwd_cpu(const TitansMLPParams& p, int threads) {
  check_common(p, "titans_mlp", true);
  if (p.F < 1) throw std::invalid_argument("ttt titans_mlp (cpu): bad shape parameters");
  run(p, TTT_CPU_CHAIN(titans_mlp_chain),
      titans_mlp_workspace_elems(p.D, p.F, p.mini_batch_size, true), 50.0 * p.L * p.D * p.F,
      threads, true);
}

void titans_fwd_cpu(const TitansParams& p, int threads) {
  check_common(p, "titans", true);
  advise_outputs(p, false, p.D);
  advise_huge_pages(p.S_starts, static_cast<int64_t>(p.B) * p.H * p.num_segments() * p.D * p.D, p.dtype);
  run(p, TTT_CPU_CHAIN(titans_chain),
      titans_workspace_elems(p.D, p.mini_batch_size, false), 10.0 * p.L * p.D * p.D, threads,
      false);
}
void titans_bwd_cpu(const TitansParams& p, int threads) {
  check_common(p, "titans", true);
  advise_outputs(p, true, p.D);
  run(p, TTT_CPU_CHAIN(titans_chain),
      titans_workspace_elems(p.D, p.mini_batch_size, true), 25.0 * p.L * p.D * p.D, threads, true);
}

}  // namespace ttt
