// The online softmax of the query-outer kernels (sparse_attention_fwd.cu,
// paged_attention.cu): per (tile, block) product S of a consumer warpgroup
// (64 rows x 128 keys, fp32 wgmma accumulator seen as rows x columns), the
// masks (rows whose query did not select the block; keys past a row's causal
// or length limit), then in place P = 2^(factor (S - max)) with a running max
// and sum per row, and the factor that rescales O.
//
// The max is taken on the raw products, so that each element costs one FFMA
// and one MUFU.EX2; a negative factor (a negative logit scale) negates S
// first. O is rescaled only when the max of some row of the warp moved, which
// after the first blocks is rare. kLog2Gain: P is scaled by 2^kLog2Gain (an
// e4m3 P keeps its small values normal); O / l is unchanged by it and lse()
// takes it out. kRowLanes: the lanes that share a row, 4 in an mma
// accumulator (a quad), 1 where a thread holds whole rows (a row of tensor
// memory, sm100/attention_fwd.cu; store() is for quads only).
#pragma once

#include <cfloat>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::sm90 {

template <int kRowsPerThread, int kLog2Gain = 0, int kRowLanes = 4>
struct OnlineSoftmax {
  static_assert(kRowLanes == 4 || kRowLanes == 1, "a row in a quad or in one thread");
  float factor[kRowsPerThread];   // S -> log2-domain logits, > 0
  float row_max[kRowsPerThread];  // running max of (+-) S
  float row_sum[kRowsPerThread];  // running sum of P
  float correction[kRowsPerThread];
  bool negate;   // the logit scale is negative: the softmax runs on -S
  bool rescale;  // some row of the warp has a new max: O *= correction

  // Row r's logits are factor[r] * S; the factors of a thread share one sign.
  __device__ void start(const float (&factors)[kRowsPerThread]) {
    negate = factors[0] < 0.0f;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      factor[r] = fmaxf(fabsf(factors[r]), FLT_MIN);  // > 0: -inf * factor stays -inf
      row_max[r] = -INFINITY;
      row_sum[r] = 0.0f;
    }
  }

  // S (rows x columns view of the accumulator) of the block starting at key
  // key0; `tokens`: bit t set when query t of the tile selected the block.
  // Rows: TileRows<kRowsPerThread>, or a kind of it whose member() differs
  // (dense attention: every row takes every block).
  template <class AccRC, class Rows>
  __device__ void apply(AccRC& s, const Rows& rows, int64_t key0, int keys, uint64_t tokens) {
    const bool partial = rows.partial(key0, keys);
    bool members = true;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) members = members && rows.member(r, tokens);
    // Most blocks need no mask for any row of the warp: skip the per-element
    // tests then. The vote keeps the branch uniform (quad_max follows).
    const bool masked = __any_sync(0xFFFFFFFFu, partial || !members);
    // All rows' maxima first, then all rows' exponentials, each reduction in
    // four independent partial results: a straight loop would be one chain
    // of dependent FMNMX (or FADD) per row, as long as its columns.
    float m[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (negate) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) s(r, j) = -s(r, j);
      }
      float part[4] = {row_max[r], -INFINITY, -INFINITY, -INFINITY};
      if (masked) {
        const bool member = rows.member(r, tokens);
        const int limit = rows.last_key[r] - static_cast<int>(key0);  // last visible column
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
          if (!member || (partial && rows.column(j) > limit)) s(r, j) = -INFINITY;
          part[j % 4] = fmaxf(part[j % 4], s(r, j));
        }
      } else {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) part[j % 4] = fmaxf(part[j % 4], s(r, j));
      }
      m[r] = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
    }
    if constexpr (kRowLanes == 4) {
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) m[r] = quad_max(m[r]);
    }
    bool moved = false;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      moved = moved || m[r] != row_max[r];
      const float base = m[r] == -INFINITY ? 0.0f : m[r] * factor[r] - kLog2Gain;
      correction[r] = fast_exp2(row_max[r] * factor[r] - kLog2Gain - base);
      row_max[r] = m[r];
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        const float e = fast_exp2(fmaf(s(r, j), factor[r], -base));
        s(r, j) = e;
        part[j % 4] += e;
      }
      row_sum[r] = row_sum[r] * correction[r] + ((part[0] + part[1]) + (part[2] + part[3]));
    }
    rescale = __any_sync(0xFFFFFFFFu, moved);
  }

  // O *= correction, row by row, when some row of the warp needs it.
  template <class AccRC>
  __device__ void rescale_output(AccRC& o) const {
    if (!rescale) return;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o); ++j) o(r, j) *= correction[r];
    }
  }

  // Row r's lse (natural log) given its total sum of P over the quad; -inf if 0.
  __device__ float lse(int r, float total) const {
    return total > 0.0f ? (row_max[r] * factor[r] - kLog2Gain + log2f(total)) * 0.6931471805599453f
                        : -INFINITY;
  }

  // The tile's results: out = O / l (rows of out viewed as [rows, D]) and
  // lse = ln(sum of exp), 0 and -inf for a row that saw no key; rows with
  // token_of < 0 (missing) are not written. kD: the head dim.
  template <int kD, class Element, class AccRC, class Rows>
  __device__ void store(const AccRC& o, const Rows& rows, Element* out, float* lse_out,
                        int tid) const {
    static_assert(kRowLanes == 4, "the layout of an mma accumulator");
    cutlass::NumericArrayConverter<Element, float, 2> to_pair;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float total = quad_sum(row_sum[r]);  // the whole warp: before any lane leaves
      if (rows.token_of[r] < 0) continue;
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      const int64_t out_row = rows.out_row[r];
      Element* dst = out + out_row * kD;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o); j += 2) {
        auto pair = to_pair(cutlass::Array<float, 2>{o(r, j) * inv, o(r, j + 1) * inv});
        *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + rows.column(j)) = pair;
      }
      if (tid % 4 == 0) lse_out[out_row] = lse(r, total);
    }
  }
};

}  // namespace jax_msa::sm90
