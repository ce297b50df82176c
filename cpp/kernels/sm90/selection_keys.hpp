// The total order of the selection rule (spec §3.2) as 64-bit keys, the same
// order as cuda::topk_select (cpp/kernels/cuda/topk_select.cu): the high word
// orders scores (NaN as -inf, -0 as +0), the low word is ~block id, so the
// largest key is the best score with the lowest id. Keys are distinct and
// never 0, which therefore means "no candidate".
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_msa::sm90 {

__host__ __device__ inline uint32_t ordered_bits(float score) {
  uint32_t u;
  memcpy(&u, &score, sizeof(u));
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) u = 0xFF800000u;  // NaN -> -inf
  if (magnitude == 0) u = 0;                      // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__host__ __device__ inline uint64_t make_key(uint32_t bits, int32_t c) {
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~c);
}

__host__ __device__ inline int32_t key_id(uint64_t key) {
  return ~static_cast<int32_t>(static_cast<uint32_t>(key));
}

}  // namespace jax_msa::sm90
