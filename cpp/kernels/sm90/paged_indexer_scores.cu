// paged_indexer's block scores on SM90 (spec §3.7): the first step of
// paged_indexer on CUDA; indexer_select (indexer_select.cu) then applies the
// selection rule to them, as for the contiguous indexer.
//
// scores[b, t, h, c] = max over the 128 keys of logical page c of
// scale * ki_scale * <qi[b, t, h], key>. Decode reads every visible index key
// once for a few (token, head) rows, so the kernel is memory bound; the design
// is about reading only the pages needed, in whole sectors, with enough bytes
// in flight:
//  - Only the pages c < L_last are read, L_last the local page of the
//    request's last valid query: the selection reads scores[.., c] only for
//    c < L(t) <= L_last, and such a page is visible to query t whole (its
//    keys end before 128 * L(t) <= t's position < kv_len), so nothing is
//    masked. Other entries, and padded rows, are left unwritten.
//  - Grid (B x row chunks, page chunks). A CTA takes kRows = 16 * kMTiles of
//    the request's flattened (token, head) rows and a run of pages; each warp
//    takes whole pages of the run (w, w + 8, ...) and goes through a page in
//    chunks of 16 keys against the rows with mma.sync m16n8k16, rows as A
//    (M = 16 per tile), keys as B (two n8 tiles: a page [128, Di] is
//    row-major, i.e. k-major like B's columns). A warp owning whole pages
//    needs no barrier after qi's staging: no warp ever waits for another.
//  - Keys go from global memory straight into B's registers. The dot product
//    sums over Di, so any permutation of k applied to A and B alike is free:
//    lane (g, q) = (lane / 4, lane % 4) loads the 8 contiguous elements
//    32 kg + 8q .. + 7 of keys g and g + 8 for each 32-wide group kg (16 bytes
//    in 16-bit types, 8 in e4m3; each load instruction covers whole 32-byte
//    sectors), and k16 step s of the group uses elements 4s .. 4s + 3: the
//    logical k (2q, 2q+1) are elements (4s, 4s+1), (2q+8, 2q+9) are
//    (4s+2, 4s+3). Both halves of B come from one key, so each step's B is
//    an aligned register pair of the load, with no moves.
//  - qi is staged once per CTA in shared memory in A-fragment order (one
//    16-byte quad per lane and k step, with the same permutation), so a chunk
//    reads each A fragment with one conflict-free LDS.128.
//  - Each warp has one chunk (2-4 KB) in flight at a time; the SM's 16 or
//    more independent warps keep enough bytes coming.
//  - Max over the keys: a running max per thread over its keys of the page's
//    chunks, then shuffles over the 4 lanes of a row. It propagates NaN
//    (max.NaN), as the reference's block max does.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/multiprocessors.h"
#include "kernels/sm90/e4m3.hpp"

