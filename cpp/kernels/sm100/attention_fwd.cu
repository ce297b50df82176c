// Block-sparse and dense attention forwards for Blackwell (the SM100 family:
// tcgen05 MMA into tensor memory; built as sm_100a SASS only, the sm_90a pass
// of this file compiles to empty kernels that the host side never launches).
// One kernel: the dense forward walks blocks 0 .. n - 1 (n: the last block a
// row of the tile sees) where the sparse one walks the union of the tile's
// selected blocks, as the portable forward (portable/attention_fwd.cu) does,
// with its tiles, loads and masks (portable/attention_tile.hpp, TileUnion,
// OnlineSoftmax).
//
// A CTA of 128 threads (4 warps) takes one tile of 128 (token, head) rows and
// holds it in the 128 lanes of tensor memory: thread t owns row t (warp w may
// only touch lanes 32 w .. 32 w + 31, which are its threads' rows). Tensor
// memory columns 0 .. 127: S (fp32, 128 rows x 128 keys); 128 .. 255: O
// (fp32, 128 rows x 128 dims). Per block i of the walk, in order:
//
//   S:       warp 0 issues S = Q K_i^T (tcgen05.mma, A and B from shared
//            memory, 8 steps of k = 16), tcgen05.commit -> s_full;
//   loads:   once O += P_{i-1} V_{i-1} is done, every thread cp.asyncs its
//            share of block i + 1's K and V into the other stage (two
//            stages; Q once at the start);
//   softmax: each thread tcgen05.lds its row of S (128 registers), applies
//            the masks and the online softmax (OnlineSoftmax, one lane per
//            row), writes its row of P (bf16/fp16) to shared memory and
//            rescales its row of O in tensor memory (ld, multiply, st) when
//            its warp's max moved;
//   O:       warp 0 issues O += P V_i (tcgen05.mma, P and V from shared
//            memory), tcgen05.commit -> o_done.
//
// Simple rather than fast: the tensor cores wait while the softmax runs (no
// second S buffer, no separate correction warps); S_i runs right after
// O += P_{i-1} V_{i-1}, and the loads of block i + 1 overlap the softmax and
// O of block i. All rows take part in every MMA; rows whose token did not
// select a block get P = 0 for it (masked to -inf).
//
// Synchronisation (generation i = the i-th block of the walk):
//   s_full (mbarrier, 1 arrival: tcgen05.commit after S_i): S_i is in tensor
//     memory. Phase parity i & 1.
//   o_done (mbarrier, 1 arrival: tcgen05.commit after O += P_i V_i): O holds
//     block i, and P and K_i, V_i in shared memory have been read (a commit
//     tracks every earlier tcgen05.mma of the thread, S_i's too). Parity i & 1.
//   __syncthreads A (before S_i): Q and block i have landed (cp.async.wait_
//     group 0, then fence.proxy.async so that the tensor cores, the async
//     proxy, see these generic-proxy writes). Every tcgen05.ld of S_{i-1}
//     completed before barrier B of block i - 1, so S may be overwritten.
//   __syncthreads B (before O += P_i V_i): P_i is in shared memory (fence.
//     proxy.async), O's rescale is in tensor memory (tcgen05.wait::st), every
//     tcgen05.ld of S_i is complete; tcgen05.fence::before_thread_sync before
//     it and tcgen05.fence::after_thread_sync after it in warp 0 order the
//     MMA after those tensor-memory accesses.
//   A wait on s_full / o_done is followed by tcgen05.fence::after_thread_sync
//   before tensor memory is touched. No thread can be a phase ahead of
//   another: O += P_i V_i is issued only after barrier B of block i, which
//   every thread reaches after its wait for o_done of block i - 1.
//   Stage reuse: block i + 1 goes into stage (i + 1) % 2, last read by
//   S_{i-1} and O += P_{i-1} V_{i-1}; its loads start after o_done of i - 1.
//
// Only valid ids enter the union (TileUnion); keys at or past min(kv_len, Sk)
// are zero-filled, not read, so that no padding value (NaN, say) reaches
// P V.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/tmem_allocator_sm100.hpp>
#include <cute/atom/mma_traits_sm100.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/portable/attention_tile.hpp"
#include "kernels/portable/mma_sync.hpp"
#include "kernels/sm90/online_softmax.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"
#include "kernels/sm100/tensor_memory.hpp"

