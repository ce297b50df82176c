// dQ of block-sparse and dense attention (spec §3.4, §3.6) for every GPU since
// Ampere (the portable family: mma.sync, ldmatrix and cp.async only), the
// query-outer step of the portable backward; dK / dV: attention_dkdv.cu.
//
// The forward's tile, as the forward had it before four warps of 32 rows: a
// CTA takes 128 (token, head) rows,
// eight warps of 16, and walks the union of its tokens' selected blocks
// (sparse) or blocks 0 .. n - 1 (dense) in pieces of 64 keys, K and V through
// two cp.async stages; a warp skips the pieces of blocks none of its tokens
// selected. Q is read once into registers (A operand), so that its shared
// memory then holds the K / V stages; dO stays in shared memory (96 KB in
// all: Q and dO both in registers left too few for the rest). Per warp and
// piece:
//   S = Q K^T, dP = dO V^T (16 x 64 each),
//   P = exp2(S * scale * log2e - lse * log2e) under the forward's masks
//   (TileRows / AllRows: rows whose token did not select the block, keys past
//   a row's causal or length limit), dS = P * (dP - delta),
//   dQ += dS K (16 x 128, dS from registers, K through ldmatrix.trans),
// and at the end dq = scale * dQ in q's dtype. Each row's dq is summed on chip
// in a fixed order: deterministic. Padded rows (and rows that saw no key) get
// zeros.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/attention_tile.hpp"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::portable {
namespace {

using namespace cute;
using sm90::SparseShape;
using sm90::SparseTile;
using sm90::TileRows;
using sm90::TileUnion;

template <class Element_, int kD_ = 128>
struct TileTraits {
  using Element = Element_;
  static constexpr int kD = kD_;  // head dim: 128, or 64 (dense)
  static constexpr int kKeys = 128;   // keys per block (spec §2)
  static constexpr int kPiece = 64;   // keys per shared-memory stage
  static constexpr int kStages = 2;
  static constexpr int kWarps = 8;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  // For make_sparse_shape and TileUnion: tokens * topk <= 128, tokens <= 64.
  static constexpr int kMaxCandidates = 128;
  static constexpr int kMaxTokens = 64;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                     SM80_16x8x16_F32BF16BF16F32_TN,
                                     SM80_16x8x16_F32F16F16F32_TN>;
  // Warp w: rows 16 w .. 16 w + 15; N in 16s so that one ldmatrix.x4 feeds two atoms.
  using TiledMma = decltype(make_tiled_mma(
      MmaAtom{}, Layout<Shape<Int<kWarps>, _1, _1>>{},
      Tile<Int<kRows>, _16, _16>{}));
  // 128-byte rows, 16-byte chunks swizzled within 8-row atoms: conflict-free
  // cp.async stores and ldmatrix loads.
  using SmemAtom = decltype(composition(
      Swizzle<3, 3, 3>{},
      Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(
      SmemAtom{}, Shape<Int<kPiece>, Int<kD>, Int<kStages>>{}));
  // K or V seen as dims x keys x stage: the B operand of P V (and of dS K).
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_layout(Shape<Int<kD>, Int<kPiece>, Int<kStages>>{},
                        Stride<Int<kPiece>, _1, Int<kPiece * kD>>{})));
};

// The tokens of the tile with a row in warp `warp` (rows 16 warp .. 16 warp
// + 15) as bits (dense: all blocks, if it holds a row): a warp skips the
// pieces of blocks none of them selected.
template <bool kDense>
__device__ inline uint64_t warp_tokens(int warp, const sm90::SparseShape& s) {
  const int group = static_cast<int>(s.group);
  const int first = 16 * warp / group;
  const int last = std::min((16 * warp + 15) / group, s.tokens - 1);
  return first > last ? 0
         : kDense    ? ~uint64_t{0}
                     : (~uint64_t{0} >> (63 - (last - first))) << first;
}

