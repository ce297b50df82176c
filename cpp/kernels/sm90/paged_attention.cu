// Paged attention on SM90 (spec §3.7): decode / MTP queries over paged KV
// caches of bfloat16 or float8_e4m3fn pages, dense or MSA-sparse.
//
// A tile is (split, chunk of queries, request b, kv head g): kRows = 128
// (query, head) rows, `tokens` consecutive queries times the G query heads of
// the group (GQA 16 x 8 queries = one full tile). The tile walks its page
// list: dense, the logical pages up to the local page of its last query;
// sparse, the union of its queries' selected pages (a row whose query did not
// select a page masks it out). With splits > 1 the list is cut into `splits`
// contiguous parts, one per CTA, whose partial results (O / l and lse, fp32)
// go to a workspace that a combine kernel merges by lse.
//
// One CTA = 3 warpgroups, persistent over tiles:
//   warpgroup 0   producer: warp 0 builds the page list, loads Q (cp.async)
//                 and streams K/V pages by TMA. bfloat16 pages land in the
//                 ring of wgmma slots directly; e4m3 pages land in a staging
//                 ring that warps 1..3 convert to bfloat16 (exact) into the
//                 wgmma ring. The cache scales are applied to the logits and
//                 to the output, never to the pages.
//   warpgroups 1, 2: 64 rows each: S = Q K^T (wgmma, SS), masks, online
//                 softmax (exp2), O += P V (wgmma, P from registers).
// Holes of the page table and invalid ids never enter a list: nothing outside
// the caches is read, whatever the tables say.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/rowmax_epilogue.hpp"

namespace jax_msa::sm90 {
namespace {

using namespace cute;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

constexpr int kPagedSms = 132;  // fallback only; the launcher asks the device

template <bool kFp8_>
struct PagedTraits {
  static constexpr bool kFp8 = kFp8_;
  using Element = cutlass::bfloat16_t;
  using Stored = std::conditional_t<kFp8, uint8_t, cutlass::bfloat16_t>;  // cache element
  static constexpr int kD = 128;
  static constexpr int kKeys = 128;
  static constexpr int kConsumers = 2;
  static constexpr int kRows = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kSlots = kFp8 ? 4 : 6;  // wgmma ring (and staging ring for e4m3)
  static constexpr int kConverters = 96;       // warps 1..3 of the producer warpgroup
  static constexpr int kMaxCandidates = 128;   // sparse: tokens * topk

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>>{}));
  using SmemLayoutRing =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>, Int<kSlots>>{}));
  using SmemLayoutRingT = decltype(composition(
      SmemLayoutRing{}, make_layout(Shape<Int<kD>, Int<kKeys>, Int<kSlots>>{},
                                    Stride<Int<kKeys>, _1, Int<kKeys * kD>>{})));
  // e4m3 staging: plain row-major keys x dims bytes.
  using SmemLayoutStage = Layout<Shape<Int<kKeys>, Int<kD>>, Stride<Int<kD>, _1>>;
  using SmemLayoutStageRing =
      Layout<Shape<Int<kKeys>, Int<kD>, Int<kSlots>>, Stride<Int<kD>, _1, Int<kKeys * kD>>>;
  using SmemLayoutTma = std::conditional_t<kFp8, SmemLayoutStage, SmemLayoutKV>;
  using TileKV = Shape<Int<kKeys>, Int<kD>>;

  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kKeys>, Int<kD>>>(),
      Layout<Shape<Int<kConsumers>, _1, _1>>{}));
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kKeys>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumers>, _1, _1>>{}));

  static constexpr uint32_t kBytesPage = kKeys * kD * sizeof(Stored);

  struct SharedStorage {
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element kv[cosize_v<SmemLayoutRing>];
    alignas(128) uint8_t stage[kFp8 ? kSlots * kKeys * kD : 16];
    uint64_t q_full, q_empty;
    uint64_t full[kSlots], empty[kSlots];
    uint64_t stage_full[kSlots], stage_empty[kSlots];
    uint64_t slot_tokens[kSlots], stage_tokens[kSlots];
    int32_t slot_block[kSlots], stage_block[kSlots];
    int32_t tile_blocks;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
};

