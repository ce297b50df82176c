// CPU kernels of jax_msa: the contract shared by the FFI handlers (cpp/ffi)
// and the implementations in this folder. All tensors are dense row-major.
//
// Positions (spec §2): query i of batch row b sits at
//   p = kv_lengths[b] - q_lengths[b] + i          (bottom-right alignment)
// Rows i >= q_lengths[b] are padding: out = 0, lse = -inf, ids = -1,
// scores = -inf, and they contribute no gradient.
// Key j of row b is visible to that query when j < kv_lengths[b] and, for
// causal masks, j <= p. Block c holds keys [c*kBlock, (c+1)*kBlock).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace jax_msa::cpu {

inline constexpr int64_t kBlock = 128;

using ::jax_msa::DType;

// scores[b,i,h,c] = max over visible j in block c of scale * <qi[b,i,h], ki[b,j]>,
// -inf where block c has no visible key (causal).
//   qi [B, Sq, Hi, Di], ki [B, Sk, Di], scores [B, Sq, Hi, ceil(Sk/kBlock)] float32.
void block_scores(DType dtype, const void* qi, const void* ki,
                  const int32_t* q_lengths, const int32_t* kv_lengths,
                  float* scores, int64_t B, int64_t Sq, int64_t Sk, int64_t Hi,
                  int64_t Di, float scale);

// The selection rule of spec §3.2 applied to scores [B, Sq, Hi, NB]:
// ids [B, Sq, Hi, topk] int32. Local block L = p / kBlock.
//  - L + 1 <= topk: ids = 0, 1, ..., L, then -1.
//  - otherwise: the topk-1 history blocks c < L of highest score (NaN ranks
//    as -inf, ties to the lower id), in descending (score, -id) order,
//    then L in slot topk-1.
void topk_select(const float* scores, const int32_t* q_lengths,
                 const int32_t* kv_lengths, int32_t* ids, int64_t B, int64_t Sq,
                 int64_t Hi, int64_t NB, int64_t topk);

// block_scores + topk_select fused per query (no score matrix in memory).
// lse [B, Sq, Hi] (may be nullptr: not computed) is the natural-log
// logsumexp of scale*<qi, ki[j]> over the visible keys of the selected blocks.
void indexer(DType dtype, const void* qi, const void* ki,
             const int32_t* q_lengths, const int32_t* kv_lengths, int32_t* ids,
             float* lse, int64_t B, int64_t Sq, int64_t Sk, int64_t Hi,
             int64_t Di, int64_t topk, float scale);

// One attention problem: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D],
// out [B, Sq, Hq, D] (dtype of q), lse [B, Sq, Hq] float32.
// Query head h uses kv head h / (Hq / Hkv).
struct AttentionProblem {
  int64_t B, Sq, Sk, Hq, Hkv, D;
  float scale;
};

// Which keys each query attends to.
//  - ids == nullptr: dense; every key j < kv_length, and j <= p if causal.
//  - ids != nullptr: sparse; ids [B, Sq, Hkv, topk] int32. Keys of every
//    selected block c with 0 <= c < ceil(kv_length / kBlock), j <= p and
//    j < kv_length. Other ids (-1, out of range) are skipped, never read.
//    Always causal. Duplicate ids: undefined result, memory safe.
struct KeySelection {
  const int32_t* ids;
  int64_t topk;
  bool causal;
};

// Empty attended set: out = 0, lse = -inf.
void attention_fwd(DType dtype, const AttentionProblem& problem,
                   const KeySelection& keys, const void* q, const void* k,
                   const void* v, const int32_t* q_lengths,
                   const int32_t* kv_lengths, void* out, float* lse);

// Gradients of out (cotangent dout, dtype of q) and of lse (cotangent dlse,
// float32 [B, Sq, Hq]) wrt q, k, v. out/lse are the forward's results.
// dk/dv sum over the query heads of each kv group. Deterministic.
void attention_bwd(DType dtype, const AttentionProblem& problem,
                   const KeySelection& keys, const void* q, const void* k,
                   const void* v, const void* out, const float* lse,
                   const void* dout, const float* dlse,
                   const int32_t* q_lengths, const int32_t* kv_lengths,
                   void* dq, void* dk, void* dv);

// ---------------------------------------------------------------------------
// Paged inference (spec §3.7).
//
// A paged cache holds pages [num_pages, heads, kBlock, dim] of `type`; the
// value of an element is stored * scale (per-tensor). page_table [B, max_pages]
// int32 maps the logical page c of request b (keys [c*kBlock, (c+1)*kBlock))
// to a physical page; entries < 0 or >= num_pages are holes: their keys are
// skipped and never read. kv_lengths [B] count every cached token of a request
// including its q_lengths[b] new queries (clamped to [0, max_pages * kBlock]);
// positions and padding follow the top of this file with Sk = max_pages*kBlock.
// The element type is a CacheType (kernels/dtype.h).

struct PagedCache {
  const void* data;
  CacheType type;
  float scale;
  int64_t num_pages, heads, dim;
};

struct PagedProblem {
  int64_t B, Q, Hq, Hkv, D, max_pages;
  float scale;
};

// Attention of q [B, Q, Hq, D] (dtype q_dtype) over the paged k/v caches
// (heads = Hkv, dim = D): every visible key when ids == nullptr, else the
// keys of the selected logical pages ids [B, Q, Hkv, topk] (as KeySelection's
// sparse case: -1, ids >= ceil(kv_length / kBlock) and holes are skipped).
// out [B, Q, Hq, D] in out_dtype, lse [B, Q, Hq] float32; empty set: 0, -inf.
void paged_attention(DType q_dtype, DType out_dtype, const PagedProblem& problem,
                     const PagedCache& k, const PagedCache& v, const int32_t* page_table,
                     const int32_t* q_lengths, const int32_t* kv_lengths, const int32_t* ids,
                     int64_t topk, const void* q, void* out, float* lse);

// The indexer (spec §3.3) over a paged index-key cache ki (heads = 1,
// dim = Di): qi [B, Q, Hi, Di] -> ids [B, Q, Hi, topk] by the rule of
// topk_select on the block scores of the logical pages (-inf for holes).
void paged_indexer(DType dtype, const void* qi, const PagedCache& ki, const int32_t* page_table,
                   const int32_t* q_lengths, const int32_t* kv_lengths, int32_t* ids,
                   int64_t B, int64_t Q, int64_t Hi, int64_t Di, int64_t max_pages,
                   int64_t topk, float scale);

// ---------------------------------------------------------------------------
// The indexer's KL loss (spec §3.8), before normalisation.
//
// q [B, Sq, Hq, D], k [B, Sk, Hkv, D] (problem, dtype), qi [B, Sq, Hkv, Di],
// ki [B, Sk, Di] (index_dtype), ids [B, Sq, Hkv, topk] selecting S(i, g) as
// KeySelection's sparse case. kl[b] = sum over the valid queries i and groups
// g of KL(P_t || P_s) (0 for an empty S). dqi, dki (dtype index_dtype; both
// nullptr: not computed) are the gradients of sum_b kl[b] wrt qi and ki.
// Deterministic.
void indexer_kl_loss(DType dtype, DType index_dtype, const AttentionProblem& problem,
                     const int32_t* ids, int64_t topk, int64_t Di, float index_scale,
                     const void* q, const void* k, const void* qi, const void* ki,
                     const int32_t* q_lengths, const int32_t* kv_lengths, float* kl, void* dqi,
                     void* dki);

}  // namespace jax_msa::cpu
