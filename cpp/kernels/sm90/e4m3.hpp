// float8_e4m3fn <-> wider types in registers, two values per instruction.
#pragma once

#include <cstdint>

namespace jax_msa::sm90 {

// Two e4m3 (low 16 bits of `pair`, the first in the low byte) as two f16 in
// one word, exactly (every e4m3 value is an f16 value), NaN kept.
__device__ __forceinline__ uint32_t widen_e4m3x2(uint32_t pair) {
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<uint16_t>(pair)));
  return h2;
}

// (first, second) rounded to e4m3 (nearest even, saturated to +-448), the
// first in the low byte of the result.
__device__ __forceinline__ uint16_t narrow_e4m3x2(float first, float second) {
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(second), "f"(first));
  return pair;
}

}  // namespace jax_msa::sm90
