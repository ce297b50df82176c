// Shared pieces of the FFI handlers: decoding element types, checking the
// buffers XLA hands over, and the table of targets each op family adds.
// Handlers stay thin: decode, validate, dispatch.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/dtype.h"
#include "xla/ffi/api/ffi.h"
#ifdef JAX_MSA_WITH_CUDA
#include <cuda_runtime.h>
#endif

// Defines the CUDA handler `fn`: every one only launches kernels on XLA's
// stream, allocates nothing and never waits for the device, so XLA may record
// it into a command buffer (a CUDA graph) with the ops around it.
#define JAX_MSA_CUDA_HANDLER(fn, impl, ...)          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(fn, impl, (__VA_ARGS__), \
                                {::xla::ffi::Traits::kCmdBufferCompatible})

namespace jax_msa {

namespace ffi = ::xla::ffi;

// FFI targets by platform, filled by each op family (cpp/ffi/<op>.cc) and
// exported to Python by module.cc.
struct TargetTable {
  std::vector<std::pair<std::string, XLA_FFI_Handler*>> cpu;
  std::vector<std::pair<std::string, XLA_FFI_Handler*>> cuda;
  // CUDA targets whose every kernel also exists for any GPU since sm_80 (the
  // portable family, or code with no Hopper instruction, built as sm_80 PTX).
  std::vector<std::string> portable;
  // CUDA targets with a Blackwell-family kernel (sm100/, sm_100a), which serves
  // on compute capability 10.0 once the self-check has passed.
  std::vector<std::string> blackwell;
};

void AddIndexerTargets(TargetTable& table);
void AddSparseAttentionTargets(TargetTable& table);
void AddDenseAttentionTargets(TargetTable& table);
void AddPagedTargets(TargetTable& table);
void AddIndexerLossTargets(TargetTable& table);

inline std::optional<DType> ToDType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return DType::kF32;
    case ffi::DataType::BF16:
      return DType::kBF16;
    case ffi::DataType::F16:
      return DType::kF16;
    default:
      return std::nullopt;
  }
}

inline std::string ShapeString(const ffi::AnyBuffer& buffer) {
  std::string s = "[";
  auto dims = buffer.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return s + "]";
}

// Checks that `buffer` has exactly the dimensions `expected`.
inline ffi::Error CheckShape(const ffi::AnyBuffer& buffer,
                             std::initializer_list<int64_t> expected,
                             const char* name) {
  auto dims = buffer.dimensions();
  bool ok = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) {
    ok = ok && dims[i++] == e;
  }
  if (ok) return ffi::Error::Success();
  std::string want = "[";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  return ffi::Error::InvalidArgument(std::string("jax_msa: ") + name +
                                     " has shape " + ShapeString(buffer) +
                                     ", expected " + want + "]");
}

inline ffi::Error CheckType(const ffi::AnyBuffer& buffer, ffi::DataType type,
                            const char* name) {
  if (buffer.element_type() == type) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_msa: ") + name +
                                     " has an unexpected element type");
}

inline ffi::Error CheckRank(const ffi::AnyBuffer& buffer, size_t rank,
                            const char* name) {
  if (buffer.dimensions().size() == rank) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_msa: ") + name +
                                     " has shape " + ShapeString(buffer) +
                                     ", expected rank " + std::to_string(rank));
}

// Returns the first failed check, or success.
inline ffi::Error FirstError(std::initializer_list<ffi::Error> errors) {
  for (const ffi::Error& e : errors) {
    if (e.failure()) return e;
  }
  return ffi::Error::Success();
}

template <typename T>
const T* DataOf(const ffi::AnyBuffer& buffer) {
  return static_cast<const T*>(buffer.untyped_data());
}

template <typename T>
T* DataOf(ffi::Result<ffi::AnyBuffer>& buffer) {
  return static_cast<T*>(buffer->untyped_data());
}

#ifdef JAX_MSA_WITH_CUDA
// A launch status as an FFI error naming the step.
inline ffi::Error CudaStatus(const char* step, cudaError_t status) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_msa ") + step + ": " + cudaGetErrorString(status));
}

// The start of every CUDA handler's binding: XLA's stream.
inline auto CudaBind() { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); }
#endif

}  // namespace jax_msa
