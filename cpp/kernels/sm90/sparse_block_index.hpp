// The block -> queries index of the KV-outer sparse-attention kernels (the
// dK/dV backward in sparse_attention_bwd.cu, the by-block forward in
// sparse_attention_fwd_by_block.cu), built by build_block_index
// (sparse_block_index.cu).
//
// For a window of query tokens [tok_begin, tok_begin + tok_count) (the whole
// Sq for the backward) and every (batch row b, kv head g): a stable counting
// sort of the attended (token, selected block) pairs by block. Bucket
// k = (b * Hkv + g) * nb + c lists, in increasing order, the tokens of the
// window that attend block c; its entries are entries[entry_start[k] ..
// entry_start[k] + count[k]) (entry indices count from 0 for the window).
// Tiles: floor(64 / G) tokens (x G heads) of one bucket; bucket k's tiles are
// [tile_start[k], tile_start[k + 1]) of the window's Ttot = header[0] tiles.
// Optionally the reverse map rev [B, tok_count, Hkv, topk]: for each slot of
// each valid token of the window, the entry that holds it, -1 for an id the
// token does not attend (-1, out of range, past its local block). Entries of
// tokens >= q_len are never written.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/sm90/schedule_gate.hpp"

namespace jax_msa::sm90::block_index {

constexpr int kBlock = 128;    // keys per block (spec §2)
constexpr int kTileRows = 64;  // (token, head) rows per tile

// Problem geometry shared by host and device.
struct Geometry {
  int64_t B, Sq, Sk, Hq, Hkv, G, topk;
  int64_t tok_begin;     // first query token of the window
  int64_t tok_count;     // tokens of the window
  int64_t nb;            // blocks per (batch row, kv head): ceil(Sk / 128)
  int64_t nbkt;          // buckets: B * Hkv * nb
  int64_t tpt;           // tokens per tile: floor(64 / G)
  int64_t chunk_tokens;  // tokens per chunk of the counting sort
  int64_t nchunks;       // ceil(tok_count / chunk_tokens)
  // Offsets in the int32 index workspace (int64 arrays at even offsets).
  int64_t off_tile_start;   // int64 [nbkt + 1]: first tile of each bucket, then Ttot
  int64_t off_entry_start;  // int64 [nbkt]: first entry of each bucket
  int64_t off_count;        // int32 [nbkt]: bucket sizes
  int64_t off_hist;         // int32 [B * Hkv, nchunks, nb]
  int64_t off_entries;      // int32 [B * Hkv * tok_count * topk]: query indices
  int64_t index_ints;
  int64_t tiles_bound;      // upper bound of Ttot

  // The whole query range (the backward).
  __host__ __device__ explicit Geometry(const cuda::SparseAttentionArgs& a)
      : Geometry(a, 0, a.Sq) {}

  __host__ __device__ Geometry(const cuda::SparseAttentionArgs& a, int64_t tok_begin_,
                               int64_t tok_count_)
      : B(a.B), Sq(a.Sq), Sk(a.Sk), Hq(a.Hq), Hkv(a.Hkv), G(a.Hkv > 0 ? a.Hq / a.Hkv : 1),
        topk(a.topk), tok_begin(tok_begin_), tok_count(tok_count_) {
    if (G < 1) G = 1;
    nb = (Sk + kBlock - 1) / kBlock;
    nbkt = B * Hkv * nb;
    tpt = G <= kTileRows ? kTileRows / G : 1;
    // At most 512 chunks per (batch row, kv head): the histogram stays
    // <= 512 * nb ints while the scatter gets enough warps.
    chunk_tokens = 64;
    while (chunk_tokens * 512 < tok_count) chunk_tokens *= 2;
    nchunks = (tok_count + chunk_tokens - 1) / chunk_tokens;
    off_tile_start = 4;  // [0, 4): header (int64 Ttot, int64 total entries)
    off_entry_start = off_tile_start + 2 * (nbkt + 1);
    off_count = off_entry_start + 2 * nbkt;
    off_hist = off_count + nbkt;
    off_entries = off_hist + B * Hkv * nchunks * nb;
    index_ints = off_entries + B * Hkv * tok_count * topk;
    tiles_bound = (B * Hkv * tok_count * topk + tpt - 1) / tpt + nbkt;
  }