template <class Element>
struct DqTraits : TileTraits<Element, 128> {
  using Base = TileTraits<Element, 128>;
  struct SharedStorage {
    alignas(128) Element dout[cosize_v<typename Base::SmemLayoutQ>];
    // Q until it is in registers, then the K / V stages.
    union {
      alignas(128) Element q[cosize_v<typename Base::SmemLayoutQ>];
      struct {
        alignas(128) Element k[cosize_v<typename Base::SmemLayoutKV>];
        alignas(128) Element v[cosize_v<typename Base::SmemLayoutKV>];
      } kv;
    };
    uint64_t union_tokens[Base::kMaxCandidates];
    int32_t union_block[Base::kMaxCandidates];
    int32_t union_count;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

template <class Traits>
struct DqParams {
  TileInputs<Traits> in;
  const typename Traits::Element* dout;
  const float* lse;
  const float* delta;
  typename Traits::Element* dq;
  float scale;
};

template <class Traits, bool kDense>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_dq_kernel(const __grid_constant__ DqParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Traits::Element;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const SparseShape& s = p.in.shape;
  const SparseTile tile(blockIdx.x, s.B, s.Hkv, s.chunks, s.tokens);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t q_len = s.q_lengths[tile.b];
  const int64_t kv_len = s.kv_lengths[tile.b];
  const int64_t key_limit = std::min(kv_len, s.Sk);

  load_rows<Traits>(ss.q, p.in.q, s, tile, q_len);
  load_rows<Traits>(ss.dout, p.dout, s, tile, q_len);
  cp_async_commit();
  if constexpr (kDense) {
    if (tid == 0) ss.union_count = dense_tile_blocks(s, tile, q_len, kv_len, p.in.causal);
  } else if (warp == 0) {
    const TileUnion<Traits> u(s, tile, q_len, kv_len, lane);
    u.store(ss.union_block, ss.union_tokens, lane);
    if (lane == 0) ss.union_count = u.count;
  }
  const uint64_t own = warp_tokens<kDense>(warp, s);

  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.kv.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.kv.v), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(ss.kv.k), typename Traits::SmemLayoutVt{});
  using TileS = Shape<Int<Traits::kRows>, Int<Traits::kPiece>>;
  using TileQ = Shape<Int<Traits::kRows>, Int<Traits::kD>>;
  Tensor tSrQ = thr.partition_fragment_A(sQ);             // (MMA, 1, D / 16)
  Tensor tSrdO = thr.partition_fragment_A(sdO);           // (MMA, 1, D / 16), a k-step at a time
  Tensor tSrK = thr.partition_fragment_B(sK(_, _, 0));    // (MMA, keys / 16, D / 16)
  Tensor tQrKt = thr.partition_fragment_B(sKt(_, _, 0));  // (MMA, D / 16, keys / 16)
  Tensor accS = partition_fragment_C(mma, TileS{});
  Tensor accdP = partition_fragment_C(mma, TileS{});
  Tensor accdQ = partition_fragment_C(mma, TileQ{});
  Tensor tQrdS = make_tensor<Element>(partition_shape_A(mma, TileS{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accdP_rc = make_tensor(accdP.data(), rowcol_layout(accdP.layout()));
  Tensor accdQ_rc = make_tensor(accdQ.data(), rowcol_layout(accdQ.layout()));

  auto copy_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_bt = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tSsdO = thr_a.partition_S(sdO);   // (CPY, 1, D / 16)
  Tensor tSrdO_view = thr_a.retile_D(tSrdO);
  Tensor tSsK = thr_b.partition_S(sK);     // (CPY, keys / 16, D / 16, stage)
  Tensor tSsV = thr_b.partition_S(sV);
  Tensor tSrK_view = thr_b.retile_D(tSrK);
  Tensor tQsKt = thr_bt.partition_S(sKt);  // (CPY, D / 16, keys / 16, stage)
  Tensor tQrKt_view = thr_bt.retile_D(tQrKt);

  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  using Rows = TileRows<kRowsPerThread>;
  std::conditional_t<kDense, AllRows<Rows>, Rows> rows(tid);
  if constexpr (kDense) {
    rows.start(s, tile, q_len, kv_len, p.in.causal);
  } else {
    rows.start(s, tile, q_len, kv_len);
  }
  // Rows past q_len, and rows that saw no key (lse -inf), take no key.
  float lse_log2[kRowsPerThread], delta[kRowsPerThread];
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const bool live = rows.token_of[r] >= 0 && tile.token0 + rows.token_of[r] < q_len;
    lse_log2[r] = live ? p.lse[rows.out_row[r]] * kLog2e : -INFINITY;
    delta[r] = live ? p.delta[rows.out_row[r]] : 0.0f;
  }
  clear(accdQ);

  // Q into registers; then its shared memory holds the K / V stages.
  cp_async_wait<0>();
  __syncthreads();
  copy(copy_a, thr_a.partition_S(sQ), thr_a.retile_D(tSrQ));
  __syncthreads();

  const int pieces = 2 * ss.union_count;
  auto piece_key0 = [&](int piece) {
    const int64_t block = kDense ? piece / 2 : ss.union_block[piece / 2];
    return block * Traits::kKeys + (piece % 2) * Traits::kPiece;
  };
  if (pieces > 0) load_piece<Traits>(ss.kv.k, ss.kv.v, p.in, tile, piece_key0(0), key_limit, 0);
  cp_async_commit();

  for (int piece = 0; piece < pieces; ++piece) {
    const int stage = piece % Traits::kStages;
    if (piece + 1 < pieces) {
      load_piece<Traits>(ss.kv.k, ss.kv.v, p.in, tile, piece_key0(piece + 1), key_limit,
                         (piece + 1) % Traits::kStages);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint64_t tokens = kDense ? ~uint64_t{0} : ss.union_tokens[piece / 2];
    if ((tokens & own) != 0) {  // uniform over the warp
      clear(accS);
      clear(accdP);
      CUTE_UNROLL
      for (int kd = 0; kd < size<2>(tSrK); ++kd) {
        copy(copy_b, tSsK(_, _, kd, stage), tSrK_view(_, _, kd));
        cute::gemm(mma, tSrQ(_, _, kd), tSrK(_, _, kd), accS);
      }
      CUTE_UNROLL
      for (int kd = 0; kd < size<2>(tSrK); ++kd) {
        copy(copy_a, tSsdO(_, _, kd), tSrdO_view(_, _, kd));
        copy(copy_b, tSsV(_, _, kd, stage), tSrK_view(_, _, kd));
        cute::gemm(mma, tSrdO(_, _, kd), tSrK(_, _, kd), accdP);
      }
      // dS = P (dP - delta) with P under the masks. A select, not a product,
      // where P is 0: a masked key's V row may hold non-finite values.
      const int64_t key0 = piece_key0(piece);
      const bool partial = rows.partial(key0, Traits::kPiece);
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        const bool member = rows.member(r, tokens) && lse_log2[r] != -INFINITY;
        const int limit = rows.last_key[r] - static_cast<int>(key0);  // last visible column
        CUTE_UNROLL
        for (int j = 0; j < size<1>(accS_rc); ++j) {
          const bool seen = member && (!partial || rows.column(j) <= limit);
          const float prob =
              seen ? sm90::fast_exp2(fmaf(accS_rc(r, j), p.in.scale_log2, -lse_log2[r])) : 0.0f;
          accS_rc(r, j) = prob != 0.0f ? prob * (accdP_rc(r, j) - delta[r]) : 0.0f;
        }
      }
      sm90::acc_to_operand(accS, tQrdS);
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tQrKt); ++kk) {
        copy(copy_bt, tQsKt(_, _, kk, stage), tQrKt_view(_, _, kk));
        cute::gemm(mma, tQrdS(_, _, kk), tQrKt(_, _, kk), accdQ);
      }
    }
    __syncthreads();  // the stage is refilled by the next piece but one
  }

