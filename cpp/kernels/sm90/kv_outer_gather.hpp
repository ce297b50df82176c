// Pieces shared by the KV-outer sparse-attention kernels (the dK/dV backward,
// sparse_attention_bwd.cu, and the by-block forward,
// sparse_attention_fwd_by_block.cu): the tile shape and shared-memory
// layouts, the split of the tile sequence over CTAs, the bucket coordinates,
// the producer's cp.async gather of a tile's rows and small device helpers.
// Both walk the block -> queries index of sparse_block_index.hpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/sm90/kv_block_tma.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_block_index.hpp"

namespace jax_msa::sm90::kv_outer {

using namespace cute;

// One CTA = a producer warpgroup and two consumer warpgroups; a KV block
// (kKeys x kD) stays in shared memory while the CTA walks tiles of kRows
// (token, head) rows (the dense backward: query rows) in a kStages ring.
template <class Element_, int kStages_, int kRows_ = block_index::kTileRows>
struct TileShape {
  using Element = Element_;
  static constexpr int kD = 128;     // head dim (the only one supported)
  static constexpr int kKeys = block_index::kBlock;
  static constexpr int kRows = kRows_;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kStages = kStages_;

  // K-major tiles with the 128-byte swizzle that TMA, cp.async and wgmma share.
  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<Element>{});
  // One K or V block: the TMA box.
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>>{}));
  using TileKV = Shape<Int<kKeys>, Int<kD>>;
  // Gathered row tiles (Q, dO): (row, dim, stage).
  using SmemLayoutQ =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>, Int<kStages>>{}));

  static constexpr uint32_t kBytesKV = kKeys * kD * sizeof(Element);
};

// CTA s of `ctas` takes tiles [s * share, (s + 1) * share) of the `total`:
// the same work for every CTA whatever the bucket sizes.
__host__ __device__ __forceinline__ int64_t tile_share(int64_t total, int ctas) {
  return (total + ctas - 1) / ctas;
}

// The segments of the tile range [T0, T1) (T0 < Ttot).
__device__ __forceinline__ block_index::SegmentWalker make_walker(const block_index::IndexView& ix,
                                                                 int64_t nbkt, int64_t T0,
                                                                 int64_t T1) {
  return block_index::SegmentWalker{ix.tile_start, T0, T1, T0,
                                    block_index::bucket_of_tile(ix.tile_start, nbkt, T0), 0, 0,
                                    false};
}

// Bucket k = (b * Hkv + g) * nb + c: batch row b, kv head g, block c.
struct Bucket {
  int64_t b, g, c;
  __host__ __device__ __forceinline__ Bucket(const block_index::Geometry& geo, int64_t k) {
    const int64_t bg = k / geo.nb;
    c = k - bg * geo.nb;
    b = bg / geo.Hkv;
    g = bg - b * geo.Hkv;
  }
};

// cp.async of 16 / 4 bytes, zero-filled when `valid` is false (src not read).
__device__ __forceinline__ void cp_async_16z(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = cute::cast_smem_ptr_to_uint(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_4z(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = cute::cast_smem_ptr_to_uint(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 4 : 0)
               : "memory");
}

// A gathered row tile and the global row this thread copies into it.
template <class SmemTensor, class Element>
struct RowSource {
  SmemTensor smem;  // (row, dim, stage)
  const Element* src;
};
template <class SmemTensor, class Element>
__device__ __forceinline__ RowSource<SmemTensor, Element> row_source(const SmemTensor& smem,
                                                                     const Element* src) {
  return {smem, src};
}

// The producer warpgroup's share of a tile: thread t gathers tile row t / 2,
// its 16-byte chunks half, half + 2, ..., half + 14 (two threads per row, so
// that 128 threads cover the 64 rows). Row `row` is head `head` of the tile's
// entry `slot` (G heads per entry).
struct RowGather {
  int row;
  int half;
  int slot;
  int64_t head;

  __device__ __forceinline__ RowGather(int t, int64_t G)
      : row(t >> 1), half(t & 1), slot(static_cast<int>(row / G)), head(row - slot * G) {}

  // This thread's head among the Hq heads, for kv head g (G heads per kv head).
  __device__ __forceinline__ int64_t head_row(int64_t g, int64_t G) const { return g * G + head; }

  // Row of q (and of every [B, Sq, Hq] tensor) at query `token` of batch row b.
  __device__ __forceinline__ int64_t qrow(const block_index::Geometry& geo, int64_t b,
                                          int64_t token, int64_t head_row) const {
    return (b * geo.Sq + token) * geo.Hq + head_row;
  }

  // This thread's chunks of row `row`, stage `stage`, of every source (in
  // turn per chunk); zeros when !valid.
  template <class... Sources>
  __device__ __forceinline__ void copy(int stage, bool valid, const Sources&... s) const {
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) {
      const int col = (half + 2 * j) * 8;
      (cp_async_16z(&s.smem(row, col, stage), s.src + col, valid), ...);
    }
  }
};

// acc = A B over all k-blocks of A (B holds the same k-blocks); the first
// overwrites acc.
template <class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_overwrite(Mma& mma, const TA& a, const TB& b, TC& acc) {
  mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

template <class Element>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

using sm90::fast_exp2;  // rowmax_epilogue.hpp

}  // namespace jax_msa::sm90::kv_outer