// The cache viewed as [128 keys, D, Hkv, num_pages]: a page of head g is the
// TMA box at (0, 0, g, page).
template <class Traits>
auto make_tma_cache(const typename Traits::Stored* cache, int64_t Hkv, int64_t num_pages) {
  constexpr int kD = Traits::kD;
  auto layout = make_layout(
      make_shape(Int<Traits::kKeys>{}, Int<kD>{}, static_cast<int>(Hkv), static_cast<int>(num_pages)),
      make_stride(int64_t{kD}, _1{}, int64_t{Traits::kKeys * kD}, Hkv * Traits::kKeys * kD));
  return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(cache), layout),
                       typename Traits::SmemLayoutTma{}, typename Traits::TileKV{}, _1{});
}

template <class Traits>
using TmaCache = decltype(make_tma_cache<Traits>(nullptr, 1, 1));

struct PagedShape {
  const cutlass::bfloat16_t* q;
  const int32_t* page_table;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  const int32_t* ids;
  const float* k_scale;
  const float* v_scale;
  int64_t num_pages, B, Q, Hq, Hkv, max_pages, topk;
  int64_t group;
  int tokens;       // queries per tile
  int64_t chunks;   // ceil(Q / tokens)
  int64_t splits;
  int64_t tiles;    // splits * chunks * B * Hkv
  float scale_log2;  // scale * log2(e) (times k_scale in the kernel)
};

struct PagedTile {
  int64_t b, g, chunk, split, token0;
  __device__ PagedTile(int64_t index, const PagedShape& s) {
    g = index % s.Hkv;
    index /= s.Hkv;
    b = index % s.B;
    index /= s.B;
    chunk = index % s.chunks;
    split = index / s.chunks;
    token0 = chunk * s.tokens;
  }
};

// Clamped lengths of request b (as the reference clamps them).
__device__ inline void request_lengths(const PagedShape& s, int64_t b, int64_t& q_len,
                                       int64_t& kv_len) {
  q_len = min(max<int64_t>(s.q_lengths[b], 0), s.Q);
  kv_len = min(max<int64_t>(s.kv_lengths[b], 0), s.max_pages * 128);
}

template <class Traits>
struct PagedParams {
  TmaCache<Traits> tma_k, tma_v;
  PagedShape shape;
  cutlass::bfloat16_t* out;
  float* lse;
  float* workspace;  // splits > 1: O partials [splits, R, D], then lse [splits, R]
};

__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}

