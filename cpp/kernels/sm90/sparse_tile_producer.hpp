// The producer side of the query-outer sparse-attention kernels: one warp
// builds the union of each tile's selected blocks (in registers, then as a
// list in shared memory); another feeds the consumers: the tile's Q rows by
// cp.async, then per union block its K and V by TMA through the ring of slots.
//
// Only valid ids enter the union (0 <= c < ceil(kv_len / 128) and c <= the
// token's local block), so whatever the ids say, nothing outside k and v is
// read; rows of tokens past q_len are zero-filled and select nothing.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/multiprocessors.h"
#include "kernels/sm90/kv_block_tma.hpp"
#include "kernels/sm90/sparse_attention_traits.hpp"

namespace jax_msa::sm90 {

using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

// Everything both sides of a tile need to know about the problem.
struct SparseShape {
  const int32_t* ids;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  int64_t B, Sq, Sk, Hq, Hkv, topk;
  int64_t group;   // Hq / Hkv
  int tokens;      // tokens per tile: tokens * group <= 128, tokens * topk <= 128, <= 64
  int64_t chunks;  // ceil(Sq / tokens)
  int64_t tiles;   // B * Hkv * chunks
};

// The rows a consumer thread holds in an SM90 accumulator fragment of the
// tile (rowmax_epilogue.hpp: rows 16 warp + lane / 4 + 8 r, columns
// 8 (j / 2) + 2 (lane % 4) + j % 2; `tid` counts the consumer threads), and
// where they sit in the causal picture of the current tile.
template <int kRowsPerThread>
struct TileRows {
  static constexpr int kRowsHeld = kRowsPerThread;
  int row_base, col_base;
  int token_of[kRowsPerThread];      // token index in the tile; -1: no such row
  int last_key[kRowsPerThread];      // last key the row may see: min(position, kv_len - 1)
  int64_t out_row[kRowsPerThread];   // row of q / out viewed as [B * Sq * Hq, D]
  int64_t first_position, kv_len;

  // Warp w holds rows warp_rows * w .. warp_rows * (w + 1) - 1, 8 apart per thread.
  __device__ explicit TileRows(int tid, int warp_rows = 16)
      : row_base(warp_rows * (tid / 32) + (tid % 32) / 4), col_base(2 * (tid % 4)) {}

  __device__ int column(int j) const { return 8 * (j / 2) + col_base + j % 2; }

  __device__ void start(const SparseShape& s, const SparseTile& tile, int64_t q_len,
                        int64_t kv_len_) {
    kv_len = kv_len_;
    first_position = kv_len - q_len + tile.token0;
    const int used = s.tokens * static_cast<int>(s.group);
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = row_base + 8 * r;
      const int t = row / static_cast<int>(s.group);
      const int64_t token = tile.token0 + t;
      token_of[r] = row < used && token < s.Sq ? t : -1;
      last_key[r] = static_cast<int>(std::min(first_position + t, kv_len - 1));
      out_row[r] = (tile.b * s.Sq + token) * s.Hq + tile.g * s.group + row % s.group;
    }
  }

  // Whether some row sees only part of the block starting at key0 (causal or length cut).
  __device__ bool partial(int64_t key0, int keys) const {
    return key0 + keys - 1 > first_position || key0 + keys > kv_len;
  }

  // Whether row r's token selected the block (bit t of `tokens`).
  __device__ bool member(int r, uint64_t tokens) const {
    return token_of[r] >= 0 && ((tokens >> token_of[r]) & 1);
  }
};

// The tile tokens with a row in consumer warpgroup w (rows 64 w .. 64 w + 63;
// row r holds token r / group), as bits.
__device__ inline uint64_t warpgroup_tokens(int w, int group, int tokens) {
  const int first = 64 * w / group;
  const int last = std::min((64 * w + 63) / group, tokens - 1);
  return first > last ? 0 : (~uint64_t{0} >> (63 - (last - first))) << first;
}

// The tiling of problem `a` for kernel traits `Traits`.
template <class Traits>
SparseShape make_sparse_shape(const cuda::SparseAttentionArgs& a) {
  const int64_t group = a.Hq / a.Hkv;
  const int tokens = static_cast<int>(std::min<int64_t>(
      {Traits::kRows / group, Traits::kMaxCandidates / a.topk, Traits::kMaxTokens}));
  const int64_t chunks = (a.Sq + tokens - 1) / tokens;
  return {a.ids, a.q_lengths, a.kv_lengths, a.B, a.Sq, a.Sk, a.Hq, a.Hkv, a.topk, group,
          tokens, chunks, a.B * a.Hkv * chunks};
}

