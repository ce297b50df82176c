// CPU indexer kernels (spec §3.1-§3.3): block scores, the top-k selection
// rule, and the two fused per query tile.
//
// Work items are tiles of consecutive queries of one batch row. The index
// keys are converted to float once per call, transposed per block
// ([d][key]) so that the score loops vectorise over keys; a tile then walks
// the blocks in order, scoring all the (query, head) rows that see each block
// together while it is in cache. Each thread holds the block scores of one
// tile (about kPanelRows x ceil(Sk / kBlock) floats), never the Sq x Sk
// matrix.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cpu/parallel.h"

namespace jax_msa::cpu {
namespace {

// (query, head) rows per tile: a score panel of 64 x kBlock floats (32 KiB)
// stays in L1/L2 next to the key block it is computed from.
constexpr int64_t kPanelRows = 64;

// Shape constants of one call.
struct IndexDims {
  int64_t B, Sq, Sk, Hi, Di, NB;
  int64_t tile;   // queries per tile
  int64_t tiles;  // tiles per batch row

  IndexDims(int64_t B_, int64_t Sq_, int64_t Sk_, int64_t Hi_, int64_t Di_)
      : B(B_), Sq(Sq_), Sk(Sk_), Hi(Hi_), Di(Di_), NB(num_blocks(Sk_)),
        tile(std::max<int64_t>(1, kPanelRows / std::max<int64_t>(Hi_, 1))),
        tiles((Sq_ + tile - 1) / tile) {}

  // Tiles, heaviest (last: they see the most blocks) first, so that the
  // dynamic hand-out of parallel_for ends on small items.
  void tile_item(int64_t item, int64_t& b, int64_t& tile_index) const {
    tile_index = tiles - 1 - item / B;
    b = item % B;
  }
};

// The index keys ki [B, Sk, Di] as float, transposed per block:
// [b][c][d][kBlock], keys past kv_len zero. Only the blocks of rows that have
// queries are converted (the others are never read).
class IndexKeys {
 public:
  IndexKeys(DType dtype, const void* ki, const IndexDims& dims, const Lengths& lengths)
      : nb_(dims.NB),
        block_elems_(kBlock * dims.Di),
        // Uninitialised on purpose: pages of unused blocks stay untouched.
        data_(new float[dims.B * nb_ * block_elems_]) {
    parallel_for(dims.B * nb_, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / nb_, c = item % nb_;
        const int64_t rows = std::clamp<int64_t>(lengths.kv_len(b) - c * kBlock, 0, kBlock);
        if (lengths.q_len(b) == 0 || rows == 0) continue;
        load_block_transposed(dtype, ki, (b * dims.Sk + c * kBlock) * dims.Di, dims.Di, rows,
                              dims.Di, data_.get() + item * block_elems_);
      }
    }, /*grain=*/16);
  }

  const float* block(int64_t b, int64_t c) const {
    return data_.get() + (b * nb_ + c) * block_elems_;
  }

 private:
  int64_t nb_, block_elems_;
  std::unique_ptr<float[]> data_;
};

// Loads the valid queries [i0, i0 + n) of row b, scaled: q[t][h][d].
void load_queries(DType dtype, const void* qi, const IndexDims& dims, int64_t b, int64_t i0,
                  int64_t n, float scale, float* q) {
  const int64_t width = dims.Hi * dims.Di;
  load_row(dtype, qi, (b * dims.Sq + i0) * width, n * width, q);
  for (int64_t e = 0; e < n * width; ++e) q[e] *= scale;
}

// Block scores of the valid queries [i0, i0 + n) of row b from their scaled
// rows q[t][h][d]. For row (t, h), at best[(t*Hi + h)*NB + c]: the max of
// scale * <qi, ki[j]> over the keys j of block c it sees, -inf past its local
// block; at sums[same] (when sums is not null, c <= local block): the sum of
// exp(s - best) over those keys, from which the lse of any set of blocks
// follows. panel: n * Hi * kBlock floats of scratch.
void score_tile(const IndexDims& dims, const IndexKeys& keys, const Lengths& lengths, int64_t b,
                int64_t i0, int64_t n, const float* q, float* panel, float* best, float* sums) {
  const int64_t Hi = dims.Hi, Di = dims.Di, NB = dims.NB;
  std::fill_n(best, n * Hi * NB, kNegInf);
  if (sums) std::fill_n(sums, n * Hi * NB, 0.0f);
  if (n == 0) return;
  const int64_t kv_len = lengths.kv_len(b);
  const int64_t last = local_block(lengths.position(b, i0 + n - 1));
  int64_t t0 = 0;
  for (int64_t c = 0; c <= last; ++c) {
    // Local blocks grow with t: the queries that see block c are a suffix.
    while (local_block(lengths.position(b, i0 + t0)) < c) ++t0;
    const int64_t R = (n - t0) * Hi;
    std::fill_n(panel, R * kBlock, 0.0f);
    gemm_acc(R, Di, kBlock, q + t0 * Hi * Di, Di, 1, keys.block(b, c), kBlock, panel, kBlock);
    for (int64_t t = t0; t < n; ++t) {
      const int64_t p = lengths.position(b, i0 + t);
      const int64_t nvis = std::clamp<int64_t>(std::min(kv_len, p + 1) - c * kBlock, 0, kBlock);
      for (int64_t h = 0; h < Hi; ++h) {
        float* s = panel + ((t - t0) * Hi + h) * kBlock;
        const int64_t at = (t * Hi + h) * NB + c;
        // NaN propagates (like jnp.max); the selection ranks NaN as -inf.
        const float m = row_max(s, nvis);
        best[at] = m;
        if (sums && m != kNegInf) {
          for (int64_t j = 0; j < nvis; ++j) s[j] = softmax_exp(s[j] - m);
          sums[at] = row_sum(s, nvis);
        }
      }
    }
  }
}

