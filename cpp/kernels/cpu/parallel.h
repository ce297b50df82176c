// A minimal fork-join loop over std::thread for the CPU kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

namespace jax_msa::cpu {

// Threads a parallel loop may use: JAX_MSA_CPU_THREADS when it holds a
// positive integer, else the hardware concurrency. Read at every call so that
// the setting can change between calls (tests, benchmarks).
inline int64_t num_threads() {
  if (const char* env = std::getenv("JAX_MSA_CPU_THREADS")) {
    char* end = nullptr;
    const long value = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && value > 0) return std::min<long>(value, 1024);
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? hardware : 1;
}

// Calls fn(begin, end) on disjoint chunks covering [0, n), from the calling
// thread and up to num_threads() - 1 helpers. Chunks are handed out on demand
// (work items of the kernels have very uneven costs, e.g. causal masks), so
// fn must not depend on which thread runs a chunk. Uses at most one thread
// per `grain` items, so it runs inline when n <= grain (or with one thread).
// An exception thrown by fn stops
// the hand-out and the first one is rethrown here once every thread joined;
// if a thread cannot be started, the others do its share.
template <class Fn>
void parallel_for(int64_t n, Fn&& fn, int64_t grain = 1) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min(num_threads(), (n + grain - 1) / grain);
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  // About 16 chunks per thread: fine enough to balance uneven items, coarse
  // enough that the shared counter is not contended.
  const int64_t chunk = std::max<int64_t>(1, n / (threads * 16));
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto worker = [&]() noexcept {
    try {
      for (int64_t begin; (begin = next.fetch_add(chunk)) < n;) {
        fn(begin, std::min(n, begin + chunk));
      }
    } catch (...) {
      bool expected = false;
      if (failed.compare_exchange_strong(expected, true)) error = std::current_exception();
      next.store(n);
    }
  };
  std::vector<std::thread> helpers;
  try {
    helpers.reserve(threads - 1);
    for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(worker);
  } catch (...) {
    // Fewer threads than asked: the chunks are shared by those running.
  }
  worker();
  for (std::thread& helper : helpers) helper.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace jax_msa::cpu
