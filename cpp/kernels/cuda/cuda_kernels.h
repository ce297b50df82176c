// CUDA kernels of jax_msa. Each function mirrors the function of the same
// name in cpu/cpu_kernels.h (same semantics, shapes and positions, spec
// §2-§3) and differs only in how it runs:
//  - every pointer is a device pointer;
//  - the work is enqueued on `stream`, asynchronously: nothing syncs the
//    host, nothing allocates, so every call is safe under CUDA graph capture;
//  - the result is the launch error (cudaSuccess when enqueued), never an
//    abort; arguments outside the supported range give cudaErrorInvalidValue
//    and launch nothing.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/dtype.h"

namespace jax_msa::cuda {

// The selection rule of spec §3.2 (cpu::topk_select):
// scores [B, Sq, Hi, NB] float32 -> ids [B, Sq, Hi, topk] int32.
// Supports topk in [1, 64]; the history entries come out in descending
// (score, -id) order, exactly as on the CPU.
cudaError_t topk_select(const float* scores, const int32_t* q_lengths,
                        const int32_t* kv_lengths, int32_t* ids, int64_t B,
                        int64_t Sq, int64_t Hi, int64_t NB, int64_t topk,
                        cudaStream_t stream);

// Whether block_scores / indexer have a kernel for these inputs: the SM90
// wgmma kernel (sm90/block_scores.cu) and the portable one
// (portable/block_scores.cu) take bfloat16 or float16 qi/ki with Di 64 or 128
// (float32 inputs stay on the pure-JAX reference).
bool block_scores_supported(DType dtype, int64_t Di);

// Block scores of spec §3.1 (cpu::block_scores): qi [B, Sq, Hi, Di],
// ki [B, Sk, Di] -> scores [B, Sq, Hi, ceil(Sk/128)] float32. Every entry is
// written (-inf past each row's local block and for padded rows). The max
// ignores NaN products (fmax), unlike the CPU kernel, which propagates them.
cudaError_t block_scores(DType dtype, const void* qi, const void* ki,
                         const int32_t* q_lengths, const int32_t* kv_lengths,
                         float* scores, int64_t B, int64_t Sq, int64_t Sk,
                         int64_t Hi, int64_t Di, float scale,
                         cudaStream_t stream);

// The block scores the selection needs (the first step of the indexer on
// CUDA): as block_scores, except that entries past the last local block of
// each 128-row tile are left unwritten (topk_select and selected_lse never
// read them). With sums not null, also sums [B, Sq, Hi, NB]: the sum over the
// block's visible keys of exp(s - scores).
cudaError_t indexer_scores(DType dtype, const void* qi, const void* ki,
                           const int32_t* q_lengths, const int32_t* kv_lengths,
                           float* scores, float* sums, int64_t B, int64_t Sq,
                           int64_t Sk, int64_t Hi, int64_t Di, float scale,
                           cudaStream_t stream);

// The same two from the portable family (kernels/portable/block_scores.cu:
// sm_80 instructions only; kernel_family.h says when it serves).
cudaError_t portable_block_scores(DType dtype, const void* qi, const void* ki,
                                  const int32_t* q_lengths, const int32_t* kv_lengths,
                                  float* scores, int64_t B, int64_t Sq, int64_t Sk,
                                  int64_t Hi, int64_t Di, float scale,
                                  cudaStream_t stream);
cudaError_t portable_indexer_scores(DType dtype, const void* qi, const void* ki,
                                    const int32_t* q_lengths, const int32_t* kv_lengths,
                                    float* scores, float* sums, int64_t B, int64_t Sq,
                                    int64_t Sk, int64_t Hi, int64_t Di, float scale,
                                    cudaStream_t stream);
// block_scores and indexer_scores from the Blackwell family (kernels/sm100/:
// tcgen05 MMA, sm_100a code only; cudaErrorNoKernelImageForDevice on any card
// other than compute capability 10.0). Same contracts.
cudaError_t sm100_block_scores(DType dtype, const void* qi, const void* ki,
                               const int32_t* q_lengths, const int32_t* kv_lengths, float* scores,
                               int64_t B, int64_t Sq, int64_t Sk, int64_t Hi, int64_t Di,
                               float scale, cudaStream_t stream);
cudaError_t sm100_indexer_scores(DType dtype, const void* qi, const void* ki,
                                 const int32_t* q_lengths, const int32_t* kv_lengths,
                                 float* scores, float* sums, int64_t B, int64_t Sq, int64_t Sk,
                                 int64_t Hi, int64_t Di, float scale, cudaStream_t stream);

// The selection step of the indexer: exactly topk_select (same ids in the
// same slots, topk in [1, 64]), one warp per row instead of one CTA, which is
// faster for rows of up to kWarpSelectMaxBlocks blocks, whose scores it holds
// in registers (sm90/indexer_select.cu); it also serves topk_select there.
constexpr int64_t kWarpSelectMaxBlocks = 1024;
cudaError_t indexer_select(const float* scores, const int32_t* q_lengths,
                           const int32_t* kv_lengths, int32_t* ids, int64_t B,
                           int64_t Sq, int64_t Hi, int64_t NB, int64_t topk,
                           cudaStream_t stream);

// lse [rows] of spec §3.3 from indexer_scores' (scores, sums) [rows, NB] and
// the selection ids [rows, topk]: logsumexp over the selected blocks
// (ids outside [0, NB) skipped; -inf when none).
cudaError_t selected_lse(const float* scores, const float* sums,
                         const int32_t* ids, float* lse, int64_t rows,
                         int64_t NB, int64_t topk, cudaStream_t stream);

// ---- Paged inference (spec §3.7) on SM90 -----------------------------------

// The operands of paged_indexer (cpu::paged_indexer), without its ids.
struct PagedIndexerArgs {
  const void* qi;             // [B, Q, Hi, Di]; 16-byte aligned
  const void* ki_cache;       // [num_pages, 128, Di]; 16-byte aligned
  const float* ki_scale;      // float32 scalar, read by the kernel (never by the host)
  const int32_t* page_table;  // [B, max_pages]; entries < 0 or >= num_pages are holes
  const int32_t* q_lengths;   // [B]
  const int32_t* kv_lengths;  // [B]
  int64_t B, Q, Hi, Di, num_pages, max_pages;
  float scale;
};

// Whether paged_indexer_scores takes these inputs: bfloat16 or float16 qi
// with Di 64 or 128, and a cache of qi's type or e4m3 (the MMA runs in qi's
// type, which holds either exactly).
bool paged_indexer_scores_supported(DType dtype, CacheType cache, int64_t Di);

// The block scores paged_indexer's selection reads (its first step on CUDA;
// indexer_select with Sq = Q and NB = max_pages is the second):
// scores [B, Q, Hi, max_pages] float32, scores[b, t, h, c] = the max over the
// 128 keys of page page_table[b, c] of scale * ki_scale * <qi[b, t, h], key>,
// NaN where a product is NaN, -inf for a hole (never read). Written only for
// the valid queries t < q_len and the pages c before the local page of the
// last one (lengths clamped to [0, Q] and [0, max_pages * 128], positions
// kv_len - q_len + t), all fully visible; every other entry is left
// unwritten: indexer_select never reads it.
cudaError_t paged_indexer_scores(DType dtype, CacheType cache, const PagedIndexerArgs& a,
                                 float* scores, cudaStream_t stream);

// The operands of paged_attention (cpu::paged_attention).
struct PagedAttentionArgs {
  const void* q;              // [B, Q, Hq, D]; 16-byte aligned
  const void* k_cache;        // [num_pages, Hkv, 128, D]; 16-byte aligned
  const void* v_cache;        // same shape and type as k_cache
  const float* k_scale;       // float32 scalars, read by the kernel (never by the host)
  const float* v_scale;
  const int32_t* page_table;  // [B, max_pages]; entries < 0 or >= num_pages are holes
  const int32_t* q_lengths;   // [B]
  const int32_t* kv_lengths;  // [B]
  const int32_t* ids;         // [B, Q, Hkv, topk] logical pages; null: dense
  int64_t B, Q, Hq, Hkv, D, num_pages, max_pages, topk;  // topk 0: dense
  float scale;
  int64_t splits;  // CTAs sharing one tile's pages (split-KV), >= 1
};

// Whether paged_attention takes these inputs: bfloat16 or float16 q with
// D = 128, G = Hq / Hkv <= 128, topk <= 64, and caches both of q's type or
// both e4m3 (then both products are e4m3 wgmma: q rounded to e4m3 per row
// with a power-of-two scale, P scaled by 2^8 and rounded to e4m3).
bool paged_attention_supported(DType q_dtype, CacheType cache, const PagedAttentionArgs& a);

// The CTAs per tile that paged_attention's callers should pass as a.splits
// (a.splits is ignored here): about one wave over the device's SMs, each CTA
// with >= 4 pages to read, 1 when the tiles alone fill the device.
int64_t paged_attention_splits(const PagedAttentionArgs& a);

// Float32 elements of paged_attention's workspace: per split, every output
// row's partial O [D] and its lse.
int64_t paged_attention_workspace_floats(const PagedAttentionArgs& a);

// out [B, Q, Hq, D] (out_dtype), lse [B, Q, Hq] float32 of cpu::paged_attention:
// the (request, kv head, query chunk) tiles' pages are split over a.splits
// CTAs whose partials (in `workspace`, 16-byte aligned, not zeroed) an
// lse-weighted combine merges. Holes and invalid ids are skipped, never read.
cudaError_t paged_attention(DType q_dtype, CacheType cache, DType out_dtype,
                            const PagedAttentionArgs& a, float* workspace, void* out, float* lse,
                            cudaStream_t stream);

// The same from the portable family (kernels/portable/: mma.sync on any GPU
// since sm_80; the same cases, splits and workspace; e4m3 pages widened to
// float16, q rounded to float16 with a power-of-two scale per row).
cudaError_t portable_paged_attention(DType q_dtype, CacheType cache, DType out_dtype,
                                     const PagedAttentionArgs& a, float* workspace, void* out,
                                     float* lse, cudaStream_t stream);

// ---- Block-sparse attention (spec §3.4) on SM90 ----------------------------
// One problem: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (bf16 or fp16),
// ids [B, Sq, Hkv, topk] int32, lengths [B] int32, scale > 0 or < 0.
// Query head h uses kv head h / (Hq / Hkv). Attended set of query i (row b,
// position p = kv_len - q_len + i): keys j of every selected block c with
// 0 <= c < ceil(kv_len / 128), j <= p, j < kv_len; other ids (-1, out of
// range, c > p / 128) are skipped and never read. Padded rows (i >= q_len):
// out 0, lse -inf, no gradient.
struct SparseAttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* ids;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  int64_t B, Sq, Sk, Hq, Hkv, D, topk;
  float scale;
};

