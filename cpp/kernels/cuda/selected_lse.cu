// selected_lse on the GPU, the last step of the indexer with lse (spec §3.3):
// the logsumexp over a row's selected blocks from the per-block (max, sum)
// pairs that indexer_scores stored. One thread per row; no arch-specific
// instruction, so both kernel families run it (built as sm_80 PTX too).
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"

namespace jax_msa::cuda {
namespace {

__global__ void selected_lse_kernel(const float* __restrict__ best,
                                    const float* __restrict__ sums,
                                    const int32_t* __restrict__ ids, float* __restrict__ lse,
                                    int64_t rows, int64_t NB, int64_t topk) {
  for (int64_t row = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; row < rows;
       row += int64_t{gridDim.x} * blockDim.x) {
    const int32_t* row_ids = ids + row * topk;
    const float* row_best = best + row * NB;
    const float* row_sums = sums + row * NB;
    float m = -INFINITY;
    for (int64_t k = 0; k < topk; ++k) {
      const int32_t c = row_ids[k];
      if (c >= 0 && c < NB) m = fmaxf(m, row_best[c]);
    }
    float result = -INFINITY;
    if (m != -INFINITY) {
      float total = 0.0f;
      for (int64_t k = 0; k < topk; ++k) {
        const int32_t c = row_ids[k];
        if (c >= 0 && c < NB && row_best[c] != -INFINITY) {
          total += row_sums[c] * expf(row_best[c] - m);
        }
      }
      result = m + logf(total);
    }
    lse[row] = result;
  }
}

}  // namespace

cudaError_t selected_lse(const float* scores, const float* sums, const int32_t* ids, float* lse,
                         int64_t rows, int64_t NB, int64_t topk, cudaStream_t stream) {
  if (rows < 0 || NB < 0 || topk < 1) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t grid = std::min<int64_t>((rows + kThreads - 1) / kThreads, 65535);
  selected_lse_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      scores, sums, ids, lse, rows, NB, topk);
  return cudaGetLastError();
}

}  // namespace jax_msa::cuda
