// block_scores and the fused indexer on SM90 (spec §3.1, §3.3): wgmma for
// scale * qi . ki^T, the causal mask and the max over each 128-key block in
// registers; only one float per (row, block) reaches memory.
//
// Kernel (block_scores_kernel): one CTA per tile of 128 flattened
// (token, head) rows of one batch row, heaviest tiles (last tokens) first.
//  - warpgroup 0, one thread: TMA loads of the Q tile (once) and of ki blocks
//    0 .. blocks-1 into a kStages-deep ring (full / empty mbarriers);
//  - warpgroups 1 and 2 (64 rows each): per block a 64 x 128 x Di wgmma
//    chain from shared memory into one of two register accumulators; the
//    chain of block c + 1 is issued before the epilogue of block c runs, so
//    the tensor cores stay busy during the row maxima.
// Blocks past the tile's last local block are skipped (and written -inf for
// block_scores); blocks that some row sees only in part get the per-element
// mask. TMA clips at each batch row's end (zero fill), so nothing outside qi
// or ki is read whatever the lengths.
//
// Indexer on CUDA = three calls whose intermediates are XLA buffers:
// indexer_scores (block scores without the -inf fill, and with lse the
// per-block sums of exp(s - max)), indexer_select (indexer_select.cu: the
// top-k rule, one warp per row), selected_lse (cuda/selected_lse.cu: the lse
// of the selected blocks from the stored (max, sum) pairs).
#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>

#include "kernels/cuda/block_scores_problem.hpp"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/block_scores_traits.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/tile_geometry.hpp"

namespace jax_msa::sm90 {
namespace {

using namespace cute;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

// qi viewed as [Sq*Hi, Di, B] and ki as [Sk, Di, B]: the batch index is an
// outer TMA mode, so a box never crosses into the next batch row.
template <class Traits>
auto make_tma_q(const typename Traits::Element* qi, int rows, int batch) {
  auto layout = make_layout(make_shape(rows, Int<Traits::kDi>{}, batch),
                            make_stride(int64_t{Traits::kDi}, _1{}, int64_t{rows} * Traits::kDi));
  return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(qi), layout),
                       typename Traits::SmemLayoutQ{}, typename Traits::TileQ{}, _1{});
}

template <class Traits>
auto make_tma_k(const typename Traits::Element* ki, int keys, int batch) {
  auto layout = make_layout(make_shape(keys, Int<Traits::kDi>{}, batch),
                            make_stride(int64_t{Traits::kDi}, _1{}, int64_t{keys} * Traits::kDi));
  return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(ki), layout),
                       typename Traits::SmemLayoutKStage{}, typename Traits::TileK{}, _1{});
}

template <class Traits>
struct Params : cuda::ScoresShape {
  using TmaQ = decltype(make_tma_q<Traits>(nullptr, 1, 1));
  using TmaK = decltype(make_tma_k<Traits>(nullptr, 1, 1));
  TmaQ tma_q;
  TmaK tma_k;
};

