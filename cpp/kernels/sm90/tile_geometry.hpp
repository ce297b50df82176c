// Where a tile of (token, head) rows sits in the causal picture (spec §2):
// its rows' positions, the last block any of them sees, and whether a block
// needs the per-element causal mask.
#pragma once

#include <cstdint>

namespace jax_msa::sm90 {

constexpr int64_t kBlockKeys = 128;  // keys per block (spec §2)

struct TileGeometry {
  int64_t row0;    // first flattened (token, head) row of the tile in its batch row
  int64_t rows;    // Sq * Hi: flattened rows of the batch row
  int64_t hi;      // index heads
  int64_t q_len;   // valid queries
  int64_t offset;  // kv_len - q_len: position of query i is offset + i
  int64_t blocks;  // blocks seen by the tile: 1 + the largest local block, 0 if no valid row
  int64_t first_position;  // smallest position of the tile's rows; -1 if a row is padded

  __device__ TileGeometry(int64_t row0_, int64_t rows_, int64_t hi_, int64_t q_len_,
                          int64_t kv_len_, int64_t tile_rows)
      : row0(row0_), rows(rows_), hi(hi_), q_len(q_len_), offset(kv_len_ - q_len_) {
    const int64_t row_end = row0 + tile_rows < rows ? row0 + tile_rows : rows;
    const int64_t first_token = row0 / hi;
    int64_t last_token = (row_end - 1) / hi;
    if (last_token >= q_len) last_token = q_len - 1;
    blocks = last_token >= first_token ? (offset + last_token) / kBlockKeys + 1 : 0;
    const bool all_valid = row0 + tile_rows <= rows && (row0 + tile_rows - 1) / hi < q_len;
    first_position = all_valid ? offset + first_token : -1;
  }

  // Position of tile row r (0-based in the tile), -1 for a padded or missing row.
  __device__ int64_t position(int r) const {
    const int64_t row = row0 + r;
    const int64_t token = row / hi;
    return row < rows && token < q_len ? offset + token : int64_t{-1};
  }

  __device__ bool row_exists(int r) const { return row0 + r < rows; }

  // Whether some row of the tile cannot see every key of block c.
  __device__ bool needs_mask(int64_t c) const {
    return (c + 1) * kBlockKeys - 1 > first_position;
  }
};

}  // namespace jax_msa::sm90