// Whether the SM90 sparse-attention kernels take these inputs: bf16/fp16,
// D == 128, group Hq / Hkv <= 64, topk in [1, 64].
bool sparse_attention_supported(DType dtype, int64_t D, int64_t group, int64_t topk);

// sparse_attention_supported plus the size limits of the kernels:
// 0 < Sk <= 2^31 - 257, B * Hkv <= 65535.
bool sparse_attention_args_valid(DType dtype, const SparseAttentionArgs& a);

// The device-side choice between the query-outer kernels and the KV-outer
// ones (schedule="auto" forward, default backward): sums over the query-outer
// tiles of the blocks in each tile's union and of the attended (token, slot)
// pairs. sparse_schedule_costs zeroes `costs` (device memory, 8-byte aligned)
// and enqueues the sums; the kernels of both ways read them and those of the
// losing way return at once (no host sync).
struct ScheduleCosts {
  unsigned long long union_blocks;
  unsigned long long attended;
  // The (consumer warpgroup, union block) pairs the query-outer forward walks:
  // a warpgroup leaves out the blocks none of its tokens selected.
  unsigned long long walked_blocks;
};
// Its size in workspace ints.
constexpr int64_t kScheduleCostsInts = sizeof(ScheduleCosts) / 4;
cudaError_t sparse_schedule_costs(DType dtype, const SparseAttentionArgs& a, ScheduleCosts* costs,
                                  cudaStream_t stream);