// The other architectures' passes compile the kernels empty: what only they
// use is unreferenced there (warning 177).
#pragma nv_diag_suppress 177

namespace jax_msa::sm100 {
namespace {

using namespace cute;
using portable::AllRows;
using portable::FwdParams;
using sm90::OnlineSoftmax;
using sm90::SparseShape;
using sm90::SparseTile;
using sm90::TileRows;
using sm90::TileUnion;

template <class Element_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kD = 128;
  static constexpr int kKeys = 128;   // keys per block (spec §2)
  static constexpr int kPiece = 128;  // keys per shared-memory stage: a block, the N of Q K^T
  static constexpr int kStages = 2;
  static constexpr int kRows = 128;   // the M of both MMAs: one tensor-memory lane per row
  static constexpr int kThreads = 128;
  // For make_sparse_shape and TileUnion: tokens * topk <= 128, tokens <= 64.
  static constexpr int kMaxCandidates = 128;
  static constexpr int kMaxTokens = 64;
  static constexpr int kColumnsS = 0;  // tensor-memory columns of S and of O
  static constexpr int kColumnsO = kKeys;
  static constexpr int kTmemColumns = 256;  // a power of 2 >= 32, >= kKeys + kD

  // S = Q K^T: A = Q (rows x dims), B = K (keys x dims), both K-major.
  using MmaS = decltype(make_tiled_mma(SM100_MMA_F16BF16_SS<Element, Element, float, kRows, kKeys,
                                                            UMMA::Major::K, UMMA::Major::K>{}));
  // O += P V: A = P (rows x keys, K-major), B = V seen as dims x keys, whose
  // dims are contiguous (MN-major).
  using MmaO = decltype(make_tiled_mma(SM100_MMA_F16BF16_SS<Element, Element, float, kRows, kD,
                                                            UMMA::Major::K, UMMA::Major::MN>{}));
  // 128-byte rows swizzled in 8-row atoms, the layout the MMA's shared-memory
  // descriptors name (and what load_rows / load_piece write through CuTe).
  using SmemAtom = decltype(UMMA::Layout_K_SW128_Atom<Element>{});
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
  using SmemLayoutP = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kKeys>>{}));
  using SmemLayoutKV =
      decltype(tile_to_shape(SmemAtom{}, Shape<Int<kPiece>, Int<kD>, Int<kStages>>{}));
  // V as dims x keys x stage: the same bytes, the B operand of P V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kD>, Int<kPiece>, Int<kStages>>{},
                                  Stride<Int<kPiece>, _1, Int<kPiece * kD>>{})));

  struct SharedStorage {
    alignas(1024) Element q[cosize_v<SmemLayoutQ>];
    alignas(1024) Element k[cosize_v<SmemLayoutKV>];
    alignas(1024) Element v[cosize_v<SmemLayoutKV>];
    alignas(1024) Element p[cosize_v<SmemLayoutP>];
    uint64_t union_tokens[kMaxCandidates];
    int32_t union_block[kMaxCandidates];
    int32_t union_count;
    uint32_t tmem_base;  // written by tcgen05.alloc
    alignas(8) uint64_t s_full;
    alignas(8) uint64_t o_done;
  };
  // The swizzle (and the descriptors' base offset of 0) needs 1024-byte
  // aligned operands: the kernel aligns the dynamic shared memory itself.
  static constexpr int kSmemBytes = sizeof(SharedStorage) + 1024;
};

// The rows of a thread that holds one whole row (tensor-memory lane `tid`),
// its columns in order: TileRows' masks and placement for that layout.
struct LaneRow : TileRows<1> {
  __device__ explicit LaneRow(int tid) : TileRows<1>(0) {
    row_base = tid;
    col_base = 0;
  }
  __device__ int column(int j) const { return j; }
};

// Eight 16-bit values as 16 bytes (`to` 16-byte aligned).
template <class Element>
__device__ __forceinline__ uint4 pack_16(const cutlass::Array<Element, 8>& values) {
  static_assert(sizeof(values) == sizeof(uint4));
  uint4 bits;
  memcpy(&bits, &values, sizeof(bits));
  return bits;
}
template <class Element>
__device__ __forceinline__ void store_16(Element* to, const cutlass::Array<Element, 8>& values) {
  *reinterpret_cast<uint4*>(to) = pack_16(values);
}
// The same into shared memory: st.shared, as the swizzled address (an
// integer XOR in CuTe) no longer tells the compiler its state space.
template <class Element>
__device__ __forceinline__ void store_shared_16(Element* to,
                                                const cutlass::Array<Element, 8>& values) {
  const uint4 bits = pack_16(values);
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(cute::cast_smem_ptr_to_uint(to)),
               "r"(bits.x), "r"(bits.y), "r"(bits.z), "r"(bits.w)
               : "memory");
}