// The selection rule (spec §3.2) for one (query, head) with local block L,
// from its block scores best[0, L). Writes ids[0, topk); order: scratch of at
// least L entries.
void select_blocks(const float* best, int64_t L, int64_t topk, int32_t* ids, int32_t* order) {
  if (topk <= 0) return;
  if (L + 1 <= topk) {
    // Every visible block (none when L = -1), the local one last.
    for (int64_t k = 0; k < topk; ++k) ids[k] = k <= L ? static_cast<int32_t>(k) : -1;
    return;
  }
  const auto rank = [best](int32_t c) { return best[c] != best[c] ? kNegInf : best[c]; };
  std::iota(order, order + L, 0);
  // Descending (score, -id): the better of two blocks is the higher score,
  // on a tie the lower id. A strict weak order, NaN included (as -inf).
  std::partial_sort(order, order + (topk - 1), order + L, [&](int32_t a, int32_t c) {
    const float ra = rank(a), rc = rank(c);
    return ra > rc || (ra == rc && a < c);
  });
  std::copy_n(order, topk - 1, ids);
  ids[topk - 1] = static_cast<int32_t>(L);
}

// Natural-log logsumexp over the selected blocks (ids, -1 skipped) from the
// per-block max and sum of exp(s - max) of score_tile.
float selected_lse(const float* best, const float* sums, const int32_t* ids, int64_t topk) {
  float m = kNegInf;
  for (int64_t k = 0; k < topk; ++k) {
    if (ids[k] >= 0 && (best[ids[k]] > m || best[ids[k]] != best[ids[k]])) m = best[ids[k]];
  }
  if (m == kNegInf) return kNegInf;
  float total = 0.0f;
  for (int64_t k = 0; k < topk; ++k) {
    if (ids[k] >= 0 && best[ids[k]] != kNegInf) total += sums[ids[k]] * std::exp(best[ids[k]] - m);
  }
  return m + std::log(total);
}

bool valid(int64_t B, int64_t Sq, int64_t Sk, int64_t Hi, int64_t Di) {
  return B >= 0 && Sq >= 0 && Sk >= 0 && Hi >= 0 && Di >= 0;
}

void run_block_scores(DType dtype, const void* qi, const void* ki, const IndexDims& dims,
                      const Lengths& lengths, float scale, float* scores) {
  const IndexKeys keys(dtype, ki, dims, lengths);
  const int64_t row = dims.Hi * dims.NB;
  parallel_for(dims.B * dims.tiles, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dims.tile * dims.Hi * dims.Di), panel(dims.tile * dims.Hi * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      int64_t b, tile_index;
      dims.tile_item(item, b, tile_index);
      const int64_t i0 = tile_index * dims.tile;
      const int64_t i_end = std::min(dims.Sq, i0 + dims.tile);
      const int64_t n = std::max<int64_t>(0, std::min(i_end, lengths.q_len(b)) - i0);
      load_queries(dtype, qi, dims, b, i0, n, scale, q.data());
      // The tile's rows of `scores` have score_tile's layout: write in place.
      score_tile(dims, keys, lengths, b, i0, n, q.data(), panel.data(),
                 scores + (b * dims.Sq + i0) * row, nullptr);
      std::fill(scores + (b * dims.Sq + i0 + n) * row, scores + (b * dims.Sq + i_end) * row,
                kNegInf);
    }
  });
}