__device__ inline void cp_async_wait_and_fence() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// The producer warp (warp 0): per tile, the page list, Q, then K/V pages
// (ring order K_0, K_1, V_0, K_2, V_1, ..., V_last).
template <class Traits>
__device__ void produce(typename Traits::SharedStorage& ss, const PagedParams<Traits>& p) {
  constexpr int kSlots = Traits::kSlots;
  constexpr int kD = Traits::kD;
  constexpr uint32_t kFull = 0xFFFFFFFFu;
  const PagedShape& s = p.shape;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
  }
  using Stored = typename Traits::Stored;
  Tensor sDst = [&] {
    if constexpr (Traits::kFp8) {
      return make_tensor(make_smem_ptr(reinterpret_cast<Stored*>(ss.stage)),
                         typename Traits::SmemLayoutStageRing{});
    } else {
      return make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRing{});
    }
  }();
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  uint32_t seq = 0;
  int64_t round = 0;

  auto issue = [&](const auto& tma, int64_t g, int32_t phys, int32_t c, uint64_t tokens) {
    const int slot = static_cast<int>(seq % kSlots);
    const uint32_t phase = ((seq / kSlots) & 1) ^ 1;
    uint64_t* empty = Traits::kFp8 ? &ss.stage_empty[slot] : &ss.empty[slot];
    uint64_t* full = Traits::kFp8 ? &ss.stage_full[slot] : &ss.full[slot];
    ClusterBarrier::wait(empty, phase);
    if (lane == 0) {
      if constexpr (Traits::kFp8) {
        ss.stage_block[slot] = c;
        ss.stage_tokens[slot] = tokens;
      } else {
        ss.slot_block[slot] = c;
        ss.slot_tokens[slot] = tokens;
      }
      Tensor m = tma.get_tma_tensor(make_shape(Int<Traits::kKeys>{}, Int<kD>{},
                                               static_cast<int>(s.Hkv),
                                               static_cast<int>(s.num_pages)));
      Tensor gP = m(_, _, g, _);  // (keys, D, page)
      auto cta = tma.get_slice(_0{});
      ClusterTransactionBarrier::arrive_and_expect_tx(full, Traits::kBytesPage);
      copy(tma.with(*full), cta.partition_S(gP)(_, _, _, phys), cta.partition_D(sDst)(_, _, _, slot));
    }
    __syncwarp();
    ++seq;
  };

  for (int64_t index = blockIdx.x; index < s.tiles; index += gridDim.x, ++round) {
    const PagedTile tile(index, s);
    int64_t q_len, kv_len;
    request_lengths(s, tile.b, q_len, kv_len);
    const int64_t offset = kv_len - q_len;
    const int nt = static_cast<int>(min<int64_t>(max<int64_t>(q_len - tile.token0, 0), s.tokens));
    const int32_t* table = s.page_table + tile.b * s.max_pages;
    auto physical = [&](int64_t c) -> int32_t {
      const int32_t e = table[c];
      return e >= 0 && e < s.num_pages ? e : -1;
    };

    // Dense: pages [lo, hi) of [0, local page of the last valid query].
    // Sparse: the union of the candidates, split by rank [lo, hi).
    int64_t lo = 0, hi = 0;
    int count = 0;
    constexpr int kRegs = Traits::kMaxCandidates / 32;
    int32_t cand[kRegs], phys[kRegs];
    uint64_t tokens_of[kRegs];
    bool first[kRegs];
    if (s.ids == nullptr) {
      const int64_t last = nt > 0 ? floor_div(offset + tile.token0 + nt - 1, Traits::kKeys) : -1;
      const int64_t n = last + 1;
      if (n > 0) {
        lo = n * tile.split / s.splits;
        hi = n * (tile.split + 1) / s.splits;
      }
      for (int64_t c0 = lo; c0 < hi; c0 += 32) {
        const int64_t c = c0 + lane;
        count += __popc(__ballot_sync(kFull, c < hi && physical(c) >= 0));
      }
    } else {
      const int64_t valid_blocks = (kv_len + Traits::kKeys - 1) / Traits::kKeys;
      const int n = s.tokens * static_cast<int>(s.topk);
      CUTE_UNROLL
      for (int i = 0; i < kRegs; ++i) {
        const int idx = lane + 32 * i;
        cand[i] = -1;
        phys[i] = -1;
        const int t = idx / static_cast<int>(s.topk);
        if (idx < n && t < nt) {
          const int64_t token = tile.token0 + t;
          const int32_t c = s.ids[((tile.b * s.Q + token) * s.Hkv + tile.g) * s.topk + idx % s.topk];
          if (c >= 0 && c < valid_blocks && c <= floor_div(offset + token, Traits::kKeys)) {
            const int32_t ph = physical(c);
            if (ph >= 0) {
              cand[i] = c;
              phys[i] = ph;
            }
          }
        }
        tokens_of[i] = 0;
        first[i] = cand[i] >= 0;
      }
      CUTE_UNROLL
      for (int jr = 0; jr < kRegs; ++jr) {
        if (32 * jr >= n) break;
        for (int src = 0; src < 32; ++src) {
          const int j = 32 * jr + src;
          const int32_t cj = __shfl_sync(kFull, cand[jr], src);
          if (j >= n) break;
          const uint64_t bit = uint64_t{1} << (j / static_cast<int>(s.topk));
          CUTE_UNROLL
          for (int i = 0; i < kRegs; ++i) {
            if (cj >= 0 && cj == cand[i]) {
              tokens_of[i] |= bit;
              if (j < lane + 32 * i) first[i] = false;
            }
          }
        }
      }
      int total = 0;
      CUTE_UNROLL
      for (int i = 0; i < kRegs; ++i) total += __popc(__ballot_sync(kFull, first[i]));
      lo = static_cast<int64_t>(total) * tile.split / s.splits;
      hi = static_cast<int64_t>(total) * (tile.split + 1) / s.splits;
      count = static_cast<int>(hi - lo);
    }

    // Q rows once the consumers have released the previous tile's.
    ClusterBarrier::wait(&ss.q_empty, static_cast<uint32_t>((round & 1) ^ 1));
    if (lane == 0) ss.tile_blocks = count;
    {
      constexpr int kChunks = kD / 8;
      const int used = s.tokens * static_cast<int>(s.group);
      for (int i = lane; i < Traits::kRows * kChunks; i += 32) {
        const int r = i / kChunks;
        const int ch = i % kChunks;
        const int t = r / static_cast<int>(s.group);
        const bool valid = r < used && t < nt;
        const int64_t head = tile.g * s.group + r % s.group;
        const cutlass::bfloat16_t* from =
            valid ? s.q + ((tile.b * s.Q + tile.token0 + t) * s.Hq + head) * kD + ch * 8 : s.q;
        cp_async_16(&sQ(r, ch * 8), from, valid);
      }
    }
    cp_async_wait_and_fence();
    ClusterBarrier::arrive(&ss.q_full);

    const uint64_t all_tokens = nt >= 64 ? ~uint64_t{0} : (uint64_t{1} << nt) - 1;
    int32_t pending_v = -1;
    auto emit = [&](int32_t ph, int32_t c, uint64_t tokens) {
      issue(p.tma_k, tile.g, ph, c, tokens);
      if (pending_v >= 0) issue(p.tma_v, tile.g, pending_v, 0, 0);
      pending_v = ph;
    };
    if (s.ids == nullptr) {
      for (int64_t c0 = lo; c0 < hi; c0 += 32) {
        const int64_t c = c0 + lane;
        const int32_t ph = c < hi ? physical(c) : -1;
        uint32_t todo = __ballot_sync(kFull, ph >= 0);
        while (todo != 0) {
          const int src = __ffs(todo) - 1;
          todo &= todo - 1;
          emit(__shfl_sync(kFull, ph, src), static_cast<int32_t>(c0 + src), all_tokens);
        }
      }
    } else {
      int rank = 0;
      CUTE_UNROLL
      for (int i = 0; i < kRegs; ++i) {
        uint32_t todo = __ballot_sync(kFull, first[i]);
        while (todo != 0) {
          const int src = __ffs(todo) - 1;
          todo &= todo - 1;
          const int32_t c = __shfl_sync(kFull, cand[i], src);
          const int32_t ph = __shfl_sync(kFull, phys[i], src);
          const uint64_t tokens = __shfl_sync(kFull, tokens_of[i], src);
          if (rank >= lo && rank < hi) emit(ph, c, tokens);
          ++rank;
        }
      }
    }
    if (pending_v >= 0) issue(p.tma_v, tile.g, pending_v, 0, 0);
  }
  if constexpr (Traits::kFp8) {
    // End of the stream for the converters.
    const int slot = static_cast<int>(seq % kSlots);
    ClusterBarrier::wait(&ss.stage_empty[slot], ((seq / kSlots) & 1) ^ 1);
    if (lane == 0) {
      ss.stage_block[slot] = -1;
      ClusterBarrier::arrive(&ss.stage_full[slot]);
    }
    __syncwarp();
  }
}

