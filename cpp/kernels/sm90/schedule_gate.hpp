// schedule="auto" of the SM90 sparse-attention forward: both schedules are
// enqueued on the stream, and the device picks one per call, from the ids.
// schedule_costs_kernel (sparse_attention_fwd.cu) first sums, over the
// query-outer tiles, the blocks each tile's union loads and the (token, slot)
// pairs attended; then every kernel of the schedule that loses returns at
// once (a ScheduleGate read at its start, uniform over the CTA). No host sync:
// safe under CUDA graphs.
#pragma once

#include <cstdint>

namespace jax_msa::sm90 {

struct ScheduleCosts {
  unsigned long long union_blocks;  // sum over query-outer tiles of their union's blocks
  unsigned long long attended;      // attended (token, slot) pairs
};

// The query-outer forward costs ~24.8 ns per (tile of 128 rows, union block),
// the by-block forward ~0.33 ns per (row, slot): measured on an H100 at
// T = 128K, G = 16, window ids (6.5 ms for 262K tile-blocks against 10.9 ms for
// 33.3M row-slots; benchmarks/RESULTS.md). Query-outer wins when
// kQueryOverBlockCost * union_blocks < G * attended.
constexpr unsigned long long kQueryOverBlockCost = 76;

struct ScheduleGate {
  const ScheduleCosts* costs = nullptr;  // null: the kernel always runs
  int64_t group = 1;                     // G = Hq / Hkv
  bool query = false;                    // the kernel belongs to the query-outer schedule

  __device__ bool closed() const {
    if (costs == nullptr) return false;
    const bool query_wins = kQueryOverBlockCost * costs->union_blocks <
                            static_cast<unsigned long long>(group) * costs->attended;
    return query_wins != query;
  }
};

}  // namespace jax_msa::sm90
