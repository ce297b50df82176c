// FFI handlers of the indexer family: block_scores, topk_select, indexer.
#include <cstdint>

#include "ffi/ffi_common.h"
#include "kernels/cpu/cpu_kernels.h"
#ifdef JAX_MSA_WITH_CUDA
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/kernel_family.h"
#endif

namespace jax_msa {
namespace {

constexpr int64_t kBlock = cpu::kBlock;

int64_t NumBlocks(int64_t length) { return (length + kBlock - 1) / kBlock; }

// qi [B, Sq, Hi, Di], ki [B, Sk, Di], q_lengths / kv_lengths [B].
struct IndexerShape {
  int64_t B, Sq, Sk, Hi, Di;
};

ffi::Error DecodeIndexerInputs(const ffi::AnyBuffer& qi, const ffi::AnyBuffer& ki,
                               const ffi::AnyBuffer& q_lengths,
                               const ffi::AnyBuffer& kv_lengths, IndexerShape* shape,
                               DType* dtype) {
  if (auto e = FirstError({CheckRank(qi, 4, "qi"), CheckRank(ki, 3, "ki")}); e.failure()) {
    return e;
  }
  auto qd = qi.dimensions();
  auto kd = ki.dimensions();
  *shape = {qd[0], qd[1], kd[1], qd[2], qd[3]};
  auto type = ToDType(qi.element_type());
  if (!type || ki.element_type() != qi.element_type()) {
    return ffi::Error::InvalidArgument("jax_msa: qi and ki must share a float32/bfloat16/float16 type");
  }
  *dtype = *type;
  return FirstError({CheckShape(ki, {shape->B, shape->Sk, shape->Di}, "ki"),
                     CheckShape(q_lengths, {shape->B}, "q_lengths"),
                     CheckShape(kv_lengths, {shape->B}, "kv_lengths"),
                     CheckType(q_lengths, ffi::DataType::S32, "q_lengths"),
                     CheckType(kv_lengths, ffi::DataType::S32, "kv_lengths")});
}

ffi::Error BlockScoresCpu(ffi::AnyBuffer qi, ffi::AnyBuffer ki, ffi::AnyBuffer q_lengths,
                          ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> scores,
                          float scale) {
  IndexerShape s;
  DType dtype;
  if (auto e = DecodeIndexerInputs(qi, ki, q_lengths, kv_lengths, &s, &dtype); e.failure()) {
    return e;
  }
  if (auto e = CheckShape(*scores, {s.B, s.Sq, s.Hi, NumBlocks(s.Sk)}, "scores"); e.failure()) {
    return e;
  }
  cpu::block_scores(dtype, qi.untyped_data(), ki.untyped_data(), DataOf<int32_t>(q_lengths),
                    DataOf<int32_t>(kv_lengths), DataOf<float>(scores), s.B, s.Sq, s.Sk, s.Hi,
                    s.Di, scale);
  return ffi::Error::Success();
}

// scores [B, Sq, Hi, NB] float32, ids [B, Sq, Hi, topk] int32.
ffi::Error DecodeTopkInputs(const ffi::AnyBuffer& scores, const ffi::AnyBuffer& q_lengths,
                            const ffi::AnyBuffer& kv_lengths,
                            const ffi::AnyBuffer& ids, int64_t topk) {
  if (auto e = FirstError({CheckRank(scores, 4, "scores"),
                           CheckType(scores, ffi::DataType::F32, "scores")});
      e.failure()) {
    return e;
  }
  auto d = scores.dimensions();
  return FirstError({CheckShape(q_lengths, {d[0]}, "q_lengths"),
                     CheckShape(kv_lengths, {d[0]}, "kv_lengths"),
                     CheckShape(ids, {d[0], d[1], d[2], topk}, "ids")});
}

ffi::Error TopkSelectCpu(ffi::AnyBuffer scores, ffi::AnyBuffer q_lengths,
                         ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> ids,
                         int64_t topk) {
  if (auto e = DecodeTopkInputs(scores, q_lengths, kv_lengths, *ids, topk); e.failure()) {
    return e;
  }
  auto d = scores.dimensions();
  cpu::topk_select(DataOf<float>(scores), DataOf<int32_t>(q_lengths),
                   DataOf<int32_t>(kv_lengths), DataOf<int32_t>(ids), d[0], d[1], d[2], d[3],
                   topk);
  return ffi::Error::Success();
}

// The optional second result is lse [B, Sq, Hi].
ffi::Error IndexerCpu(ffi::AnyBuffer qi, ffi::AnyBuffer ki, ffi::AnyBuffer q_lengths,
                      ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> ids,
                      ffi::RemainingRets optional_lse, int64_t topk, float scale) {
  IndexerShape s;
  DType dtype;
  if (auto e = DecodeIndexerInputs(qi, ki, q_lengths, kv_lengths, &s, &dtype); e.failure()) {
    return e;
  }
  if (auto e = CheckShape(*ids, {s.B, s.Sq, s.Hi, topk}, "ids"); e.failure()) return e;
  float* lse = nullptr;
  if (!optional_lse.empty()) {
    auto result = optional_lse.get<ffi::AnyBuffer>(0);
    if (!result.has_value()) return result.error();
    if (auto e = CheckShape(**result, {s.B, s.Sq, s.Hi}, "lse"); e.failure()) return e;
    lse = DataOf<float>(*result);
  }
  cpu::indexer(dtype, qi.untyped_data(), ki.untyped_data(), DataOf<int32_t>(q_lengths),
               DataOf<int32_t>(kv_lengths), DataOf<int32_t>(ids), lse, s.B, s.Sq, s.Sk, s.Hi,
               s.Di, topk, scale);
  return ffi::Error::Success();
}

#ifdef JAX_MSA_WITH_CUDA
ffi::Error TopkSelectCuda(cudaStream_t stream, ffi::AnyBuffer scores, ffi::AnyBuffer q_lengths,
                          ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> ids,
                          int64_t topk) {
  if (auto e = DecodeTopkInputs(scores, q_lengths, kv_lengths, *ids, topk); e.failure()) {
    return e;
  }
  auto d = scores.dimensions();
  // Rows of up to 1024 blocks (128K keys): the indexer's warp-per-row kernel,
  // same ids in the same slots, 9x faster at 128K; longer rows: one CTA each.
  const auto select = d[3] <= cuda::kWarpSelectMaxBlocks ? cuda::indexer_select : cuda::topk_select;
  cudaError_t status = select(DataOf<float>(scores), DataOf<int32_t>(q_lengths),
                              DataOf<int32_t>(kv_lengths), DataOf<int32_t>(ids), d[0], d[1], d[2],
                              d[3], topk, stream);
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_msa topk_select: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

// The CUDA kernels (either family) take 16-bit qi/ki with Di 64 or 128; the Python lowering
// sends every other case to the pure-JAX reference, so this only fires for a
// direct caller of the target.
ffi::Error CheckCudaIndexerInputs(DType dtype, const IndexerShape& s) {
  if (!cuda::block_scores_supported(dtype, s.Di)) {
    return ffi::Error::InvalidArgument(
        "jax_msa: the CUDA indexer kernels take bfloat16/float16 qi and ki with head dim 64 "
        "or 128, got head dim " + std::to_string(s.Di));
  }
  return ffi::Error::Success();
}

ffi::Error CudaError(const char* op, cudaError_t status) {
  return ffi::Error::Internal(std::string("jax_msa ") + op + ": " + cudaGetErrorString(status));
}

ffi::Error BlockScoresCuda(cudaStream_t stream, ffi::AnyBuffer qi, ffi::AnyBuffer ki,
                           ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                           ffi::Result<ffi::AnyBuffer> scores, float scale) {
  IndexerShape s;
  DType dtype;
  if (auto e = DecodeIndexerInputs(qi, ki, q_lengths, kv_lengths, &s, &dtype); e.failure()) {
    return e;
  }
  if (auto e = FirstError({CheckCudaIndexerInputs(dtype, s),
                           CheckShape(*scores, {s.B, s.Sq, s.Hi, NumBlocks(s.Sk)}, "scores")});
      e.failure()) {
    return e;
  }
  const auto scores_kernel = cuda::kernel_family() == cuda::KernelFamily::kPortable
                                 ? cuda::portable_block_scores
                                 : cuda::block_scores;
  cudaError_t status = scores_kernel(
      dtype, qi.untyped_data(), ki.untyped_data(), DataOf<int32_t>(q_lengths),
      DataOf<int32_t>(kv_lengths), DataOf<float>(scores), s.B, s.Sq, s.Sk, s.Hi, s.Di, scale,
      stream);
  if (status != cudaSuccess) return CudaError("block_scores", status);
  return ffi::Error::Success();
}

// The indexer on CUDA is indexer_scores -> indexer_select -> selected_lse
// (jax_msa/indexer.py): the block scores between them are ordinary XLA
// buffers, placed by XLA's buffer assignment, so no handler allocates.
// indexer_scores: (qi, ki, q_lengths, kv_lengths) -> scores[, sums].
ffi::Error IndexerScoresCuda(cudaStream_t stream, ffi::AnyBuffer qi, ffi::AnyBuffer ki,
                             ffi::AnyBuffer q_lengths, ffi::AnyBuffer kv_lengths,
                             ffi::Result<ffi::AnyBuffer> scores, ffi::RemainingRets optional_sums,
                             float scale) {
  IndexerShape s;
  DType dtype;
  if (auto e = DecodeIndexerInputs(qi, ki, q_lengths, kv_lengths, &s, &dtype); e.failure()) {
    return e;
  }
  const int64_t NB = NumBlocks(s.Sk);
  if (auto e = FirstError({CheckCudaIndexerInputs(dtype, s),
                           CheckShape(*scores, {s.B, s.Sq, s.Hi, NB}, "scores")});
      e.failure()) {
    return e;
  }
  float* sums = nullptr;
  if (!optional_sums.empty()) {
    auto result = optional_sums.get<ffi::AnyBuffer>(0);
    if (!result.has_value()) return result.error();
    if (auto e = CheckShape(**result, {s.B, s.Sq, s.Hi, NB}, "sums"); e.failure()) return e;
    sums = DataOf<float>(*result);
  }
  const auto scores_kernel = cuda::kernel_family() == cuda::KernelFamily::kPortable
                                 ? cuda::portable_indexer_scores
                                 : cuda::indexer_scores;
  cudaError_t status = scores_kernel(
      dtype, qi.untyped_data(), ki.untyped_data(), DataOf<int32_t>(q_lengths),
      DataOf<int32_t>(kv_lengths), DataOf<float>(scores), sums, s.B, s.Sq, s.Sk, s.Hi, s.Di,
      scale, stream);
  if (status != cudaSuccess) return CudaError("indexer_scores", status);
  return ffi::Error::Success();
}

// indexer_select: topk_select's signature, the indexer's warp-per-row kernel.
ffi::Error IndexerSelectCuda(cudaStream_t stream, ffi::AnyBuffer scores, ffi::AnyBuffer q_lengths,
                             ffi::AnyBuffer kv_lengths, ffi::Result<ffi::AnyBuffer> ids,
                             int64_t topk) {
  if (auto e = DecodeTopkInputs(scores, q_lengths, kv_lengths, *ids, topk); e.failure()) {
    return e;
  }
  auto d = scores.dimensions();
  cudaError_t status = cuda::indexer_select(DataOf<float>(scores), DataOf<int32_t>(q_lengths),
                                            DataOf<int32_t>(kv_lengths), DataOf<int32_t>(ids),
                                            d[0], d[1], d[2], d[3], topk, stream);
  if (status != cudaSuccess) return CudaError("indexer_select", status);
  return ffi::Error::Success();
}

// selected_lse: (scores, sums [B, Sq, Hi, NB], ids [B, Sq, Hi, topk],
// q_lengths, kv_lengths) -> lse [B, Sq, Hi]. The lengths are unused (the ids
// already encode them); they make the op's layout that of every query op.
ffi::Error SelectedLseCuda(cudaStream_t stream, ffi::AnyBuffer scores, ffi::AnyBuffer sums,
                           ffi::AnyBuffer ids, ffi::AnyBuffer, ffi::AnyBuffer,
                           ffi::Result<ffi::AnyBuffer> lse) {
  if (auto e = FirstError({CheckRank(scores, 4, "scores"), CheckRank(ids, 4, "ids"),
                           CheckType(scores, ffi::DataType::F32, "scores"),
                           CheckType(sums, ffi::DataType::F32, "sums"),
                           CheckType(ids, ffi::DataType::S32, "ids")});
      e.failure()) {
    return e;
  }
  auto d = scores.dimensions();
  const int64_t topk = ids.dimensions()[3];
  if (auto e = FirstError({CheckShape(sums, {d[0], d[1], d[2], d[3]}, "sums"),
                           CheckShape(ids, {d[0], d[1], d[2], topk}, "ids"),
                           CheckShape(*lse, {d[0], d[1], d[2]}, "lse")});
      e.failure()) {
    return e;
  }
  cudaError_t status =
      cuda::selected_lse(DataOf<float>(scores), DataOf<float>(sums), DataOf<int32_t>(ids),
                         DataOf<float>(lse), d[0] * d[1] * d[2], d[3], topk, stream);
  if (status != cudaSuccess) return CudaError("selected_lse", status);
  return ffi::Error::Success();
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kBlockScoresCpu, BlockScoresCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kTopkSelectCpu, TopkSelectCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("topk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kIndexerCpu, IndexerCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets()
                                  .Attr<int64_t>("topk")
                                  .Attr<float>("scale"));

#ifdef JAX_MSA_WITH_CUDA
JAX_MSA_CUDA_HANDLER(kTopkSelectCuda, TopkSelectCuda,
                     CudaBind()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Ret<ffi::AnyBuffer>()
                         .Attr<int64_t>("topk"));

JAX_MSA_CUDA_HANDLER(kBlockScoresCuda, BlockScoresCuda,
                     CudaBind()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Ret<ffi::AnyBuffer>()
                         .Attr<float>("scale"));

JAX_MSA_CUDA_HANDLER(kIndexerScoresCuda, IndexerScoresCuda,
                     CudaBind()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Ret<ffi::AnyBuffer>()
                         .RemainingRets()
                         .Attr<float>("scale"));

JAX_MSA_CUDA_HANDLER(kIndexerSelectCuda, IndexerSelectCuda,
                     CudaBind()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Ret<ffi::AnyBuffer>()
                         .Attr<int64_t>("topk"));

JAX_MSA_CUDA_HANDLER(kSelectedLseCuda, SelectedLseCuda,
                     CudaBind()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>()
                         .Ret<ffi::AnyBuffer>());
#endif

void AddIndexerTargets(TargetTable& table) {
  table.cpu.emplace_back("jax_msa_block_scores", kBlockScoresCpu);
  table.cpu.emplace_back("jax_msa_topk_select", kTopkSelectCpu);
  table.cpu.emplace_back("jax_msa_indexer", kIndexerCpu);
#ifdef JAX_MSA_WITH_CUDA
  table.cuda.emplace_back("jax_msa_topk_select", kTopkSelectCuda);
  table.portable.emplace_back("jax_msa_topk_select");
  table.cuda.emplace_back("jax_msa_block_scores", kBlockScoresCuda);
  table.portable.emplace_back("jax_msa_block_scores");
  table.cuda.emplace_back("jax_msa_indexer_scores", kIndexerScoresCuda);
  table.portable.emplace_back("jax_msa_indexer_scores");
  table.cuda.emplace_back("jax_msa_indexer_select", kIndexerSelectCuda);
  table.portable.emplace_back("jax_msa_indexer_select");
  table.cuda.emplace_back("jax_msa_selected_lse", kSelectedLseCuda);
  table.portable.emplace_back("jax_msa_selected_lse");
#endif
}

}  // namespace jax_msa
