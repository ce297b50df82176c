// The dense attention backward's dK / dV / dQ kernel on SM90 (spec §3.6),
// in the manner of FlashAttention-3's Hopper backward: no index and no
// gather, since a key block's queries are whole row tiles of q and dout.
//
// A CTA per key block c of 128 keys (causal: per pair of blocks c and
// nb - 1 - c, one after the other; see BlockWork), kv head g and batch row b,
// 3 warpgroups:
//   warpgroup 0   warp 0: K_c, V_c once (TMA), then per step a Q and a dO
//                 tile (80 queries of one head, TMA) into a 2-stage ring;
//                 warp 2: their lse, delta (cp.async: a head's rows are
//                 strided) into the same ring;
//                 warp 1: dQ writer, the TMA reduce-add of each step's dQ
//                 tile (float32, shared memory) into dq_accum;
//   warpgroups 1, 2 (w = 0, 1): keys [64w, 64w + 64) of the block, their dK,
//                 dV (64 x 128 float32 each) in registers over all steps.
// Steps: the G query heads of the kv head for each query tile that sees a
// key of the block (causal, bottom-right: from the diagonal's tile on). Per
// step and warpgroup, keys along M (the "swapped" products of the KV-outer
// backward, whose S^T / dP^T / dV / dK fragments, kv_outer_bwd.hpp, these
// are) so that P^T, dS^T leave the accumulators as register A operands:
//   S^T = K_w Q^T, dP^T = V_w dO^T                 (SS, 64 x 80 x 128)
//   P^T = exp2(S^T scale log2e - lse log2e) (masked), dV_w += P^T dO   (RS)
//   dS^T = P^T (dP^T - delta) -> shared dS,       dK_w += dS^T Q       (RS)
//   both halves of dS in: dQ^T[64w..] = K_c^T[64w..] dS^T (SS, 64 x 80 x 128)
//   -> shared dQ tile -> warp 1's TMA reduce-add.
// The block's dK (times scale), dV go straight to dk, dv: whole, hence
// deterministic; zeros for blocks no query sees and for padded keys.
#pragma once

#if !defined(CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED)
#error "the 64 x 80 wgmma shapes need CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED before any CuTe header"
#endif

#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/kv_block_tma.hpp"
#include "kernels/sm90/kv_outer_bwd.hpp"
#include "kernels/sm90/sparse_bwd_traits.hpp"

namespace jax_msa::sm90::dense_bwd {

using namespace cute;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;
using kv_outer::cp_async_4z;
using kv_outer::fast_exp2;
using kv_outer::gemm_overwrite;
using sparse_bwd::kLog2e;

// Query tiles of 80 rows (not the KV-outer backward's 64): S^T, dP^T and
// dQ^T have the tile's rows along N, and a wider N reads less shared memory
// per FLOP (the 64 x 64 products' operand reads nearly saturate it).
// dQ = dS K has rows along M, which wgmma takes only in multiples of 64, so
// it is computed swapped: dQ^T = K^T dS^T, dims along M.
template <class Element_>
struct Traits : KeyBlockBwdShape<Element_, 2, 80> {  // 2 Q / dO stages, 80 rows
  using Base = KeyBlockBwdShape<Element_, 2, 80>;
  using typename Base::Element;
  using typename Base::SmemAtom;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;
  using Base::kD;
  using Base::kKeys;
  using Base::kRows;
  using Base::kStages;
  static constexpr int kDsBufs = 2;  // dS tiles: one per stage

