// Dense flash-attention forward on SM90 (spec §3.6): the dense sibling of the
// query-outer sparse forward (sparse_attention_fwd.cu), with the same tile
// shape, ring and consumers; the tile walks every visible key block.
//
// Tiles of 128 query tokens of one query head and batch row, the tile varying
// fastest; under a causal mask each head's last tiles (the most blocks) come
// first, so that its short ones fill the tail.
// - Non-causal: persistent. One CTA per SM takes tiles i, i + grid, ...; its
//   producer loads the next tile's Q (once the consumers have issued their
//   last S) and first K/V blocks while the consumers finish the current tile
//   (S = 1K: 0.93-1.06x cuDNN, against 0.87-0.89x with one CTA per tile).
// - Causal: one CTA per tile, handed out in order by the hardware as CTAs
//   finish (a static round-robin over these uneven tiles was slower: 0.76-0.84x
//   cuDNN at S = 1K, against 0.87-0.99x), and the two consumer warpgroups take
//   turns issuing their products (two named barriers), so that one's softmax
//   runs under the other's wgmma.
//   warpgroup 0: one thread loads Q by TMA, then K_0, K_1, V_0, K_2, V_1,
//     ..., V_last by TMA through the ring of K-or-V slots (the order in which
//     the consumers use them: S_u is issued together with P_{u-1} V_{u-1});
//   warpgroups 1, 2: 64 rows each. Per block: S = Q K^T (wgmma, both from
//     shared memory), the causal / length mask (only on blocks that need it),
//     the online softmax in exp2 with lazy rescaling of O, O += P V (wgmma, P
//     from registers). The softmax of S_u runs while the tensor cores work on
//     P_{u-1} V_{u-1} (query_outer_walk.hpp).
#include <algorithm>
#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/multiprocessors.h"
#include "kernels/sm90/kv_block_tma.hpp"
#include "kernels/sm90/online_softmax.hpp"
#include "kernels/sm90/query_outer_walk.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_block_index.hpp"
#include "kernels/sm90/sparse_attention_traits.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"
#include "kernels/sm90/tile_geometry.hpp"

namespace jax_msa::sm90 {
namespace {

using namespace cute;
using block_index::clamp_len;

// The query-outer tile shape with one row tensor: 128 rows of Q (here 128
// tokens of one head) and the ring of 128-key K/V slots; head dim kD.
template <class Element, int kD>
using DenseTraits = SparseAttentionTraits<Element, 1, kD>;

struct DenseShape {
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  int64_t B, Sq, Sk, Hq, Hkv;
  int64_t tiles;  // query tiles per (head, batch row)
};

// Tile `index` of the order above. The tile varies fastest, then the head,
// then the batch row: the CTAs in flight together read the K/V of one or two
// heads, which stay in L2 (head fastest made a wave stream the K/V of up to
// 132 heads from HBM). Causal: a head's last (longest) tile first.
struct DenseTile {
  int64_t tile, h, b;
  template <bool kCausal>
  __device__ static DenseTile at(int64_t index, const DenseShape& s) {
    const int64_t i = index % s.tiles;
    return {kCausal ? s.tiles - 1 - i : i, index / s.tiles % s.Hq, index / s.tiles / s.Hq};
  }
};

template <class Traits>
struct DenseFwdParams {
  TmaKV<Traits> tma_q, tma_k, tma_v;  // [S, D, H, B] views (kv_block_tma.hpp)
  DenseShape shape;
  typename Traits::Element* out;
  float* lse;
  float scale_log2;  // scale * log2(e)
};

// The rows of TileRows (same fragment positions, masks and output rows),
// where every row takes every block: a padded row masks itself out with
// last_key = -1 (it then sees nothing: out 0, lse -inf).
template <int kRowsPerThread>
struct DenseRows : TileRows<kRowsPerThread> {
  using TileRows<kRowsPerThread>::TileRows;

  __device__ bool member(int, uint64_t) const { return true; }

