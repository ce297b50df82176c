// Compile-time shape of the SM90 block-score kernel: tile sizes, shared
// memory layouts, the wgmma tiled MMA and the shared storage.
//
// One CTA = 3 warpgroups:
//   warpgroup 0      producer: one thread issues the TMA loads (the Q tile
//                    once, then the ki blocks through a kStages ring);
//   warpgroups 1, 2  consumers: each owns 64 of the tile's kRows = 128
//                    (token, head) rows; per ki block one wgmma chain
//                    64 x 128 x Di, then the masked max over the 128 columns.
// A tile's rows are the flattened (token, head) rows of qi [B, Sq*Hi, Di], so
// every ki block loaded once serves all index heads of 128 / Hi tokens.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace jax_msa::sm90 {

using namespace cute;

template <class Element_, int kDi_>
struct BlockScoresTraits {
  using Element = Element_;
  static constexpr int kDi = kDi_;
  static_assert(kDi == 64 || kDi == 128, "index head dim 64 or 128");

  static constexpr int kRows = 128;  // (token, head) rows per tile
  static constexpr int kKeys = 128;  // keys per block (spec §2)
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  // ki blocks in flight: 4 x 32 KiB (Di 128) or 6 x 16 KiB (Di 64).
  static constexpr int kStages = kDi == 128 ? 4 : 6;

  // K-major tiles with the 128-byte swizzle that wgmma and TMA both read.
  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kDi>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kDi>, Int<kStages>>{}));
  using SmemLayoutKStage = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kDi>>{}));
  using TileQ = Shape<Int<kRows>, Int<kDi>>;
  using TileK = Shape<Int<kKeys>, Int<kDi>>;

  // 64 x 128 x 16 wgmma atoms, A (Q) and B (ki) from shared memory; two
  // warpgroups stacked along M cover the 128-row tile.
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kKeys>, Int<kDi>>>(),
      Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>{}));

  static constexpr uint32_t kBytesQ = kRows * kDi * sizeof(Element);
  static constexpr uint32_t kBytesK = kKeys * kDi * sizeof(Element);

  struct SharedStorage {
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element k[cosize_v<SmemLayoutK>];
    alignas(8) uint64_t q_full;
    uint64_t k_full[kStages];
    uint64_t k_empty[kStages];
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
};

}  // namespace jax_msa::sm90
