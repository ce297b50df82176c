// The KV-outer attention backward on SM90 of the block-sparse backward
// (sparse_attention_bwd.cu, whose top comment describes the pipeline): the
// dK / dV (+ fused dQ) kernel walking a block -> queries index
// (sparse_block_index.hpp), finish_kernel for buckets split between CTAs, and
// the dq_accum zero / convert kernels, plus their host launchers (delta:
// bwd_delta.hpp). The dense backward (dense_attention_bwd_kernel.hpp) shares
// the zero and convert kernels and the per-warpgroup pieces
// (KeyBlockProducts, issue_dv_dk, store_dkdv).
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/multiprocessors.h"
#include "kernels/sm90/bwd_delta.hpp"
#include "kernels/sm90/kv_outer_gather.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_block_index.hpp"
#include "kernels/sm90/sparse_bwd_traits.hpp"

namespace jax_msa::sm90 {
namespace sparse_bwd {

using namespace cute;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

// The block -> queries index and its geometry (sparse_block_index.hpp).
using block_index::block_attended;
using block_index::clamp_len;
using block_index::Geometry;
using block_index::IndexView;
using block_index::kBlock;     // keys per block (spec §2)
using block_index::kTileRows;  // (token, head) rows per tile
using block_index::SegmentWalker;
// The pieces shared with the by-block forward (kv_outer_gather.hpp).
using kv_outer::Bucket;
using kv_outer::cp_async_16z;
using kv_outer::cp_async_4z;
using kv_outer::fast_exp2;
using kv_outer::gemm_overwrite;
using kv_outer::pack2;
using kv_outer::row_source;
using kv_outer::RowGather;
using kv_outer::tile_share;

constexpr int kMaxCtas = 132;       // dK/dV CTAs at most (one wave on H100 / H200)
constexpr int kSlotFloats = 2 * kBlock * kHeadDim;  // one partial slot: dK then dV
constexpr float kLog2e = 1.4426950408889634f;


// ---------------------------------------------------------------------------
// dK / dV.

template <class Traits>
struct DkdvParams {
  using Element = typename Traits::Element;
  TmaKV<Traits> tma_k;
  TmaKV<Traits> tma_v;
  const Element* q;
  const Element* dout;
  const float* lse;
  const float* delta;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  const int32_t* index;
  float* partial;
  float* dq_accum;  // fused dQ: float32 [B, Sq, Hq, D], zeroed, unscaled sums
  Element* dk;
  Element* dv;
  Geometry geo;
  float scale;
  int ctas;
  ScheduleGate gate;  // the default backward: fused dQ or not, picked on the device
};

// ((2, 2, V), M, N) accumulator layout -> ((2, 2, 2), M, V / 2 * N): the
// register A-operand layout of a following wgmma whose K runs along the
// accumulator's N (each k-block of 16 takes two 8-column groups).
template <class AccLayout>
__device__ constexpr auto acc_to_operand_a(AccLayout acc) {
  auto v = get<0, 2>(acc);  // V : s (static)
  static_assert(decltype(rank(v))::value == 1 && decltype(size(v))::value % 2 == 0);
  auto v_lo = make_layout(_2{}, stride(v));
  auto v_hi = make_layout(Int<decltype(size(v))::value / 2>{}, stride(v) * _2{});
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), v_lo), get<1>(acc),
                     coalesce(make_layout(v_hi, get<2>(acc))));
}

// dS^T (a 64-key accumulator, rowcol view, keys key0 + its rows) -> buffer
// `buf` of the shared (row, key) dS tile; pairs of rows are adjacent (the
// swizzle moves 16-byte units).
template <class Element, class AccRC, class CoordRC, class SmemDs>
__device__ __forceinline__ void store_ds_t(const AccRC& acc_rc, const CoordRC& coord_rc,
                                           SmemDs sDs, int key0, int buf) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(acc_rc); ++r) {
    const int key = key0 + get<0>(coord_rc(r, 0));
    CUTE_UNROLL
    for (int j = 0; j < size<1>(acc_rc); j += 2) {
      const int n = get<1>(coord_rc(0, j));
      *reinterpret_cast<uint32_t*>(&sDs(n, key, buf)) =
          pack2<Element>(acc_rc(r, j), acc_rc(r, j + 1));
    }
  }
}

// dk = scale * accK, dv = accV of keys key0 + [0, 64) (those below Sk) of
// (batch row b, kv head g): a warpgroup's whole rows of a block.
template <class Element, class Acc, class ThrMma>
__device__ __forceinline__ void store_dkdv(const Acc& accK, const Acc& accV, const ThrMma& thr_kv,
                                           Element* dk, Element* dv, int64_t Sk, int64_t Hkv,
                                           int64_t b, int64_t g, int64_t key0, float scale) {
  Tensor cKV = thr_kv.partition_C(make_identity_tensor(Shape<_64, Int<kHeadDim>>{}));
  Tensor cKV_rc = make_tensor(cKV.data(), rowcol_layout(cKV.layout()));
  Tensor accV_rc = make_tensor(accV.data(), rowcol_layout(accV.layout()));
  Tensor accK_rc = make_tensor(accK.data(), rowcol_layout(accK.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(accV_rc); ++r) {
    const int64_t key = key0 + get<0>(cKV_rc(r, 0));
    if (key < Sk) {
      const int64_t at = ((b * Sk + key) * Hkv + g) * kHeadDim;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(accV_rc); j += 2) {
        const int d = get<1>(cKV_rc(r, j));
        *reinterpret_cast<uint32_t*>(dk + at + d) =
            pack2<Element>(accK_rc(r, j) * scale, accK_rc(r, j + 1) * scale);
        *reinterpret_cast<uint32_t*>(dv + at + d) = pack2<Element>(accV_rc(r, j), accV_rc(r, j + 1));
      }
    }
  }
}

