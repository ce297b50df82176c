// Numeric building blocks of the CPU kernels: conversions between the element
// types of cpu_kernels.h and float32, row/block loads into float buffers, the
// hot loops (the small matrix product every kernel is built from, exp, row
// reductions), and the clamped sequence lengths of a batch row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/cpu/cpu_kernels.h"

namespace jax_msa::cpu {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------
// Scalar conversions (bit-exact, independent of the FPU rounding mode).

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// bfloat16 is the upper half of a float32: widening is exact.
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t{h} << 16); }

// Round to nearest even. A NaN keeps its sign and gets the quiet bit, so that
// truncating its payload can never turn it into an infinity.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16 -> float32, exact (subnormals, infinities and NaN payloads).
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// float32 -> IEEE binary16, round to nearest even; overflow gives infinity,
// NaN stays a (quiet) NaN.
inline uint16_t float_to_fp16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);
  // 65520 = halfway between the largest half (65504) and 2^16: ties to even
  // round up, so everything from there on is infinity.
  if (a >= 0x477ff000u) return sign | 0x7c00u;
  if (a < 0x38800000u) {
    // Below the smallest normal half (2^-14): a subnormal in units of 2^-24.
    const uint32_t exponent = a >> 23;
    if (exponent < 102) return sign;  // below 2^-25: rounds to zero
    const uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14..24
    uint32_t q = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    // Round to nearest even; a carry to 0x400 is the smallest normal, as it should be.
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  // Normal: rebias the exponent (127 -> 15) in place, then round the 13
  // dropped mantissa bits; a carry correctly bumps the exponent.
  const uint32_t rebased = a - (112u << 23);
  return sign | static_cast<uint16_t>((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13);
}

// float8_e4m3fn -> float32, exact: 1 sign, 4 exponent (bias 7) and 3 mantissa
// bits; no infinities, S.1111.111 is NaN, subnormals are mantissa * 2^-9.
inline float e4m3fn_to_float(uint8_t x) {
  const uint32_t sign = uint32_t{x & 0x80u} << 24;
  const uint32_t exponent = (x >> 3) & 0xfu;
  const uint32_t mantissa = x & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return bits_to_float(sign | 0x7fc00000u);
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // 2^-9
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 120) << 23) | (mantissa << 20));
}

// ---------------------------------------------------------------------------
// Typed access to a tensor of DType elements.

template <DType kType>
struct Element;

template <>
struct Element<DType::kF32> {
  using Storage = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

template <>
struct Element<DType::kBF16> {
  using Storage = uint16_t;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float x) { return float_to_bf16(x); }
};

template <>
struct Element<DType::kF16> {
  using Storage = uint16_t;
  static float load(uint16_t x) { return fp16_to_float(x); }
  static uint16_t store(float x) { return float_to_fp16(x); }
};

// Calls fn(Element<dtype>{}): one switch per row, typed loops inside.
template <class Fn>
inline void with_element(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kF32:
      fn(Element<DType::kF32>{});
      break;
    case DType::kBF16:
      fn(Element<DType::kBF16>{});
      break;
    case DType::kF16:
      fn(Element<DType::kF16>{});
      break;
  }
}

// dst[k] = src[offset + k] as float, k < n (offset in elements).
inline void load_row(DType dtype, const void* src, int64_t offset, int64_t n, float* dst) {
  with_element(dtype, [&](auto e) {
    using E = decltype(e);
    const auto* s = static_cast<const typename E::Storage*>(src) + offset;
    for (int64_t k = 0; k < n; ++k) dst[k] = E::load(s[k]);
  });
}

// dst[offset + k] = src[k] rounded to dtype, k < n.
inline void store_row(DType dtype, const float* src, int64_t n, void* dst, int64_t offset) {
  with_element(dtype, [&](auto e) {
    using E = decltype(e);
    auto* d = static_cast<typename E::Storage*>(dst) + offset;
    for (int64_t k = 0; k < n; ++k) d[k] = E::store(src[k]);
  });
}

// dst[offset + k] = value rounded to dtype, k < n.
inline void fill_row(DType dtype, float value, int64_t n, void* dst, int64_t offset) {
  with_element(dtype, [&](auto e) {
    using E = decltype(e);
    const auto stored = E::store(value);
    std::fill_n(static_cast<typename E::Storage*>(dst) + offset, n, stored);
  });
}