// Forward: out [B, Sq, Hq, D] (dtype of q), lse [B, Sq, Hq] float32.
cudaError_t sparse_attention_fwd(DType dtype, const SparseAttentionArgs& a, void* out,
                                 float* lse, cudaStream_t stream);
// The same forward from the portable family (kernels/portable/: sm_80
// instructions only; kernel_family.h says when it serves).
cudaError_t portable_sparse_attention_fwd(DType dtype, const SparseAttentionArgs& a, void* out,
                                          float* lse, cudaStream_t stream);
// The same forward from the Blackwell family (kernels/sm100/: tcgen05 MMA,
// sm_100a code only; cudaErrorNoKernelImageForDevice on any card other than
// compute capability 10.0).
cudaError_t sm100_sparse_attention_fwd(DType dtype, const SparseAttentionArgs& a, void* out,
                                       float* lse, cudaStream_t stream);

// Backward workspace, in elements, for the problem `a` (host function; the
// FFI layer asks XLA for these buffers as extra results).
// The workspaces of the KV-outer backwards (sparse and dense), in elements.
struct KvOuterBwdWorkspace {
  int64_t delta_floats;     // float32 [B, Sq, Hq]: the row terms rowsum(dout * out) - dlse
  int64_t index_ints;       // int32: the block -> queries index (sparse: then, when not
                            // empty, the ScheduleCosts in its last kScheduleCostsInts)
  int64_t partial_floats;   // float32: dK / dV sums of key blocks split between CTAs (may be 0)
  int64_t dq_accum_floats;  // float32 [B, Sq, Hq, D]: fused dQ sums (sparse: the
                            // non-deterministic path only)
};
KvOuterBwdWorkspace sparse_attention_bwd_workspace(const SparseAttentionArgs& a);