namespace jax_msa::sm90 {
namespace {

constexpr int kBlock = 128;          // keys per page (spec §2)
constexpr int kWarps = kBlock / 16;  // 16 keys (two n8 tiles) per warp
constexpr int kThreads = 32 * kWarps;

enum class Mma { kBF16, kF16 };  // 16-bit input types

// kQi: qi's type; kE4M3: the cache holds e4m3 instead of kQi. An e4m3 cache
// always takes the f16 MMA: e4m3 widens to f16 exactly in one instruction per
// pair (four through f32 to bf16, which made bf16 decode compute bound), and
// bf16 qi is then staged as f16 scaled by a power of two (kScaledQi,
// stage_qi).
template <Mma kQi, bool kE4M3, int kDi_, int kMTiles_>
struct Config {
  static constexpr Mma kType = kE4M3 ? Mma::kF16 : kQi;  // the MMA's inputs
  static constexpr bool kScaledQi = kE4M3 && kQi == Mma::kBF16;
  static constexpr int kDi = kDi_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kRows = 16 * kMTiles;
  static constexpr int kGroups = kDi / 32;  // 32-wide k groups, two k16 steps each
  static constexpr int kKeyBytes = kE4M3 ? 1 : 2;
  using Raw = std::conditional_t<kE4M3, uint2, uint4>;  // 8 elements of a key
};

struct Params {
  const uint16_t* qi;         // [B, rows, Di], rows = Q * Hi
  const uint8_t* cache;       // [num_pages, 128, Di]
  const float* ki_scale;      // scalar
  const int32_t* page_table;  // [B, max_pages]
  const int32_t* q_lengths;   // [B]
  const int32_t* kv_lengths;  // [B]
  float* scores;              // [B, rows, max_pages]
  int64_t num_pages, max_pages, Q;
  int Hi, rows, row_chunks, pages_per_cta;
  float scale;
};

__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Streaming loads: each key is read once, so they skip L1.
__device__ __forceinline__ void load_key(uint4& v, const uint8_t* p) {
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
}

__device__ __forceinline__ void load_key(uint2& v, const uint8_t* p) {
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
}

// The 8 loaded elements of a key as 4 words of 2 kType values (word w holds
// elements 2w, 2w + 1).
__device__ __forceinline__ void to_words(const uint4& raw, uint32_t (&w)[4]) {
  w[0] = raw.x, w[1] = raw.y, w[2] = raw.z, w[3] = raw.w;
}

__device__ __forceinline__ void to_words(const uint2& raw, uint32_t (&w)[4]) {
  w[0] = widen_e4m3x2(raw.x);
  w[1] = widen_e4m3x2(raw.x >> 16);
  w[2] = widen_e4m3x2(raw.y);
  w[3] = widen_e4m3x2(raw.y >> 16);
}

template <Mma kMma>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  if constexpr (kMma == Mma::kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
}

// A lane's elements of a chunk of 16 keys: keys g ([0]) and g + 8 ([1]) (the
// columns g of the two n8 tiles), 8 elements per k group.
template <class Cfg>
struct ChunkKeys {
  typename Cfg::Raw raw[2][Cfg::kGroups];
};

// `lane_keys`: the lane's first element (key g, column 8q) in the chunk.
template <class Cfg>
__device__ __forceinline__ void load_chunk(ChunkKeys<Cfg>& k, const uint8_t* lane_keys) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
#pragma unroll
    for (int kg = 0; kg < Cfg::kGroups; ++kg) {
      load_key(k.raw[n][kg], lane_keys + (n * 8 * Cfg::kDi + 32 * kg) * Cfg::kKeyBytes);
    }
  }
}

// Staged qi: for each m tile, k step (2 kg + s) and lane, the lane's A
// fragment {row g, row g + 8} x {elements 4s, 4s + 1}, then x {4s + 2, 4s + 3}
// of its 8-element chunk 32 kg + 8q.
template <class Cfg>
using StagedQi = uint4[Cfg::kMTiles][2 * Cfg::kGroups][32];

// The CTA's qi quads, in the order of stage_qi: quad e's top and bottom
// 4-element halves (rows past valid_rows read as zeros).
template <class Cfg>
struct QiQuad {
  int tile, step, lane;
  uint2 top, bottom;
  __device__ QiQuad(int e, const uint16_t* qi_rows, int valid_rows)
      : tile(e / 32 / (2 * Cfg::kGroups)), step(e / 32 % (2 * Cfg::kGroups)), lane(e % 32) {
    const int row = 16 * tile + lane / 4;
    const uint16_t* chunk =
        qi_rows + row * Cfg::kDi + 32 * (step / 2) + 8 * (lane % 4) + 4 * (step % 2);
    // Rows past the last one are zeros; their scores are never written.
    top = row < valid_rows ? __ldg(reinterpret_cast<const uint2*>(chunk)) : make_uint2(0, 0);
    bottom = row + 8 < valid_rows ? __ldg(reinterpret_cast<const uint2*>(chunk + 8 * Cfg::kDi))
                                  : make_uint2(0, 0);
  }
};

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

// Two bf16 (one word) times `scale` as two f16.
__device__ __forceinline__ uint32_t bf16x2_to_scaled_f16x2(uint32_t w, float scale) {
  uint32_t h2;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h2) : "f"(bf16_hi(w) * scale), "f"(bf16_lo(w) * scale));
  return h2;
}