template <class Traits, bool kWithSums>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    block_scores_kernel(const __grid_constant__ Params<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kStages = Traits::kStages;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);

  // Heaviest tiles (the last rows see the most blocks) are handed out first.
  const int64_t b = blockIdx.x % p.batch;
  const int64_t tile = p.tiles - 1 - blockIdx.x / p.batch;
  const int64_t row0 = tile * Traits::kRows;
  const TileGeometry geo(row0, p.rows, p.hi, p.q_lengths[b], p.kv_lengths[b], Traits::kRows);
  const int64_t blocks = geo.blocks;

  const int warpgroup = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    ClusterBarrier::init(&ss.q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      ClusterBarrier::init(&ss.k_full[s], 1);
      ClusterBarrier::init(&ss.k_empty[s], 128 * Traits::kConsumerWarpgroups);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});

  if (warpgroup == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x == 0 && blocks > 0) {
      cute::prefetch_tma_descriptor(p.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(p.tma_k.get_tma_descriptor());
      const int batch = static_cast<int>(p.batch);
      Tensor mQ = p.tma_q.get_tma_tensor(
          make_shape(static_cast<int>(p.rows), Int<Traits::kDi>{}, batch));
      Tensor gQ = local_tile(mQ(_, _, b), typename Traits::TileQ{}, make_coord(tile, _0{}));
      auto tma_q = p.tma_q.get_slice(_0{});
      ClusterTransactionBarrier::arrive_and_expect_tx(&ss.q_full, Traits::kBytesQ);
      copy(p.tma_q.with(ss.q_full), tma_q.partition_S(gQ), tma_q.partition_D(sQ));

      Tensor mK = p.tma_k.get_tma_tensor(
          make_shape(static_cast<int>(p.keys), Int<Traits::kDi>{}, batch));
      Tensor gK = local_tile(mK(_, _, b), typename Traits::TileK{}, make_coord(_, _0{}));
      auto tma_k = p.tma_k.get_slice(_0{});
      Tensor tKgK = tma_k.partition_S(gK);  // (TMA, m, k, block)
      Tensor tKsK = tma_k.partition_D(sK);  // (TMA, m, k, stage)
      for (int64_t c = 0; c < blocks; ++c) {
        const int stage = static_cast<int>(c % kStages);
        const uint32_t phase = static_cast<uint32_t>((c / kStages) & 1);
        ClusterBarrier::wait(&ss.k_empty[stage], phase ^ 1);
        ClusterTransactionBarrier::arrive_and_expect_tx(&ss.k_full[stage], Traits::kBytesK);
        copy(p.tma_k.with(ss.k_full[stage]), tKgK(_, _, _, c), tKsK(_, _, _, stage));
      }
    }
    return;
  }

  // Consumers.
  cutlass::arch::warpgroup_reg_alloc<232>();
  const int tid = threadIdx.x - 128;
  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor tSrQ = thr.partition_fragment_A(sQ);  // (MMA, 1, Di/16)
  Tensor tSrK = thr.partition_fragment_B(sK);  // (MMA, 1, Di/16, stage)
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kKeys>>;
  Tensor acc0 = partition_fragment_C(mma, TileS{});
  Tensor acc1 = partition_fragment_C(mma, TileS{});
  Tensor coord = thr.partition_C(make_identity_tensor(TileS{}));
  Tensor acc0_rc = make_tensor(acc0.data(), rowcol_layout(acc0.layout()));
  Tensor acc1_rc = make_tensor(acc1.data(), rowcol_layout(acc1.layout()));
  Tensor coord_rc = make_tensor(coord.data(), rowcol_layout(coord.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(acc0_rc))::value;

  RowState<kRowsPerThread> rows;
  const int64_t out_base = b * p.rows + row0;
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int tr = get<0>(coord_rc(r, 0));
    rows.position[r] = geo.position(tr);
    rows.out_row[r] = geo.row_exists(tr) ? out_base + tr : -1;
  }

  if (blocks > 0) {
    ClusterBarrier::wait(&ss.q_full, 0);
    const float abs_scale = fabsf(p.scale);
    const bool negate = p.scale < 0;

    auto issue = [&](auto& acc, int64_t c) {
      const int stage = static_cast<int>(c % kStages);
      ClusterBarrier::wait(&ss.k_full[stage], static_cast<uint32_t>((c / kStages) & 1));
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tSrQ); ++k) {
        cute::gemm(mma, tSrQ(_, _, k), tSrK(_, _, k, stage), acc);
        mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    auto finish = [&](auto& acc, const auto& acc_rc, int64_t c) {
      warpgroup_fence_operand(acc);
      ClusterBarrier::arrive(&ss.k_empty[c % kStages]);  // the wgmma has read it
      const bool masked = geo.needs_mask(c);
      if (negate) {
        block_rowmax<kWithSums, true>(acc_rc, coord_rc, rows, c, masked, abs_scale, p.NB,
                                      p.scores, p.sums);
      } else {
        block_rowmax<kWithSums, false>(acc_rc, coord_rc, rows, c, masked, abs_scale, p.NB,
                                       p.scores, p.sums);
      }
    };

    // Block c + 1's wgmma chain runs while block c's epilogue does. The
    // steady-state loop has no branch around a chain in flight, which keeps
    // ptxas from serialising the wgmmas (C7514).
    issue(acc0, 0);
    int64_t c = 0;
    for (; c + 2 < blocks; c += 2) {
      issue(acc1, c + 1);
      warpgroup_wait<1>();
      finish(acc0, acc0_rc, c);
      issue(acc0, c + 2);
      warpgroup_wait<1>();
      finish(acc1, acc1_rc, c + 1);
    }
    if (c + 1 < blocks) {
      issue(acc1, c + 1);
      warpgroup_wait<1>();
      finish(acc0, acc0_rc, c);
      warpgroup_wait<0>();
      finish(acc1, acc1_rc, c + 1);
    } else {
      warpgroup_wait<0>();
      finish(acc0, acc0_rc, c);
    }
  }

  if (p.fill_future && blocks < p.NB) {
    // -inf past the tile's last local block: rows of this warpgroup, one row
    // at a time, consecutive blocks across the threads (coalesced).
    const int wg_tid = tid % 128;
    const int first_row = (warpgroup - 1) * 64;
    for (int r = first_row; r < first_row + 64; ++r) {
      if (!geo.row_exists(r)) break;
      float* out = p.scores + (out_base + r) * p.NB;
      for (int64_t c = blocks + wg_tid; c < p.NB; c += 128) out[c] = -INFINITY;
    }
  }
