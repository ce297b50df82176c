// Paged attention on SM90 (spec §3.7): decode, MTP and chunked-prefill
// queries over paged K/V caches of 16-bit or e4m3 pages, dense or MSA-sparse.
//
// A tile is 128 (query, head) rows: `tokens` consecutive queries times the G
// query heads of one KV group (GQA 16 x 8 queries = one tile), as in the
// query-outer sparse forward (sparse_attention_traits.hpp, whose row and
// union helpers serve here with Sq = Q). The tile's pages: dense, every
// logical page up to its last query's position; sparse, the union of its
// queries' selected pages. Holes of the page table never enter the list, so
// nothing outside the caches is read. The list is cut into `splits`
// contiguous parts, one CTA each (split-KV, for small batches); each CTA
// writes float32 partials (O / l and lse per row) that paged_combine_kernel
// (paged_split_kv.hpp, shared with the portable family) merges by lse into
// out and lse.
//
// One CTA = 3 warpgroups:
//   warpgroup 0, warp 0     producer: the page list, K and V pages by TMA;
//   warpgroup 0, warps 1-2  V: e4m3 pages are transposed (dims x keys, the
//                           K-major operand that 8-bit wgmma needs) from a
//                           staging slot into the V ring; 16-bit pages land in
//                           the ring directly and only get their keys past
//                           kv_len zeroed (0 * NaN would poison P V);
//   warpgroups 1, 2         consumers, 64 rows each: S = Q K^T (wgmma), masks,
//                           online softmax (exp2), O += P V (wgmma, P from
//                           registers). e4m3 caches: both products e4m3 x e4m3
//                           (Q rounded to e4m3 with a power-of-two scale per
//                           row, P scaled by 2^8 and rounded to e4m3).
// Memory-bound: an e4m3 page pair (32 KB) feeds 8.4 MFLOP at 128 rows, which
// e4m3 wgmma keeps below the HBM time (DESIGN_NOTES, Decode).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/multiprocessors.h"
#include "kernels/sm90/e4m3.hpp"
#include "kernels/sm90/online_softmax.hpp"
#include "kernels/sm90/paged_split_kv.hpp"
#include "kernels/sm90/query_outer_walk.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::sm90 {
namespace {

using namespace cute;

// QElement: q's type. kFp8: e4m3 caches (else caches of q's type).
template <class QElement_, bool kFp8_>
struct PagedTraits {
  using QElement = QElement_;
  static constexpr bool kFp8 = kFp8_;
  using KElement = std::conditional_t<kFp8, cutlass::float_e4m3_t, QElement>;  // Q, K in S = Q K^T
  using VElement = KElement;  // P, V in O += P V
  static constexpr int kD = 128;
  static constexpr int kKeys = 128;  // keys per page (spec §3.7)
  static constexpr int kConsumers = 2;
  static constexpr int kRows = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kConverters = 64;  // warps 1-2
  static constexpr int kKSlots = 3;
  static constexpr int kVSlots = kFp8 ? 3 : 2;
  // For TileUnion (sparse_tile_producer.hpp).
  static constexpr int kMaxCandidates = 128;

  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<KElement>{}, Shape<Int<kRows>, Int<kD>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<KElement>{}, Shape<Int<kKeys>, Int<kD>>{}));
  using SmemLayoutKRing = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<KElement>{},
                                                 Shape<Int<kKeys>, Int<kD>, Int<kKSlots>>{}));
  using SmemLayoutV =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<VElement>{}, Shape<Int<kKeys>, Int<kD>>{}));
  using SmemLayoutVRing = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<VElement>{},
                                                 Shape<Int<kKeys>, Int<kD>, Int<kVSlots>>{}));
  // The B operand of P V, dims x keys x slot: 16-bit pages as they landed in
  // the ring (MN-major); e4m3 pages as the converter warps write them
  // (K-major: 8-bit wgmma takes no other), each 32-key group in the order of
  // P's registers (e4m3_p_operand).
  using SmemLayoutVRingT = std::conditional_t<
      kFp8,
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<VElement>{},
                             Shape<Int<kD>, Int<kKeys>, Int<kVSlots>>{})),
      decltype(composition(SmemLayoutVRing{},
                           make_layout(Shape<Int<kD>, Int<kKeys>, Int<kVSlots>>{},
                                       Stride<Int<kKeys>, _1, Int<kKeys * kD>>{})))>;
  // e4m3 V pages land here as they are in memory, keys x dims bytes.
  using SmemLayoutStage = Layout<Shape<Int<kKeys>, Int<kD>>, Stride<Int<kD>, _1>>;
  using SmemLayoutVTma = std::conditional_t<kFp8, SmemLayoutStage, SmemLayoutV>;
  using Page = Shape<Int<kKeys>, Int<kD>>;

  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<KElement, KElement, float, Shape<_64, Int<kKeys>, Int<kD>>>(),
      Layout<Shape<Int<kConsumers>, _1, _1>>{}));
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<VElement, VElement, float, Shape<_64, Int<kD>, Int<kKeys>>,
                           GMMA::Major::K, kFp8 ? GMMA::Major::K : GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumers>, _1, _1>>{}));

  static constexpr uint32_t kBytesK = kKeys * kD * sizeof(KElement);
  static constexpr uint32_t kBytesV = kKeys * kD * sizeof(VElement);

  struct SharedStorage {
    alignas(1024) KElement q[cosize_v<SmemLayoutQ>];
    alignas(1024) KElement k[cosize_v<SmemLayoutKRing>];
    alignas(1024) VElement v[cosize_v<SmemLayoutVRingT>];
    alignas(128) uint8_t stage[kFp8 ? kVSlots * kKeys * kD : 16];
    float row_scale[kRows];  // Q row r = row_scale[r] * its e4m3 row (kFp8)
    uint64_t q_full;         // the tile's page count is in
    uint64_t k_full[kKSlots], k_empty[kKSlots];
    uint64_t v_loaded[kVSlots], v_ready[kVSlots], v_empty[kVSlots];
    uint64_t slot_tokens[kKSlots];  // bit t: query t of the tile attends the page
    int32_t slot_page[kKSlots];     // logical page
    int32_t v_keys[kVSlots];        // stored keys of the V page (< 128: the last page)
    int32_t tile_pages;             // pages of this CTA's part of the list
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
};

