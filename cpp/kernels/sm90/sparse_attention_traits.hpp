// Compile-time shape of the SM90 query-outer sparse-attention kernels
// (forward and dQ): tiles, shared-memory layouts, the two wgmma chains and the
// shared storage.
//
// A tile is kRows = 128 (token, head) rows: `tokens` consecutive query
// tokens times the G = Hq / Hkv query heads of one KV group, which share
// their selected blocks. The tile walks the union of its tokens' selected
// blocks; a row whose token did not select a block masks it out. Each K/V
// block loaded serves all 128 rows: at 64 rows the kernel would be bound by
// the L2 -> SM traffic of the block loads, not by the tensor cores.
//
// One CTA = 3 warpgroups, persistent over tiles:
//   warpgroup 0      producer: one warp builds each tile's block union, one
//                    feeds the consumers (Q by cp.async, K/V blocks by TMA
//                    through a ring of kSlots 128 x 128 slots);
//   warpgroups 1, 2  consumers: 64 rows each, wgmma from shared memory.
#pragma once

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace jax_msa::sm90 {

using namespace cute;

// kRowTensors: the per-row operands a tile keeps in shared memory, 1 for the
// forward (Q), 2 for dQ (Q and dO); the ring takes the rest of shared memory.
// kD: the head dim, 128 (the sparse kernels) or 64 (the dense forward too).
template <class Element_, int kRowTensors_, int kD_ = 128>
struct SparseAttentionTraits {
  using Element = Element_;
  static constexpr int kRowTensors = kRowTensors_;
  static constexpr int kD = kD_;     // head dim
  static constexpr int kKeys = 128;  // keys per block (spec §2)
  static constexpr int kConsumers = 2;
  static constexpr int kRows = 64 * kConsumers;  // (token, head) rows per tile
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // tokens * topk <= kMaxCandidates: the union is built in one warp's
  // registers; tokens <= 64: one bit per token.
  static constexpr int kMaxCandidates = 128;
  static constexpr int kMaxTokens = 64;
  // K and V blocks in flight: what shared memory holds besides the rows and
  // 1 KiB of barriers and slot data plus the union's list (6 for the forward
  // at D = 128, 5 for dQ), at most 12.
  static constexpr int kTileBytes = 128 * kD * static_cast<int>(sizeof(Element));
  static constexpr int kReserved = 1024 + kMaxCandidates * 12;
  static constexpr int kSlots =
      (227 * 1024 - kRowTensors * kTileBytes - kReserved) / kTileBytes < 12
          ? (227 * 1024 - kRowTensors * kTileBytes - kReserved) / kTileBytes
          : 12;

  using SmemAtom = decltype(GMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  // The ring: kSlots K-or-V blocks, keys x dims x slot, dims contiguous (as in memory).
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>>{}));
  using SmemLayoutRing =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>, Int<kSlots>>{}));
  // The same ring seen as dims x keys x slot: V as the MN-major B operand of P V.
  using SmemLayoutRingT = decltype(composition(
      SmemLayoutRing{},
      make_layout(Shape<Int<kD>, Int<kKeys>, Int<kSlots>>{},
                  Stride<Int<kKeys>, _1, Int<kKeys * kD>>{})));
  using TileKV = Shape<Int<kKeys>, Int<kD>>;

  // S = Q K^T: 64 x 128 x 128 per consumer warpgroup, both operands from
  // shared memory; the two warpgroups stack along M.
  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kKeys>, Int<kD>>>(),
      Layout<Shape<Int<kConsumers>, _1, _1>>{}));
  // O += P V: 64 x 128 x 128 per warpgroup, P from registers, V (MN-major)
  // from shared memory.
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kD>, Int<kKeys>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumers>, _1, _1>>{}));

  static constexpr uint32_t kBytesKV = kKeys * kD * sizeof(Element);

  struct SharedStorage {
    alignas(1024) Element rows[kRowTensors][cosize_v<SmemLayoutQ>];  // Q (, dO)
    alignas(1024) Element kv[cosize_v<SmemLayoutRing>];
    uint64_t q_full;   // the tile's rows and its block count are in
    uint64_t q_empty;  // the consumers have issued their last product with the rows
    uint64_t full[kSlots];
    uint64_t empty[kSlots];
    uint64_t slot_tokens[kSlots];  // bit t: token t of the tile selected the block
    int32_t slot_block[kSlots];
    int32_t tile_blocks;  // blocks in the current tile's union
    // The union list of a tile, from the producer's union warp to its loading
    // warp (sparse_tile_producer.hpp).
    uint64_t list_full;
    uint64_t list_empty;
    uint64_t union_tokens[kMaxCandidates];
    int32_t union_block[kMaxCandidates];
    int32_t union_count;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "fits one SM90 CTA");
};

// Where tile `index` sits: tiles run over (chunk of tokens, b, kv head), the
// last chunks (the longest rows in a causal picture) first.
struct SparseTile {
  int64_t b, g, token0;

  __device__ SparseTile(int64_t index, int64_t B, int64_t Hkv, int64_t chunks, int tokens) {
    const int64_t bg = index % (B * Hkv);
    b = bg / Hkv;
    g = bg % Hkv;
    token0 = (chunks - 1 - index / (B * Hkv)) * tokens;
  }
};

}  // namespace jax_msa::sm90