// Whether the sparse backward (both families) takes these inputs:
// sparse_attention_args_valid plus the block index's limits (Sk, B, Hkv <=
// INT_MAX and the index's chunk and bucket counts).
bool sparse_attention_bwd_args_valid(DType dtype, const SparseAttentionArgs& a);

// Backward step 1: delta [B, Sq, Hq] = sum_d dout * out - dlse (0 for padded
// rows) and the block -> queries index (for each (b, kv head, block) the
// queries that selected the block, in increasing order).
cudaError_t sparse_attention_bwd_prepare(DType dtype, const SparseAttentionArgs& a,
                                         const void* out, const void* dout, const float* dlse,
                                         float* delta, int32_t* index, cudaStream_t stream);

// Backward step 2: dk, dv [B, Sk, Hkv, D] (dtype of k), summed over the query
// heads of each group, zero for keys no query attends; deterministic. With
// dq_accum (dq_accum_floats, 16-byte aligned, zeroed here) it also computes dq
// [B, Sq, Hq, D] in the same pass (float32 atomic sums: not bitwise
// reproducible, but no second walk over the selection); with dq_accum null,
// dq is left to step 3. With `costs` (sparse_schedule_costs, and dq_accum
// given) both are enqueued and the device runs one: the fused pass, or dk / dv
// alone when step 3 (given the same costs) wins, on small tile unions
// (window-like ids).
cudaError_t sparse_attention_bwd_dkdv(DType dtype, const SparseAttentionArgs& a,
                                      const float* lse, const void* dout, const float* delta,
                                      const int32_t* index, float* partial, float* dq_accum,
                                      void* dq, void* dk, void* dv, cudaStream_t stream,
                                      const ScheduleCosts* costs = nullptr);

// Backward step 3: dq [B, Sq, Hq, D] (dtype of q), query-outer. Deterministic.
// With `costs`, it runs only where the device picks it over the fused dq.
cudaError_t sparse_attention_bwd_dq(DType dtype, const SparseAttentionArgs& a, const float* lse,
                                    const void* dout, const float* delta, void* dq,
                                    cudaStream_t stream, const ScheduleCosts* costs = nullptr);

