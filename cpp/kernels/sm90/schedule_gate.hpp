// schedule="auto" of the SM90 sparse-attention forward, and the default
// backward's dQ: both ways are enqueued on the stream, and the device picks
// one per call, from the ids. schedule_costs_kernel (sparse_attention_fwd.cu)
// first sums, over the query-outer tiles, the blocks each tile's union loads
// and the (token, slot) pairs attended; then every kernel of the way that
// loses returns at once (a ScheduleGate read at its start, uniform over the
// CTA). No host sync: safe under CUDA graphs.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"

namespace jax_msa::sm90 {

using cuda::ScheduleCosts;

// The query-outer forward costs ~24.8 ns per (tile of 128 rows, union block),
// the by-block forward ~0.33 ns per (row, slot): measured on an H100 at
// T = 128K, G = 16, window ids (6.5 ms for 262K tile-blocks against 10.9 ms for
// 33.3M row-slots; benchmarks/RESULTS.md). Query-outer wins when
// kQueryOverBlockCost * union_blocks < G * attended.
constexpr unsigned long long kQueryOverBlockCost = 76;

// The backward's dQ: the query-outer dQ kernel costs ~38 ns per (tile, union
// block), the fused dQ ~6.5 ns per attended (token, slot) pair on top of the
// dK / dV pass: fitted to the H100 timings at T = 128K, G = 16 of both ways on
// window, clustered and indexer ids (benchmarks/RESULTS.md, session 3).
constexpr unsigned long long kDqQueryOverBlockCost = 93;

struct ScheduleGate {
  const ScheduleCosts* costs = nullptr;  // null: the kernel always runs
  int64_t group = 1;                     // G = Hq / Hkv
  bool query = false;                    // the kernel belongs to the query-outer way
  // Query-outer wins when block_cost * union_blocks < G * attended.
  unsigned long long block_cost = kQueryOverBlockCost;

  __device__ bool closed() const {
    if (costs == nullptr) return false;
    const bool query_wins = block_cost * costs->union_blocks <
                            static_cast<unsigned long long>(group) * costs->attended;
    return query_wins != query;
  }
};

}  // namespace jax_msa::sm90
