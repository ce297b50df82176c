// CPU attention (spec §3.4, §3.6): one flash-attention engine serving dense
// (causal or not) and block-sparse (ids) key selections, forward and backward.
//
// How it is organised:
//  - Selection gives every query its "block list": the ascending key blocks
//    it attends, each holding at least one key it may see. Dense and sparse
//    calls differ only there (and in its inverse, InverseLists).
//  - BlockStore converts the key/value blocks a call touches to float once,
//    in the layout the inner loops stream: transposed [d][key] where a loop
//    runs over keys (scores, dP), row-major [key][d] where it runs over head
//    dims (P.V, dS.K). All products go through gemm_acc (numeric.h).
//  - A work item is a tile of consecutive queries of one kv group. QueryTile
//    walks the union of their block lists; the queries sharing a block form a
//    panel of (query, head) rows processed together, so each converted block
//    serves the G heads of the group and the neighbouring queries while it is
//    in cache.
//  - The backward is deterministic without atomics: dq per query tile, like
//    the forward; dk/dv per key block, over the queries attending that block.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cpu/parallel.h"

namespace jax_msa::cpu {
namespace {

// (query, head) rows per panel: a score panel of 64 x kBlock floats (32 KiB)
// stays in L1/L2 next to the key block it is computed from.
constexpr int64_t kPanelRows = 64;

// Queries of one (row, kv group) that attend one key block, ascending: either
// the list[0, count) or, when list is nullptr, the range [first, first + count).
struct QuerySpan {
  const int32_t* list;
  int64_t first, count;
  int64_t operator[](int64_t k) const { return list ? list[k] : first + k; }
};

// The keys each query attends, as block lists (see the top of the file).
class Selection {
 public:
  Selection(const AttentionProblem& pb, const KeySelection& keys, const Lengths& lengths)
      : pb_(pb),
        ids_(keys.ids),
        topk_(keys.ids ? std::max<int64_t>(keys.topk, 0) : 0),
        causal_(keys.ids != nullptr || keys.causal),  // sparse is always causal
        lengths_(lengths),
        num_blocks_(num_blocks(pb.Sk)) {}

  const Lengths& lengths() const { return lengths_; }
  bool sparse() const { return ids_ != nullptr; }
  bool causal() const { return causal_; }
  int64_t num_key_blocks() const { return num_blocks_; }
  // The longest block list.
  int64_t capacity() const { return sparse() ? topk_ : num_blocks_; }

  // Keys [c*kBlock, c*kBlock + n) of block c are visible to the query at
  // position p of row b; returns n.
  int64_t visible(int64_t b, int64_t p, int64_t c) const {
    int64_t end = lengths_.kv_len(b);
    if (causal_) end = std::min(end, p + 1);
    return std::clamp<int64_t>(end - c * kBlock, 0, kBlock);
  }

  // Writes the block list of valid query i of row b, kv group g, to `list`
  // (capacity() entries) and returns its length.
  int64_t blocks(int64_t b, int64_t i, int64_t g, int32_t* list) const {
    // Blocks c < end hold a visible key (for a valid query p < kv_len, so the
    // causal bound also keeps c < ceil(kv_len / kBlock)).
    const int64_t end = causal_ ? local_block(lengths_.position(b, i)) + 1
                                : num_blocks(lengths_.kv_len(b));
    if (!sparse()) {
      for (int64_t c = 0; c < end; ++c) list[c] = static_cast<int32_t>(c);
      return end;
    }
    const int32_t* row = ids_ + ((b * pb_.Sq + i) * pb_.Hkv + g) * topk_;
    int64_t n = 0;
    for (int64_t k = 0; k < topk_; ++k) {
      if (row[k] >= 0 && row[k] < end) list[n++] = row[k];
    }
    // Ascending order lets neighbouring queries meet on shared blocks.
    std::sort(list, list + n);
    return n;
  }

