// Backward of block-sparse attention (spec §3.4) on SM90: the row terms
// delta, the block -> queries index and dK / dV (KV-outer). dQ: by default
// fused into the dK / dV kernel (dQ_tile = dS K_c per tile, float32
// red.global.add into a zeroed dq_accum workspace, then dq_convert_kernel):
// each selected block is visited once whatever the pattern, whereas the
// query-outer sparse_attention_bwd_dq (another file; the `deterministic`
// path, bitwise reproducible) walks the union of a tile's blocks and wastes
// most of its work on indexer-like ids. Only dq's summation order varies in
// the fused path; dK / dV stay deterministic.
//
// sparse_attention_bwd_prepare (sparse_attention_bwd_prepare.cu, shared with
// the portable family; all on `stream`, no host sync):
//  1. delta [B, Sq, Hq] = sum_d dout * out - dlse (0 for padded rows);
//  2. the index (block_index::build_block_index, sparse_block_index.cu,
//     shared with the by-block forward): a stable counting sort of the
//     (query, selected block) pairs by block, per (batch row, kv head). Queries are cut into chunks of
//     `chunk_tokens`; a histogram [chunk][block] (integer atomics: order
//     free), an exclusive scan of each block's column over the chunks, a scan
//     of the bucket sizes (entry offsets) and of their tile counts (tile
//     offsets), then one warp per chunk scatters its queries in increasing
//     order (ranks from __match_any_sync, running counters per block). The
//     result is deterministic and every bucket is sorted by query index.
//
// sparse_attention_bwd_dkdv:
//  - dkdv_kernel: all buckets' tiles (64 (token, head) rows each) form one
//    sequence of Ttot tiles; CTA s of the `ctas` CTAs (one wave) takes tiles
//    [s * chunk, (s + 1) * chunk), chunk = ceil(Ttot / ctas): the same work
//    for every CTA whatever the bucket sizes. Its range covers one or more
//    buckets ("segments"); a segment that is a whole bucket is written to
//    dk / dv directly, a piece of a bucket split between CTAs goes to a
//    float32 partial slot (2s for the CTA's first segment, 2s + 1 for its
//    last). Per segment: K_c, V_c by TMA (zero fill past Sk), the tiles'
//    Q / dO rows gathered by cp.async, wgmma products (see
//    sparse_bwd_traits.hpp), dK / dV accumulated in registers. The two
//    consumer warpgroups take turns issuing their products (ping-pong), and
//    each queues its next tile's S^T behind its current dV / dK products.
//  - finish_kernel: per bucket, the fixed-order sum of its partial slots
//    (split buckets) or zeros (empty buckets); whole buckets are left alone.
// No atomics decide any result: the output is deterministic for a given
// device (the split into `ctas` = min(SM count, 132) ranges fixes the order).
//
// Workspace (sparse_attention_bwd_workspace, elements): delta B*Sq*Hq floats;
// index 6 + 5*nbkt + B*Hkv*nchunks*nb + B*Hkv*Sq*topk ints (nb = ceil(Sk/128),
// nbkt = B*Hkv*nb, nchunks = ceil(Sq / chunk_tokens), chunk_tokens the
// smallest 64 * 2^j with 512 chunks covering Sq), 8-byte aligned; partial
// 2 * min(132, tiles_bound) * 2 * 128 * 128 floats (at most 34.6 MB),
// tiles_bound = ceil(B*Hkv*Sq*topk / floor(64/G)) + nbkt. None needs zeroing.
//
// Measured (H200, bf16, B=1, Hq=16, Hkv=1, topk=16, window ids; useful FLOPs
// 4 GEMMs x 2 x 128 per (query row, attended key)): T=32K dkdv 1.87 ms
// (552 TFLOP/s), prepare 0.12 ms; T=128K dkdv 8.6 ms (491 TFLOP/s, the SM
// clock drops to ~1.76 GHz under this load), prepare 0.38 ms.
#include "kernels/sm90/kv_outer_bwd.hpp"

namespace jax_msa::cuda {

KvOuterBwdWorkspace sparse_attention_bwd_workspace(const SparseAttentionArgs& a) {
  const sm90::sparse_bwd::Geometry geo(a);
  KvOuterBwdWorkspace ws;
  ws.delta_floats = a.B * a.Sq * a.Hq;
  // The ScheduleCosts (8-byte aligned) after the index.
  ws.index_ints = geo.nbkt > 0 ? (geo.index_ints + 1) / 2 * 2 + kScheduleCostsInts : 0;
  const int64_t slots =
      2 * std::min<int64_t>(sm90::sparse_bwd::kMaxCtas, geo.nbkt > 0 ? geo.tiles_bound : 0);
  ws.partial_floats = slots * sm90::sparse_bwd::kSlotFloats;
  ws.dq_accum_floats = a.B * a.Sq * a.Hq * a.D;
  return ws;
}

cudaError_t sparse_attention_bwd_dkdv(DType dtype, const SparseAttentionArgs& a, const float* lse,
                                      const void* dout, const float* delta, const int32_t* index,
                                      float* partial, float* dq_accum, void* dq, void* dk,
                                      void* dv, cudaStream_t stream, const ScheduleCosts* costs) {
  if (!sparse_attention_bwd_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(index) % 8 != 0) return cudaErrorInvalidValue;
  if (dq_accum != nullptr && (reinterpret_cast<uintptr_t>(dq_accum) % 16 != 0 ||
                              reinterpret_cast<uintptr_t>(dq) % 16 != 0)) {
    return cudaErrorInvalidValue;
  }
  if (costs != nullptr && dq_accum == nullptr) return cudaErrorInvalidValue;
  return dtype == DType::kBF16
             ? sm90::sparse_bwd::dkdv<cutlass::bfloat16_t>(a, lse, dout, delta, index, partial,
                                                           dq_accum, dq, dk, dv, stream, costs)
             : sm90::sparse_bwd::dkdv<cutlass::half_t>(a, lse, dout, delta, index, partial,
                                                       dq_accum, dq, dk, dv, stream, costs);
}

}  // namespace jax_msa::cuda
