// Block-sparse attention forward on SM90 (spec §3.4), KV-outer ("by block"):
// for selection patterns whose neighbouring tokens share few blocks (the
// indexer's), where the query-outer forward (sparse_attention_fwd.cu) spends
// most of its work on masked rows.
//
// The queries are processed in chunks of Tc tokens (all batch rows at once);
// per chunk, three steps on `stream`:
//  1. index (block_index::build_block_index, shared with the backward; for K
//     chunks at once, see the workspace below): per
//     (b, kv head g, block c) the bucket of the chunk's tokens that attend
//     block c, in increasing order, and the reverse map
//     rev[b, token, g, slot] = the entry holding that slot (-1: not attended);
//  2. main (fwd_by_block_kernel): all buckets' tiles (64 (token, head) rows:
//     floor(64 / G) entries x the G heads of the group) form one sequence of
//     Ttot tiles; CTA s of the `ctas` CTAs (one wave) takes tiles
//     [s * share, (s + 1) * share), share = ceil(Ttot / ctas), whatever the
//     bucket sizes. Per bucket piece, K_c and V_c are loaded once (TMA, two
//     slots so that the next bucket's block loads while this one is used),
//     the tiles' Q rows are gathered by cp.async, and a consumer warpgroup
//     computes per tile (see sparse_fwd_by_block_traits.hpp)
//       S = Q K_c^T, masked (key j visible iff j <= position and j < kv_len),
//       m = row max, l = row sum of exp, O_c = P V_c / l,
//     then writes the partial O_c (input dtype) and lse_c = m + ln l (fp32)
//     at row entry * G + head of the partial buffer (the rows of a tile are
//     consecutive: stmatrix into a shared-memory tile, then one TMA store, or
//     16-byte stores for a bucket's last, partial tile);
//  3. combine (combine_kernel): per (b, token, head), in slot order,
//     lse = logsumexp_k lse_c(k), out = sum_k exp(lse_c(k) - lse) O_c(k)
//     (fp32), written in q's dtype; padded rows and rows with no attended
//     slot: out 0, lse -inf.
// Every result is a fixed-order computation: deterministic.
//
// Workspace (plan, sparse_fwd_by_block.hpp): E = B * Hkv * Tc * topk index
// entries per chunk at most;
//   index   = K (index_ints(Tc) + E) ints (the indexes of K chunks + their
//             rev; K = index_windows: as many as 64 MiB hold, built by one
//             set of launches, since one chunk's build leaves the GPU idle),
//   partial = E * G * (2 * D) bytes (O_c, 16-bit) + E * G * 4 bytes (lse_c),
// i.e. B * Hq * Tc * topk * 260 bytes for D = 128. Default Tc: the largest
// multiple of 64 with that <= 1 GiB and B * Tc * Hq * D * 2 (the chunk's Q
// rows) <= 32 MiB, balanced over the chunks; the whole Sq if that fits.
// At B = 1, Hq = 16, topk = 16: Tc = 8192, 545 MB of partials, 16 chunks at
// T = 128K.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/multiprocessors.h"
#include "kernels/sm90/kv_outer_gather.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_block_index.hpp"
#include "kernels/sm90/sparse_fwd_by_block.hpp"
#include "kernels/sm90/sparse_fwd_by_block_traits.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::sm90::fwd_by_block {
namespace {

using namespace cute;
using block_index::clamp_len;
using block_index::Geometry;
using block_index::IndexView;
using block_index::kBlock;
using block_index::SegmentWalker;
// The pieces shared with the dK/dV backward (kv_outer_gather.hpp).
using kv_outer::Bucket;
using kv_outer::cp_async_4z;
using kv_outer::fast_exp2;
using kv_outer::gemm_overwrite;
using kv_outer::pack2;
using kv_outer::row_source;
using kv_outer::RowGather;
using kv_outer::tile_share;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

constexpr int kHeadDim = 128;
constexpr int kMaxCtas = 132;  // main-kernel CTAs at most (one wave on H100 / H200)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Stores of whole tiles (Traits::TileStage) into the partial O [rows, D].
template <class Traits>
auto make_tma_partial(typename Traits::Element* part_o, int64_t rows) {
  auto layout = make_layout(make_shape(static_cast<int>(rows), Int<kHeadDim>{}),
                            make_stride(int64_t{kHeadDim}, _1{}));
  return make_tma_copy(SM90_TMA_STORE{}, make_tensor(make_gmem_ptr(part_o), layout),
                       typename Traits::SmemLayoutStage{}, typename Traits::TileStage{}, _1{});
}

template <class Traits>
using TmaPartial = decltype(make_tma_partial<Traits>(nullptr, 1));

template <class Traits>
struct MainParams {
  using Element = typename Traits::Element;
  TmaKV<Traits> tma_k;
  TmaKV<Traits> tma_v;
  const Element* q;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  const int32_t* index;
  TmaPartial<Traits> tma_o;  // stores into part_o (whole tiles)
  Element* part_o;   // [entries * G, D]
  float* part_lse;   // [entries * G]
  Geometry geo;      // the chunk's window
  float scale_log2;  // scale * log2(e)
  int ctas;
  ScheduleGate gate;
};

template <class Element>
__device__ __forceinline__ float2 unpack2(uint32_t x) {
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  } else {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
}

// ---------------------------------------------------------------------------
// Step 2: the partial attention of every (entry, head) row over its block.

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    fwd_by_block_kernel(const __grid_constant__ MainParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kStages = Traits::kStages;
  constexpr int kKvSlots = Traits::kKvSlots;
  constexpr int kRows = Traits::kRows;
  extern __shared__ __align__(1024) char fbb_smem[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(fbb_smem);
  if (p.gate.closed()) return;

  const Geometry& geo = p.geo;
  const IndexView ix(const_cast<int32_t*>(p.index), geo);
  // The CTA's tiles [T0, T1) of the Ttot = header[0] tiles, share = ceil(Ttot / ctas).
  auto tile_range = [&](int64_t& T0, int64_t& T1) {
    const int64_t total = ix.header[0];
    const int64_t share = tile_share(total, p.ctas);
    T0 = blockIdx.x * share;
    T1 = min(T0 + share, total);
  };
  {
    int64_t T0, T1;
    tile_range(T0, T1);
    if (T0 >= T1) return;  // uniform over the CTA, before any barrier
  }
  // The walker is built after the register reconfiguration, in each role
  // (recomputing the range): nothing 64-bit stays live across it.
  auto make_walker = [&]() {
    int64_t T0, T1;
    tile_range(T0, T1);
    return kv_outer::make_walker(ix, geo.nbkt, T0, T1);
  };

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kKvSlots; ++s) {
      ClusterBarrier::init(&ss.kv_full[s], 1);
      ClusterBarrier::init(&ss.kv_empty[s], 128 * Traits::kConsumerWarpgroups);
    }
    for (int s = 0; s < kStages; ++s) {
      ClusterBarrier::init(&ss.full[s], 128);  // the producer warpgroup's cp.async
      ClusterBarrier::init(&ss.empty[s], 128);  // the one consumer warpgroup of the tile
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int64_t G = geo.G;
  const int64_t tpt = geo.tpt;

  if (warpgroup == 0) {
    // ---------------- producer ----------------
    // Registers: 72 here, 216 per consumer: no spills in either role
    // (ptxas -v). setmaxnreg draws on the CTA's own pool (PTX ISA), the
    // launch allocation of 3 warpgroups x 168, so the three must sum to
    // <= 504: with more, the consumers' setmaxnreg.inc waits for ever.
    cutlass::arch::warpgroup_reg_dealloc<72>();
    SegmentWalker walker = make_walker();
    const int t = threadIdx.x;
    const RowGather gather(t, G);
    const int row = gather.row;
    const int slot = gather.slot;  // entry of the tile
    Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
    if (t == 0) {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    }
    int64_t it = 0;
    int seg = 0;
    while (walker.next()) {
      const int64_t k = walker.bucket;
      const auto [b, g, c] = Bucket(geo, k);
      const int kv = seg % kKvSlots;
      if (t == 0) {
        // The slot's previous block (segment seg - kKvSlots) is no longer read.
        if (seg >= kKvSlots) {
          ClusterBarrier::wait(&ss.kv_empty[kv], static_cast<uint32_t>((seg / kKvSlots - 1) & 1));
        }
        constexpr int kSlotElems = cosize_v<typename Traits::SmemLayoutKV>;
        ClusterTransactionBarrier::arrive_and_expect_tx(&ss.kv_full[kv], 2 * Traits::kBytesKV);
        load_kv_block<Traits>(p.tma_k, geo.Sk, geo.Hkv, geo.B, b, g, c, ss.k + kv * kSlotElems,
                              ss.kv_full[kv]);
        load_kv_block<Traits>(p.tma_v, geo.Sk, geo.Hkv, geo.B, b, g, c, ss.v + kv * kSlotElems,
                              ss.kv_full[kv]);
      }
      const int64_t count = ix.count[k];
      const int32_t* bucket = ix.entries + ix.entry_start[k];
      const int64_t head_row = gather.head_row(g, G);
      for (int64_t tile = walker.tile_begin; tile < walker.tile_end; ++tile, ++it) {
        const int stage = static_cast<int>(it % kStages);
        const int64_t entry = tile * tpt + slot;
        const bool valid = slot < tpt && entry < count;
        // Loaded before the wait: its latency hides behind it.
        const int64_t token = valid ? bucket[entry] : 0;
        ClusterBarrier::wait(&ss.empty[stage], static_cast<uint32_t>(((it / kStages) & 1) ^ 1));
        gather.copy(stage, valid, row_source(sQ, p.q + gather.qrow(geo, b, token, head_row) * kHeadDim));
        if (gather.half == 0) cp_async_4z(&ss.token[stage][row], bucket + (valid ? entry : 0), valid);
        cutlass::arch::cpasync_barrier_arrive_noinc(&ss.full[stage]);
      }
      ++seg;
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<216>();
  SegmentWalker walker = make_walker();
  const int w = warpgroup - 1;  // takes the CTA's tiles n with n % 2 == w
  const int tid = threadIdx.x % 128;
  typename Traits::MmaS mma_s;
  typename Traits::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);

  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKVSlots{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVtSlots{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // (MMA, 1, D/16, stage)
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // (MMA, 1, D/16, kv slot)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // (MMA, 1, keys/16, kv slot)

  using TileS = Shape<Int<kRows>, Int<Traits::kKeys>>;
  using TileO = Shape<Int<kRows>, Int<kHeadDim>>;
  Tensor accS = partition_fragment_C(mma_s, TileS{});
  Tensor accO = partition_fragment_C(mma_o, TileO{});
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_o, TileS{}));  // P as O's A operand
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accO_rc = make_tensor(accO.data(), rowcol_layout(accO.layout()));
  // (row, column) of every accumulator entry, from cute's own partitioning.
  Tensor cS = thr_s.partition_C(make_identity_tensor(TileS{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  Tensor cO = thr_o.partition_C(make_identity_tensor(TileO{}));
  Tensor cO_rc = make_tensor(cO.data(), rowcol_layout(cO.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;  // 2
  constexpr int kCols = decltype(size<1>(accS_rc))::value;           // 32
  static_assert(decltype(size<0>(accO_rc))::value == kRowsPerThread);
  static_assert(decltype(size<1>(accO_rc))::value % 2 == 0);

  // The O staging tile of this warpgroup (Traits::SmemLayoutStage).
  Element* stage = ss.o[w];
  // stmatrix: lane l gives the address of row l % 8 of matrix l / 8 of each
  // x4 group; matrix m holds rows 8 (m % 2) + {0..7} of the warp's 16 and
  // the 8 columns of chunk 2u + m / 2 (u: the group), at 16-byte unit
  // Traits::stage_unit(2u + l / 16, R): (u / 4) 8 kRows + 8 R + ((2u % 8) ^ (l / 16)
  // ^ (R % 8)), its per-lane part hoisted here.
  const int lane = tid % 32;
  char* const stsm_row =
      reinterpret_cast<char*>(stage) + (16 * (tid / 32) + 8 * ((lane / 8) % 2) + lane % 8) * 128;
  const int stsm_xor = (lane / 16) ^ (lane % 8);
  // Softmax of a tile's S (log2 domain, in place): P = exp2(x - m), l = sum P.
  auto softmax = [&](const int (&limit)[kRowsPerThread], float (&row_m)[kRowsPerThread],
                     float (&row_l)[kRowsPerThread]) {
    // Most tiles see all keys of the block in every row: no per-element
    // test then (a warp vote: the branch stays uniform for quad_max).
    bool whole = true;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) whole = whole && limit[r] == kBlock - 1;
    const bool masked = __any_sync(0xFFFFFFFFu, !whole);
    // All rows' maxima first, then all rows' exponentials, each reduction in
    // four independent partial results: a straight loop would be one chain
    // of 32 dependent FMNMX (or FADD) per row.
    float m[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      float part[4];
      if (masked) {
        CUTE_UNROLL
        for (int j = 0; j < kCols; ++j) {
          const float x = get<1>(cS_rc(r, j)) <= limit[r] ? accS_rc(r, j) * p.scale_log2 : -INFINITY;
          accS_rc(r, j) = x;
          part[j % 4] = j < 4 ? x : fmaxf(part[j % 4], x);
        }
      } else {
        // The scaled scores' max from the raw ones (their min for a negative
        // scale): the scale goes into the exponent's FFMA below.
        CUTE_UNROLL
        for (int j = 0; j < 4; ++j) part[j] = accS_rc(r, j);
        if (p.scale_log2 >= 0.0f) {
          CUTE_UNROLL
          for (int j = 4; j < kCols; ++j) part[j % 4] = fmaxf(part[j % 4], accS_rc(r, j));
        } else {
          CUTE_UNROLL
          for (int j = 4; j < kCols; ++j) part[j % 4] = fminf(part[j % 4], accS_rc(r, j));
        }
        CUTE_UNROLL
        for (int j = 0; j < 4; ++j) part[j] *= p.scale_log2;
      }
      m[r] = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
    }
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) m[r] = quad_max(m[r]);  // no lane has left
    // The masked path holds scaled scores, the other raw ones: one FFMA
    // either way (a select of FADD / FFMA would issue both).
    const float mul = masked ? 1.0f : p.scale_log2;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float base = m[r] == -INFINITY ? 0.0f : m[r];
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        const float e = fast_exp2(fmaf(accS_rc(r, j), mul, -base));
        accS_rc(r, j) = e;
        part[j % 4] += e;
      }
      row_m[r] = m[r];
      row_l[r] = (part[0] + part[1]) + (part[2] + part[3]);
    }
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) row_l[r] = quad_sum(row_l[r]);
  };
  // The partial O of a tile (its O = P V complete): lse from the quad
  // leader, O / l into the staging tile by stmatrix, then out by one TMA
  // store (a whole tile) or 16-byte stores (a bucket's last, partial tile).
  struct Pending {
    int64_t row0;  // partial row of tile row 0
    int rows_valid;
    float row_m[kRowsPerThread], row_l[kRowsPerThread];
  };
  auto epilogue = [&](const Pending& t) {
    const int64_t row0 = t.row0;
    const int rows_valid = t.rows_valid;
    if (tid == 0) tma_store_wait<0>();  // the previous tile's TMA store has read the staging
    cutlass::arch::NamedBarrier::sync(128, w);
    float inv[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      // l >= 1 where a key is visible (its max contributes exp2(0)): the
      // fast reciprocal is exact enough for a 16-bit partial.
      inv[r] = t.row_l[r] > 0.0f ? __fdividef(1.0f, t.row_l[r]) : 0.0f;
      const int srow = get<0>(cS_rc(r, 0));
      if (tid % 4 == 0 && srow < rows_valid) {
        p.part_lse[row0 + srow] =
            t.row_l[r] > 0.0f ? (t.row_m[r] + __log2f(t.row_l[r])) * kLn2 : -INFINITY;
      }
    }
    // Accumulator column j = c + 2 v (wgmma C layout: column 8 v + 2 (lane % 4) + c).
    CUTE_UNROLL
    for (int u = 0; u < size<1>(accO_rc) / 4; ++u) {
      const int unit = (u / 4) * (kRows * 8) + ((2 * u % 8) ^ stsm_xor);
      SM90_U32x4_STSM_N::copy(
          pack2<Element>(accO_rc(0, 4 * u) * inv[0], accO_rc(0, 4 * u + 1) * inv[0]),
          pack2<Element>(accO_rc(1, 4 * u) * inv[1], accO_rc(1, 4 * u + 1) * inv[1]),
          pack2<Element>(accO_rc(0, 4 * u + 2) * inv[0], accO_rc(0, 4 * u + 3) * inv[0]),
          pack2<Element>(accO_rc(1, 4 * u + 2) * inv[1], accO_rc(1, 4 * u + 3) * inv[1]),
          *reinterpret_cast<uint128_t*>(stsm_row + unit * 16));
    }
    cutlass::arch::fence_view_async_shared();  // the stores -> the TMA engine
    cutlass::arch::NamedBarrier::sync(128, w);  // the staging tile is complete
    // A whole tile by TMA; the rows of a partial one (a bucket's last) by
    // 16-byte stores.
    if (rows_valid == kRows) {
      if (tid == 0) {
        // The two boxes of tma_o (64 columns each, SmemLayoutStage), by hand
        // for the cache hint: evict-first, since the combine reads the
        // partials long after they leave L2, which should keep Q and K / V.
        const uint64_t desc = reinterpret_cast<uint64_t>(p.tma_o.get_tma_descriptor());
        CUTE_UNROLL
        for (int h = 0; h < kHeadDim / 64; ++h) {
          asm volatile(
              "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group.L2::cache_hint"
              " [%0, {%2, %3}], [%1], %4;"
              :
              : "l"(desc), "r"(cast_smem_ptr_to_uint(stage + h * 64 * kRows)), "r"(64 * h),
                "r"(static_cast<int>(row0)),
                "l"(static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_FIRST))
              : "memory");
        }
        tma_store_arrive();
      }
    } else {
      const uint4* stage4 = reinterpret_cast<const uint4*>(stage);
      CUTE_UNROLL
      for (int pass = 0; pass < kRows / 8; ++pass) {
        const int row = pass * 8 + tid / 16;
        const int ch = tid % 16;
        if (row < rows_valid) {
          const uint4 v = stage4[Traits::stage_unit(ch, row)];
          __stcs(reinterpret_cast<uint4*>(p.part_o + (row0 + row) * kHeadDim) + ch, v);
        }
      }
    }
  };
  Pending pending;
  bool has_pending = false;

  int64_t it = 0;
  int seg = 0;

  while (walker.next()) {
    const int64_t k = walker.bucket;
    const auto [b, g, c] = Bucket(geo, k);
    const int64_t q_len = clamp_len(p.q_lengths, b, geo.Sq);
    const int64_t kv_len = clamp_len(p.kv_lengths, b, geo.Sk);
    const int64_t count = ix.count[k];
    const int64_t entry0 = ix.entry_start[k];
    // Last key a query may see, relative to the block: min(offset + i, kv_len - 1) - 128 c,
    // as min(pos_rel + i, len_rel) clamped to [-1, 127] (-1: none). In 32 bits:
    // pos_rel saturated to int32 and added to i (>= 0) with saturation gives
    // the same clamped value.
    const int pos_rel = static_cast<int>(
        max<int64_t>(INT_MIN, min<int64_t>(INT_MAX, kv_len - q_len - c * kBlock)));
    const int len_rel =
        static_cast<int>(max<int64_t>(-1, min<int64_t>(kBlock - 1, kv_len - 1 - c * kBlock)));
    const int kv = seg % kKvSlots;
    // Every consumer waits for every segment's block (even one with no tile
    // of its own) before releasing it: the arrivals on kv_empty[kv] then
    // always complete the phase of this segment, never a later one.
    ClusterBarrier::wait(&ss.kv_full[kv], static_cast<uint32_t>((seg / kKvSlots) & 1));

    for (int64_t tile = walker.tile_begin; tile < walker.tile_end; ++tile, ++it) {
      if ((it & 1) != w) continue;  // uniform over the warpgroup
      const int stage = static_cast<int>(it % kStages);
      ClusterBarrier::wait(&ss.full[stage], static_cast<uint32_t>((it / kStages) & 1));
      cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) -> wgmma

      const int rows_valid = static_cast<int>(min<int64_t>(tpt, count - tile * tpt) * G);
      // The rows' last visible columns (-1: no such row).
      auto row_limits = [&](int (&limit)[kRowsPerThread]) {
        CUTE_UNROLL
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int row = get<0>(cS_rc(r, 0));
          int last;
          asm("add.sat.s32 %0, %1, %2;" : "=r"(last) : "r"(pos_rel), "r"(ss.token[stage][row]));
          limit[r] = row < rows_valid ? max(min(last, len_rel), -1) : -1;
        }
      };
      int limit[kRowsPerThread];
      float row_m[kRowsPerThread], row_l[kRowsPerThread];
      // Once S is issued: the row limits, S complete (with `in_flight` later
      // batches still running), the Q stage released, the softmax.
      auto s_to_p = [&](auto in_flight) {
        row_limits(limit);
        warpgroup_wait<decltype(in_flight)::value>();
        warpgroup_fence_operand(accS);
        ClusterBarrier::arrive(&ss.empty[stage]);  // Q rows and tokens of the stage consumed
        softmax(limit, row_m, row_l);
      };
      // Each branch issues and waits for its own wgmma batches (a batch
      // waited for on another path than its issue serialises them, C7514).
      if (has_pending) {
        // S = Q K^T, then the previous tile's O = P V: that one runs during
        // this tile's softmax, its partial is written after.
        warpgroup_fence_operand(accS);
        warpgroup_arrive();
        gemm_overwrite(mma_s, tSrQ(_, _, _, stage), tSrK(_, _, _, kv), accS);
        warpgroup_commit_batch();
        warpgroup_fence_operand(tOrP);
        warpgroup_fence_operand(accO);
        warpgroup_arrive();
        gemm_overwrite(mma_o, tOrP, tOrV(_, _, _, kv), accO);
        warpgroup_commit_batch();
        s_to_p(Int<1>{});
        warpgroup_wait<0>();
        warpgroup_fence_operand(accO);
        warpgroup_fence_operand(tOrP);
        epilogue(pending);
      } else {
        warpgroup_fence_operand(accS);
        warpgroup_arrive();
        gemm_overwrite(mma_s, tSrQ(_, _, _, stage), tSrK(_, _, _, kv), accS);
        warpgroup_commit_batch();
        s_to_p(Int<0>{});
      }
      acc_to_operand(accS, tOrP);
      pending.row0 = (entry0 + tile * tpt) * G;
      pending.rows_valid = rows_valid;
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        pending.row_m[r] = row_m[r];
        pending.row_l[r] = row_l[r];
      }
      has_pending = true;
    }
    // The segment's last tile: its O = P V before V_c is released.
    if (has_pending) {
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(accO);
      warpgroup_arrive();
      gemm_overwrite(mma_o, tOrP, tOrV(_, _, _, kv), accO);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(accO);
      warpgroup_fence_operand(tOrP);
      epilogue(pending);
      has_pending = false;
    }
    ClusterBarrier::arrive(&ss.kv_empty[kv]);  // K_c, V_c no longer read by this warpgroup
    ++seg;
  }
  if (tid == 0) tma_store_wait<0>();  // the staging outlives its last TMA store's reads