  // The z-th window of the same size after this one: every offset is the same.
  __host__ __device__ Geometry window(int64_t z) const {
    Geometry g = *this;
    g.tok_begin += z * tok_count;
    return g;
  }
};

struct IndexView {
  int64_t* header;
  int64_t* tile_start;
  int64_t* entry_start;
  int32_t* count;
  int32_t* hist;
  int32_t* entries;

  __host__ __device__ IndexView(int32_t* base, const Geometry& geo)
      : header(reinterpret_cast<int64_t*>(base)),
        tile_start(reinterpret_cast<int64_t*>(base + geo.off_tile_start)),
        entry_start(reinterpret_cast<int64_t*>(base + geo.off_entry_start)),
        count(base + geo.off_count),
        hist(base + geo.off_hist),
        entries(base + geo.off_entries) {}
};

// Valid lengths, clamped so that no kernel can be pushed out of bounds.
__device__ __forceinline__ int64_t clamp_len(const int32_t* lengths, int64_t b, int64_t full) {
  if (lengths == nullptr) return full;
  const int64_t v = lengths[b];
  return v < 0 ? 0 : (v > full ? full : v);
}

// Whether id c of a query at position p names a block it attends (spec §3.4).
__device__ __forceinline__ bool block_attended(int32_t c, int64_t p, int64_t blocks_valid) {
  return c >= 0 && c < blocks_valid && int64_t{c} * kBlock <= p;
}

// The segments of one CTA's tile range [T0, T1): next() moves to the next
// bucket piece (bucket, its tiles [tile_begin, tile_end), whether that is the
// whole bucket).
struct SegmentWalker {
  const int64_t* tile_start;
  int64_t T0, T1, T;
  int64_t bucket, tile_begin, tile_end;
  bool whole;

  __device__ bool next() {
    if (T >= T1) return false;
    while (tile_start[bucket + 1] <= T) ++bucket;  // skips empty buckets
    const int64_t b0 = tile_start[bucket], b1 = tile_start[bucket + 1];
    tile_begin = T - b0;
    tile_end = min(T1, b1) - b0;
    whole = b0 >= T0 && b1 <= T1;
    T = min(T1, b1);
    return true;
  }
};

// The last bucket k with tile_start[k] <= T (T < Ttot): the bucket of tile T.
__device__ __forceinline__ int64_t bucket_of_tile(const int64_t* tile_start, int64_t nbkt,
                                                  int64_t T) {
  int64_t lo = 0, hi = nbkt;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (tile_start[mid] <= T) lo = mid; else hi = mid;
  }
  return lo;
}

// Enqueues the index build of geo's window on `stream` (a memset and four
// kernels; geo.nbkt > 0). `index` (8-byte aligned) holds geo.index_ints ints;
// `rev`, when not null, B * tok_count * Hkv * topk ints. Deterministic. The
// kernels do nothing when `gate` is closed (schedule="auto").
// With windows > 1, the same launches build the index of each of `windows`
// consecutive windows of geo's size, geo.window(z), at index + z *
// index_stride (even) and rev + z * rev_stride: one launch per step for
// all of them, where a small window alone leaves most of the GPU idle.
cudaError_t build_block_index(const cuda::SparseAttentionArgs& a, const Geometry& geo,
                              int32_t* index, int32_t* rev, cudaStream_t stream,
                              ScheduleGate gate = {}, int windows = 1, int64_t index_stride = 0,
                              int64_t rev_stride = 0);

}  // namespace jax_msa::sm90::block_index
