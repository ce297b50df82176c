// dQ of block-sparse attention on SM90 (spec §3.4), query-outer: the
// tiling, producer and union of the forward (sparse_attention_fwd.cu), with Q
// and dO kept in shared memory. Per union block c:
//   S = Q K_c^T and dP = dO V_c^T (wgmma, shared memory operands),
//   P = exp2(S * scale * log2e - lse * log2e) under the row and causal masks,
//   dS = P * (dP - delta), dQ += dS K_c (wgmma, dS from registers, K_c seen
//   as the MN-major operand), and at the end dq = scale * dQ.
// Each row's dq is summed on chip in a fixed order: deterministic. dK and dV
// come from the KV-outer kernel (sparse_attention_bwd.cu).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/schedule_gate.hpp"
#include "kernels/sm90/sparse_attention_traits.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::sm90 {
namespace {

using namespace cute;

template <class Traits>
struct DqParams {
  TmaKV<Traits> tma_k, tma_v;
  SparseShape shape;
  const typename Traits::Element* q;
  const typename Traits::Element* dout;
  const float* lse;
  const float* delta;
  typename Traits::Element* dq;
  float scale_log2;  // scale * log2(e)
  float scale;
  ScheduleGate gate;  // the default backward: runs only where it beats the fused dQ
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    sparse_attention_dq_kernel(const __grid_constant__ DqParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kSlots = Traits::kSlots;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const SparseShape& s = p.shape;
  if (p.gate.closed()) return;

  init_tile_barriers<Traits>(ss);

  if (threadIdx.x / 128 == 0) {
    cutlass::arch::warpgroup_reg_dealloc<56>();
    if (threadIdx.x < 64) {  // warp 0 loads, warp 1 builds the unions
      produce_tiles<Traits, false>(ss, s, p.tma_k, p.tma_v, blockIdx.x, gridDim.x,
                                   [&](const SparseTile& tile, int64_t q_len) {
                                     load_tile_rows<Traits>(p.q, ss.rows[0], s, tile, q_len,
                                                            threadIdx.x);
                                     load_tile_rows<Traits>(p.dout, ss.rows[1], s, tile, q_len,
                                                            threadIdx.x);
                                   });
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<224>();
  const int tid = threadIdx.x - 128;
  Tensor sQ = make_tensor(make_smem_ptr(ss.rows[0]), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.rows[1]), typename Traits::SmemLayoutQ{});
  Tensor sKV = make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRing{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRingT{});

  typename Traits::MmaS mma_s;  // S = Q K^T and dP = dO V^T
  typename Traits::MmaO mma_q;  // dQ += dS K
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_q = mma_q.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);
  Tensor tSrdO = thr_s.partition_fragment_A(sdO);
  Tensor tSrKV = thr_s.partition_fragment_B(sKV);  // (MMA, 1, D/16, slot)
  Tensor tQrKt = thr_q.partition_fragment_B(sKt);  // (MMA, 1, keys/16, slot)
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kKeys>>;
  using TileQ = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  Tensor accS = partition_fragment_C(mma_s, TileS{});
  Tensor accdP = partition_fragment_C(mma_s, TileS{});
  Tensor accdQ = partition_fragment_C(mma_q, TileQ{});
  Tensor tQrdS = make_tensor<Element>(partition_shape_A(mma_q, TileS{}));  // dS as dQ's A operand
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accdP_rc = make_tensor(accdP.data(), rowcol_layout(accdP.layout()));
  Tensor accdQ_rc = make_tensor(accdQ.data(), rowcol_layout(accdQ.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  TileRows<kRowsPerThread> rows(tid);

  auto issue = [&](auto& acc, const auto& a_frag, int slot) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(a_frag); ++k) {
      cute::gemm(mma_s, a_frag(_, _, k), tSrKV(_, _, k, slot), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };

  const uint64_t own_tokens = warpgroup_tokens(tid / 128, static_cast<int>(s.group), s.tokens);

  uint32_t seq = 0;
  int64_t round = 0;
  for (int64_t index = blockIdx.x; index < s.tiles; index += gridDim.x, ++round) {
    const SparseTile tile(index, s.B, s.Hkv, s.chunks, s.tokens);
    const int64_t q_len = s.q_lengths[tile.b];
    const int64_t kv_len = s.kv_lengths[tile.b];
    rows.start(s, tile, q_len, kv_len);
    float lse_log2[kRowsPerThread], delta[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      const bool live = rows.token_of[r] >= 0 && tile.token0 + rows.token_of[r] < q_len;
      lse_log2[r] = live ? p.lse[rows.out_row[r]] * kLog2e : -INFINITY;
      delta[r] = live ? p.delta[rows.out_row[r]] : 0.0f;
    }
    clear(accdQ);

    ClusterBarrier::wait(&ss.q_full, static_cast<uint32_t>(round & 1));
    const int blocks = ss.tile_blocks;
    if (blocks == 0) ClusterBarrier::arrive(&ss.q_empty);
    for (int u = 0; u < blocks; ++u) {
      const int k_slot = static_cast<int>(seq % kSlots);
      const int v_slot = static_cast<int>((seq + 1) % kSlots);
      ClusterBarrier::wait(&ss.full[k_slot], (seq / kSlots) & 1);
      const int64_t c = ss.slot_block[k_slot];
      const uint64_t tokens = ss.slot_tokens[k_slot];
      // A block none of this warpgroup's tokens selected adds nothing to its
      // dQ: release K and V unread. (The vote shows ptxas that the branch is
      // uniform over the warp.)
      if (!__any_sync(0xFFFFFFFFu, (tokens & own_tokens) != 0)) {
        ClusterBarrier::wait(&ss.full[v_slot], ((seq + 1) / kSlots) & 1);
        seq += 2;
        ClusterBarrier::arrive(&ss.empty[v_slot]);
        ClusterBarrier::arrive(&ss.empty[k_slot]);
        if (u == blocks - 1) ClusterBarrier::arrive(&ss.q_empty);
        continue;
      }
      issue(accS, tSrQ, k_slot);
      ClusterBarrier::wait(&ss.full[v_slot], ((seq + 1) / kSlots) & 1);
      issue(accdP, tSrdO, v_slot);
      seq += 2;

      // P while dP is computed.
      warpgroup_wait<1>();
      warpgroup_fence_operand(accS);
      const int64_t key0 = c * Traits::kKeys;
      const bool partial = rows.partial(key0, Traits::kKeys);
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        const bool member = rows.member(r, tokens) && lse_log2[r] != -INFINITY;
        const int limit = rows.last_key[r] - static_cast<int>(key0);
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accS_rc); ++j) {
          const bool seen = member && (!partial || rows.column(j) <= limit);
          accS_rc(r, j) = seen ? fast_exp2(fmaf(accS_rc(r, j), p.scale_log2, -lse_log2[r])) : 0.0f;
        }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(accdP);
      ClusterBarrier::arrive(&ss.empty[v_slot]);
      if (u == blocks - 1) ClusterBarrier::arrive(&ss.q_empty);

      // dS = P (dP - delta), then dQ += dS K_c. A select, not a product, where
      // P is 0: a masked key's V row (e.g. padding past kv_len) may hold non-finite values.
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accS_rc); ++j) {
          const float prob = accS_rc(r, j);
          accS_rc(r, j) = prob != 0.0f ? prob * (accdP_rc(r, j) - delta[r]) : 0.0f;
        }
      }
      acc_to_operand(accS, tQrdS);
      warpgroup_fence_operand(tQrdS);
      warpgroup_fence_operand(accdQ);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tQrKt); ++k) {
        cute::gemm(mma_q, tQrdS(_, _, k), tQrKt(_, _, k, k_slot), accdQ);
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(accdQ);
      ClusterBarrier::arrive(&ss.empty[k_slot]);
    }

    // dq = scale * dQ; padded rows get zeros.
    store_scaled_rows<Traits::kD>(accdQ_rc, rows, p.dq, p.scale);
  }