#endif
}

// ---------------------------------------------------------------------------
// Step 3: the combine. 16 lanes (a half-warp) per (b, token, head) row, 8
// elements each. Memory-bound (2 x 260 bytes per row and slot): lane l first
// fetches the entry and lse of slots l, l + 16, ..; then 16 partial rows at a
// time are loaded before any is used, so that many loads are in flight, while
// the half-warp's next row is prefetched into L2.

template <class Element>
struct CombineParams {
  const int32_t* q_lengths;
  const int32_t* rev;       // [B, tok_count, Hkv, topk]
  const Element* part_o;    // [entries * G, D]
  const float* part_lse;    // [entries * G]
  Element* out;             // [B, Sq, Hq, D]
  float* lse;               // [B, Sq, Hq] or null
  int64_t B, Sq, Hq, Hkv, G, topk, tok_begin, tok_count;
  ScheduleGate gate;
};

constexpr int kSlotGroups = 4;  // topk <= 64 = 4 groups of 16 lanes

// Asks L2 for the 128-byte lines that hold [ptr, ptr + bytes): a hint, which
// no register waits on.
__device__ __forceinline__ void prefetch_l2(const void* ptr, uint32_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(ptr) + bytes;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(ptr) & ~uintptr_t{127}; a < end; a += 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
  }
}

