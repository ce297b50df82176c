// The query-outer tile of the portable attention kernels (attention_fwd.cu,
// attention_dq.cu): a CTA takes 128 (token, head) rows, `tokens` consecutive
// query tokens times the G query heads of one KV group, eight warps of 16
// rows, and walks the union of its tokens' selected blocks (sparse) or blocks
// 0 .. n - 1 (dense) in pieces of 64 keys through cp.async stages.
// Here: the tile's mma.sync / ldmatrix / shared-memory layouts, the inputs
// every such kernel reads, the dense tiling and rows, and the cp.async loads
// of the tile's rows and of a piece of K and V.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::portable {

template <class Element_, int kD_ = 128>
struct TileTraits {
  using Element = Element_;
  static constexpr int kD = kD_;  // head dim: 128, or 64 (dense)
  static constexpr int kKeys = 128;   // keys per block (spec §2)
  static constexpr int kPiece = 64;   // keys per shared-memory stage
  static constexpr int kStages = 2;
  static constexpr int kWarps = 8;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  // For make_sparse_shape and TileUnion: tokens * topk <= 128, tokens <= 64.
  static constexpr int kMaxCandidates = 128;
  static constexpr int kMaxTokens = 64;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                     cute::SM80_16x8x16_F32BF16BF16F32_TN,
                                     cute::SM80_16x8x16_F32F16F16F32_TN>;
  // Warp w: rows 16 w .. 16 w + 15; N in 16s so that one ldmatrix.x4 feeds two atoms.
  using TiledMma = decltype(cute::make_tiled_mma(
      MmaAtom{}, cute::Layout<cute::Shape<cute::Int<kWarps>, cute::_1, cute::_1>>{},
      cute::Tile<cute::Int<kRows>, cute::_16, cute::_16>{}));
  // 128-byte rows, 16-byte chunks swizzled within 8-row atoms: conflict-free
  // cp.async stores and ldmatrix loads.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ =
      decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kD>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kPiece>, cute::Int<kD>, cute::Int<kStages>>{}));
  // K or V seen as dims x keys x stage: the B operand of P V (and of dS K).
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_layout(cute::Shape<cute::Int<kD>, cute::Int<kPiece>, cute::Int<kStages>>{},
                        cute::Stride<cute::Int<kPiece>, cute::_1, cute::Int<kPiece * kD>>{})));
};

// What every kernel of the tile reads.
template <class Traits>
struct TileInputs {
  sm90::SparseShape shape;  // dense: ids null, topk 0, tokens = 128 / G
  bool causal;              // dense only (the sparse kernels are causal by their ids)
  const typename Traits::Element* q;
  const typename Traits::Element* k;
  const typename Traits::Element* v;
  float scale_log2;  // scale * log2(e)
};

// Args: cuda::SparseAttentionArgs or cuda::DenseAttentionArgs (q, k, v, scale).
template <class Traits, class Args>
TileInputs<Traits> make_inputs(const sm90::SparseShape& shape, bool causal, const Args& a) {
  using Element = typename Traits::Element;
  return {shape,
          causal,
          static_cast<const Element*>(a.q),
          static_cast<const Element*>(a.k),
          static_cast<const Element*>(a.v),
          a.scale * 1.4426950408889634f};
}

// Dense tiles: 128 / G tokens times the G heads of a KV group (G <= 128).
template <class Traits>
sm90::SparseShape dense_shape(const cuda::DenseAttentionArgs& a) {
  const int64_t group = a.Hq / a.Hkv;
  const int tokens = static_cast<int>(Traits::kRows / group);
  const int64_t chunks = (a.Sq + tokens - 1) / tokens;
  return {nullptr, a.q_lengths, a.kv_lengths, a.B, a.Sq, a.Sk, a.Hq, a.Hkv, 0,
          group, tokens, chunks, a.B * a.Hkv * chunks};
}

// The dense kernels' rows: TileRows where every row takes every block;
// a padded row (token >= q_len) masks itself out (last_key -1).
template <int kRowsPerThread>
struct AllRows : sm90::TileRows<kRowsPerThread> {
  using sm90::TileRows<kRowsPerThread>::TileRows;
  __device__ bool member(int, uint64_t) const { return true; }

  __device__ void start(const sm90::SparseShape& s, const sm90::SparseTile& tile, int64_t q_len,
                        int64_t kv_len_, bool causal) {
    sm90::TileRows<kRowsPerThread>::start(s, tile, q_len, kv_len_);
    const bool padded = tile.token0 + s.tokens > q_len;
    // partial() compares with the smallest position: -1 keeps every block masked.
    if (padded) this->first_position = -1;
    else if (!causal) this->first_position = INT64_MAX / 2;
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      if (this->token_of[r] < 0) continue;
      if (tile.token0 + this->token_of[r] >= q_len) this->last_key[r] = -1;
      else if (!causal) this->last_key[r] = static_cast<int>(kv_len_ - 1);
    }
  }
};

