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

namespace jax_msa::cuda {

// The selection rule of spec §3.2 (cpu::topk_select):
// scores [B, Sq, Hi, NB] float32 -> ids [B, Sq, Hi, topk] int32.
// Supports topk in [1, 64]; the history entries come out in descending
// (score, -id) order, exactly as on the CPU.
cudaError_t topk_select(const float* scores, const int32_t* q_lengths,
                        const int32_t* kv_lengths, int32_t* ids, int64_t B,
                        int64_t Sq, int64_t Hi, int64_t NB, int64_t topk,
                        cudaStream_t stream);

}  // namespace jax_msa::cuda
