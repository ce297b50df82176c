// TMA boxes of one head's rows of a [B, S, H, D] tensor (make_tma_heads: the
// dense backward's Q, dO and dq_accum tiles), in particular loads of one KV
// block (128 keys x D of K or V for a batch row and a kv head). make_tma_kv serves every SM90 sparse-attention kernel (query-outer:
// sparse_tile_producer.hpp; KV-outer: kv_outer_gather.hpp); load_kv_block is
// the KV-outer producers' copy of a block. `Traits` provides Element, kD,
// TileKV (kBlock x kD) and SmemLayoutKV (the shared-memory tile of a block).
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>

namespace jax_msa::sm90 {

using namespace cute;

// A [B, S, H, D] tensor viewed as [S, D, H, B], so that `Tile` (rows x D) of
// one head is a TMA box at (rows * r, 0, h, b) whatever H; rows past S read
// as zeros and are never written. CopyOp: a load, a store or a reduction.
template <class CopyOp, class SmemLayout, class Tile, class T>
auto make_tma_heads(T* x, int64_t S, int64_t H, int64_t B) {
  constexpr int kD = decltype(size<1>(Tile{}))::value;
  auto layout = make_layout(
      make_shape(static_cast<int>(S), Int<kD>{}, static_cast<int>(H), static_cast<int>(B)),
      make_stride(H * kD, _1{}, int64_t{kD}, S * H * kD));
  return make_tma_copy(CopyOp{}, make_tensor(make_gmem_ptr(x), layout), SmemLayout{}, Tile{}, _1{});
}

// Tile r of head h, batch row b of the [S, D, H, B] view behind `tma`.
template <class Tile, class Tma>
__device__ __forceinline__ auto tma_heads_tile(const Tma& tma, int64_t S, int64_t H, int64_t B,
                                               int64_t b, int64_t h, int64_t r) {
  Tensor m = tma.get_tma_tensor(make_shape(static_cast<int>(S), size<1>(Tile{}),
                                           static_cast<int>(H), static_cast<int>(B)));
  return local_tile(m(_, _, h, b), Tile{}, make_coord(r, _0{}));
}

// k, v: a block is the box of 128 keys at block c; rows past Sk come back as zeros.
template <class Traits>
auto make_tma_kv(const typename Traits::Element* kv, int64_t Sk, int64_t Hkv, int64_t B) {
  return make_tma_heads<SM90_TMA_LOAD, typename Traits::SmemLayoutKV, typename Traits::TileKV>(
      kv, Sk, Hkv, B);
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
  Tensor gKV = tma_heads_tile<typename Traits::TileKV>(tma, Sk, Hkv, B, b, g, c);
  Tensor sKV = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutKV{});
  auto cta = tma.get_slice(_0{});
  copy(tma.with(full), cta.partition_S(gKV), cta.partition_D(sKV));
}

}  // namespace jax_msa::sm90