// dV += P^T dO and dK += dS^T Q of one stage (register A operands, the dO^T
// and Q^T views as B), one commit group.
template <class Mma, class RP, class TB, class Acc>
__device__ __forceinline__ void issue_dv_dk(Mma& mma_kv, RP& rP, RP& rdS, const TB& dOt,
                                            const TB& Qt, Acc& accV, Acc& accK) {
  warpgroup_fence_operand(rP);
  warpgroup_fence_operand(rdS);
  warpgroup_fence_operand(accV);
  warpgroup_fence_operand(accK);
  warpgroup_arrive();
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(rP); ++kb) cute::gemm(mma_kv, rP(_, _, kb), dOt(_, _, kb), accV);
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(rdS); ++kb) cute::gemm(mma_kv, rdS(_, _, kb), Qt(_, _, kb), accK);
  warpgroup_commit_batch();
  warpgroup_fence_operand(accV);
  warpgroup_fence_operand(accK);
}

// A consumer warpgroup's products over one key block, in both backwards
// (the KV-outer kernel below; dense: dense_attention_bwd_kernel.hpp):
// warpgroup w owns keys [64w, 64w + 64). The S^T / dP^T and dV / dK tiled
// MMAs, their shared-memory operand fragments (K_w, V_w; Q, dO by stage and
// their transposed views), the accumulators and the register A operands
// P^T, dS^T. Each backward adds its own dQ product.
template <class Traits>
struct KeyBlockProducts {
  using Element = typename Traits::Element;
  using MmaSdP = typename Traits::MmaSdP;
  using MmaKV = typename Traits::MmaKV;
  using TileS = Shape<_64, Int<Traits::kRows>>;
  using TileKV = Shape<_64, Int<Traits::kD>>;
  template <class Layout>
  using Smem = decltype(make_tensor(make_smem_ptr(std::declval<Element*>()), Layout{}));
  template <class Layout, class Tile>
  using SmemW = decltype(local_tile(std::declval<Smem<Layout>>(), Tile{}, make_coord(0, _0{})));
  template <class Mma>
  using Thr = decltype(std::declval<Mma>().get_thread_slice(0));
  using SmemKVw = SmemW<typename Traits::SmemLayoutKV, TileKV>;
  using AccS = decltype(partition_fragment_C(std::declval<MmaSdP>(), TileS{}));
  using OperandLayout = decltype(acc_to_operand_a(std::declval<AccS>().layout()));

  MmaSdP mma_s;
  MmaKV mma_kv;  // accumulates
  decltype(std::declval<Thr<MmaSdP>>().partition_fragment_A(std::declval<SmemKVw>()))
      tSrK, tSrV;  // (MMA, 1, D/16)
  decltype(std::declval<Thr<MmaSdP>>().partition_fragment_B(
      std::declval<Smem<typename Traits::SmemLayoutQ>>())) tSrQ, tSrO;  // (MMA, 1, D/16, stage)
  decltype(std::declval<Thr<MmaKV>>().partition_fragment_B(
      std::declval<Smem<typename Traits::SmemLayoutQt>>())) tKrQt, tKrOt;  // (MMA, 1, rows/16, stage)
  AccS accS;  // S^T, then P^T
  AccS accP;  // dP^T, then dS^T
  decltype(partition_fragment_C(std::declval<MmaKV>(), TileKV{})) accV, accK;
  decltype(make_tensor<Element>(OperandLayout{})) rP, rdS;

  __device__ KeyBlockProducts(typename Traits::SharedStorage& ss, int w, int tid) {
    mma_kv.accumulate_ = GMMA::ScaleOut::One;
    auto thr_s = mma_s.get_thread_slice(tid);
    auto thr_kv = mma_kv.get_thread_slice(tid);
    const auto coord = make_coord(w, _0{});
    using KV = typename Traits::SmemLayoutKV;
    tSrK = thr_s.partition_fragment_A(local_tile(smem(ss.k, KV{}), TileKV{}, coord));
    tSrV = thr_s.partition_fragment_A(local_tile(smem(ss.v, KV{}), TileKV{}, coord));
    tSrQ = thr_s.partition_fragment_B(smem(ss.q, typename Traits::SmemLayoutQ{}));
    tSrO = thr_s.partition_fragment_B(smem(ss.dout, typename Traits::SmemLayoutQ{}));
    tKrQt = thr_kv.partition_fragment_B(smem(ss.q, typename Traits::SmemLayoutQt{}));
    tKrOt = thr_kv.partition_fragment_B(smem(ss.dout, typename Traits::SmemLayoutQt{}));
  }

