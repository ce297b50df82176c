// CPU kernels of paged inference (spec §3.7): attention and the indexer over
// paged caches of float32, bfloat16, float16 or float8_e4m3fn pages.
//
// A work item is a tile of consecutive queries of one request (and, for
// attention, one kv group). A page is converted to float, times the cache's
// scale, when a tile reaches it; only its keys below kv_length are read, and
// a hole of the page table is never read at all.
//  - Attention walks the union of the tile's page lists in ascending order;
//    each page serves every (query, head) row attending it at once (a decode
//    step of up to 16 queries x 16 heads of a group is one tile), with an
//    online softmax as in the flash attention of attention.cc.
//  - The indexer scores each visible page once per tile, for all its queries
//    and index heads, then applies topk_select (the selection rule of the
//    contiguous indexer) to the tile's block scores.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cpu/parallel.h"

namespace jax_msa::cpu {
namespace {

// (query, head) rows per attention tile: 16 queries x 16 heads. Scores take
// kAttentionRows x kBlock floats (128 KiB).
constexpr int64_t kAttentionRows = 256;
// (query, head) rows per indexer tile. At most 64 queries, so that the
// topk_select of a tile runs inline in the thread that owns the tile.
constexpr int64_t kIndexerRows = 64;

struct E4M3FNElement {
  using Storage = uint8_t;
  static float load(uint8_t x) { return e4m3fn_to_float(x); }
};

// Calls fn(element): the typed access of numeric.h, plus float8_e4m3fn.
template <class Fn>
void with_cache_element(CacheType type, Fn&& fn) {
  switch (type) {
    case CacheType::kF32:
      fn(Element<DType::kF32>{});
      break;
    case CacheType::kBF16:
      fn(Element<DType::kBF16>{});
      break;
    case CacheType::kF16:
      fn(Element<DType::kF16>{});
      break;
    case CacheType::kE4M3FN:
      fn(E4M3FNElement{});
      break;
  }
}

// Keys [0, rows) of head `head` of physical page `page` as float times the
// cache's scale, transposed dst[d*kBlock + j] or row-major dst[j*dim + d];
// keys rows..kBlock-1 are zero, so loops may run over the whole page.
void load_page(const PagedCache& cache, int64_t page, int64_t head, int64_t rows,
               bool transposed, float* dst) {
  const int64_t dim = cache.dim;
  with_cache_element(cache.type, [&](auto e) {
    using E = decltype(e);
    const auto* src = static_cast<const typename E::Storage*>(cache.data) +
                      (page * cache.heads + head) * kBlock * dim;
    for (int64_t j = 0; j < rows; ++j) {
      if (transposed) {
        for (int64_t d = 0; d < dim; ++d) dst[d * kBlock + j] = E::load(src[j * dim + d]) * cache.scale;
      } else {
        for (int64_t d = 0; d < dim; ++d) dst[j * dim + d] = E::load(src[j * dim + d]) * cache.scale;
      }
    }
  });
  if (transposed) {
    for (int64_t d = 0; d < dim; ++d) std::fill(dst + d * kBlock + rows, dst + (d + 1) * kBlock, 0.0f);
  } else {
    std::fill(dst + rows * dim, dst + kBlock * dim, 0.0f);
  }
}

// The page table and lengths of a call: which logical pages exist, and which
// of their keys a query sees.
class Pages {
 public:
  Pages(const int32_t* table, int64_t max_pages, int64_t num_pages, const Lengths& lengths)
      : table_(table), max_pages_(max_pages), num_pages_(num_pages), lengths_(lengths) {}

  const Lengths& lengths() const { return lengths_; }

  // Physical page of logical page c < max_pages of request b; -1 for a hole.
  int64_t physical(int64_t b, int64_t c) const {
    const int64_t entry = table_[b * max_pages_ + c];
    return entry >= 0 && entry < num_pages_ ? entry : -1;
  }

  // Keys of logical page c below kv_length: the only ones ever read.
  int64_t stored(int64_t b, int64_t c) const {
    return std::clamp<int64_t>(lengths_.kv_len(b) - c * kBlock, 0, kBlock);
  }

