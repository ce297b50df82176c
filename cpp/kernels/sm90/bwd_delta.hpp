// Step 1 of the attention backwards (sparse and dense, both kernel
// families): the row terms delta [B, Sq, Hq] = rowsum(dout * out) - dlse,
// 0 for padded rows. No Hopper instruction: also built as sm_80 PTX
// (sparse_attention_bwd_prepare.cu).
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/sparse_block_index.hpp"

namespace jax_msa::sm90 {
namespace sparse_bwd {

using block_index::clamp_len;

constexpr int kHeadDim = 128;  // the only head dim of the backwards

// 16 lanes per row (8 elements each), 2 rows per warp.
template <class Element>
__device__ __forceinline__ float dot8(const uint4& x, const uint4& y) {
  const Element* a = reinterpret_cast<const Element*>(&x);
  const Element* b = reinterpret_cast<const Element*>(&y);
  float s = 0.0f;
  CUTE_UNROLL
  for (int e = 0; e < 8; ++e) s = fmaf(static_cast<float>(a[e]), static_cast<float>(b[e]), s);
  return s;
}

template <class Element>
__global__ void delta_kernel(const Element* __restrict__ out, const Element* __restrict__ dout,
                             const float* __restrict__ dlse, const int32_t* __restrict__ q_lengths,
                             float* __restrict__ delta, int64_t rows, int64_t Sq, int64_t Hq) {
  const int lane16 = threadIdx.x % 16;
  const int half = (threadIdx.x / 16) % 2;
  const int64_t warp = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32;
  const int64_t warps = gridDim.x * int64_t{blockDim.x} / 32;
  // The loop bound is uniform over the warp (both halves shuffle together).
  for (int64_t pair = warp; 2 * pair < rows; pair += warps) {
    const int64_t row = 2 * pair + half;
    bool valid = row < rows;
    float s = 0.0f;
    if (valid) {
      const int64_t b = row / (Sq * Hq);
      const int64_t i = (row / Hq) % Sq;
      valid = i < clamp_len(q_lengths, b, Sq);
    }
    if (valid) {
      const uint4 x = reinterpret_cast<const uint4*>(out + row * kHeadDim)[lane16];
      const uint4 y = reinterpret_cast<const uint4*>(dout + row * kHeadDim)[lane16];
      s = dot8<Element>(x, y);
    }
    CUTE_UNROLL
    for (int o = 8; o >= 1; o /= 2) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    if (lane16 == 0 && row < rows) delta[row] = valid ? s - (dlse ? dlse[row] : 0.0f) : 0.0f;
  }
}

// delta [B, Sq, Hq] (delta_kernel); of `a` only B, Sq, Hq and q_lengths matter.
template <class Element>
cudaError_t launch_delta(const cuda::SparseAttentionArgs& a, const void* out, const void* dout,
                         const float* dlse, float* delta, cudaStream_t stream) {
  const int64_t rows = a.B * a.Sq * a.Hq;
  if (rows == 0) return cudaSuccess;
  const int64_t grid = std::min<int64_t>((rows * 16 + 255) / 256, 132 * 16);
  delta_kernel<Element><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      static_cast<const Element*>(out), static_cast<const Element*>(dout), dlse, a.q_lengths,
      delta, rows, a.Sq, a.Hq);
  return cudaGetLastError();
}

}  // namespace sparse_bwd
}  // namespace jax_msa::sm90