// Warps 1..3 (e4m3 caches): staging slot -> bfloat16 wgmma slot, same ring position.
template <class Traits>
__device__ void convert(typename Traits::SharedStorage& ss, int ctid) {
  constexpr int kSlots = Traits::kSlots;
  Tensor sRing = make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRing{});
  cutlass::NumericArrayConverter<cutlass::bfloat16_t, cutlass::float_e4m3_t, 16> cvt;
  for (uint32_t seq = 0;; ++seq) {
    const int slot = static_cast<int>(seq % kSlots);
    const uint32_t phase = (seq / kSlots) & 1;
    ClusterBarrier::wait(&ss.stage_full[slot], phase);
    const int32_t block = ss.stage_block[slot];
    if (block < 0) return;
    ClusterBarrier::wait(&ss.empty[slot], phase ^ 1);
    const uint8_t* src = ss.stage + slot * Traits::kKeys * Traits::kD;
    for (int i = ctid; i < Traits::kKeys * Traits::kD / 16; i += Traits::kConverters) {
      const int row = i / (Traits::kD / 16);
      const int col = (i % (Traits::kD / 16)) * 16;
      const auto in = *reinterpret_cast<const cutlass::Array<cutlass::float_e4m3_t, 16>*>(src + 16 * i);
      const cutlass::Array<cutlass::bfloat16_t, 16> o = cvt(in);
      const uint4* w = reinterpret_cast<const uint4*>(&o);
      *reinterpret_cast<uint4*>(&sRing(row, col, slot)) = w[0];
      *reinterpret_cast<uint4*>(&sRing(row, col + 8, slot)) = w[1];
    }
    if (ctid == 0) {
      ss.slot_block[slot] = block;
      ss.slot_tokens[slot] = ss.stage_tokens[slot];
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    ClusterBarrier::arrive(&ss.stage_empty[slot]);
    ClusterBarrier::arrive(&ss.full[slot]);
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    paged_attention_kernel(const __grid_constant__ PagedParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kSlots = Traits::kSlots;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const PagedShape& s = p.shape;

  if (threadIdx.x == 0) {
    ClusterBarrier::init(&ss.q_full, 32);
    ClusterBarrier::init(&ss.q_empty, 128 * Traits::kConsumers);
    for (int i = 0; i < kSlots; ++i) {
      ClusterBarrier::init(&ss.full[i], Traits::kFp8 ? Traits::kConverters : 1);
      ClusterBarrier::init(&ss.empty[i], 128 * Traits::kConsumers);
      ClusterBarrier::init(&ss.stage_full[i], 1);
      ClusterBarrier::init(&ss.stage_empty[i], Traits::kConverters);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<56>();
    if (threadIdx.x < 32) {
      produce<Traits>(ss, p);
    } else if constexpr (Traits::kFp8) {
      convert<Traits>(ss, threadIdx.x - 32);
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<224>();
  const int tid = threadIdx.x - 128;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRing{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRingT{});
  typename Traits::MmaS mma_s;
  typename Traits::MmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  Tensor tOrV = thr_o.partition_fragment_B(sVt);
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kKeys>>;
  using TileO = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  Tensor accS = partition_fragment_C(mma_s, TileS{});
  Tensor accO = partition_fragment_C(mma_o, TileO{});
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_o, TileS{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accO_rc = make_tensor(accO.data(), rowcol_layout(accO.layout()));
  constexpr int kR = decltype(size<0>(accS_rc))::value;
  const int row_base = 16 * (tid / 32) + (tid % 32) / 4;
  const int col_base = 2 * (tid % 4);
  auto column = [&](int j) { return 8 * (j / 2) + col_base + j % 2; };
  cutlass::NumericArrayConverter<Element, float, 2> to_pair;
  const float scale_log2 = s.scale_log2 * *s.k_scale;
  const float v_scale = *s.v_scale;
  const int64_t R = s.B * s.Q * s.Hq;

  uint32_t seq = 0;
  int64_t round = 0;
  for (int64_t index = blockIdx.x; index < s.tiles; index += gridDim.x, ++round) {
    const PagedTile tile(index, s);
    int64_t q_len, kv_len;
    request_lengths(s, tile.b, q_len, kv_len);
    const int64_t first_position = kv_len - q_len + tile.token0;
    const int used = s.tokens * static_cast<int>(s.group);
    int token_of[kR];   // query of the row within the tile; -1: padded / missing
    bool exists[kR];    // the row is a row of out
    int64_t last_key[kR], out_row[kR];
    CUTE_UNROLL
    for (int r = 0; r < kR; ++r) {
      const int row = row_base + 8 * r;
      const int t = row / static_cast<int>(s.group);
      const int64_t token = tile.token0 + t;
      exists[r] = row < used && token < s.Q;
      token_of[r] = exists[r] && token < q_len ? t : -1;
      last_key[r] = min(first_position + t, kv_len - 1);
      out_row[r] = (tile.b * s.Q + token) * s.Hq + tile.g * s.group + row % s.group;
    }
    float row_max[kR], row_sum[kR];
    CUTE_UNROLL
    for (int r = 0; r < kR; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.0f;
    }
    clear(accO);

    ClusterBarrier::wait(&ss.q_full, static_cast<uint32_t>(round & 1));
    const int blocks = ss.tile_blocks;
    if (blocks == 0) ClusterBarrier::arrive(&ss.q_empty);

    auto issue_s = [&](uint32_t at, int64_t& c, uint64_t& tokens) {
      const int slot = static_cast<int>(at % kSlots);
      ClusterBarrier::wait(&ss.full[slot], (at / kSlots) & 1);
      c = ss.slot_block[slot];
      tokens = ss.slot_tokens[slot];
      warpgroup_fence_operand(accS);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tSrQ); ++k) {
        cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k, slot), accS);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      return slot;
    };
    auto issue_pv = [&](uint32_t at) {
      const int slot = static_cast<int>(at % kSlots);
      ClusterBarrier::wait(&ss.full[slot], (at / kSlots) & 1);
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(accO);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tOrV); ++k) {
        cute::gemm(mma_o, tOrP(_, _, k), tOrV(_, _, k, slot), accO);
      }
      warpgroup_commit_batch();
      return slot;
    };
    float correction[kR];
    auto softmax = [&](int64_t c, uint64_t tokens) {
      const int64_t key0 = c * Traits::kKeys;
      const bool partial = key0 + Traits::kKeys - 1 > first_position || key0 + Traits::kKeys > kv_len;
      bool members = true;
      CUTE_UNROLL
      for (int r = 0; r < kR; ++r) {
        members = members && token_of[r] >= 0 && ((tokens >> token_of[r]) & 1);
      }
      const bool masked = __any_sync(0xFFFFFFFFu, partial || !members);
      CUTE_UNROLL
      for (int r = 0; r < kR; ++r) {
        float m = row_max[r];
        if (masked) {
          const bool member = token_of[r] >= 0 && ((tokens >> token_of[r]) & 1);
          const int64_t limit = last_key[r] - key0;
          CUTE_UNROLL
          for (int j = 0; j < size<1>(accS_rc); ++j) {
            float x = accS_rc(r, j) * scale_log2;
            if (!member || column(j) > limit) x = -INFINITY;
            accS_rc(r, j) = x;
            m = fmaxf(m, x);
          }
        } else {
          CUTE_UNROLL
          for (int j = 0; j < size<1>(accS_rc); ++j) {
            accS_rc(r, j) *= scale_log2;
            m = fmaxf(m, accS_rc(r, j));
          }
        }
        m = quad_max(m);
        const float base = m == -INFINITY ? 0.0f : m;
        correction[r] = fast_exp2(row_max[r] - base);
        row_max[r] = m;
        float sum = 0.0f;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accS_rc); ++j) {
          const float e = fast_exp2(accS_rc(r, j) - base);
          accS_rc(r, j) = e;
          sum += e;
        }
        row_sum[r] = row_sum[r] * correction[r] + sum;
      }
    };
    auto rescale_and_convert = [&] {
      CUTE_UNROLL
      for (int r = 0; r < kR; ++r) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accO_rc); ++j) accO_rc(r, j) *= correction[r];
      }
      acc_to_operand(accS, tOrP);
    };

    if (blocks > 0) {
      int64_t c;
      uint64_t tokens;
      int slot = issue_s(seq++, c, tokens);
      warpgroup_wait<0>();
      warpgroup_fence_operand(accS);
      ClusterBarrier::arrive(&ss.empty[slot]);
      if (blocks == 1) ClusterBarrier::arrive(&ss.q_empty);
      softmax(c, tokens);
      rescale_and_convert();
      for (int u = 1; u < blocks; ++u) {
        const int k_slot = issue_s(seq, c, tokens);
        const int v_slot = issue_pv(seq + 1);
        seq += 2;
        warpgroup_wait<1>();
        warpgroup_fence_operand(accS);
        ClusterBarrier::arrive(&ss.empty[k_slot]);
        if (u == blocks - 1) ClusterBarrier::arrive(&ss.q_empty);
        softmax(c, tokens);
        warpgroup_wait<0>();
        warpgroup_fence_operand(accO);
        ClusterBarrier::arrive(&ss.empty[v_slot]);
        rescale_and_convert();
      }
      slot = issue_pv(seq++);
      warpgroup_wait<0>();
      warpgroup_fence_operand(accO);
      ClusterBarrier::arrive(&ss.empty[slot]);
    }

    // out = O / l (times v_scale), lse = ln(sum of exp): 0 / -inf for an empty row.
    const bool direct = s.splits == 1;
    CUTE_UNROLL
    for (int r = 0; r < kR; ++r) {
      const float total = quad_sum(row_sum[r]);
      if (!exists[r]) continue;
      const float inv = total > 0.0f ? v_scale / total : 0.0f;
      const float row_lse =
          total > 0.0f ? (row_max[r] + log2f(total)) * 0.6931471805599453f : -INFINITY;
      if (direct) {
        Element* dst = p.out + out_row[r] * Traits::kD;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accO_rc); j += 2) {
          auto pair = to_pair(cutlass::Array<float, 2>{accO_rc(r, j) * inv, accO_rc(r, j + 1) * inv});
          *reinterpret_cast<cutlass::Array<Element, 2>*>(dst + column(j)) = pair;
        }
        if (tid % 4 == 0) p.lse[out_row[r]] = row_lse;
      } else {
        float* dst = p.workspace + (tile.split * R + out_row[r]) * Traits::kD;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accO_rc); j += 2) {
          *reinterpret_cast<float2*>(dst + column(j)) =
              make_float2(accO_rc(r, j) * inv, accO_rc(r, j + 1) * inv);
        }
        if (tid % 4 == 0) p.workspace[s.splits * R * Traits::kD + tile.split * R + out_row[r]] = row_lse;
      }
    }
  }
