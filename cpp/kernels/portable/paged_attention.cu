// Paged attention for every GPU since Ampere (the portable family; spec
// §3.7): decode, MTP and chunked-prefill queries over paged K/V caches of
// 16-bit or e4m3 pages, dense or MSA-sparse, with mma.sync, ldmatrix and
// cp.async only (built as sm_80 PTX, and as SASS for the build's targets).
//
// The tiling, the page lists, split-KV and the combine are those of the SM90
// kernel (sm90/paged_attention.cu, sm90/paged_split_kv.hpp), so that both
// take the same workspace: a tile is `tokens` queries times the G query heads
// of one kv head (<= 128 rows, padded to 16-row warps); its pages (dense:
// every logical page up to its last query's; sparse: the union of its
// queries' selections; holes never enter) are cut into `splits` parts, one
// CTA each, whose float32 partials the combine merges.
//
// One CTA = 8 warps. Every thread loads a share of each page (K and V,
// cp.async, a ring of kStages pages; keys past kv_len zero-filled, not read).
// Warp w takes rows 16 (w / kw) .. + 15 of the tile and, of each page, the
// 32-key chunks kw' = w % kw, kw' + kw, ..: with few rows (decode at small
// G) several warps share a page, each with its own online softmax, merged by
// lse at the end. Per chunk: S = Q K^T (Q in registers), the masks and online
// softmax of the SM90 kernels, O += P V (V through ldmatrix.trans).
//
// e4m3 pages are widened once per page to float16 in shared memory (exact:
// widen_e4m3x2), and Q is rounded to float16 with a power-of-two scale per
// row (exact but for values below 2^-29 of the row's largest: float16
// subnormals), so that both products are float16 mma.sync.
//
// Speed (H100, bench_paged_attention.py, Q 8 at G 16: 128 rows a page): bf16
// 0.57-0.70 of the copy rate, e4m3 0.26-0.34. Compute-bound there (an e4m3
// page, half the bytes, takes about as long as a bf16 one); likely causes,
// not yet measured apart: each 16-row warp reads the whole page through
// ldmatrix, and one CTA per SM (160 KB) leaves two warps per scheduler to
// hide each chunk's S -> softmax -> P V chain.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/e4m3.hpp"
#include "kernels/sm90/online_softmax.hpp"
#include "kernels/sm90/paged_split_kv.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::portable {
namespace {

using namespace cute;
using sm90::cp_async_16;
using sm90::OnlineSoftmax;
using sm90::RequestLengths;
using sm90::SparseShape;
using sm90::SparseTile;
using sm90::SplitRange;
using sm90::TileRows;
using sm90::TileUnion;

// QElement: q's type. kFp8: e4m3 caches (else caches of q's type).
template <class QElement_, bool kFp8_>
struct PagedTraits {
  using QElement = QElement_;
  static constexpr bool kFp8 = kFp8_;
  using Element = std::conditional_t<kFp8, cutlass::half_t, QElement>;  // the products' operands
  using Stored = std::conditional_t<kFp8, uint8_t, QElement>;           // a cache element
  static constexpr int kD = 128;
  static constexpr int kKeys = 128;  // keys per page (spec §3.7)
  static constexpr int kRows = 128;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunk = 32;  // keys per warp step
  static constexpr int kStages = kFp8 ? 3 : 2;  // pages in the cp.async ring
  static constexpr int kPageElems = kKeys * kD;
  // For TileUnion (sparse_tile_producer.hpp).
  static constexpr int kMaxCandidates = 128;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                     SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // One warp's 16 rows; N in 16s so that one ldmatrix.x4 feeds two atoms.
  using TiledMma =
      decltype(make_tiled_mma(MmaAtom{}, Layout<Shape<_1, _1, _1>>{}, Tile<_16, _16, _16>{}));
  // 128-byte rows, 16-byte chunks swizzled within 8-row atoms: conflict-free
  // cp.async stores and ldmatrix loads.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  using SmemLayoutPage = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>>{}));
  // V seen as dims x keys: the B operand of P V.
  using SmemLayoutPageT = decltype(composition(
      SmemLayoutPage{}, make_layout(Shape<Int<kD>, Int<kKeys>>{}, Stride<Int<kKeys>, _1>{})));