  // needed[(b*Hkv + g)*NB + c] != 0 when some query attends block c of
  // (b, g): only those blocks are converted to float.
  std::vector<uint8_t> needed_blocks() const {
    const int64_t nb = num_blocks_;
    std::vector<uint8_t> needed(pb_.B * pb_.Hkv * nb, 0);
    if (!sparse()) {
      // The last query of a row sees every key < kv_len.
      for (int64_t item = 0; item < pb_.B * pb_.Hkv; ++item) {
        const int64_t b = item / pb_.Hkv;
        if (lengths_.q_len(b) > 0) {
          std::fill_n(needed.data() + item * nb, num_blocks(lengths_.kv_len(b)), uint8_t{1});
        }
      }
      return needed;
    }
    parallel_for(pb_.B * pb_.Hkv, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> list(capacity());
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / pb_.Hkv, g = item % pb_.Hkv;
        uint8_t* flags = needed.data() + item * nb;
        for (int64_t i = 0; i < lengths_.q_len(b); ++i) {
          const int64_t n = blocks(b, i, g, list.data());
          for (int64_t k = 0; k < n; ++k) flags[list[k]] = 1;
        }
      }
    });
    return needed;
  }

 private:
  AttentionProblem pb_;
  const int32_t* ids_;
  int64_t topk_;
  bool causal_;
  Lengths lengths_;
  int64_t num_blocks_;
};

// For each (row, kv group, key block): the queries attending it. Dense lists
// are ranges; sparse ones a CSR built per call, with queries ascending so the
// dk/dv sums have a fixed order.
class InverseLists {
 public:
  InverseLists(const AttentionProblem& pb, const Selection& selection)
      : pb_(pb), selection_(selection) {
    if (!selection.sparse()) return;
    const int64_t nb = selection.num_key_blocks(), cap = selection.capacity();
    offsets_.assign(pb.B * pb.Hkv * (nb + 1), 0);
    // Each (b, g) owns a fixed region of Sq * topk entries: no cross-item
    // prefix sum, so the build runs in parallel over (b, g).
    queries_.resize(pb.B * pb.Hkv * pb.Sq * cap);
    parallel_for(pb.B * pb.Hkv, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> list(cap);
      std::vector<int64_t> cursor(nb);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / pb.Hkv, g = item % pb.Hkv;
        const int64_t q_len = selection.lengths().q_len(b);
        int64_t* offsets = offsets_.data() + item * (nb + 1);
        int32_t* queries = queries_.data() + item * pb.Sq * cap;
        for (int64_t i = 0; i < q_len; ++i) {
          const int64_t n = selection.blocks(b, i, g, list.data());
          for (int64_t k = 0; k < n; ++k) ++offsets[list[k] + 1];
        }
        for (int64_t c = 0; c < nb; ++c) offsets[c + 1] += offsets[c];
        std::copy(offsets, offsets + nb, cursor.begin());
        for (int64_t i = 0; i < q_len; ++i) {
          const int64_t n = selection.blocks(b, i, g, list.data());
          for (int64_t k = 0; k < n; ++k) queries[cursor[list[k]]++] = static_cast<int32_t>(i);
        }
      }
    });
  }

  QuerySpan queries(int64_t b, int64_t g, int64_t c) const {
    if (selection_.sparse()) {
      const int64_t nb = selection_.num_key_blocks(), item = b * pb_.Hkv + g;
      const int64_t* offsets = offsets_.data() + item * (nb + 1);
      const int32_t* queries = queries_.data() + item * pb_.Sq * selection_.capacity();
      return {queries + offsets[c], 0, offsets[c + 1] - offsets[c]};
    }
    const Lengths& lengths = selection_.lengths();
    const int64_t q_len = lengths.q_len(b), kv_len = lengths.kv_len(b);
    if (c * kBlock >= kv_len) return {nullptr, 0, 0};
    // Causal: query i sees block c once its position kv_len - q_len + i
    // reaches c * kBlock.
    const int64_t first =
        selection_.causal() ? std::max<int64_t>(0, c * kBlock - (kv_len - q_len)) : 0;
    return {nullptr, first, std::max<int64_t>(0, q_len - first)};
  }

 private:
  AttentionProblem pb_;
  const Selection& selection_;
  std::vector<int64_t> offsets_;
  std::vector<int32_t> queries_;
};