#endif
}

// Merges the split partials of every row: one warp per row, 4 dims per lane.
__global__ void paged_combine_kernel(const float* __restrict__ workspace, int64_t R, int64_t splits,
                                     cutlass::bfloat16_t* __restrict__ out, float* __restrict__ lse) {
  constexpr int kD = 128;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= R) return;  // whole warps leave together
  const float* lses = workspace + splits * R * kD;
  float m = -INFINITY;
  for (int64_t sp = lane; sp < splits; sp += 32) m = fmaxf(m, lses[sp * R + row]);
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.0f;
  if (m != -INFINITY) {
    for (int64_t sp = 0; sp < splits; ++sp) {
      const float l = lses[sp * R + row];
      if (l == -INFINITY) continue;
      const float w = __expf(l - m);
      total += w;
      const float4 x = *reinterpret_cast<const float4*>(workspace + (sp * R + row) * kD + 4 * lane);
      acc.x += w * x.x;
      acc.y += w * x.y;
      acc.z += w * x.z;
      acc.w += w * x.w;
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  cutlass::NumericArrayConverter<cutlass::bfloat16_t, float, 4> cvt;
  const auto o = cvt(cutlass::Array<float, 4>{acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv});
  *reinterpret_cast<cutlass::Array<cutlass::bfloat16_t, 4>*>(out + row * kD + 4 * lane) = o;
  if (lane == 0) lse[row] = total > 0.0f ? m + logf(total) : -INFINITY;
}

// Queries per tile: tokens * G <= 128 (and tokens * topk <= 128 when sparse).
int tokens_per_tile(const cuda::PagedAttentionArgs& a) {
  int64_t t = std::min<int64_t>(128 / (a.Hq / a.Hkv), 64);
  if (a.ids != nullptr) t = std::min<int64_t>(t, 128 / a.topk);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, a.Q)));
}