  struct SharedStorage {
    // K, V of each page in flight: 16-bit in SmemLayoutPage; e4m3 as stored
    // (keys x 128 bytes). After the walk: the warps' partials to merge.
    alignas(128) Stored ring[kStages][2][kPageElems];
    // 16-bit: the tile's Q. e4m3: Q, then (once in registers) each page's K
    // and V widened to float16, in SmemLayoutPage.
    alignas(128) Element wide[kFp8 ? 2 * kPageElems : kRows * kD];
    float row_scale[kRows];  // e4m3: Q row r = row_scale[r] * its float16 row
    int64_t stage_key0[kStages];     // the page's first key position
    uint64_t stage_tokens[kStages];  // bit t: query t of the tile attends the page
    int32_t list_page[kMaxCandidates];  // sparse: the union, holes dropped
    int32_t list_c[kMaxCandidates];
    uint64_t list_tokens[kMaxCandidates];
    int32_t list_count;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  // An A100 CTA's limit (163 KB), so that sm_80 takes it.
  static_assert(kSmemBytes <= 166912, "fits one sm_80 CTA");
  static_assert(sizeof(SharedStorage::ring) >= (kWarps * 16 * kD + kWarps * 16) * sizeof(float),
                "the merge of the warps' partials fits the ring");
};

template <class Traits>
struct PagedParams {
  SparseShape shape;  // Sq = Q; ids null for dense
  const typename Traits::QElement* q;
  const typename Traits::Stored* k_cache;
  const typename Traits::Stored* v_cache;
  const int32_t* page_table;
  const float* k_scale;
  const float* v_scale;
  float* partial_o;    // [splits, B * Q * Hq, D]
  float* partial_lse;  // [splits, B * Q * Hq]
  int64_t rows_total;  // B * Q * Hq
  int64_t num_pages, max_pages;
  int splits;
  float scale_log2;  // scale * log2(e)
};

// Sparse (warp 0): the union of the tile's selections with their physical
// pages, holes dropped, in order of first occurrence (as the SM90 kernel).
template <class Traits>
__device__ void build_list(typename Traits::SharedStorage& ss, const PagedParams<Traits>& p,
                           const SparseTile& tile, const RequestLengths& len, int lane) {
  const TileUnion<Traits> u(p.shape, tile, len.q_len, len.kv_len, lane);
  constexpr int kRegs = TileUnion<Traits>::kRegs;
  const int32_t* table = p.page_table + tile.b * p.max_pages;
  int32_t page[kRegs];
  CUTE_UNROLL
  for (int i = 0; i < kRegs; ++i) {
    // cand < ceil(kv_len / 128) <= max_pages: inside the table's row.
    const int32_t x = u.first[i] ? table[u.cand[i]] : -1;
    page[i] = x >= 0 && x < p.num_pages ? x : -1;
  }
  int base = 0;
  CUTE_UNROLL
  for (int i = 0; i < kRegs; ++i) {
    const uint32_t hits = __ballot_sync(0xFFFFFFFFu, page[i] >= 0);
    if (page[i] >= 0) {
      const int at = base + __popc(hits & ((1u << lane) - 1));
      ss.list_page[at] = page[i];
      ss.list_c[at] = u.cand[i];
      ss.list_tokens[at] = u.tokens_of[i];
    }
    base += __popc(hits);
  }
  if (lane == 0) ss.list_count = base;
}

// K and V of kv head `head` of physical page `page` into ring stage `stage`
// (all threads); keys at or past `keys` (the last page) are zero-filled.
template <class Traits>
__device__ void load_page(typename Traits::SharedStorage& ss, const PagedParams<Traits>& p,
                          int64_t head, int32_t page, int keys, int stage) {
  using Stored = typename Traits::Stored;
  constexpr int kPerChunk = 16 / sizeof(Stored);
  constexpr int kChunks = Traits::kD / kPerChunk;  // 16-byte chunks per key
  const int64_t base = (int64_t{page} * p.shape.Hkv + head) * Traits::kPageElems;
  CUTE_UNROLL
  for (int i = 0; i < Traits::kKeys * kChunks / Traits::kThreads; ++i) {
    const int n = threadIdx.x + Traits::kThreads * i;
    const int key = n / kChunks, d0 = kPerChunk * (n % kChunks);
    const bool valid = key < keys;
    const int64_t at = base + key * Traits::kD + d0;
    int dst;
    if constexpr (Traits::kFp8) {
      dst = key * Traits::kD + d0;
    } else {
      dst = typename Traits::SmemLayoutPage{}(key, d0);
    }
    cp_async_16(ss.ring[stage][0] + dst, valid ? p.k_cache + at : p.k_cache, valid);
    cp_async_16(ss.ring[stage][1] + dst, valid ? p.v_cache + at : p.v_cache, valid);
  }
}

__device__ __forceinline__ uint4 widen_e4m3x8(uint32_t lo, uint32_t hi) {
  return make_uint4(sm90::widen_e4m3x2(lo), sm90::widen_e4m3x2(lo >> 16), sm90::widen_e4m3x2(hi),
                    sm90::widen_e4m3x2(hi >> 16));
}

// e4m3: the page in ring stage `stage` widened to float16 into `wide` (K,
// then V; all threads). A thread takes 16 bytes of a key and stores 2 x 16;
// the threads of the upper half of a key store their odd chunk first, so that
// each quarter warp's stores hit 8 distinct bank groups.
template <class Traits>
__device__ void widen_page(typename Traits::SharedStorage& ss, int stage) {
  constexpr int kChunks = Traits::kD / 16;  // 16-byte chunks per stored key
  CUTE_UNROLL
  for (int kv = 0; kv < 2; ++kv) {
    Tensor page = make_tensor(make_smem_ptr(ss.wide + kv * Traits::kPageElems),
                              typename Traits::SmemLayoutPage{});
    CUTE_UNROLL
    for (int i = 0; i < Traits::kKeys * kChunks / Traits::kThreads; ++i) {
      const int n = threadIdx.x + Traits::kThreads * i;
      const int key = n / kChunks, c = n % kChunks;
      const uint4 raw =
          *reinterpret_cast<const uint4*>(ss.ring[stage][kv] + key * Traits::kD + 16 * c);
      const uint4 lo = widen_e4m3x8(raw.x, raw.y), hi = widen_e4m3x8(raw.z, raw.w);
      const bool odd_first = c >= kChunks / 2;
      *reinterpret_cast<uint4*>(&page(key, 16 * c + (odd_first ? 8 : 0))) = odd_first ? hi : lo;
      *reinterpret_cast<uint4*>(&page(key, 16 * c + (odd_first ? 0 : 8))) = odd_first ? lo : hi;
    }
  }
}

// The tile's Q rows into shared memory (all threads, two per row); for e4m3
// caches, as float16 scaled by a power of two per row (row_scale). Rows of
// missing queries are zeros.
template <class Traits>
__device__ void load_q(typename Traits::SharedStorage& ss, const PagedParams<Traits>& p,
                       const SparseTile& tile, int64_t q_len) {
  using QElement = typename Traits::QElement;
  const SparseShape& s = p.shape;
  Tensor sQ = make_tensor(make_smem_ptr(ss.wide), typename Traits::SmemLayoutQ{});
  const int row = threadIdx.x / 2;
  const int d0 = 64 * (threadIdx.x % 2);
  uint4 raw[8];
  sm90::read_q_half_row<Traits::kD>(p.q, s, tile, row, d0, q_len, raw);
  if constexpr (Traits::kFp8) {
    float x[64];
    // max |q| < 2^e: the row scaled by 2^(15 - e) stays below 2^15 (float16 max 65504).
    const int e = sm90::q_row_exponent<QElement>(raw, x);
    const float inv = ldexpf(1.0f, 15 - e);
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) {
      uint32_t w[4];
      CUTE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const __half2 h = __floats2half2_rn(x[8 * i + 2 * j] * inv, x[8 * i + 2 * j + 1] * inv);
        w[j] = *reinterpret_cast<const uint32_t*>(&h);
      }
      *reinterpret_cast<uint4*>(&sQ(row, d0 + 8 * i)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    if (threadIdx.x % 2 == 0) ss.row_scale[row] = ldexpf(1.0f, e - 15);
  } else {
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) *reinterpret_cast<uint4*>(&sQ(row, d0 + 8 * i)) = raw[i];
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    paged_attention_kernel(const __grid_constant__ PagedParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Traits::Element;
  constexpr int kD = Traits::kD, kChunk = Traits::kChunk, kStages = Traits::kStages;
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const SparseShape& s = p.shape;
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const SparseTile tile(blockIdx.x / p.splits, s.B, s.Hkv, s.chunks, s.tokens);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const RequestLengths len(s, tile.b, p.max_pages);
  const int32_t* table = p.page_table + tile.b * p.max_pages;

  // This CTA's part [lo, hi) of the tile's pages: dense, logical pages (holes
  // skipped as they come); sparse, entries of the union list.
  const bool dense = s.ids == nullptr;
  uint64_t dense_tokens = 0;
  int64_t lo, hi;
  if (dense) {
    dense_tokens = sm90::valid_tokens(s, tile, len.q_len);
    const SplitRange part(sm90::dense_tile_pages(s, tile, len), p.splits, split);
    lo = part.lo, hi = part.hi;
  } else {
    if (warp == 0) build_list<Traits>(ss, p, tile, len, lane);
    __syncthreads();
    const SplitRange part(ss.list_count, p.splits, split);
    lo = part.lo, hi = part.hi;
  }
  // The next page of the part (the same in every thread). Dense: the table
  // entry after the one returned is loaded ahead, so that its latency
  // passes while a page is processed.
  int64_t next = lo;
  int32_t next_entry = dense && next < hi ? table[next] : -1;
  auto next_page = [&](int64_t& key0, int32_t& page, uint64_t& tokens) {
    if (!dense) {
      if (next >= hi) return false;
      page = ss.list_page[next];
      key0 = int64_t{ss.list_c[next]} * Traits::kKeys;
      tokens = ss.list_tokens[next];
      ++next;
      return true;
    }
    while (next < hi) {
      const int32_t entry = next_entry;
      const int64_t c = next++;
      next_entry = next < hi ? table[next] : -1;
      if (entry >= 0 && entry < p.num_pages) {
        page = entry;
        key0 = c * Traits::kKeys;
        tokens = dense_tokens;
        return true;
      }
    }
    return false;
  };
  int issued = 0;  // pages whose loads are issued
  auto issue_next = [&] {
    int64_t key0;
    int32_t page;
    uint64_t tokens;
    if (next_page(key0, page, tokens)) {
      const int stage = issued % kStages;
      const int keys = static_cast<int>(std::min<int64_t>(Traits::kKeys, len.kv_len - key0));
      load_page<Traits>(ss, p, tile.g, page, keys, stage);
      if (tid == 0) {
        ss.stage_key0[stage] = key0;
        ss.stage_tokens[stage] = tokens;
      }
      ++issued;
    }
    cp_async_commit();
  };
  CUTE_UNROLL
  for (int i = 0; i < kStages - 1; ++i) issue_next();

  // Q while the first pages load.
  load_q<Traits>(ss, p, tile, len.q_len);
  __syncthreads();

  // Warp roles: row block rb (16 rows), chunks kg, kg + kw, .. of each page.
  const int group = static_cast<int>(s.group);
  const int row_blocks = (s.tokens * group + 15) / 16;
  const int kw = row_blocks <= 2 ? 4 : row_blocks <= 4 ? 2 : 1;
  const int rb = warp / kw, kg = warp % kw;
  const bool active = rb < row_blocks;
  // The tile's tokens with a row in this warp, as bits.
  const int first = 16 * rb / group;
  const int last = std::min((16 * rb + 15) / group, s.tokens - 1);
  const uint64_t own =
      !active || first > last ? 0 : (~uint64_t{0} >> (63 - (last - first))) << first;

  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(lane);
  Tensor sQ = make_tensor(make_smem_ptr(ss.wide), typename Traits::SmemLayoutQ{});
  Tensor sQw = local_tile(sQ, Shape<_16, Int<kD>>{}, make_coord(rb, _0{}));
  using ChunkK = Shape<Int<kChunk>, Int<kD>>;
  using ChunkV = Shape<Int<kD>, Int<kChunk>>;
  Tensor tSrQ = thr.partition_fragment_A(sQw);  // (MMA, 1, D / 16)
  // (The fragments' shapes, from a page-shaped view of `wide`.)
  Tensor sPage = make_tensor(make_smem_ptr(ss.wide), typename Traits::SmemLayoutPage{});
  Tensor sPageT = make_tensor(make_smem_ptr(ss.wide), typename Traits::SmemLayoutPageT{});
  Tensor tSrK = thr.partition_fragment_B(local_tile(sPage, ChunkK{}, make_coord(0, 0)));
  Tensor tOrVt = thr.partition_fragment_B(local_tile(sPageT, ChunkV{}, make_coord(0, 0)));
  Tensor accS = partition_fragment_C(mma, Shape<_16, Int<kChunk>>{});
  Tensor accO = partition_fragment_C(mma, Shape<_16, Int<kD>>{});
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma, Shape<_16, Int<kChunk>>{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accO_rc = make_tensor(accO.data(), rowcol_layout(accO.layout()));

  auto copy_q = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_k = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_v = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto thr_q = copy_q.get_thread_slice(lane);
  auto thr_k = copy_k.get_thread_slice(lane);
  auto thr_v = copy_v.get_thread_slice(lane);
  Tensor tSrK_view = thr_k.retile_D(tSrK);
  Tensor tOrVt_view = thr_v.retile_D(tOrVt);
  copy(copy_q, thr_q.partition_S(sQw), thr_q.retile_D(tSrQ));

  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  TileRows<kRowsPerThread> rows(32 * rb + lane);
  rows.start(s, tile, len.q_len, len.kv_len);
  OnlineSoftmax<kRowsPerThread> softmax;
  {
    const float k_scale = *p.k_scale;
    float factors[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float q_scale = Traits::kFp8 ? ss.row_scale[rows.row_base + 8 * r] : 1.0f;
      factors[r] = q_scale * k_scale * p.scale_log2;
    }
    softmax.start(factors);
  }
  clear(accO);
  __syncthreads();  // (e4m3: Q leaves `wide` before the first page is widened into it)

  for (int u = 0; u < issued; ++u) {
    issue_next();  // into the stage that page u - 1 used
    cp_async_wait<kStages - 1>();
    __syncthreads();
    const int stage = u % kStages;
    const Element* k_page;
    const Element* v_page;
    if constexpr (Traits::kFp8) {
      widen_page<Traits>(ss, stage);
      __syncthreads();
      k_page = ss.wide;
      v_page = ss.wide + Traits::kPageElems;
    } else {
      k_page = ss.ring[stage][0];
      v_page = ss.ring[stage][1];
    }
    const int64_t key0 = ss.stage_key0[stage];
    const uint64_t tokens = ss.stage_tokens[stage];
    if ((tokens & own) != 0) {  // uniform over the warp
      Tensor sK = make_tensor(make_smem_ptr(k_page), typename Traits::SmemLayoutPage{});
      Tensor sVt = make_tensor(make_smem_ptr(v_page), typename Traits::SmemLayoutPageT{});
      for (int ch = kg; ch < Traits::kKeys / kChunk; ch += kw) {
        Tensor tSsK = thr_k.partition_S(local_tile(sK, ChunkK{}, make_coord(ch, _0{})));
        Tensor tOsVt = thr_v.partition_S(local_tile(sVt, ChunkV{}, make_coord(_0{}, ch)));
        clear(accS);
        CUTE_UNROLL
        for (int kd = 0; kd < size<2>(tSrK); ++kd) {
          copy(copy_k, tSsK(_, _, kd), tSrK_view(_, _, kd));
          cute::gemm(mma, tSrQ(_, _, kd), tSrK(_, _, kd), accS);
        }
        softmax.apply(accS_rc, rows, key0 + ch * kChunk, kChunk, tokens);
        softmax.rescale_output(accO_rc);
        sm90::acc_to_operand(accS, tOrP);
        CUTE_UNROLL
        for (int kk = 0; kk < size<2>(tOrVt); ++kk) {
          copy(copy_v, tOsVt(_, _, kk), tOrVt_view(_, _, kk));
          cute::gemm(mma, tOrP(_, _, kk), tOrVt(_, _, kk), accO);
        }
      }
    }
    __syncthreads();  // the stage (and `wide`) is refilled next
  }

  // Per row: O / l and lse of this warp's keys (0 and -inf if none).
  float lse[kRowsPerThread];
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const float total = sm90::quad_sum(softmax.row_sum[r]);
    lse[r] = softmax.lse(r, total);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(accO_rc); ++j) accO_rc(r, j) *= inv;
  }
  // The kw warps of a row block merge by lse into the first (kg = 0); the
  // ring is free (every issued page was waited for).
  if (kw > 1) {
    float* merge_o = reinterpret_cast<float*>(ss.ring);           // [warp][16][D]
    float* merge_lse = merge_o + Traits::kWarps * 16 * kD;        // [warp][16]
    const int row0 = lane / 4;
    if (kg > 0) {
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        float* dst = merge_o + (warp * 16 + row0 + 8 * r) * kD;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accO_rc); j += 2) {
          *reinterpret_cast<float2*>(dst + rows.column(j)) =
              make_float2(accO_rc(r, j), accO_rc(r, j + 1));
        }
        if (lane % 4 == 0) merge_lse[warp * 16 + row0 + 8 * r] = lse[r];
      }
    }
    __syncthreads();
    if (kg == 0) {
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int row = row0 + 8 * r;
        float m = lse[r];
        for (int k = 1; k < kw; ++k) m = fmaxf(m, merge_lse[(warp + k) * 16 + row]);
        if (m == -INFINITY) continue;  // no keys in any: O 0, lse -inf
        float w = __expf(lse[r] - m), total = w;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accO_rc); ++j) accO_rc(r, j) *= w;
        for (int k = 1; k < kw; ++k) {
          w = __expf(merge_lse[(warp + k) * 16 + row] - m);
          if (w == 0.0f) continue;
          total += w;
          const float* src = merge_o + ((warp + k) * 16 + row) * kD;
          CUTE_UNROLL
          for (int j = 0; j < size<1>(accO_rc); j += 2) {
            const float2 o = *reinterpret_cast<const float2*>(src + rows.column(j));
            accO_rc(r, j) += w * o.x;
            accO_rc(r, j + 1) += w * o.y;
          }
        }
        const float inv = 1.0f / total;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accO_rc); ++j) accO_rc(r, j) *= inv;
        lse[r] = m + logf(total);
      }
    }
  }
  if (kg != 0) return;

  // Partials: O / l (times v_scale) and lse, for every row of a query < Q.
  const float v_scale = *p.v_scale;
  float* partial_o = p.partial_o + split * p.rows_total * kD;
  float* partial_lse = p.partial_lse + split * p.rows_total;
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    if (rows.token_of[r] < 0) continue;
    float* dst = partial_o + rows.out_row[r] * kD;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(accO_rc); j += 2) {
      *reinterpret_cast<float2*>(dst + rows.column(j)) =
          make_float2(accO_rc(r, j) * v_scale, accO_rc(r, j + 1) * v_scale);
    }
    if (lane % 4 == 0) partial_lse[rows.out_row[r]] = lse[r];
  }
