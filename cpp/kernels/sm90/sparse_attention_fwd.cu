// Block-sparse attention forward on SM90 (spec §3.4), query-outer.
//
// A CTA owns a tile of 128 (token, head) rows (see sparse_attention_traits.hpp)
// and walks the union of its tokens' selected blocks; each consumer
// warpgroup holds 64 of the rows. Per block: S = Q K^T (wgmma, both from
// shared memory), the row mask (the row's token did not select the block) and
// the causal / length mask, an online softmax in fp32 with exp2, then
// O += P V (wgmma, P from registers). A warpgroup leaves out the blocks that
// none of its own tokens selected (walk_selected_blocks). Tiles are handed out
// persistently (CTA i takes tiles i, i + grid, ...) while the producer warps
// prepare the next.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_conversion.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/online_softmax.hpp"
#include "kernels/sm90/query_outer_walk.hpp"
#include "kernels/sm90/rowmax_epilogue.hpp"
#include "kernels/sm90/schedule_gate.hpp"
#include "kernels/sm90/sparse_attention_traits.hpp"
#include "kernels/sm90/sparse_fwd_by_block.hpp"
#include "kernels/sm90/sparse_tile_producer.hpp"

namespace jax_msa::sm90 {
namespace {

using namespace cute;

template <class Traits>
struct FwdParams {
  TmaKV<Traits> tma_k, tma_v;
  SparseShape shape;
  const typename Traits::Element* q;
  typename Traits::Element* out;
  float* lse;
  float scale_log2;  // scale * log2(e)
  ScheduleGate gate;
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    sparse_attention_fwd_kernel(const __grid_constant__ FwdParams<Traits> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Element = typename Traits::Element;
  using SharedStorage = typename Traits::SharedStorage;
  constexpr int kSlots = Traits::kSlots;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);
  const SparseShape& s = p.shape;
  if (p.gate.closed()) return;

  init_tile_barriers<Traits>(ss);

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<56>();
    if (threadIdx.x < 64) {  // warp 0 loads, warp 1 builds the unions
      produce_tiles<Traits, true>(ss, s, p.tma_k, p.tma_v, blockIdx.x, gridDim.x,
                            [&](const SparseTile& tile, int64_t q_len) {
                              load_tile_rows<Traits>(p.q, ss.rows[0], s, tile, q_len, threadIdx.x);
                            });
    }
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<224>();
  const int tid = threadIdx.x - 128;
  QueryOuterFragments<Traits> f(ss.rows[0], ss.kv, tid);
  Tensor accS_rc = f.s_rows();
  Tensor accO_rc = f.o_rows();
  constexpr int kRowsPerThread = decltype(size<0>(accS_rc))::value;
  TileRows<kRowsPerThread> rows(tid);
  OnlineSoftmax<kRowsPerThread> softmax;

  const uint64_t own_tokens = warpgroup_tokens(tid / 128, static_cast<int>(s.group), s.tokens);