template <bool kFp8>
cudaError_t launch(const cuda::PagedAttentionArgs& a, float* workspace, void* out, float* lse,
                   cudaStream_t stream) {
  using Traits = PagedTraits<kFp8>;
  using Stored = typename Traits::Stored;
  const int tokens = tokens_per_tile(a);
  const int64_t chunks = (a.Q + tokens - 1) / tokens;
  const PagedShape shape{static_cast<const cutlass::bfloat16_t*>(a.q), a.page_table, a.q_lengths,
                         a.kv_lengths, a.ids, a.k_scale, a.v_scale, a.num_pages, a.B, a.Q, a.Hq,
                         a.Hkv, a.max_pages, a.ids ? a.topk : 0, a.Hq / a.Hkv, tokens, chunks,
                         a.splits, a.splits * chunks * a.B * a.Hkv,
                         a.scale * 1.4426950408889634f};
  const PagedParams<Traits> p{
      make_tma_cache<Traits>(static_cast<const Stored*>(a.k_cache), a.Hkv, a.num_pages),
      make_tma_cache<Traits>(static_cast<const Stored*>(a.v_cache), a.Hkv, a.num_pages), shape,
      static_cast<cutlass::bfloat16_t*>(out), lse, workspace};
  int device = 0, sms = kPagedSms;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) {
    status = cudaFuncSetAttribute(paged_attention_kernel<Traits>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  }
  if (status != cudaSuccess) return status;
  const int64_t grid = std::min<int64_t>(sms, shape.tiles);
  paged_attention_kernel<Traits><<<static_cast<unsigned>(grid), Traits::kThreads, Traits::kSmemBytes,
                                   stream>>>(p);
  status = cudaGetLastError();
  if (status != cudaSuccess || a.splits == 1) return status;
  const int64_t R = a.B * a.Q * a.Hq;
  const int64_t blocks = (R * 32 + 255) / 256;
  paged_combine_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      workspace, R, a.splits, static_cast<cutlass::bfloat16_t*>(out), lse);
  return cudaGetLastError();
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool paged_attention_args_valid(DType q_dtype, DType out_dtype, const PagedAttentionArgs& a) {
  if (q_dtype != DType::kBF16 || out_dtype != DType::kBF16 || a.D != 128) return false;
  if (a.Hkv < 1 || a.Hq % a.Hkv != 0 || a.Hq / a.Hkv > 128) return false;
  if (a.ids != nullptr && (a.topk < 1 || a.topk > 128)) return false;
  if (a.num_pages < 1 || a.num_pages > INT_MAX || a.Hkv > INT_MAX) return false;
  if (a.B < 0 || a.Q < 0 || a.max_pages < 0 || a.max_pages > (INT_MAX >> 8)) return false;
  if (a.splits < 1 || a.splits > 4096) return false;
  const int64_t R = a.B * a.Q * a.Hq;
  return R < (int64_t{1} << 40) / a.splits;
}

int64_t paged_attention_workspace_floats(const PagedAttentionArgs& a) {
  return a.splits > 1 ? a.splits * a.B * a.Q * a.Hq * (a.D + 1) : 0;
}

cudaError_t paged_attention(bool cache_fp8, const PagedAttentionArgs& a, float* workspace,
                            void* out, float* lse, cudaStream_t stream) {
  if (!paged_attention_args_valid(DType::kBF16, DType::kBF16, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Q == 0 || a.Hq == 0) return cudaSuccess;
  if (a.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  return cache_fp8 ? sm90::launch<true>(a, workspace, out, lse, stream)
                   : sm90::launch<false>(a, workspace, out, lse, stream);
}

}  // namespace jax_msa::cuda