template <class Traits, bool kDense>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_fwd_kernel(const __grid_constant__ FwdParams<Traits> p) {
#if defined(CUTE_ARCH_TCGEN05_F16F32_MMA_ENABLED) && defined(CUTE_ARCH_TCGEN05_TMEM_ENABLED)
  using Element = typename Traits::Element;
  extern __shared__ char smem_raw[];
  // Aligned by an offset from smem_raw, so that the compiler still knows the
  // accesses for shared memory (STS, not generic stores).
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) % 1024;
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw + (1024 - misalign) % 1024);
  const SparseShape& s = p.in.shape;
  const SparseTile tile(blockIdx.x, s.B, s.Hkv, s.chunks, s.tokens);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t q_len = s.q_lengths[tile.b];
  const int64_t kv_len = s.kv_lengths[tile.b];
  const int64_t key_limit = std::min(kv_len, s.Sk);

  portable::load_rows<Traits>(ss.q, p.in.q, p.in.shape, tile, q_len);
  portable::cp_async_commit();
  if (warp == 0) {
    // The whole warp: tcgen05.alloc is .sync.aligned. 256 columns; one CTA
    // per SM (shared memory), so the allocation never waits.
    cute::TMEM::Allocator1Sm().allocate(Traits::kTmemColumns, &ss.tmem_base);
    if constexpr (!kDense) {
      const TileUnion<Traits> u(s, tile, q_len, kv_len, lane);
      u.store(ss.union_block, ss.union_tokens, lane);
      if (lane == 0) ss.union_count = u.count;
    }
  }
  if (tid == 0) {
    if constexpr (kDense) {
      ss.union_count = portable::dense_tile_blocks(s, tile, q_len, kv_len, p.in.causal);
    }
    cutlass::arch::ClusterBarrier::init(&ss.s_full, 1);
    cutlass::arch::ClusterBarrier::init(&ss.o_done, 1);
    cutlass::arch::fence_barrier_init();
  }
  // The allocation's address, the union and the barriers, for everyone
  // (the alloc's write to shared memory is ordered by the tcgen05 fences).
  tmem_fence_before_sync();
  __syncthreads();
  tmem_fence_after_sync();
  const uint32_t tmem = ss.tmem_base;
  const int blocks = ss.union_count;
  auto block_at = [&](int i) -> int64_t { return kDense ? i : ss.union_block[i]; };
  if (blocks > 0) portable::load_piece<Traits>(ss.k, ss.v, p.in, tile, block_at(0) * Traits::kKeys, key_limit, 0);
  portable::cp_async_commit();

  // The MMAs (issued by warp 0: each tcgen05.mma by one elected lane).
  typename Traits::MmaS mma_s;
  typename Traits::MmaO mma_o;
  auto thr_s = mma_s.get_slice(0);
  auto thr_o = mma_o.get_slice(0);
  Tensor sQ = make_tensor(make_smem_ptr(ss.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v), typename Traits::SmemLayoutVt{});
  Tensor sP = make_tensor(make_smem_ptr(ss.p), typename Traits::SmemLayoutP{});
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));  // descriptors (1, 1, D / 16)
  Tensor tSrP = thr_o.make_fragment_A(thr_o.partition_A(sP));  // (1, 1, keys / 16)
  Tensor tStS = partition_fragment_C(mma_s, Shape<Int<Traits::kRows>, Int<Traits::kKeys>>{});
  Tensor tOtO = partition_fragment_C(mma_o, Shape<Int<Traits::kRows>, Int<Traits::kD>>{});
  tStS.data() = tmem + Traits::kColumnsS;
  tOtO.data() = tmem + Traits::kColumnsO;

  // This thread's lane (row tid) of tensor memory: bits 31..16 of the address.
  const uint32_t lane_addr = tmem_lane_addr(tmem);
  using Rows = std::conditional_t<kDense, AllRows<LaneRow>, LaneRow>;
  Rows rows(tid);
  if constexpr (kDense) {
    rows.start(s, tile, q_len, kv_len, p.in.causal);
  } else {
    rows.start(s, tile, q_len, kv_len);
  }
  OnlineSoftmax<1, 0, 1> softmax;
  {
    const float factors[1] = {p.in.scale_log2};
    softmax.start(factors);
  }

  for (int i = 0; i < blocks; ++i) {
    const int stage = i % Traits::kStages;
    // Barrier A: Q and block i have landed (the only cp.asyncs in flight),
    // for the async proxy.
    portable::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    if (warp == 0) {
      tmem_fence_after_sync();
      Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK(_, _, stage)));
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tSrQ); ++k) {
        mma_s.accumulate_ = k == 0 ? UMMA::ScaleOut::Zero : UMMA::ScaleOut::One;
        cute::gemm(mma_s, tSrQ(_, _, k), tSrK(_, _, k), tStS);
      }
      cutlass::arch::umma_arrive(&ss.s_full);
    }
    if (i > 0) {
      // O += P_{i-1} V_{i-1} is done (the tensor cores run S_i after it):
      // stage (i + 1) % 2 and P are free, O is stable for the rescale below.
      cutlass::arch::ClusterBarrier::wait(&ss.o_done, static_cast<uint32_t>((i - 1) & 1));
      tmem_fence_after_sync();
    }
    if (i + 1 < blocks) {
      portable::load_piece<Traits>(ss.k, ss.v, p.in, tile, block_at(i + 1) * Traits::kKeys, key_limit,
                                   (i + 1) % Traits::kStages);
      portable::cp_async_commit();
    }
    cutlass::arch::ClusterBarrier::wait(&ss.s_full, static_cast<uint32_t>(i & 1));
    tmem_fence_after_sync();

    // This thread's row of S, the masks and the online softmax: P in place.
    uint32_t row_bits[Traits::kKeys];
    tmem_load_row(lane_addr, Traits::kColumnsS, row_bits);
    Tensor row = make_tensor<float>(Shape<_1, Int<Traits::kKeys>>{});
    CUTE_UNROLL
    for (int j = 0; j < Traits::kKeys; ++j) row(0, j) = __uint_as_float(row_bits[j]);
    const uint64_t tokens = kDense ? ~uint64_t{0} : ss.union_tokens[i];
    softmax.apply(row, rows, block_at(i) * Traits::kKeys, Traits::kKeys, tokens);

    // P (row tid) into shared memory, 8 keys (16 bytes) at a time: the
    // swizzle keeps each 16-byte chunk whole, and the 8 rows of an atom in 8
    // different bank groups.
    cutlass::NumericArrayConverter<Element, float, 8> to_element;
    CUTE_UNROLL
    for (int c = 0; c < Traits::kKeys / 8; ++c) {
      cutlass::Array<float, 8> v;
      CUTE_UNROLL
      for (int j = 0; j < 8; ++j) v[j] = row(0, 8 * c + j);
      store_shared_16(&sP(tid, 8 * c), to_element(v));
    }
    // O *= correction (not before O's first block: O += P_0 V_0 overwrites).
    // softmax.rescale is uniform over the warp, as tcgen05.ld/st need.
    if (i > 0 && softmax.rescale) {
      CUTE_UNROLL
      for (int c = 0; c < Traits::kD / 32; ++c) {
        uint32_t o[32];
        tmem_load_row(lane_addr, Traits::kColumnsO + 32 * c, o);
        CUTE_UNROLL
        for (int j = 0; j < 32; ++j) o[j] = __float_as_uint(__uint_as_float(o[j]) * softmax.correction[0]);
        tmem_store_32(lane_addr + Traits::kColumnsO + 32 * c, o);
      }
      cutlass::arch::fence_view_async_tmem_store();
    }

    // Barrier B: P visible to the async proxy, this thread's tensor-memory
    // loads and stores done.
    cutlass::arch::fence_view_async_shared();
    tmem_fence_before_sync();
    __syncthreads();
    if (warp == 0) {
      tmem_fence_after_sync();
      Tensor tOrV = thr_o.make_fragment_B(thr_o.partition_B(sVt(_, _, stage)));
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tSrP); ++k) {
        mma_o.accumulate_ = i == 0 && k == 0 ? UMMA::ScaleOut::Zero : UMMA::ScaleOut::One;
        cute::gemm(mma_o, tSrP(_, _, k), tOrV(_, _, k), tOtO);
      }
      cutlass::arch::umma_arrive(&ss.o_done);
    }
  }

  // out = O / l, lse = ln(sum of exp): zero / -inf for a row that saw no key
  // (and for every row of a tile with no block, whose O was never written).
  portable::cp_async_wait<0>();  // a tile with no block has not waited for its Q
  if (blocks > 0) {
    cutlass::arch::ClusterBarrier::wait(&ss.o_done, static_cast<uint32_t>((blocks - 1) & 1));
    tmem_fence_after_sync();
  }
  const float total = softmax.row_sum[0];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const bool writes = rows.token_of[0] >= 0;
  Element* dst = p.out + rows.out_row[0] * Traits::kD;
  cutlass::NumericArrayConverter<Element, float, 8> to_element;
  CUTE_UNROLL
  for (int c = 0; c < Traits::kD / 32; ++c) {
    uint32_t o[32];
    if (blocks > 0) {
      tmem_load_row(lane_addr, Traits::kColumnsO + 32 * c, o);  // the warp together
    } else {
      CUTE_UNROLL
      for (int j = 0; j < 32; ++j) o[j] = 0u;
    }
    if (!writes) continue;
    CUTE_UNROLL
    for (int q = 0; q < 4; ++q) {
      cutlass::Array<float, 8> v;
      CUTE_UNROLL
      for (int j = 0; j < 8; ++j) v[j] = __uint_as_float(o[8 * q + j]) * inv;
      store_16(dst + 32 * c + 8 * q, to_element(v));
    }
  }
  if (writes) p.lse[rows.out_row[0]] = softmax.lse(0, total);

  // Every tcgen05.ld has completed (tmem_load_row waits): free the columns.
  tmem_fence_before_sync();
  __syncthreads();
  if (warp == 0) {
    tmem_fence_after_sync();
    cute::TMEM::Allocator1Sm allocator;
    allocator.release_allocation_lock();
    allocator.free(tmem, Traits::kTmemColumns);
  }