template <class Element>
__global__ void __launch_bounds__(256) combine_kernel(const CombineParams<Element> p) {
  if (p.gate.closed()) return;
  const int lane16 = threadIdx.x % 16;
  // The half-warp's lanes: the two halves take different rows and may part
  // ways (the last row), so every shuffle names only its own half.
  const unsigned half = 0xFFFFu << (threadIdx.x & 16);
  const int64_t rows = p.B * p.tok_count * p.Hq;
  const int64_t step = int64_t{gridDim.x} * (blockDim.x / 16);
  // A row's (b, token of the chunk, head): split once per row, carried
  // from the iteration that prefetches it to the one that combines it.
  struct RowPos {
    int64_t b, i, h;
  };
  auto locate = [&](int64_t row) {
    return RowPos{row / (p.Hq * p.tok_count), (row / p.Hq) % p.tok_count, row % p.Hq};
  };
  // The entries of a row's slots lane16 + 16 s (-1: none; all -1 for a
  // padded token), and the partial row of its head in each.
  auto load_entries = [&](const RowPos& at, int32_t (&e)[kSlotGroups]) {
    const bool valid = p.tok_begin + at.i < clamp_len(p.q_lengths, at.b, p.Sq);
    const int32_t* rv = p.rev + ((at.b * p.tok_count + at.i) * p.Hkv + at.h / p.G) * p.topk;
    CUTE_UNROLL
    for (int s = 0; s < kSlotGroups; ++s) {
      const int k = lane16 + 16 * s;
      e[s] = valid && k < p.topk ? rv[k] : -1;
    }
  };
  int64_t row = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 16;
  int32_t entry[kSlotGroups];
  RowPos at = locate(row);
  if (row < rows) load_entries(at, entry);
  for (; row < rows; row += step) {
    // The half-warp's next row: its entries now, and once this row's lse are
    // in, its partial rows and lse asked of L2, so that its loads find them
    // there (~2% of the forward on an H200, benchmarks/RESULTS.md).
    const int64_t next = row + step;
    const RowPos next_at = locate(next);
    int32_t next_entry[kSlotGroups];
    if (next < rows) {
      load_entries(next_at, next_entry);
    } else {
      CUTE_UNROLL
      for (int s = 0; s < kSlotGroups; ++s) next_entry[s] = -1;
    }
    const int64_t out_row = (at.b * p.Sq + p.tok_begin + at.i) * p.Hq + at.h;
    float acc[8];
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
    float lse = -INFINITY;
    {
      const int64_t hh = at.h % p.G;
      int64_t prow[kSlotGroups];  // partial row of slot lane16 + 16 s, -1: none
      float w[kSlotGroups];
      float m = -INFINITY;
      CUTE_UNROLL
      for (int s = 0; s < kSlotGroups; ++s) {
        prow[s] = entry[s] >= 0 ? entry[s] * p.G + hh : -1;
        w[s] = entry[s] >= 0 ? p.part_lse[prow[s]] : -INFINITY;
        m = fmaxf(m, w[s]);
      }
      CUTE_UNROLL
      for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(half, m, o, 16));
      const int64_t next_hh = next_at.h % p.G;
      CUTE_UNROLL
      for (int s = 0; s < kSlotGroups; ++s) {
        if (next_entry[s] >= 0) {
          prefetch_l2(p.part_o + (next_entry[s] * p.G + next_hh) * kHeadDim,
                      kHeadDim * sizeof(Element));
          // An entry's G lse, by its first head's row.
          if (next_hh == 0) {
            prefetch_l2(p.part_lse + next_entry[s] * p.G, static_cast<uint32_t>(p.G * sizeof(float)));
          }
        }
      }
      if (m > -INFINITY) {
        float sum = 0.0f;
        CUTE_UNROLL
        for (int s = 0; s < kSlotGroups; ++s) {
          w[s] = prow[s] >= 0 ? exp2f((w[s] - m) * kLog2e) : 0.0f;
          sum += w[s];
        }
        CUTE_UNROLL
        for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(half, sum, o, 16);
        // In slot order (a fixed order: deterministic).
        CUTE_UNROLL
        for (int s = 0; s < kSlotGroups; ++s) {
          if (16 * s >= p.topk) break;
          uint4 v[16];
          CUTE_UNROLL
          for (int j = 0; j < 16; ++j) {
            const int64_t r = __shfl_sync(half, prow[s], j, 16);
            v[j] = r >= 0 ? __ldcs(reinterpret_cast<const uint4*>(p.part_o + r * kHeadDim) + lane16)
                          : make_uint4(0, 0, 0, 0);
          }
          CUTE_UNROLL
          for (int j = 0; j < 16; ++j) {
            const float wgt = __shfl_sync(half, w[s], j, 16);  // 0 for a missing slot
            const uint32_t words[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
            CUTE_UNROLL
            for (int q = 0; q < 4; ++q) {
              const float2 f = unpack2<Element>(words[q]);
              acc[2 * q] = fmaf(wgt, f.x, acc[2 * q]);
              acc[2 * q + 1] = fmaf(wgt, f.y, acc[2 * q + 1]);
            }
          }
        }
        const float inv = 1.0f / sum;  // sum >= 1: the maximal slot contributes exp(0)
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) acc[e] *= inv;
        lse = m + logf(sum);
      }
    }
    CUTE_UNROLL
    for (int s = 0; s < kSlotGroups; ++s) entry[s] = next_entry[s];
    at = next_at;
    uint4 o;
    o.x = pack2<Element>(acc[0], acc[1]);
    o.y = pack2<Element>(acc[2], acc[3]);
    o.z = pack2<Element>(acc[4], acc[5]);
    o.w = pack2<Element>(acc[6], acc[7]);
    reinterpret_cast<uint4*>(p.out + out_row * kHeadDim)[lane16] = o;
    if (lane16 == 0 && p.lse != nullptr) p.lse[out_row] = lse;
  }
}