// One block of kBlock keys (key j at src[offset + j*stride], D elements) as
// float, row-major dst[j*D + d] (load_block) or transposed dst[d*kBlock + j]
// (load_block_transposed). Only keys j < rows are read; keys rows..kBlock-1
// are zero, so loops may run over whole blocks without reading past the valid
// keys (whose padding may hold anything, NaN included).
inline void load_block(DType dtype, const void* src, int64_t offset, int64_t stride,
                       int64_t rows, int64_t D, float* dst) {
  for (int64_t j = 0; j < rows; ++j) load_row(dtype, src, offset + j * stride, D, dst + j * D);
  std::fill(dst + rows * D, dst + kBlock * D, 0.0f);
}

inline void load_block_transposed(DType dtype, const void* src, int64_t offset,
                                  int64_t stride, int64_t rows, int64_t D, float* dst) {
  with_element(dtype, [&](auto e) {
    using E = decltype(e);
    const auto* s = static_cast<const typename E::Storage*>(src) + offset;
    for (int64_t j = 0; j < rows; ++j) {
      for (int64_t d = 0; d < D; ++d) dst[d * kBlock + j] = E::load(s[j * stride + d]);
    }
  });
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kBlock + rows, dst + (d + 1) * kBlock, 0.0f);
}

// ---------------------------------------------------------------------------
// Loops the kernels spend their time in. They are written so that GCC/Clang
// vectorise them at -O3 without -ffast-math: no reduction is reordered (sums
// keep a fixed order: results are deterministic) and there are no branches
// or floating-point comparisons in the vector loops (under the default
// -ftrapping-math a float compare blocks if-conversion).

// The matrix product every kernel is built from:
//   C[x*ldc + n] += sum_{y < Y} A[x*sax + y*say] * B[y*ldb + n],  x < X, n < N.
// A may be read transposed (sax = 1); B and C are row-major. A strip of
// R rows x W columns of C stays in registers across the whole y loop, so the
// inner loop is R broadcasts of A and R*W multiply-adds per row of B, and it
// vectorises over n. 2 x 32 was the fastest of the shapes measured (GCC 12,
// x86-64 SSE2 baseline, -O3 and -O2); the 2 x 32 accumulators fill the 16
// SSE registers.
template <int W, int R>
inline void gemm_strip(int64_t X, int64_t Y, const float* A, int64_t sax, int64_t say,
                       const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t x = 0;
  for (; x + R <= X; x += R) {
    float acc[R][W];
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < W; ++l) acc[r][l] = C[(x + r) * ldc + l];
    }
    for (int64_t y = 0; y < Y; ++y) {
      const float* b = B + y * ldb;
      for (int r = 0; r < R; ++r) {
        const float a = A[(x + r) * sax + y * say];
        for (int l = 0; l < W; ++l) acc[r][l] += a * b[l];
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < W; ++l) C[(x + r) * ldc + l] = acc[r][l];
    }
  }
  if (R > 1 && x < X) gemm_strip<W, 1>(X - x, Y, A + x * sax, sax, say, B, ldb, C + x * ldc, ldc);
}

inline void gemm_acc(int64_t X, int64_t Y, int64_t N, const float* A, int64_t sax,
                     int64_t say, const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t n = 0;
  for (; n + 32 <= N; n += 32) gemm_strip<32, 2>(X, Y, A, sax, say, B + n, ldb, C + n, ldc);
  for (; n + 8 <= N; n += 8) gemm_strip<8, 1>(X, Y, A, sax, say, B + n, ldb, C + n, ldc);
  for (; n < N; ++n) gemm_strip<1, 1>(X, Y, A, sax, say, B + n, ldb, C + n, ldc);
}

// e^x for the arguments of a softmax (x <= 0 up to rounding), within 1 ulp
// of the exact value for x in [-87.3, 88]. Results below the smallest normal
// float (x < -87.3) may flush to zero, x is clamped to [-88, 88] (so
// +-inf give e^+-88), NaN stays NaN. Cody-Waite reduction x = n ln2 + r and
// the minimax polynomial of Cephes' expf; the clamp works on the bits because
// a float comparison would keep the loops over this function scalar.
inline float softmax_exp(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t limit = 0x42b00000u;  // 88.0f
  const uint32_t clamped =
      magnitude > 0x7f800000u ? magnitude : (magnitude < limit ? magnitude : limit);
  const float xc = bits_to_float((bits & 0x80000000u) | clamped);
  // Adding 1.5 * 2^23 rounds x / ln2 to the integer n, left in the low bits.
  const float kRound = 12582912.0f;
  const float t = xc * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r) * r + r + 1.0f;
  // 2^n built from its exponent bits (n + 127 = 0 gives the flush to zero).
  const uint32_t two_n = (float_to_bits(t) - float_to_bits(kRound) + 127u) << 23;
  return e * bits_to_float(two_n);
}

