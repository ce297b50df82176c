// topk_select on the GPU: the selection rule of spec §3.2, bit-exact with
// cpu::topk_select (same ids in the same slots).
//
// Design: one CTA of kThreads threads per (b, i, h) row (grid-stride over the
// rows, so any row count fits the grid limits).
//  - Every candidate block c < L gets a 64-bit key: the order-preserving
//    bits of its score (NaN -> -inf, -0 -> +0) in the high word and ~c in the
//    low word. Keys are distinct, and key order is (score, -id) order: the
//    largest key is the best score with the lowest id.
//  - Thread t owns the candidates c = t, t + kThreads, ... and keeps the
//    largest key among its not-yet-selected ones in a register.
//  - Each of the topk-1 rounds takes the block-wide maximum of those registers
//    (warp shuffles, then one shared slot per warp) as the next winner. Only
//    the thread owning the winner rescans its candidates, for its largest key
//    below the winner: winners come in strictly decreasing key order, so
//    "below the last winner" is exactly "not yet selected", with no marks.
//  - The rescans read the order bits staged in shared memory during the first
//    pass (NB <= kMaxStagedBlocks, 32 KiB), or the scores again from global
//    memory (L2-resident) for longer rows. Each thread only reads back the
//    entries it staged itself, so staging needs no barrier.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "cuda_kernels.h"
#include "selection_keys.cuh"

namespace jax_msa::cuda {
namespace {

constexpr int64_t kBlock = 128;  // tokens per block (spec §2)
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxTopk = 64;
constexpr int64_t kMaxStagedBlocks = 8192;  // 1M tokens; 32 KiB of order bits
static_assert(kMaxTopk <= kThreads, "one thread per output slot");

// Largest key below `bound` among the candidates of thread `tid`, i.e.
// c = tid, tid + kThreads, ... < ncand (0 if none). Host-callable for tests.
template <bool kStaged>
__host__ __device__ uint64_t thread_max_below(
    const float* __restrict__ row_scores, const uint32_t* staged, int tid,
    int ncand, uint64_t bound) {
  uint64_t best = 0;
  for (int c = tid; c < ncand; c += kThreads) {
    const uint32_t bits = kStaged ? staged[c] : ordered_bits(row_scores[c]);
    const uint64_t key = make_key(bits, c);
    if (key < bound && key > best) best = key;
  }
  return best;
}

// kStaged: order bits of each row are staged in dynamic shared memory
// (NB * 4 bytes); requires NB <= kMaxStagedBlocks.
template <bool kStaged>
__global__ void __launch_bounds__(kThreads)
    topk_select_kernel(const float* __restrict__ scores,
                       const int32_t* __restrict__ q_lengths,
                       const int32_t* __restrict__ kv_lengths,
                       int32_t* __restrict__ ids, int64_t Sq, int64_t Hi,
                       int64_t NB, int64_t topk, int64_t rows) {
  extern __shared__ uint32_t staged[];
  // Per-warp maxima, double-buffered by round parity: a round's writes never
  // race with the previous round's reads, so one barrier per round suffices.
  // The parity runs on across rows, so this holds at row boundaries too.
  __shared__ uint64_t warp_best[2][kWarps];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  int parity = 0;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bi = row / Hi;  // b * Sq + i
    const int64_t i = bi % Sq;
    const int64_t b = bi / Sq;
    int32_t* out = ids + row * topk;

    // Local block; padded rows act as L = -1 (no visible block: all -1).
    const int64_t q_len = q_lengths[b];
    const int64_t L =
        i < q_len ? (kv_lengths[b] - q_len + i) / kBlock : int64_t{-1};
    if (L + 1 <= topk) {  // every visible block fits: 0..L, then -1
      if (tid < topk) out[tid] = tid <= L ? tid : -1;
      continue;  // uniform over the CTA: no barrier is skipped unevenly
    }

    // Candidates: history blocks c < L. Clamping to NB only matters for
    // lengths the spec rejects (kv_lengths > Sk); it keeps reads in bounds.
    const float* row_scores = scores + row * NB;
    const int ncand = static_cast<int>(L < NB ? L : NB);
    const int rounds = static_cast<int>(topk - 1 < ncand ? topk - 1 : ncand);

    // First pass: stage the order bits, find each thread's largest key.
    uint64_t local = 0;
    for (int c = tid; c < ncand; c += kThreads) {
      const uint32_t bits = ordered_bits(row_scores[c]);
      if (kStaged) staged[c] = bits;
      const uint64_t key = make_key(bits, c);
      if (key > local) local = key;
    }

    for (int r = 0; r < rounds; ++r) {
      uint64_t m = local;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const uint64_t other = __shfl_xor_sync(0xFFFFFFFFu, m, offset);
        if (other > m) m = other;
      }
      if (lane == 0) warp_best[parity][warp] = m;
      __syncthreads();
      uint64_t best = warp_best[parity][0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        if (warp_best[parity][w] > best) best = warp_best[parity][w];
      }
      parity ^= 1;
      if (tid == 0) out[r] = key_id(best);
      if (local == best) {  // keys are distinct: exactly one owner
        local =
            thread_max_below<kStaged>(row_scores, staged, tid, ncand, best);
      }
    }
    // Slots rounds..topk-2 are -1 only when ncand < topk - 1 (rejected
    // lengths, see above); the local block always takes slot topk - 1.
    if (tid >= rounds && tid < topk) {
      out[tid] = tid == topk - 1 ? static_cast<int32_t>(L) : -1;
    }
  }
}

}  // namespace

cudaError_t topk_select(const float* scores, const int32_t* q_lengths,
                        const int32_t* kv_lengths, int32_t* ids, int64_t B,
                        int64_t Sq, int64_t Hi, int64_t NB, int64_t topk,
                        cudaStream_t stream) {
  if (topk < 1 || topk > kMaxTopk || B < 0 || Sq < 0 || Hi < 0 || NB < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = B * Sq * Hi;
  if (rows == 0) return cudaSuccess;
  const auto grid = static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX));
  if (NB <= kMaxStagedBlocks) {
    const size_t smem = static_cast<size_t>(NB) * sizeof(uint32_t);
    topk_select_kernel<true><<<grid, kThreads, smem, stream>>>(
        scores, q_lengths, kv_lengths, ids, Sq, Hi, NB, topk, rows);
  } else {
    topk_select_kernel<false><<<grid, kThreads, 0, stream>>>(
        scores, q_lengths, kv_lengths, ids, Sq, Hi, NB, topk, rows);
  }
  return cudaGetLastError();
}

}  // namespace jax_msa::cuda
