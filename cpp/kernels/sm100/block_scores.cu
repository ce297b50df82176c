// block_scores and the indexer's scores for Blackwell (the SM100 family,
// spec §3.1, §3.3): the contract of sm90/block_scores.cu (cuda::block_scores,
// cuda::indexer_scores), with S = qi ki^T by tcgen05 MMA into tensor memory.
// Built as sm_100a SASS only (empty kernels in the other passes, never
// launched: check_device).
//
// One CTA of 128 threads per tile of 128 flattened (token, head) rows of qi
// [B, Sq * Hi, Di] (heaviest tiles first); thread t owns tile row t, which is
// lane t of tensor memory. Columns 0 .. 255: two S buffers (fp32, 128 rows x
// 128 keys), so that the MMA of block c + 1 runs while the rows of block c
// are reduced. Per block c of the tile (blocks 0 .. geo.blocks - 1):
//
//   MMA:     warp 0 issues S_{c+1} = Q K_{c+1}^T into buffer (c + 1) % 2
//            (Di / 16 steps of k = 16), tcgen05.commit -> s_full[(c+1) % 2];
//   loads:   once S_c is done, every thread cp.asyncs its share of block
//            c + kStages into K_c's stage (a ring of kStages; Q once);
//   rows:    each thread tcgen05.lds its row of S_c (128 registers) and
//            writes the masked max (and with the indexer the sum of exp) of
//            the row over the block's visible keys (block_rowmax, one lane
//            per row).
//
// Synchronisation:
//   s_full[k] (mbarrier, 1 arrival: tcgen05.commit after S_c, k = c % 2):
//     S_c is in buffer k and K_c has been read. Parity (c / 2) & 1.
//   __syncthreads before S_{c+1} (and before S_0): Q and K_{c+1} have landed
//     (cp.async.wait_group, fence.proxy.async for the tensor cores); every
//     tcgen05.ld of S_{c-1}, the last user of buffer (c + 1) % 2, completed
//     (tcgen05.wait::ld, tcgen05.fence::before_thread_sync before the
//     barrier, after_thread_sync in warp 0 after it).
//   No thread is a phase ahead on s_full[k]: S_{c+2} is issued only after
//     the barrier of block c + 1, which every thread reaches after its wait
//     for S_c.
//   The stage of K_c is refilled (block c + kStages) only after S_c is done.
// Keys at or past Sk and rows past Sq * Hi are zero-filled, not read, so that
// nothing outside qi or ki is read whatever the lengths.
#include <algorithm>
#include <climits>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/tmem_allocator_sm100.hpp>
#include <cute/atom/mma_traits_sm100.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/block_scores_problem.hpp"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"
#include "kernels/sm90/tile_geometry.hpp"
#include "kernels/sm100/tensor_memory.hpp"

// The other architectures' passes compile the kernels empty: what only they
// use is unreferenced there (warning 177).
#pragma nv_diag_suppress 177

namespace jax_msa::sm100 {
namespace {

using namespace cute;
using cutlass::arch::ClusterBarrier;
using sm90::TileGeometry;

template <class Element_, int kDi_>
struct ScoresTraits {
  using Element = Element_;
  static constexpr int kDi = kDi_;
  static_assert(kDi == 64 || kDi == 128, "index head dim 64 or 128");
  static constexpr int kRows = 128;  // (token, head) rows per tile: the M of the MMA
  static constexpr int kKeys = 128;  // keys per block (spec §2): the N
  static constexpr int kThreads = 128;
  // ki blocks in flight: 4 x 32 KiB (Di 128) or 6 x 16 KiB (Di 64).
  static constexpr int kStages = kDi == 128 ? 4 : 6;
  static constexpr int kTmemColumns = 2 * kKeys;  // two S buffers

  using Mma = decltype(make_tiled_mma(SM100_MMA_F16BF16_SS<Element, Element, float, kRows, kKeys,
                                                           UMMA::Major::K, UMMA::Major::K>{}));
  using SmemAtom = decltype(UMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kDi>>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kDi>, Int<kStages>>{}));

