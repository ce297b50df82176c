// The consumer side of the query-outer kernels (sparse_attention_fwd.cu,
// paged_attention.cu): issuing a warpgroup's two wgmma chains, and the order
// in which a tile walks its blocks.
#pragma once

#include <utility>

#include <cute/tensor.hpp>

#include "kernels/sm90/rowmax_epilogue.hpp"

namespace jax_msa::sm90 {

using namespace cute;

// A consumer warpgroup's operands of the query-outer forwards with
// SparseAttentionTraits-like `Traits` (sparse_attention_fwd.cu,
// dense_attention_fwd.cu): the two wgmma chains, Q and the ring's K and V as
// their shared-memory operands, the S and O accumulators, and P (S rounded)
// as the register A operand of O += P V. `tid` counts the consumer threads.
template <class Traits>
struct QueryOuterFragments {
  using Element = typename Traits::Element;
  using MmaS = typename Traits::MmaS;
  using MmaO = typename Traits::MmaO;
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kKeys>>;
  using TileO = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  template <class Layout>
  using Smem = decltype(make_tensor(make_smem_ptr(std::declval<Element*>()), Layout{}));
  using ThrS = decltype(std::declval<MmaS>().get_thread_slice(0));
  using ThrO = decltype(std::declval<MmaO>().get_thread_slice(0));

  MmaS mma_s;
  MmaO mma_o;
  // (MMA, 1, D/16), (MMA, 1, D/16, slot), (MMA, 1, keys/16, slot)
  decltype(std::declval<ThrS>().partition_fragment_A(
      std::declval<Smem<typename Traits::SmemLayoutQ>>())) tSrQ;
  decltype(std::declval<ThrS>().partition_fragment_B(
      std::declval<Smem<typename Traits::SmemLayoutRing>>())) tSrK;
  decltype(std::declval<ThrO>().partition_fragment_B(
      std::declval<Smem<typename Traits::SmemLayoutRingT>>())) tOrV;
  decltype(partition_fragment_C(std::declval<MmaS>(), TileS{})) accS;
  decltype(partition_fragment_C(std::declval<MmaO>(), TileO{})) accO;
  decltype(make_tensor<Element>(partition_shape_A(std::declval<MmaO>(), TileS{}))) tOrP;

  __device__ QueryOuterFragments(Element* q, Element* ring, int tid)
      : tSrQ(mma_s.get_thread_slice(tid).partition_fragment_A(
            make_tensor(make_smem_ptr(q), typename Traits::SmemLayoutQ{}))),
        tSrK(mma_s.get_thread_slice(tid).partition_fragment_B(
            make_tensor(make_smem_ptr(ring), typename Traits::SmemLayoutRing{}))),
        tOrV(mma_o.get_thread_slice(tid).partition_fragment_B(
            make_tensor(make_smem_ptr(ring), typename Traits::SmemLayoutRingT{}))),
        accS(partition_fragment_C(mma_s, TileS{})),
        accO(partition_fragment_C(mma_o, TileO{})),
        tOrP(make_tensor<Element>(partition_shape_A(mma_o, TileS{}))) {}

