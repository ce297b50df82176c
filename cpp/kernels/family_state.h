// The process-wide state behind the choice of a CUDA kernel family
// (kernels/cuda/kernel_family.h), kept free of CUDA so that the extension's
// Python API exposes it in every build: what the user or the self-check asks
// for, and the native family's self-check verdict (jax_msa/_self_check.py).
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace jax_msa {

enum class FamilyRequest : int { kByDevice = 0, kNative = 1, kPortable = 2 };

// The native family's self-check, as Python recorded it.
enum class NativeCheck : int { kUnchecked = 0, kPassed = 1, kFailed = 2 };

// Process-wide state (one instance in the extension: inline functions).
inline std::atomic<int>& native_check_state() {
  static std::atomic<int> state{static_cast<int>(NativeCheck::kUnchecked)};
  return state;
}

// Set by the self-check to run each family in turn; -1: none (JAX_MSA_KERNELS decides).
inline std::atomic<int>& family_request_override() {
  static std::atomic<int> request{-1};
  return request;
}

// The request in force: the override, else JAX_MSA_KERNELS.
inline FamilyRequest requested_family() {
  const int forced = family_request_override().load();
  if (forced >= 0) return static_cast<FamilyRequest>(forced);
  const char* env = std::getenv("JAX_MSA_KERNELS");
  if (env == nullptr) return FamilyRequest::kByDevice;
  if (std::strcmp(env, "portable") == 0) return FamilyRequest::kPortable;
  if (std::strcmp(env, "native") == 0) return FamilyRequest::kNative;
  return FamilyRequest::kByDevice;
}

}  // namespace jax_msa
