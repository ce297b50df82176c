// Element types the kernels of every family accept for floating-point tensors.
#pragma once

namespace jax_msa {

// All of q/k/v/out (or qi/ki) of one call share one of these; accumulation is
// always float32.
enum class DType { kF32, kBF16, kF16 };

// Element type of a paged cache (spec §3.7): DType's, or e4m3 with a scale.
enum class CacheType { kF32, kBF16, kF16, kE4M3FN };

}  // namespace jax_msa