#endif
}

template <class Element>
cudaError_t launch(const cuda::SparseAttentionArgs& a, const float* lse, const void* dout,
                   const float* delta, void* dq, cudaStream_t stream, ScheduleGate gate) {
  using Traits = SparseAttentionTraits<Element, 2>;
  const DqParams<Traits> p{
      make_tma_kv<Traits>(static_cast<const Element*>(a.k), a.Sk, a.Hkv, a.B),
      make_tma_kv<Traits>(static_cast<const Element*>(a.v), a.Sk, a.Hkv, a.B),
      make_sparse_shape<Traits>(a),
      static_cast<const Element*>(a.q),
      static_cast<const Element*>(dout),
      lse,
      delta,
      static_cast<Element*>(dq),
      a.scale * 1.4426950408889634f,
      a.scale,
      gate};
  return launch_persistent<Traits>(sparse_attention_dq_kernel<Traits>, p, stream);
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

cudaError_t sparse_attention_bwd_dq(DType dtype, const SparseAttentionArgs& a, const float* lse,
                                    const void* dout, const float* delta, void* dq,
                                    cudaStream_t stream, const ScheduleCosts* costs) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  const sm90::ScheduleGate gate{costs, a.Hq / a.Hkv, true, sm90::kDqQueryOverBlockCost, false};
  return dtype == DType::kBF16
             ? sm90::launch<cutlass::bfloat16_t>(a, lse, dout, delta, dq, stream, gate)
             : sm90::launch<cutlass::half_t>(a, lse, dout, delta, dq, stream, gate);
}

}  // namespace jax_msa::cuda