// Stages the CTA's qi rows; returns the factor qi was multiplied by (1 unless
// kScaledQi). A bf16 row is staged as f16 times 2^e, e chosen so that the
// CTA's largest |qi| lands in [2^14, 2^15): bf16's 8-bit significand fits
// f16's 11 bits, so every element within 2^-24 of that largest is exact and
// smaller ones (negligible in the dot product) round; the power of two comes
// back out of the scores exactly. `largest` is shared scratch.
template <class Cfg>
__device__ __forceinline__ float stage_qi(StagedQi<Cfg>& staged, const uint16_t* qi_rows,
                                          int valid_rows, int* largest) {
  constexpr int kQuads = Cfg::kMTiles * 2 * Cfg::kGroups * 32;
  float scale = 1.0f;
  if constexpr (Cfg::kScaledQi) {
    if (threadIdx.x == 0) *largest = 0;
    __syncthreads();
    float m = 0.0f;  // fmaxf drops NaN: NaN stays NaN whatever the scale
    for (int e = threadIdx.x; e < kQuads; e += kThreads) {
      const QiQuad<Cfg> q(e, qi_rows, valid_rows);
      for (uint32_t w : {q.top.x, q.top.y, q.bottom.x, q.bottom.y}) {
        m = fmaxf(m, fmaxf(fabsf(bf16_lo(w)), fabsf(bf16_hi(w))));
      }
    }
    atomicMax(largest, __float_as_int(m));  // non-negative floats order as ints
    __syncthreads();
    // 2^(14 - exponent of the largest), kept a normal float (all zeros or
    // subnormals: 2^126; an infinity: 2^-114, and stays infinite).
    const int biased = (*largest >> 23) & 0xFF;
    const int e = std::min(std::max(141 - biased, -126), 126);
    scale = __int_as_float((e + 127) << 23);
  }
  for (int e = threadIdx.x; e < kQuads; e += kThreads) {
    const QiQuad<Cfg> q(e, qi_rows, valid_rows);
    if constexpr (Cfg::kScaledQi) {
      staged[q.tile][q.step][q.lane] = make_uint4(
          bf16x2_to_scaled_f16x2(q.top.x, scale), bf16x2_to_scaled_f16x2(q.bottom.x, scale),
          bf16x2_to_scaled_f16x2(q.top.y, scale), bf16x2_to_scaled_f16x2(q.bottom.y, scale));
    } else {
      staged[q.tile][q.step][q.lane] = make_uint4(q.top.x, q.bottom.x, q.top.y, q.bottom.y);
    }
  }
  return scale;
}