  template <class X, class Layout>
  __device__ static auto smem(X* x, Layout layout) {
    return make_tensor(make_smem_ptr(x), layout);
  }

  // The accumulators seen as rows x columns (rowmax_epilogue.hpp).
  __device__ auto s_rows() { return make_tensor(accS.data(), rowcol_layout(accS.layout())); }
  __device__ auto p_rows() { return make_tensor(accP.data(), rowcol_layout(accP.layout())); }
};

// The KV-outer backward's dQ: dQ_w = dS K_c[:, 64w..] (tile rows along M),
// A = the shared dS by buffer, B = K_c^T's dims [64w, 64w + 64).
template <class Traits>
struct KeyBlockFragments : KeyBlockProducts<Traits> {
  using Base = KeyBlockProducts<Traits>;
  using MmaDq = typename Traits::MmaDq;
  using TileDq = Shape<Int<Traits::kRows>, _64>;
  using SmemKtw = typename Base::template SmemW<typename Traits::SmemLayoutKt,
                                                Shape<_64, Int<Traits::kKeys>>>;
  MmaDq mma_dq;
  decltype(std::declval<typename Base::template Thr<MmaDq>>().partition_fragment_A(
      std::declval<typename Base::template Smem<typename Traits::SmemLayoutDs>>()))
      tQrDs;  // (MMA, 1, keys/16, buffer)
  decltype(std::declval<typename Base::template Thr<MmaDq>>().partition_fragment_B(
      std::declval<SmemKtw>())) tQrKt;  // (MMA, 1, keys/16)
  decltype(partition_fragment_C(std::declval<MmaDq>(), TileDq{})) accQ;

  __device__ KeyBlockFragments(typename Traits::SharedStorage& ss, int w, int tid) : Base(ss, w, tid) {
    auto thr_dq = mma_dq.get_thread_slice(tid);
    tQrDs = thr_dq.partition_fragment_A(Base::smem(ss.ds, typename Traits::SmemLayoutDs{}));
    tQrKt = thr_dq.partition_fragment_B(local_tile(Base::smem(ss.k, typename Traits::SmemLayoutKt{}),
                                                   Shape<_64, Int<Traits::kKeys>>{},
                                                   make_coord(w, _0{})));
  }

  __device__ auto q_rows() { return make_tensor(accQ.data(), rowcol_layout(accQ.layout())); }
};

// Consumer schedule: a warpgroup queues the next tile's S^T product behind
// the current tile's dV / dK products (and its dP^T right after them), so
// that its own softmax step is the only time it leaves the tensor cores idle.
// The two consumer warpgroups take turns to issue their products (two named
// barriers), so that one's softmax runs while the other's products run
// instead of both waiting on the tensor cores together.
// red.global.add of two consecutive floats (sm_90 vector reduction).
__device__ __forceinline__ void red_add_v2(float* addr, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
}

