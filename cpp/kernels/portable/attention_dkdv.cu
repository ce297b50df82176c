// The dK / dV half of the block-sparse and dense attention backwards for every
// GPU since Ampere (the portable family: mma.sync, ldmatrix and cp.async
// only). The sparse one walks the block -> queries index of
// sparse_attention_bwd_prepare (sm90/sparse_block_index.hpp), the dense one
// every query token that sees the block; the math is that of the SM90 dK / dV
// kernel (sm90/kv_outer_bwd.hpp).
//
// KV-outer: a CTA takes one key block c (128 keys) of one (batch row b, kv
// head g), keeps its K and V in shared memory and walks row tiles of 64
// (token, head) rows: floor(64 / G) tokens times the G query heads of the
// group (sparse: the bucket's tiles of the index, tokens in increasing order;
// dense: consecutive tokens from the first that sees the block). A tile's Q,
// dO, lse and delta rows are gathered by cp.async, two stages (one where
// shared memory is short), so that the next tile loads while this one
// computes. Eight warps; warp w owns keys [16w, 16w + 16) of the block and
// holds their dK and dV (16 x 128 fp32 each) in registers over all tiles. Per
// tile, in steps of 32 rows (16 with one stage), so that S^T and dP^T fit
// beside dK and dV in the registers:
//   S^T  = K_w Q^T, dP^T = V_w dO^T        (16 x 32 x 128, ldmatrix operands)
//   P^T  = exp2(S^T * scale * log2e - lse * log2e), masked
//   dS^T = P^T (dP^T - delta)
//   dV_w += P^T dO, dK_w += dS^T Q          (16 x 128 x 32, P^T and dS^T from
//                                            registers, dO^T / Q^T by ldmatrix.trans)
// The swapped products (keys along M) leave P^T and dS^T in the register
// layout of the next products' A operand: no trip through shared memory, and
// no warp needs another's. dK = scale * sum dS^T Q, dV = sum P^T dO are
// written once, whole (zeros for keys no query attends): deterministic, no
// workspace.
//
// Bounds: keys at or past min(kv_len, Sk) are zero-filled, never read; a row
// whose token is not in [0, min(q_len, Sq)) (index value or tile tail) is
// zero-filled and masked out.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/kv_outer_gather.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/sparse_block_index.hpp"

