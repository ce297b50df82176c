// The total order of the selection rule (spec §3.2) as 64-bit keys, the same
// order used by cuda::topk_select and sm90 indexer_select: the high word
// orders scores (NaN as -inf, -0 as +0), the low word is ~block id, so the
// largest key is the best score with the lowest id. Keys are distinct and
// never 0, which therefore means "no candidate".
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_msa::cuda {

// Order-preserving image of a score as an unsigned integer: a < b as floats
// iff ordered_bits(a) < ordered_bits(b). NaN maps to -inf (ties with it, below
// every finite score) and -0 to +0 (equal floats, equal bits). Integer-only,
// so compiler flags such as flush-to-zero cannot change the order.
// Host-callable so the order can be tested without a GPU.
__host__ __device__ inline uint32_t ordered_bits(float score) {
  uint32_t u;
  static_assert(sizeof(u) == sizeof(score), "float is 32-bit");
  memcpy(&u, &score, sizeof(u));
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) u = 0xFF800000u;  // NaN -> -inf
  if (magnitude == 0) u = 0;                      // -0 -> +0
  // Negative floats order reversed: flip all bits; non-negative: set the sign.
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The selection key of block c. Never 0 (the high word of -inf is
// 0x007FFFFF), so 0 serves as "no candidate".
__host__ __device__ inline uint64_t make_key(uint32_t bits, int c) {
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~c);
}

__host__ __device__ inline int32_t key_id(uint64_t key) {
  return ~static_cast<int32_t>(static_cast<uint32_t>(key));
}

}  // namespace jax_msa::cuda