// Launches a persistent query-outer kernel: one CTA per SM (at most one per tile).
template <class Traits, class Params>
cudaError_t launch_persistent(void (*kernel)(Params), const Params& p, cudaStream_t stream) {
  const cudaError_t status = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (status != cudaSuccess) return status;
  const int64_t grid = std::min<int64_t>(cuda::multiprocessor_count(132), p.shape.tiles);
  kernel<<<static_cast<unsigned>(grid), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// cp.async of 16 bytes, zero-filled when `valid` is false (src not read).
__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}

// Makes this thread's completed cp.async writes visible to wgmma (async proxy).
__device__ inline void cp_async_wait_and_fence() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Copies the tile's 128 x kD rows of a [B, Sq, Hq, kD] tensor into `smem`
// (layout Traits::SmemLayoutQ); missing rows are zeros. Row r = token
// token0 + r / group, head g * group + r % group. Called by one warp: each
// lane copies one 16-byte chunk of every (32 / chunks per row)-th row, with
// addresses from constants and one float multiply per row (the division per
// row this copy had made it as long as a tile's K/V stream at G = 16).
template <class Traits>
__device__ void load_tile_rows(const typename Traits::Element* src, typename Traits::Element* smem,
                               const SparseShape& s, const SparseTile& tile, int64_t q_len,
                               int lane) {
  using Element = typename Traits::Element;
  constexpr int kChunks = Traits::kD * sizeof(Element) / 16;  // 16-byte chunks per row
  constexpr int kPerChunk = 16 / sizeof(Element);
  static_assert(32 % kChunks == 0 && kChunks >= 4, "a row's chunks within one warp");
  constexpr int kStep = 32 / kChunks;   // rows per pass of the warp
  constexpr int kPeriod = 8 / kStep;    // passes per 8-row swizzle atom
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
  const int group = static_cast<int>(s.group);
  const int chunk = lane % kChunks;
  const int r0 = lane / kChunks;
  // Rows of tokens below q_len and Sq (a traced q_lengths is not checked
  // against Sq): r < rows_valid (<= tokens * group).
  const int rows_valid = group * static_cast<int>(std::clamp<int64_t>(
                                     std::min(q_len, s.Sq) - tile.token0, 0, s.tokens));
  // Row r = t * group + h sits at row0 + r * kD + t * gap: a group's heads are
  // adjacent in memory, its tokens Hq * kD apart.
  const Element* row0 =
      src + ((tile.b * s.Sq + tile.token0) * s.Hq + tile.g * group) * Traits::kD + chunk * kPerChunk;
  const int gap = static_cast<int>((s.Hq - group) * Traits::kD);
  const float inv_group = 1.0f / static_cast<float>(group);
  // In shared memory, rows 8 apart are one swizzle atom apart (the swizzle
  // permutes within an atom).
  Element* dst[kPeriod];
  CUTE_UNROLL
  for (int k = 0; k < kPeriod; ++k) dst[k] = &sQ(r0 + kStep * k, chunk * kPerChunk);
  const int atom = static_cast<int>(&sQ(r0 + 8, chunk * kPerChunk) - dst[0]);
  for (int m = 0; m < Traits::kRows / 8; ++m) {
    CUTE_UNROLL
    for (int k = 0; k < kPeriod; ++k) {
      const int r = r0 + kStep * k + 8 * m;
      // t = r / group: exact, as r < 128 and group <= 64 keep (r + 0.5) /
      // group at least 1/128 from an integer.
      const int t = static_cast<int>((static_cast<float>(r) + 0.5f) * inv_group);
      const bool valid = r < rows_valid;
      cp_async_16(dst[k] + m * atom, valid ? row0 + (r * Traits::kD + t * gap) : src, valid);
    }
  }
}