// Backward step 3 from the portable family (kernels/portable/; step 1,
// sparse_attention_bwd_prepare, serves both families, and step 2 is
// portable_sparse_attention_bwd_dkdv below): dq [B, Sq, Hq, D] (dtype of q),
// query-outer, deterministic.
cudaError_t portable_sparse_attention_bwd_dq(DType dtype, const SparseAttentionArgs& a,
                                             const float* lse, const void* dout,
                                             const float* delta, void* dq, cudaStream_t stream);

// ---- Block-sparse attention forward, KV-outer ("by block") -----------------
// The forward of sparse_attention_fwd (same arguments, same results up to
// rounding: out in q's dtype, lse float32), computed per selected block
// instead of per query tile: for each (b, kv head, block) the (token, head)
// rows that selected it, then a per-row merge of the blocks' partial results
// by their lse (sm90/sparse_attention_fwd_by_block.cu). Its cost does not
// depend on how many blocks neighbouring tokens share (the indexer's
// patterns), at the price of a partial-output round trip through memory.
// (Duplicate ids in a row, a caller error, count once per slot here.)
// Queries run in chunks of tokens so that the workspace stays bounded
// (partial <= 1 GiB). Workspace (host function; the FFI layer asks XLA for
// these buffers): index_ints int32 (8-byte aligned), partial_bytes bytes
// (16-byte aligned); neither needs zeroing.
struct SparseFwdByBlockWorkspace {
  int64_t index_ints;     // int32: the block -> queries index of a chunk + its reverse map
  int64_t partial_bytes;  // bytes: partial O (16-bit) and lse (float32) of a chunk
};
SparseFwdByBlockWorkspace sparse_attention_fwd_by_block_workspace(const SparseAttentionArgs& a);

// Forward: out [B, Sq, Hq, D] (dtype of q), lse [B, Sq, Hq] float32 (may be
// null). Deterministic. Asynchronous, no allocation, no host sync.
cudaError_t sparse_attention_fwd_by_block(DType dtype, const SparseAttentionArgs& a,
                                          int32_t* index, void* partial, void* out, float* lse,
                                          cudaStream_t stream);

// schedule="auto": the query-outer forward or the by-block one, picked on the
// device from the ids (sm90/schedule_gate.hpp): both are enqueued and the
// kernels of the one not picked return at once. Same workspace as
// sparse_attention_fwd_by_block (its last 4 ints hold the two cost sums);
// asynchronous, no allocation, no host sync.
cudaError_t sparse_attention_fwd_auto(DType dtype, const SparseAttentionArgs& a, int32_t* index,
                                      void* partial, void* out, float* lse, cudaStream_t stream);

// ---- Dense attention (spec §3.6) on SM90 ------------------------------------
// The forward of cpu::attention_fwd with a dense selection: q [B, Sq, Hq, D],
// k/v [B, Sk, Hkv, D] (bf16 or fp16), lengths [B] int32 (clamped to [0, Sq]
// and [0, Sk]), query i of row b at position kv_len - q_len + i; it sees the
// keys j < kv_len, and j <= position when causal. Padded rows and rows that
// see no key: out 0, lse -inf.
struct DenseAttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  int64_t B, Sq, Sk, Hq, Hkv, D;
  float scale;
  bool causal;
};

// Whether the SM90 dense kernel takes these inputs: bf16/fp16 with D 128 or 64.
bool dense_attention_supported(DType dtype, int64_t D);

// dense_attention_supported plus the size limits of the kernel:
// Hq % Hkv == 0, 0 < Sk <= 2^31 - 257, ceil(Sq / 128) * B * Hq < 2^31.
bool dense_attention_args_valid(DType dtype, const DenseAttentionArgs& a);

// Forward: out [B, Sq, Hq, D] (dtype of q), lse [B, Sq, Hq] float32.
// Asynchronous, no allocation, no host sync.
cudaError_t dense_attention_fwd(DType dtype, const DenseAttentionArgs& a, void* out, float* lse,
                                cudaStream_t stream);
