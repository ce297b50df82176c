// TMA loads of one KV block (128 keys x D of K or V for a batch row and a kv
// head). make_tma_kv serves every SM90 sparse-attention kernel (query-outer:
// sparse_tile_producer.hpp; KV-outer: kv_outer_gather.hpp); load_kv_block is
// the KV-outer producers' copy of a block. `Traits` provides Element, kD,
// TileKV (kBlock x kD) and SmemLayoutKV (the shared-memory tile of a block).
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

namespace jax_msa::sm90 {

using namespace cute;

// k, v viewed as [Sk, D, Hkv, B]: a block is a TMA box at (128 c, 0, g, b);
// rows past Sk come back as zeros.
template <class Traits>
auto make_tma_kv(const typename Traits::Element* kv, int64_t Sk, int64_t Hkv, int64_t B) {
  constexpr int kD = Traits::kD;
  auto layout = make_layout(
      make_shape(static_cast<int>(Sk), Int<kD>{}, static_cast<int>(Hkv), static_cast<int>(B)),
      make_stride(Hkv * kD, _1{}, int64_t{kD}, Sk * Hkv * kD));
  return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(kv), layout),
                       typename Traits::SmemLayoutKV{}, typename Traits::TileKV{}, _1{});
}

template <class Traits>
using TmaKV = decltype(make_tma_kv<Traits>(nullptr, 1, 1, 1));

// One thread: copies block c of (batch row b, kv head g) from the [Sk, D, Hkv,
// B] view of `tma` into the tile at `smem` (SmemLayoutKV), completing on
// `full`, where the caller has announced the block's bytes (expect_tx).
template <class Traits>
__device__ __forceinline__ void load_kv_block(const TmaKV<Traits>& tma, int64_t Sk, int64_t Hkv,
                                              int64_t B, int64_t b, int64_t g, int64_t c,
                                              typename Traits::Element* smem, uint64_t& full) {
  Tensor mKV = tma.get_tma_tensor(make_shape(static_cast<int>(Sk), Int<Traits::kD>{},
                                             static_cast<int>(Hkv), static_cast<int>(B)));
  Tensor gKV = local_tile(mKV(_, _, g, b), typename Traits::TileKV{}, make_coord(c, _0{}));
  Tensor sKV = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutKV{});
  auto cta = tma.get_slice(_0{});
  copy(tma.with(full), cta.partition_S(gKV), cta.partition_D(sKV));
}

}  // namespace jax_msa::sm90
