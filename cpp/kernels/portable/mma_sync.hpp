// Small pieces that the portable family's kernels share (sm_80 instructions
// only): cp.async group control and views of an mma.sync accumulator (as
// rows x columns, as the A operand of the next product).
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

// ((2, 2), M, N) accumulator layout of S -> ((2, 2, 2), M, N / 2), the layout of
// the P operand that P V takes: an m16n8k16 A fragment holds the accumulators
// of two n8 atoms, so that the two views match element by element (in linear
// order; sm90::acc_to_operand then converts P in place).
template <class Layout>
__device__ auto acc_operand_layout(Layout l) {
  auto n = cute::get<2>(l);
  static_assert(decltype(cute::size(n))::value % 2 == 0, "pairs of n8 atoms");
  auto lo = cute::make_layout(cute::_2{}, cute::stride(n));
  auto hi = cute::make_layout(cute::Int<decltype(cute::size(n))::value / 2>{}, cute::stride(n) * cute::_2{});
  return cute::make_layout(cute::make_layout(cute::get<0, 0>(l), cute::get<0, 1>(l), lo), cute::get<1>(l),
                           hi);
}

}  // namespace jax_msa::portable