  // Keys [c*kBlock, c*kBlock + n) are visible to the query at position p; returns n.
  int64_t visible(int64_t b, int64_t p, int64_t c) const {
    return std::clamp<int64_t>(std::min(lengths_.kv_len(b), p + 1) - c * kBlock, 0, kBlock);
  }

  // Local page of valid query i of request b. Lengths clamps kv_length to
  // max_pages * kBlock, so it is < max_pages (and -1 when kv < q).
  int64_t local_page(int64_t b, int64_t i) const { return local_block(lengths_.position(b, i)); }

 private:
  const int32_t* table_;
  int64_t max_pages_, num_pages_;
  Lengths lengths_;
};

// The logical pages valid query i of request b (kv group g) attends, ascending
// and without duplicates, into list (max_pages, or topk, entries); returns
// their number. Dense: every page up to the local one. Sparse: the ids in
// [0, local page]. Holes are left out.
int64_t page_list(const Pages& pages, const PagedProblem& pb, const int32_t* ids, int64_t topk,
                  int64_t b, int64_t i, int64_t g, int32_t* list) {
  const int64_t L = pages.local_page(b, i);
  int64_t n = 0;
  if (ids == nullptr) {
    for (int64_t c = 0; c <= L; ++c) {
      if (pages.physical(b, c) >= 0) list[n++] = static_cast<int32_t>(c);
    }
    return n;
  }
  const int32_t* row = ids + ((b * pb.Q + i) * pb.Hkv + g) * topk;
  for (int64_t k = 0; k < topk; ++k) {
    if (row[k] >= 0 && row[k] <= L && pages.physical(b, row[k]) >= 0) list[n++] = row[k];
  }
  std::sort(list, list + n);
  // A duplicate id (a caller error) counts once.
  return std::unique(list, list + n) - list;
}

void run_paged_attention(DType q_dtype, DType out_dtype, const PagedProblem& pb,
                         const PagedCache& kc, const PagedCache& vc, const Pages& pages,
                         const int32_t* ids, int64_t topk, const void* q, void* out, float* lse) {
  const Lengths& lengths = pages.lengths();
  const int64_t D = pb.D, G = pb.Hq / pb.Hkv, width = G * D;
  const int64_t tile = std::max<int64_t>(1, kAttentionRows / std::max<int64_t>(G, 1));
  const int64_t tiles = (pb.Q + tile - 1) / tile, rows = tile * G;
  parallel_for(pb.B * pb.Hkv * tiles, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(rows * D), acc(rows * D), m(rows), l(rows), result(D);
    std::vector<float> panel_q(rows * D), panel_o(rows * D), s(rows * kBlock);
    std::vector<float> kt(D * kBlock), vr(kBlock * D);
    std::vector<int32_t> list(ids ? topk : pb.max_pages);
    std::vector<std::pair<int32_t, int32_t>> visits;  // (page, query of the tile)
    std::vector<int64_t> members(tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (pb.Hkv * tiles), g = item / tiles % pb.Hkv;
      const int64_t i0 = item % tiles * tile, i_end = std::min(pb.Q, i0 + tile);
      const int64_t n = std::max<int64_t>(0, std::min(i_end, lengths.q_len(b)) - i0);
      const int64_t first_row = (b * pb.Q + i0) * pb.Hq + g * G;  // row of (t, h): + t*Hq + h

      for (int64_t t = 0; t < n; ++t) {
        load_row(q_dtype, q, (first_row + t * pb.Hq) * D, width, qt.data() + t * width);
        for (int64_t e = 0; e < width; ++e) qt[t * width + e] *= pb.scale;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      visits.clear();
      for (int64_t t = 0; t < n; ++t) {
        const int64_t count = page_list(pages, pb, ids, topk, b, i0 + t, g, list.data());
        for (int64_t k = 0; k < count; ++k) visits.emplace_back(list[k], static_cast<int32_t>(t));
      }
      // Grouped by page, ascending; the queries of a page ascending.
      std::sort(visits.begin(), visits.end());

      for (size_t v0 = 0; v0 < visits.size();) {
        const int64_t c = visits[v0].first;
        int64_t count = 0;
        for (; v0 < visits.size() && visits[v0].first == c; ++v0) members[count++] = visits[v0].second;
        const int64_t page = pages.physical(b, c), stored = pages.stored(b, c);
        load_page(kc, page, g, stored, /*transposed=*/true, kt.data());
        load_page(vc, page, g, stored, /*transposed=*/false, vr.data());
        const int64_t R = count * G;
        gather_rows(qt.data(), members.data(), count, width, panel_q.data());
        std::fill_n(s.begin(), R * kBlock, 0.0f);
        gemm_acc(R, D, kBlock, panel_q.data(), D, 1, kt.data(), kBlock, s.data(), kBlock);
        int64_t keys_used = 0;
        for (int64_t x = 0; x < count; ++x) {
          const int64_t t = members[x];
          const int64_t nvis = pages.visible(b, lengths.position(b, i0 + t), c);
          keys_used = std::max(keys_used, nvis);
          for (int64_t h = 0; h < G; ++h) {
            const int64_t r = t * G + h;
            const float alpha = online_softmax_step(s.data() + (x * G + h) * kBlock, nvis, m[r], l[r]);
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
          }
        }
        std::fill_n(panel_o.begin(), R * D, 0.0f);
        gemm_acc(R, keys_used, D, s.data(), kBlock, 1, vr.data(), D, panel_o.data(), D);
        for (int64_t x = 0; x < count; ++x) {
          float* dst = acc.data() + members[x] * width;
          const float* src = panel_o.data() + x * width;
          for (int64_t e = 0; e < width; ++e) dst[e] += src[e];
        }
      }

      for (int64_t t = 0; t < i_end - i0; ++t) {
        for (int64_t h = 0; h < G; ++h) {
          const int64_t r = t * G + h, row = first_row + t * pb.Hq + h;
          if (t >= n || m[r] == kNegInf) {  // padding, or attended nothing
            fill_row(out_dtype, 0.0f, D, out, row * D);
            lse[row] = kNegInf;
            continue;
          }
          const float inv = 1.0f / l[r];
          for (int64_t d = 0; d < D; ++d) result[d] = acc[r * D + d] * inv;
          store_row(out_dtype, result.data(), D, out, row * D);
          lse[row] = m[r] + std::log(l[r]);
        }
      }
    }
  });
}

void run_paged_indexer(DType dtype, const void* qi, const PagedCache& ki, const Pages& pages,
                       int32_t* ids, int64_t B, int64_t Q, int64_t Hi, int64_t Di,
                       int64_t max_pages, int64_t topk, float scale) {
  const Lengths& lengths = pages.lengths();
  const int64_t tile = std::max<int64_t>(1, kIndexerRows / std::max<int64_t>(Hi, 1));
  const int64_t tiles = (Q + tile - 1) / tile, width = Hi * Di;
  parallel_for(B * tiles, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(tile * width), scores(tile * Hi * max_pages);
    std::vector<float> kt(Di * kBlock), panel(tile * Hi * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / tiles, i0 = item % tiles * tile, i_end = std::min(Q, i0 + tile);
      const int64_t n = std::max<int64_t>(0, std::min(i_end, lengths.q_len(b)) - i0);
      int32_t* tile_ids = ids + (b * Q + i0) * Hi * topk;
      std::fill(tile_ids + n * Hi * topk, tile_ids + (i_end - i0) * Hi * topk, -1);  // padding
      if (n == 0) continue;

      load_row(dtype, qi, (b * Q + i0) * width, n * width, qt.data());
      for (int64_t e = 0; e < n * width; ++e) qt[e] *= scale;
      // Block scores [t][h][page]: -inf for holes and pages past the local one.
      std::fill_n(scores.begin(), n * Hi * max_pages, kNegInf);
      const int64_t last = pages.local_page(b, i0 + n - 1);
      int64_t t0 = 0;
      for (int64_t c = 0; c <= last; ++c) {
        // Local pages grow with t: the queries that see page c are a suffix.
        while (pages.local_page(b, i0 + t0) < c) ++t0;
        const int64_t page = pages.physical(b, c);
        if (page < 0) continue;
        load_page(ki, page, 0, pages.stored(b, c), /*transposed=*/true, kt.data());
        const int64_t R = (n - t0) * Hi;
        std::fill_n(panel.begin(), R * kBlock, 0.0f);
        gemm_acc(R, Di, kBlock, qt.data() + t0 * width, Di, 1, kt.data(), kBlock, panel.data(),
                 kBlock);
        for (int64_t t = t0; t < n; ++t) {
          const int64_t nvis = pages.visible(b, lengths.position(b, i0 + t), c);
          for (int64_t h = 0; h < Hi; ++h) {
            // NaN propagates like jnp.max; the selection ranks it as -inf.
            scores[(t * Hi + h) * max_pages + c] = row_max(panel.data() + ((t - t0) * Hi + h) * kBlock, nvis);
          }
        }
      }
      // The tile as a batch of one: n queries, the last at position kv - 1.
      const int32_t q_len = static_cast<int32_t>(n);
      const int32_t kv_len = static_cast<int32_t>(lengths.position(b, i0 + n - 1) + 1);
      topk_select(scores.data(), &q_len, &kv_len, tile_ids, 1, n, Hi, max_pages, topk);
    }
  });
}

bool cache_ok(const PagedCache& cache, int64_t heads, int64_t dim) {
  return cache.data != nullptr && cache.num_pages >= 0 && cache.heads == heads && cache.dim == dim;
}

}  // namespace

