// Element types the kernels of every family accept for floating-point tensors.
#pragma once

namespace jax_msa {

// All of q/k/v/out (or qi/ki) of one call share one of these; accumulation is
// always float32.
enum class DType { kF32, kBF16, kF16 };

}  // namespace jax_msa