#endif
}

template <class QElement, bool kFp8>
cudaError_t launch(const cuda::PagedAttentionArgs& a, DType out_dtype, float* workspace, void* out,
                   float* lse, cudaStream_t stream) {
  using Traits = PagedTraits<QElement, kFp8>;
  using Stored = typename Traits::Stored;
  const int64_t rows = a.B * a.Q * a.Hq;
  const PagedParams<Traits> p{sm90::make_paged_shape(a),
                              static_cast<const QElement*>(a.q),
                              static_cast<const Stored*>(a.k_cache),
                              static_cast<const Stored*>(a.v_cache),
                              a.page_table,
                              a.k_scale,
                              a.v_scale,
                              workspace,
                              workspace + a.splits * rows * 128,
                              rows,
                              a.num_pages,
                              a.max_pages,
                              static_cast<int>(a.splits),
                              a.scale * 1.4426950408889634f};
  auto kernel = paged_attention_kernel<Traits>;
  cudaError_t st = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Traits::kSmemBytes);
  if (st != cudaSuccess) return st;
  const int64_t grid = p.shape.tiles * a.splits;
  kernel<<<static_cast<unsigned>(grid), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  if ((st = cudaGetLastError()) != cudaSuccess) return st;
  return sm90::launch_paged_combine(a, out_dtype, workspace, out, lse, stream);
}

}  // namespace
}  // namespace jax_msa::portable

namespace jax_msa::cuda {

cudaError_t portable_paged_attention(DType q_dtype, CacheType cache, DType out_dtype,
                                     const PagedAttentionArgs& a, float* workspace, void* out,
                                     float* lse, cudaStream_t stream) {
  if (!paged_attention_supported(q_dtype, cache, a)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return cudaErrorInvalidValue;
  const int64_t tiles = sm90::make_paged_shape(a).tiles;
  if (tiles == 0) return cudaSuccess;
  if (tiles * a.splits > INT_MAX) return cudaErrorInvalidValue;
  const bool fp8 = cache == CacheType::kE4M3FN;
  if (q_dtype == DType::kBF16) {
    return fp8 ? portable::launch<cutlass::bfloat16_t, true>(a, out_dtype, workspace, out, lse, stream)
               : portable::launch<cutlass::bfloat16_t, false>(a, out_dtype, workspace, out, lse, stream);
  }
  return fp8 ? portable::launch<cutlass::half_t, true>(a, out_dtype, workspace, out, lse, stream)
             : portable::launch<cutlass::half_t, false>(a, out_dtype, workspace, out, lse, stream);
}

}  // namespace jax_msa::cuda