// kFusedDq: also dQ (see sparse_bwd_traits.hpp). Warpgroup 1 (the second in
// every turn) issues the dQ of tile t in its turn t, warpgroup 0 in its turn
// t + 1 (when warpgroup 1's half of dS(t) is in shared memory), or, for the
// last tile of a segment (K_c is replaced after it), in its last turn after a
// named barrier on warpgroup 1's dS. Three dS buffers: buffer t % 3 is
// rewritten (tile t + 3) only after both warpgroups have taken a turn past
// the ones that read it, i.e. after their waits on those dQ products.
template <class Traits, bool kFusedDq>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    dkdv_kernel(const __grid_constant__ DkdvParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kStages = Traits::kStages;
  extern __shared__ __align__(1024) char dkdv_smem[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(dkdv_smem);

  if (p.gate.closed()) return;
  const Geometry& geo = p.geo;
  const IndexView ix(const_cast<int32_t*>(p.index), geo);
  const int64_t total = ix.header[0];
  if (total == 0) return;
  const int64_t chunk = tile_share(total, p.ctas);
  const int64_t T0 = blockIdx.x * chunk;
  if (T0 >= total) return;
  const int64_t T1 = min(T0 + chunk, total);
  SegmentWalker walker = kv_outer::make_walker(ix, geo.nbkt, T0, T1);

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    ClusterBarrier::init(&ss.kv_full, 1);
    ClusterBarrier::init(&ss.kv_empty, 256);
    for (int s = 0; s < kStages; ++s) {
      ClusterBarrier::init(&ss.full[s], 128);
      ClusterBarrier::init(&ss.empty[s], 256);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int64_t G = geo.G;
  const int64_t tpt = geo.tpt;

  if (warpgroup == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<kFusedDq ? 24 : 40>();
    const int t = threadIdx.x;
    const RowGather gather(t, G);
    const int row = gather.row;
    const int slot = gather.slot;
    Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
    Tensor sO = make_tensor(make_smem_ptr(ss.dout), typename Traits::SmemLayoutQ{});
    if (t == 0) {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
    }
    int64_t it = 0;
    int seg = 0;
    while (walker.next()) {
      const int64_t k = walker.bucket;
      const auto [b, g, c] = Bucket(geo, k);
      if (t == 0) {
        if (seg > 0) ClusterBarrier::wait(&ss.kv_empty, (seg - 1) & 1);
        ClusterTransactionBarrier::arrive_and_expect_tx(&ss.kv_full, 2 * Traits::kBytesKV);
        load_kv_block<Traits>(p.tma_k, geo.Sk, geo.Hkv, geo.B, b, g, c, ss.k, ss.kv_full);
        load_kv_block<Traits>(p.tma_v, geo.Sk, geo.Hkv, geo.B, b, g, c, ss.v, ss.kv_full);
      }
      const int64_t count = ix.count[k];
      const int32_t* bucket = ix.entries + ix.entry_start[k];
      for (int64_t tile = walker.tile_begin; tile < walker.tile_end; ++tile, ++it) {
        const int stage = static_cast<int>(it % kStages);
        ClusterBarrier::wait(&ss.empty[stage], static_cast<uint32_t>(((it / kStages) & 1) ^ 1));
        const int64_t entry = tile * tpt + slot;
        const bool valid = slot < tpt && entry < count;
        const int64_t token = valid ? bucket[entry] : 0;
        const int64_t qrow = (b * geo.Sq + token) * geo.Hq + g * G + gather.head;
        gather.copy(stage, valid, row_source(sQ, p.q + qrow * kHeadDim),
                    row_source(sO, p.dout + qrow * kHeadDim));
        if (gather.half == 0) {
          cp_async_4z(&ss.lse[stage][row], p.lse + qrow, valid);
          cp_async_4z(&ss.token[stage][row], bucket + (valid ? entry : 0), valid);
        } else {
          cp_async_4z(&ss.delta[stage][row], p.delta + qrow, valid);
        }
        cutlass::arch::cpasync_barrier_arrive_noinc(&ss.full[stage]);
      }
      ++seg;
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<kFusedDq ? 240 : 232>();
  const int w = warpgroup - 1;  // keys [64w, 64w + 64) of the block
  const int tid = threadIdx.x % 128;
  KeyBlockFragments<Traits> f(ss, w, tid);
  auto thr_s = f.mma_s.get_thread_slice(tid);
  auto thr_kv = f.mma_kv.get_thread_slice(tid);
  auto thr_dq = f.mma_dq.get_thread_slice(tid);
  Tensor accS_rc = f.s_rows();
  Tensor accP_rc = f.p_rows();
  Tensor accQ_rc = f.q_rows();
  using TileKV = typename decltype(f)::TileKV;
  Tensor cS = thr_s.partition_C(make_identity_tensor(typename decltype(f)::TileS{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  Tensor cQ = thr_dq.partition_C(make_identity_tensor(typename decltype(f)::TileDq{}));
  Tensor cQ_rc = make_tensor(cQ.data(), rowcol_layout(cQ.layout()));
  constexpr int kKeyRows = decltype(size<0>(accS_rc))::value;  // 2
  constexpr int kCols = decltype(size<1>(accS_rc))::value;     // 16
  // Fused dQ: dS (row, key, buffer) in shared memory (f.tQrDs, f.tQrKt: this
  // warpgroup's dims [64w, 64w + 64) of dQ = dS K_c).
  Tensor sDs = make_tensor(make_smem_ptr(ss.ds), typename Traits::SmemLayoutDs{});
  // dK += dS^T Q with dS^T from the dS buffer (keys [64w, 64w + 64)).
  typename Traits::MmaKVss mma_kss;
  mma_kss.accumulate_ = GMMA::ScaleOut::One;
  auto thr_kss = mma_kss.get_thread_slice(tid);
  Tensor sDsT = make_tensor(make_smem_ptr(ss.ds), typename Traits::SmemLayoutDsT{});
  Tensor sDsTw = local_tile(sDsT, Shape<_64, Int<kTileRows>, Int<Traits::kDsBufs>>{},
                            make_coord(w, _0{}, _0{}));  // (64 keys, rows, buffer)
  Tensor tKsDsT = thr_kss.partition_fragment_A(sDsTw);  // (MMA, 1, rows/16, buffer)
  Tensor tKsQt = thr_kss.partition_fragment_B(  // (MMA, 1, rows/16, stage)
      make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQt{}));
  constexpr int kQRows = decltype(size<0>(accQ_rc))::value;  // 2
  constexpr int kQCols = decltype(size<1>(accQ_rc))::value;  // 16
  constexpr int kDsReady = 2;  // named barrier: warpgroup 1's dS of a segment's last tile
  int32_t tok_cur[kQRows], tok_prev[kQRows];  // query of this thread's dQ rows (-1: none)
  int64_t head_row[kQRows];                  // their head among the Hq heads

  const float scale_log2 = p.scale * kLog2e;
  int64_t it = 0;
  int seg = 0;

  auto gemm_s = [&](int stage) {
    gemm_overwrite(f.mma_s, f.tSrK, f.tSrQ(_, _, _, stage), f.accS);
  };
  auto gemm_dp = [&](int stage) {
    gemm_overwrite(f.mma_s, f.tSrV, f.tSrO(_, _, _, stage), f.accP);
  };
  auto issue_sdp = [&](int stage) {
    warpgroup_fence_operand(f.accS);
    warpgroup_fence_operand(f.accP);
    warpgroup_arrive();
    gemm_s(stage);
    gemm_dp(stage);
    warpgroup_commit_batch();
    warpgroup_fence_operand(f.accS);
    warpgroup_fence_operand(f.accP);
  };
  auto issue_s = [&](int stage) {
    warpgroup_fence_operand(f.accS);
    warpgroup_arrive();
    gemm_s(stage);
    warpgroup_commit_batch();
    warpgroup_fence_operand(f.accS);
  };
  auto issue_dp = [&](int stage) {
    warpgroup_fence_operand(f.accP);
    warpgroup_arrive();
    gemm_dp(stage);
    warpgroup_commit_batch();
    warpgroup_fence_operand(f.accP);
  };
  auto issue_kv = [&](int stage) {
    issue_dv_dk(f.mma_kv, f.rP, f.rdS, f.tKrOt(_, _, _, stage), f.tKrQt(_, _, _, stage), f.accV,
                f.accK);
    warpgroup_fence_operand(f.rP);
    warpgroup_fence_operand(f.rdS);
  };
  // dV, dK of `stage` and dQ of dS buffer `buf`, one commit group.
  // (dS^T of this tile in buffer `own`.)
  auto issue_kv_dq = [&](int stage, int own, int buf) {
    warpgroup_fence_operand(f.rP);
    warpgroup_fence_operand(f.accV);
    warpgroup_fence_operand(f.accK);
    warpgroup_fence_operand(f.accQ);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(f.rP); ++kb) {
      cute::gemm(f.mma_kv, f.rP(_, _, kb), f.tKrOt(_, _, kb, stage), f.accV);
    }
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tKsDsT); ++kb) {
      cute::gemm(mma_kss, tKsDsT(_, _, kb, own), tKsQt(_, _, kb, stage), f.accK);
    }
    gemm_overwrite(f.mma_dq, f.tQrDs(_, _, _, buf), f.tQrKt, f.accQ);
    warpgroup_commit_batch();
    warpgroup_fence_operand(f.accV);
    warpgroup_fence_operand(f.accK);
    warpgroup_fence_operand(f.accQ);
    warpgroup_fence_operand(f.rP);
  };
  auto issue_dq = [&](int buf) {
    warpgroup_fence_operand(f.accQ);
    warpgroup_arrive();
    gemm_overwrite(f.mma_dq, f.tQrDs(_, _, _, buf), f.tQrKt, f.accQ);
    warpgroup_commit_batch();
    warpgroup_fence_operand(f.accQ);
  };
  // dq_accum[row] += dQ_w for this thread's rows (skipping rows without a query).
  auto reduce_dq = [&](const int64_t b, const int32_t (&tok)[kQRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kQRows; ++r) {
      if (tok[r] >= 0) {
        float* dst = p.dq_accum + ((b * geo.Sq + tok[r]) * geo.Hq + head_row[r]) * kHeadDim + 64 * w;
        CUTE_UNROLL
        for (int j = 0; j < kQCols; j += 2) {
          red_add_v2(dst + get<1>(cQ_rc(r, j)), accQ_rc(r, j), accQ_rc(r, j + 1));
        }
      }
    }
  };
  auto wait_full = [&](int64_t i) {
    ClusterBarrier::wait(&ss.full[i % kStages], static_cast<uint32_t>((i / kStages) & 1));
    cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) -> wgmma
  };

  // Turns: named barrier w is warpgroup w's; warpgroup 0 goes first.
  auto take_turn = [&]() { cutlass::arch::NamedBarrier::sync(256, w); };
  auto pass_turn = [&](bool last) {
    if (!(last && w == 1)) cutlass::arch::NamedBarrier::arrive(256, 1 - w);
  };
  if (w == 1) cutlass::arch::NamedBarrier::arrive(256, 0);

  while (walker.next()) {
    const int64_t k = walker.bucket;
    const auto [b, g, c] = Bucket(geo, k);
    const int64_t q_len = clamp_len(p.q_lengths, b, geo.Sq);
    const int64_t kv_len = clamp_len(p.kv_lengths, b, geo.Sk);
    const int64_t count = ix.count[k];
    const int64_t b_row = b;  // (lambdas cannot capture structured bindings in C++17)
    // Key j of this thread's row r is visible to query i iff j <= offset + i,
    // i.e. key_rel[r] <= i with key_rel = j - offset.
    int key_rel[kKeyRows];
    CUTE_UNROLL
    for (int r = 0; r < kKeyRows; ++r) {
      key_rel[r] = static_cast<int>(c * kBlock + 64 * w + get<0>(cS_rc(r, 0)) - (kv_len - q_len));
    }
    clear(f.accV);
    clear(f.accK);
    if constexpr (kFusedDq) {
      CUTE_UNROLL
      for (int r = 0; r < kQRows; ++r) head_row[r] = g * G + get<0>(cQ_rc(r, 0)) % G;
    }
    ClusterBarrier::wait(&ss.kv_full, seg & 1);

    auto softmax_grad = [&](int64_t tile, int stage) {
      const int rows_valid = static_cast<int>(min<int64_t>(tpt, count - tile * tpt) * G);
      CUTE_UNROLL
      for (int j = 0; j < kCols; ++j) {
        const int n = get<1>(cS_rc(0, j));
        const int32_t token = ss.token[stage][n];
        const float lse = ss.lse[stage][n];
        const float dlt = ss.delta[stage][n];
        const float neg_lse = lse == -INFINITY ? -INFINITY : -lse * kLog2e;
        const bool row_ok = n < rows_valid;
        CUTE_UNROLL
        for (int r = 0; r < kKeyRows; ++r) {
          const bool visible = row_ok && key_rel[r] <= token;
          const float pr = fast_exp2(visible ? fmaf(accS_rc(r, j), scale_log2, neg_lse) : -INFINITY);
          accS_rc(r, j) = pr;
          accP_rc(r, j) = pr * (accP_rc(r, j) - dlt);
        }
      }
      // Same register order: element e of the accumulator is element e of the operand.
      CUTE_UNROLL
      for (int e = 0; e < size(f.accS); ++e) {
        f.rP.data()[e] = static_cast<Element>(f.accS.data()[e]);
        if constexpr (!kFusedDq) f.rdS.data()[e] = static_cast<Element>(f.accP.data()[e]);
      }
      if constexpr (kFusedDq) {
        // dS^T -> dS buffer `it % 3` (keys [64w, 64w + 64)); pairs of rows are
        // adjacent (the swizzle moves 16-byte units).
        const int buf = static_cast<int>(it % Traits::kDsBufs);
        store_ds_t<Element>(accP_rc, cS_rc, sDs, 64 * w, buf);
        cutlass::arch::fence_view_async_shared();  // generic stores -> wgmma reads
        CUTE_UNROLL
        for (int r = 0; r < kQRows; ++r) {
          const int n = get<0>(cQ_rc(r, 0));
          tok_cur[r] = n < rows_valid ? ss.token[stage][n] : -1;
        }
      }
    };

    // Per tile: S^T, dP^T -> P^T, dS^T (registers) -> dV, dK, with the next
    // tile's S^T, dP^T issued behind this tile's dV, dK.
    // Registers in flight at most: dK, dV (128) + P^T, dS^T (32) + S^T (32).
    wait_full(it);
    take_turn();
    issue_sdp(static_cast<int>(it % kStages));
    pass_turn(false);
    warpgroup_wait<0>();
    // Fused dQ, branch free around the products (a wgmma in a divergent path
    // serialises them all): every turn issues one dQ, of dS buffer `buf`;
    // warpgroup 0's first one in a segment has no tile and is dropped (its
    // tokens are -1), as is warpgroup 1's extra one at the segment's end.
    if constexpr (kFusedDq) {
      CUTE_UNROLL
      for (int r = 0; r < kQRows; ++r) tok_prev[r] = -1;
    }
    const int lag = 1 - w;  // warpgroup 0 issues the dQ of the previous tile
    auto dq_buf = [&](int64_t i) { return static_cast<int>((i + Traits::kDsBufs) % Traits::kDsBufs); };
    auto issue_turn = [&](int stage) {
      if constexpr (kFusedDq) {
        issue_kv_dq(stage, dq_buf(it), dq_buf(it - lag));
      } else {
        issue_kv(stage);
      }
    };
    // The dQ rows of this turn's dQ (warpgroup 1: this tile, 0: the previous one).
    auto reduce_turn = [&]() {
      if constexpr (kFusedDq) {
        int32_t tok[kQRows];
        CUTE_UNROLL
        for (int r = 0; r < kQRows; ++r) tok[r] = w == 1 ? tok_cur[r] : tok_prev[r];
        reduce_dq(b_row, tok);
        CUTE_UNROLL
        for (int r = 0; r < kQRows; ++r) tok_prev[r] = tok_cur[r];
      }
    };
    int64_t tile = walker.tile_begin;
    for (; tile + 1 < walker.tile_end; ++tile, ++it) {
      const int stage = static_cast<int>(it % kStages);
      const int next = static_cast<int>((it + 1) % kStages);
      softmax_grad(tile, stage);
      take_turn();
      issue_turn(stage);
      wait_full(it + 1);
      issue_s(next);
      warpgroup_wait<1>();  // dV / dK (and dQ) of this turn done
      ClusterBarrier::arrive(&ss.empty[stage]);
      reduce_turn();
      issue_dp(next);
      pass_turn(false);
      warpgroup_wait<0>();
    }
    const int stage = static_cast<int>(it % kStages);
    softmax_grad(tile, stage);
    if constexpr (kFusedDq) {
      if (w == 1) cutlass::arch::NamedBarrier::arrive(256, kDsReady);
    }
    take_turn();
    issue_turn(stage);
    if constexpr (kFusedDq) {
      // Warpgroup 0: the dQ of the last tile once warpgroup 1's dS is in
      // (warpgroup 1: a dropped one).
      warpgroup_wait<0>();
      reduce_turn();
      if (w == 0) cutlass::arch::NamedBarrier::sync(256, kDsReady);
      issue_dq(dq_buf(it));
    }
    pass_turn(walker.T >= walker.T1);  // the CTA's last turn: nobody takes the next
    warpgroup_wait<0>();
    ClusterBarrier::arrive(&ss.empty[stage]);
    if constexpr (kFusedDq) {
      int32_t tok[kQRows];
      CUTE_UNROLL
      for (int r = 0; r < kQRows; ++r) tok[r] = w == 0 ? tok_cur[r] : -1;
      reduce_dq(b_row, tok);
    }
    ++it;
    ClusterBarrier::arrive(&ss.kv_empty);  // K_c, V_c no longer read

    // Epilogue: dK = scale * sum dS^T Q, dV = sum P^T dO.
    if (walker.whole) {
      store_dkdv<Element>(f.accK, f.accV, thr_kv, p.dk, p.dv, geo.Sk, geo.Hkv, b, g,
                          c * kBlock + 64 * w, p.scale);
    } else {
      Tensor cKV = thr_kv.partition_C(make_identity_tensor(TileKV{}));
      Tensor cKV_rc = make_tensor(cKV.data(), rowcol_layout(cKV.layout()));
      Tensor accV_rc = make_tensor(f.accV.data(), rowcol_layout(f.accV.layout()));
      Tensor accK_rc = make_tensor(f.accK.data(), rowcol_layout(f.accK.layout()));
      const int64_t slot = 2 * int64_t{blockIdx.x} + (seg == 0 ? 0 : 1);
      float* out_k = p.partial + slot * kSlotFloats;
      float* out_v = out_k + kBlock * kHeadDim;
      CUTE_UNROLL
      for (int r = 0; r < size<0>(accV_rc); ++r) {
        const int key = 64 * w + get<0>(cKV_rc(r, 0));
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accV_rc); j += 2) {
          const int d = get<1>(cKV_rc(r, j));
          *reinterpret_cast<float2*>(out_k + key * kHeadDim + d) =
              make_float2(accK_rc(r, j) * p.scale, accK_rc(r, j + 1) * p.scale);
          *reinterpret_cast<float2*>(out_v + key * kHeadDim + d) =
              make_float2(accV_rc(r, j), accV_rc(r, j + 1));
        }
      }
    }
    ++seg;
  }
#endif
}

