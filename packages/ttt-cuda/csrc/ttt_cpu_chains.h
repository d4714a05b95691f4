// The CPU runner every op shares: the (batch, head) chains of a call spread over `threads` worker
// threads, each chain computed start to end by one thread with that thread's scratch. A chain's
// result depends only on its inputs (the scratch is fully written before it is read), so the
// output is bit-identical whatever the thread count.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace ttt {

// Runs chain(workspace, bi, hi) for bi < B, hi < H. `work_per_chain` (a rough flop count) keeps
// tiny calls (a streaming token) on the calling thread: starting a thread costs ~10-50 us.
template <typename acc_t, typename Chain>
void for_each_chain(int B, int H, int64_t workspace_elems, int threads, double work_per_chain,
                    Chain chain) {
  const int64_t chains = static_cast<int64_t>(B) * H;
  constexpr double kMinWorkPerThread = 2e6;  // flops worth a thread start
  const double total = work_per_chain * static_cast<double>(chains);
  int64_t n = std::min<int64_t>(std::max(threads, 1), chains);
  n = std::min<int64_t>(n, std::max<int64_t>(1, static_cast<int64_t>(total / kMinWorkPerThread)));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    std::vector<acc_t> ws(workspace_elems);
    for (int64_t c = next++; c < chains; c = next++)
      chain(ws.data(), static_cast<int>(c / H), static_cast<int>(c % H));
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {  // no thread to be had (EAGAIN): fewer, the same bits
      break;                              // (unwinding past the started ones would terminate)
    }
  }
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace ttt
