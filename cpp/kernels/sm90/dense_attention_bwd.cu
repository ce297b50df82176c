// Dense flash-attention backward on SM90 (spec §3.6). Per call, all on
// `stream`:
//  1. delta [B, Sq, Hq] = rowsum(dout * out) - dlse (attention_bwd_delta,
//     shared with the portable family: bwd_delta.hpp);
//  2. dq_accum = 0, then dense_bwd_kernel (dense_attention_bwd_kernel.hpp):
//     a CTA per (key block (causal: a pair), kv head, batch row) holding K, V in shared
//     memory, streaming the Q, dO tiles that see the block (TMA), dK, dV
//     accumulated in registers and written whole; dQ tiles go to dq_accum by
//     TMA reduce-add;
//  3. dq = scale * dq_accum in q's dtype (dq_convert_kernel).
// dK / dV are deterministic; dq's float32 sums are not (summation order).
// The workspace's index and partial buffers are unused (size 0).
// The kernel's 80-row tiles take wgmma shapes (64 x 80 x 16) that CuTe
// declares only with its extended SM90 shapes; set before any CuTe header.
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1

#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/dense_attention_bwd_kernel.hpp"

namespace jax_msa::cuda {

bool dense_attention_bwd_args_valid(DType dtype, const DenseAttentionArgs& a) {
  // D = 128 (the kernel's only head dim); G <= 64 (kept from the KV-outer
  // backward, whose limit the Python side states; this kernel loops over
  // any G); TMA takes 32-bit extents; the grid has at most one CTA per (key block,
  // kv head, batch row).
  if ((dtype != DType::kBF16 && dtype != DType::kF16) || a.D != 128) return false;
  if (a.Hkv < 1 || a.Hq < a.Hkv || a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > 64) return false;
  if (a.B < 0 || a.B > INT_MAX || a.Hkv > INT_MAX || a.Sq < 0 || a.Sq >= INT_MAX) return false;
  if (a.Sk <= 0 || a.Sk > INT_MAX - 256) return false;
  const int64_t nb = (a.Sk + 127) / 128;
  return a.B * a.Hkv <= INT_MAX / nb;
}

KvOuterBwdWorkspace dense_attention_bwd_workspace(const DenseAttentionArgs& a) {
  KvOuterBwdWorkspace ws;
  ws.delta_floats = a.B * a.Sq * a.Hq;
  ws.index_ints = 0;  // no index: a key block's queries are whole row tiles
  ws.partial_floats = 0;  // every key block is one CTA's: dK / dV written whole
  ws.dq_accum_floats = a.B * a.Sq * a.Hq * a.D;
  return ws;
}

cudaError_t dense_attention_bwd(DType dtype, const DenseAttentionArgs& a, const void* out,
                                const float* lse, const void* dout, const float* dlse,
                                const DenseBwdWorkspacePtrs& ws, void* dq, void* dk, void* dv,
                                cudaStream_t stream) {
  if (!dense_attention_bwd_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(ws.dq_accum) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(dq) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  // The instantiations: {bf16, f16} x {causal, not}.
  using BF16 = cutlass::bfloat16_t;
  using F16 = cutlass::half_t;
  using Backward = cudaError_t (*)(const DenseAttentionArgs&, const float*, const void*,
                                   const float*, float*, void*, void*, void*, cudaStream_t);
  using sm90::dense_bwd::dkdv_dq;
  static constexpr Backward kBackward[2][2] = {{dkdv_dq<BF16, false>, dkdv_dq<BF16, true>},
                                               {dkdv_dq<F16, false>, dkdv_dq<F16, true>}};
  const cudaError_t st = attention_bwd_delta(dtype, a, out, dout, dlse, ws.delta, stream);
  if (st != cudaSuccess) return st;
  return kBackward[dtype == DType::kBF16 ? 0 : 1][a.causal ? 1 : 0](
      a, lse, dout, ws.delta, ws.dq_accum, dq, dk, dv, stream);
}

}  // namespace jax_msa::cuda