// ---------------------------------------------------------------------------
// Host side.

template <class Element>
cudaError_t run_typed(const cuda::SparseAttentionArgs& a, const Plan& plan, int32_t* index,
                      void* partial, void* out, float* lse, cudaStream_t stream,
                      ScheduleGate gate) {
  using Traits = SparseFwdByBlockTraits<Element>;
  auto kernel = fwd_by_block_kernel<Traits>;
  cudaError_t st = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Traits::kSmemBytes);
  if (st != cudaSuccess) return st;
  const int sms = std::min(cuda::multiprocessor_count(kMaxCtas), kMaxCtas);
  const int64_t G = a.Hq / a.Hkv;
  int32_t* rev = index + plan.rev_offset();
  Element* part_o = static_cast<Element*>(partial);
  float* part_lse = reinterpret_cast<float*>(static_cast<char*>(partial) + plan.o_bytes);

  MainParams<Traits> mp{
      make_tma_kv<Traits>(static_cast<const Element*>(a.k), a.Sk, a.Hkv, a.B),
      make_tma_kv<Traits>(static_cast<const Element*>(a.v), a.Sk, a.Hkv, a.B),
      static_cast<const Element*>(a.q),
      a.q_lengths,
      a.kv_lengths,
      index,
      make_tma_partial<Traits>(part_o, plan.entries * G),
      part_o,
      part_lse,
      Geometry(a, 0, 0),
      a.scale * kLog2e,
      1,
      gate};
  CombineParams<Element> cp{a.q_lengths, rev, part_o, part_lse, static_cast<Element*>(out), lse,
                            a.B, a.Sq, a.Hq, a.Hkv, G, a.topk, 0, 0, gate};
  // One wave of combine CTAs (grid-stride): when the gate closes, a second
  // wave of CTAs that return at once would cost as much as the first.
  int combine_per_sm = 0;
  if ((st = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&combine_per_sm, combine_kernel<Element>,
                                                          256, 0)) != cudaSuccess) {
    return st;
  }

  const int64_t K = plan.index_windows;
  for (int64_t n = 0; n < plan.nchunks; ++n) {
    const int64_t t0 = n * plan.chunk_tokens;
    const int64_t ntok = std::min(plan.chunk_tokens, a.Sq - t0);
    const Geometry geo(a, t0, ntok);
    const int64_t slot = n % K;
    int32_t* chunk_index = index + slot * plan.index_ints;
    int32_t* chunk_rev = rev + slot * plan.rev_ints;
    if (slot == 0) {
      // The indexes of chunks n .. n + K - 1 in one build; a shorter last
      // chunk (another geometry) gets its own.
      const int64_t batch = std::min(K, plan.nchunks - n);
      const bool short_last = a.Sq - (n + batch - 1) * plan.chunk_tokens < plan.chunk_tokens;
      const int64_t same = short_last ? batch - 1 : batch;
      if (same > 0) {
        st = block_index::build_block_index(a, geo, index, rev, stream, gate, static_cast<int>(same),
                                            plan.index_ints, plan.rev_ints);
        if (st != cudaSuccess) return st;
      }
      if (short_last) {
        const int64_t last = n + batch - 1;
        const int64_t last_t0 = last * plan.chunk_tokens;
        st = block_index::build_block_index(a, Geometry(a, last_t0, a.Sq - last_t0),
                                            index + (batch - 1) * plan.index_ints,
                                            rev + (batch - 1) * plan.rev_ints, stream, gate);
        if (st != cudaSuccess) return st;
      }
    }

    mp.index = chunk_index;
    mp.geo = geo;
    mp.ctas = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(sms, geo.tiles_bound)));
    kernel<<<mp.ctas, Traits::kThreads, Traits::kSmemBytes, stream>>>(mp);
    st = cudaGetLastError();
    if (st != cudaSuccess) return st;

    cp.rev = chunk_rev;
    cp.tok_begin = t0;
    cp.tok_count = ntok;
    const int64_t rows = a.B * ntok * a.Hq;
    const int64_t grid =
        std::min<int64_t>((rows + 15) / 16, int64_t{sms} * std::max(1, combine_per_sm));
    combine_kernel<Element><<<static_cast<unsigned>(grid), 256, 0, stream>>>(cp);
    st = cudaGetLastError();
    if (st != cudaSuccess) return st;
  }
  return cudaSuccess;
}

}  // namespace

