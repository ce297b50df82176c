// Block-sparse and dense attention forwards for every GPU since Ampere (the
// portable family: mma.sync, ldmatrix and cp.async only; built as sm_80 PTX
// that the driver compiles for newer cards, and as SASS for the build's
// targets). One kernel: the dense forward walks blocks 0 .. n - 1 (n: the last
// block a row of the tile sees) where the sparse one walks the union.
//
// Query-outer, as the SM90 forward (sparse_attention_fwd.cu): a CTA takes one
// tile of 128 (token, head) rows, `tokens` consecutive query tokens times the
// G query heads of one KV group, and walks the union of its tokens' selected
// blocks. Four warps of 32 rows each (at G = 16: two tokens per warp), two
// CTAs per SM: 32 rows per warp halve the shared-memory reads per MMA that
// 16 rows need, which bound the kernel there. The
// union's blocks stream through shared memory in pieces of 64 keys (K and V,
// two stages, cp.async, every thread loading a share); a warp skips the
// pieces of blocks none of its tokens selected, so that the tensor work is
// that of the selected blocks (at G = 16 exactly), whatever the union.
//
// Per warp and piece: S = Q K^T (32 x 64, Q read from shared memory: 64
// more registers per thread would not fit beside O), the masks
// and online softmax of the SM90 kernels (OnlineSoftmax, TileRows: an
// mma.sync m16n8 accumulator holds the rows and columns that a warp's part
// of a 64-row wgmma accumulator does), O += P V (32 x 128, P from
// registers, V through ldmatrix.trans).
//
// Only valid ids enter the union (TileUnion); keys at or past min(kv_len, Sk)
// are zero-filled, not read, so that no padding value (NaN, say) reaches
// P V.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/attention_tile.hpp"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/online_softmax.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::portable {
namespace {

using namespace cute;
using sm90::OnlineSoftmax;
using sm90::SparseShape;
using sm90::SparseTile;
using sm90::TileRows;
using sm90::TileUnion;

template <class Element_, int kD_ = 128>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kD = kD_;  // head dim: 128, or 64 (dense)
  static constexpr int kKeys = 128;   // keys per block (spec §2)
  static constexpr int kPiece = 64;   // keys per shared-memory stage
  static constexpr int kPiecesPerBlock = kKeys / kPiece;
  static constexpr int kStages = 2;
  static constexpr int kWarps = 4;
  static constexpr int kWarpRows = 32;
  static constexpr int kRows = kWarpRows * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  // For make_sparse_shape and TileUnion: tokens * topk <= 128, tokens <= 64.
  static constexpr int kMaxCandidates = 128;
  static constexpr int kMaxTokens = 64;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                     SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // Warp w: rows 32 w .. 32 w + 31 (the M permutation puts the warp's two
  // 16-row atoms next to each other, as TileRows expects); N in 16s so that
  // one ldmatrix.x4 feeds two atoms.
  using TiledMma = decltype(make_tiled_mma(
      MmaAtom{}, Layout<Shape<Int<kWarps>, _1, _1>>{},
      Tile<Layout<Shape<_16, Int<kWarps>, _2>, Stride<_1, Int<kWarpRows>, _16>>, _16, _16>{}));
  // 128-byte rows, 16-byte chunks swizzled within 8-row atoms: conflict-free
  // cp.async stores and ldmatrix loads.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kPiece>, Int<kD>, Int<kStages>>{}));
  // V seen as dims x keys x stage: the B operand of P V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kD>, Int<kPiece>, Int<kStages>>{},
                                  Stride<Int<kPiece>, _1, Int<kPiece * kD>>{})));

  struct SharedStorage {
    alignas(128) Element q[cosize_v<SmemLayoutQ>];
    alignas(128) Element k[cosize_v<SmemLayoutKV>];
    alignas(128) Element v[cosize_v<SmemLayoutKV>];
    uint64_t union_tokens[kMaxCandidates];
    int32_t union_block[kMaxCandidates];
    int32_t union_count;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

template <class Traits, bool kDense>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    attention_fwd_kernel(const __grid_constant__ FwdParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Traits::Element;
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const SparseShape& s = p.in.shape;
  const SparseTile tile(blockIdx.x, s.B, s.Hkv, s.chunks, s.tokens);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t q_len = s.q_lengths[tile.b];
  const int64_t kv_len = s.kv_lengths[tile.b];
  const int64_t key_limit = std::min(kv_len, s.Sk);

  load_rows<Traits>(ss.q, p.in.q, p.in.shape, tile, q_len);
  cp_async_commit();
  if constexpr (kDense) {
    if (tid == 0) ss.union_count = dense_tile_blocks(s, tile, q_len, kv_len, p.in.causal);
  } else if (warp == 0) {
    const TileUnion<Traits> u(s, tile, q_len, kv_len, lane);
    u.store(ss.union_block, ss.union_tokens, lane);
    if (lane == 0) ss.union_count = u.count;
  }
  __syncthreads();
  constexpr int kPer = Traits::kPiecesPerBlock;
  const int pieces = kPer * ss.union_count;
  auto piece_key0 = [&](int piece) {
    const int64_t block = kDense ? piece / kPer : ss.union_block[piece / kPer];
    return block * Traits::kKeys + (piece % kPer) * Traits::kPiece;
  };
  if (pieces > 0) load_piece<Traits>(ss.k, ss.v, p.in, tile, piece_key0(0), key_limit, 0);
  cp_async_commit();

  // The tile tokens with a row among rows row0 .. row0 + 15 (one MMA atom), as
  // bits (dense: all blocks, if it holds a row). A warp's two atoms (rows
  // 32 w .. 32 w + 15 and the next 16) each skip the blocks none of their
  // tokens selected: at G = 16 an atom is one token, so that the tensor work
  // stays that of the selected blocks.
  const int group = static_cast<int>(s.group);
  auto atom_tokens = [&](int row0) -> uint64_t {
    const int first = row0 / group;
    const int last = std::min((row0 + 15) / group, s.tokens - 1);
    if (first > last) return 0;
    return kDense ? ~uint64_t{0} : (~uint64_t{0} >> (63 - (last - first))) << first;
  };
  const uint64_t own[2] = {atom_tokens(Traits::kWarpRows * warp),
                           atom_tokens(Traits::kWarpRows * warp + 16)};

  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVt{});
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kPiece>>;
  using TileO = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  Tensor tSrQ = thr.partition_fragment_A(sQ);                 // (MMA, 2, D / 16)
  Tensor tSrK = thr.partition_fragment_B(sK(_, _, 0));        // (MMA, keys / 16, D / 16)
  Tensor tOrVt = thr.partition_fragment_B(sVt(_, _, 0));      // (MMA, D / 16, keys / 16)
  Tensor accS = partition_fragment_C(mma, TileS{});
  Tensor accO = partition_fragment_C(mma, TileO{});
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma, TileS{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accS_op = make_tensor(accS.data(), acc_operand_layout(accS.layout()));
  static_assert(decltype(size<1>(accS))::value == 2, "two 16-row atoms per warp");
  Tensor accO_rc = make_tensor(accO.data(), rowcol_layout(accO.layout()));

  auto copy_q = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_k = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_v = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto thr_q = copy_q.get_thread_slice(tid);
  auto thr_k = copy_k.get_thread_slice(tid);
  auto thr_v = copy_v.get_thread_slice(tid);
  Tensor tSsQ = thr_q.partition_S(sQ);    // (CPY, 2, D / 16)
  Tensor tSrQ_view = thr_q.retile_D(tSrQ);
  Tensor tSsK = thr_k.partition_S(sK);    // (CPY, keys / 16, D / 16, stage)
  Tensor tSrK_view = thr_k.retile_D(tSrK);
  Tensor tOsVt = thr_v.partition_S(sVt);  // (CPY, D / 16, keys / 16, stage)
  Tensor tOrVt_view = thr_v.retile_D(tOrVt);

  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  using Rows = TileRows<kRowsPerThread>;
  std::conditional_t<kDense, AllRows<Rows>, Rows> rows(tid, Traits::kWarpRows);
  if constexpr (kDense) {
    rows.start(s, tile, q_len, kv_len, p.in.causal);
  } else {
    rows.start(s, tile, q_len, kv_len);
  }
  OnlineSoftmax<kRowsPerThread> softmax;
  {
    float factors[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) factors[r] = p.in.scale_log2;
    softmax.start(factors);
  }
  clear(accO);

  for (int piece = 0; piece < pieces; ++piece) {
    const int stage = piece % Traits::kStages;
    if (piece + 1 < pieces) {
      load_piece<Traits>(ss.k, ss.v, p.in, tile, piece_key0(piece + 1), key_limit,
                         (piece + 1) % Traits::kStages);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint64_t tokens = kDense ? ~uint64_t{0} : ss.union_tokens[piece / kPer];
    const bool active[2] = {(tokens & own[0]) != 0, (tokens & own[1]) != 0};  // warp-uniform
    if (active[0] || active[1]) {
      clear(accS);
      CUTE_UNROLL
      for (int kd = 0; kd < size<2>(tSrK); ++kd) {
        copy(copy_q, tSsQ(_, _, kd), tSrQ_view(_, _, kd));
        copy(copy_k, tSsK(_, _, kd, stage), tSrK_view(_, _, kd));
        CUTE_UNROLL
        for (int m = 0; m < 2; ++m) {
          if (!active[m]) continue;
          CUTE_UNROLL
          for (int n = 0; n < size<1>(tSrK); ++n) {
            cute::gemm(mma, tSrQ(_, m, kd), tSrK(_, n, kd), accS(_, m, n));
          }
        }
      }
      // An inactive atom's rows are not members: masked, their P is zero.
      softmax.apply(accS_rc, rows, piece_key0(piece), Traits::kPiece, tokens);
      softmax.rescale_output(accO_rc);
      sm90::acc_to_operand(accS_op, tOrP);
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tOrVt); ++kk) {
        copy(copy_v, tOsVt(_, _, kk, stage), tOrVt_view(_, _, kk));
        CUTE_UNROLL
        for (int m = 0; m < 2; ++m) {
          if (!active[m]) continue;
          CUTE_UNROLL
          for (int n = 0; n < size<1>(tOrVt); ++n) {
            cute::gemm(mma, tOrP(_, m, kk), tOrVt(_, n, kk), accO(_, m, n));
          }
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next piece but one
  }

  // out = O / l, lse = ln(sum of exp): zero / -inf for an empty row.
  softmax.template store<Traits::kD>(accO_rc, rows, p.out, p.lse, tid);
#endif
}

template <class Traits, bool kDense>
cudaError_t launch(const FwdParams<Traits>& p, cudaStream_t stream) {
  return launch_tiles<Traits>(attention_fwd_kernel<Traits, kDense>, p, p.in.shape.tiles, stream);
}

template <class Element>
cudaError_t launch_sparse(const cuda::SparseAttentionArgs& a, void* out, float* lse,
                          cudaStream_t stream) {
  using Traits = FwdTraits<Element>;
  return launch<Traits, false>(
      make_params<Traits>(sm90::make_sparse_shape<Traits>(a), true, a, out, lse), stream);
}

template <class Element, int kD>
cudaError_t launch_dense(const cuda::DenseAttentionArgs& a, void* out, float* lse,
                         cudaStream_t stream) {
  using Traits = FwdTraits<Element, kD>;
  return launch<Traits, true>(
      make_params<Traits>(dense_shape<Traits>(a), a.causal, a, out, lse), stream);
}

}  // namespace
}  // namespace jax_msa::portable

namespace jax_msa::cuda {

cudaError_t portable_sparse_attention_fwd(DType dtype, const SparseAttentionArgs& a, void* out,
                                          float* lse, cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  return dtype == DType::kBF16
             ? portable::launch_sparse<cutlass::bfloat16_t>(a, out, lse, stream)
             : portable::launch_sparse<cutlass::half_t>(a, out, lse, stream);
}

cudaError_t portable_dense_attention_fwd(DType dtype, const DenseAttentionArgs& a, void* out,
                                         float* lse, cudaStream_t stream) {
  if (!dense_attention_args_valid(dtype, a) || a.Hq / a.Hkv > 128) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0 || a.Hq == 0) return cudaSuccess;
  const bool bf16 = dtype == DType::kBF16;
  if (a.D == 64) {
    return bf16 ? portable::launch_dense<cutlass::bfloat16_t, 64>(a, out, lse, stream)
                : portable::launch_dense<cutlass::half_t, 64>(a, out, lse, stream);
  }
  return bf16 ? portable::launch_dense<cutlass::bfloat16_t, 128>(a, out, lse, stream)
              : portable::launch_dense<cutlass::half_t, 128>(a, out, lse, stream);
}

}  // namespace jax_msa::cuda
