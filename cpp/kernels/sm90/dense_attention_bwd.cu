// Dense flash-attention backward on SM90 (spec §3.6): the KV-outer sparse
// backward's kernels (kv_outer_bwd.hpp) walked over a dense block -> queries
// index, in which bucket (batch row b, kv head g, key block c) holds the
// consecutive queries that see a key of block c (all q_len of them without
// the causal mask, those from the diagonal on with it).
//
// Per call, all on `stream`:
//  1. delta [B, Sq, Hq] = rowsum(dout * out) - dlse (delta_kernel);
//  2. the dense index (build_dense_index, one small kernel: bucket sizes
//     from the lengths, their tile offsets by a scan);
//  3. dq_accum = 0, then the dK / dV kernel with the fused dQ: the index's
//     tiles (64 (token, head) rows: floor(64 / G) tokens x the G query heads
//     of kv head g) are split evenly over one wave of CTAs, whatever the
//     causal triangle, each CTA keeping K_c, V_c in shared memory (TMA),
//     streaming its tiles' Q, dO, lse, delta (cp.async ring, producer
//     warpgroup) and accumulating dK, dV of the block in registers (two
//     consumer warpgroups of 64 keys, ping-pong); dQ_tile = dS K_c goes to
//     dq_accum by red.global.add. The GQA group's heads share each tile, so
//     dK / dV sum over them in registers;
//  4. finish_kernel: the fixed-order sum of buckets split between CTAs
//     (zeros for buckets no query sees); dq_convert_kernel: dq = scale *
//     dq_accum in q's dtype.
// dK / dV are deterministic; dq's float32 sums are not (summation order).
#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/kv_outer_bwd.hpp"
#include "kernels/sm90/sparse_block_index.hpp"

namespace jax_msa::sm90 {
namespace {

using block_index::Geometry;

// The dense problem as the KV-outer backward sees it (no ids).
cuda::SparseAttentionArgs kv_outer_args(const cuda::DenseAttentionArgs& a) {
  cuda::SparseAttentionArgs s{};
  s.q = a.q, s.k = a.k, s.v = a.v, s.ids = nullptr;
  s.q_lengths = a.q_lengths, s.kv_lengths = a.kv_lengths;
  s.B = a.B, s.Sq = a.Sq, s.Sk = a.Sk, s.Hq = a.Hq, s.Hkv = a.Hkv, s.D = a.D;
  s.topk = 0;  // Geometry::dense sets it
  s.scale = a.scale;
  return s;
}

template <class Element, bool kCausal>
cudaError_t backward(const cuda::DenseAttentionArgs& a, const void* out, const float* lse,
                     const void* dout, const float* dlse, const cuda::DenseBwdWorkspacePtrs& ws,
                     void* dq, void* dk, void* dv, cudaStream_t stream) {
  const cuda::SparseAttentionArgs s = kv_outer_args(a);
  const Geometry geo = Geometry::dense(s);
  cudaError_t st = sparse_bwd::launch_delta<Element>(s, out, dout, dlse, ws.delta, stream);
  if (st != cudaSuccess) return st;
  st = block_index::build_dense_index(geo, a.q_lengths, a.kv_lengths, kCausal, ws.index, stream);
  if (st != cudaSuccess) return st;
  return sparse_bwd::dkdv<Element, kCausal, true>(s, geo, lse, dout, ws.delta, ws.index, ws.partial,
                                                  ws.dq_accum, dq, dk, dv, stream, nullptr);
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool dense_attention_bwd_args_valid(DType dtype, const DenseAttentionArgs& a) {
  // D = 128 (the KV-outer kernels' only head dim), G <= 64 (a tile holds all
  // of a token's heads); TMA takes 32-bit extents; finish_kernel's grid is
  // one CTA per bucket.
  if ((dtype != DType::kBF16 && dtype != DType::kF16) || a.D != 128) return false;
  if (a.Hkv < 1 || a.Hq < a.Hkv || a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > 64) return false;
  if (a.B < 0 || a.B > INT_MAX || a.Hkv > INT_MAX || a.Sq < 0 || a.Sq >= INT_MAX) return false;
  if (a.Sk <= 0 || a.Sk > INT_MAX - 256) return false;
  const int64_t nb = (a.Sk + 127) / 128;
  return a.B * a.Hkv <= INT_MAX / nb;
}

KvOuterBwdWorkspace dense_attention_bwd_workspace(const DenseAttentionArgs& a) {
  const cuda::SparseAttentionArgs s = sm90::kv_outer_args(a);
  const sm90::Geometry geo = sm90::Geometry::dense(s);
  return sm90::sparse_bwd::workspace_sizes(s, geo, geo.index_ints);
}

cudaError_t dense_attention_bwd(DType dtype, const DenseAttentionArgs& a, const void* out,
                                const float* lse, const void* dout, const float* dlse,
                                const DenseBwdWorkspacePtrs& ws, void* dq, void* dk, void* dv,
                                cudaStream_t stream) {
  if (!dense_attention_bwd_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(ws.index) % 8 != 0 ||
      reinterpret_cast<uintptr_t>(ws.dq_accum) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(dq) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  // The instantiations: {bf16, f16} x {causal, not}.
  using BF16 = cutlass::bfloat16_t;
  using F16 = cutlass::half_t;
  using Backward = cudaError_t (*)(const DenseAttentionArgs&, const void*, const float*,
                                   const void*, const float*, const DenseBwdWorkspacePtrs&, void*,
                                   void*, void*, cudaStream_t);
  static constexpr Backward kBackward[2][2] = {
      {sm90::backward<BF16, false>, sm90::backward<BF16, true>},
      {sm90::backward<F16, false>, sm90::backward<F16, true>}};
  return kBackward[dtype == DType::kBF16 ? 0 : 1][a.causal ? 1 : 0](a, out, lse, dout, dlse, ws,
                                                                     dq, dk, dv, stream);
}

}  // namespace jax_msa::cuda