void run_topk_select(const float* scores, const Lengths& lengths, int32_t* ids, int64_t B,
                     int64_t Sq, int64_t Hi, int64_t NB, int64_t topk) {
  parallel_for(B * Sq, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order(NB);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Sq, i = item % Sq;
      int32_t* out = ids + item * Hi * topk;
      if (i >= lengths.q_len(b)) {
        std::fill_n(out, Hi * topk, -1);
        continue;
      }
      const int64_t L = local_block(lengths.position(b, i));
      for (int64_t h = 0; h < Hi; ++h) {
        select_blocks(scores + (item * Hi + h) * NB, L, topk, out + h * topk, order.data());
      }
    }
  }, 64);
}

void run_indexer(DType dtype, const void* qi, const void* ki, const IndexDims& dims,
                 const Lengths& lengths, int32_t* ids, float* lse, int64_t topk, float scale) {
  const IndexKeys keys(dtype, ki, dims, lengths);
  const int64_t Hi = dims.Hi, NB = dims.NB;
  parallel_for(dims.B * dims.tiles, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dims.tile * Hi * dims.Di), panel(dims.tile * dims.Hi * kBlock);
    std::vector<float> best(dims.tile * Hi * NB), sums(lse ? dims.tile * Hi * NB : 0);
    std::vector<int32_t> order(NB);
    for (int64_t item = begin; item < end; ++item) {
      int64_t b, tile_index;
      dims.tile_item(item, b, tile_index);
      const int64_t i0 = tile_index * dims.tile;
      const int64_t i_end = std::min(dims.Sq, i0 + dims.tile);
      const int64_t n = std::max<int64_t>(0, std::min(i_end, lengths.q_len(b)) - i0);
      load_queries(dtype, qi, dims, b, i0, n, scale, q.data());
      score_tile(dims, keys, lengths, b, i0, n, q.data(), panel.data(), best.data(),
                 lse ? sums.data() : nullptr);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t L = local_block(lengths.position(b, i0 + t));
        for (int64_t h = 0; h < Hi; ++h) {
          const int64_t row = (b * dims.Sq + i0 + t) * Hi + h;
          const int64_t at = (t * Hi + h) * NB;
          select_blocks(best.data() + at, L, topk, ids + row * topk, order.data());
          if (lse) {
            lse[row] = selected_lse(best.data() + at, sums.data() + at, ids + row * topk, topk);
          }
        }
      }
      const int64_t first_pad = (b * dims.Sq + i0 + n) * Hi, end_pad = (b * dims.Sq + i_end) * Hi;
      std::fill(ids + first_pad * topk, ids + end_pad * topk, -1);
      if (lse) std::fill(lse + first_pad, lse + end_pad, kNegInf);
    }
  });
}

}  // namespace

void block_scores(DType dtype, const void* qi, const void* ki, const int32_t* q_lengths,
                  const int32_t* kv_lengths, float* scores, int64_t B, int64_t Sq, int64_t Sk,
                  int64_t Hi, int64_t Di, float scale) {
  if (!valid(B, Sq, Sk, Hi, Di)) return;
  try {
    run_block_scores(dtype, qi, ki, IndexDims(B, Sq, Sk, Hi, Di),
                     Lengths{q_lengths, kv_lengths, Sq, Sk}, scale, scores);
  } catch (...) {
    // No error channel (see attention.cc): out of memory leaves NaN scores.
    std::fill_n(scores, B * Sq * Hi * num_blocks(Sk), std::nanf(""));
  }
}

void topk_select(const float* scores, const int32_t* q_lengths, const int32_t* kv_lengths,
                 int32_t* ids, int64_t B, int64_t Sq, int64_t Hi, int64_t NB, int64_t topk) {
  if (B < 0 || Sq < 0 || Hi < 0 || NB < 0 || topk <= 0) return;
  // Lengths past the score blocks are clamped so that L < NB always.
  const Lengths lengths{q_lengths, kv_lengths, Sq, NB * kBlock};
  try {
    run_topk_select(scores, lengths, ids, B, Sq, Hi, NB, topk);
  } catch (...) {
    // Out of memory for the scratch: ids = -1 (nothing selected).
    std::fill_n(ids, B * Sq * Hi * topk, -1);
  }
}

void indexer(DType dtype, const void* qi, const void* ki, const int32_t* q_lengths,
             const int32_t* kv_lengths, int32_t* ids, float* lse, int64_t B, int64_t Sq,
             int64_t Sk, int64_t Hi, int64_t Di, int64_t topk, float scale) {
  if (!valid(B, Sq, Sk, Hi, Di) || topk < 0) return;
  try {
    run_indexer(dtype, qi, ki, IndexDims(B, Sq, Sk, Hi, Di),
                Lengths{q_lengths, kv_lengths, Sq, Sk}, ids, lse, topk, scale);
  } catch (...) {
    // Out of memory: nothing selected, NaN lse.
    std::fill_n(ids, B * Sq * Hi * topk, -1);
    if (lse) std::fill_n(lse, B * Sq * Hi, std::nanf(""));
  }
}

}  // namespace jax_msa::cpu
