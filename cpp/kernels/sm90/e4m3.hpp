// float8_e4m3fn <-> wider types in registers, two values per instruction.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>

namespace jax_msa::sm90 {

// Two e4m3 (low 16 bits of `pair`, the first in the low byte) as two f16 in
// one word, exactly (every e4m3 value is an f16 value), NaN kept.
__device__ __forceinline__ uint32_t widen_e4m3x2(uint32_t pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  // No e4m3 conversion before sm_89 (the portable family's PTX): a byte's
  // sign and other 7 bits, moved into a float16 (whose exponent bias is 8
  // more), are its value times 2^-8, subnormals included; times 256 is exact.
  // Bytes 0x7F and 0xFF are NaN.
  const uint32_t spread = ((pair & 0x80u) << 8) | ((pair & 0x7Fu) << 7) |
                          ((pair & 0x8000u) << 16) | ((pair & 0x7F00u) << 15);
  const __half2 scaled = __hmul2(*reinterpret_cast<const __half2*>(&spread), __float2half2_rn(256.0f));
  uint32_t h2 = *reinterpret_cast<const uint32_t*>(&scaled);
  if ((pair & 0x7Fu) == 0x7Fu) h2 = (h2 & 0xFFFF0000u) | 0x7E00u;
  if ((pair & 0x7F00u) == 0x7F00u) h2 = (h2 & 0x0000FFFFu) | 0x7E000000u;
  return h2;
#else
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<uint16_t>(pair)));
  return h2;
#endif
}

// (first, second) rounded to e4m3 (nearest even, saturated to +-448), the
// first in the low byte of the result.
__device__ __forceinline__ uint16_t narrow_e4m3x2(float first, float second) {
  uint16_t pair;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(second), "f"(first));
  return pair;
}

}  // namespace jax_msa::sm90