int64_t default_chunk_tokens(const cuda::SparseAttentionArgs& a) {
  if (a.B <= 0 || a.Sq <= 0) return 0;
  const int64_t per_token_partial = a.B * a.Hq * a.topk * (a.D * 2 + 4);
  const int64_t per_token_q = a.B * a.Hq * a.D * 2;
  int64_t bound = std::min(kPartialBudgetBytes / std::max<int64_t>(per_token_partial, 1),
                           kChunkQBytes / std::max<int64_t>(per_token_q, 1));
  if (a.Sq <= bound) return a.Sq;
  if (bound < 64) return std::max<int64_t>(bound, 1);
  bound -= bound % 64;
  // Balanced chunks (the last one not much smaller), still multiples of 64.
  const int64_t nchunks = (a.Sq + bound - 1) / bound;
  const int64_t even = (a.Sq + nchunks - 1) / nchunks;
  return std::min(bound, (even + 63) / 64 * 64);
}

Plan make_plan(const cuda::SparseAttentionArgs& a, int64_t chunk_tokens) {
  Plan plan;
  if (a.B <= 0 || a.Sq <= 0 || a.Hkv <= 0) return plan;
  int64_t tc = chunk_tokens > 0 ? std::min(chunk_tokens, a.Sq) : default_chunk_tokens(a);
  if (tc <= 0) return plan;
  plan.chunk_tokens = tc;
  plan.nchunks = (a.Sq + tc - 1) / tc;
  // Two window sizes occur: tc and the last chunk's (the index size is not
  // monotone in the window: its histogram depends on the sort's chunking).
  const int64_t last = a.Sq - (plan.nchunks - 1) * tc;
  const int64_t ints = std::max(block_index::Geometry(a, 0, tc).index_ints,
                                block_index::Geometry(a, 0, last).index_ints);
  plan.index_ints = (ints + 1) / 2 * 2;  // the next window stays 8-byte aligned
  plan.entries = a.B * a.Hkv * tc * a.topk;
  plan.rev_ints = plan.entries;
  const int64_t window_bytes = (plan.index_ints + plan.rev_ints) * int64_t{sizeof(int32_t)};
  plan.index_windows = std::max<int64_t>(
      1, std::min(plan.nchunks, kIndexBudgetBytes / std::max<int64_t>(window_bytes, 1)));
  const int64_t rows = plan.entries * (a.Hq / a.Hkv);
  plan.o_bytes = (rows * a.D * 2 + 255) / 256 * 256;
  plan.lse_bytes = rows * 4;
  return plan;
}

