// Internal interface of the KV-outer ("by block") sparse-attention forward
// (sparse_attention_fwd_by_block.cu): the chunk plan and a runner that takes
// an explicit plan (chunk size) and a schedule gate.
// The public entry points are cuda::sparse_attention_fwd_by_block_workspace
// and cuda::sparse_attention_fwd_by_block (cuda_kernels.h).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/dtype.h"
#include "kernels/sm90/schedule_gate.hpp"

namespace jax_msa::sm90::fwd_by_block {

// Default chunk policy: the partial buffer of one chunk stays within
// kPartialBudgetBytes, and the Q rows of one chunk within kChunkQBytes (so
// that the gathered Q rows of a chunk can stay in L2 while its buckets are
// processed).
constexpr int64_t kPartialBudgetBytes = int64_t{1} << 30;
constexpr int64_t kChunkQBytes = int64_t{32} << 20;
// The indexes (and reverse maps) of up to this many bytes' worth of chunks are
// built by one set of launches (index_windows chunks at a time).
constexpr int64_t kIndexBudgetBytes = int64_t{64} << 20;

// The int workspace: index_windows block indexes of index_ints each, then as
// many reverse maps of rev_ints each, then the ScheduleCosts; chunk n uses
// window n % index_windows.
struct Plan {
  int64_t chunk_tokens = 0;   // query tokens per chunk (Tc)
  int64_t nchunks = 0;        // ceil(Sq / Tc)
  int64_t index_ints = 0;     // the block index of one chunk (the larger of both chunk sizes), even
  int64_t rev_ints = 0;       // reverse map: B * Tc * Hkv * topk
  int64_t index_windows = 0;  // chunks whose indexes are built together
  int64_t entries = 0;        // index entries of a chunk at most: B * Hkv * Tc * topk
  int64_t o_bytes = 0;        // partial O: entries * G rows of D elements (16-bit), 256-aligned
  int64_t lse_bytes = 0;      // partial lse: entries * G floats
  int64_t rev_offset() const { return index_windows * index_ints; }
  // 8-byte aligned.
  int64_t costs_offset() const { return rev_offset() + (index_windows * rev_ints + 1) / 2 * 2; }
  int64_t workspace_ints() const { return costs_offset() + cuda::kScheduleCostsInts; }
  int64_t workspace_bytes() const { return o_bytes + lse_bytes; }
};

// The default chunk size for problem `a` (>= 1 when B * Sq > 0).
int64_t default_chunk_tokens(const cuda::SparseAttentionArgs& a);

// The plan for chunks of `chunk_tokens` query tokens (<= 0: the default).
Plan make_plan(const cuda::SparseAttentionArgs& a, int64_t chunk_tokens);

// sparse_attention_fwd_by_block with an explicit plan (from make_plan(a, ...)):
// index holds plan.workspace_ints() int32 (8-byte aligned), partial
// plan.workspace_bytes() bytes (16-byte aligned). Every kernel does nothing
// when `gate` is closed (schedule="auto").
cudaError_t run(DType dtype, const cuda::SparseAttentionArgs& a, const Plan& plan,
                int32_t* index, void* partial, void* out, float* lse, cudaStream_t stream,
                ScheduleGate gate = {});

}  // namespace jax_msa::sm90::fwd_by_block