namespace jax_msa::portable {
namespace {

using namespace cute;
using sm90::block_index::clamp_len;
using sm90::block_index::Geometry;
using sm90::block_index::IndexView;
using sm90::kv_outer::cp_async_16z;
using sm90::kv_outer::cp_async_4z;
using sm90::kv_outer::fast_exp2;
using sm90::kv_outer::pack2;

constexpr float kLog2e = 1.4426950408889634f;

template <class Element_, int kStages_>
struct DkdvTraits {
  using Element = Element_;
  static constexpr int kD = 128;     // head dim (the only one)
  static constexpr int kKeys = sm90::block_index::kBlock;      // 128
  static constexpr int kRows = sm90::block_index::kTileRows;   // 64 (token, head) rows per tile
  // Rows per product step: 32, or 16 with one stage (32 spills a few bytes there).
  static constexpr int kStep = kStages_ == 1 ? 16 : 32;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kKeys / 16;
  static constexpr int kThreads = 32 * kWarps;

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                     SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // Warp w: keys 16 w .. 16 w + 15 (M); N in 16s so that one ldmatrix.x4 feeds two atoms.
  using TiledMma = decltype(make_tiled_mma(MmaAtom{}, Layout<Shape<Int<kWarps>, _1, _1>>{},
                                           Tile<Int<kKeys>, _16, _16>{}));
  // 128-byte rows, 16-byte chunks swizzled within 8-row atoms (as the forward).
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kKeys>, Int<kD>>{}));
  // Gathered rows (Q, dO): (row, dim, stage), and seen as (dim, row, stage):
  // the B operand of dK += dS^T Q, dV += P^T dO.
  using SmemLayoutQ =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kD>, Int<kRows>, Int<kStages>>{},
                                 Stride<Int<kRows>, _1, Int<kRows * kD>>{})));

  struct SharedStorage {
    alignas(128) Element k[cosize_v<SmemLayoutKV>];
    alignas(128) Element v[cosize_v<SmemLayoutKV>];
    alignas(128) Element q[cosize_v<SmemLayoutQ>];
    alignas(128) Element dout[cosize_v<SmemLayoutQ>];
    float lse[kStages][kRows];
    float delta[kStages][kRows];
    int32_t token[kStages][kRows];  // INT_MIN / 2: no row (masked everywhere)
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

// The problem as both walks see it.
struct DkdvShape {
  int64_t B, Sq, Sk, Hq, Hkv;
  int64_t G;    // Hq / Hkv (<= 64)
  int64_t tpt;  // tokens per tile: floor(64 / G)
  int64_t nb;   // key blocks per (batch row, kv head): ceil(Sk / 128)
};

template <class Element>
struct DkdvParams {
  DkdvShape shape;
  // sparse: the buckets of sparse_attention_bwd_prepare's index (IndexView)
  const int64_t* tile_start;
  const int64_t* entry_start;
  const int32_t* bucket_count;
  const int32_t* entries;
  bool causal;           // dense only (the sparse index holds attended pairs only)
  const Element* q;
  const Element* k;
  const Element* v;
  const Element* dout;
  const float* lse;
  const float* delta;
  const int32_t* q_lengths;
  const int32_t* kv_lengths;
  Element* dk;
  Element* dv;
  float scale;
};

constexpr int32_t kNoRow = INT_MIN / 2;

// The CTA's key block, the lengths of its batch row and its row tiles.
struct BlockWork {
  int64_t b, g, c;
  int64_t q_len, kv_len;  // clamped to [0, Sq], [0, Sk]
  int64_t tiles;
  // sparse: the bucket's entries (tokens); dense: tokens first_token + i.
  const int32_t* entries;
  int64_t count;        // sparse: entries in the bucket; dense: tokens that see the block
  int64_t first_token;  // dense
};

template <bool kDense, class Element>
__device__ BlockWork block_work(const DkdvParams<Element>& p) {
  const DkdvShape& s = p.shape;
  BlockWork w{};
  if constexpr (kDense) {
    // c major: the heaviest blocks (causal: the first) start first.
    const int64_t bg = blockIdx.x % (s.B * s.Hkv);
    w.c = blockIdx.x / (s.B * s.Hkv);
    w.b = bg / s.Hkv;
    w.g = bg % s.Hkv;
  } else {
    // Bucket k = (b * Hkv + g) * nb + c (sparse_block_index.hpp).
    const int64_t bg = blockIdx.x / s.nb;
    w.c = blockIdx.x % s.nb;
    w.b = bg / s.Hkv;
    w.g = bg % s.Hkv;
  }
  w.q_len = clamp_len(p.q_lengths, w.b, s.Sq);
  w.kv_len = clamp_len(p.kv_lengths, w.b, s.Sk);
  if constexpr (kDense) {
    // Tokens first .. q_len - 1 see key c * 128 (causal: position >= c * 128).
    const int64_t first =
        p.causal ? std::max<int64_t>(0, w.c * 128 - (w.kv_len - w.q_len)) : 0;
    w.first_token = first;
    w.count = w.c * 128 < w.kv_len ? std::max<int64_t>(0, w.q_len - first) : 0;
    w.tiles = (w.count + s.tpt - 1) / s.tpt;
  } else {
    const int64_t k = blockIdx.x;
    w.tiles = p.tile_start[k + 1] - p.tile_start[k];
    w.count = p.bucket_count[k];
    w.entries = p.entries + p.entry_start[k];
  }
  return w;
}

// Four threads per tile row: thread t copies row t / 4, 16-byte chunks
// t % 4, t % 4 + 4, ... of it.
template <class Traits>
constexpr int kThreadsPerRow = Traits::kThreads / Traits::kRows;

// The token of this thread's row of tile `tile` (row n = token of slot n / G,
// head g G + n % G), -1 for none. Sparse: read from the bucket a tile before
// its rows are copied, so that the read's latency hides behind a tile's products.
template <class Traits, bool kDense>
__device__ int64_t row_token(const DkdvParams<typename Traits::Element>& p, const BlockWork& w,
                             int64_t tile) {
  const int slot = static_cast<int>(threadIdx.x / kThreadsPerRow<Traits> / p.shape.G);
  const int64_t e = tile * p.shape.tpt + slot;  // entry (sparse) / token offset (dense)
  if (tile >= w.tiles || slot >= p.shape.tpt || e >= w.count) return -1;
  return kDense ? w.first_token + e : w.entries[e];
}

// This thread's share of a tile's rows (its row's token: row_token) into
// stage `stage`: Q and dO by 16-byte chunks, lse and delta by cp.async, the
// token by a store. A row without a valid token is zeros.
template <class Traits>
__device__ void load_rows(typename Traits::SharedStorage& ss,
                          const DkdvParams<typename Traits::Element>& p, const BlockWork& w,
                          int64_t token, int stage) {
  const DkdvShape& s = p.shape;
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sO = make_tensor(make_smem_ptr(ss.dout), typename Traits::SmemLayoutQ{});
  constexpr int kPer = kThreadsPerRow<Traits>;
  const int n = threadIdx.x / kPer;
  const int part = threadIdx.x % kPer;
  const bool valid = token >= 0 && token < w.q_len;
  const int64_t qrow = (w.b * s.Sq + (valid ? token : 0)) * s.Hq + w.g * s.G + n % s.G;
  CUTE_UNROLL
  for (int j = 0; j < Traits::kD / 8 / kPer; ++j) {
    const int col = 8 * (part + kPer * j);
    cp_async_16z(&sQ(n, col, stage), valid ? p.q + qrow * Traits::kD + col : p.q, valid);
    cp_async_16z(&sO(n, col, stage), valid ? p.dout + qrow * Traits::kD + col : p.dout, valid);
  }
  if (part == 0) {
    cp_async_4z(&ss.lse[stage][n], valid ? p.lse + qrow : p.lse, valid);
    cp_async_4z(&ss.delta[stage][n], valid ? p.delta + qrow : p.delta, valid);
    ss.token[stage][n] = valid ? static_cast<int32_t>(token) : kNoRow;
  }
}

// K and V of the block (all threads); keys at or past `limit` are zeros.
template <class Traits>
__device__ void load_kv(typename Traits::SharedStorage& ss,
                        const DkdvParams<typename Traits::Element>& p, const BlockWork& w,
                        int64_t limit) {
  const DkdvShape& s = p.shape;
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutKV{});
  constexpr int kChunks = Traits::kD / 8;
  const int chunk = threadIdx.x % kChunks;
  CUTE_UNROLL
  for (int i = 0; i < Traits::kKeys * kChunks / Traits::kThreads; ++i) {
    const int key = threadIdx.x / kChunks + i * (Traits::kThreads / kChunks);
    const int64_t j = w.c * Traits::kKeys + key;
    const bool valid = j < limit;
    const int64_t at = ((w.b * s.Sk + j) * s.Hkv + w.g) * Traits::kD + 8 * chunk;
    cp_async_16z(&sK(key, 8 * chunk), valid ? p.k + at : p.k, valid);
    cp_async_16z(&sV(key, 8 * chunk), valid ? p.v + at : p.v, valid);
  }
}