  // One stage of Q / dO: the TMA box.
  using TileQ = Shape<Int<kRows>, Int<kD>>;
  using SmemLayoutQTile = decltype(tile_to_shape(SmemAtom{}, TileQ{}));
  // dS (row, key, buffer), keys contiguous: the K-major B operand of dQ^T.
  using SmemLayoutDs = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kKeys>, Int<kDsBufs>>{}));
  // The float32 dQ tile (its TMA box, K-major with the 128-byte swizzle, so
  // that a warp's stores of the dQ^T accumulator land on distinct banks).
  using SmemLayoutDq = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<float>{}, TileQ{}));

  // (dims, rows, keys) product dQ^T[64w..] = K_c^T[64w..] dS^T of one warpgroup.
  using MmaDqT = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kRows>, Int<kKeys>>,
                           GMMA::Major::MN, GMMA::Major::K>(),
      Layout<Shape<_1, _1, _1>>{}));

  struct SharedStorage {
    alignas(1024) Element k[cosize_v<SmemLayoutKV>];
    alignas(1024) Element v[cosize_v<SmemLayoutKV>];
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element dout[cosize_v<SmemLayoutQ>];
    alignas(1024) Element ds[cosize_v<SmemLayoutDs>];
    alignas(1024) float dq[cosize_v<SmemLayoutDq>];
    alignas(16) float lse[kStages][kRows];
    alignas(16) float delta[kStages][kRows];
    alignas(8) uint64_t kv_full;
    uint64_t full[kStages];
    uint64_t empty[kStages];
    uint64_t dq_full;
    uint64_t dq_empty;
    uint64_t kv_empty;  // the consumers are done with K, V (before a CTA's second block)
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
  static constexpr uint32_t kBytesQ = kRows * kD * sizeof(Element);
  // Arrivals on full[s]: the TMA thread's expect_tx and warp 2's 32 cp.async.
  static constexpr int kFullArrivals = 1 + 32;
  static_assert(kStages == 2 && kDsBufs == kStages, "StepCounter's ring");
};

// A consumer warpgroup's fragments: the shared S^T / dP^T / dV / dK products
// (kv_outer_bwd.hpp) and the swapped dQ^T of dims [64w, 64w + 64).
template <class T>
struct DenseFragments : sparse_bwd::KeyBlockProducts<T> {
  using Base = sparse_bwd::KeyBlockProducts<T>;
  using MmaDqT = typename T::MmaDqT;
  using TileDqT = Shape<_64, Int<T::kRows>>;
  MmaDqT mma_dq;
  decltype(std::declval<typename Base::template Thr<MmaDqT>>().partition_fragment_A(
      std::declval<typename Base::template SmemW<typename T::SmemLayoutKt, Shape<_64, Int<T::kKeys>>>>()))
      tQrKt;  // (MMA, 1, keys/16)
  decltype(std::declval<typename Base::template Thr<MmaDqT>>().partition_fragment_B(
      std::declval<typename Base::template Smem<typename T::SmemLayoutDs>>()))
      tQrDs;  // (MMA, 1, keys/16, buffer)
  decltype(partition_fragment_C(std::declval<MmaDqT>(), TileDqT{})) accQ;  // (dim, row)

  __device__ DenseFragments(typename T::SharedStorage& ss, int w, int tid) : Base(ss, w, tid) {
    auto thr_dq = mma_dq.get_thread_slice(tid);
    tQrKt = thr_dq.partition_fragment_A(local_tile(Base::smem(ss.k, typename T::SmemLayoutKt{}),
                                                   Shape<_64, Int<T::kKeys>>{}, make_coord(w, _0{})));
    tQrDs = thr_dq.partition_fragment_B(Base::smem(ss.ds, typename T::SmemLayoutDs{}));
  }
  __device__ auto q_rows() { return make_tensor(accQ.data(), rowcol_layout(accQ.layout())); }
};

template <class T>
auto make_tma_q(const typename T::Element* x, int64_t Sq, int64_t Hq, int64_t B) {
  return make_tma_heads<SM90_TMA_LOAD, typename T::SmemLayoutQTile, typename T::TileQ>(x, Sq, Hq, B);
}
template <class T>
auto make_tma_dq(float* x, int64_t Sq, int64_t Hq, int64_t B) {
  return make_tma_heads<SM90_TMA_REDUCE_ADD, typename T::SmemLayoutDq, typename T::TileQ>(x, Sq, Hq, B);
}