#endif
}

using cuda::ScoresProblem;

struct Sm90 {
  template <class Element, int kDi>
  static cudaError_t launch(const ScoresProblem& pr, cudaStream_t stream);
};

template <class Element, int kDi>
cudaError_t Sm90::launch(const ScoresProblem& pr, cudaStream_t stream) {
  using Traits = BlockScoresTraits<Element, kDi>;
  const cuda::ScoresShape shape = cuda::scores_shape<Traits::kRows>(pr);
  const Params<Traits> p{shape,
                         make_tma_q<Traits>(static_cast<const Element*>(pr.qi),
                                            static_cast<int>(shape.rows), static_cast<int>(pr.B)),
                         make_tma_k<Traits>(static_cast<const Element*>(pr.ki), static_cast<int>(pr.Sk),
                                            static_cast<int>(pr.B))};
  return cuda::launch_scores<Traits>(block_scores_kernel<Traits, true>,
                                     block_scores_kernel<Traits, false>, p, p.tiles, pr, stream);
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool block_scores_supported(DType dtype, int64_t Di) {
  return (dtype == DType::kBF16 || dtype == DType::kF16) && (Di == 64 || Di == 128);
}

cudaError_t block_scores(DType dtype, const void* qi, const void* ki, const int32_t* q_lengths,
                         const int32_t* kv_lengths, float* scores, int64_t B, int64_t Sq,
                         int64_t Sk, int64_t Hi, int64_t Di, float scale, cudaStream_t stream) {
  const ScoresProblem pr{qi, ki, q_lengths, kv_lengths, scores, nullptr, B, Sq, Sk, Hi, scale,
                        /*fill_future=*/true};
  return run_block_scores<sm90::Sm90>(dtype, Di, pr, stream);
}

cudaError_t indexer_scores(DType dtype, const void* qi, const void* ki, const int32_t* q_lengths,
                           const int32_t* kv_lengths, float* scores, float* sums, int64_t B,
                           int64_t Sq, int64_t Sk, int64_t Hi, int64_t Di, float scale,
                           cudaStream_t stream) {
  // The selection and the lse read only blocks c <= the row's local block:
  // the blocks past a tile's last local block need no -inf fill.
  const ScoresProblem pr{qi, ki, q_lengths, kv_lengths, scores, sums, B, Sq, Sk, Hi, scale,
                        /*fill_future=*/false};
  return run_block_scores<sm90::Sm90>(dtype, Di, pr, stream);
}

}  // namespace jax_msa::cuda