// Float copies of the needed key or value blocks: kBlock x D floats per
// (b, kv group, block), row-major [key][d] or transposed [d][key], keys past
// kv_len zero. Blocks nobody attends are left unconverted (never read).
class BlockStore {
 public:
  BlockStore(DType dtype, const void* src, bool transposed, const AttentionProblem& pb,
             const Lengths& lengths, const std::vector<uint8_t>& needed)
      : hkv_(pb.Hkv),
        nb_(num_blocks(pb.Sk)),
        block_elems_(kBlock * pb.D),
        // Uninitialised on purpose: untouched pages of unneeded blocks cost nothing.
        data_(new float[pb.B * pb.Hkv * nb_ * block_elems_]) {
    parallel_for(pb.B * hkv_ * nb_, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        if (!needed[item]) continue;
        const int64_t c = item % nb_, g = (item / nb_) % hkv_, b = item / (nb_ * hkv_);
        const int64_t rows = std::clamp<int64_t>(lengths.kv_len(b) - c * kBlock, 0, kBlock);
        const int64_t offset = ((b * pb.Sk + c * kBlock) * pb.Hkv + g) * pb.D;
        float* dst = data_.get() + item * block_elems_;
        if (transposed) {
          load_block_transposed(dtype, src, offset, pb.Hkv * pb.D, rows, pb.D, dst);
        } else {
          load_block(dtype, src, offset, pb.Hkv * pb.D, rows, pb.D, dst);
        }
      }
    }, /*grain=*/16);
  }

  const float* block(int64_t b, int64_t g, int64_t c) const {
    return data_.get() + ((b * hkv_ + g) * nb_ + c) * block_elems_;
  }

 private:
  int64_t hkv_, nb_, block_elems_;
  std::unique_ptr<float[]> data_;
};

// The valid queries [i0, i0 + n) of a tile with their block lists. walk()
// visits the union of the lists in ascending block order and calls
// fn(c, members, count) with the tile indices of the queries attending c.
class QueryTile {
 public:
  QueryTile(int64_t max_queries, int64_t capacity)
      : capacity_(capacity),
        lists_(max_queries * capacity),
        length_(max_queries),
        cursor_(max_queries),
        members_(max_queries) {}

  void assign(const Selection& selection, int64_t b, int64_t g, int64_t i0, int64_t n) {
    n_ = n;
    for (int64_t t = 0; t < n; ++t) {
      length_[t] = selection.blocks(b, i0 + t, g, lists_.data() + t * capacity_);
      cursor_[t] = 0;
    }
  }

  template <class Fn>
  void walk(Fn&& fn) {
    for (;;) {
      int64_t c = -1;
      for (int64_t t = 0; t < n_; ++t) {
        if (cursor_[t] < length_[t]) {
          const int64_t next = lists_[t * capacity_ + cursor_[t]];
          if (c < 0 || next < c) c = next;
        }
      }
      if (c < 0) return;
      int64_t count = 0;
      for (int64_t t = 0; t < n_; ++t) {
        if (cursor_[t] < length_[t] && lists_[t * capacity_ + cursor_[t]] == c) {
          members_[count++] = t;
          ++cursor_[t];  // one entry per visit: a duplicate id is visited again
        }
      }
      fn(c, members_.data(), count);
    }
  }

 private:
  int64_t capacity_, n_ = 0;
  std::vector<int32_t> lists_;
  std::vector<int64_t> length_, cursor_, members_;
};

// Backward of one row on one block, from the forward's lse: overwrites
// s[0, kBlock) with P = exp(s - lse) and dp[0, kBlock) with
// dS = P * (dP - di) on the n visible keys, zero past them (and everywhere
// for a row whose lse is -inf: it attended nothing).
void probs_and_grads(float* s, float* dp, int64_t n, float lse, float di) {
  if (lse == kNegInf) n = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = softmax_exp(s[j] - lse);
    dp[j] = s[j] * (dp[j] - di);
  }
  std::fill(s + n, s + kBlock, 0.0f);
  std::fill(dp + n, dp + kBlock, 0.0f);
}

// Shape constants of one call.
struct Dims {
  int64_t B, Sq, Sk, Hq, Hkv, D, G, NB;
  int64_t tile;    // queries per tile
  int64_t tiles;   // tiles per (b, kv group)

  explicit Dims(const AttentionProblem& pb)
      : B(pb.B), Sq(pb.Sq), Sk(pb.Sk), Hq(pb.Hq), Hkv(pb.Hkv), D(pb.D),
        G(pb.Hq / pb.Hkv), NB(num_blocks(pb.Sk)),
        tile(std::max<int64_t>(1, kPanelRows / std::max<int64_t>(G, 1))),
        tiles((pb.Sq + tile - 1) / tile) {}