  struct SharedStorage {
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element k[cosize_v<SmemLayoutK>];
    uint32_t tmem_base;  // written by tcgen05.alloc
    alignas(8) uint64_t s_full[2];
  };
  // 1024-byte aligned operands (the swizzle; descriptors with base offset 0):
  // the kernel aligns the dynamic shared memory itself.
  static constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;
};

template <class Traits>
using Params = cuda::PointerScoresParams<Traits>;

// `count` rows of a [*, Di] tensor from row `first` (rows at or past `limit`
// zero-filled) into rows 0 .. count - 1 of `dst` (all threads).
template <class Traits, class Tensor2D>
__device__ void load_rows(Tensor2D dst, const typename Traits::Element* src, int64_t first,
                          int64_t limit) {
  constexpr int kChunks = Traits::kDi / 8;  // 16-byte chunks per row
  constexpr int kRowsPerPass = Traits::kThreads / kChunks;
  const int chunk = threadIdx.x % kChunks;
  CUTE_UNROLL
  for (int i = 0; i < decltype(size<0>(dst))::value / kRowsPerPass; ++i) {
    const int r = threadIdx.x / kChunks + i * kRowsPerPass;
    const bool valid = first + r < limit;
    sm90::cp_async_16(&dst(r, 8 * chunk), valid ? src + (first + r) * Traits::kDi + 8 * chunk : src,
                      valid);
  }
}

template <class Traits, bool kWithSums>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    block_scores_kernel(const __grid_constant__ Params<Traits> p) {
#if defined(CUTE_ARCH_TCGEN05_F16F32_MMA_ENABLED) && defined(CUTE_ARCH_TCGEN05_TMEM_ENABLED)
  constexpr int kStages = Traits::kStages;
  extern __shared__ char smem_raw[];
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) % 1024;
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw + (1024 - misalign) % 1024);

  // Heaviest tiles (the last rows see the most blocks) are handed out first.
  const int64_t b = blockIdx.x % p.batch;
  const int64_t tile = p.tiles - 1 - blockIdx.x / p.batch;
  const int64_t row0 = tile * Traits::kRows;
  const TileGeometry geo(row0, p.rows, p.hi, p.q_lengths[b], p.kv_lengths[b], Traits::kRows);
  const int blocks = static_cast<int>(geo.blocks);  // <= ceil(Sk / 128) < 2^31
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t out_base = b * p.rows + row0;

  if (blocks > 0) {
    Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutK{});
    const auto* qi = p.qi + b * p.rows * Traits::kDi;
    const auto* ki = p.ki + b * p.keys * Traits::kDi;
    // Q, then blocks 0 .. kStages - 1: one cp.async group each (empty past
    // the last block), so that block c is group c + 1.
    load_rows<Traits>(sQ, qi, row0, p.rows);
    portable::cp_async_commit();
    auto load_block = [&](int c) {
      if (c < blocks) load_rows<Traits>(sK(_, _, c % kStages), ki, int64_t{c} * Traits::kKeys, p.keys);
      portable::cp_async_commit();
    };
    for (int c = 0; c < kStages; ++c) load_block(c);

    if (warp == 0) cute::TMEM::Allocator1Sm().allocate(Traits::kTmemColumns, &ss.tmem_base);
    if (tid == 0) {
      ClusterBarrier::init(&ss.s_full[0], 1);
      ClusterBarrier::init(&ss.s_full[1], 1);
      cutlass::arch::fence_barrier_init();
    }
    tmem_fence_before_sync();
    __syncthreads();
    tmem_fence_after_sync();
    const uint32_t tmem = ss.tmem_base;
    const uint32_t lane_addr = tmem_lane_addr(tmem);

    typename Traits::Mma mma;
    auto thr = mma.get_slice(0);
    Tensor tSrQ = thr.make_fragment_A(thr.partition_A(sQ));  // descriptors (1, 1, Di / 16)
    Tensor tStS = partition_fragment_C(mma, Shape<Int<Traits::kRows>, Int<Traits::kKeys>>{});
    // S_c = Q K_c^T into buffer c % 2, once Q and K_c have landed. Issued at
    // the start of iteration c - 1 (c = 0: before the loop), when groups
    // 0 .. kStages + c - 1 are committed and block c is group c + 1: at most
    // kStages - 2 newer ones may still be in flight (for c = 0, one fewer
    // than needed: it also waits for block 1).
    auto issue = [&](int c) {
      portable::cp_async_wait<kStages - 2>();
      cutlass::arch::fence_view_async_shared();
      tmem_fence_before_sync();
      __syncthreads();
      if (warp == 0) {
        tmem_fence_after_sync();
        Tensor tSrK = thr.make_fragment_B(thr.partition_B(sK(_, _, c % kStages)));
        tStS.data() = tmem + (c % 2) * Traits::kKeys;
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tSrQ); ++k) {
          mma.accumulate_ = k == 0 ? UMMA::ScaleOut::Zero : UMMA::ScaleOut::One;
          cute::gemm(mma, tSrQ(_, _, k), tSrK(_, _, k), tStS);
        }
        cutlass::arch::umma_arrive(&ss.s_full[c % 2]);
      }
    };

    sm90::RowState<1> rows;
    rows.position[0] = geo.position(tid);
    rows.out_row[0] = geo.row_exists(tid) ? out_base + tid : -1;
    const float abs_scale = fabsf(p.scale);
    const bool negate = p.scale < 0;
    // This thread's row as rows x columns: column j of S is register j.
    Tensor coord = make_identity_tensor(Shape<_1, Int<Traits::kKeys>>{});

    issue(0);
    for (int c = 0; c < blocks; ++c) {
      if (c + 1 < blocks) issue(c + 1);
      ClusterBarrier::wait(&ss.s_full[c % 2], static_cast<uint32_t>((c / 2) & 1));
      tmem_fence_after_sync();
      load_block(c + kStages);  // into K_c's stage, which S_c has read

      uint32_t row_bits[Traits::kKeys];
      tmem_load_row(lane_addr, (c % 2) * Traits::kKeys, row_bits);
      Tensor row = make_tensor<float>(Shape<_1, Int<Traits::kKeys>>{});
      CUTE_UNROLL
      for (int j = 0; j < Traits::kKeys; ++j) row(0, j) = __uint_as_float(row_bits[j]);
      const bool masked = geo.needs_mask(c);
      if (negate) {
        sm90::block_rowmax<kWithSums, true, 1>(row, coord, rows, c, masked, abs_scale, p.NB,
                                               p.scores, p.sums);
      } else {
        sm90::block_rowmax<kWithSums, false, 1>(row, coord, rows, c, masked, abs_scale, p.NB,
                                                p.scores, p.sums);
      }
    }
    portable::cp_async_wait<0>();  // the empty groups past the last block

    // Every tcgen05.ld has completed (tmem_load_row waits): free the columns.
    tmem_fence_before_sync();
    __syncthreads();
    if (warp == 0) {
      tmem_fence_after_sync();
      cute::TMEM::Allocator1Sm allocator;
      allocator.release_allocation_lock();
      allocator.free(tmem, Traits::kTmemColumns);
    }
  }

  if (p.fill_future && blocks < p.NB) {
    sm90::fill_unseen_blocks(p.scores, out_base, geo, 0, Traits::kRows, blocks, p.NB, tid,
                             Traits::kThreads);
  }