  // dq = scale * dQ; rows of tokens past Sq are not written.
  sm90::store_scaled_rows<Traits::kD>(accdQ_rc, rows, p.dq, p.scale);
#endif
}

template <class Traits, bool kDense>
cudaError_t launch(const DqParams<Traits>& p, cudaStream_t stream) {
  return launch_tiles<Traits>(attention_dq_kernel<Traits, kDense>, p, p.in.shape.tiles, stream);
}

template <class Element, bool kDense, class Args>
cudaError_t launch_dq(const Args& a, const SparseShape& shape, bool causal, const float* lse,
                      const void* dout, const float* delta, void* dq, cudaStream_t stream) {
  using Traits = DqTraits<Element>;
  const DqParams<Traits> p{make_inputs<Traits>(shape, causal, a),
                           static_cast<const Element*>(dout),
                           lse,
                           delta,
                           static_cast<Element*>(dq),
                           a.scale};
  return launch<Traits, kDense>(p, stream);
}

}  // namespace
}  // namespace jax_msa::portable

namespace jax_msa::cuda {

cudaError_t portable_sparse_attention_bwd_dq(DType dtype, const SparseAttentionArgs& a,
                                             const float* lse, const void* dout,
                                             const float* delta, void* dq, cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  using BF16 = portable::DqTraits<cutlass::bfloat16_t>;
  using F16 = portable::DqTraits<cutlass::half_t>;
  return dtype == DType::kBF16
             ? portable::launch_dq<cutlass::bfloat16_t, false>(
                   a, sm90::make_sparse_shape<BF16>(a), true, lse, dout, delta, dq, stream)
             : portable::launch_dq<cutlass::half_t, false>(
                   a, sm90::make_sparse_shape<F16>(a), true, lse, dout, delta, dq, stream);
}

cudaError_t portable_dense_attention_bwd_dq(DType dtype, const DenseAttentionArgs& a,
                                            const float* lse, const void* dout,
                                            const float* delta, void* dq, cudaStream_t stream) {
  if (!dense_attention_bwd_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0 || a.Hq == 0) return cudaSuccess;
  using BF16 = portable::DqTraits<cutlass::bfloat16_t>;
  using F16 = portable::DqTraits<cutlass::half_t>;
  return dtype == DType::kBF16
             ? portable::launch_dq<cutlass::bfloat16_t, true>(
                   a, portable::dense_shape<BF16>(a), a.causal, lse, dout, delta, dq, stream)
             : portable::launch_dq<cutlass::half_t, true>(
                   a, portable::dense_shape<F16>(a), a.causal, lse, dout, delta, dq, stream);
}

}  // namespace jax_msa::cuda