template <class T>
struct Params {
  using Element = typename T::Element;
  TmaKV<T> tma_k;
  TmaKV<T> tma_v;
  decltype(make_tma_q<T>(nullptr, 1, 1, 1)) tma_q;
  decltype(make_tma_q<T>(nullptr, 1, 1, 1)) tma_do;
  decltype(make_tma_dq<T>(nullptr, 1, 1, 1)) tma_dq;  // float32 [B, Sq, Hq, D], zeroed
  const float* lse;
  const float* delta;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  Element* dk;
  Element* dv;
  int64_t B, Sq, Sk, Hq, Hkv, G;
  float scale;
};

// The CTA's key blocks and, per block, the query tiles [m0, m1) that see one
// of its keys. The blocks of a (batch row, kv head) are the CTAs' fastest index,
// so that a wave's CTAs walk the same Q / dO / dQ tiles at the same time and
// share them in L2 (walking different tiles, the CTAs' streams outgrow L2 and
// the kernel becomes HBM-bound: half the speed at 8K 16:16, and under causal
// masking, where each block starts at its own diagonal). Non-causal: one
// block per CTA, query tiles walked downwards. Causal: block c and block
// nb - 1 - c per CTA (equal work for all CTAs), the first walked downwards
// from the last tile, the second upwards from its diagonal, so that at every
// step all CTAs are on one of two query tiles.
struct BlockWork {
  int64_t g = 0, b = 0;
  int64_t q_len = 0, kv_len = 0;
  int blocks = 1;
  int64_t c[2] = {0, 0};
  int64_t m0[2] = {0, 0}, m1[2] = {0, 0};
  int64_t steps[2] = {0, 0};  // (m1 - m0) * G: (query tile, head) pairs, head fastest

  // Block k's key block and step count (selects: an indexed array would live
  // in local memory).
  __device__ int64_t block(int k) const { return k == 0 ? c[0] : c[1]; }
  __device__ int64_t count(int k) const { return k == 0 ? steps[0] : steps[1]; }

  // CTAs per (batch row, kv head).
  static constexpr int64_t slots(bool causal, int64_t nb) { return causal ? (nb + 1) / 2 : nb; }

  template <bool kCausal, class P>
  __device__ static BlockWork make(const P& p, int64_t cta, int rows, int keys) {
    BlockWork x;
    const int64_t nb = (p.Sk + keys - 1) / keys;
    const int64_t n = slots(kCausal, nb);
    const int64_t slot = cta % n;
    x.g = cta / n % p.Hkv;
    x.b = cta / n / p.Hkv;
    x.q_len = block_index::clamp_len(p.q_lengths, x.b, p.Sq);
    x.kv_len = block_index::clamp_len(p.kv_lengths, x.b, p.Sk);
    x.c[0] = slot;
    x.c[1] = nb - 1 - slot;
    x.blocks = kCausal && x.c[1] != slot ? 2 : 1;
    CUTE_UNROLL
    for (int k = 0; k < 2; ++k) {  // unrolled: x stays in registers
      if (k < x.blocks && x.c[k] * keys < x.kv_len) {
        // Bottom-right causal: query i sees key j iff j <= kv_len - q_len + i.
        const int64_t i0 = kCausal ? max<int64_t>(0, x.c[k] * keys - (x.kv_len - x.q_len)) : 0;
        if (i0 < x.q_len) {
          x.m0[k] = i0 / rows;
          x.m1[k] = (x.q_len + rows - 1) / rows;
        }
      }
      x.steps[k] = (x.m1[k] - x.m0[k]) * p.G;
    }
    return x;
  }
};

__device__ __forceinline__ void st_shared_b16(uint32_t addr, uint16_t x) {
  asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(addr), "h"(x) : "memory");
}
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float x) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(x) : "memory");
}