  template <bool kCausal>
  __device__ void start(const TileGeometry& geo, const DenseShape& s, int64_t b, int64_t h) {
    const int64_t kv_len = geo.offset + geo.q_len;
    this->kv_len = kv_len;
    // partial() compares with the smallest position of the tile: no causal
    // limit without the mask, -1 (always partial) where a row is padded.
    this->first_position =
        kCausal || geo.first_position < 0 ? geo.first_position : int64_t{INT_MAX};
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = this->row_base + 8 * r;
      const int64_t token = geo.row0 + row;
      const int64_t position = geo.offset + token;
      const int64_t last = kCausal ? std::min(position, kv_len - 1) : kv_len - 1;
      this->token_of[r] = geo.row_exists(row) ? row : -1;
      this->last_key[r] = token < geo.q_len ? static_cast<int>(std::max<int64_t>(last, -1)) : -1;
      this->out_row[r] = (b * s.Sq + token) * s.Hq + h;
    }
  }
};

// Key blocks the tile walks: up to the last one any valid row sees.
template <bool kCausal>
__device__ int dense_tile_blocks(const TileGeometry& geo) {
  const int64_t kv_len = geo.offset + geo.q_len;
  if (kCausal) return static_cast<int>(std::max<int64_t>(geo.blocks, 0));
  return geo.row0 < geo.q_len ? static_cast<int>((kv_len + kBlockKeys - 1) / kBlockKeys) : 0;
}

// The producer thread, for one tile of blocks > 0 key blocks: Q (persistent:
// once the consumers are done with the previous tile's, its `round`-th), then
// the K/V blocks in the consumers' order; `seq` is the ring position.
template <class Traits, bool kPersistent, class SharedStorage>
__device__ void produce_dense_tile(SharedStorage& ss, const DenseFwdParams<Traits>& p,
                                   const DenseTile& t, int blocks, int64_t round, uint32_t& seq) {
  constexpr int kSlots = Traits::kSlots;
  constexpr int kSlotElements = cosize_v<typename Traits::SmemLayoutKV>;
  const DenseShape& s = p.shape;
  const int64_t g = t.h / (s.Hq / s.Hkv);
  if constexpr (kPersistent) {
    ClusterBarrier::wait(&ss.q_empty, static_cast<uint32_t>((round & 1) ^ 1));
  }
  ClusterTransactionBarrier::arrive_and_expect_tx(&ss.q_full, Traits::kBytesKV);
  load_kv_block<Traits>(p.tma_q, s.Sq, s.Hq, s.B, t.b, t.h, t.tile, ss.rows[0], ss.q_full);
  auto issue = [&](const TmaKV<Traits>& tma, int c) {
    const int slot = static_cast<int>(seq % kSlots);
    ClusterBarrier::wait(&ss.empty[slot], ((seq / kSlots) & 1) ^ 1);
    ClusterTransactionBarrier::arrive_and_expect_tx(&ss.full[slot], Traits::kBytesKV);
    load_kv_block<Traits>(tma, s.Sk, s.Hkv, s.B, t.b, g, c, ss.kv + slot * kSlotElements,
                          ss.full[slot]);
    ++seq;
  };
  for (int c = 0; c < blocks; ++c) {
    issue(p.tma_k, c);
    if (c > 0) issue(p.tma_v, c - 1);
  }
  issue(p.tma_v, blocks - 1);
}

template <class Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    dense_attention_fwd_kernel(const __grid_constant__ DenseFwdParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kSlots = Traits::kSlots;
  constexpr bool kPersistent = !kCausal;  // see the top
  constexpr bool kTakeTurns = kCausal;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const DenseShape& s = p.shape;
  auto geometry = [&](const DenseTile& t) {
    return TileGeometry(t.tile * Traits::kRows, s.Sq, 1, clamp_len(s.q_lengths, t.b, s.Sq),
                        clamp_len(s.kv_lengths, t.b, s.Sk), Traits::kRows);
  };
  // Calls visit(tile) for the CTA's tiles: blockIdx.x, + gridDim.x, ... when
  // persistent, else its own one (kept out of a loop, where its geometry
  // stays in uniform registers).
  auto for_each_tile = [&](auto&& visit) {
    if constexpr (kPersistent) {
      for (int64_t index = blockIdx.x; index < s.tiles * s.Hq * s.B; index += gridDim.x) {
        visit(DenseTile::at<kCausal>(index, s));
      }
    } else {
      visit(DenseTile::at<kCausal>(blockIdx.x, s));
    }
  };

  init_tile_barriers<Traits>(ss, 1);  // q_full: one expect-tx arrival (Q by TMA)

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<56>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_v.get_tma_descriptor());
      uint32_t seq = 0;
      int64_t round = 0;  // tiles with key blocks so far
      for_each_tile([&](const DenseTile& t) {
        const int blocks = dense_tile_blocks<kCausal>(geometry(t));
        if (blocks > 0) produce_dense_tile<Traits, kPersistent>(ss, p, t, blocks, round++, seq);
      });
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<224>();
  const int tid = threadIdx.x - 128;
  const int w = warpgroup - 1;
  QueryOuterFragments<Traits> f(ss.rows[0], ss.kv, tid);
  Tensor accS_rc = f.s_rows();
  Tensor accO_rc = f.o_rows();
  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  DenseRows<kRowsPerThread> rows(tid);
  OnlineSoftmax<kRowsPerThread> softmax;
  float factors[kRowsPerThread];
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) factors[r] = p.scale_log2;

  uint32_t seq = 0;
  int64_t round = 0;
  for_each_tile([&](const DenseTile& t) {
    const TileGeometry geo = geometry(t);
    const int blocks = dense_tile_blocks<kCausal>(geo);
    rows.template start<kCausal>(geo, s, t.b, t.h);
    softmax.start(factors);
    clear(f.accO);

    // Turns: named barrier w is warpgroup w's, warpgroup 0 goes first; each
    // turn issues S_u (and P_{u-1} V_{u-1}). Warpgroup 1 does not pass its
    // last turn, so that every arrival is waited for.
    auto take_turn = [&] {
      if constexpr (kTakeTurns) cutlass::arch::NamedBarrier::sync(256, w);
    };
    auto pass_turn = [&](int u) {
      if constexpr (kTakeTurns) {
        if (!(u == blocks - 1 && w == 1)) cutlass::arch::NamedBarrier::arrive(256, 1 - w);
      }
    };
    if (blocks > 0) {
      ClusterBarrier::wait(&ss.q_full, static_cast<uint32_t>(round++ & 1));
      if (kTakeTurns && w == 1) cutlass::arch::NamedBarrier::arrive(256, 0);
    }

    int s_issued = 0, pv_issued = 0;
    walk_blocks(
        blocks,
        [&] {  // S = Q K^T for block s_issued
          const int slot = static_cast<int>(seq % kSlots);
          ClusterBarrier::wait(&ss.full[slot], (seq / kSlots) & 1);
          ++seq;
          take_turn();
          issue_product(f.mma_s, f.tSrQ, f.tSrK(_, _, _, slot), f.accS);
          if (s_issued == 0) pass_turn(0);
          ++s_issued;
          return slot;
        },
        [&] {  // O += P V for block pv_issued; all but the last share a turn with an S
          const int slot = static_cast<int>(seq % kSlots);
          ClusterBarrier::wait(&ss.full[slot], (seq / kSlots) & 1);
          ++seq;
          issue_accumulate(f.mma_o, f.tOrP, f.tOrV(_, _, _, slot), f.accO);
          if (pv_issued + 1 < blocks) pass_turn(pv_issued + 1);
          ++pv_issued;
          return slot;
        },
        [&](int slot, int u) {
          warpgroup_fence_operand(f.accS);
          ClusterBarrier::arrive(&ss.empty[slot]);
          // Q read for the last time: the producer may load the next tile's.
          if (kPersistent && u == blocks - 1) ClusterBarrier::arrive(&ss.q_empty);
        },
        [&](int slot) {
          warpgroup_fence_operand(f.accO);
          ClusterBarrier::arrive(&ss.empty[slot]);
        },
        [&] {
          softmax.apply(accS_rc, rows, int64_t{s_issued - 1} * Traits::kKeys, Traits::kKeys,
                        ~uint64_t{0});
        },
        [&] {
          softmax.rescale_output(accO_rc);
          acc_to_operand(f.accS, f.tOrP);
        });

    softmax.template store<Traits::kD>(accO_rc, rows, p.out, p.lse, tid);
  });
