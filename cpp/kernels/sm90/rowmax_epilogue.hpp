// The epilogue of one (tile, block) product: from the wgmma accumulator of a
// warpgroup (64 rows x 128 keys, fp32), the masked maximum of each row over
// the block's visible keys, and optionally the sum of exp(s - max) over them
// (what the lse of any set of blocks is later assembled from).
//
// SM90 accumulator fragment of a 64 x N wgmma: thread (warp w, lane l) holds
// rows 16w + l/4 and 16w + l/4 + 8, columns 2(l%4) + {0,1} + 8v. The four
// lanes of a quad share their rows, so a row's result is a quad reduction.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include "kernels/sm90/tile_geometry.hpp"

namespace jax_msa::sm90 {

using namespace cute;

// ((2, 2, V), M, N) accumulator layout -> ((2, M), (2, V, N)): rows x columns.
template <class Layout>
__device__ auto rowcol_layout(Layout l) {
  static_assert(decltype(rank<0>(l))::value == 3, "SM90 wgmma accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Rounds an fp32 accumulator of a 64 x K wgmma into the register A operand
// of a following rs wgmma over the same (row, K) tile (e.g. P for O += P V):
// the two fragments hold the same values in the same register order.
template <class Acc, class Operand>
__device__ void acc_to_operand(const Acc& acc, Operand& operand) {
  static_assert(decltype(size(acc))::value == decltype(size(operand))::value);
  using Element = typename Operand::value_type;
  cutlass::NumericArrayConverter<Element, float, 2> to_pair;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    const auto pair = to_pair(cutlass::Array<float, 2>{acc(i), acc(i + 1)});
    operand(i) = pair[0];
    operand(i + 1) = pair[1];
  }
}

// scale * acc (rows x columns view) into the rows of `out` ([.., kD], in
// Element) that `rows` holds (TileRows: token_of, out_row, column); rows
// with no token are not written.
template <int kD, class Element, class AccRC, class Rows>
__device__ void store_scaled_rows(const AccRC& acc_rc, const Rows& rows, Element* out,
                                  float scale) {
  cutlass::NumericArrayConverter<Element, float, 2> to_pair;
  CUTE_UNROLL
  for (int r = 0; r < cute::size<0>(acc_rc); ++r) {
    if (rows.token_of[r] < 0) continue;
    Element* dst = out + rows.out_row[r] * kD;
    CUTE_UNROLL
    for (int j = 0; j < cute::size<1>(acc_rc); j += 2) {
      const auto pair =
          to_pair(cutlass::Array<float, 2>{acc_rc(r, j) * scale, acc_rc(r, j + 1) * scale});
      *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + rows.column(j)) = pair;
    }
  }
}

// Per-thread state for the rows this thread holds (kRowsPerThread of them).
template <int kRowsPerThread>
struct RowState {
  int64_t position[kRowsPerThread];  // -1: padded or missing row
  int64_t out_row[kRowsPerThread];   // flattened global row (b*Sq*Hi + ...), -1 if missing
};

// 2^x (ex2.approx.ftz: 2 ulp, subnormal results flushed; 2^-inf = 0): one
// MUFU.EX2, where exp2f adds a range test and two multiplies per element.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ inline float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 2));
}

__device__ inline float quad_sum(float v) {
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  return v + __shfl_xor_sync(0xFFFFFFFFu, v, 2);
}

// Writes, for each row of the fragment, scores[out_row * NB + c] =
// max over visible keys j of block c of scale * acc[row, j] (-inf if none),
// and with kWithSums sums[same] = sum of exp(scale * acc - that max).
// kNegate: scale < 0 (the max of scale*x is then |scale| * max(-x)).
// acc_rc / coord_rc: the accumulator and its (row, col) coordinates in rowcol view.
// kRowLanes: the lanes that share a row, 4 (a quad of an mma accumulator) or
// 1 (a thread holds whole rows: a row of tensor memory, sm100/block_scores.cu).
template <bool kWithSums, bool kNegate, int kRowLanes = 4, class AccRC, class CoordRC,
          int kRowsPerThread>
__device__ void block_rowmax(const AccRC& acc_rc, const CoordRC& coord_rc,
                             const RowState<kRowsPerThread>& rows, int64_t c, bool masked,
                             float abs_scale, int64_t NB, float* __restrict__ scores,
                             float* __restrict__ sums) {
  static_assert(kRowLanes == 4 || kRowLanes == 1, "a row in a quad or in one thread");
  constexpr float kLog2e = 1.4426950408889634f;
  const bool writer = kRowLanes == 1 || (threadIdx.x % 4) == 0;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(acc_rc); ++r) {
    // Keys of block c visible to this row: columns [0, limit].
    int64_t limit64 = rows.position[r] - c * kBlockKeys;
    const int limit = static_cast<int>(limit64 < -1 ? -1 : (limit64 > 127 ? 127 : limit64));
    // Four independent partial maxima: a shorter dependency chain.
    float part[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    if (masked) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(acc_rc); ++j) {
        const float x = kNegate ? -acc_rc(r, j) : acc_rc(r, j);
        part[j % 4] = fmaxf(part[j % 4], get<1>(coord_rc(r, j)) <= limit ? x : -INFINITY);
      }
    } else {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(acc_rc); ++j) {
        part[j % 4] = fmaxf(part[j % 4], kNegate ? -acc_rc(r, j) : acc_rc(r, j));
      }
    }
    float m = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
    if constexpr (kRowLanes == 4) m = quad_max(m);
    const float best = abs_scale * m;
    float total = 0.0f;
    if constexpr (kWithSums) {
      if (m != -INFINITY) {
        const float a = abs_scale * kLog2e;
        const float shift = -a * m;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(acc_rc); ++j) {
          const float x = kNegate ? -acc_rc(r, j) : acc_rc(r, j);
          const float e = exp2f(fmaf(x, a, shift));
          total += (!masked || get<1>(coord_rc(r, j)) <= limit) ? e : 0.0f;
        }
      }
      if constexpr (kRowLanes == 4) total = quad_sum(total);
    }
    if (writer && rows.out_row[r] >= 0) {
      const int64_t at = rows.out_row[r] * NB + c;
      scores[at] = best;
      if constexpr (kWithSums) sums[at] = total;
    }
  }
}

// -inf to scores[row, c] for the blocks c in [blocks, NB) that no row of the
// tile sees, rows first_row .. first_row + count - 1 of the tile (those that
// exist): one row at a time, consecutive blocks across the `threads` callers
// (coalesced); `tid` in [0, threads).
__device__ inline void fill_unseen_blocks(float* scores, int64_t out_base, const TileGeometry& geo,
                                          int first_row, int count, int64_t blocks, int64_t NB,
                                          int tid, int threads) {
  for (int r = first_row; r < first_row + count; ++r) {
    if (!geo.row_exists(r)) break;
    float* out = scores + (out_base + r) * NB;
    for (int64_t c = blocks + tid; c < NB; c += threads) out[c] = -INFINITY;
  }
}

}  // namespace jax_msa::sm90