void paged_attention(DType q_dtype, DType out_dtype, const PagedProblem& problem,
                     const PagedCache& k, const PagedCache& v, const int32_t* page_table,
                     const int32_t* q_lengths, const int32_t* kv_lengths, const int32_t* ids,
                     int64_t topk, const void* q, void* out, float* lse) {
  const PagedProblem& p = problem;
  if (p.B < 0 || p.Q < 0 || p.Hq < 0 || p.D < 0 || p.max_pages < 0) return;
  const int64_t rows = p.B * p.Q * p.Hq;
  const bool ok = p.Hkv > 0 && p.Hq % p.Hkv == 0 && (ids == nullptr || topk >= 0) &&
                  cache_ok(k, p.Hkv, p.D) && cache_ok(v, p.Hkv, p.D) &&
                  k.num_pages == v.num_pages;
  const Lengths lengths{q_lengths, kv_lengths, p.Q, p.max_pages * kBlock};
  try {
    if (ok) {
      run_paged_attention(q_dtype, out_dtype, p, k, v, Pages(page_table, p.max_pages, k.num_pages, lengths),
                          ids, topk, q, out, lse);
      return;
    }
  } catch (...) {
  }
  // No error channel (see attention.cc): a failure leaves NaN outputs.
  fill_row(out_dtype, std::nanf(""), rows * p.D, out, 0);
  std::fill_n(lse, rows, std::nanf(""));
}

void paged_indexer(DType dtype, const void* qi, const PagedCache& ki, const int32_t* page_table,
                   const int32_t* q_lengths, const int32_t* kv_lengths, int32_t* ids,
                   int64_t B, int64_t Q, int64_t Hi, int64_t Di, int64_t max_pages,
                   int64_t topk, float scale) {
  if (B < 0 || Q < 0 || Hi < 0 || Di < 0 || max_pages < 0 || topk <= 0) return;
  const Lengths lengths{q_lengths, kv_lengths, Q, max_pages * kBlock};
  try {
    if (cache_ok(ki, 1, Di)) {
      run_paged_indexer(dtype, qi, ki, Pages(page_table, max_pages, ki.num_pages, lengths), ids,
                        B, Q, Hi, Di, max_pages, topk, scale);
      return;
    }
  } catch (...) {
  }
  // Nothing selected.
  std::fill_n(ids, B * Q * Hi * topk, -1);
}

}  // namespace jax_msa::cpu
