// The block -> queries index of the KV-outer sparse-attention kernels (see
// sparse_block_index.hpp): a stable counting sort of the (query, selected
// block) pairs by block, per (batch row, kv head), over a window of query
// tokens. The window's queries are cut into chunks of `chunk_tokens`; a
// histogram [chunk][block] (integer atomics: order free), an exclusive scan
// of each block's column over the chunks, a scan of the bucket sizes (entry
// offsets) and of their tile counts (tile offsets), then one warp per chunk
// scatters its queries in increasing order (ranks from __match_any_sync,
// running counters per block) and, on request, records for each (token,
// slot) the entry that holds it. The result is deterministic and every bucket
// is sorted by query index.
#include <cstdint>

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/sparse_block_index.hpp"

namespace jax_msa::sm90::block_index {
namespace {

using namespace cute;

// The queries [tok0, tok1) of index chunk q of (b, kv head) bg, clipped to the
// window and to q_len, and what decides which of their ids are attended.
struct ChunkWindow {
  int64_t b, offset, blocks_valid, tok0, tok1;

  __device__ ChunkWindow(const Geometry& geo, int64_t bg, int64_t q, const int32_t* q_lengths,
                         const int32_t* kv_lengths)
      : b(bg / geo.Hkv) {
    const int64_t q_len = clamp_len(q_lengths, b, geo.Sq);
    const int64_t kv_len = clamp_len(kv_lengths, b, geo.Sk);
    offset = kv_len - q_len;
    blocks_valid = (kv_len + kBlock - 1) / kBlock;
    tok0 = geo.tok_begin + q * geo.chunk_tokens;
    tok1 = min(min(tok0 + geo.chunk_tokens, geo.tok_begin + geo.tok_count), q_len);
  }
};

// hist[bg, chunk, c] += 1 for every attended (query in chunk, block c).
// Window z = blockIdx.z of each kernel: geo.window(z), its index at index + z * stride.
__global__ void hist_kernel(const int32_t* __restrict__ ids, const int32_t* __restrict__ q_lengths,
                            const int32_t* __restrict__ kv_lengths, int32_t* index,
                            int64_t index_stride, Geometry geo0, ScheduleGate gate) {
  if (gate.closed()) return;
  const Geometry geo = geo0.window(blockIdx.z);
  int32_t* __restrict__ hist = IndexView(index + blockIdx.z * index_stride, geo).hist;
  const int64_t bg = blockIdx.y;
  const int64_t q = blockIdx.x;
  const ChunkWindow win(geo, bg, q, q_lengths, kv_lengths);
  const int64_t b = win.b, offset = win.offset, blocks_valid = win.blocks_valid;
  const int64_t tok0 = win.tok0, tok1 = win.tok1;
  if (tok0 >= tok1) return;
  int32_t* h = hist + (bg * geo.nchunks + q) * geo.nb;
  const int64_t n = (tok1 - tok0) * geo.topk;
  const int32_t* row_ids = ids + ((b * geo.Sq + tok0) * geo.Hkv + bg % geo.Hkv) * geo.topk;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t t = e / geo.topk;
    const int64_t slot = e - t * geo.topk;
    const int32_t c = row_ids[t * geo.Hkv * geo.topk + slot];
    if (block_attended(c, offset + tok0 + t, blocks_valid)) atomicAdd(h + c, 1);
  }
}

// Exclusive scan of each block's column over the chunks; count = column total.
// CTA = 32 columns x 16 warps; warp w scans a contiguous range of chunks.
__global__ void __launch_bounds__(512) colscan_kernel(int32_t* index, int64_t index_stride,
                                                      Geometry geo, ScheduleGate gate) {
  if (gate.closed()) return;
  const IndexView ix(index + blockIdx.z * index_stride, geo);
  int32_t* __restrict__ hist = ix.hist;
  int32_t* __restrict__ count = ix.count;
  __shared__ int32_t part[16][32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t bg = blockIdx.y;
  const int64_t c = blockIdx.x * int64_t{32} + lane;
  const bool ok = c < geo.nb;
  const int64_t per = (geo.nchunks + 15) / 16;
  const int64_t q0 = min<int64_t>(warp * per, geo.nchunks);
  const int64_t q1 = min<int64_t>(q0 + per, geo.nchunks);
  int32_t* col = hist + bg * geo.nchunks * geo.nb + (ok ? c : 0);
  int32_t sum = 0;
  if (ok) {
#pragma unroll 8
    for (int64_t q = q0; q < q1; ++q) sum += col[q * geo.nb];
  }
  part[warp][lane] = sum;
  __syncthreads();
  int32_t base = 0;
  for (int w = 0; w < warp; ++w) base += part[w][lane];
  if (ok) {
#pragma unroll 4
    for (int64_t q = q0; q < q1; ++q) {
      const int32_t v = col[q * geo.nb];
      col[q * geo.nb] = base;
      base += v;
    }
    if (warp == 15) count[bg * geo.nb + c] = base;
  }
}

// Block-wide exclusive scan of two int64 values (blockDim.x == 1024).
__device__ void block_scan2(int64_t& a, int64_t& b, int64_t& total_a, int64_t& total_b) {
  __shared__ int64_t warp_a[32], warp_b[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t ia = a, ib = b;  // inclusive
  CUTE_UNROLL
  for (int o = 1; o < 32; o *= 2) {
    const int64_t xa = __shfl_up_sync(0xFFFFFFFFu, ia, o);
    const int64_t xb = __shfl_up_sync(0xFFFFFFFFu, ib, o);
    if (lane >= o) {
      ia += xa;
      ib += xb;
    }
  }
  if (lane == 31) {
    warp_a[warp] = ia;
    warp_b[warp] = ib;
  }
  __syncthreads();
  if (warp == 0) {
    int64_t wa = warp_a[lane], wb = warp_b[lane];
    CUTE_UNROLL
    for (int o = 1; o < 32; o *= 2) {
      const int64_t xa = __shfl_up_sync(0xFFFFFFFFu, wa, o);
      const int64_t xb = __shfl_up_sync(0xFFFFFFFFu, wb, o);
      if (lane >= o) {
        wa += xa;
        wb += xb;
      }
    }
    warp_a[lane] = wa;  // inclusive over warps
    warp_b[lane] = wb;
  }
  __syncthreads();
  const int64_t base_a = warp > 0 ? warp_a[warp - 1] : 0;
  const int64_t base_b = warp > 0 ? warp_b[warp - 1] : 0;
  total_a = warp_a[31];
  total_b = warp_b[31];
  a = base_a + ia - a;
  b = base_b + ib - b;
  __syncthreads();  // warp_a / warp_b are reused by the next call
}

// Bucket offsets (entries and tiles) and Ttot. One CTA of 1024 threads.
__global__ void __launch_bounds__(1024) bucket_scan_kernel(int32_t* index, int64_t index_stride,
                                                           Geometry geo, ScheduleGate gate) {
  if (gate.closed()) return;
  IndexView ix(index + blockIdx.z * index_stride, geo);
  int64_t run_entries = 0, run_tiles = 0;
  for (int64_t base = 0; base < geo.nbkt; base += 1024) {
    const int64_t k = base + threadIdx.x;
    const int64_t cnt = k < geo.nbkt ? ix.count[k] : 0;
    int64_t e = cnt, t = (cnt + geo.tpt - 1) / geo.tpt, total_e, total_t;
    block_scan2(e, t, total_e, total_t);
    if (k < geo.nbkt) {
      ix.entry_start[k] = run_entries + e;
      ix.tile_start[k] = run_tiles + t;
    }
    run_entries += total_e;
    run_tiles += total_t;
  }
  if (threadIdx.x == 0) {
    ix.tile_start[geo.nbkt] = run_tiles;
    ix.header[0] = run_tiles;
    ix.header[1] = run_entries;
  }
}

// One warp per (bg, chunk): writes the chunk's queries into their buckets in
// increasing order. kSmem: the running positions (bucket start + the chunk's
// prefix) are int64 counters in shared memory (nb <= kMaxSmemCounters); else
// the chunk's own hist row is the counter and the bucket start is re-read.
constexpr int kMaxSmemCounters = 6144;  // 48 KB of int64

template <bool kSmem>
__global__ void __launch_bounds__(32) scatter_kernel(const int32_t* __restrict__ ids,
                                                     const int32_t* __restrict__ q_lengths,
                                                     const int32_t* __restrict__ kv_lengths,
                                                     int32_t* index, int32_t* rev,
                                                     int64_t index_stride, int64_t rev_stride,
                                                     Geometry geo0, ScheduleGate gate) {
  if (gate.closed()) return;
  extern __shared__ int64_t smem_positions[];
  const Geometry geo = geo0.window(blockIdx.z);
  IndexView ix(index + blockIdx.z * index_stride, geo);
  if (rev != nullptr) rev += blockIdx.z * rev_stride;
  const int64_t bg = blockIdx.y;
  const int64_t g = bg % geo.Hkv;
  const int64_t q = blockIdx.x;
  const int lane = threadIdx.x;
  const ChunkWindow win(geo, bg, q, q_lengths, kv_lengths);
  const int64_t b = win.b, offset = win.offset, blocks_valid = win.blocks_valid;
  const int64_t tok0 = win.tok0, tok1 = win.tok1;
  if (tok0 >= tok1) return;

  int32_t* hrow = ix.hist + (bg * geo.nchunks + q) * geo.nb;
  const int64_t* bucket_start = ix.entry_start + bg * geo.nb;
  if constexpr (kSmem) {
    // Blocks past the chunk's last local block are never selected.
    const int64_t last = offset + tok1 - 1;
    const int64_t used = last < 0 ? 0 : min<int64_t>(geo.nb, last / kBlock + 1);
    for (int64_t c = lane; c < used; c += 32) smem_positions[c] = bucket_start[c] + hrow[c];
    __syncwarp();
  }

  int tp = 1;  // slots per token, rounded up to a power of two
  while (tp < geo.topk) tp *= 2;
  const int per_pass = tp < 32 ? tp : 32;
  const int passes = tp / per_pass;  // 1 or 2
  const int tokens_per_step = 32 / per_pass;
  const int my_tok = lane / per_pass;
  const int my_slot = lane % per_pass;
  const unsigned lt_mask = (1u << lane) - 1u;
  constexpr int kUnroll = 8;
  // Reverse map position of (token i, slot): [b, i - tok_begin, g, slot].
  auto rev_at = [&](int64_t i, int slot) {
    return ((b * geo.tok_count + (i - geo.tok_begin)) * geo.Hkv + g) * geo.topk + slot;
  };

  for (int64_t t0 = tok0; t0 < tok1; t0 += int64_t{tokens_per_step} * kUnroll) {
    int32_t cs[kUnroll][2];
    CUTE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = t0 + int64_t{u} * tokens_per_step + my_tok;
      CUTE_UNROLL
      for (int ps = 0; ps < 2; ++ps) {
        const int slot = ps * 32 + my_slot;
        int32_t c = -1;
        if (ps < passes && i < tok1 && slot < geo.topk) {
          const int32_t raw = ids[((b * geo.Sq + i) * geo.Hkv + g) * geo.topk + slot];
          if (block_attended(raw, offset + i, blocks_valid)) c = raw;
          // An id this token does not attend: no entry.
          if (rev != nullptr && c < 0) rev[rev_at(i, slot)] = -1;
        }
        cs[u][ps] = c;
      }
    }
    CUTE_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = t0 + int64_t{u} * tokens_per_step + my_tok;
      CUTE_UNROLL
      for (int ps = 0; ps < 2; ++ps) {
        if (ps >= passes) break;
        const int32_t c = cs[u][ps];
        const unsigned same = __match_any_sync(0xFFFFFFFFu, c);
        const int rank = __popc(same & lt_mask);
        const bool leader = (31 - __clz(same)) == lane;
        if constexpr (kSmem) {
          int64_t at = 0;
          if (c >= 0) {
            at = smem_positions[c];
            ix.entries[at + rank] = static_cast<int32_t>(i);
            if (rev != nullptr) rev[rev_at(i, ps * 32 + my_slot)] = static_cast<int32_t>(at + rank);
          }
          __syncwarp();
          if (c >= 0 && leader) smem_positions[c] = at + __popc(same);
        } else {
          int32_t at = 0;
          if (c >= 0) {
            at = hrow[c];
            ix.entries[bucket_start[c] + at + rank] = static_cast<int32_t>(i);
            if (rev != nullptr) {
              rev[rev_at(i, ps * 32 + my_slot)] = static_cast<int32_t>(bucket_start[c] + at + rank);
            }
          }
          __syncwarp();
          if (c >= 0 && leader) hrow[c] = at + __popc(same);
        }
        __syncwarp();
      }
    }
  }
}

}  // namespace