// Reductions over a row, with kLanes independent partial results so that
// they are not one long dependency chain (and the sum vectorises); the
// combination order is fixed.
inline constexpr int kLanes = 8;

inline float row_sum(const float* x, int64_t n) {
  float part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += x[j + l];
  }
  for (; j < n; ++j) part[0] += x[j];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// Max of x[0, n), -inf when n = 0, NaN when any entry is NaN (like jnp.max).
// Compared as integers: the bits of a float, with those of negative values
// reflected, order like the values (-0 just below +0), and NaN of either
// sign maps to the largest key. Integer compares, unlike float ones,
// vectorise here.
inline float row_max(const float* x, int64_t n) {
  constexpr int32_t kNaNKey = 0x7fffffff;
  const auto key = [](float v) {
    const int32_t b = static_cast<int32_t>(float_to_bits(v));
    const int32_t ordered = b >= 0 ? b : b ^ 0x7fffffff;
    return (b & 0x7fffffff) > 0x7f800000 ? kNaNKey : ordered;
  };
  const int32_t lowest = key(kNegInf);
  int32_t part[kLanes];
  std::fill_n(part, kLanes, lowest);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int32_t k = key(x[j + l]);
      part[l] = k > part[l] ? k : part[l];
    }
  }
  for (; j < n; ++j) part[0] = std::max(part[0], key(x[j]));
  const int32_t m = *std::max_element(part, part + kLanes);
  if (m == kNaNKey) return std::numeric_limits<float>::quiet_NaN();
  return bits_to_float(static_cast<uint32_t>(m >= 0 ? m : m ^ 0x7fffffff));
}

// Online-softmax step of one row over a new block of keys: s[0, n) are its
// scores there. Updates the running max m and sum l, overwrites s[0, kBlock)
// with exp(s - new max) (zero past n) and returns the factor by which what
// was accumulated before must be rescaled. A NaN score makes the row NaN, as
// a plain softmax would.
inline float online_softmax_step(float* s, int64_t n, float& m, float& l) {
  const float block_max = row_max(s, n);
  const float m_new = block_max != block_max ? block_max : std::max(m, block_max);
  if (m_new == kNegInf) {  // every score so far is -inf: nothing to add yet
    std::fill(s, s + kBlock, 0.0f);
    return 1.0f;
  }
  const float alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
  for (int64_t j = 0; j < n; ++j) s[j] = softmax_exp(s[j] - m_new);
  std::fill(s + n, s + kBlock, 0.0f);
  l = l * alpha + row_sum(s, n);
  m = m_new;
  return alpha;
}

// ---------------------------------------------------------------------------
// Sequence geometry shared by every op (spec §2).

inline int64_t num_blocks(int64_t length) { return (length + kBlock - 1) / kBlock; }

// Local block of the query at position p; -1 when it sees no key at all
// (p < 0 only arises from kv_length < q_length, a caller error).
inline int64_t local_block(int64_t p) { return p >= 0 ? p / kBlock : -1; }

// Valid lengths of the batch rows (nullptr: the full length), clamped to
// [0, S] so that a bad length can never make a kernel index out of bounds.
struct Lengths {
  const int32_t* q;
  const int32_t* kv;
  int64_t Sq, Sk;

  int64_t q_len(int64_t b) const { return q ? std::clamp<int64_t>(q[b], 0, Sq) : Sq; }
  int64_t kv_len(int64_t b) const { return kv ? std::clamp<int64_t>(kv[b], 0, Sk) : Sk; }
  // Bottom-right aligned position of query i of row b.
  int64_t position(int64_t b, int64_t i) const { return kv_len(b) - q_len(b) + i; }
};

// Copies the rows of the panel members (G heads each) from a tile buffer.
inline void gather_rows(const float* tile_rows, const int64_t* members, int64_t count, int64_t width,
                        float* panel) {
  for (int64_t k = 0; k < count; ++k) {
    std::copy_n(tile_rows + members[k] * width, width, panel + k * width);
  }
}

}  // namespace jax_msa::cpu
