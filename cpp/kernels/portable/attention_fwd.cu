// Block-sparse and dense attention forwards for every GPU since Ampere (the
// portable family: mma.sync, ldmatrix and cp.async only; built as sm_80 PTX
// that the driver compiles for newer cards, and as SASS for the build's
// targets). One kernel: the dense forward walks blocks 0 .. n - 1 (n: the last
// block a row of the tile sees) where the sparse one walks the union.
//
// Query-outer, as the SM90 forward (sparse_attention_fwd.cu): a CTA takes one
// tile of 128 (token, head) rows, `tokens` consecutive query tokens times the
// G query heads of one KV group, and walks the union of its tokens' selected
// blocks. Eight warps of 16 rows each (at G = 16: one token per warp). The
// union's blocks stream through shared memory in pieces of 64 keys (K and V,
// two stages, cp.async, every thread loading a share); a warp skips the
// pieces of blocks none of its tokens selected, so that the tensor work is
// that of the selected blocks (at G = 16 exactly), whatever the union.
//
// Per warp and piece: S = Q K^T (16 x 64, Q held in registers), the masks
// and online softmax of the SM90 kernels (OnlineSoftmax, TileRows: an
// mma.sync m16n8 accumulator holds the rows and columns that a warp's part
// of a 64-row wgmma accumulator does), O += P V (16 x 128, P from
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

template <class Element, int kD = 128>
struct FwdTraits : TileTraits<Element, kD> {
  using Base = TileTraits<Element, kD>;
  struct SharedStorage {
    alignas(128) Element q[cosize_v<typename Base::SmemLayoutQ>];
    alignas(128) Element k[cosize_v<typename Base::SmemLayoutKV>];
    alignas(128) Element v[cosize_v<typename Base::SmemLayoutKV>];
    uint64_t union_tokens[Base::kMaxCandidates];
    int32_t union_block[Base::kMaxCandidates];
    int32_t union_count;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

template <class Traits>
struct FwdParams {
  TileInputs<Traits> in;
  typename Traits::Element* out;
  float* lse;
};

template <class Traits, bool kDense>
__global__ void __launch_bounds__(Traits::kThreads, 1)
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

  load_rows<Traits>(ss.q, p.in.q, s, tile, q_len);
  cp_async_commit();
  if constexpr (kDense) {
    if (tid == 0) ss.union_count = dense_tile_blocks(s, tile, q_len, kv_len, p.in.causal);
  } else if (warp == 0) {
    const TileUnion<Traits> u(s, tile, q_len, kv_len, lane);
    u.store(ss.union_block, ss.union_tokens, lane);
    if (lane == 0) ss.union_count = u.count;
  }
  __syncthreads();
  const int pieces = 2 * ss.union_count;
  auto piece_key0 = [&](int piece) {
    const int64_t block = kDense ? piece / 2 : ss.union_block[piece / 2];
    return block * Traits::kKeys + (piece % 2) * Traits::kPiece;
  };
  if (pieces > 0) load_piece<Traits>(ss.k, ss.v, p.in, tile, piece_key0(0), key_limit, 0);
  cp_async_commit();

  const uint64_t own = warp_tokens<kDense>(warp, s);

  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVt{});
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kPiece>>;
  using TileO = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  Tensor tSrQ = thr.partition_fragment_A(sQ);                 // (MMA, 1, D / 16)
  Tensor tSrK = thr.partition_fragment_B(sK(_, _, 0));        // (MMA, keys / 16, D / 16)
  Tensor tOrVt = thr.partition_fragment_B(sVt(_, _, 0));      // (MMA, D / 16, keys / 16)
  Tensor accS = partition_fragment_C(mma, TileS{});
  Tensor accO = partition_fragment_C(mma, TileO{});
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma, TileS{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accO_rc = make_tensor(accO.data(), rowcol_layout(accO.layout()));

  auto copy_q = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_k = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_v = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto thr_q = copy_q.get_thread_slice(tid);
  auto thr_k = copy_k.get_thread_slice(tid);
  auto thr_v = copy_v.get_thread_slice(tid);
  Tensor tSsK = thr_k.partition_S(sK);    // (CPY, keys / 16, D / 16, stage)
  Tensor tSrK_view = thr_k.retile_D(tSrK);
  Tensor tOsVt = thr_v.partition_S(sVt);  // (CPY, D / 16, keys / 16, stage)
  Tensor tOrVt_view = thr_v.retile_D(tOrVt);

  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  std::conditional_t<kDense, AllRows<kRowsPerThread>, TileRows<kRowsPerThread>> rows(tid);
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

  // Q into registers once (it waits for the first commit group: Q).
  cp_async_wait<1>();
  __syncthreads();
  copy(copy_q, thr_q.partition_S(sQ), thr_q.retile_D(tSrQ));

  for (int piece = 0; piece < pieces; ++piece) {
    const int stage = piece % Traits::kStages;
    if (piece + 1 < pieces) {
      load_piece<Traits>(ss.k, ss.v, p.in, tile, piece_key0(piece + 1), key_limit,
                         (piece + 1) % Traits::kStages);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint64_t tokens = kDense ? ~uint64_t{0} : ss.union_tokens[piece / 2];
    if ((tokens & own) != 0) {  // uniform over the warp
      clear(accS);
      CUTE_UNROLL
      for (int kd = 0; kd < size<2>(tSrK); ++kd) {
        copy(copy_k, tSsK(_, _, kd, stage), tSrK_view(_, _, kd));
        cute::gemm(mma, tSrQ(_, _, kd), tSrK(_, _, kd), accS);
      }
      softmax.apply(accS_rc, rows, piece_key0(piece), Traits::kPiece, tokens);
      softmax.rescale_output(accO_rc);
      sm90::acc_to_operand(accS, tOrP);
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tOrVt); ++kk) {
        copy(copy_v, tOsVt(_, _, kk, stage), tOrVt_view(_, _, kk));
        cute::gemm(mma, tOrP(_, _, kk), tOrVt(_, _, kk), accO);
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
  const FwdParams<Traits> p{make_inputs<Traits>(sm90::make_sparse_shape<Traits>(a), true, a),
                            static_cast<Element*>(out), lse};
  return launch<Traits, false>(p, stream);
}

// Dense tiles: 128 / G tokens times the G heads of a KV group (G <= 128).
template <class Element, int kD>
cudaError_t launch_dense(const cuda::DenseAttentionArgs& a, void* out, float* lse,
                         cudaStream_t stream) {
  using Traits = FwdTraits<Element, kD>;
  const FwdParams<Traits> p{make_inputs<Traits>(dense_shape<Traits>(a), a.causal, a),
                            static_cast<Element*>(out), lse};
  return launch<Traits, true>(p, stream);
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
