// The indexer's selection step on CUDA: the rule of spec §3.2, with the same
// ids in the same slots as cuda::topk_select, but one warp per (b, i, h) row
// instead of one CTA. For the indexer's rows (<= a few thousand blocks) the
// CTA-wide rounds of topk_select cost more than the block scores themselves.
//
// Lane l owns the candidates c = l, l + 32, ... < L (history blocks); keys
// (selection_keys.cuh) are distinct, so "the topk - 1 largest keys" is the
// whole answer. Two ways to find them:
//  - threshold (rows of <= 32 x kRegCandidates candidates, topk - 1 <= 32):
//    the (topk-1)-th largest of the 32 lane maxima is a threshold t with at
//    least topk - 1 keys >= t; on scores of any spread only a few more keys
//    pass it, so the warp gathers them in shared memory and each one's slot is
//    its rank among them. A few dozen instructions per candidate in all. When
//    more than kGathered keys pass (one lane holds most of the best keys), the
//    row takes the rounds below.
//  - rounds: each lane keeps the two largest keys among its not-yet-selected
//    candidates; each of the topk - 1 rounds takes the warp maximum as the
//    next winner, the winning lane promotes its second key, and only a lane
//    that wins with no second key known rescans for the two largest keys below
//    the winner (winners come in strictly decreasing order, so "below the last
//    winner" is "not yet selected"). Rows longer than the registers hold
//    rescan global memory (L1/L2-resident).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/selection_keys.cuh"

namespace jax_msa::sm90 {
namespace {

using cuda::key_id;
using cuda::make_key;
using cuda::ordered_bits;

constexpr int64_t kBlock = 128;
constexpr int kWarps = 8;
constexpr int64_t kMaxTopk = 64;

constexpr int kRegCandidates = 32;  // per lane: rows of <= 1024 history blocks
static_assert(32 * kRegCandidates == cuda::kWarpSelectMaxBlocks, "rows held in registers");
constexpr int kGathered = 64;       // keys past the threshold a warp can rank

struct Top2 {
  uint64_t first = 0, second = 0;  // 0: none
  __device__ void push(uint64_t key) {
    if (key > first) {
      second = first;
      first = key;
    } else if (key > second) {
      second = key;
    }
  }
};

// The two largest keys below `bound` among the lane's candidates, from the
// order bits held in registers (0 = no candidate: real bits are >= 0x007FFFFF).
__device__ inline Top2 top2_below(const uint32_t (&bits)[kRegCandidates], int lane,
                                  uint64_t bound) {
  Top2 top;
#pragma unroll
  for (int t = 0; t < kRegCandidates; ++t) {
    const uint64_t key = make_key(bits[t], lane + 32 * t);
    if (bits[t] != 0 && key < bound) top.push(key);
  }
  return top;
}

// The same from the scores in global memory.
__device__ inline Top2 top2_below(const float* __restrict__ row_scores, int lane, int ncand,
                                  uint64_t bound) {
  Top2 top;
  for (int c = lane; c < ncand; c += 32) {
    const uint64_t key = make_key(ordered_bits(__ldg(row_scores + c)), c);
    if (key < bound) top.push(key);
  }
  return top;
}

// The largest of two keys.
__device__ inline uint64_t max_key(uint64_t a, uint64_t b) { return a > b ? a : b; }

// Threshold selection of the `rounds` (<= 32) largest keys among the lane's
// candidates in `bits`; writes them to out[0, rounds) in decreasing order.
// Returns false, having written nothing, when more than kGathered keys pass
// the threshold. `gathered` is this warp's shared scratch, `count` its counter.
__device__ inline bool select_by_threshold(const uint32_t (&bits)[kRegCandidates], int lane,
                                           int rounds, uint64_t* gathered, int* count,
                                           int32_t* __restrict__ out) {
  // The threshold works on the 32-bit score order alone (ties pass it
  // together); the ranking below breaks them by id. A missing candidate
  // (bits 0) is below every real one (>= 0x007FFFFF).
  uint32_t partial[4] = {0, 0, 0, 0};  // four independent chains
#pragma unroll
  for (int t = 0; t < kRegCandidates; ++t) partial[t % 4] = max(partial[t % 4], bits[t]);
  const uint32_t lane_max = max(max(partial[0], partial[1]), max(partial[2], partial[3]));
  // Bitonic sort of the lane maxima, decreasing from lane 0: the threshold is
  // then lane rounds - 1's value, and >= rounds lanes (each with a candidate,
  // as rounds <= ncand) hold a candidate >= it.
  uint32_t sorted = lane_max;
#pragma unroll
  for (int size = 2; size <= 32; size *= 2) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const uint32_t other = __shfl_xor_sync(0xFFFFFFFFu, sorted, stride);
      // The lower lane of a pair keeps the larger value in a decreasing run.
      const bool keep_larger = ((lane & stride) == 0) == ((lane & size) == 0);
      sorted = keep_larger ? max(sorted, other) : min(sorted, other);
    }
  }
  const uint32_t threshold = __shfl_sync(0xFFFFFFFFu, sorted, rounds - 1);
  if (lane == 0) *count = 0;
  __syncwarp();
  if (lane_max >= threshold) {
#pragma unroll
    for (int t = 0; t < kRegCandidates; ++t) {
      if (bits[t] >= threshold) {
        const int slot = atomicAdd(count, 1);
        if (slot < kGathered) gathered[slot] = make_key(bits[t], lane + 32 * t);
      }
    }
  }
  __syncwarp();
  const int total = *count;
  if (total > kGathered) return false;
  // Each gathered key's slot is the number of gathered keys above it.
  for (int s = lane; s < total; s += 32) {
    const uint64_t key = gathered[s];
    int rank = 0;
#pragma unroll 4
    for (int j = 0; j < total; ++j) rank += gathered[j] > key;
    if (rank < rounds) out[rank] = key_id(key);
  }
  return true;
}