// Initialises the tile and ring barriers (arrivals: `q_arrivals` for q_full,
// by default the producer warp's 32 lanes, every consumer thread for q_empty
// and empty, one expect-tx arrival for full, a warp for the union list's),
// then syncs the CTA.
template <class Traits, class SharedStorage>
__device__ void init_tile_barriers(SharedStorage& ss, int q_arrivals = 32) {
  if (threadIdx.x == 0) {
    ClusterBarrier::init(&ss.q_full, q_arrivals);
    ClusterBarrier::init(&ss.q_empty, 128 * Traits::kConsumers);
    ClusterBarrier::init(&ss.list_full, 32);
    ClusterBarrier::init(&ss.list_empty, 32);
    for (int i = 0; i < Traits::kSlots; ++i) {
      ClusterBarrier::init(&ss.full[i], 1);
      ClusterBarrier::init(&ss.empty[i], 128 * Traits::kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
}

// The union of a tile's selected blocks, built in one warp's registers (all
// 32 lanes call it together): candidate (token t, slot k) of the tile sits in
// lane (t * topk + k) % 32, register (t * topk + k) / 32; a candidate is an
// attended block (valid, causal, within kv_len) or -1.
template <class Traits>
struct TileUnion {
  static constexpr int kRegs = Traits::kMaxCandidates / 32;
  int32_t cand[kRegs];
  uint64_t tokens_of[kRegs];  // bit t: token t of the tile selected the candidate's block
  bool first[kRegs];          // the candidate is its block's first occurrence (enters the union)
  int count;                  // blocks in the union (the same in every lane)
  int attended;               // candidates that are not -1 (the same in every lane)

  __device__ __forceinline__ TileUnion(const SparseShape& s, const SparseTile& tile,
                                       int64_t q_len, int64_t kv_len, int lane) {
    constexpr uint32_t kFull = 0xFFFFFFFFu;
    const int64_t offset = kv_len - q_len;
    const int64_t valid_blocks = (kv_len + Traits::kKeys - 1) / Traits::kKeys;
    const int n = s.tokens * static_cast<int>(s.topk);
    // Every id is loaded before any is checked, and without waiting for the
    // lengths: one memory latency instead of kRegs + 1 in a row.
    int32_t id[kRegs];
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) {
      const int idx = lane + 32 * i;
      const int64_t token = tile.token0 + idx / static_cast<int>(s.topk);
      id[i] = idx < n && token < s.Sq
                  ? s.ids[((tile.b * s.Sq + token) * s.Hkv + tile.g) * s.topk + idx % s.topk]
                  : -1;
    }
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) {
      const int64_t token = tile.token0 + (lane + 32 * i) / static_cast<int>(s.topk);
      const int32_t c = id[i];
      const bool attends = token < q_len && c >= 0 && c < valid_blocks &&
                           c <= (offset + token) / Traits::kKeys;
      cand[i] = attends ? c : -1;
      tokens_of[i] = 0;
      first[i] = attends;
    }
    // Candidate j against this lane's: a rolled loop (unrolled by 4 only) so
    // that the code stays small, as each CTA of a decode runs it once, from a
    // cold instruction cache.
    const int topk = static_cast<int>(s.topk);
    CUTE_UNROLL
    for (int jr = 0; jr < kRegs; ++jr) {
      const int m = std::min(32, n - 32 * jr);
      int t = 32 * jr / topk, k = 32 * jr % topk;  // candidate j = t * topk + k
#pragma unroll 4
      for (int src = 0; src < m; ++src) {
        const int j = 32 * jr + src;
        const int32_t cj = __shfl_sync(kFull, cand[jr], src);
        const uint64_t bit = uint64_t{1} << t;
        if (++k == topk) k = 0, ++t;
        CUTE_UNROLL
        for (int i = 0; i < kRegs; ++i) {
          if (cj >= 0 && cj == cand[i]) {
            tokens_of[i] |= bit;
            if (j < lane + 32 * i) first[i] = false;
          }
        }
      }
    }
    count = 0;
    attended = 0;
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) {
      count += __popc(__ballot_sync(kFull, first[i]));
      attended += __popc(__ballot_sync(kFull, cand[i] >= 0));
    }
  }

  // Writes the union's blocks and their tokens, in the order of their first
  // occurrence, to blocks[0, count) and tokens[0, count) (all 32 lanes).
  __device__ void store(int32_t* blocks, uint64_t* tokens, int lane) const {
    int base = 0;
    CUTE_UNROLL
    for (int i = 0; i < kRegs; ++i) {
      const uint32_t firsts = __ballot_sync(0xFFFFFFFFu, first[i]);
      if (first[i]) {
        const int at = base + __popc(firsts & ((1u << lane) - 1));
        blocks[at] = cand[i];
        tokens[at] = tokens_of[i];
      }
      base += __popc(firsts);
    }
    __syncwarp();
  }
};

