// The indexer's selection step on CUDA: the rule of spec §3.2, with the same
// ids in the same slots as cuda::topk_select, but one warp per (b, i, h) row
// instead of one CTA. For the indexer's rows (<= a few thousand blocks) the
// CTA-wide rounds of topk_select cost more than the block scores themselves;
// here a round is five shuffles plus one lane's rescan.
//
// Lane l owns the candidates c = l, l + 32, ... < L (history blocks) and
// keeps the two largest keys among its not-yet-selected ones. Each of the
// topk - 1 rounds takes the warp maximum of the lanes' largest keys as the
// next winner; the winning lane promotes its second key, and only a lane that
// wins with no second key known rescans its candidates for the two largest
// keys below the winner: winners come in strictly decreasing key order, so
// "below the last winner" is exactly "not yet selected". Most lanes win at
// most once, so few rounds rescan. Rows of up to 32 x kRegCandidates
// candidates keep their order bits in registers; longer rows rescan global
// memory (L1/L2-resident).
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

template <bool kInRegisters>
__device__ void select_row(const float* __restrict__ row_scores, int ncand, int rounds,
                           int64_t L, int64_t topk, int32_t* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  constexpr uint64_t kAll = ~uint64_t{0};
  uint32_t bits[kRegCandidates];
  Top2 top;
  if constexpr (kInRegisters) {
#pragma unroll
    for (int t = 0; t < kRegCandidates; ++t) {
      const int c = lane + 32 * t;
      bits[t] = c < ncand ? ordered_bits(__ldg(row_scores + c)) : 0u;
    }
    top = top2_below(bits, lane, kAll);
  } else {
    top = top2_below(row_scores, lane, ncand, kAll);
  }
  bool second_known = true;
  int32_t mine = -1;  // lane r % 32 keeps winner r until its slot is written
  for (int r = 0; r < rounds; ++r) {
    uint64_t m = top.first;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const uint64_t other = __shfl_xor_sync(0xFFFFFFFFu, m, offset);
      m = other > m ? other : m;
    }
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
  if (lane < rounds % 32) out[rounds - rounds % 32 + lane] = mine;
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
  for (int64_t row = blockIdx.x * int64_t{kWarps} + warp; row < rows;
       row += int64_t{gridDim.x} * kWarps) {
    const int64_t bi = row / Hi;  // b * Sq + i
    const int64_t i = bi % Sq;
    const int64_t b = bi / Sq;
    int32_t* out = ids + row * topk;
    const int64_t q_len = q_lengths[b];
    const int64_t L = i < q_len ? (kv_lengths[b] - q_len + i) / kBlock : int64_t{-1};
    if (L + 1 <= topk) {  // every visible block fits: 0..L, then -1
      for (int64_t k = lane; k < topk; k += 32) out[k] = k <= L ? static_cast<int32_t>(k) : -1;
      continue;
    }
    // Clamping to NB only matters for lengths the spec rejects; it keeps
    // reads in bounds.
    const float* row_scores = scores + row * NB;
    const int ncand = static_cast<int>(L < NB ? L : NB);
    const int rounds = static_cast<int>(topk - 1 < ncand ? topk - 1 : ncand);
    if (ncand <= 32 * kRegCandidates) {
      select_row<true>(row_scores, ncand, rounds, L, topk, out);
    } else {
      select_row<false>(row_scores, ncand, rounds, L, topk, out);
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
