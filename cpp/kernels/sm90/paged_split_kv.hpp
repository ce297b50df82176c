// The arch-neutral side of paged attention (spec §3.7) that both kernel
// families share (sm90/paged_attention.cu, portable/paged_attention.cu): the
// tiling, the lengths as the kernels clamp them, the dense pages of a tile and
// each CTA's part of a tile's pages (split-KV), and the lse-weighted combine
// of the CTAs' float32 partials (workspace: partial O [splits, rows, D], then
// partial lse [splits, rows]), and the read of a Q row with its power-of-two
// scale for e4m3 caches. Plain CUDA: it builds for sm_80 too.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::sm90 {

// The tiling of problem `a`: tokens * G <= 128 rows, tokens * topk <= 128
// union candidates, tokens <= 64. (paged_attention_splits sizes the
// workspace from it: both families tile alike.)
inline SparseShape make_paged_shape(const cuda::PagedAttentionArgs& a) {
  const int64_t group = a.Hq / a.Hkv;
  int64_t tokens = std::min<int64_t>(128 / group, 64);
  if (a.topk > 0) tokens = std::min<int64_t>(tokens, 128 / a.topk);
  const int64_t chunks = (a.Q + tokens - 1) / tokens;
  return {a.ids, a.q_lengths, a.kv_lengths, a.B, a.Q, 0, a.Hq, a.Hkv, a.topk, group,
          static_cast<int>(tokens), chunks, a.B * a.Hkv * chunks};
}

// Lengths as the kernels clamp them: [0, Q] and [0, max_pages * 128].
struct RequestLengths {
  int64_t q_len, kv_len;
  __device__ RequestLengths(const SparseShape& s, int64_t b, int64_t max_pages) {
    q_len = std::clamp<int64_t>(s.q_lengths[b], 0, s.Sq);
    kv_len = std::clamp<int64_t>(s.kv_lengths[b], 0, max_pages * 128);
  }
};

// Bit t set for each of the tile's queries t < q_len (those that attend).
__device__ inline uint64_t valid_tokens(const SparseShape& s, const SparseTile& tile,
                                        int64_t q_len) {
  const int64_t n = std::clamp<int64_t>(q_len - tile.token0, 0, s.tokens);
  return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
}

// Dense: the tile attends logical pages [0, n), n = its last valid query's page + 1.
__device__ inline int64_t dense_tile_pages(const SparseShape& s, const SparseTile& tile,
                                           const RequestLengths& len) {
  const int64_t nv = std::clamp<int64_t>(len.q_len - tile.token0, 0, s.tokens);
  const int64_t last = len.kv_len - len.q_len + tile.token0 + nv - 1;
  return nv > 0 && last >= 0 ? last / 128 + 1 : 0;
}

// The part [lo, hi) of a tile's n pages (or union entries) that CTA `split` of `splits` takes.
struct SplitRange {
  int64_t lo, hi;
  __device__ SplitRange(int64_t n, int splits, int split) {
    const int64_t per = (n + splits - 1) / splits;
    lo = std::min(n, split * per);
    hi = std::min(n, lo + per);
  }
};

// One warp per output row: out = sum over splits of exp(lse_s - lse) O_s,
// lse = ln(sum of exp(lse_s)); 0 and -inf where every split saw nothing.
template <class Out>
__global__ void __launch_bounds__(256)
    paged_combine_kernel(const float* partial_o, const float* partial_lse, int splits,
                         int64_t rows_total, Out* out, float* lse) {
  const int64_t row = blockIdx.x * int64_t{8} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows_total) return;
  float m = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) m = fmaxf(m, partial_lse[sp * rows_total + row]);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.0f;
  if (m > -INFINITY) {
    for (int sp = 0; sp < splits; ++sp) {
      const float w = __expf(partial_lse[sp * rows_total + row] - m);
      if (w == 0.0f) continue;  // also skips the partials of empty splits
      const float4 o =
          reinterpret_cast<const float4*>(partial_o + (sp * rows_total + row) * 128)[lane];
      acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
      total += w;
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  Out* dst = out + row * 128 + 4 * lane;
  dst[0] = static_cast<Out>(acc.x * inv);
  dst[1] = static_cast<Out>(acc.y * inv);
  dst[2] = static_cast<Out>(acc.z * inv);
  dst[3] = static_cast<Out>(acc.w * inv);
  if (lane == 0) lse[row] = total > 0.0f ? m + logf(total) : -INFINITY;
}

// Merges the partials in `workspace` (a.splits of them) into out and lse.
inline cudaError_t launch_paged_combine(const cuda::PagedAttentionArgs& a, DType out_dtype,
                                        const float* workspace, void* out, float* lse,
                                        cudaStream_t stream) {
  const int64_t rows = a.B * a.Q * a.Hq;
  const float* partial_lse = workspace + a.splits * rows * 128;
  const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
  const int splits = static_cast<int>(a.splits);
  switch (out_dtype) {
    case DType::kF32:
      paged_combine_kernel<float><<<blocks, 256, 0, stream>>>(
          workspace, partial_lse, splits, rows, static_cast<float*>(out), lse);
      break;
    case DType::kBF16:
      paged_combine_kernel<cutlass::bfloat16_t><<<blocks, 256, 0, stream>>>(
          workspace, partial_lse, splits, rows, static_cast<cutlass::bfloat16_t*>(out), lse);
      break;
    case DType::kF16:
      paged_combine_kernel<cutlass::half_t><<<blocks, 256, 0, stream>>>(
          workspace, partial_lse, splits, rows, static_cast<cutlass::half_t*>(out), lse);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Half (64 dims from d0) of the tile's Q row `row` (token token0 + row / G,
// head g G + row % G) of q [B, Q, Hq, kD], as eight 16-byte words: zeros for a
// missing query (row past the tile's rows, or token >= q_len).
template <int kD, class QElement>
__device__ void read_q_half_row(const QElement* q, const SparseShape& s, const SparseTile& tile,
                                int row, int d0, int64_t q_len, uint4 (&raw)[8]) {
  const int64_t token = tile.token0 + row / s.group;
  const bool valid = row < s.tokens * s.group && token < q_len;
  const int64_t head = tile.g * s.group + row % s.group;
  const QElement* src = q + ((tile.b * s.Sq + token) * s.Hq + head) * kD + d0;
  CUTE_UNROLL
  for (int i = 0; i < 8; ++i) {
    raw[i] = valid ? reinterpret_cast<const uint4*>(src)[i] : make_uint4(0, 0, 0, 0);
  }
}

// The half row `raw` as floats (x), and the exponent e of the whole row's
// largest |x| (max |x| < 2^e; 0 for a zero or non-finite row), the other half
// being held by the neighbouring lane: the e4m3 paths scale the row by a
// power of two from it.
template <class QElement>
__device__ int q_row_exponent(const uint4 (&raw)[8], float (&x)[64]) {
  float amax = 0.0f;
  CUTE_UNROLL
  for (int i = 0; i < 8; ++i) {
    const QElement* e = reinterpret_cast<const QElement*>(&raw[i]);
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) {
      x[8 * i + j] = static_cast<float>(e[j]);
      amax = fmaxf(amax, fabsf(x[8 * i + j]));
    }
  }
  amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
  int e = 0;
  if (amax > 0.0f && amax < INFINITY) frexpf(amax, &e);
  return e;
}

}  // namespace jax_msa::sm90