  uint32_t seq = 0;
  int64_t round = 0;
  for (int64_t index = blockIdx.x; index < s.tiles; index += gridDim.x, ++round) {
    const SparseTile tile(index, s.B, s.Hkv, s.chunks, s.tokens);
    const int64_t q_len = s.q_lengths[tile.b];
    const int64_t kv_len = s.kv_lengths[tile.b];
    rows.start(s, tile, q_len, kv_len);
    float factors[kRowsPerThread];
    CUTE_UNROLL
    for (int r = 0; r < kRowsPerThread; ++r) factors[r] = p.scale_log2;
    softmax.start(factors);
    clear(f.accO);

    ClusterBarrier::wait(&ss.q_full, static_cast<uint32_t>(round & 1));
    const int blocks = ss.tile_blocks;
    if (blocks == 0) ClusterBarrier::arrive(&ss.q_empty);

    // Ring order K_0, K_1, V_0, K_2, V_1, ..., V_last (see produce_tiles).
    // A block none of this warpgroup's tokens selected is only released.
    int64_t c;  // the block of the last K taken, and its tokens
    uint64_t tokens;
    auto take = [&] {
      const int slot = static_cast<int>(seq % kSlots);
      ClusterBarrier::wait(&ss.full[slot], (seq / kSlots) & 1);
      ++seq;
      return slot;
    };
    walk_selected_blocks(
        blocks,
        [&] {
          const int slot = take();
          c = ss.slot_block[slot];
          tokens = ss.slot_tokens[slot];
          // Uniform over the warpgroup; the vote lets ptxas see that it is
          // over the warp (a branch it sees as divergent serialises wgmma).
          return std::make_pair(slot, __any_sync(0xFFFFFFFFu, (tokens & own_tokens) != 0));
        },
        take,
        [&](int slot) { issue_product(f.mma_s, f.tSrQ, f.tSrK(_, _, _, slot), f.accS); },
        [&](int slot) { issue_accumulate(f.mma_o, f.tOrP, f.tOrV(_, _, _, slot), f.accO); },
        [&](int slot, int u, bool walked) {
          if (walked) warpgroup_fence_operand(f.accS);
          ClusterBarrier::arrive(&ss.empty[slot]);
          if (u == blocks - 1) ClusterBarrier::arrive(&ss.q_empty);
        },
        [&](int slot, bool walked) {
          if (walked) warpgroup_fence_operand(f.accO);
          ClusterBarrier::arrive(&ss.empty[slot]);
        },
        [&] { softmax.apply(accS_rc, rows, c * Traits::kKeys, Traits::kKeys, tokens); },
        [&] {
          softmax.rescale_output(accO_rc);
          acc_to_operand(f.accS, f.tOrP);
        });

    // out = O / l, lse = ln(sum of exp): both zero / -inf for an empty row.
    softmax.template store<Traits::kD>(accO_rc, rows, p.out, p.lse, tid);
  }
#endif
}

// schedule="auto": per query-outer tile (one warp each), the blocks of its
// union, those its consumer warpgroups walk, and its attended (token, slot)
// pairs, summed into `costs` (zeroed before). Beyond kCostSampleTiles tiles a
// sample of that many serves, one tile out of each run of `stride`, at an
// offset that varies from run to run (a fixed one could fall on the same
// chunk of every (b, kv head)); each warp scales its sums by tiles / samples.
// Integer sums: the choice is deterministic.
constexpr int64_t kCostSampleTiles = 2048;

template <class Traits>
__global__ void __launch_bounds__(256) schedule_costs_kernel(const SparseShape s,
                                                             ScheduleCosts* costs) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  const int64_t stride = (s.tiles + kCostSampleTiles - 1) / kCostSampleTiles;
  const int64_t samples = (s.tiles + stride - 1) / stride;
  unsigned long long union_blocks = 0, walked_blocks = 0, attended = 0;
  uint64_t own[Traits::kConsumers];  // the forward's consumer warpgroups' tokens
  CUTE_UNROLL
  for (int w = 0; w < Traits::kConsumers; ++w) {
    own[w] = warpgroup_tokens(w, static_cast<int>(s.group), s.tokens);
  }
  for (int64_t sample = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32; sample < samples;
       sample += warps) {  // uniform over the warp
    const int64_t offset = static_cast<int64_t>((sample * 2654435761ull) % stride);
    const int64_t index = std::min(s.tiles - 1, sample * stride + offset);
    const SparseTile tile(index, s.B, s.Hkv, s.chunks, s.tokens);
    const TileUnion<Traits> u(s, tile, s.q_lengths[tile.b], s.kv_lengths[tile.b], lane);
    union_blocks += u.count;
    attended += u.attended;
    CUTE_UNROLL
    for (int i = 0; i < TileUnion<Traits>::kRegs; ++i) {
      CUTE_UNROLL
      for (int w = 0; w < Traits::kConsumers; ++w) {
        walked_blocks += __popc(__ballot_sync(0xFFFFFFFFu, u.first[i] && (u.tokens_of[i] & own[w])));
      }
    }
  }
  if (lane == 0 && union_blocks + attended > 0) {
    const auto scaled = [&](unsigned long long sum) {
      return static_cast<unsigned long long>(sum * static_cast<double>(s.tiles) / samples);
    };
    atomicAdd(&costs->union_blocks, scaled(union_blocks));
    atomicAdd(&costs->walked_blocks, scaled(walked_blocks));
    atomicAdd(&costs->attended, scaled(attended));
  }
}

// Zeroes `costs` and enqueues schedule_costs_kernel. The tiles are those of
// every query-outer kernel (forward and dQ: same rows per tile).
template <class Element>
cudaError_t enqueue_schedule_costs(const cuda::SparseAttentionArgs& a, ScheduleCosts* costs,
                                   cudaStream_t stream) {
  using Traits = SparseAttentionTraits<Element, 1>;
  cudaError_t st = cudaMemsetAsync(costs, 0, sizeof(ScheduleCosts), stream);
  if (st != cudaSuccess) return st;
  const SparseShape shape = make_sparse_shape<Traits>(a);
  const int64_t samples = std::min(shape.tiles, kCostSampleTiles);
  const int64_t blocks = std::min<int64_t>((samples + 7) / 8, 1024);  // 8 warps per CTA
  schedule_costs_kernel<Traits><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(shape, costs);
  return cudaGetLastError();
}

template <class Element>
cudaError_t launch(const cuda::SparseAttentionArgs& a, void* out, float* lse,
                   cudaStream_t stream, ScheduleGate gate = {}) {
  using Traits = SparseAttentionTraits<Element, 1>;
  const FwdParams<Traits> p{
      make_tma_kv<Traits>(static_cast<const Element*>(a.k), a.Sk, a.Hkv, a.B),
      make_tma_kv<Traits>(static_cast<const Element*>(a.v), a.Sk, a.Hkv, a.B),
      make_sparse_shape<Traits>(a),
      static_cast<const Element*>(a.q),
      static_cast<Element*>(out),
      lse,
      a.scale * 1.4426950408889634f,
      gate};
  return launch_persistent<Traits>(sparse_attention_fwd_kernel<Traits>, p, stream);
}

// Enqueues the cost sums, then both schedules behind their gates.
template <class Element>
cudaError_t launch_auto(const cuda::SparseAttentionArgs& a, int32_t* index, void* partial,
                        void* out, float* lse, cudaStream_t stream) {
  using Traits = SparseAttentionTraits<Element, 1>;
  const fwd_by_block::Plan plan = fwd_by_block::make_plan(a, 0);
  auto* costs = reinterpret_cast<ScheduleCosts*>(index + plan.costs_offset());
  cudaError_t st = enqueue_schedule_costs<Element>(a, costs, stream);
  if (st != cudaSuccess) return st;
  const int64_t group = a.Hq / a.Hkv;
  const unsigned long long fixed = kByBlockChunkCost * static_cast<unsigned long long>(plan.nchunks);
  const ScheduleGate query_gate{costs, group, true, kQueryOverBlockCost, true, fixed};
  if ((st = launch<Element>(a, out, lse, stream, query_gate)) != cudaSuccess) return st;
  // The same rule, the other side: exactly one of the two ways runs.
  ScheduleGate by_block_gate = query_gate;
  by_block_gate.query = false;
  constexpr DType kDType = std::is_same_v<Element, cutlass::bfloat16_t> ? DType::kBF16 : DType::kF16;
  return fwd_by_block::run(kDType, a, plan, index, partial, out, lse, stream, by_block_gate);
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool sparse_attention_supported(DType dtype, int64_t D, int64_t group, int64_t topk) {
  return (dtype == DType::kBF16 || dtype == DType::kF16) && D == 128 && group >= 1 &&
         group <= 64 && topk >= 1 && topk <= 64;
}

bool sparse_attention_args_valid(DType dtype, const SparseAttentionArgs& a) {
  // TMA takes 32-bit extents (and an empty k has no TMA view); positions are
  // kept in 32 bits; the backward's grid has one y index per (b, kv head).
  return a.Hkv >= 1 && a.Hq % a.Hkv == 0 &&
         sparse_attention_supported(dtype, a.D, a.Hq / a.Hkv, a.topk) && a.B >= 0 &&
         a.Sq >= 0 && a.Sk > 0 && a.Sk <= INT_MAX - 256 && a.B * a.Hkv <= 65535;
}

cudaError_t sparse_schedule_costs(DType dtype, const SparseAttentionArgs& a, ScheduleCosts* costs,
                                  cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (costs == nullptr || reinterpret_cast<uintptr_t>(costs) % 8 != 0) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? sm90::enqueue_schedule_costs<cutlass::bfloat16_t>(a, costs, stream)
                               : sm90::enqueue_schedule_costs<cutlass::half_t>(a, costs, stream);
}

cudaError_t sparse_attention_fwd(DType dtype, const SparseAttentionArgs& a, void* out, float* lse,
                                 cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  return dtype == DType::kBF16 ? sm90::launch<cutlass::bfloat16_t>(a, out, lse, stream)
                               : sm90::launch<cutlass::half_t>(a, out, lse, stream);
}

cudaError_t sparse_attention_fwd_auto(DType dtype, const SparseAttentionArgs& a, int32_t* index,
                                      void* partial, void* out, float* lse, cudaStream_t stream) {
  if (!sparse_attention_args_valid(dtype, a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.Sq == 0) return cudaSuccess;
  if (index == nullptr || reinterpret_cast<uintptr_t>(index) % 8 != 0) return cudaErrorInvalidValue;
  return dtype == DType::kBF16
             ? sm90::launch_auto<cutlass::bfloat16_t>(a, index, partial, out, lse, stream)
             : sm90::launch_auto<cutlass::half_t>(a, index, partial, out, lse, stream);
}

}  // namespace jax_msa::cuda