template <bool kInRegisters>
__device__ void select_row(const float* __restrict__ row_scores, int ncand, int rounds,
                           int64_t L, int64_t topk, uint64_t* gathered, int* count,
                           int32_t* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  constexpr uint64_t kAll = ~uint64_t{0};
  uint32_t bits[kRegCandidates];
  Top2 top;
  bool done = false;
  if constexpr (kInRegisters) {
    // All loads (one base address, constant offsets) before the first use,
    // and a branch-free conversion: a load followed by its use would wait for
    // memory once per candidate.
    const float* lane_scores = row_scores + lane;
    const int owned = ncand > lane ? (ncand - lane + 31) / 32 : 0;  // this lane's candidates
    float raw[kRegCandidates];
#pragma unroll
    for (int t = 0; t < kRegCandidates; ++t) raw[t] = t < owned ? lane_scores[32 * t] : 0.0f;
#pragma unroll
    for (int t = 0; t < kRegCandidates; ++t) {
      const uint32_t b = ordered_bits(raw[t]);
      bits[t] = t < owned ? b : 0u;
    }
    if (rounds <= 32) done = select_by_threshold(bits, lane, rounds, gathered, count, out);
    if (!done) top = top2_below(bits, lane, kAll);
  } else {
    top = top2_below(row_scores, lane, ncand, kAll);
  }
  bool second_known = true;
  int32_t mine = -1;  // lane r % 32 keeps winner r until its slot is written
  for (int r = 0; !done && r < rounds; ++r) {
    uint64_t m = top.first;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = max_key(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
    if (lane == r % 32) mine = key_id(m);
    if (r % 32 == 31) out[r - 31 + lane] = mine;  // 32 winners: one coalesced store
    if (top.first == m) {  // keys are distinct: exactly one owner
      if (second_known) {
        top.first = top.second;
        top.second = 0;
        second_known = false;
      } else {
        if constexpr (kInRegisters) {
          top = top2_below(bits, lane, m);
        } else {
          top = top2_below(row_scores, lane, ncand, m);
        }
        second_known = true;
      }
    }
  }
  if (!done && lane < rounds % 32) out[rounds - rounds % 32 + lane] = mine;
  for (int64_t k = rounds + lane; k < topk; k += 32) {
    out[k] = k == topk - 1 ? static_cast<int32_t>(L) : -1;
  }
}

__global__ void __launch_bounds__(32 * kWarps)
    select_kernel(const float* __restrict__ scores, const int32_t* __restrict__ q_lengths,
                  const int32_t* __restrict__ kv_lengths, int32_t* __restrict__ ids, int64_t Sq,
                  int64_t Hi, int64_t NB, int64_t topk, int64_t rows) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = threadIdx.x / 32;
  __shared__ uint64_t gathered[kWarps][kGathered];
  __shared__ int count[kWarps];
  for (int64_t row = blockIdx.x * int64_t{kWarps} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    const int64_t bi = row / Hi;  // b * Sq + i
    const int64_t i = bi % Sq;
    const int64_t b = bi / Sq;
    int32_t* out = ids + row * topk;
    // Lengths clamped to [0, Sq] and [0, NB * 128] (the reference's clamping;
    // only lengths the spec rejects change), positions floored: a query before
    // the first key (kv_len < q_len) has L = -1 and selects nothing.
    const int64_t q_len = min(max(int64_t{q_lengths[b]}, int64_t{0}), Sq);
    const int64_t kv_len = min(max(int64_t{kv_lengths[b]}, int64_t{0}), NB * kBlock);
    const int64_t pos = kv_len - q_len + i;
    const int64_t L = i < q_len && pos >= 0 ? pos / kBlock : int64_t{-1};
    if (L + 1 <= topk) {  // every visible block fits: 0..L, then -1
      for (int64_t k = lane; k < topk; k += 32) out[k] = k <= L ? static_cast<int32_t>(k) : -1;
      continue;
    }
    const float* row_scores = scores + row * NB;
    const int ncand = static_cast<int>(L < NB ? L : NB);
    const int rounds = static_cast<int>(topk - 1 < ncand ? topk - 1 : ncand);
    if (ncand <= 32 * kRegCandidates) {
      select_row<true>(row_scores, ncand, rounds, L, topk, gathered[warp], &count[warp], out);
    } else {
      select_row<false>(row_scores, ncand, rounds, L, topk, gathered[warp], &count[warp], out);
    }
  }
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

cudaError_t indexer_select(const float* scores, const int32_t* q_lengths,
                           const int32_t* kv_lengths, int32_t* ids, int64_t B, int64_t Sq,
                           int64_t Hi, int64_t NB, int64_t topk, cudaStream_t stream) {
  if (topk < 1 || topk > sm90::kMaxTopk || B < 0 || Sq < 0 || Hi < 0 || NB < 0 ||
      NB > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = B * Sq * Hi;
  if (rows == 0) return cudaSuccess;
  // Enough CTAs to fill the GPU several times over; the grid-stride loop
  // covers any row count.
  const int64_t grid = std::min<int64_t>((rows + sm90::kWarps - 1) / sm90::kWarps, 1 << 20);
  sm90::select_kernel<<<static_cast<unsigned>(grid), 32 * sm90::kWarps, 0, stream>>>(
      scores, q_lengths, kv_lengths, ids, Sq, Hi, NB, topk, rows);
  return cudaGetLastError();
}

}  // namespace jax_msa::cuda
