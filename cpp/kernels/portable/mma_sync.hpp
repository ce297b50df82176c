// Small pieces that the portable family's kernels share (sm_80 instructions
// only): cp.async group control and the view of an mma.sync accumulator as
// rows x columns.
#pragma once

#include <cute/tensor.hpp>

namespace jax_msa::portable {

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ((2, 2), M, N) mma.sync accumulator layout -> ((2, M), (2, N)): rows x columns
// (column j is 8 (j / 2) + 2 (lane % 4) + j % 2, as TileRows::column says).
template <class Layout>
__device__ auto rowcol_layout(Layout l) {
  static_assert(decltype(cute::rank<0>(l))::value == 2, "SM80 mma.sync accumulator layout");
  return cute::make_layout(cute::make_layout(cute::get<0, 1>(l), cute::get<1>(l)),
                           cute::make_layout(cute::get<0, 0>(l), cute::get<2>(l)));
}

}  // namespace jax_msa::portable