template <class Traits, bool kDense>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_dkdv_kernel(const __grid_constant__ DkdvParams<typename Traits::Element> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Traits::Element;
  constexpr int kStages = Traits::kStages;
  constexpr int kStep = Traits::kStep;
  extern __shared__ char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const DkdvShape& s = p.shape;
  const int tid = threadIdx.x;

  const BlockWork w = block_work<kDense>(p);
  const int64_t q_len = w.q_len, kv_len = w.kv_len;

  if (w.tiles > 0) load_kv<Traits>(ss, p, w, kv_len);
  cp_async_commit();
  int64_t token = row_token<Traits, kDense>(p, w, 0);  // of the next tile to copy
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < w.tiles) load_rows<Traits>(ss, p, w, token, i);
    token = row_token<Traits, kDense>(p, w, i + 1);
    cp_async_commit();
  }

  typename Traits::TiledMma mma;
  auto thr = mma.get_thread_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sO = make_tensor(make_smem_ptr(ss.dout), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQt{});
  Tensor sOt = make_tensor(make_smem_ptr(ss.dout), typename Traits::SmemLayoutQt{});
  using TileS = Shape<Int<Traits::kKeys>, Int<kStep>>;        // keys x rows
  using TileKV = Shape<Int<Traits::kKeys>, Int<Traits::kD>>;  // keys x dims
  using TileStep = Shape<Int<kStep>, Int<Traits::kD>>;        // rows x dims
  using TileStepT = Shape<Int<Traits::kD>, Int<kStep>>;       // dims x rows

  auto copy_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, Element>{}, mma);
  auto copy_bt = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_bt = copy_bt.get_thread_slice(tid);

  Tensor tSrK = thr.partition_fragment_A(sK);  // (MMA, 1, D / 16)
  Tensor tSrV = thr.partition_fragment_A(sV);
  Tensor tSsK = thr_a.partition_S(sK);
  Tensor tSsV = thr_a.partition_S(sV);
  Tensor tSrK_view = thr_a.retile_D(tSrK);
  Tensor tSrV_view = thr_a.retile_D(tSrV);
  Tensor tSrQ = thr.partition_fragment_B(local_tile(sQ(_, _, 0), TileStep{}, make_coord(0, 0)));
  Tensor tSrO = make_fragment_like(tSrQ);
  Tensor tSrQ_view = thr_b.retile_D(tSrQ);
  Tensor tSrO_view = thr_b.retile_D(tSrO);
  Tensor tKrQt = thr.partition_fragment_B(local_tile(sQt(_, _, 0), TileStepT{}, make_coord(0, 0)));
  Tensor tKrOt = make_fragment_like(tKrQt);
  Tensor tKrQt_view = thr_bt.retile_D(tKrQt);
  Tensor tKrOt_view = thr_bt.retile_D(tKrOt);

  Tensor accS = partition_fragment_C(mma, TileS{});   // S^T, then P^T
  Tensor accP = partition_fragment_C(mma, TileS{});   // dP^T, then dS^T
  Tensor accK = partition_fragment_C(mma, TileKV{});
  Tensor accV = partition_fragment_C(mma, TileKV{});
  Tensor rP = make_tensor<Element>(partition_shape_A(mma, TileS{}));
  Tensor rdS = make_tensor<Element>(partition_shape_A(mma, TileS{}));
  Tensor accS_rc = make_tensor(accS.data(), rowcol_layout(accS.layout()));
  Tensor accP_rc = make_tensor(accP.data(), rowcol_layout(accP.layout()));
  Tensor cS = thr.partition_C(make_identity_tensor(TileS{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  constexpr int kKeyRows = decltype(size<0>(accS_rc))::value;  // 2
  constexpr int kCols = decltype(size<1>(accS_rc))::value;     // kStep / 4

  // Key j of this thread's row r is visible to query token i iff
  // key_rel[r] <= i: j - (kv_len - q_len) (causal; the sparse pairs are
  // causal), -1 (dense, not causal), INT_MAX past kv_len.
  int key_rel[kKeyRows];
  CUTE_UNROLL
  for (int r = 0; r < kKeyRows; ++r) {
    const int64_t j = w.c * Traits::kKeys + get<0>(cS_rc(r, 0));
    key_rel[r] = j >= kv_len            ? INT_MAX
                 : (kDense && !p.causal) ? -1
                                         : static_cast<int>(j - (kv_len - q_len));
  }
  const float scale_log2 = p.scale * kLog2e;
  clear(accK);
  clear(accV);

  for (int64_t tile = 0; tile < w.tiles; ++tile) {
    const int stage = static_cast<int>(tile % kStages);
    if (tile + kStages - 1 < w.tiles) {
      load_rows<Traits>(ss, p, w, token, static_cast<int>((tile + kStages - 1) % kStages));
    }
    token = row_token<Traits, kDense>(p, w, tile + kStages);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();
    // Rolled: unrolled, the steps' operands overlap and spill on sm_90a.
#pragma unroll 1
    for (int h = 0; h < Traits::kRows / kStep; ++h) {
      Tensor sQh = local_tile(sQ(_, _, stage), TileStep{}, make_coord(h, 0));
      Tensor sOh = local_tile(sO(_, _, stage), TileStep{}, make_coord(h, 0));
      Tensor tSsQ = thr_b.partition_S(sQh);
      Tensor tSsO = thr_b.partition_S(sOh);
      // S^T = K Q^T, dP^T = V dO^T.
      clear(accS);
      clear(accP);
      CUTE_UNROLL
      for (int kd = 0; kd < size<2>(tSrK); ++kd) {
        copy(copy_a, tSsK(_, _, kd), tSrK_view(_, _, kd));
        copy(copy_b, tSsQ(_, _, kd), tSrQ_view(_, _, kd));
        cute::gemm(mma, tSrK(_, _, kd), tSrQ(_, _, kd), accS);
        copy(copy_a, tSsV(_, _, kd), tSrV_view(_, _, kd));
        copy(copy_b, tSsO(_, _, kd), tSrO_view(_, _, kd));
        cute::gemm(mma, tSrV(_, _, kd), tSrO(_, _, kd), accP);
      }
      // P^T and dS^T, masked: column n is row h * kStep + n of the tile.
      CUTE_UNROLL
      for (int jc = 0; jc < kCols; ++jc) {
        const int n = h * kStep + get<1>(cS_rc(0, jc));
        const int32_t token = ss.token[stage][n];
        const float lse = ss.lse[stage][n];
        const float dlt = ss.delta[stage][n];
        const float neg_lse = lse == -INFINITY ? -INFINITY : -lse * kLog2e;
        CUTE_UNROLL
        for (int r = 0; r < kKeyRows; ++r) {
          const bool visible = key_rel[r] <= token;
          const float pr = visible ? fast_exp2(fmaf(accS_rc(r, jc), scale_log2, neg_lse)) : 0.0f;
          accS_rc(r, jc) = pr;
          accP_rc(r, jc) = pr * (accP_rc(r, jc) - dlt);
        }
      }
      sm90::acc_to_operand(accS, rP);
      sm90::acc_to_operand(accP, rdS);
      // dV += P^T dO, dK += dS^T Q.
      Tensor tKsQt = thr_bt.partition_S(local_tile(sQt(_, _, stage), TileStepT{}, make_coord(0, h)));
      Tensor tKsOt = thr_bt.partition_S(local_tile(sOt(_, _, stage), TileStepT{}, make_coord(0, h)));
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(rP); ++kk) {
        copy(copy_bt, tKsOt(_, _, kk), tKrOt_view(_, _, kk));
        cute::gemm(mma, rP(_, _, kk), tKrOt(_, _, kk), accV);
        copy(copy_bt, tKsQt(_, _, kk), tKrQt_view(_, _, kk));
        cute::gemm(mma, rdS(_, _, kk), tKrQt(_, _, kk), accK);
      }
    }
    __syncthreads();  // the stage is refilled by the tile after next
  }

  // dk = scale * accK, dv = accV, keys below Sk.
  Tensor cKV = thr.partition_C(make_identity_tensor(TileKV{}));
  Tensor cKV_rc = make_tensor(cKV.data(), rowcol_layout(cKV.layout()));
  Tensor accK_rc = make_tensor(accK.data(), rowcol_layout(accK.layout()));
  Tensor accV_rc = make_tensor(accV.data(), rowcol_layout(accV.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(accV_rc); ++r) {
    const int64_t key = w.c * Traits::kKeys + get<0>(cKV_rc(r, 0));
    if (key < s.Sk) {
      const int64_t at = ((w.b * s.Sk + key) * s.Hkv + w.g) * Traits::kD;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(accV_rc); j += 2) {
        const int d = get<1>(cKV_rc(r, j));
        *reinterpret_cast<uint32_t*>(p.dk + at + d) =
            pack2<Element>(accK_rc(r, j) * p.scale, accK_rc(r, j + 1) * p.scale);
        *reinterpret_cast<uint32_t*>(p.dv + at + d) = pack2<Element>(accV_rc(r, j), accV_rc(r, j + 1));
      }
    }
  }
#endif
}

// Two row stages where the device's shared memory holds them (sm_80, sm_90:
// 130 KiB), one elsewhere (sm_86, sm_89: 97 KiB).
template <class Element, bool kDense>
cudaError_t launch(const DkdvParams<Element>& p, int64_t ctas, cudaStream_t stream) {
  if (ctas == 0) return cudaSuccess;
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  int device = 0, smem = 0;
  cudaError_t st = cudaGetDevice(&device);
  if (st == cudaSuccess) {
    st = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (st != cudaSuccess) return st;
  const auto run = [&](auto kernel, int bytes) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
    kernel<<<static_cast<unsigned>(ctas), DkdvTraits<Element, 2>::kThreads, bytes, stream>>>(p);
    return cudaGetLastError();
  };
  using Two = DkdvTraits<Element, 2>;
  using One = DkdvTraits<Element, 1>;
  if (smem >= Two::kSmemBytes) return run(attention_dkdv_kernel<Two, kDense>, Two::kSmemBytes);
  return run(attention_dkdv_kernel<One, kDense>, One::kSmemBytes);
}

template <class Element>
DkdvParams<Element> make_params(const DkdvShape& shape, const void* q, const void* k,
                                const void* v, const int32_t* q_lengths,
                                const int32_t* kv_lengths, float scale, const float* lse,
                                const void* dout, const float* delta, void* dk, void* dv) {
  DkdvParams<Element> p{};
  p.shape = shape;
  p.q = static_cast<const Element*>(q);
  p.k = static_cast<const Element*>(k);
  p.v = static_cast<const Element*>(v);
  p.dout = static_cast<const Element*>(dout);
  p.lse = lse;
  p.delta = delta;
  p.q_lengths = q_lengths;
  p.kv_lengths = kv_lengths;
  p.dk = static_cast<Element*>(dk);
  p.dv = static_cast<Element*>(dv);
  p.scale = scale;
  return p;
}

DkdvShape dkdv_shape(int64_t B, int64_t Sq, int64_t Sk, int64_t Hq, int64_t Hkv) {
  const int64_t G = Hq / Hkv;
  return {B, Sq, Sk, Hq, Hkv, G, sm90::block_index::kTileRows / G,
          (Sk + sm90::block_index::kBlock - 1) / sm90::block_index::kBlock};
}

template <class Element>
cudaError_t sparse_dkdv(const cuda::SparseAttentionArgs& a, const float* lse, const void* dout,
                        const float* delta, const int32_t* index, void* dk, void* dv,
                        cudaStream_t stream) {
  DkdvParams<Element> p = make_params<Element>(dkdv_shape(a.B, a.Sq, a.Sk, a.Hq, a.Hkv), a.q,
                                               a.k, a.v, a.q_lengths, a.kv_lengths, a.scale, lse,
                                               dout, delta, dk, dv);
  const Geometry geo(a);
  const IndexView ix(const_cast<int32_t*>(index), geo);
  p.tile_start = ix.tile_start;
  p.entry_start = ix.entry_start;
  p.bucket_count = ix.count;
  p.entries = ix.entries;
  p.causal = true;
  return launch<Element, false>(p, geo.nbkt, stream);
}

template <class Element>
cudaError_t dense_dkdv(const cuda::DenseAttentionArgs& a, const float* lse, const void* dout,
                       const float* delta, void* dk, void* dv, cudaStream_t stream) {
  DkdvParams<Element> p = make_params<Element>(dkdv_shape(a.B, a.Sq, a.Sk, a.Hq, a.Hkv), a.q,
                                               a.k, a.v, a.q_lengths, a.kv_lengths, a.scale, lse,
                                               dout, delta, dk, dv);
  p.causal = a.causal;
  return launch<Element, true>(p, a.B * a.Hkv * p.shape.nb, stream);
}

}  // namespace
}  // namespace jax_msa::portable

