// block_scores and the indexer's scores step for every GPU since Ampere (the
// portable family: mma.sync, ldmatrix and cp.async only; see attention_fwd.cu).
// Same results as sm90/block_scores.cu: scale * qi . ki^T, the causal mask and
// the max over each 128-key block in registers, one float per (row, block) to
// memory (and with sums, the sum of exp(s - max) over the block's visible keys).
//
// One CTA per tile of 128 flattened (token, head) rows of one batch row,
// heaviest tiles (last tokens) first, as on SM90 (TileGeometry), so that each
// ki block loaded serves every index head of 128 / Hi tokens. Four warps of
// 32 rows each; a warp's rows see the whole 128-key block, so a row's max is
// a reduction over the four lanes of a quad (block_rowmax, shared with SM90:
// an mma.sync accumulator holds a row's columns in one quad, as wgmma's does).
// 32 rows per warp (two m16 atoms) halve the shared-memory reads of ki per
// product against 16; Q (32 KiB at Di 128) stays in shared memory and is read
// again per block, a quarter of ki's reads.
//
// ki blocks stream through two shared stages by cp.async: block c + 2 is
// issued as soon as every warp's products of block c are done, so it loads
// during block c's epilogue and block c + 1's products. Keys at or past
// min(kv_len, Sk) and rows past Sq * Hi are zero-filled, not read; blocks past
// the tile's last local block are skipped (and written -inf for block_scores).
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/block_scores_problem.hpp"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"
#include "kernels/sm90/tile_geometry.hpp"

namespace jax_msa::portable {
namespace {

using namespace cute;
using sm90::cp_async_16;
using sm90::RowState;
using sm90::TileGeometry;

template <class Element_, int kDi_>
struct ScoresTraits {
  using Element = Element_;
  static constexpr int kDi = kDi_;
  static_assert(kDi == 64 || kDi == 128, "index head dim 64 or 128");
  static constexpr int kRows = 128;  // (token, head) rows per tile
  static constexpr int kKeys = 128;  // keys per block (spec §2)
  static constexpr int kWarps = 4;   // 32 rows each
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = 2;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                     SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // Four warps along M, each repeated twice over the 128 rows; N in 16s so
  // that one ldmatrix.x4 feeds two atoms.
  using TiledMma = decltype(make_tiled_mma(MmaAtom{}, Layout<Shape<Int<kWarps>, _1, _1>>{},
                                           Tile<Int<kRows>, _16, _16>{}));
  // 128-byte rows of 16-byte chunks swizzled within 8-row atoms: conflict-free
  // cp.async stores and ldmatrix loads.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kDi>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kDi>, Int<kStages>>{}));

  struct SharedStorage {
    alignas(128) Element q[cosize_v<SmemLayoutQ>];
    alignas(128) Element k[cosize_v<SmemLayoutK>];
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

template <class Traits>
using Params = cuda::PointerScoresParams<Traits>;

// The tile's Q rows into shared memory (all threads); rows past `rows` are zeros.
template <class Traits>
__device__ void load_q(typename Traits::SharedStorage& ss, const Params<Traits>& p, int64_t b,
                       int64_t row0) {
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  constexpr int kChunks = Traits::kDi / 8;  // 16-byte chunks per row
  const int chunk = threadIdx.x % kChunks;
  CUTE_UNROLL
  for (int i = 0; i < Traits::kRows * kChunks / Traits::kThreads; ++i) {
    const int r = threadIdx.x / kChunks + i * (Traits::kThreads / kChunks);
    const bool valid = row0 + r < p.rows;
    const auto* src = p.qi + (b * p.rows + row0 + r) * Traits::kDi + 8 * chunk;
    cp_async_16(&sQ(r, 8 * chunk), valid ? src : p.qi, valid);
  }
}

// Keys of block c of batch row b into `stage` (all threads); keys at or past
// `limit` (min(kv_len, Sk)) are zeros.
template <class Traits>
__device__ void load_block(typename Traits::SharedStorage& ss, const Params<Traits>& p, int64_t b,
                           int64_t c, int64_t limit, int stage) {
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});
  constexpr int kChunks = Traits::kDi / 8;
  const int chunk = threadIdx.x % kChunks;
  CUTE_UNROLL
  for (int i = 0; i < Traits::kKeys * kChunks / Traits::kThreads; ++i) {
    const int key = threadIdx.x / kChunks + i * (Traits::kThreads / kChunks);
    const int64_t at = c * Traits::kKeys + key;
    const bool valid = at < limit;
    const auto* src = p.ki + (b * p.keys + at) * Traits::kDi + 8 * chunk;
    cp_async_16(&sK(key, 8 * chunk, stage), valid ? src : p.ki, valid);
  }
}

template <class Traits, bool kWithSums>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    block_scores_kernel(const __grid_constant__ Params<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Traits::Element;
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x;

  // Heaviest tiles (the last rows see the most blocks) are handed out first.
  const int64_t b = blockIdx.x % p.batch;
  const int64_t tile = p.tiles - 1 - blockIdx.x / p.batch;
  const int64_t row0 = tile * Traits::kRows;
  const int64_t kv_len = p.kv_lengths[b];
  const TileGeometry geo(row0, p.rows, p.hi, p.q_lengths[b], kv_len, Traits::kRows);
  const int64_t blocks = geo.blocks;
  const int64_t key_limit = kv_len < p.keys ? kv_len : p.keys;

  if (blocks > 0) {
    load_q<Traits>(ss, p, b, row0);
    load_block<Traits>(ss, p, b, 0, key_limit, 0);
    cp_async_commit();
    if (blocks > 1) load_block<Traits>(ss, p, b, 1, key_limit, 1);
    cp_async_commit();
  }

  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kKeys>>;
  Tensor tSrQ = thr.partition_fragment_A(sQ);           // (MMA, 2, Di / 16)
  Tensor tSrK = thr.partition_fragment_B(sK(_, _, 0));  // (MMA, keys / 16, Di / 16)
  Tensor acc = partition_fragment_C(mma, TileS{});
  Tensor coord = thr.partition_C(make_identity_tensor(TileS{}));
  Tensor acc_rc = make_tensor(acc.data(), rowcol_layout(acc.layout()));
  Tensor coord_rc = make_tensor(coord.data(), rowcol_layout(coord.layout()));

  auto copy_q = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_k = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto thr_q = copy_q.get_thread_slice(tid);
  auto thr_k = copy_k.get_thread_slice(tid);
  Tensor tSsQ = thr_q.partition_S(sQ);  // (CPY, 2, Di / 16)
  Tensor tSrQ_view = thr_q.retile_D(tSrQ);
  Tensor tSsK = thr_k.partition_S(sK);  // (CPY, keys / 16, Di / 16, stage)
  Tensor tSrK_view = thr_k.retile_D(tSrK);

  constexpr int kRowsPerThread = decltype(size<0>(acc_rc))::value;
  RowState<kRowsPerThread> rows;
  const int64_t out_base = b * p.rows + row0;
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int tr = get<0>(coord_rc(r, 0));
    rows.position[r] = geo.position(tr);
    rows.out_row[r] = geo.row_exists(tr) ? out_base + tr : -1;
  }

