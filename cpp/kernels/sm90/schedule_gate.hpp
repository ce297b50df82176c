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

// The query-outer forward costs ~8.4 ns per (consumer warpgroup, walked
// block) on window ids, ~10 ns on clustered ids and ~10.4-11 ns on indexer
// ids; the by-block forward ~0.34-0.36 ns per (row, slot) on all three:
// measured on an H100 at T = 32K and 128K, G = 16, topk 16
// (benchmarks/RESULTS.md, session 13). The ratio that decides is the one of
// the ids where both are close, the clustered ones: 28.
// Query-outer wins when kQueryOverBlockCost * walked_blocks plus the by-block
// launches it leaves idle (kByBlockChunkCost per chunk: 16 chunks of ~7
// launches that return at once cost ~0.35-0.5 ms at 128K) < G * attended.
constexpr unsigned long long kQueryOverBlockCost = 28;
constexpr unsigned long long kByBlockChunkCost = 90000;

// The backward's dQ: the query-outer dQ kernel costs ~38 ns per (tile, union
// block), the fused dQ ~6.5 ns per attended (token, slot) pair on top of the
// dK / dV pass: fitted to the H100 timings at T = 128K, G = 16 of both ways on
// window, clustered and indexer ids (benchmarks/RESULTS.md, session 3).
constexpr unsigned long long kDqQueryOverBlockCost = 93;

struct ScheduleGate {
  const ScheduleCosts* costs = nullptr;  // null: the kernel always runs
  int64_t group = 1;                     // G = Hq / Hkv
  bool query = false;                    // the kernel belongs to the query-outer way
  // Query-outer wins when block_cost * blocks + fixed < G * attended, with
  // blocks the forward's walked_blocks, or the tiles' union_blocks (dQ).
  unsigned long long block_cost = kQueryOverBlockCost;
  bool walked = true;
  unsigned long long fixed = 0;

  __device__ bool closed() const {
    if (costs == nullptr) return false;
    const unsigned long long blocks = walked ? costs->walked_blocks : costs->union_blocks;
    const bool query_wins = block_cost * blocks + fixed <
                            static_cast<unsigned long long>(group) * costs->attended;
    return query_wins != query;
  }
};

}  // namespace jax_msa::sm90
