// What the Blackwell family's kernels share: the tcgen05 fences around thread
// synchronisation, whole-row loads and stores of tensor memory (one thread =
// one lane = one row of a 128-row MMA accumulator), and the host's check that
// the device runs sm_100a code.
//
// Device code for sm_100a only (callers guard it with
// CUTE_ARCH_TCGEN05_TMEM_ENABLED, so that the other passes compile).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

#include <cute/arch/copy_sm100.hpp>
#include <cutlass/arch/barrier.h>

namespace jax_msa::sm100 {

// Orders this thread's earlier tcgen05 operations before a following thread
// synchronisation (barrier, mbarrier arrive) ...
__device__ __forceinline__ void tmem_fence_before_sync() {
  asm volatile("tcgen05.fence::before_thread_sync;\n" ::: "memory");
}
// ... and its later ones after a preceding one (barrier, mbarrier wait).
__device__ __forceinline__ void tmem_fence_after_sync() {
  asm volatile("tcgen05.fence::after_thread_sync;\n" ::: "memory");
}

// tcgen05.ld / st of 32 consecutive 32-bit columns of this thread's lane.
template <size_t... I>
__device__ __forceinline__ void tmem_load_32(uint32_t addr, uint32_t* dst,
                                             std::index_sequence<I...>) {
  cute::SM100_TMEM_LOAD_32dp32b32x::copy(addr, dst[I]...);
}
template <size_t... I>
__device__ __forceinline__ void tmem_store_32(uint32_t addr, const uint32_t* src,
                                              std::index_sequence<I...>) {
  cute::SM100_TMEM_STORE_32dp32b32x::copy(src[I]..., addr);
}
__device__ __forceinline__ void tmem_store_32(uint32_t addr, const uint32_t (&src)[32]) {
  tmem_store_32(addr, src, std::make_index_sequence<32>{});
}

// Columns col .. col + N - 1 (N % 32 == 0) of this thread's lane (lane_addr:
// the allocation's address plus the warp's first lane in bits 31..16), complete
// on return: after tcgen05.wait::ld each register passes through an empty asm
// ordered after the wait, so that no use of a value is scheduled before it.
// The whole warp calls it (.sync.aligned).
template <int N>
__device__ __forceinline__ void tmem_load_row(uint32_t lane_addr, int col, uint32_t (&regs)[N]) {
  static_assert(N % 32 == 0);
#pragma unroll
  for (int c = 0; c < N / 32; ++c) {
    tmem_load_32(lane_addr + col + 32 * c, regs + 32 * c, std::make_index_sequence<32>{});
  }
  cutlass::arch::fence_view_async_tmem_load();
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(regs[i])::"memory");
}

// The address of this thread's lane in an allocation at `base`: warp w of
// the CTA (w < 4) may touch lanes 32 w .. 32 w + 31 only.
__device__ __forceinline__ uint32_t tmem_lane_addr(uint32_t base) {
  return base + (static_cast<uint32_t>(32 * (threadIdx.x / 32 % 4)) << 16);
}

// The family is built as sm_100a code only: any card other than compute
// capability 10.0 would find no kernel, or the empty one of another pass.
inline cudaError_t check_device() {
  int device = 0, major = 0, minor = 0;
  cudaError_t st = cudaGetDevice(&device);
  if (st == cudaSuccess) st = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (st == cudaSuccess) st = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (st != cudaSuccess) return st;
  return major == 10 && minor == 0 ? cudaSuccess : cudaErrorNoKernelImageForDevice;
}

}  // namespace jax_msa::sm100