  // Element offset of the G heads of group g of query i (q, out, dout, dq)
  // and index of their first lse entry.
  int64_t q_offset(int64_t b, int64_t i, int64_t g) const { return row(b, i, g) * D; }
  int64_t row(int64_t b, int64_t i, int64_t g) const { return (b * Sq + i) * Hq + g * G; }
  // Element offset of key j of kv head g (k, v, dk, dv).
  int64_t k_offset(int64_t b, int64_t j, int64_t g) const { return ((b * Sk + j) * Hkv + g) * D; }

  // Query tiles, heaviest (last, under a causal mask) first, so that the
  // dynamic hand-out of parallel_for ends on small items.
  int64_t tile_items() const { return B * Hkv * tiles; }
  void tile_item(int64_t item, int64_t& b, int64_t& g, int64_t& tile_index) const {
    tile_index = tiles - 1 - item / (B * Hkv);
    b = item % (B * Hkv) / Hkv;
    g = item % Hkv;
  }
};

// Sizes that describe buffers at all (else nothing can be written).
bool sizes_ok(const AttentionProblem& pb) {
  return pb.B >= 0 && pb.Sq >= 0 && pb.Sk >= 0 && pb.Hq >= 0 && pb.Hkv >= 0 && pb.D >= 0;
}

bool valid(const AttentionProblem& pb, const KeySelection& keys) {
  return sizes_ok(pb) && pb.Hkv > 0 && pb.Hq % pb.Hkv == 0 &&
         (keys.ids == nullptr || keys.topk >= 0);
}

// Scaled query rows (or unscaled dout rows) of the G heads of the given
// queries into consecutive rows of dst.
void load_rows(DType dtype, const void* src, const Dims& dims, int64_t b, int64_t g,
               int64_t i0, int64_t n, float factor, float* dst) {
  const int64_t width = dims.G * dims.D;
  for (int64_t t = 0; t < n; ++t) {
    float* row = dst + t * width;
    load_row(dtype, src, dims.q_offset(b, i0 + t, g), width, row);
    if (factor != 1.0f) {
      for (int64_t e = 0; e < width; ++e) row[e] *= factor;
    }
  }
}