#endif
}

template <class Traits, bool kDense>
cudaError_t launch(const FwdParams<Traits>& p, cudaStream_t stream) {
  const cudaError_t st = check_device();
  if (st != cudaSuccess) return st;
  return portable::launch_tiles<Traits>(attention_fwd_kernel<Traits, kDense>, p, p.in.shape.tiles,
                                        stream);
}

template <class Element>
cudaError_t launch_sparse(const cuda::SparseAttentionArgs& a, void* out, float* lse,
                          cudaStream_t stream) {
  using Traits = FwdTraits<Element>;
  return launch<Traits, false>(
      portable::make_params<Traits>(sm90::make_sparse_shape<Traits>(a), true, a, out, lse),
      stream);
}

template <class Element>
cudaError_t launch_dense(const cuda::DenseAttentionArgs& a, void* out, float* lse,
                         cudaStream_t stream) {
  using Traits = FwdTraits<Element>;
  return launch<Traits, true>(
      portable::make_params<Traits>(portable::dense_shape<Traits>(a), a.causal, a, out, lse),
      stream);
}

}  // namespace
}  // namespace jax_msa::sm100

namespace jax_msa::cuda {

cudaError_t sm100_sparse_attention_fwd(DType dtype, const SparseAttentionArgs& a, void* out,
                                       float* lse, cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  return dtype == DType::kBF16 ? sm100::launch_sparse<cutlass::bfloat16_t>(a, out, lse, stream)
                               : sm100::launch_sparse<cutlass::half_t>(a, out, lse, stream);
}

cudaError_t sm100_dense_attention_fwd(DType dtype, const DenseAttentionArgs& a, void* out,
                                      float* lse, cudaStream_t stream) {
  if (!dense_attention_args_valid(dtype, a) || a.D != 128 || a.Hq / a.Hkv > 128) {
    return cudaErrorInvalidValue;
  }
  if (a.B == 0 || a.Sq == 0 || a.Hq == 0) return cudaSuccess;
  return dtype == DType::kBF16 ? sm100::launch_dense<cutlass::bfloat16_t>(a, out, lse, stream)
                               : sm100::launch_dense<cutlass::half_t>(a, out, lse, stream);
}

}  // namespace jax_msa::cuda