// Blocks 0 .. n - 1 that a dense tile walks: up to the last block any of its
// valid rows sees.
__device__ inline int dense_tile_blocks(const sm90::SparseShape& s, const sm90::SparseTile& tile,
                                        int64_t q_len, int64_t kv_len, bool causal) {
  const int64_t last_token = std::min(tile.token0 + s.tokens, q_len) - 1;
  if (last_token < tile.token0 || kv_len <= 0) return 0;
  const int64_t all = (kv_len + 127) / 128;
  return static_cast<int>(causal ? std::min(all, (kv_len - q_len + last_token) / 128 + 1) : all);
}

// The tile's rows of a [B, Sq, Hq, kD] tensor (q, or dout) into shared memory
// (layout SmemLayoutQ; all threads): row r = token token0 + r / G, head
// g G + r % G; rows of tokens past min(q_len, Sq) are zeros.
template <class Traits>
__device__ void load_rows(typename Traits::Element* smem, const typename Traits::Element* src,
                          const sm90::SparseShape& s, const sm90::SparseTile& tile,
                          int64_t q_len) {
  using namespace cute;
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
  constexpr int kChunks = Traits::kD / 8;  // 16-byte chunks per row
  const int group = static_cast<int>(s.group);
  const int rows_valid = group * static_cast<int>(std::clamp<int64_t>(
                                     std::min(q_len, s.Sq) - tile.token0, 0, s.tokens));
  const int chunk = threadIdx.x % kChunks;
  CUTE_UNROLL
  for (int i = 0; i < Traits::kRows * kChunks / Traits::kThreads; ++i) {
    const int r = threadIdx.x / kChunks + i * (Traits::kThreads / kChunks);
    const int64_t token = tile.token0 + r / group;
    const int64_t head = tile.g * group + r % group;
    const bool valid = r < rows_valid;
    const auto* row = valid ? src + ((tile.b * s.Sq + token) * s.Hq + head) * Traits::kD + 8 * chunk
                            : src;
    sm90::cp_async_16(&sQ(r, 8 * chunk), row, valid);
  }
}

// Keys key0 .. key0 + kPiece - 1 of K and V (kv head g of row b) into stage
// `stage` of k_smem, v_smem (layout SmemLayoutKV; all threads); keys at or
// past `limit` (min(kv_len, Sk)) are zeros.
template <class Traits>
__device__ void load_piece(typename Traits::Element* k_smem, typename Traits::Element* v_smem,
                           const TileInputs<Traits>& in, const sm90::SparseTile& tile,
                           int64_t key0, int64_t limit, int stage) {
  using namespace cute;
  const sm90::SparseShape& s = in.shape;
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutKV{});
  constexpr int kChunks = Traits::kD / 8;
  const int chunk = threadIdx.x % kChunks;
  CUTE_UNROLL
  for (int i = 0; i < Traits::kPiece * kChunks / Traits::kThreads; ++i) {
    const int key = threadIdx.x / kChunks + i * (Traits::kThreads / kChunks);
    const bool valid = key0 + key < limit;
    const int64_t at = ((tile.b * s.Sk + key0 + key) * s.Hkv + tile.g) * Traits::kD + 8 * chunk;
    sm90::cp_async_16(&sK(key, 8 * chunk, stage), valid ? in.k + at : in.k, valid);
    sm90::cp_async_16(&sV(key, 8 * chunk, stage), valid ? in.v + at : in.v, valid);
  }
}

// The tokens of the tile with a row in warp `warp` (rows 16 warp .. 16 warp
// + 15) as bits (dense: all blocks, if it holds a row): a warp skips the
// pieces of blocks none of them selected.
template <bool kDense>
__device__ inline uint64_t warp_tokens(int warp, const sm90::SparseShape& s) {
  const int group = static_cast<int>(s.group);
  const int first = 16 * warp / group;
  const int last = std::min((16 * warp + 15) / group, s.tokens - 1);
  return first > last ? 0
         : kDense    ? ~uint64_t{0}
                     : (~uint64_t{0} >> (63 - (last - first))) << first;
}

// Launches `kernel` with one CTA per tile.
template <class Traits, class Params>
cudaError_t launch_tiles(void (*kernel)(Params), const Params& p, int64_t tiles,
                         cudaStream_t stream) {
  const cudaError_t st = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (st != cudaSuccess) return st;
  if (tiles > INT32_MAX) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(tiles), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace jax_msa::portable