// Per bucket: zeros (no tile), the fixed-order sum of its partial slots (split
// between CTAs) or nothing (written whole by its CTA).
template <class Element>
__global__ void __launch_bounds__(256) finish_kernel(const int32_t* index, const float* partial,
                                                     Element* dk, Element* dv, Geometry geo,
                                                     int ctas) {
  const IndexView ix(const_cast<int32_t*>(index), geo);
  const int64_t k = blockIdx.x;
  const auto [b, g, c] = Bucket(geo, k);
  const int64_t ts0 = ix.tile_start[k], ts1 = ix.tile_start[k + 1];
  int64_t s0 = 0, s1 = -1, chunk = 1;
  if (ts1 > ts0) {
    const int64_t total = ix.header[0];
    chunk = tile_share(total, ctas);
    s0 = ts0 / chunk;
    s1 = (ts1 - 1) / chunk;
    if (s0 == s1) return;  // whole: written by its CTA
  }
  const int64_t rows = min<int64_t>(kBlock, geo.Sk - c * kBlock);
  for (int64_t e = threadIdx.x * 4; e < rows * kHeadDim; e += blockDim.x * 4) {
    const int64_t key = e / kHeadDim;
    const int64_t d = e - key * kHeadDim;
    float4 sk = make_float4(0.f, 0.f, 0.f, 0.f), sv = sk;
    for (int64_t s = s0; s <= s1; ++s) {
      const int64_t slot = ts0 <= s * chunk ? 2 * s : 2 * s + 1;
      const float* src = partial + slot * kSlotFloats + e;
      const float4 a = *reinterpret_cast<const float4*>(src);
      const float4 v = *reinterpret_cast<const float4*>(src + kBlock * kHeadDim);
      sk.x += a.x; sk.y += a.y; sk.z += a.z; sk.w += a.w;
      sv.x += v.x; sv.y += v.y; sv.z += v.z; sv.w += v.w;
    }
    const int64_t at = ((b * geo.Sk + c * kBlock + key) * geo.Hkv + g) * kHeadDim + d;
    *reinterpret_cast<uint2*>(dk + at) = make_uint2(pack2<Element>(sk.x, sk.y), pack2<Element>(sk.z, sk.w));
    *reinterpret_cast<uint2*>(dv + at) = make_uint2(pack2<Element>(sv.x, sv.y), pack2<Element>(sv.z, sv.w));
  }
}