#endif
}

using cuda::ScoresProblem;

struct Sm100 {
  template <class Element, int kDi>
  static cudaError_t launch(const ScoresProblem& pr, cudaStream_t stream);
};

template <class Element, int kDi>
cudaError_t Sm100::launch(const ScoresProblem& pr, cudaStream_t stream) {
  using Traits = ScoresTraits<Element, kDi>;
  const cudaError_t st = check_device();
  if (st != cudaSuccess) return st;
  return cuda::launch_pointer_scores<Traits>(block_scores_kernel<Traits, true>,
                                             block_scores_kernel<Traits, false>, pr, stream);
}

}  // namespace
}  // namespace jax_msa::sm100

namespace jax_msa::cuda {

cudaError_t sm100_block_scores(DType dtype, const void* qi, const void* ki,
                               const int32_t* q_lengths, const int32_t* kv_lengths, float* scores,
                               int64_t B, int64_t Sq, int64_t Sk, int64_t Hi, int64_t Di,
                               float scale, cudaStream_t stream) {
  const ScoresProblem pr{qi, ki, q_lengths, kv_lengths, scores, nullptr, B, Sq, Sk, Hi, scale,
                        /*fill_future=*/true};
  return run_block_scores<sm100::Sm100>(dtype, Di, pr, stream);
}

cudaError_t sm100_indexer_scores(DType dtype, const void* qi, const void* ki,
                                 const int32_t* q_lengths, const int32_t* kv_lengths,
                                 float* scores, float* sums, int64_t B, int64_t Sq, int64_t Sk,
                                 int64_t Hi, int64_t Di, float scale, cudaStream_t stream) {
  const ScoresProblem pr{qi, ki, q_lengths, kv_lengths, scores, sums, B, Sq, Sk, Hi, scale,
                        /*fill_future=*/false};
  return run_block_scores<sm100::Sm100>(dtype, Di, pr, stream);
}

}  // namespace jax_msa::cuda