#endif
}

template <class Element, int kD, bool kCausal>
cudaError_t launch(const cuda::DenseAttentionArgs& a, void* out, float* lse, cudaStream_t stream) {
  using Traits = DenseTraits<Element, kD>;
  static_assert(Traits::kRows == Traits::kKeys, "Q tiles load through the K/V block TMA");
  const DenseFwdParams<Traits> p{
      make_tma_kv<Traits>(static_cast<const Element*>(a.q), a.Sq, a.Hq, a.B),
      make_tma_kv<Traits>(static_cast<const Element*>(a.k), a.Sk, a.Hkv, a.B),
      make_tma_kv<Traits>(static_cast<const Element*>(a.v), a.Sk, a.Hkv, a.B),
      DenseShape{a.q_lengths, a.kv_lengths, a.B, a.Sq, a.Sk, a.Hq, a.Hkv,
                 (a.Sq + Traits::kRows - 1) / Traits::kRows},
      static_cast<Element*>(out),
      lse,
      a.scale * 1.4426950408889634f};
  auto kernel = dense_attention_fwd_kernel<Traits, kCausal>;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            Traits::kSmemBytes);
  if (status != cudaSuccess) return status;
  // Non-causal: persistent, one CTA per SM; causal: one CTA per tile.
  const int64_t tiles = p.shape.tiles * a.Hq * a.B;
  const int64_t grid =
      kCausal ? tiles : std::min<int64_t>(cuda::multiprocessor_count(132), tiles);
  kernel<<<static_cast<unsigned>(grid), Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool dense_attention_supported(DType dtype, int64_t D) {
  return (dtype == DType::kBF16 || dtype == DType::kF16) && (D == 128 || D == 64);
}