// Fused dQ: zeroes dq_accum before the dK / dV pass (a kernel rather than a
// memset so that the gate skips it when the query-outer dQ runs instead).
static __global__ void __launch_bounds__(256) dq_zero_kernel(float4* __restrict__ acc, int64_t n4,
                                                      ScheduleGate gate) {
  if (gate.closed()) return;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n4;
       e += gridDim.x * int64_t{blockDim.x}) {
    acc[e] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// Fused dQ: dq = scale * dq_accum in q's dtype, zeros for rows past q_len.
// 8 elements per thread.
template <class Element>
__global__ void __launch_bounds__(256) dq_convert_kernel(const float* __restrict__ acc,
                                                         const int32_t* __restrict__ q_lengths,
                                                         Element* __restrict__ dq, int64_t n8,
                                                         int64_t Sq, int64_t Hq, float scale,
                                                         ScheduleGate gate) {
  if (gate.closed()) return;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n8;
       e += gridDim.x * int64_t{blockDim.x}) {
    const int64_t row = e / (kHeadDim / 8);
    const int64_t b = row / (Sq * Hq);
    const int64_t i = (row / Hq) % Sq;
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    if (i < clamp_len(q_lengths, b, Sq)) {
      const float4 x = reinterpret_cast<const float4*>(acc)[2 * e];
      const float4 y = reinterpret_cast<const float4*>(acc)[2 * e + 1];
      out = make_uint4(pack2<Element>(x.x * scale, x.y * scale), pack2<Element>(x.z * scale, x.w * scale),
                       pack2<Element>(y.x * scale, y.y * scale), pack2<Element>(y.z * scale, y.w * scale));
    }
    reinterpret_cast<uint4*>(dq)[e] = out;
  }
}