// Folds the chunk's scores into the running maxima of rows g (top[i]) and
// g + 8 (bottom[i]) of each m tile over this lane's keys, one tile at a time
// (few accumulators live: with all tiles' at once the 64-row configurations
// spilled). acc[n]: the tile's rows x the chunk's keys 8n .. 8n + 7 (the C
// fragment: rows g and g + 8, keys 2q and 2q + 1). `factor` is applied before
// the max, so a negative scale picks the right key.
template <class Cfg>
__device__ __forceinline__ void chunk_max(const ChunkKeys<Cfg>& k, const StagedQi<Cfg>& staged,
                                          int lane, float factor, float (&top)[Cfg::kMTiles],
                                          float (&bottom)[Cfg::kMTiles]) {
  uint32_t key[2][Cfg::kGroups][4];
#pragma unroll
  for (int kg = 0; kg < Cfg::kGroups; ++kg) {
    to_words(k.raw[0][kg], key[0][kg]);
    to_words(k.raw[1][kg], key[1][kg]);
  }
#pragma unroll
  for (int i = 0; i < Cfg::kMTiles; ++i) {
    float acc[2][4] = {};
#pragma unroll
    for (int kg = 0; kg < Cfg::kGroups; ++kg) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint4 a = staged[i][2 * kg + s][lane];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          mma_16816<Cfg::kType>(acc[n], a, key[n][kg][2 * s], key[n][kg][2 * s + 1]);
        }
      }
    }
    top[i] = max_nan(top[i], max_nan(max_nan(factor * acc[0][0], factor * acc[0][1]),
                                     max_nan(factor * acc[1][0], factor * acc[1][1])));
    bottom[i] = max_nan(bottom[i], max_nan(max_nan(factor * acc[0][2], factor * acc[0][3]),
                                           max_nan(factor * acc[1][2], factor * acc[1][3])));
  }
}

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 2)
    paged_indexer_scores_kernel(const __grid_constant__ Params p) {
  __shared__ StagedQi<Cfg> staged_qi;
  __shared__ int largest_qi;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t b = blockIdx.x / p.row_chunks;
  const int r0 = static_cast<int>(blockIdx.x % p.row_chunks) * Cfg::kRows;
  const int64_t c_begin = int64_t{blockIdx.y} * p.pages_per_cta;

  // The lengths clamped as indexer_select clamps them (and the reference):
  // q_len to [0, Q], kv_len to [0, max_pages * 128].
  const int64_t q_len = std::min<int64_t>(std::max(p.q_lengths[b], 0), p.Q);
  const int64_t kv_len = std::min<int64_t>(std::max(p.kv_lengths[b], 0), p.max_pages * kBlock);
  // The last valid query sits at kv_len - 1; the pages before its local page
  // are all the selection reads.
  const int64_t history = q_len > 0 && kv_len > 0 ? (kv_len - 1) / kBlock : 0;
  const int count = static_cast<int>(std::min<int64_t>(history - c_begin, p.pages_per_cta));
  const int rows_out = static_cast<int>(std::min<int64_t>(q_len * p.Hi - r0, Cfg::kRows));
  if (count <= 0 || rows_out <= 0) return;

  // Warp w takes the run's pages w, w + kWarps, ... whole, so no barrier
  // follows the staging: no warp waits for another.
  const int mine = count > warp ? (count - warp + kWarps - 1) / kWarps : 0;
  const int32_t* table = p.page_table + b * p.max_pages + c_begin + warp;
  const auto entry = [&](int j) -> int64_t { return j < mine ? __ldg(table + kWarps * j) : -1; };
  const int64_t num_pages = p.num_pages;
  const auto stored = [num_pages](int64_t page) { return page >= 0 && page < num_pages; };
  constexpr int64_t kPageBytes = int64_t{kBlock} * Cfg::kDi * Cfg::kKeyBytes;
  constexpr int64_t kChunkBytes = int64_t{16} * Cfg::kDi * Cfg::kKeyBytes;
  const uint8_t* lane_keys = p.cache + ((lane / 4) * Cfg::kDi + 8 * (lane % 4)) * Cfg::kKeyBytes;
  const float qi_scale =
      stage_qi<Cfg>(staged_qi, p.qi + (b * p.rows + r0) * Cfg::kDi, p.rows - r0, &largest_qi);
  const float factor = p.scale * __ldg(p.ki_scale) / qi_scale;  // a power of two: exact
  __syncthreads();

  // Output rows of this lane: 16 i + g and 16 i + g + 8 (after the shuffles
  // over q, lanes with q = 0 hold the maxima).
  float* out = p.scores + (b * p.rows + r0 + lane / 4) * p.max_pages + c_begin + warp;
  int64_t page = entry(0);
  for (int j = 0; j < mine; ++j, out += kWarps) {
    const int64_t next_page = entry(j + 1);  // its latency hides behind this page
    float top[Cfg::kMTiles], bottom[Cfg::kMTiles];
#pragma unroll
    for (int i = 0; i < Cfg::kMTiles; ++i) top[i] = bottom[i] = -INFINITY;  // a hole holds no keys
    if (stored(page)) {
      // One chunk in flight per warp: the 16 warps of an SM, independent,
      // keep enough bytes coming, and a second buffer made the 32- and
      // 64-row configurations spill. Not unrolled for the same reason.
#pragma unroll 1
      for (int k = 0; k < kBlock / 16; ++k) {
        ChunkKeys<Cfg> keys;
        load_chunk(keys, lane_keys + page * kPageBytes + k * kChunkBytes);
        chunk_max(keys, staged_qi, lane, factor, top, bottom);
      }
    }
#pragma unroll
    for (int i = 0; i < Cfg::kMTiles; ++i) {
#pragma unroll
      for (int offset = 1; offset < 4; offset *= 2) {  // over q
        top[i] = max_nan(top[i], __shfl_xor_sync(0xFFFFFFFFu, top[i], offset));
        bottom[i] = max_nan(bottom[i], __shfl_xor_sync(0xFFFFFFFFu, bottom[i], offset));
      }
      const int row = 16 * i + lane / 4;
      if (lane % 4 == 0 && row < rows_out) out[16 * i * p.max_pages] = top[i];
      if (lane % 4 == 0 && row + 8 < rows_out) out[(16 * i + 8) * p.max_pages] = bottom[i];
    }
    page = next_page;
  }
}

// CTAs in all, per SM, that the page runs aim at: enough waves that the last
// one's tail is short (4 per SM measured 10-20% slower than 16 at B = 32).
constexpr int64_t kCtasPerSm = 16;
// Pages per CTA: at least one per warp; at most 8 per warp, so that CTAs stay
// short next to the whole (balance across requests, a short tail).
constexpr int64_t kMinPagesPerCta = kWarps, kMaxPagesPerCta = 8 * kWarps;