void forward(DType dtype, const AttentionProblem& pb, const KeySelection& keys, const void* q,
             const void* k, const void* v, const Lengths& lengths, void* out, float* lse) {
  const Dims dims(pb);
  const Selection selection(pb, keys, lengths);
  const std::vector<uint8_t> needed = selection.needed_blocks();
  const BlockStore kt(dtype, k, /*transposed=*/true, pb, lengths, needed);
  const BlockStore vr(dtype, v, /*transposed=*/false, pb, lengths, needed);
  const int64_t D = dims.D, G = dims.G, width = G * D, rows = dims.tile * G;

  parallel_for(dims.tile_items(), [&](int64_t begin, int64_t end) {
    QueryTile tile(dims.tile, selection.capacity());
    std::vector<float> qt(rows * D), acc(rows * D), m(rows), l(rows);
    std::vector<float> panel_q(rows * D), panel_o(rows * D), s(rows * kBlock), result(D);
    for (int64_t item = begin; item < end; ++item) {
      int64_t b, g, tile_index;
      dims.tile_item(item, b, g, tile_index);
      const int64_t i0 = tile_index * dims.tile;
      const int64_t i_end = std::min(dims.Sq, i0 + dims.tile);
      const int64_t n = std::max<int64_t>(0, std::min(i_end, lengths.q_len(b)) - i0);

      load_rows(dtype, q, dims, b, g, i0, n, pb.scale, qt.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      tile.assign(selection, b, g, i0, n);
      tile.walk([&](int64_t c, const int64_t* members, int64_t count) {
        const int64_t R = count * G;
        gather_rows(qt.data(), members, count, width, panel_q.data());
        std::fill_n(s.begin(), R * kBlock, 0.0f);
        gemm_acc(R, D, kBlock, panel_q.data(), D, 1, kt.block(b, g, c), kBlock, s.data(), kBlock);
        int64_t keys_used = 0;
        for (int64_t x = 0; x < count; ++x) {
          const int64_t t = members[x];
          const int64_t nvis = selection.visible(b, lengths.position(b, i0 + t), c);
          keys_used = std::max(keys_used, nvis);
          for (int64_t h = 0; h < G; ++h) {
            const int64_t r = t * G + h;
            float* row = s.data() + (x * G + h) * kBlock;
            const float alpha = online_softmax_step(row, nvis, m[r], l[r]);
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
          }
        }
        std::fill_n(panel_o.begin(), R * D, 0.0f);
        gemm_acc(R, keys_used, D, s.data(), kBlock, 1, vr.block(b, g, c), D, panel_o.data(), D);
        for (int64_t x = 0; x < count; ++x) {
          float* dst = acc.data() + members[x] * width;
          const float* src = panel_o.data() + x * width;
          for (int64_t e = 0; e < width; ++e) dst[e] += src[e];
        }
      });

      for (int64_t t = 0; t < n; ++t) {
        for (int64_t h = 0; h < G; ++h) {
          const int64_t r = t * G + h;
          const int64_t row = dims.row(b, i0 + t, g) + h;
          if (m[r] == kNegInf) {  // attended nothing
            fill_row(dtype, 0.0f, D, out, row * D);
            if (lse) lse[row] = kNegInf;
            continue;
          }
          const float inv = 1.0f / l[r];
          for (int64_t d = 0; d < D; ++d) result[d] = acc[r * D + d] * inv;
          store_row(dtype, result.data(), D, out, row * D);
          if (lse) lse[row] = m[r] + std::log(l[r]);
        }
      }
      for (int64_t i = i0 + n; i < i_end; ++i) {  // padding rows
        fill_row(dtype, 0.0f, width, out, dims.q_offset(b, i, g));
        if (lse) std::fill_n(lse + dims.row(b, i, g), G, kNegInf);
      }
    }
  });
}

// di[b, i, h] = sum_d dout * out - dlse (zero for padding rows): the row term
// of dS = P * (dP - di), with the lse cotangent folded in.
std::vector<float> row_terms(DType dtype, const Dims& dims, const Lengths& lengths,
                             const void* out, const void* dout, const float* dlse) {
  std::vector<float> di(dims.B * dims.Sq * dims.Hq, 0.0f);
  const int64_t width = dims.Hq * dims.D;
  parallel_for(dims.B * dims.Sq, [&](int64_t begin, int64_t end) {
    std::vector<float> o(width), d_o(width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / dims.Sq, i = item % dims.Sq;
      if (i >= lengths.q_len(b)) continue;
      load_row(dtype, out, item * width, width, o.data());
      load_row(dtype, dout, item * width, width, d_o.data());
      for (int64_t h = 0; h < dims.Hq; ++h) {
        float sum = 0.0f;
        for (int64_t d = 0; d < dims.D; ++d) sum += d_o[h * dims.D + d] * o[h * dims.D + d];
        di[item * dims.Hq + h] = sum - (dlse ? dlse[item * dims.Hq + h] : 0.0f);
      }
    }
  }, 16);
  return di;
}

// dq, per query tile: dq = scale * sum over blocks of dS . K.
void backward_dq(DType dtype, const Dims& dims, const AttentionProblem& pb,
                 const Selection& selection, const BlockStore& kt, const BlockStore& vt,
                 const BlockStore& kr, const void* q, const void* dout, const float* lse,
                 const std::vector<float>& di, void* dq) {
  const Lengths& lengths = selection.lengths();
  const int64_t D = dims.D, G = dims.G, width = G * D, rows = dims.tile * G;
  parallel_for(dims.tile_items(), [&](int64_t begin, int64_t end) {
    QueryTile tile(dims.tile, selection.capacity());
    std::vector<float> qt(rows * D), dot(rows * D), acc(rows * D), result(width);
    std::vector<float> panel_q(rows * D), panel_do(rows * D), panel_dq(rows * D);
    std::vector<float> s(rows * kBlock), dp(rows * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      int64_t b, g, tile_index;
      dims.tile_item(item, b, g, tile_index);
      const int64_t i0 = tile_index * dims.tile;
      const int64_t i_end = std::min(dims.Sq, i0 + dims.tile);
      const int64_t n = std::max<int64_t>(0, std::min(i_end, lengths.q_len(b)) - i0);

      load_rows(dtype, q, dims, b, g, i0, n, pb.scale, qt.data());
      load_rows(dtype, dout, dims, b, g, i0, n, 1.0f, dot.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      tile.assign(selection, b, g, i0, n);
      tile.walk([&](int64_t c, const int64_t* members, int64_t count) {
        const int64_t R = count * G;
        gather_rows(qt.data(), members, count, width, panel_q.data());
        gather_rows(dot.data(), members, count, width, panel_do.data());
        std::fill_n(s.begin(), R * kBlock, 0.0f);
        std::fill_n(dp.begin(), R * kBlock, 0.0f);
        gemm_acc(R, D, kBlock, panel_q.data(), D, 1, kt.block(b, g, c), kBlock, s.data(), kBlock);
        gemm_acc(R, D, kBlock, panel_do.data(), D, 1, vt.block(b, g, c), kBlock, dp.data(),
                 kBlock);
        int64_t keys_used = 0;
        for (int64_t x = 0; x < count; ++x) {
          const int64_t i = i0 + members[x];
          const int64_t nvis = selection.visible(b, lengths.position(b, i), c);
          keys_used = std::max(keys_used, nvis);
          for (int64_t h = 0; h < G; ++h) {
            const int64_t row = dims.row(b, i, g) + h;
            const int64_t at = (x * G + h) * kBlock;
            probs_and_grads(s.data() + at, dp.data() + at, nvis, lse[row], di[row]);
          }
        }
        std::fill_n(panel_dq.begin(), R * D, 0.0f);
        gemm_acc(R, keys_used, D, dp.data(), kBlock, 1, kr.block(b, g, c), D, panel_dq.data(), D);
        for (int64_t x = 0; x < count; ++x) {
          float* dst = acc.data() + members[x] * width;
          const float* src = panel_dq.data() + x * width;
          for (int64_t e = 0; e < width; ++e) dst[e] += src[e];
        }
      });

      for (int64_t t = 0; t < n; ++t) {
        for (int64_t e = 0; e < width; ++e) result[e] = acc[t * width + e] * pb.scale;
        store_row(dtype, result.data(), width, dq, dims.q_offset(b, i0 + t, g));
      }
      for (int64_t i = i0 + n; i < i_end; ++i) {
        fill_row(dtype, 0.0f, width, dq, dims.q_offset(b, i, g));
      }
    }
  });
}

// dk/dv, per key block: dv = sum P^T . dout and dk = sum dS^T . (scale q) over
// the queries attending the block and the G heads of its group.
void backward_dkdv(DType dtype, const Dims& dims, const AttentionProblem& pb,
                   const Selection& selection, const InverseLists& inverse,
                   const BlockStore& kt, const BlockStore& vt, const void* q, const void* dout,
                   const float* lse, const std::vector<float>& di, void* dk, void* dv) {
  const Lengths& lengths = selection.lengths();
  const int64_t D = dims.D, G = dims.G, width = G * D, rows = dims.tile * G;
  // Blocks in ascending order come first: under a causal mask they have the
  // most queries.
  const int64_t groups = dims.B * dims.Hkv;
  parallel_for(groups * dims.NB, [&](int64_t begin, int64_t end) {
    std::vector<float> panel_q(rows * D), panel_do(rows * D), s(rows * kBlock), dp(rows * kBlock);
    std::vector<float> dk_acc(kBlock * D), dv_acc(kBlock * D);
    std::vector<int64_t> nvis(dims.tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / groups, b = item % groups / dims.Hkv, g = item % dims.Hkv;
      const QuerySpan span = inverse.queries(b, g, c);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < span.count; k0 += dims.tile) {
        const int64_t count = std::min(dims.tile, span.count - k0), R = count * G;
        int64_t keys_used = 0;
        for (int64_t x = 0; x < count; ++x) {
          const int64_t i = span[k0 + x];
          load_rows(dtype, q, dims, b, g, i, 1, pb.scale, panel_q.data() + x * width);
          load_rows(dtype, dout, dims, b, g, i, 1, 1.0f, panel_do.data() + x * width);
          nvis[x] = selection.visible(b, lengths.position(b, i), c);
          keys_used = std::max(keys_used, nvis[x]);
        }
        std::fill_n(s.begin(), R * kBlock, 0.0f);
        std::fill_n(dp.begin(), R * kBlock, 0.0f);
        gemm_acc(R, D, kBlock, panel_q.data(), D, 1, kt.block(b, g, c), kBlock, s.data(), kBlock);
        gemm_acc(R, D, kBlock, panel_do.data(), D, 1, vt.block(b, g, c), kBlock, dp.data(),
                 kBlock);
        for (int64_t x = 0; x < count; ++x) {
          for (int64_t h = 0; h < G; ++h) {
            const int64_t row = dims.row(b, span[k0 + x], g) + h;
            const int64_t at = (x * G + h) * kBlock;
            probs_and_grads(s.data() + at, dp.data() + at, nvis[x], lse[row], di[row]);
          }
        }
        // Keys j < keys_used: dv[j] += sum_r P[r][j] dout[r], dk[j] += sum_r dS[r][j] q[r].
        gemm_acc(keys_used, R, D, s.data(), 1, kBlock, panel_do.data(), D, dv_acc.data(), D);
        gemm_acc(keys_used, R, D, dp.data(), 1, kBlock, panel_q.data(), D, dk_acc.data(), D);
      }
      const int64_t keys = std::min(kBlock, dims.Sk - c * kBlock);
      for (int64_t j = 0; j < keys; ++j) {
        const int64_t offset = dims.k_offset(b, c * kBlock + j, g);
        store_row(dtype, dk_acc.data() + j * D, D, dk, offset);
        store_row(dtype, dv_acc.data() + j * D, D, dv, offset);
      }
    }
  });
}

void backward(DType dtype, const AttentionProblem& pb, const KeySelection& keys, const void* q,
              const void* k, const void* v, const void* out, const float* lse, const void* dout,
              const float* dlse, const Lengths& lengths, void* dq, void* dk, void* dv) {
  const Dims dims(pb);
  const Selection selection(pb, keys, lengths);
  const std::vector<uint8_t> needed = selection.needed_blocks();
  const BlockStore kt(dtype, k, /*transposed=*/true, pb, lengths, needed);
  const BlockStore vt(dtype, v, /*transposed=*/true, pb, lengths, needed);
  const std::vector<float> di = row_terms(dtype, dims, lengths, out, dout, dlse);
  {
    const BlockStore kr(dtype, k, /*transposed=*/false, pb, lengths, needed);
    backward_dq(dtype, dims, pb, selection, kt, vt, kr, q, dout, lse, di, dq);
  }
  const InverseLists inverse(pb, selection);
  backward_dkdv(dtype, dims, pb, selection, inverse, kt, vt, q, dout, lse, di, dk, dv);
}

// The API has no error channel (it runs inside FFI handlers that validated
// the shapes): on a failure (invalid problem, out of memory) the outputs are
// set to NaN so that it cannot pass unnoticed.
void fill_nan(DType dtype, void* dst, int64_t n) {
  if (dst && n > 0) fill_row(dtype, std::nanf(""), n, dst, 0);
}

int64_t q_elems(const AttentionProblem& pb) { return pb.B * pb.Sq * pb.Hq * pb.D; }
int64_t k_elems(const AttentionProblem& pb) { return pb.B * pb.Sk * pb.Hkv * pb.D; }

}  // namespace

