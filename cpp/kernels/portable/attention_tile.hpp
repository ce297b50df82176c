// What the kernels that load a query-outer tile by cp.async share (the
// portable family's attention_fwd.cu and attention_dq.cu, the Blackwell
// family's sm100/attention_fwd.cu): the forward's parameters, the dense
// rows and blocks, the cp.async loads of a tile's rows (Q, dO) and of a piece
// of K and V.
//
// Traits give Element, kD, kRows, kThreads, kKeys, kPiece, SmemLayoutQ
// (rows x dims) and SmemLayoutKV (keys x dims x stage), and a SharedStorage
// with q, k and v arrays of those layouts.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cute/tensor.hpp>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::portable {

// What every kernel of a query-outer tile reads.
template <class Traits>
struct TileInputs {
  sm90::SparseShape shape;  // dense: ids null, topk 0, tokens = kRows / G
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

// The forward's parameters.
template <class Traits>
struct FwdParams {
  TileInputs<Traits> in;
  typename Traits::Element* out;
  float* lse;
};

// The dense forward's rows: Rows (TileRows or a kind of it) where every row
// takes every block; a padded row (token >= q_len) masks itself out
// (last_key -1).
template <class Rows>
struct AllRows : Rows {
  using Rows::Rows;
  __device__ bool member(int, uint64_t) const { return true; }

  __device__ void start(const sm90::SparseShape& s, const sm90::SparseTile& tile, int64_t q_len,
                        int64_t kv_len_, bool causal) {
    Rows::start(s, tile, q_len, kv_len_);
    const bool padded = tile.token0 + s.tokens > q_len;
    // partial() compares with the smallest position: -1 keeps every block masked.
    if (padded) this->first_position = -1;
    else if (!causal) this->first_position = INT64_MAX / 2;
    CUTE_UNROLL
    for (int r = 0; r < Rows::kRowsHeld; ++r) {
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
// past `limit` (min(kv_len, Sk)) are zeros. `in`: the kernel's parameters
// (shape, k, v).
template <class Traits, class Inputs>
__device__ void load_piece(typename Traits::Element* k_smem, typename Traits::Element* v_smem,
                           const Inputs& in, const sm90::SparseTile& tile, int64_t key0,
                           int64_t limit, int stage) {
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

template <class Traits, class Args>
FwdParams<Traits> make_params(const sm90::SparseShape& shape, bool causal, const Args& a,
                              void* out, float* lse) {
  return {make_inputs<Traits>(shape, causal, a), static_cast<typename Traits::Element*>(out), lse};
}

// The dense forward's tiling: kRows / G tokens times the G heads of a KV
// group (G <= kRows).
template <class Traits>
sm90::SparseShape dense_shape(const cuda::DenseAttentionArgs& a) {
  const int64_t group = a.Hq / a.Hkv;
  const int tokens = static_cast<int>(Traits::kRows / group);
  const int64_t chunks = (a.Sq + tokens - 1) / tokens;
  return {nullptr, a.q_lengths, a.kv_lengths, a.B, a.Sq, a.Sk, a.Hq, a.Hkv, 0,
          group, tokens, chunks, a.B * a.Hkv * chunks};
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