// The producer's two warps (warps 0 and 1 of the CTA call it together). For
// each tile of the CTA's sequence, warp 1 builds the union of its selected
// blocks and writes it as a list to shared memory once warp 0 is done with the
// previous tile's; warp 0 loads the tile's rows (via `load_rows(tile, q_len)`,
// cp.async by this warp) once the consumers have released the previous tile's,
// and streams K_c, V_c for every block of the list. Ring order: with kLagV
// (the forward) K_0, K_1, V_0, K_2, V_1, ...: the consumer issues
// S_u = Q K_u^T together with O += P_{u-1} V_{u-1} and frees K_u before
// V_{u-1}; without, K_0, V_0, K_1, V_1, ... (One warp doing both kept the
// consumers waiting: first for the rows, then for K/V blocks while it built
// the next union.)
template <class Traits, bool kLagV, class SharedStorage, class LoadRows>
__device__ void produce_tiles(SharedStorage& ss, const SparseShape& s,
                              const TmaKV<Traits>& tma_k, const TmaKV<Traits>& tma_v,
                              int64_t first_tile, int64_t tile_stride, LoadRows load_rows) {
  constexpr int kSlots = Traits::kSlots;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x / 32 == 1) {  // the union builder
    int64_t round = 0;
    for (int64_t index = first_tile; index < s.tiles; index += tile_stride, ++round) {
      const SparseTile tile(index, s.B, s.Hkv, s.chunks, s.tokens);
      const TileUnion<Traits> u(s, tile, s.q_lengths[tile.b], s.kv_lengths[tile.b], lane);
      ClusterBarrier::wait(&ss.list_empty, static_cast<uint32_t>((round & 1) ^ 1));
      u.store(ss.union_block, ss.union_tokens, lane);
      if (lane == 0) ss.union_count = u.count;
      ClusterBarrier::arrive(&ss.list_full);
    }
    return;
  }

  if (lane == 0) {
    cute::prefetch_tma_descriptor(tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(tma_v.get_tma_descriptor());
  }
  Tensor sRing = make_tensor(make_smem_ptr(ss.kv), typename Traits::SmemLayoutRing{});
  uint32_t seq = 0;  // K/V loads issued so far (ring position)
  int64_t round = 0;
  for (int64_t index = first_tile; index < s.tiles; index += tile_stride, ++round) {
    const SparseTile tile(index, s.B, s.Hkv, s.chunks, s.tokens);
    ClusterBarrier::wait(&ss.list_full, static_cast<uint32_t>(round & 1));
    const int count = ss.union_count;

    // The rows, once the consumers are done with the previous tile's.
    ClusterBarrier::wait(&ss.q_empty, static_cast<uint32_t>((round & 1) ^ 1));
    if (lane == 0) ss.tile_blocks = count;
    load_rows(tile, s.q_lengths[tile.b]);
    cp_async_wait_and_fence();
    ClusterBarrier::arrive(&ss.q_full);

    auto issue = [&](const auto& tma, int32_t c, uint64_t tokens, bool with_meta) {
      const int slot = static_cast<int>(seq % kSlots);
      ClusterBarrier::wait(&ss.empty[slot], ((seq / kSlots) & 1) ^ 1);
      if (lane == 0) {
        if (with_meta) {
          ss.slot_block[slot] = c;
          ss.slot_tokens[slot] = tokens;
        }
        // Not load_kv_block (kv_block_tma.hpp): the same copy, but through it
        // ptxas schedules this kernel's consumers differently (SASS compared).
        Tensor mKV = tma.get_tma_tensor(make_shape(static_cast<int>(s.Sk), Int<Traits::kD>{},
                                                   static_cast<int>(s.Hkv),
                                                   static_cast<int>(s.B)));
        Tensor gKV = local_tile(mKV(_, _, tile.g, tile.b), typename Traits::TileKV{},
                                make_coord(_, _0{}));  // (keys, D, block)
        auto cta = tma.get_slice(_0{});
        ClusterTransactionBarrier::arrive_and_expect_tx(&ss.full[slot], Traits::kBytesKV);
        copy(tma.with(ss.full[slot]), cta.partition_S(gKV)(_, _, _, c),
             cta.partition_D(sRing)(_, _, _, slot));
      }
      __syncwarp();
      ++seq;
    };
    int32_t pending_v = -1;
    for (int e = 0; e < count; ++e) {
      const int32_t c = ss.union_block[e];
      const uint64_t tokens = ss.union_tokens[e];
      if (e == count - 1) ClusterBarrier::arrive(&ss.list_empty);  // its last read
      issue(tma_k, c, tokens, true);
      if (!kLagV) {
        issue(tma_v, c, 0, false);
      } else {
        if (pending_v >= 0) issue(tma_v, pending_v, 0, false);
        pending_v = c;
      }
    }
    if (count == 0) ClusterBarrier::arrive(&ss.list_empty);
    if (pending_v >= 0) issue(tma_v, pending_v, 0, false);
  }
}

}  // namespace jax_msa::sm90
