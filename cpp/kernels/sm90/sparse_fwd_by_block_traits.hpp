// Compile-time shape of the SM90 KV-outer ("by block") sparse-attention
// forward (sparse_attention_fwd_by_block.cu): tiles, shared-memory layouts,
// the wgmma tiled MMAs and the shared storage.
//
// One CTA = 3 warpgroups, KV-outer: a KV block c (128 keys x D = 128) of one
// (batch row, kv head) stays in shared memory while the CTA walks its share
// of the block's bucket of (token, head) rows in tiles of kRows = 64.
//   warpgroup 0      producer: one thread loads K_c and V_c (TMA, once per
//                    bucket piece, into one of kKvSlots slots so that the next
//                    bucket's block loads while this one is in use); all 128
//                    threads gather the tile rows of Q (and the tile's token
//                    ids) with cp.async into a kStages ring;
//   warpgroups 1, 2  consumers: the CTA's tiles alternate between them
//                    (tile n -> warpgroup 1 + n % 2); a tile is independent
//                    of every other (no accumulation across tiles).
// Per tile, in one consumer warpgroup:
//   S = Q K_c^T        (64 x 128 x 128, both operands from smem)
//   P = exp2(S * scale * log2e - m), masked; l = row sums (fp32)
//   O = P V_c          (64 x 128 x 128, P from registers, V_c seen MN-major)
//   partial O = O / l (input dtype; stmatrix into a staging tile, TMA stores),
//   partial lse = (m + log2 l) * ln 2.
// A warpgroup issues a tile's S, then the previous tile's O (FlashAttention-3's
// overlap within a warpgroup): that O runs during this tile's softmax, and
// its epilogue follows; a bucket piece's last tile is finished before its
// K_c / V_c slot is released.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/sm90/kv_outer_gather.hpp"

namespace jax_msa::sm90 {

using namespace cute;

template <class Element_>
struct SparseFwdByBlockTraits : kv_outer::TileShape<Element_, 4> {  // 4 Q tiles in flight
  using Base = kv_outer::TileShape<Element_, 4>;
  using typename Base::Element;
  using typename Base::SmemAtom;
  using typename Base::SmemLayoutQ;
  using Base::kConsumerWarpgroups;
  using Base::kD;
  using Base::kKeys;
  using Base::kRows;
  using Base::kStages;
  static constexpr int kKvSlots = 2;  // K/V blocks in flight

  // The K and V slots: (key, dim, slot), each slot one TMA box (SmemLayoutKV).
  using SmemLayoutKVSlots =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>, Int<kKvSlots>>{}));
  // The same memory seen as (dim, key, slot): V as the MN-major B operand of P V.
  using SmemLayoutVtSlots = decltype(composition(
      SmemLayoutKVSlots{}, make_layout(Shape<Int<kD>, Int<kKeys>, Int<kKvSlots>>{},
                                       Stride<Int<kKeys>, _1, Int<kKeys * kD>>{})));

  // S = Q K^T: (rows, keys, dim), one warpgroup.
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kKeys>, Int<kD>>>(),
      Layout<Shape<_1, _1, _1>>{}));
  // O = P V: (rows, dim, keys), P from registers, V MN-major, one warpgroup.
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kRows>, Int<kD>, Int<kKeys>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_1, _1, _1>>{}));

  // The O staging tile of one warpgroup, laid out for a TMA store (two
  // 128-byte-swizzled boxes of 64 columns).
  using TileStage = Shape<Int<kRows>, Int<kD>>;
  using SmemLayoutStage = decltype(tile_to_shape(SmemAtom{}, TileStage{}));
  // Its 16-byte unit that holds columns 8 c .. 8 c + 7 of row R: the box of
  // c / 8, row R's 128 bytes there, the unit swizzled by R % 8.
  __device__ static constexpr int stage_unit(int c, int row) {
    return (c / 8) * (kRows * 8) + row * 8 + ((c % 8) ^ (row % 8));
  }

  struct SharedStorage {
    alignas(1024) Element k[cosize_v<SmemLayoutKVSlots>];
    alignas(1024) Element v[cosize_v<SmemLayoutKVSlots>];
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element o[kConsumerWarpgroups][kRows * kD];
    alignas(16) int32_t token[kStages][kRows];  // query index i of each tile row
    alignas(8) uint64_t kv_full[kKvSlots];
    uint64_t kv_empty[kKvSlots];
    uint64_t full[kStages];
    uint64_t empty[kStages];
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
  static_assert(kD * sizeof(Element) == 256, "the staging addresses assume 256-byte rows");
};

}  // namespace jax_msa::sm90
