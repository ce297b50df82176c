// Which kernel family serves a CUDA op on the current device:
//  - the Hopper family (sm_90a: wgmma, TMA) on compute capability 9.0;
//  - the Blackwell family (sm_100a: tcgen05), where the build has it, on 10.0,
//    but only once its self-check (jax_msa/_self_check.py: the same small
//    problems through it and through the portable family) has passed: no card
//    of that kind ran it before release, so it never serves unchecked;
//  - the portable family (sm_80 instructions, PTX for any later card)
//    everywhere else, and where the native family failed its self-check.
// JAX_MSA_KERNELS=portable or =native forces one family (tests run the
// portable one on a Hopper card); unset, the device and the check decide.
// The request and the check's verdict live in family_state.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/family_state.h"

namespace jax_msa::cuda {

enum class KernelFamily { kHopper, kBlackwell, kPortable };

// Whether this build holds the Blackwell family (sm100/ kernels for sm_100a).
constexpr bool kBuiltBlackwell =
#ifdef JAX_MSA_WITH_SM100
    true;
#else
    false;
#endif

inline KernelFamily kernel_family() {
  const FamilyRequest request = requested_family();
  if (request == FamilyRequest::kPortable) return KernelFamily::kPortable;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // the launch that follows reports the device's state
    return KernelFamily::kHopper;
  }
  const KernelFamily native = major == 9 && minor == 0                     ? KernelFamily::kHopper
                              : major == 10 && minor == 0 && kBuiltBlackwell ? KernelFamily::kBlackwell
                                                                             : KernelFamily::kPortable;
  if (native == KernelFamily::kPortable || request == FamilyRequest::kNative) return native;
  const auto check = static_cast<NativeCheck>(native_check_state().load());
  if (check == NativeCheck::kFailed) return KernelFamily::kPortable;
  if (native == KernelFamily::kBlackwell && check != NativeCheck::kPassed) {
    return KernelFamily::kPortable;
  }
  return native;
}

}  // namespace jax_msa::cuda