cudaError_t run(DType dtype, const cuda::SparseAttentionArgs& a, const Plan& plan,
                int32_t* index, void* partial, void* out, float* lse, cudaStream_t stream,
                ScheduleGate gate) {
  if (!cuda::sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  if (plan.chunk_tokens <= 0 || plan.nchunks != (a.Sq + plan.chunk_tokens - 1) / plan.chunk_tokens)
    return cudaErrorInvalidValue;
  if (index == nullptr || partial == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(index) % 8 != 0 || reinterpret_cast<uintptr_t>(partial) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(out) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  // Every entry index of a chunk fits the int32 reverse map, every partial
  // row an int32 TMA coordinate.
  if (plan.entries * (a.Hq / a.Hkv) > INT_MAX ||
      a.B * a.Hkv * block_index::Geometry(a, 0, 1).nb > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  return dtype == DType::kBF16
             ? run_typed<cutlass::bfloat16_t>(a, plan, index, partial, out, lse, stream, gate)
             : run_typed<cutlass::half_t>(a, plan, index, partial, out, lse, stream, gate);
}

}  // namespace jax_msa::sm90::fwd_by_block

namespace jax_msa::cuda {

SparseFwdByBlockWorkspace sparse_attention_fwd_by_block_workspace(const SparseAttentionArgs& a) {
  const sm90::fwd_by_block::Plan plan = sm90::fwd_by_block::make_plan(a, 0);
  return {plan.workspace_ints(), plan.workspace_bytes()};
}

cudaError_t sparse_attention_fwd_by_block(DType dtype, const SparseAttentionArgs& a,
                                          int32_t* index, void* partial, void* out, float* lse,
                                          cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  return sm90::fwd_by_block::run(dtype, a, sm90::fwd_by_block::make_plan(a, 0), index, partial,
                                 out, lse, stream);
}

}  // namespace jax_msa::cuda
