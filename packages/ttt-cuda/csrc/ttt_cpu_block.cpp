// A CPU check of the GPU kernels' phase structure: the chain math of ttt_linear_chain.h and
// ttt_mlp_chain.h (and the Titans chains) run by T real threads per chain, with TTT_PAR_FOR strided over them (random
// yields to shuffle their interleaving) and TTT_SYNC a barrier, exactly as the CUDA block runs it. Every output element is
// computed by one thread in a fixed order, so the result must equal the serial run bit for bit;
// a missing __syncthreads (a read of a value another thread writes in the same phase) shows up as
// a mismatch. Used by the tests only; it is slow.
#include <math.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "ttt_params.h"

namespace ttt_block {

struct Barrier {
  explicit Barrier(int n) : n(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m);
    const int64_t g = generation;
    if (++count == n) {
      count = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != g; });
    }
  }
  std::mutex m;
  std::condition_variable cv;
  int n, count = 0;
  int64_t generation = 0;
};

thread_local int tid = 0;
thread_local int nt = 1;
thread_local Barrier* barrier = nullptr;
thread_local uint32_t rng = 1;

inline void sync() { barrier->wait(); }
inline void maybe_yield() {
  rng ^= rng << 13, rng ^= rng >> 17, rng ^= rng << 5;  // xorshift32
  if ((rng & 7u) == 0u) std::this_thread::yield();
}

namespace ttt {
using ::ttt::DType;
using ::ttt::LinearParams;
using ::ttt::MLPParams;
using ::ttt::TitansParams;
using ::ttt::TitansMLPParams;
}  // namespace ttt

#define TTT_EMULATE_BLOCK
#include "ttt_linear_chain.h"
#include "ttt_mlp_chain.h"
#include "ttt_titans_chain.h"
#include "ttt_titans_mlp_chain.h"

}  // namespace ttt_block

namespace ttt {

namespace {
// Runs chain(bi, hi, ws) on `threads` threads with a barrier, chain after chain.
template <typename acc_t, typename Chain>
void run_block(const LinearParams& p, int64_t elems, int threads, Chain chain) {
  for (int bi = 0; bi < p.B; ++bi)
    for (int hi = 0; hi < p.H; ++hi) {
      std::vector<acc_t> ws(elems);
      ttt_block::Barrier bar(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          ttt_block::tid = t, ttt_block::nt = threads, ttt_block::barrier = &bar;
          ttt_block::rng = 2654435761u * static_cast<uint32_t>(t + 1 + 7 * (bi * p.H + hi));
          chain(ws.data(), bi, hi);
        });
      for (auto& th : pool) th.join();
    }
}

template <typename acc_t>
void linear_block(const LinearParams& p, bool backward, int threads) {
  const int64_t elems = linear_workspace_elems(p.D, p.mini_batch_size, backward);
  run_block<acc_t>(p, elems, threads, [&](acc_t* ws, int bi, int hi) {
    if (backward)
      ttt_block::ttt::linear_bwd_chain<acc_t, acc_t>(p, ws, p.D, bi, hi);
    else
      ttt_block::ttt::linear_fwd_chain<acc_t, acc_t>(p, ws, p.D, bi, hi);
  });
}

template <typename acc_t>
void mlp_block(const MLPParams& p, bool backward, int threads) {
  const int64_t elems = mlp_workspace_elems(p.D, p.F, p.mini_batch_size, backward);
  run_block<acc_t>(p, elems, threads, [&](acc_t* ws, int bi, int hi) {
    if (backward)
      ttt_block::ttt::mlp_bwd_chain<acc_t, acc_t>(p, ws, p.D, p.F, bi, hi);
    else
      ttt_block::ttt::mlp_fwd_chain<acc_t, acc_t>(p, ws, p.D, p.F, bi, hi);
  });
}

template <typename acc_t>
void titans_block(const TitansParams& p, bool backward, int threads) {
  const int64_t elems = titans_workspace_elems(p.D, p.mini_batch_size, backward);
  run_block<acc_t>(p, elems, threads, [&](acc_t* ws, int bi, int hi) {
    if (backward)
      ttt_block::ttt::titans_bwd_chain<acc_t, acc_t>(p, ws, p.D, bi, hi);
    else
      ttt_block::ttt::titans_fwd_chain<acc_t, acc_t>(p, ws, p.D, bi, hi);
  });
}

template <typename acc_t>
void titans_mlp_block(const TitansMLPParams& p, bool backward, int threads) {
  const int64_t elems = titans_mlp_workspace_elems(p.D, p.F, p.mini_batch_size, backward);
  run_block<acc_t>(p, elems, threads, [&](acc_t* ws, int bi, int hi) {
    if (backward)
      ttt_block::ttt::titans_mlp_bwd_chain<acc_t, acc_t>(p, ws, p.D, p.F, bi, hi);
    else
      ttt_block::ttt::titans_mlp_fwd_chain<acc_t, acc_t>(p, ws, p.D, p.F, bi, hi);
  });
}
}  // namespace

void linear_cpu_block(const LinearParams& p, bool backward, int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  switch (p.dtype) {
    case DType::kFloat32: return linear_block<float>(p, backward, threads);
    case DType::kFloat64: return linear_block<double>(p, backward, threads);
    default: throw std::invalid_argument("ttt linear (cpu): dtype must be float32 or float64");
  }
}

void mlp_cpu_block(const MLPParams& p, bool backward, int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  switch (p.dtype) {
    case DType::kFloat32: return mlp_block<float>(p, backward, threads);
    case DType::kFloat64: return mlp_block<double>(p, backward, threads);
    default: throw std::invalid_argument("ttt mlp (cpu): dtype must be float32 or float64");
  }
}

void titans_cpu_block(const TitansParams& p, bool backward, int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  switch (p.dtype) {
    case DType::kFloat32: return titans_block<float>(p, backward, threads);
    case DType::kFloat64: return titans_block<double>(p, backward, threads);
    default: throw std::invalid_argument("ttt titans (cpu): dtype must be float32 or float64");
  }
}

void titans_mlp_cpu_block(const TitansMLPParams& p, bool backward, int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  switch (p.dtype) {
    case DType::kFloat32: return titans_mlp_block<float>(p, backward, threads);
    case DType::kFloat64: return titans_mlp_block<double>(p, backward, threads);
    default: throw std::invalid_argument("ttt titans_mlp (cpu): dtype must be float32 or float64");
  }
}

}  // namespace ttt