// The same forward from the portable family (kernels/portable/; G <= 128).
cudaError_t portable_dense_attention_fwd(DType dtype, const DenseAttentionArgs& a, void* out,
                                         float* lse, cudaStream_t stream);
// The same forward from the Blackwell family (kernels/sm100/; D = 128,
// G <= 128; compute capability 10.0 only, as sm100_sparse_attention_fwd).
cudaError_t sm100_dense_attention_fwd(DType dtype, const DenseAttentionArgs& a, void* out,
                                      float* lse, cudaStream_t stream);

// The dK / dV of the sparse (backward step 2, without dq) and dense
// backwards from the portable family: dk, dv [B, Sk, Hkv, D] (dtype of k),
// summed over the query heads of each group, zero for keys no query attends;
// deterministic. lse [B, Sq, Hq] is the forward's, dout [B, Sq, Hq, D] in q's
// dtype, delta [B, Sq, Hq] = rowsum(dout * out) - dlse (0 for padded rows);
// the sparse one walks `index` from sparse_attention_bwd_prepare. Same
// argument limits as the SM90 backwards. Asynchronous, no workspace.
cudaError_t portable_sparse_attention_bwd_dkdv(DType dtype, const SparseAttentionArgs& a,
                                               const float* lse, const void* dout,
                                               const float* delta, const int32_t* index,
                                               void* dk, void* dv, cudaStream_t stream);
cudaError_t portable_dense_attention_bwd_dkdv(DType dtype, const DenseAttentionArgs& a,
                                              const float* lse, const void* dout,
                                              const float* delta, void* dk, void* dv,
                                              cudaStream_t stream);

// Whether the SM90 dense backward takes these inputs: bf16/fp16, D = 128,
// Hq / Hkv <= 64, 0 < Sk <= 2^31 - 257, Sq < 2^31, B * Hkv * ceil(Sk / 128) < 2^31.
bool dense_attention_bwd_args_valid(DType dtype, const DenseAttentionArgs& a);

// Backward workspace, in elements (host function; the FFI layer asks XLA for
// these buffers as extra results). None needs zeroing.
KvOuterBwdWorkspace dense_attention_bwd_workspace(const DenseAttentionArgs& a);

// The index and partial workspaces of KvOuterBwdWorkspace are empty here.
struct DenseBwdWorkspacePtrs {
  float* delta;
  float* dq_accum;  // 16-byte aligned
};

// Backward of dense_attention_fwd (cpu::attention_bwd with a dense
// selection): dq [B, Sq, Hq, D] (dtype of q), dk, dv [B, Sk, Hkv, D] (dtype of
// k) from out, lse (the forward's), dout and dlse [B, Sq, Hq] float32 (may be
// null: zero). Padded rows and keys get zero gradients. dk / dv are
// deterministic; dq is a float32 atomic sum (rounding may vary run to run).
// Asynchronous, no allocation, no host sync.
cudaError_t dense_attention_bwd(DType dtype, const DenseAttentionArgs& a, const void* out,
                                const float* lse, const void* dout, const float* dlse,
                                const DenseBwdWorkspacePtrs& ws, void* dq, void* dk, void* dv,
                                cudaStream_t stream);

// Step 1 of both dense backwards: delta [B, Sq, Hq] = rowsum(dout * out) - dlse
// (dlse may be null: zero), 0 for padded rows; D = 128.
cudaError_t attention_bwd_delta(DType dtype, const DenseAttentionArgs& a, const void* out,
                                const void* dout, const float* dlse, float* delta,
                                cudaStream_t stream);

// The dense backward's dq from the portable family (kernels/portable/; the
// inputs of dense_attention_bwd_args_valid), after attention_bwd_delta:
// query-outer, deterministic (dk, dv: portable_dense_attention_bwd_dkdv).
cudaError_t portable_dense_attention_bwd_dq(DType dtype, const DenseAttentionArgs& a,
                                            const float* lse, const void* dout,
                                            const float* delta, void* dq, cudaStream_t stream);

}  // namespace jax_msa::cuda