  // The accumulators seen as rows x columns (rowmax_epilogue.hpp).
  __device__ auto s_rows() { return make_tensor(accS.data(), rowcol_layout(accS.layout())); }
  __device__ auto o_rows() { return make_tensor(accO.data(), rowcol_layout(accO.layout())); }
};

// acc = A B over the k blocks of the fragments (MMA, 1, k): one wgmma batch,
// committed, not waited for.
template <class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void issue_product(Mma& mma, const FragA& a, const FragB& b, Acc& acc) {
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// acc += A B with A in registers (e.g. O += P V): one wgmma batch, committed.
template <class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void issue_accumulate(Mma& mma, FragA& a, const FragB& b, Acc& acc) {
  warpgroup_fence_operand(a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  CUTE_UNROLL
  for (int k = 0; k < size<2>(b); ++k) cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
  warpgroup_commit_batch();
}

// A tile's walk over its `blocks` blocks: S_u = Q K_u^T is issued together
// with O += P_{u-1} V_{u-1}, so that the softmax of S_u runs while the tensor
// cores still work on P_{u-1} V_{u-1}. issue_s() / issue_pv() wait for their
// block and issue its product, returning the ring slot; s_done(slot, u) runs
// once S_u is complete (it frees the K slot), pv_done(slot) once the P V
// product is; softmax() turns S_u into P_u, convert() rescales O and makes
// P_u the A operand of the next P V.
template <class IssueS, class IssuePV, class SDone, class PVDone, class Softmax, class Convert>
__device__ __forceinline__ void walk_blocks(int blocks, IssueS issue_s, IssuePV issue_pv,
                                            SDone s_done, PVDone pv_done, Softmax softmax,
                                            Convert convert) {
  if (blocks <= 0) return;
  int k_slot = issue_s();
  warpgroup_wait<0>();
  s_done(k_slot, 0);
  softmax();
  convert();
  for (int u = 1; u < blocks; ++u) {
    k_slot = issue_s();
    const int v_slot = issue_pv();
    warpgroup_wait<1>();
    s_done(k_slot, u);
    softmax();
    warpgroup_wait<0>();
    pv_done(v_slot);
    convert();
  }
  const int v_slot = issue_pv();
  warpgroup_wait<0>();
  pv_done(v_slot);
}

// walk_blocks for a warpgroup that leaves out the blocks none of its rows
// selected (the sparse forward: the two warpgroups of a tile hold different
// tokens, whose unions differ). Every K and V of the ring is still taken and
// released in order, and a left-out block's V is released one step after its
// K, as a walked block's is, so that the warpgroup never holds more than two
// slots. take_k() waits for the next K and returns {slot, selected};
// take_v() waits for the next V and returns its slot; issue_s(slot) /
// issue_pv(slot) issue the products; s_done(slot, u, selected) and
// pv_done(slot, selected) release the slots (after the product, if any).
template <class TakeK, class TakeV, class IssueS, class IssuePV, class SDone, class PVDone,
          class Softmax, class Convert>
__device__ __forceinline__ void walk_selected_blocks(int blocks, TakeK take_k, TakeV take_v,
                                                     IssueS issue_s, IssuePV issue_pv,
                                                     SDone s_done, PVDone pv_done,
                                                     Softmax softmax, Convert convert) {
  if (blocks <= 0) return;
  auto [k_slot, selected] = take_k();
  if (selected) {
    issue_s(k_slot);
    warpgroup_wait<0>();
  }
  s_done(k_slot, 0, selected);
  if (selected) {
    softmax();
    convert();
  }
  bool previous = selected;  // block u - 1 was walked: P_{u-1} V_{u-1} is due
  // Each case issues and waits for its own products, so that no wgmma is in
  // flight across a branch (ptxas serialises wgmma where it cannot tell).
  for (int u = 1; u < blocks; ++u) {
    const auto k = take_k();
    k_slot = k.first;
    selected = k.second;
    if (selected && previous) {
      issue_s(k_slot);
      const int v_slot = take_v();
      issue_pv(v_slot);
      warpgroup_wait<1>();
      s_done(k_slot, u, true);
      softmax();
      warpgroup_wait<0>();
      pv_done(v_slot, true);
      convert();
    } else if (selected) {
      issue_s(k_slot);
      const int v_slot = take_v();
      warpgroup_wait<0>();
      s_done(k_slot, u, true);
      softmax();
      pv_done(v_slot, false);
      convert();
    } else if (previous) {
      const int v_slot = take_v();
      issue_pv(v_slot);
      s_done(k_slot, u, false);
      warpgroup_wait<0>();
      pv_done(v_slot, true);
    } else {
      const int v_slot = take_v();
      s_done(k_slot, u, false);
      pv_done(v_slot, false);
    }
    previous = selected;
  }
  const int v_slot = take_v();
  if (previous) {
    issue_pv(v_slot);
    warpgroup_wait<0>();
  }
  pv_done(v_slot, previous);
}

}  // namespace jax_msa::sm90