bool dense_attention_args_valid(DType dtype, const DenseAttentionArgs& a) {
  // One CTA per (query tile of 128, head, batch row) on grid x (< 2^31); TMA
  // takes 32-bit extents, and an empty k has no TMA view.
  return dense_attention_supported(dtype, a.D) && a.Hkv >= 1 && a.Hq % a.Hkv == 0 && a.B >= 0 &&
         a.Sq >= 0 && a.Sq <= INT_MAX && a.Sk > 0 && a.Sk <= INT_MAX - 256 &&
         a.B * a.Hq <= INT_MAX / std::max<int64_t>(1, (a.Sq + 127) / 128);
}

cudaError_t dense_attention_fwd(DType dtype, const DenseAttentionArgs& a, void* out, float* lse,
                                cudaStream_t stream) {
  if (!dense_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0 || a.Hq == 0) return cudaSuccess;
  // The instantiations: {bf16, f16} x {D 128, 64} x {causal, not}.
  using BF16 = cutlass::bfloat16_t;
  using F16 = cutlass::half_t;
  using Launch = cudaError_t (*)(const DenseAttentionArgs&, void*, float*, cudaStream_t);
  static constexpr Launch kLaunch[2][2][2] = {
      {{sm90::launch<BF16, 128, false>, sm90::launch<BF16, 128, true>},
       {sm90::launch<BF16, 64, false>, sm90::launch<BF16, 64, true>}},
      {{sm90::launch<F16, 128, false>, sm90::launch<F16, 128, true>},
       {sm90::launch<F16, 64, false>, sm90::launch<F16, 64, true>}}};
  return kLaunch[dtype == DType::kBF16 ? 0 : 1][a.D == 128 ? 0 : 1][a.causal ? 1 : 0](a, out, lse,
                                                                                      stream);
}

}  // namespace jax_msa::cuda