  const float abs_scale = fabsf(p.scale);
  const bool negate = p.scale < 0;
  for (int64_t c = 0; c < blocks; ++c) {
    const int stage = static_cast<int>(c % Traits::kStages);
    cp_async_wait<1>();  // block c (and Q) landed: only block c + 1 may be pending
    __syncthreads();
    clear(acc);
    CUTE_UNROLL
    for (int kd = 0; kd < size<2>(tSrK); ++kd) {
      copy(copy_q, tSsQ(_, _, kd), tSrQ_view(_, _, kd));
      copy(copy_k, tSsK(_, _, kd, stage), tSrK_view(_, _, kd));
      cute::gemm(mma, tSrQ(_, _, kd), tSrK(_, _, kd), acc);
    }
    __syncthreads();  // every warp has read the stage: refill it with block c + 2
    if (c + 2 < blocks) load_block<Traits>(ss, p, b, c + 2, key_limit, stage);
    cp_async_commit();
    const bool masked = geo.needs_mask(c);
    if (negate) {
      sm90::block_rowmax<kWithSums, true>(acc_rc, coord_rc, rows, c, masked, abs_scale, p.NB,
                                          p.scores, p.sums);
    } else {
      sm90::block_rowmax<kWithSums, false>(acc_rc, coord_rc, rows, c, masked, abs_scale, p.NB,
                                           p.scores, p.sums);
    }
  }

  if (p.fill_future && blocks < p.NB) {
    // -inf past the tile's last local block: one row at a time, consecutive
    // blocks across the threads (coalesced).
    for (int r = 0; r < Traits::kRows && geo.row_exists(r); ++r) {
      float* out = p.scores + (out_base + r) * p.NB;
      for (int64_t c = blocks + tid; c < p.NB; c += Traits::kThreads) out[c] = -INFINITY;
    }
  }
#endif
}

using cuda::ScoresProblem;

struct Portable {
  template <class Element, int kDi>
  static cudaError_t launch(const ScoresProblem& pr, cudaStream_t stream);
};

template <class Element, int kDi>
cudaError_t Portable::launch(const ScoresProblem& pr, cudaStream_t stream) {
  using Traits = ScoresTraits<Element, kDi>;
  return cuda::launch_pointer_scores<Traits>(block_scores_kernel<Traits, true>,
                                             block_scores_kernel<Traits, false>, pr, stream);
}

}  // namespace
}  // namespace jax_msa::portable

namespace jax_msa::cuda {

cudaError_t portable_block_scores(DType dtype, const void* qi, const void* ki,
                                  const int32_t* q_lengths, const int32_t* kv_lengths,
                                  float* scores, int64_t B, int64_t Sq, int64_t Sk, int64_t Hi,
                                  int64_t Di, float scale, cudaStream_t stream) {
  const ScoresProblem pr{qi, ki, q_lengths, kv_lengths, scores, nullptr, B, Sq, Sk, Hi, scale,
                        /*fill_future=*/true};
  return run_block_scores<portable::Portable>(dtype, Di, pr, stream);
}

cudaError_t portable_indexer_scores(DType dtype, const void* qi, const void* ki,
                                    const int32_t* q_lengths, const int32_t* kv_lengths,
                                    float* scores, float* sums, int64_t B, int64_t Sq, int64_t Sk,
                                    int64_t Hi, int64_t Di, float scale, cudaStream_t stream) {
  const ScoresProblem pr{qi, ki, q_lengths, kv_lengths, scores, sums, B, Sq, Sk, Hi, scale,
                        /*fill_future=*/false};
  return run_block_scores<portable::Portable>(dtype, Di, pr, stream);
}

}  // namespace jax_msa::cuda
