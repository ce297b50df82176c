// Compile-time shape of the SM90 sparse-attention dK/dV kernel
// (sparse_attention_bwd.cu): tiles, shared-memory layouts, the wgmma tiled
// MMAs and the shared storage.
//
// One CTA = 3 warpgroups, KV-outer: a KV block c (128 keys x D = 128) of one
// (batch row, kv head) stays in shared memory while the CTA walks over the
// block's bucket of queries in tiles of kRows = 64 (token, head) rows.
//   warpgroup 0      producer: one thread loads K_c and V_c (TMA, once per
//                    bucket); all 128 threads gather the tile rows of Q and
//                    dO (and lse, delta, token ids) with cp.async into a
//                    kStages ring;
//   warpgroups 1, 2  consumers: warpgroup w owns keys [64w, 64w + 64) of the
//                    block and accumulates their dK, dV (64 x 128 fp32 each)
//                    in registers over all tiles.
// Per tile and warpgroup ("swapped" products, keys along M so that P^T and
// dS^T come out of the accumulators in the register layout of a wgmma A
// operand, with no trip through shared memory):
//   S^T  = K_w Q^T      (64 x 64 x 128, both operands from smem)
//   dP^T = V_w dO^T     (64 x 64 x 128, both operands from smem)
//   P^T  = exp2(S^T * scale * log2e - lse * log2e), masked
//   dS^T = P^T * (dP^T - delta)
//   dV_w += P^T dO      (64 x 128 x 64, A from registers, B = dO^T view: MN-major smem)
//   dK_w += dS^T Q      (64 x 128 x 64, A from registers, B = Q^T view: MN-major smem)
// With the fused dQ (the default, non-deterministic backward) each warpgroup
// also stores its dS^T into a shared (row, key) tile of the block (kDsBufs
// ring) and computes dims [64w, 64w + 64) of the tile's dQ over all 128 keys:
//   dQ_w = dS K_c[:, w]  (64 x 64 x 128, A = dS MN-major smem, B = K^T view: MN-major smem)
// reduced into a float32 accumulator in global memory (red.global.add).
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/sm90/kv_outer_gather.hpp"

namespace jax_msa::sm90 {

using namespace cute;

// What both backwards' consumer warpgroups share (kv_outer_bwd.hpp,
// KeyBlockProducts): a warpgroup's 64 keys against a tile of kRows_ rows.
template <class Element_, int kStages_, int kRows_ = block_index::kTileRows>
struct KeyBlockBwdShape : kv_outer::TileShape<Element_, kStages_, kRows_> {
  using Base = kv_outer::TileShape<Element_, kStages_, kRows_>;
  using typename Base::Element;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;
  using Base::kD;
  using Base::kKeys;
  using Base::kRows;
  using Base::kStages;

  // The (row, dim, stage) tiles seen as (dim, row, stage): the MN-major B
  // operand of the dK / dV products.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kD>, Int<kRows>, Int<kStages>>{},
                                 Stride<Int<kRows>, _1, Int<kRows * kD>>{})));
  // K_c seen as (dim, key): an MN-major operand of the dQ product.
  using SmemLayoutKt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kD>, Int<kKeys>>{}, Stride<Int<kKeys>, _1>{})));
  // (keys, rows, dim) products S^T and dP^T of one warpgroup.
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kRows>, Int<kD>>>(),
      Layout<Shape<_1, _1, _1>>{}));
  // (keys, dim, rows) products dV += P^T dO and dK += dS^T Q of one warpgroup.
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kRows>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));
};

// kStages Q / dO tiles in flight, kDsBufs_ dS buffers.
template <class Element_, int kStages_ = 3, int kDsBufs_ = 3>
struct SparseBwdTraits : KeyBlockBwdShape<Element_, kStages_> {
  using Base = KeyBlockBwdShape<Element_, kStages_>;
  using typename Base::Element;
  using typename Base::SmemLayoutKV;
  using typename Base::SmemLayoutQ;
  using Base::kD;
  using Base::kRows;
  using Base::kStages;

  // dS of a tile, (row, key, buffer), rows contiguous: written from the dS^T
  // accumulators (keys along M), read as the MN-major A operand of dQ.
  static constexpr int kDsBufs = kDsBufs_;
  using SmemLayoutDs = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kRows>, Int<Base::kKeys>, Int<kDsBufs>>{}));
  // (rows, dim half, keys) product dQ_w = dS K_c[:, w] of one warpgroup.
  using MmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, _64, Int<Base::kKeys>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));

  // The dS buffers seen as (key, row, buffer): rows contiguous, i.e. the
  // K-major A operand of dK += dS^T Q (fused dQ: dS^T is read from shared
  // memory instead of registers, which the dQ accumulator needs).
  using SmemLayoutDsT = decltype(composition(
      SmemLayoutDs{}, make_layout(Shape<Int<Base::kKeys>, Int<kRows>, Int<kDsBufs>>{},
                                  Stride<Int<kRows>, _1, Int<kRows * Base::kKeys>>{})));
  using MmaKVss = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kRows>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));

  struct SharedStorage {
    alignas(1024) Element k[cosize_v<SmemLayoutKV>];
    alignas(1024) Element v[cosize_v<SmemLayoutKV>];
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element dout[cosize_v<SmemLayoutQ>];
    alignas(1024) Element ds[cosize_v<SmemLayoutDs>];
    alignas(16) float lse[kStages][kRows];    // lse of each tile row
    alignas(16) float delta[kStages][kRows];  // delta of each tile row
    alignas(16) int32_t token[kStages][kRows];  // query index i of each tile row
    alignas(8) uint64_t kv_full;
    uint64_t kv_empty;
    uint64_t full[kStages];
    uint64_t empty[kStages];
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
};

}  // namespace jax_msa::sm90
