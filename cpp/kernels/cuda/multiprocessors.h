// The current device's SM count, for sizing grids on the host.
#pragma once

#include <cuda_runtime.h>

namespace jax_msa::cuda {

// `fallback` where the query fails; the error is cleared, since only the work
// split depends on the answer.
inline int multiprocessor_count(int fallback) {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();
    return fallback;
  }
  return sms;
}

}  // namespace jax_msa::cuda