// ---------------------------------------------------------------------------
// Host side: launchers.

// CTAs of the dK/dV kernel: one wave (at most kMaxCtas), fewer for tiny problems.
inline int dkdv_ctas(const Geometry& geo) {
  const int64_t n = std::min<int64_t>(kMaxCtas, geo.tiles_bound);
  return static_cast<int>(std::min<int64_t>(n, cuda::multiprocessor_count(kMaxCtas)));
}

// dK / dV (and with dq_accum the fused dQ) over the block index, then the
// split buckets' sums and dq. With `costs` (and dq_accum), both dK / dV
// kernels are enqueued behind complementary gates: the fused one unless the
// query-outer dQ wins.
template <class Element>
cudaError_t dkdv(const cuda::SparseAttentionArgs& a, const float* lse, const void* dout,
                 const float* delta, const int32_t* index, float* partial, float* dq_accum,
                 void* dq, void* dk, void* dv, cudaStream_t stream,
                 const ScheduleCosts* costs) {
  using Traits = SparseBwdTraits<Element>;
  const Geometry geo(a);
  const ScheduleGate fused_gate{costs, a.Hq / a.Hkv, false, kDqQueryOverBlockCost, false};
  const int64_t dq_elems = a.B * a.Sq * a.Hq * kHeadDim;
  if (dq_accum != nullptr && dq_elems > 0) {
    const int64_t n4 = dq_elems / 4;  // D = 128: whole float4s, 16-byte aligned (checked)
    const int64_t grid = std::min<int64_t>((n4 + 255) / 256, 132 * 8);
    dq_zero_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        reinterpret_cast<float4*>(dq_accum), n4, fused_gate);
    cudaError_t st = cudaGetLastError();
    if (st != cudaSuccess) return st;
  }
  auto convert = [&]() -> cudaError_t {
    if (dq_accum == nullptr || dq_elems == 0) return cudaSuccess;
    const int64_t n8 = dq_elems / 8;
    const int64_t grid = std::min<int64_t>((n8 + 255) / 256, 132 * 8);
    dq_convert_kernel<Element><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        dq_accum, a.q_lengths, static_cast<Element*>(dq), n8, a.Sq, a.Hq, a.scale, fused_gate);
    return cudaGetLastError();
  };
  if (geo.nbkt == 0) return convert();
  const int ctas = dkdv_ctas(geo);
  if (ctas > 0) {
    DkdvParams<Traits> p{
        make_tma_kv<Traits>(static_cast<const Element*>(a.k), static_cast<int>(a.Sk),
                            static_cast<int>(a.Hkv), static_cast<int>(a.B)),
        make_tma_kv<Traits>(static_cast<const Element*>(a.v), static_cast<int>(a.Sk),
                            static_cast<int>(a.Hkv), static_cast<int>(a.B)),
        static_cast<const Element*>(a.q),
        static_cast<const Element*>(dout),
        lse,
        delta,
        a.q_lengths,
        a.kv_lengths,
        index,
        partial,
        dq_accum,
        static_cast<Element*>(dk),
        static_cast<Element*>(dv),
        geo,
        a.scale,
        ctas,
        fused_gate};
    const auto run = [&](auto kernel, const DkdvParams<Traits>& params) {
      cudaError_t st = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            Traits::kSmemBytes);
      if (st != cudaSuccess) return st;
      kernel<<<ctas, Traits::kThreads, Traits::kSmemBytes, stream>>>(params);
      return cudaGetLastError();
    };
    cudaError_t st = dq_accum != nullptr ? run(dkdv_kernel<Traits, true>, p)
                                         : run(dkdv_kernel<Traits, false>, p);
    if (st != cudaSuccess) return st;
    if (dq_accum != nullptr && costs != nullptr) {  // the other way: dK / dV alone
      DkdvParams<Traits> alone = p;
      alone.dq_accum = nullptr;
      alone.gate.query = true;
      if ((st = run(dkdv_kernel<Traits, false>, alone)) != cudaSuccess) return st;
    }
  }
  finish_kernel<Element><<<static_cast<unsigned>(geo.nbkt), 256, 0, stream>>>(
      index, partial, static_cast<Element*>(dk), static_cast<Element*>(dv), geo, ctas);
  cudaError_t st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  return convert();
}


}  // namespace sparse_bwd
}  // namespace jax_msa::sm90