cudaError_t build_block_index(const cuda::SparseAttentionArgs& a, const Geometry& geo,
                              int32_t* index, int32_t* rev, cudaStream_t stream,
                              ScheduleGate gate, int windows, int64_t index_stride,
                              int64_t rev_stride) {
  if (geo.nbkt == 0 || windows < 1) return cudaSuccess;
  if (windows > 1 && (index_stride < geo.index_ints || index_stride % 2 != 0)) {
    return cudaErrorInvalidValue;
  }
  const unsigned z = static_cast<unsigned>(windows);
  const unsigned bgs = static_cast<unsigned>(geo.B * geo.Hkv);
  const int64_t hist_ints = geo.B * geo.Hkv * geo.nchunks * geo.nb;
  if (hist_ints > 0) {
    // Every window's histogram (one row of a 2D memset each).
    int32_t* hist = IndexView(index, geo).hist;
    const size_t bytes = hist_ints * sizeof(int32_t);
    cudaError_t st = windows == 1 ? cudaMemsetAsync(hist, 0, bytes, stream)
                                  : cudaMemset2DAsync(hist, index_stride * sizeof(int32_t), 0,
                                                      bytes, windows, stream);
    if (st != cudaSuccess) return st;
    hist_kernel<<<dim3(static_cast<unsigned>(geo.nchunks), bgs, z), 256, 0, stream>>>(
        a.ids, a.q_lengths, a.kv_lengths, index, index_stride, geo, gate);
  }
  colscan_kernel<<<dim3(static_cast<unsigned>((geo.nb + 31) / 32), bgs, z), 512, 0, stream>>>(
      index, index_stride, geo, gate);
  bucket_scan_kernel<<<dim3(1, 1, z), 1024, 0, stream>>>(index, index_stride, geo, gate);
  if (hist_ints > 0) {
    const dim3 grid(static_cast<unsigned>(geo.nchunks), bgs, z);
    if (geo.nb <= kMaxSmemCounters) {
      scatter_kernel<true><<<grid, 32, geo.nb * sizeof(int64_t), stream>>>(
          a.ids, a.q_lengths, a.kv_lengths, index, rev, index_stride, rev_stride, geo, gate);
    } else {
      scatter_kernel<false><<<grid, 32, 0, stream>>>(a.ids, a.q_lengths, a.kv_lengths, index,
                                                     rev, index_stride, rev_stride, geo, gate);
    }
  }
  return cudaGetLastError();
}

}  // namespace jax_msa::sm90::block_index