template <class Cfg>
cudaError_t launch(const cuda::PagedIndexerArgs& a, float* scores, cudaStream_t stream) {
  const int64_t rows = a.Q * a.Hi;
  const int64_t row_chunks = (rows + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t visits = a.B * row_chunks * a.max_pages;  // (CTA rows, page) pairs if all full
  const int64_t target = kCtasPerSm * cuda::multiprocessor_count(132);
  int64_t per_cta = std::clamp((visits + target - 1) / target, kMinPagesPerCta, kMaxPagesPerCta);
  per_cta = std::max(per_cta, (a.max_pages + 65534) / 65535);  // gridDim.y <= 65535
  const int64_t page_chunks = (a.max_pages + per_cta - 1) / per_cta;
  if (a.B * row_chunks > INT_MAX || per_cta > INT_MAX) return cudaErrorInvalidValue;
  const Params p{static_cast<const uint16_t*>(a.qi), static_cast<const uint8_t*>(a.ki_cache),
                 a.ki_scale, a.page_table, a.q_lengths, a.kv_lengths, scores, a.num_pages,
                 a.max_pages, a.Q, static_cast<int>(a.Hi), static_cast<int>(rows),
                 static_cast<int>(row_chunks), static_cast<int>(per_cta), a.scale};
  const dim3 grid(static_cast<unsigned>(a.B * row_chunks), static_cast<unsigned>(page_chunks));
  paged_indexer_scores_kernel<Cfg><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Row tiles per CTA: as few as cover Q * Hi, up to 4 (64 rows: every decode
// shape, 1-16 tokens x 1-4 heads, in one row chunk, so each page is read
// once; longer chunks take more row chunks).
template <Mma kQi, bool kE4M3, int kDi>
cudaError_t launch_tiles(const cuda::PagedIndexerArgs& a, float* scores, cudaStream_t stream) {
  const int64_t rows = a.Q * a.Hi;
  if (rows <= 16) return launch<Config<kQi, kE4M3, kDi, 1>>(a, scores, stream);
  if (rows <= 32) return launch<Config<kQi, kE4M3, kDi, 2>>(a, scores, stream);
  return launch<Config<kQi, kE4M3, kDi, 4>>(a, scores, stream);
}

template <Mma kQi, bool kE4M3>
cudaError_t launch_dim(const cuda::PagedIndexerArgs& a, float* scores, cudaStream_t stream) {
  if (a.Di == 64) return launch_tiles<kQi, kE4M3, 64>(a, scores, stream);
  return launch_tiles<kQi, kE4M3, 128>(a, scores, stream);
}

}  // namespace
}  // namespace jax_msa::sm90

namespace jax_msa::cuda {

bool paged_indexer_scores_supported(DType dtype, CacheType cache, int64_t Di) {
  const bool same_type = (dtype == DType::kBF16 && cache == CacheType::kBF16) ||
                         (dtype == DType::kF16 && cache == CacheType::kF16);
  return (same_type || cache == CacheType::kE4M3FN) &&
         (dtype == DType::kBF16 || dtype == DType::kF16) && (Di == 64 || Di == 128);
}

cudaError_t paged_indexer_scores(DType dtype, CacheType cache, const PagedIndexerArgs& a,
                                 float* scores, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(a.qi) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.ki_cache) % 16 == 0;
  if (!paged_indexer_scores_supported(dtype, cache, a.Di) || !aligned || a.B < 0 || a.Q < 0 ||
      a.Hi < 0 || a.num_pages < 0 || a.max_pages < 0 || a.Q * a.Hi > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (a.B == 0 || a.Q * a.Hi == 0 || a.max_pages == 0) return cudaSuccess;
  const bool e4m3 = cache == CacheType::kE4M3FN;
  if (dtype == DType::kBF16) {
    return e4m3 ? sm90::launch_dim<sm90::Mma::kBF16, true>(a, scores, stream)
                : sm90::launch_dim<sm90::Mma::kBF16, false>(a, scores, stream);
  }
  return e4m3 ? sm90::launch_dim<sm90::Mma::kF16, true>(a, scores, stream)
              : sm90::launch_dim<sm90::Mma::kF16, false>(a, scores, stream);
}

}  // namespace jax_msa::cuda
