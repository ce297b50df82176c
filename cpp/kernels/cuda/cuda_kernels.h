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
// wgmma kernel (sm90/block_scores.cu) takes bfloat16 or float16 qi/ki with
// Di 64 or 128 (float32 inputs stay on the pure-JAX reference).
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

// The selection step of the indexer: exactly topk_select (same ids in the
// same slots, topk in [1, 64]), one warp per row instead of one CTA, which is
// faster for rows of up to a few thousand blocks (sm90/indexer_select.cu).
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

}  // namespace jax_msa::cuda
