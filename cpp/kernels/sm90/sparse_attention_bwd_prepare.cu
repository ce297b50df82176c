// Step 1 of the attention backwards, shared by both kernel families (no
// Hopper instruction: built as sm_80 PTX too): delta (bwd_delta.hpp) and, for
// the block-sparse backward, the block -> queries index
// (block_index::build_block_index, sparse_block_index.cu). The pipeline:
// sparse_attention_bwd.cu's top comment.
#include <climits>
#include <cstdint>

#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/bwd_delta.hpp"
#include "kernels/sm90/sparse_block_index.hpp"

namespace jax_msa::sm90::sparse_bwd {
namespace {

template <class Element>
cudaError_t prepare(const cuda::SparseAttentionArgs& a, const void* out, const void* dout,
                    const float* dlse, float* delta, int32_t* index, cudaStream_t stream) {
  const block_index::Geometry geo(a);
  cudaError_t st = launch_delta<Element>(a, out, dout, dlse, delta, stream);
  if (st != cudaSuccess) return st;
  if (geo.nbkt == 0) return cudaSuccess;
  return block_index::build_block_index(a, geo, index, nullptr, stream);
}

}  // namespace
}  // namespace jax_msa::sm90::sparse_bwd

namespace jax_msa::cuda {

bool sparse_attention_bwd_args_valid(DType dtype, const SparseAttentionArgs& a) {
  using sm90::block_index::kTileRows;
  if (dtype != DType::kBF16 && dtype != DType::kF16) return false;
  if (a.D != sm90::sparse_bwd::kHeadDim || a.Hkv < 1 || a.Hq < a.Hkv || a.Hq % a.Hkv != 0) {
    return false;
  }
  if (a.Hq / a.Hkv > kTileRows || a.topk < 1 || a.topk > 64) return false;
  if (a.B < 0 || a.Sq < 0 || a.Sk < 0) return false;
  // TMA takes 32-bit extents; grids take 31-bit y / x extents.
  if (a.Sk > INT_MAX || a.Hkv > INT_MAX || a.B > INT_MAX) return false;
  const sm90::block_index::Geometry geo(a);
  if (geo.nchunks > INT_MAX || geo.nbkt > INT_MAX || a.B * a.Hkv > 65535) return false;
  return true;
}

cudaError_t sparse_attention_bwd_prepare(DType dtype, const SparseAttentionArgs& a,
                                         const void* out, const void* dout, const float* dlse,
                                         float* delta, int32_t* index, cudaStream_t stream) {
  if (!sparse_attention_bwd_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(index) % 8 != 0) return cudaErrorInvalidValue;
  return dtype == DType::kBF16
             ? sm90::sparse_bwd::prepare<cutlass::bfloat16_t>(a, out, dout, dlse, delta, index,
                                                              stream)
             : sm90::sparse_bwd::prepare<cutlass::half_t>(a, out, dout, dlse, delta, index,
                                                          stream);
}

cudaError_t attention_bwd_delta(DType dtype, const DenseAttentionArgs& a, const void* out,
                                const void* dout, const float* dlse, float* delta,
                                cudaStream_t stream) {
  if ((dtype != DType::kBF16 && dtype != DType::kF16) || a.D != sm90::sparse_bwd::kHeadDim) {
    return cudaErrorInvalidValue;
  }
  // launch_delta takes the sparse arguments; only B, Sq, Hq and q_lengths matter.
  SparseAttentionArgs s{};
  s.q_lengths = a.q_lengths;
  s.B = a.B, s.Sq = a.Sq, s.Hq = a.Hq;
  return dtype == DType::kBF16
             ? sm90::sparse_bwd::launch_delta<cutlass::bfloat16_t>(s, out, dout, dlse, delta,
                                                                   stream)
             : sm90::sparse_bwd::launch_delta<cutlass::half_t>(s, out, dout, dlse, delta, stream);
}

}  // namespace jax_msa::cuda