// A cache [num_pages, Hkv, 128, D] viewed as [128 keys, D, Hkv, num_pages]:
// the page of kv head g is the TMA box at (0, 0, g, page).
template <class Element, class SmemLayout>
auto make_tma_pages(const Element* cache, int64_t Hkv, int64_t num_pages) {
  auto layout = make_layout(
      make_shape(_128{}, _128{}, static_cast<int>(Hkv), static_cast<int>(num_pages)),
      make_stride(_128{}, _1{}, int64_t{128 * 128}, Hkv * 128 * 128));
  return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(cache), layout), SmemLayout{},
                       Shape<_128, _128>{}, _1{});
}

template <class Traits>
using TmaK = decltype(make_tma_pages<typename Traits::KElement, typename Traits::SmemLayoutK>(
    nullptr, 1, 1));
template <class Traits>
using VStored = std::conditional_t<Traits::kFp8, uint8_t, typename Traits::VElement>;
template <class Traits>
using TmaV = decltype(make_tma_pages<VStored<Traits>, typename Traits::SmemLayoutVTma>(nullptr, 1, 1));

template <class Traits>
struct PagedParams {
  TmaK<Traits> tma_k;
  TmaV<Traits> tma_v;
  SparseShape shape;  // Sq = Q; ids null for dense
  const typename Traits::QElement* q;
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

// The producer warp: this CTA's part of the tile's page list, then K_0, K_1,
// V_0, K_2, V_1, ..., V_last by TMA (the consumers issue S_u with P_{u-1}
// V_{u-1} and free K_u before V_{u-1}).
template <class Traits>
__device__ void produce_pages(typename Traits::SharedStorage& ss, const PagedParams<Traits>& p,
                              const SparseTile& tile, int split) {
  constexpr uint32_t kFull = 0xFFFFFFFFu;
  const SparseShape& s = p.shape;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
  }
  const RequestLengths len(s, tile.b, p.max_pages);
  const int32_t* table = p.page_table + tile.b * p.max_pages;
  auto physical = [&](int64_t c) -> int32_t {  // -1 for a hole
    const int32_t page = table[c];
    return page >= 0 && page < p.num_pages ? page : -1;
  };

  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKRing{});
  auto* v_dst = [&] {
    if constexpr (Traits::kFp8) {
      return reinterpret_cast<uint8_t*>(ss.stage);
    } else {
      return ss.v;
    }
  }();
  constexpr int kVSlotElems = Traits::kKeys * Traits::kD;
  Tensor mK = p.tma_k.get_tma_tensor(
      make_shape(_128{}, _128{}, static_cast<int>(s.Hkv), static_cast<int>(p.num_pages)));
  Tensor mV = p.tma_v.get_tma_tensor(
      make_shape(_128{}, _128{}, static_cast<int>(s.Hkv), static_cast<int>(p.num_pages)));
  auto cta_k = p.tma_k.get_slice(_0{});
  auto cta_v = p.tma_v.get_slice(_0{});

  const int head = static_cast<int>(tile.g);
  uint32_t k_seq = 0, v_seq = 0;
  auto issue_k = [&](int32_t c, int32_t page, uint64_t tokens) {
    const int slot = static_cast<int>(k_seq % Traits::kKSlots);
    ClusterBarrier::wait(&ss.k_empty[slot], ((k_seq / Traits::kKSlots) & 1) ^ 1);
    if (lane == 0) {
      ss.slot_page[slot] = c;
      ss.slot_tokens[slot] = tokens;
      ClusterTransactionBarrier::arrive_and_expect_tx(&ss.k_full[slot], Traits::kBytesK);
      copy(p.tma_k.with(ss.k_full[slot]), cta_k.partition_S(mK(_, _, head, page)),
           cta_k.partition_D(sK(_, _, slot)));
    }
    __syncwarp();
    ++k_seq;
  };
  auto issue_v = [&](int32_t c, int32_t page) {
    const int slot = static_cast<int>(v_seq % Traits::kVSlots);
    ClusterBarrier::wait(&ss.v_empty[slot], ((v_seq / Traits::kVSlots) & 1) ^ 1);
    if (lane == 0) {
      ss.v_keys[slot] = static_cast<int32_t>(std::min<int64_t>(128, len.kv_len - int64_t{c} * 128));
      Tensor sV = make_tensor(make_smem_ptr(v_dst + slot * kVSlotElems),
                              typename Traits::SmemLayoutVTma{});
      ClusterTransactionBarrier::arrive_and_expect_tx(&ss.v_loaded[slot], Traits::kBytesV);
      copy(p.tma_v.with(ss.v_loaded[slot]), cta_v.partition_S(mV(_, _, head, page)),
           cta_v.partition_D(sV));
    }
    __syncwarp();
    ++v_seq;
  };
  int32_t pending_c = -1, pending_page = -1;
  auto issue_pair = [&](int32_t c, int32_t page, uint64_t tokens) {
    issue_k(c, page, tokens);
    if (pending_c >= 0) issue_v(pending_c, pending_page);
    pending_c = c;
    pending_page = page;
  };

  if (s.ids == nullptr) {
    // Dense: logical pages [0, n) with n the last valid query's page + 1.
    const uint64_t tokens = valid_tokens(s, tile, len.q_len);
    const SplitRange part(dense_tile_pages(s, tile, len), p.splits, split);
    const int64_t lo = part.lo, hi = part.hi;
    // The count first (the consumers need it): 8 table loads in flight per lane.
    int count = 0;
    for (int64_t c0 = lo; c0 < hi; c0 += 8 * 32) {
      int32_t page[8];
      CUTE_UNROLL
      for (int k = 0; k < 8; ++k) {
        const int64_t c = c0 + 32 * k + lane;
        page[k] = c < hi ? physical(c) : -1;
      }
      CUTE_UNROLL
      for (int k = 0; k < 8; ++k) count += __popc(__ballot_sync(kFull, page[k] >= 0));
    }
    if (lane == 0) ss.tile_pages = count;
    ClusterBarrier::arrive(&ss.q_full);
    for (int64_t c0 = lo; c0 < hi; c0 += 32) {
      const int64_t c = c0 + lane;
      const int32_t page = c < hi ? physical(c) : -1;
      uint32_t todo = __ballot_sync(kFull, page >= 0);
      while (todo != 0) {
        const int src = __ffs(todo) - 1;
        todo &= todo - 1;
        issue_pair(static_cast<int32_t>(c0 + src), __shfl_sync(kFull, page, src), tokens);
      }
    }
  } else {
    // Sparse: the union of the tile's selections, holes dropped, in order of
    // first occurrence; this split takes entries [lo, hi) of it.
    TileUnion<Traits> u(s, tile, len.q_len, len.kv_len, lane);
    constexpr int kRegs = TileUnion<Traits>::kRegs;
    int32_t page[kRegs];
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) page[i] = u.first[i] ? physical(u.cand[i]) : -1;
    int total = 0;  // (after all the table loads are in flight)
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) total += __popc(__ballot_sync(kFull, page[i] >= 0));
    const SplitRange part(total, p.splits, split);
    const int lo = static_cast<int>(part.lo), hi = static_cast<int>(part.hi);
    if (lane == 0) ss.tile_pages = hi - lo;
    ClusterBarrier::arrive(&ss.q_full);
    int at = 0;  // union entries before the current one
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) {
      uint32_t todo = __ballot_sync(kFull, page[i] >= 0);
      while (todo != 0) {
        const int src = __ffs(todo) - 1;
        todo &= todo - 1;
        if (at >= lo && at < hi) {
          issue_pair(__shfl_sync(kFull, u.cand[i], src), __shfl_sync(kFull, page[i], src),
                     __shfl_sync(kFull, u.tokens_of[i], src));
        }
        ++at;
      }
    }
  }
  if (pending_c >= 0) issue_v(pending_c, pending_page);
}