// Shared addresses of a thread's accumulator entries in a K-major tile with
// the 128-byte swizzle (tile rows along the accumulator's N, columns 8 rows
// of 128 bytes per swizzle atom): column j of the accumulator's rowcol view
// is tile row n_j = n_{j % 2} + 8 (j / 2) (the wgmma C layout), the same
// swizzle phase one atom (1024 bytes) further. So two addresses per
// accumulator row, from CuTe, give all of them; computed per store, only
// those stay in registers.
__device__ __forceinline__ uint32_t swizzled_entry_addr(const uint32_t (&base)[2], int j) {
  return base[j % 2] + (j / 2) * 1024;
}

// The query tile m and head h of each step of a block's walk (BlockWork:
// the first block downwards, the second upwards), and the ring stage and
// barrier phases, which run on across blocks; advanced step by step (no
// 64-bit division per step; 32 bits: m < 2^25, h < Hq).
struct StepCounter {
  int m = 0, dm = 0, h = 0, h0, h1;
  int stage = 0;
  uint32_t phase = 0;   // of the 2-stage ring
  uint32_t parity = 0;  // of the single dQ buffer: step & 1
  __device__ StepCounter(const BlockWork& work, int64_t G)
      : h0(static_cast<int>(work.g * G)), h1(static_cast<int>(work.g * G + G)) {}
  __device__ void start(const BlockWork& work, int k) {
    h = h0;
    dm = k == 0 ? -1 : 1;
    m = static_cast<int>(k == 0 ? work.m1[0] - 1 : work.m0[1]);
  }
  __device__ void advance() {
    if (++h == h1) h = h0, m += dm;
    parity ^= 1;
    if (++stage == 2) stage = 0, phase ^= 1;
  }
};

// Calls f(step, it) for each step of the CTA's walk, it counting from 0 in
// each block.
template <class F>
__device__ __forceinline__ void for_each_step(const BlockWork& work, int64_t G, F&& f) {
  StepCounter step(work, G);
#pragma unroll 1
  for (int k = 0; k < work.blocks; ++k) {
    step.start(work, k);
#pragma unroll 1  // few registers: no copies of the loop
    for (int64_t it = 0; it < work.count(k); ++it, step.advance()) f(step, k, it);
  }
}

