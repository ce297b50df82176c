// The host side that the block-score kernels of every family share
// (sm90/, portable/ and sm100/block_scores.cu): the problem, its checks, the
// dispatch over dtype and Di to a family's launch, and the kernel parameters
// and launch of the families that read qi and ki by pointer.
#pragma once

#include <climits>
#include <cstdint>

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/tile_geometry.hpp"

namespace jax_msa::cuda {

// block_scores (fill_future: -inf past each tile's last local block) or
// indexer_scores (sums not null: also the sums of exp(s - score)).
struct ScoresProblem {
  const void* qi;
  const void* ki;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  float* scores;
  float* sums;
  int64_t B, Sq, Sk, Hi;
  float scale;
  bool fill_future;
};

// Checks `pr` and calls Family::template launch<Element, kDi>(pr, stream).
// Every family keeps the SM90 kernel's limits (its TMA takes 32-bit
// extents), so that the contract does not depend on the card.
template <class Family>
cudaError_t run_block_scores(DType dtype, int64_t Di, const ScoresProblem& pr,
                             cudaStream_t stream) {
  if (!block_scores_supported(dtype, Di) || pr.B < 0 || pr.Sq < 0 || pr.Sk < 0 || pr.Hi < 1) {
    return cudaErrorInvalidValue;
  }
  if (pr.Sq * pr.Hi > INT_MAX || pr.Sk > INT_MAX || pr.B > INT_MAX) return cudaErrorInvalidValue;
  if (pr.B == 0 || pr.Sq == 0 || pr.Sk == 0) return cudaSuccess;  // no score to write
  if (dtype == DType::kBF16) {
    return Di == 64 ? Family::template launch<cutlass::bfloat16_t, 64>(pr, stream)
                    : Family::template launch<cutlass::bfloat16_t, 128>(pr, stream);
  }
  return Di == 64 ? Family::template launch<cutlass::half_t, 64>(pr, stream)
                  : Family::template launch<cutlass::half_t, 128>(pr, stream);
}

// The end of every family's launch: one CTA per (row tile, batch row) of the
// kernel with the sums or without them.
template <class Traits, class Params>
cudaError_t launch_scores(void (*with_sums)(Params), void (*without_sums)(Params), const Params& p,
                          int64_t tiles, const ScoresProblem& pr, cudaStream_t stream) {
  const int64_t grid = tiles * pr.B;
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  auto kernel = pr.sums ? with_sums : without_sums;
  const cudaError_t status = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (status != cudaSuccess) return status;
  kernel<<<static_cast<unsigned>(grid), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The kernel parameters every family shares (each adds its qi / ki operands).
struct ScoresShape {
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  float* scores;  // [B, Sq, Hi, NB]
  float* sums;    // same shape, or null: no sums
  int64_t batch, rows, keys, hi, NB, tiles;
  float scale;
  bool fill_future;  // write -inf to the blocks past the tile's last local block
};

// The shared parameters of `pr` for tiles of kRows (query, head) rows.
template <int kRows>
ScoresShape scores_shape(const ScoresProblem& pr) {
  const int64_t rows = pr.Sq * pr.Hi;
  return ScoresShape{pr.q_lengths,
                     pr.kv_lengths,
                     pr.scores,
                     pr.sums,
                     pr.B,
                     rows,
                     pr.Sk,
                     pr.Hi,
                     (pr.Sk + sm90::kBlockKeys - 1) / sm90::kBlockKeys,
                     (rows + kRows - 1) / kRows,
                     pr.scale,
                     pr.fill_future};
}

// The kernel parameters of the families that read qi and ki by pointer
// (portable/ and sm100/block_scores.cu; the SM90 kernel takes TMA descriptors).
template <class Traits>
struct PointerScoresParams : ScoresShape {
  const typename Traits::Element* qi;  // [B, rows, Di]
  const typename Traits::Element* ki;  // [B, keys, Di]
};

// Their launch: the parameters of `pr`, then launch_scores.
template <class Traits>
cudaError_t launch_pointer_scores(void (*with_sums)(PointerScoresParams<Traits>),
                                  void (*without_sums)(PointerScoresParams<Traits>),
                                  const ScoresProblem& pr, cudaStream_t stream) {
  using Element = typename Traits::Element;
  const PointerScoresParams<Traits> p{scores_shape<Traits::kRows>(pr),
                                      static_cast<const Element*>(pr.qi),
                                      static_cast<const Element*>(pr.ki)};
  return launch_scores<Traits>(with_sums, without_sums, p, p.tiles, pr, stream);
}

}  // namespace jax_msa::cuda
