// Which kernel family serves a CUDA op on the current device: the Hopper
// family (sm_90a: wgmma, TMA) on compute capability 9.0, the portable family
// (sm_80 instructions, PTX for any later card) elsewhere.
// JAX_MSA_KERNELS=portable forces the portable family (tests run it on a
// Hopper card); JAX_MSA_KERNELS=native, or unset, picks by the device.
#pragma once

#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

namespace jax_msa::cuda {

enum class KernelFamily { kHopper, kPortable };

inline KernelFamily kernel_family() {
  const char* forced = std::getenv("JAX_MSA_KERNELS");
  if (forced != nullptr && std::strcmp(forced, "portable") == 0) return KernelFamily::kPortable;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // the launch that follows reports the device's state
    return KernelFamily::kHopper;
  }
  return major == 9 && minor == 0 ? KernelFamily::kHopper : KernelFamily::kPortable;
}

}  // namespace jax_msa::cuda