template <class T, bool kCausal>
__global__ void __launch_bounds__(T::kThreads, 1)
    dense_bwd_kernel(const __grid_constant__ Params<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Element = typename T::Element;
  using SharedStorage = typename T::SharedStorage;
  constexpr int kStages = T::kStages;
  constexpr int kRows = T::kRows;
  constexpr int kKeys = T::kKeys;
  constexpr int kD = T::kD;
  extern __shared__ __align__(1024) char dense_bwd_smem[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(dense_bwd_smem);

  const BlockWork work = BlockWork::make<kCausal>(p, blockIdx.x, kRows, kKeys);
  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    ClusterBarrier::init(&ss.kv_full, 1);
    ClusterBarrier::init(&ss.kv_empty, 256);
    for (int s = 0; s < kStages; ++s) {
      ClusterBarrier::init(&ss.full[s], T::kFullArrivals);
      ClusterBarrier::init(&ss.empty[s], 256);
    }
    ClusterBarrier::init(&ss.dq_full, 256);
    ClusterBarrier::init(&ss.dq_empty, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    // ---------------- producer, dQ writer ----------------
    cutlass::arch::warpgroup_reg_dealloc<24>();
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    // Three threads' loops apart (each under 24 registers): warp 0 lane 0
    // TMA, warp 2 the cp.async of lse / delta, warp 1 lane 0 the dQ writer.
    if (warp == 0 && lane == 0) {
      cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_do.get_tma_descriptor());
      auto cta = p.tma_q.get_slice(_0{});
      int kv_loads = 0;
      for_each_step(work, p.G, [&](const StepCounter& step, int k, int64_t it) {
        if (it == 0) {  // the block's K, V, once the consumers are done with the previous ones
          if (kv_loads > 0) ClusterBarrier::wait(&ss.kv_empty, (kv_loads - 1) & 1);
          ClusterTransactionBarrier::arrive_and_expect_tx(&ss.kv_full, 2 * T::kBytesKV);
          load_kv_block<T>(p.tma_k, p.Sk, p.Hkv, p.B, work.b, work.g, work.block(k), ss.k, ss.kv_full);
          load_kv_block<T>(p.tma_v, p.Sk, p.Hkv, p.B, work.b, work.g, work.block(k), ss.v, ss.kv_full);
          ++kv_loads;
        }
        const int stage = step.stage;
        ClusterBarrier::wait(&ss.empty[stage], step.phase ^ 1);
        ClusterTransactionBarrier::arrive_and_expect_tx(&ss.full[stage], 2 * T::kBytesQ);
        Tensor sQ = make_tensor(make_smem_ptr(ss.q + stage * kRows * kD),
                                typename T::SmemLayoutQTile{});
        Tensor sO = make_tensor(make_smem_ptr(ss.dout + stage * kRows * kD),
                                typename T::SmemLayoutQTile{});
        Tensor gQ = tma_heads_tile<typename T::TileQ>(p.tma_q, p.Sq, p.Hq, p.B, work.b, step.h, step.m);
        Tensor gO = tma_heads_tile<typename T::TileQ>(p.tma_do, p.Sq, p.Hq, p.B, work.b, step.h, step.m);
        copy(p.tma_q.with(ss.full[stage]), cta.partition_S(gQ), cta.partition_D(sQ));
        copy(p.tma_do.with(ss.full[stage]), cta.partition_S(gO), cta.partition_D(sO));
      });
    } else if (warp == 2) {
      // lse, delta [B, Sq, Hq] of the tile's queries (zeros past Sq): rows
      // lane and lane + 32 of each tile.
      const int64_t base = work.b * p.Sq * p.Hq;
      for_each_step(work, p.G, [&](const StepCounter& step, int, int64_t) {
        const int stage = step.stage;
        ClusterBarrier::wait(&ss.empty[stage], step.phase ^ 1);
        CUTE_UNROLL
        for (int r = lane; r < kRows; r += 32) {
          const int64_t i = step.m * kRows + r;
          const bool valid = i < p.Sq;
          const int64_t row = valid ? base + i * p.Hq + step.h : 0;
          cp_async_4z(&ss.lse[stage][r], p.lse + row, valid);
          cp_async_4z(&ss.delta[stage][r], p.delta + row, valid);
        }
        cutlass::arch::cpasync_barrier_arrive_noinc(&ss.full[stage]);
      });
      asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else if (warp == 1 && lane == 0) {
      Tensor sDq = make_tensor(make_smem_ptr(ss.dq), typename T::SmemLayoutDq{});
      auto cta = p.tma_dq.get_slice(_0{});
      for_each_step(work, p.G, [&](const StepCounter& step, int, int64_t) {
        ClusterBarrier::wait(&ss.dq_full, step.parity);
        Tensor gDq = tma_heads_tile<typename T::TileQ>(p.tma_dq, p.Sq, p.Hq, p.B, work.b, step.h, step.m);
        copy(p.tma_dq, cta.partition_S(sDq), cta.partition_D(gDq));
        tma_store_arrive();
        tma_store_wait<0>();  // the tile has been read: the consumers may rewrite it
        ClusterBarrier::arrive(&ss.dq_empty);
      });
    }
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int w = warpgroup - 1;  // keys [64w, 64w + 64) of the block
  const int tid = threadIdx.x % 128;
  DenseFragments<T> f(ss, w, tid);
  auto thr_s = f.mma_s.get_thread_slice(tid);
  auto thr_kv = f.mma_kv.get_thread_slice(tid);
  auto thr_dq = f.mma_dq.get_thread_slice(tid);
  Tensor sDs = make_tensor(make_smem_ptr(ss.ds), typename T::SmemLayoutDs{});
  Tensor sDq = make_tensor(make_smem_ptr(ss.dq), typename T::SmemLayoutDq{});
  Tensor accS_rc = f.s_rows();
  Tensor accP_rc = f.p_rows();
  Tensor accQ_rc = f.q_rows();
  Tensor cS = thr_s.partition_C(make_identity_tensor(typename decltype(f)::TileS{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  Tensor cQ = thr_dq.partition_C(make_identity_tensor(typename decltype(f)::TileDqT{}));
  Tensor cQ_rc = make_tensor(cQ.data(), rowcol_layout(cQ.layout()));  // (dim, row)
  constexpr int kKeyRows = decltype(size<0>(accS_rc))::value;  // 2
  constexpr int kCols = decltype(size<1>(accS_rc))::value;     // 20
  static_assert(decltype(size<0>(accQ_rc))::value == kKeyRows &&
                decltype(size<1>(accQ_rc))::value == kCols);
  // dS^T entry (key row r, column j) -> sDs(n_j, key, buf); dQ^T entry (dim
  // row r, column j) -> sDq(n_j, dim): the bases of columns 0 and 1.
  uint32_t ds_base[kKeyRows][2], dq_base[kKeyRows][2];
  CUTE_UNROLL
  for (int r = 0; r < kKeyRows; ++r) {
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      ds_base[r][j] = cast_smem_ptr_to_uint(&sDs(get<1>(cS_rc(r, j)), 64 * w + get<0>(cS_rc(r, j)), 0));
      dq_base[r][j] = cast_smem_ptr_to_uint(&sDq(get<1>(cQ_rc(r, j)), 64 * w + get<0>(cQ_rc(r, j))));
    }
  }
  constexpr uint32_t kDsBufBytes = T::kRows * T::kKeys * sizeof(Element);
  const float scale_log2 = p.scale * kLog2e;
  constexpr int kDsReady = 0;  // named barrier: both halves of a step's dS stored

  const int64_t offset = work.kv_len - work.q_len;
  StepCounter step(work, p.G);
  int kv_loads = 0;
#pragma unroll 1
  for (int k = 0; k < work.blocks; ++k) {
    const int64_t c = work.block(k);
    // Key j of this thread's row r is visible to query i iff key_rel[r] <= i
    // (clamped to [-1, INT_MAX]: always / never, whatever i in [0, 2^31)).
    int key_rel[kKeyRows];
    CUTE_UNROLL
    for (int r = 0; r < kKeyRows; ++r) {
      const int64_t key = c * kKeys + 64 * w + get<0>(cS_rc(r, 0));
      int64_t rel = kCausal ? key - offset : -1;
      if (key >= work.kv_len) rel = INT_MAX;
      key_rel[r] = static_cast<int>(rel < -1 ? -1 : (rel > INT_MAX ? INT_MAX : rel));
    }
    clear(f.accV);
    clear(f.accK);
    if (work.count(k) > 0) ClusterBarrier::wait(&ss.kv_full, kv_loads & 1);
    step.start(work, k);
#pragma unroll 1
    for (int64_t it = 0; it < work.count(k); ++it, step.advance()) {
      const int stage = step.stage;
      const int buf = step.stage;  // kDsBufs == kStages
      const int64_t m = step.m;
      ClusterBarrier::wait(&ss.full[stage], step.phase);

      // S^T and dP^T, two commit groups: P^T is computed while dP^T runs.
      warpgroup_fence_operand(f.accS);
      warpgroup_fence_operand(f.accP);
      warpgroup_arrive();
      gemm_overwrite(f.mma_s, f.tSrK, f.tSrQ(_, _, _, stage), f.accS);
      warpgroup_commit_batch();
      gemm_overwrite(f.mma_s, f.tSrV, f.tSrO(_, _, _, stage), f.accP);
      warpgroup_commit_batch();
      warpgroup_wait<1>();
      warpgroup_fence_operand(f.accS);

      // Whether some (key, query) pair of the step is masked: causal, a padded
      // query or a padded key.
      const bool masked = (m + 1) * kRows > work.q_len || (c + 1) * kKeys > work.kv_len ||
                          (kCausal && c * kKeys + kKeys - 1 > offset + m * kRows);
      // Query limit per column: i, or -2 for a padded query (key_rel >= -1).
      auto softmax = [&](auto is_masked) {
        CUTE_UNROLL
        for (int j = 0; j < kCols; ++j) {
          const int n = get<1>(cS_rc(0, j));
          const float lse = ss.lse[stage][n];
          const float neg_lse = lse == -INFINITY ? -INFINITY : -lse * kLog2e;
          const int64_t i = m * kRows + n;
          const int lim = i < work.q_len ? static_cast<int>(i) : -2;
          CUTE_UNROLL
          for (int r = 0; r < kKeyRows; ++r) {
            float x = fmaf(accS_rc(r, j), scale_log2, neg_lse);
            if constexpr (decltype(is_masked)::value) x = key_rel[r] <= lim ? x : -INFINITY;
            accS_rc(r, j) = fast_exp2(x);
          }
        }
      };
      if (masked) {
        softmax(cute::true_type{});
      } else {
        softmax(cute::false_type{});
      }
      warpgroup_wait<0>();  // dP^T
      warpgroup_fence_operand(f.accP);

      // dS^T = P^T (dP^T - delta), in registers (dK's A) and in shared dS (dQ's
      // A). P^T, dS^T are rounded only after both are done, so that the fp32
      // S^T, dP^T and the operands are never live together (no wgmma
      // serialisation for want of registers).
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        const float dlt = ss.delta[stage][get<1>(cS_rc(0, j))];
        CUTE_UNROLL
        for (int r = 0; r < kKeyRows; ++r) accP_rc(r, j) = accS_rc(r, j) * (accP_rc(r, j) - dlt);
      }
      // dS^T -> the (row, key) tile, keys contiguous: a key's rows are not
      // adjacent in the accumulator, hence 16-bit stores.
      CUTE_UNROLL
      for (int r = 0; r < kKeyRows; ++r) {
        CUTE_UNROLL
        for (int j = 0; j < kCols; ++j) {
          const Element x = static_cast<Element>(accP_rc(r, j));
          st_shared_b16(swizzled_entry_addr(ds_base[r], j) + buf * kDsBufBytes,
                        reinterpret_cast<const uint16_t&>(x));
        }
      }
      CUTE_UNROLL
      for (int e = 0; e < size(f.accS); ++e) {
        f.rP.data()[e] = static_cast<Element>(f.accS.data()[e]);
        f.rdS.data()[e] = static_cast<Element>(f.accP.data()[e]);
      }

      // dV += P^T dO, dK += dS^T Q (registers x the dO^T, Q^T views).
      sparse_bwd::issue_dv_dk(f.mma_kv, f.rP, f.rdS, f.tKrOt(_, _, _, stage),
                              f.tKrQt(_, _, _, stage), f.accV, f.accK);

      // dQ^T = K_c^T dS^T for dims [64w, 64w + 64), once both halves of dS are in.
      cutlass::arch::fence_view_async_shared();  // generic stores -> wgmma reads
      cutlass::arch::NamedBarrier::sync(256, kDsReady);
      warpgroup_fence_operand(f.accQ);
      warpgroup_arrive();
      gemm_overwrite(f.mma_dq, f.tQrKt, f.tQrDs(_, _, _, buf), f.accQ);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(f.accQ);
      warpgroup_fence_operand(f.rP);
      warpgroup_fence_operand(f.rdS);
      ClusterBarrier::arrive(&ss.empty[stage]);  // Q, dO, lse, delta of the stage read

      // dQ tile -> shared memory, once the writer has sent the previous one.
      ClusterBarrier::wait(&ss.dq_empty, step.parity ^ 1);
      CUTE_UNROLL
      for (int r = 0; r < kKeyRows; ++r) {
        CUTE_UNROLL
        for (int j = 0; j < kCols; ++j) st_shared_f32(swizzled_entry_addr(dq_base[r], j), accQ_rc(r, j));
      }
      cutlass::arch::fence_view_async_shared();  // generic stores -> the TMA's reads
      ClusterBarrier::arrive(&ss.dq_full);
    }
    if (work.count(k) > 0) {  // every product reading K, V has completed
      ClusterBarrier::arrive(&ss.kv_empty);
      ++kv_loads;
    }

    // dK = scale * sum dS^T Q, dV = sum P^T dO (zeros where no query looked).
    sparse_bwd::store_dkdv<Element>(f.accK, f.accV, thr_kv, p.dk, p.dv, p.Sk, p.Hkv, work.b, work.g,
                                    c * kKeys + 64 * w, p.scale);
  }
#endif
}

// dq_accum = 0; dK / dV / dQ (dense_bwd_kernel); dq = scale * dq_accum.
template <class Element, bool kCausal>
cudaError_t dkdv_dq(const cuda::DenseAttentionArgs& a, const float* lse, const void* dout,
                    const float* delta, float* dq_accum, void* dq, void* dk, void* dv,
                    cudaStream_t stream) {
  using T = Traits<Element>;
  const int64_t dq_elems = a.B * a.Sq * a.Hq * T::kD;
  if (dq_elems > 0) {
    const int64_t n4 = dq_elems / 4;  // D = 128: whole float4s, 16-byte aligned (checked)
    const int64_t grid = std::min<int64_t>((n4 + 255) / 256, 132 * 8);
    sparse_bwd::dq_zero_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        reinterpret_cast<float4*>(dq_accum), n4, ScheduleGate{});
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) return st;
  }
  if (a.Sq == 0) {  // no query: zero gradients (and no q for a TMA descriptor)
    const size_t bytes = static_cast<size_t>(a.B * a.Sk * a.Hkv * T::kD) * sizeof(Element);
    cudaError_t st = cudaMemsetAsync(dk, 0, bytes, stream);
    return st != cudaSuccess ? st : cudaMemsetAsync(dv, 0, bytes, stream);
  }
  const int64_t nb = (a.Sk + T::kKeys - 1) / T::kKeys;
  const int64_t ctas = BlockWork::slots(kCausal, nb) * a.Hkv * a.B;
  if (ctas > 0) {
    const auto* k = static_cast<const Element*>(a.k);
    const auto* v = static_cast<const Element*>(a.v);
    const auto* q = static_cast<const Element*>(a.q);
    const auto* o = static_cast<const Element*>(dout);
    const Params<T> p{make_tma_kv<T>(k, a.Sk, a.Hkv, a.B),
                      make_tma_kv<T>(v, a.Sk, a.Hkv, a.B),
                      make_tma_q<T>(q, a.Sq, a.Hq, a.B),
                      make_tma_q<T>(o, a.Sq, a.Hq, a.B),
                      make_tma_dq<T>(dq_accum, a.Sq, a.Hq, a.B),
                      lse,
                      delta,
                      a.q_lengths,
                      a.kv_lengths,
                      static_cast<Element*>(dk),
                      static_cast<Element*>(dv),
                      a.B,
                      a.Sq,
                      a.Sk,
                      a.Hq,
                      a.Hkv,
                      a.Hq / a.Hkv,
                      a.scale};
    auto kernel = dense_bwd_kernel<T, kCausal>;
    cudaError_t st =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
    if (st != cudaSuccess) return st;
    kernel<<<static_cast<unsigned>(ctas), T::kThreads, T::kSmemBytes, stream>>>(p);
    if ((st = cudaGetLastError()) != cudaSuccess) return st;
  }
  if (dq_elems == 0) return cudaSuccess;
  const int64_t n8 = dq_elems / 8;
  const int64_t grid = std::min<int64_t>((n8 + 255) / 256, 132 * 8);
  sparse_bwd::dq_convert_kernel<Element><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      dq_accum, a.q_lengths, static_cast<Element*>(dq), n8, a.Sq, a.Hq, a.scale, ScheduleGate{});
  return cudaGetLastError();
}

}  // namespace jax_msa::sm90::dense_bwd