namespace jax_msa::cuda {

cudaError_t portable_sparse_attention_bwd_dkdv(DType dtype, const SparseAttentionArgs& a,
                                               const float* lse, const void* dout,
                                               const float* delta, const int32_t* index,
                                               void* dk, void* dv, cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;  // empty buffers: no index to read
  if (index == nullptr || reinterpret_cast<uintptr_t>(index) % 8 != 0) return cudaErrorInvalidValue;
  return dtype == DType::kBF16
             ? portable::sparse_dkdv<cutlass::bfloat16_t>(a, lse, dout, delta, index, dk, dv, stream)
             : portable::sparse_dkdv<cutlass::half_t>(a, lse, dout, delta, index, dk, dv, stream);
}

cudaError_t portable_dense_attention_bwd_dkdv(DType dtype, const DenseAttentionArgs& a,
                                              const float* lse, const void* dout,
                                              const float* delta, void* dk, void* dv,
                                              cudaStream_t stream) {
  if (!dense_attention_bwd_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  return dtype == DType::kBF16
             ? portable::dense_dkdv<cutlass::bfloat16_t>(a, lse, dout, delta, dk, dv, stream)
             : portable::dense_dkdv<cutlass::half_t>(a, lse, dout, delta, dk, dv, stream);
}

}  // namespace jax_msa::cuda