__device__ __forceinline__ uint32_t load_shared_4(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ void store_shared_16(uint32_t addr, const uint4& v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// The e4m3 A operand of O += P V from the float32 accumulator of S. Of each
// 32 keys a thread holds the same 8 in both, in another order: S (C layout)
// keys 2t, 2t + 1, 8 + 2t, 9 + 2t, 16 + 2t, .., 25 + 2t (t = lane % 4); the A
// operand positions 4t .. 4t + 3, 16 + 4t .. 19 + 4t. P's values go to the A
// positions in order, so that column p of a 16-key chunk of P is key
// 8 ((p % 4) / 2) + 2 (p / 4) + p % 2 of the chunk; the converter warps lay
// V's keys out in that order (prepare_values). Rows match (no shuffles).
template <class Acc, class Operand>
__device__ __forceinline__ void e4m3_p_operand(const Acc& acc, Operand& operand) {
  static_assert(decltype(size(acc))::value == decltype(size(operand))::value);
  Tensor words = recast<uint32_t>(operand);
  CUTE_UNROLL
  for (int a = 0; a < size(acc); a += 4) {
    // A positions a .. a + 3: row half (a / 4) % 2, chunk a / 8 of 16 keys.
    const int c = 2 * ((a / 4) % 2) + 8 * (a / 8);
    words(a / 4) = uint32_t{narrow_e4m3x2(acc(c), acc(c + 1))} |
                   (uint32_t{narrow_e4m3x2(acc(c + 4), acc(c + 5))} << 16);
  }
}

// Warps 1-2 (kConverters threads): make each V page usable by P V (see the
// file comment).
// e4m3: thread t transposes the 16 x 16 bytes of keys 16 j .. 16 j + 15 and
// dims 16 i .. 16 i + 15 (i = t % 8, j = (i + t / 8) % 8) from the staged
// page (keys x 128 bytes) into the slot (SmemLayoutVRingT: dim d's 128 bytes
// at row d % 8 of atom d / 8, the 16-byte chunk j at j ^ (d % 8)). Per word x
// of the source rows: 16 loads of 4 bytes, four 4 x 4 byte transposes, four
// 16-byte stores (dims 16 i + 4 x ..). Byte q of chunk j is key 16 j +
// 8 ((q % 4) / 2) + 2 (q / 4) + q % 2 (e4m3_p_operand), so word w takes keys
// 2 w, 2 w + 1, 8 + 2 w, 9 + 2 w. The words are taken in an order rotated by
// t / 8, so that a warp's loads hit 32 banks; a quarter warp's stores hit 8
// distinct chunks. Keys past kv_len (the last page only) become zeros.
template <class Traits>
__device__ void prepare_values(typename Traits::SharedStorage& ss, int ctid) {
  ClusterBarrier::wait(&ss.q_full, 0);
  const int pages = ss.tile_pages;
  constexpr int kPageBytes = Traits::kKeys * Traits::kD;
  const int i = ctid % 8, j = (i + ctid / 8) % 8, rot = (ctid / 8) % 4;
  const uint32_t src0 = cast_smem_ptr_to_uint(ss.stage) + 16 * j * Traits::kD + 16 * i;
  const uint32_t dst0 = cast_smem_ptr_to_uint(ss.v) + 2 * i * 1024;
  for (int u = 0; u < pages; ++u) {
    const int slot = u % Traits::kVSlots;
    ClusterBarrier::wait(&ss.v_loaded[slot], (u / Traits::kVSlots) & 1);
    const int keys = ss.v_keys[slot];
    if constexpr (Traits::kFp8) {
      static_assert(Traits::kD == 128 && Traits::kKeys == 128 && Traits::kConverters == 64);
      const uint32_t src = src0 + slot * kPageBytes, dst = dst0 + slot * kPageBytes;
#pragma unroll 1  // (unrolled, the addresses of all four words stay live: spills)
      for (int x0 = 0; x0 < 4; ++x0) {
        const int x = (x0 + rot) % 4;
        uint32_t w[16];
        CUTE_UNROLL
        for (int k = 0; k < 16; ++k) {
          w[k] = 16 * j + k < keys ? load_shared_4(src + k * Traits::kD + 4 * x) : 0u;
        }
        // Dim 16 i + r, r = 4 x + 2 half + y, is row r of the two atoms at
        // dst: 128 r bytes in, its chunk j at j ^ (r % 8).
        const uint32_t row0 = dst + 512 * x;
        const int chunk0 = j ^ (4 * (x % 2));
        CUTE_UNROLL
        for (int half = 0; half < 2; ++half) {  // dims + {0, 1}, then + {2, 3}
          uint32_t out[2][4];                   // [y][word]
          CUTE_UNROLL
          for (int wd = 0; wd < 4; ++wd) {
            const uint32_t sel = half == 0 ? 0x5140 : 0x7362;
            const uint32_t ab = __byte_perm(w[2 * wd], w[2 * wd + 1], sel);
            const uint32_t cd = __byte_perm(w[8 + 2 * wd], w[9 + 2 * wd], sel);
            out[0][wd] = __byte_perm(ab, cd, 0x5410);
            out[1][wd] = __byte_perm(ab, cd, 0x7632);
          }
          CUTE_UNROLL
          for (int y = 0; y < 2; ++y) {
            const int r4 = 2 * half + y;  // r - 4 x
            store_shared_16(row0 + 128 * r4 + ((chunk0 ^ r4) << 4),
                            make_uint4(out[y][0], out[y][1], out[y][2], out[y][3]));
          }
        }
      }
    } else {
      // Only the last page has keys past kv_len; zero them.
      constexpr int kChunks = Traits::kD / 8;  // 16-byte chunks per key
      Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVRing{});
      for (int n = ctid; n < (Traits::kKeys - keys) * kChunks; n += Traits::kConverters) {
        const int key = keys + n / kChunks, d0 = 8 * (n % kChunks);
        *reinterpret_cast<uint4*>(&sV(key, d0, slot)) = make_uint4(0, 0, 0, 0);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    ClusterBarrier::arrive(&ss.v_ready[slot]);
  }
}

// A consumer warpgroup's 64 Q rows (rows 64 wg .. 64 wg + 63 of the tile) into
// shared memory, two threads per row; for e4m3, rounded with the row's
// power-of-two scale (row_scale). Rows of missing queries are zeros.
template <class Traits>
__device__ void load_q_rows(typename Traits::SharedStorage& ss, const PagedParams<Traits>& p,
                            const SparseTile& tile, int64_t q_len, int wg, int wtid) {
  using QElement = typename Traits::QElement;
  const SparseShape& s = p.shape;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  const int row = 64 * wg + wtid / 2;
  const int d0 = 64 * (wtid % 2);
  uint4 raw[8];
  sm90::read_q_half_row<Traits::kD>(p.q, s, tile, row, d0, q_len, raw);
  if constexpr (Traits::kFp8) {
    float x[64];
    // max |q| < 2^e: the row scaled by 2^(8 - e) stays below 256 (e4m3 max 448).
    const int e = sm90::q_row_exponent<QElement>(raw, x);
    const float inv = ldexpf(1.0f, 8 - e);
    CUTE_UNROLL
    for (int i = 0; i < 4; ++i) {
      uint32_t w[4];
      CUTE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const float* v = x + 16 * i + 4 * j;
        w[j] = uint32_t{narrow_e4m3x2(v[0] * inv, v[1] * inv)} |
               (uint32_t{narrow_e4m3x2(v[2] * inv, v[3] * inv)} << 16);
      }
      *reinterpret_cast<uint4*>(&sQ(row, d0 + 16 * i)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    if (wtid % 2 == 0) ss.row_scale[row] = ldexpf(1.0f, e - 8);
  } else {
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) *reinterpret_cast<uint4*>(&sQ(row, d0 + 8 * i)) = raw[i];
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  // Only this warpgroup reads these rows (and their scales).
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    paged_attention_kernel(const __grid_constant__ PagedParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using SharedStorage = typename Traits::SharedStorage;
  using VElement = typename Traits::VElement;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const SparseShape& s = p.shape;
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const SparseTile tile(blockIdx.x / p.splits, s.B, s.Hkv, s.chunks, s.tokens);

  if (threadIdx.x == 0) {
    ClusterBarrier::init(&ss.q_full, 32);
    for (int i = 0; i < Traits::kKSlots; ++i) {
      ClusterBarrier::init(&ss.k_full[i], 1);
      ClusterBarrier::init(&ss.k_empty[i], 128 * Traits::kConsumers);
    }
    for (int i = 0; i < Traits::kVSlots; ++i) {
      ClusterBarrier::init(&ss.v_loaded[i], 1);
      ClusterBarrier::init(&ss.v_ready[i], Traits::kConverters);
      ClusterBarrier::init(&ss.v_empty[i], 128 * Traits::kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<56>();
    if (threadIdx.x < 32) {
      produce_pages<Traits>(ss, p, tile, split);
    } else if (threadIdx.x < 32 + Traits::kConverters) {
      prepare_values<Traits>(ss, threadIdx.x - 32);
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<224>();
  const int tid = threadIdx.x - 128;
  const RequestLengths len(s, tile.b, p.max_pages);
  load_q_rows<Traits>(ss, p, tile, len.q_len, warpgroup - 1, tid % 128);

  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKRing{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVRingT{});
  typename Traits::MmaS mma_s;
  typename Traits::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, 1, D/k)
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, 1, D/k, slot)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, 1, keys/16, slot)
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kKeys>>;
  using TileO = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  Tensor accS = partition_fragment_C(mma_s, TileS{});
  Tensor accO = partition_fragment_C(mma_o, TileO{});
  Tensor tOrP = make_tensor<VElement>(partition_shape_A(mma_o, TileS{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accO_rc = make_tensor(accO.data(), rowcol_layout(accO.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  TileRows<kRowsPerThread> rows(tid);
  rows.start(s, tile, len.q_len, len.kv_len);

  // Per row: the factor from the wgmma's S to log2-domain logits (row_scale > 0:
  // one sign for all rows).
  OnlineSoftmax<kRowsPerThread, Traits::kFp8 ? 8 : 0> softmax;  // e4m3 P: 2^8 P
  const float k_scale = *p.k_scale;
  float factors[kRowsPerThread];
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const float q_scale = Traits::kFp8 ? ss.row_scale[rows.row_base + 8 * r] : 1.0f;
    factors[r] = q_scale * k_scale * p.scale_log2;
  }
  softmax.start(factors);
  clear(accO);

  ClusterBarrier::wait(&ss.q_full, 0);
  const int pages = ss.tile_pages;
  uint32_t k_seq = 0, v_seq = 0;
  int64_t c;  // the block of the last S issued, and its tokens
  uint64_t tokens;
  walk_blocks(
      pages,
      [&] {  // S = Q K^T for the next page
        const int slot = static_cast<int>(k_seq % Traits::kKSlots);
        ClusterBarrier::wait(&ss.k_full[slot], (k_seq / Traits::kKSlots) & 1);
        ++k_seq;
        c = ss.slot_page[slot];
        tokens = ss.slot_tokens[slot];
        issue_product(mma_s, tSrQ, tSrK(_, _, _, slot), accS);
        return slot;
      },
      [&] {  // O += P V
        const int slot = static_cast<int>(v_seq % Traits::kVSlots);
        ClusterBarrier::wait(&ss.v_ready[slot], (v_seq / Traits::kVSlots) & 1);
        ++v_seq;
        issue_accumulate(mma_o, tOrP, tOrV(_, _, _, slot), accO);
        return slot;
      },
      [&](int slot, int) {
        warpgroup_fence_operand(accS);
        ClusterBarrier::arrive(&ss.k_empty[slot]);
      },
      [&](int slot) {
        warpgroup_fence_operand(accO);
        ClusterBarrier::arrive(&ss.v_empty[slot]);
      },
      [&] { softmax.apply(accS_rc, rows, c * Traits::kKeys, Traits::kKeys, tokens); },
      [&] {
        softmax.rescale_output(accO_rc);
        if constexpr (Traits::kFp8) {
          e4m3_p_operand(accS, tOrP);
        } else {
          acc_to_operand(accS, tOrP);
        }
      });

  // Partials: O / l (times v_scale) and lse = ln(sum of exp), 0 / -inf for a
  // row that saw nothing.
  const float v_scale = *p.v_scale;
  float* partial_o = p.partial_o + split * p.rows_total * Traits::kD;
  float* partial_lse = p.partial_lse + split * p.rows_total;
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const float total = quad_sum(softmax.row_sum[r]);  // the whole warp: before any lane leaves
    if (rows.token_of[r] < 0) continue;
    const float inv = total > 0.0f ? v_scale / total : 0.0f;
    float* dst = partial_o + rows.out_row[r] * Traits::kD;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(accO_rc); j += 2) {
      *reinterpret_cast<float2*>(dst + rows.column(j)) =
          make_float2(accO_rc(r, j) * inv, accO_rc(r, j + 1) * inv);
    }
    if (tid % 4 == 0) partial_lse[rows.out_row[r]] = softmax.lse(r, total);
  }
#endif
}

template <class QElement, bool kFp8>
cudaError_t launch(const cuda::PagedAttentionArgs& a, DType out_dtype, float* workspace, void* out,
                   float* lse, cudaStream_t stream) {
  using Traits = PagedTraits<QElement, kFp8>;
  const int64_t rows = a.B * a.Q * a.Hq;
  const PagedParams<Traits> p{
      make_tma_pages<typename Traits::KElement, typename Traits::SmemLayoutK>(
          static_cast<const typename Traits::KElement*>(a.k_cache), a.Hkv, a.num_pages),
      make_tma_pages<VStored<Traits>, typename Traits::SmemLayoutVTma>(
          static_cast<const VStored<Traits>*>(a.v_cache), a.Hkv, a.num_pages),
      make_paged_shape(a),
      static_cast<const QElement*>(a.q),
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
  return launch_paged_combine(a, out_dtype, workspace, out, lse, stream);
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool paged_attention_supported(DType q_dtype, CacheType cache, const PagedAttentionArgs& a) {
  const bool q16 = q_dtype == DType::kBF16 || q_dtype == DType::kF16;
  const bool same = (q_dtype == DType::kBF16 && cache == CacheType::kBF16) ||
                    (q_dtype == DType::kF16 && cache == CacheType::kF16);
  // TMA extents and key positions are 32-bit; one CTA per (tile, split).
  return q16 && (same || cache == CacheType::kE4M3FN) && a.D == 128 && a.Hkv >= 1 &&
         a.Hq % a.Hkv == 0 && a.Hq / a.Hkv <= 128 && a.topk >= 0 && a.topk <= 64 &&
         (a.topk > 0) == (a.ids != nullptr) && a.num_pages >= 1 && a.num_pages <= INT_MAX &&
         a.Hkv <= INT_MAX && a.max_pages <= (INT_MAX - 256) / 128 && a.B >= 0 && a.Q >= 0 &&
         a.splits >= 1 && a.splits <= 4096;
}

int64_t paged_attention_splits(const PagedAttentionArgs& a) {
  if (a.Hkv < 1 || a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > 128 || a.topk < 0 || a.topk > 64) return 1;
  const sm90::SparseShape s = sm90::make_paged_shape(a);
  const int64_t sms = multiprocessor_count(132);
  if (s.tiles == 0 || s.tiles >= sms) return 1;
  // Sparse: a tile reads at most its tokens' candidates.
  const int64_t pages = a.topk > 0 ? std::min<int64_t>(a.max_pages, s.tokens * a.topk) : a.max_pages;
  return std::max<int64_t>(1, std::min(sms / s.tiles, pages / 4));
}

int64_t paged_attention_workspace_floats(const PagedAttentionArgs& a) {
  return a.splits * a.B * a.Q * a.Hq * (a.D + 1);
}

cudaError_t paged_attention(DType q_dtype, CacheType cache, DType out_dtype,
                            const PagedAttentionArgs& a, float* workspace, void* out, float* lse,
                            cudaStream_t stream) {
  if (!paged_attention_supported(q_dtype, cache, a)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return cudaErrorInvalidValue;
  const int64_t tiles = sm90::make_paged_shape(a).tiles;
  if (tiles == 0) return cudaSuccess;
  if (tiles * a.splits > INT_MAX) return cudaErrorInvalidValue;
  const bool fp8 = cache == CacheType::kE4M3FN;
  if (q_dtype == DType::kBF16) {
    return fp8 ? sm90::launch<cutlass::bfloat16_t, true>(a, out_dtype, workspace, out, lse, stream)
               : sm90::launch<cutlass::bfloat16_t, false>(a, out_dtype, workspace, out, lse, stream);
  }
  return fp8 ? sm90::launch<cutlass::half_t, true>(a, out_dtype, workspace, out, lse, stream)
             : sm90::launch<cutlass::half_t, false>(a, out_dtype, workspace, out, lse, stream);
}

}  // namespace jax_msa::cuda