void attention_fwd(DType dtype, const AttentionProblem& problem, const KeySelection& keys,
                   const void* q, const void* k, const void* v, const int32_t* q_lengths,
                   const int32_t* kv_lengths, void* out, float* lse) {
  if (!sizes_ok(problem)) return;
  const Lengths lengths{q_lengths, kv_lengths, problem.Sq, problem.Sk};
  try {
    if (valid(problem, keys)) {
      forward(dtype, problem, keys, q, k, v, lengths, out, lse);
      return;
    }
  } catch (...) {
  }
  fill_nan(dtype, out, q_elems(problem));
  fill_nan(DType::kF32, lse, problem.B * problem.Sq * problem.Hq);
}

void attention_bwd(DType dtype, const AttentionProblem& problem, const KeySelection& keys,
                   const void* q, const void* k, const void* v, const void* out,
                   const float* lse, const void* dout, const float* dlse,
                   const int32_t* q_lengths, const int32_t* kv_lengths, void* dq, void* dk,
                   void* dv) {
  if (!sizes_ok(problem)) return;
  const Lengths lengths{q_lengths, kv_lengths, problem.Sq, problem.Sk};
  try {
    // The forward's lse is required (a zero-sized buffer may come as nullptr).
    if (valid(problem, keys) && (lse != nullptr || problem.B * problem.Sq * problem.Hq == 0)) {
      backward(dtype, problem, keys, q, k, v, out, lse, dout, dlse, lengths, dq, dk, dv);
      return;
    }
  } catch (...) {
  }
  fill_nan(dtype, dq, q_elems(problem));
  fill_nan(dtype, dk, k_elems(problem));
  fill_nan(dtype, dv, k_elems(problem));
}

}  // namespace jax_msa::cpu
